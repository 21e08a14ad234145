"""The agent's side of NAT traversal: its disco key, its STUN servers, and the traversal
(pywg.mesh.traversal) fed from the mesh view.

- The disco key is made once and kept in the state directory (``disco.key``, 0600, the
  private half in hex); only its public half is registered (``discoKey``) and shown.
- STUN servers: ``--stun`` overrides; otherwise the coordinator's ``stunServers`` (in the
  register response and in the watch snapshots), ``"IP:port"`` each; absent: none. Both are
  read by pywg.nat.stun_servers, the one parser of STUN server lists.
- DERP: the coordinator's ``derpMap`` (register response, watch snapshot); the agent picks
  its home region (pywg.mesh.home_region: TCP connect time, RegionScore, hysteresis, again
  every minute and when the map changes), runs the device's relay and reports the region
  with its endpoints; a peer's ``region`` is where it is reached.
- The NAT observer: ``--nat-observer`` overrides; otherwise the coordinator's ``natObserver``
  ("IP:port"). Behind a NAT the agent learns the mapping's lifetime from it
  (pywg.mesh.keepalive_learning) and keeps alive inside it; again when its WAN address changes.
- Every apply: the peers with a disco key go to the traversal (their advertised
  ``endpoints`` are the candidates), and the reconcile takes back, for each of them, the
  endpoint the traversal chose ("host:port", or ``derp:REGION`` for its DERP path) and the
  keepalive it wants.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pywg.derp.derpmap import DerpMap, DerpMapError, parse_derp_map
from pywg.manage.types import Endpoint, InvalidConfig
from pywg.mesh.agent_health import HANDSHAKE_FRESH_S
from pywg.mesh.keepalive_learning import Credential, Learner
from pywg.mesh.reconcile import MeshView
from pywg.mesh.traversal import DatagramPort, PeerInfo, Traversal, endpoint_text
from pywg.nat.disco import KEY_LENGTH, DiscoKey
from pywg.nat.stun import TransportAddress
from pywg.nat.stun_client import MappingReport
from pywg.nat.stun_servers import BadServerList, parse_server_list
from pywg.protocol.endpoint import RelayEndpoint

log = logging.getLogger(__name__)
DISCO_KEY_FILE = "disco.key"
DERP_PREFIX = "derp:"  # a reconcile endpoint "derp:REGION": the peer's DERP path
NO_TRAVERSAL = "traversal needs --engine in-process"


def load_disco_key(state_dir: Path) -> DiscoKey:
    """The node's disco key from ``state_dir/disco.key``, made there (0600) the first time."""
    path = Path(state_dir) / DISCO_KEY_FILE
    try:
        return DiscoKey(bytes.fromhex(path.read_text().strip()))
    except FileNotFoundError:
        pass
    except ValueError:
        raise ValueError(f"{path}: not a disco private key (64 hex digits); remove it to make a new one") from None
    key = os.urandom(KEY_LENGTH)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return DiscoKey(key)


def parse_observer(value: object, what: str = "natObserver") -> tuple[str, int] | None:
    """The observer's "IP:port" (None: absent or unusable, with a warning naming ``what``)."""
    if value is None:
        return None
    try:
        ep = Endpoint.parse(value.strip() if isinstance(value, str) else repr(value))
    except InvalidConfig as exc:
        log.warning("%s %r is unusable: %s", what, value, exc.reason)
        return None
    return str(ep.host), ep.port


def _key(text: object) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_LENGTH else None


def region_of(value: object) -> int | None:
    """A node's ``region`` as the coordinator shows it ("900"): the DERP region id, or None."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and 0 < int(value) < 2**53:
        return int(value)
    return None


def relay_text(region: int) -> str:
    return f"{DERP_PREFIX}{region}"


def parse_relay_text(text: str) -> int | None:
    """The region of a ``derp:REGION`` endpoint text, None for any other text."""
    return region_of(text[len(DERP_PREFIX):]) if text.startswith(DERP_PREFIX) else None


def _endpoints(value: object) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for item in value[:16] if isinstance(value, list) else ():
        with contextlib.suppress(InvalidConfig, TypeError, AttributeError):
            ep = Endpoint.parse(item)
            out.append((str(ep.host), ep.port))
    return tuple(out)


class AgentTraversal:
    """The traversal of one agent; ``start`` once its device runs."""

    def __init__(self, key: DiscoKey, stun_override: tuple[TransportAddress, ...] | None,
                 observer_override: tuple[str, int] | None = None) -> None:
        self.key = key
        self.stun_override = stun_override
        self.coordinator_stun: tuple[TransportAddress, ...] = ()
        self.observer_override = observer_override
        self.coordinator_observer: tuple[str, int] | None = None
        self.traversal: Traversal | None = None
        self.derp_map: DerpMap | None = None  # the coordinator's
        self.home_region: int | None = None  # ours, once the relay runs
        self.region_times: dict[int, float] = {}
        self._port: DatagramPort | None = None
        self.learner: Learner | None = None

    @property
    def observer(self) -> tuple[str, int] | None:
        return self.observer_override if self.observer_override is not None else self.coordinator_observer

    @property
    def disco_public(self) -> str:
        return base64.b64encode(self.key.public).decode()

    @property
    def stun_servers(self) -> tuple[TransportAddress, ...]:
        return self.stun_override if self.stun_override is not None else self.coordinator_stun

    def from_coordinator(self, data: Mapping[str, Any]) -> None:
        """Read ``stunServers``, ``derpMap`` and ``natObserver`` of a register response, a
        watch snapshot or a settings message (absent: unchanged)."""
        if "derpMap" in data:
            try:
                self.derp_map = parse_derp_map(data["derpMap"]) if data["derpMap"] else None
            except DerpMapError as exc:
                log.warning("the coordinator's DERP map is unusable: %s", exc)
        if "natObserver" in data:
            self.coordinator_observer = parse_observer(data["natObserver"])
            if self.learner is not None:
                self.learner.set_observer(self.observer)
        if "stunServers" not in data:
            return
        try:
            servers = parse_server_list(data["stunServers"], "stunServers")
        except BadServerList as exc:
            log.warning("the coordinator's STUN servers are unusable: %s", exc)
            return
        self.coordinator_stun = servers
        if self.traversal is not None:
            self.traversal.set_stun_servers(self.stun_servers)

    def start(self, port: DatagramPort, node_key: bytes, *, local: Callable[[], list[tuple[str, int]]],
              activity: Callable[[], Mapping[bytes, int]], on_candidates: Callable[[list[str]], None],
              on_change: Callable[[], None], on_status: Callable[[], None] | None = None,
              credential: Credential | None = None) -> None:
        if self.traversal is not None:
            return
        self._port = port
        self.learner = Learner(credential or (lambda: None), self._learnt)
        self.learner.set_observer(self.observer)
        self.traversal = Traversal(port, self.key, node_key, stun_servers=self.stun_servers, local=local,
                                   activity=activity, on_candidates=on_candidates, on_change=on_change,
                                   on_status=on_status, on_mapping=self._mapped)
        self.traversal.start()

    def use_relay(self, home: int, received: Callable[[], Mapping[bytes, tuple[int, bool]]]) -> None:
        """The device's relay runs (home region ``home``): disco to a peer without a trusted
        direct path goes through it, to the peer's home region."""
        traversal, port = self.traversal, self._port
        if traversal is None or port is None:
            return
        self.home_region = home

        def relay(node_key: bytes, packet: bytes) -> None:
            peer = traversal.peers.get(node_key)
            if peer is not None and peer.info.region is not None:
                port.send_datagram(packet, RelayEndpoint(peer.info.region, node_key))  # type: ignore[arg-type]

        traversal.set_relay(relay, received)
    def _mapped(self, report: MappingReport) -> None:
        """A gathering ended: behind a NAT, learn its lifetime (again if its WAN address changed)."""
        if self.learner is None or self.traversal is None:
            return
        if report.behind_nat is not True:
            self.learner.relearn(None)
            return
        self.learner.relearn(frozenset(ep[0] for ep in self.traversal.reflexive))

    def _learnt(self) -> None:
        if self.traversal is not None and self.learner is not None:
            self.traversal.set_learnt_keepalive(self.learner.interval)

    def use_node_key(self, node_key: bytes) -> None:
        """A key rotation: our pings carry the new node key."""
        if self.traversal is not None:
            self.traversal.node_key = node_key
            for peer in self.traversal.peers.values():
                peer.paths.node_key = node_key

    def apply(self, view: MeshView, self_id: str, self_key: str) -> Mapping[str, str | None] | None:
        """Give the traversal the peers with disco keys; their endpoints for the reconcile
        (public key -> "host:port" or None), or None when the traversal does not run."""
        if self.traversal is None:
            return None
        peers: dict[bytes, PeerInfo] = {}
        for node_id, node in view.nodes.items():
            node_key = _key(node.get("publicKey"))
            disco = _key(node.get("discoKey"))
            if node_id == self_id or node.get("publicKey") == self_key or node_key is None or disco is None:
                continue
            peers[node_key] = PeerInfo(disco, _endpoints(node.get("endpoints")), region_of(node.get("region")))
        self.traversal.set_peers(peers)
        out: dict[str, str | None] = {}
        for node_key in self.traversal.peers:
            ep = self.traversal.endpoint(node_key)
            text = (None if ep is None else relay_text(ep.region) if isinstance(ep, RelayEndpoint)
                    else endpoint_text(ep))
            out[base64.b64encode(node_key).decode()] = text
        return out

    def keepalive(self, default: int) -> int:
        return default if self.traversal is None else self.traversal.keepalive

    def own_status(self, keepalive: int) -> dict[str, Any]:
        if self.traversal is None:
            return {"candidates": [], "mapping": "unknown", "behindNat": None, "keepalive": keepalive,
                    "reason": NO_TRAVERSAL, "discoKey": self.disco_public}
        derp = {"homeRegion": self.home_region, "regionLatencyMs": {str(r): round(t * 1000, 3) for r, t in
                                                                    sorted(self.region_times.items())}}
        return {**self.traversal.own_status(), "discoKey": self.disco_public, "derp": derp,
                **self._keepalive_status()}

    def _keepalive_status(self) -> dict[str, Any]:
        """``keepaliveSource`` ("learnt: ...", "default", "no NAT") and the learning's state."""
        assert self.traversal is not None
        learner = self.learner
        if self.traversal.behind_nat is False:
            source = "no NAT"
        elif learner is not None and learner.learnt is not None:
            source = learner.learnt.describe()
        else:
            source = "default"
        out: dict[str, Any] = {"keepaliveSource": source}
        if learner is not None:
            out["keepaliveLearning"] = {"state": learner.state, "trials": learner.trials,
                                        "observer": None if learner.observer is None
                                        else endpoint_text(learner.observer)}
        return out

    def peer_status(self, public_key: str) -> dict[str, Any] | None:
        node_key = _key(public_key)
        if self.traversal is None or node_key is None:
            return None
        return self.traversal.peer_status(node_key)

    async def close(self) -> None:
        if self.learner is not None:
            await self.learner.close()
            self.learner = None
        if self.traversal is not None:
            await self.traversal.close()
            self.traversal = None


def handshake_path(last_handshake_age: float | None) -> dict[str, Any]:
    """The daemon engine's path (no traversal): "direct" while the handshake is fresh."""
    fresh = last_handshake_age is not None and last_handshake_age < HANDSHAKE_FRESH_S
    return {"path": "direct" if fresh else "none", "rttMs": None, "candidates": [], "reason": NO_TRAVERSAL}
