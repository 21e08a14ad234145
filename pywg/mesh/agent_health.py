"""The agent's side of health, sans-I/O: is each peer's tunnel alive, and the per-peer
entries of ``status.json`` and of the health report (see :mod:`pywg.mesh.health`).

WireGuard's latest handshake alone says little: a session's handshake stays "fresh" for
up to 180 seconds after the peer is gone. So every health interval the agent sends each
peer an ICMP echo (see :mod:`pywg.mesh.probe`), which a live peer's host answers at once
through the tunnel. A peer is disconnected when none of its echoes was answered for
:attr:`Liveness.silence_limit`: the two latest echoes since its last answer both went
unanswered for their whole :data:`~pywg.mesh.echoes.ECHO_TIMEOUT_S` (enough for an
echo that waits for a handshake and its one retry).

- ``connected``: a handshake within :data:`HANDSHAKE_FRESH_S` and an echo answered
  within the silence limit;
- ``connecting``: no echo answered yet, and the peer was first seen less than the
  silence limit ago;
- ``disconnected``: otherwise (the handshake went stale, the peer fell silent, or it never
  answered).

``latencyUs`` is :meth:`Echoes.rtt_us <pywg.mesh.echoes.Echoes.rtt_us>` of a connected
peer (the median of its last answered echoes), null otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pywg.manage.types import ConnectionStatus, PeerStats, format_time
from pywg.mesh.echoes import ECHO_TIMEOUT_S, Echoes
from pywg.protocol.constants import REJECT_AFTER_TIME

HANDSHAKE_FRESH_S = REJECT_AFTER_TIME  # no session outlives it
UNANSWERED = 2  # echoes in a row, each with its full timeout


class Liveness:
    """Each peer's state from its handshake and its echoes, by public key, for probes sent
    every ``interval`` seconds; times are seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._first: dict[str, float] = {}  # when each peer was first sampled

    @property
    def silence_limit(self) -> float:
        """Seconds without an answered echo after which a peer is disconnected."""
        return ECHO_TIMEOUT_S + UNANSWERED * self.interval

    def status(self, key: str, *, last_handshake: float | None, silent_for: float | None,
               now: float) -> ConnectionStatus:
        """Peer ``key`` at ``now`` (its handshake on the same clock), ``silent_for`` seconds
        after its last answered echo (None: it never answered)."""
        first = self._first.setdefault(key, now)
        if silent_for is None:
            young = now - first < self.silence_limit
            return ConnectionStatus.CONNECTING if young else ConnectionStatus.DISCONNECTED
        if last_handshake is None or now - last_handshake >= HANDSHAKE_FRESH_S:
            return ConnectionStatus.DISCONNECTED
        if silent_for > self.silence_limit:
            return ConnectionStatus.DISCONNECTED
        return ConnectionStatus.CONNECTED

    def forget(self, keep: set[str]) -> None:
        """Drop the peers not in ``keep`` (removed from the interface)."""
        for key in self._first.keys() - keep:
            del self._first[key]


def peer_entries(
    peers: tuple[PeerStats, ...], nodes_by_key: Mapping[str, Mapping[str, Any]], liveness: Liveness,
    echoes: Echoes, now: float, mono: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``status.json``'s peers and the health report's connections (peers that are mesh
    nodes) from the interface's counters and the echoes; ``now`` is wall-clock time (the
    handshakes'), ``mono`` the echoes' clock."""
    shown, report = [], []
    for p in peers:
        key = p.public_key.to_base64()
        node = nodes_by_key.get(key, {})
        hs = p.last_handshake.timestamp() if p.last_handshake else None
        state = liveness.status(key, last_handshake=hs, silent_for=echoes.silent_for(key, mono), now=now)
        latency = echoes.rtt_us(key, mono) if state is ConnectionStatus.CONNECTED else None
        counters = {"lastHandshake": None if p.last_handshake is None else format_time(p.last_handshake),
                    "rxBytes": p.rx_bytes, "txBytes": p.tx_bytes,
                    "endpoint": None if p.endpoint is None else str(p.endpoint)}
        shown.append({"nodeId": node.get("id"), "name": node.get("name"), "publicKey": key,
                      "internalIp": node.get("internalIp"), "internalIpv6": node.get("internalIpv6"),
                      "status": state.value, **counters, "latencyUs": latency})
        if node.get("id"):
            report.append({"to": node["id"], "status": state.value, "latencyUs": latency, **counters})
    keep = {p.public_key.to_base64() for p in peers}
    liveness.forget(keep)
    echoes.forget(keep)
    return shown, report
