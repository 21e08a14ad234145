"""The agent's side of health, sans-I/O: is each peer's tunnel alive, and the per-peer
entries of ``status.json`` and of the health report (see :mod:`pywg.mesh.health`).

WireGuard's latest handshake alone says little: a session's handshake stays "fresh" for
up to 180 seconds after the peer is gone. So the agent also watches the bytes it receives
from each peer between samples. Every health interval it sends each peer a probe (see
:mod:`pywg.mesh.probe`) that a live peer answers within WireGuard's KEEPALIVE_TIMEOUT
(10 s); nothing received for ``KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + interval`` seconds
(15 s and one sampling interval) and the peer is disconnected.

- ``connected``: a handshake within :data:`HANDSHAKE_FRESH_S` and bytes received recently;
- ``connecting``: no handshake yet, and the peer was first seen less than the silence
  limit ago;
- ``disconnected``: otherwise (the handshake went stale, the peer fell silent, or it never
  answered).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pywg.manage.types import ConnectionStatus, PeerStats, format_time
from pywg.protocol.constants import KEEPALIVE_TIMEOUT, REJECT_AFTER_TIME, REKEY_TIMEOUT

HANDSHAKE_FRESH_S = REJECT_AFTER_TIME  # no session outlives it


@dataclass
class _Seen:
    first: float  # when this peer was first sampled
    rx_bytes: int
    rx_changed: float  # when its received bytes last grew (or first sampled)


class Liveness:
    """Samples of each peer's counters, by public key, taken (and probes sent) every
    ``interval`` seconds; times are seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._seen: dict[str, _Seen] = {}

    @property
    def silence_limit(self) -> float:
        """Seconds without received bytes after which a probed peer is disconnected."""
        return KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self.interval

    def status(self, key: str, *, rx_bytes: int, last_handshake: float | None, now: float) -> ConnectionStatus:
        """Record a sample of peer ``key`` at ``now`` and say what its tunnel is."""
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = _Seen(first=now, rx_bytes=rx_bytes, rx_changed=now)
        elif rx_bytes != seen.rx_bytes:  # grew; or the counters restarted with the daemon
            seen.rx_bytes, seen.rx_changed = rx_bytes, now
        if last_handshake is None:
            if now - seen.first < self.silence_limit:
                return ConnectionStatus.CONNECTING
            return ConnectionStatus.DISCONNECTED
        if now - last_handshake >= HANDSHAKE_FRESH_S:
            return ConnectionStatus.DISCONNECTED
        if now - seen.rx_changed > self.silence_limit:
            return ConnectionStatus.DISCONNECTED
        return ConnectionStatus.CONNECTED

    def forget(self, keep: set[str]) -> None:
        """Drop the samples of peers not in ``keep`` (removed from the interface)."""
        for key in self._seen.keys() - keep:
            del self._seen[key]


def peer_entries(
    peers: tuple[PeerStats, ...], nodes_by_key: Mapping[str, Mapping[str, Any]], liveness: Liveness, now: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``status.json``'s peers and the health report's connections (peers that are mesh
    nodes) from the interface's counters; ``latencyUs`` stays null: nothing measures a
    round trip on a WireGuard peer yet."""
    shown, report = [], []
    for p in peers:
        key = p.public_key.to_base64()
        node = nodes_by_key.get(key, {})
        hs = p.last_handshake.timestamp() if p.last_handshake else None
        state = liveness.status(key, rx_bytes=p.rx_bytes, last_handshake=hs, now=now)
        counters = {"lastHandshake": None if p.last_handshake is None else format_time(p.last_handshake),
                    "rxBytes": p.rx_bytes, "txBytes": p.tx_bytes,
                    "endpoint": None if p.endpoint is None else str(p.endpoint)}
        shown.append({"nodeId": node.get("id"), "name": node.get("name"), "publicKey": key,
                      "internalIp": node.get("internalIp"), "internalIpv6": node.get("internalIpv6"),
                      "status": state.value, **counters, "latencyUs": p.latency_us})
        if node.get("id"):
            report.append({"to": node["id"], "status": state.value, "latencyUs": p.latency_us, **counters})
    liveness.forget({p.public_key.to_base64() for p in peers})
    return shown, report
