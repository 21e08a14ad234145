"""A tiny in-memory internet for the path-selection logic tests: NATs, hosts, DERP, a fake clock.

This is a logic double (the real NAT lab with nftables is pywg/testing's job): a NAT maps
(endpoint-independent = cone, endpoint-dependent = symmetric) and filters (endpoint-independent
= full cone, address-dependent = address-restricted, address+port-dependent = port-restricted);
packets take a fixed one-way latency; DERP always delivers, with its own latency.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
from dataclasses import dataclass, field

from pywg.nat.disco import DiscoKey
from pywg.nat.paths import NoDirectPath, PathLost, PeerPaths, SendDisco, SetWireGuardEndpoint, Source

STUN_SERVER = ("192.0.2.100", 3478)
WG_PORT = 41641


def seeded_random(seed: bytes):
    counter = [0]

    def random(n: int) -> bytes:
        out = b""
        while len(out) < n:
            counter[0] += 1
            out += hashlib.sha256(seed + counter[0].to_bytes(8, "big")).digest()
        return out[:n]

    return random


@dataclass
class Nat:
    public_ip: str
    mapping: str = "endpoint-independent"  # or "endpoint-dependent" (symmetric)
    filtering: str = "address-port"  # "endpoint-independent", "address", "address-port"
    next_port: int = 20000
    ports: dict[tuple, int] = field(default_factory=dict)  # mapping key -> public port
    owner: dict[int, tuple[str, int]] = field(default_factory=dict)  # public port -> private endpoint
    allowed: dict[int, set] = field(default_factory=dict)  # public port -> permitted remote keys
    blocked: bool = False

    def outbound(self, private: tuple[str, int], dst: tuple[str, int]) -> tuple[str, int] | None:
        if self.blocked:
            return None
        key = (private,) if self.mapping == "endpoint-independent" else (private, dst)
        port = self.ports.get(key)
        if port is None:
            port = self.ports[key] = self.next_port
            self.next_port += 7
            self.owner[port] = private
        self.allowed.setdefault(port, set()).add(self._filter_key(dst))
        return (self.public_ip, port)

    def inbound(self, port: int, src: tuple[str, int]) -> tuple[str, int] | None:
        if self.blocked or port not in self.owner:
            return None
        if self.filtering != "endpoint-independent" and self._filter_key(src) not in self.allowed[port]:
            return None
        return self.owner[port]

    def _filter_key(self, remote: tuple[str, int]):
        if self.filtering == "address":
            return remote[0]
        return remote  # address-port (the unused key for endpoint-independent filtering is harmless)

    def reboot(self) -> None:
        self.ports.clear()
        self.owner.clear()
        self.allowed.clear()


NAT_KINDS = {
    "full-cone": ("endpoint-independent", "endpoint-independent"),
    "address-restricted": ("endpoint-independent", "address"),
    "port-restricted": ("endpoint-independent", "address-port"),
    "symmetric": ("endpoint-dependent", "address-port"),
}


def make_nat(kind: str, public_ip: str) -> Nat | None:
    if kind == "open":
        return None
    mapping, filtering = NAT_KINDS[kind]
    return Nat(public_ip, mapping, filtering)


class Host:
    def __init__(self, name: str, local_ip: str, nat: Nat | None, ipv6: str | None = None) -> None:
        self.name = name
        self.local = (local_ip, WG_PORT)
        self.nat = nat
        self.ipv6 = (ipv6, WG_PORT) if ipv6 else None
        self.key = DiscoKey(hashlib.sha256(name.encode()).digest())
        self.node_key = hashlib.sha256(b"node" + name.encode()).digest()
        self.random = seeded_random(name.encode())
        self.paths: PeerPaths | None = None
        self.events: list[tuple[float, object]] = []

    def stun_endpoint(self) -> tuple[str, int]:
        """The STUN-reflexive address: the mapping the NAT makes toward the STUN server."""
        if self.nat is None:
            return self.local
        mapped = self.nat.outbound(self.local, STUN_SERVER)
        assert mapped is not None
        return mapped

    def candidates(self) -> list[tuple[tuple[str, int], Source]]:
        out = [(self.local, Source.LOCAL)]
        if self.nat is not None:
            out.append((self.stun_endpoint(), Source.STUN))
        if self.ipv6:
            out.append((self.ipv6, Source.LOCAL))
        return out

    def own_endpoints(self) -> list[tuple[str, int]]:
        return [ep for ep, _ in self.candidates()]

    def wireguard_endpoints(self) -> list[tuple[str, int]]:
        return [e.endpoint for _, e in self.events if isinstance(e, SetWireGuardEndpoint)]

    def first(self, kind: type) -> tuple[float, object] | None:
        return next(((t, e) for t, e in self.events if isinstance(e, kind)), None)


class World:
    """Two hosts, each with a PeerPaths for the other, on a fake clock."""

    def __init__(self, a: Host, b: Host, *, latency: float = 0.020, derp_latency: float = 0.050,
                 latencies: dict[frozenset, float] | None = None, **paths_options) -> None:
        self.a, self.b = a, b
        self.now = 0.0
        self.latency, self.derp_latency = latency, derp_latency
        self.latencies = latencies or {}
        self._queue: list = []
        self._seq = 0
        self.udp_sent: list[tuple[float, str, tuple[str, int]]] = []  # (time, sender, to)
        self.derp_sent: list[tuple[float, str]] = []
        self.dropped = 0
        self.blackholed: set[str] = set()  # hosts whose traffic vanishes (unplugged)
        for me, peer in ((a, b), (b, a)):
            me.paths = PeerPaths(me.key.session(peer.key.public), me.node_key, me.random, **paths_options)
            me.paths.set_own_endpoints(me.own_endpoints())

    def peer_of(self, host: Host) -> Host:
        return self.b if host is self.a else self.a

    def apply(self, host: Host, actions) -> None:
        for action in actions:
            if isinstance(action, (SetWireGuardEndpoint, PathLost, NoDirectPath)):
                host.events.append((self.now, action))
            elif isinstance(action, SendDisco):
                self._send(host, action)
            else:
                raise TypeError(f"unknown action {action!r}")

    def _push(self, when: float, host: Host, packet: bytes, src) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, host.name, packet, src))

    def _send(self, sender: Host, action: SendDisco) -> None:
        peer = self.peer_of(sender)
        if action.to is None:
            self.derp_sent.append((self.now, sender.name))
            self._push(self.now + self.derp_latency, peer, action.packet, None)
            return
        self.udp_sent.append((self.now, sender.name, action.to))
        if sender.name in self.blackholed or peer.name in self.blackholed:
            self.dropped += 1
            return
        dst = action.to
        if ipaddress.ip_address(dst[0]).version == 6:
            if sender.ipv6 is None or peer.ipv6 != dst:
                self.dropped += 1
                return
            self._push(self.now + self._latency(sender.ipv6, dst), peer, action.packet, sender.ipv6)
            return
        src = sender.local if sender.nat is None else sender.nat.outbound(sender.local, dst)
        if src is None:
            self.dropped += 1
            return
        if peer.nat is None:
            arrived = dst == peer.local
        else:
            arrived = dst[0] == peer.nat.public_ip and peer.nat.inbound(dst[1], src) == peer.local
        if not arrived:
            self.dropped += 1
            return
        self._push(self.now + self._latency(src, dst), peer, action.packet, src)

    def _latency(self, src, dst) -> float:
        return self.latencies.get(frozenset((src[0], dst[0])), self.latency)

    def host(self, name: str) -> Host:
        return self.a if name == self.a.name else self.b

    def run_until(self, until: float, *, sending: tuple[Host, ...] = (), send_every: float = 0.5) -> None:
        """Advance the clock to ``until``; the hosts in ``sending`` send data every ``send_every``."""
        next_send = self.now if sending else None
        for _ in range(200_000):
            times = [t for t in (self.a.paths.next_deadline(), self.b.paths.next_deadline()) if t is not None]
            if self._queue:
                times.append(self._queue[0][0])
            if next_send is not None:
                times.append(next_send)
            t = min(times) if times else None
            if t is None or t > until:
                self.now = until
                return
            self.now = max(self.now, t)
            if next_send is not None and self.now >= next_send:
                for host in sending:
                    self.apply(host, host.paths.note_send(self.now))
                next_send = self.now + send_every
            while self._queue and self._queue[0][0] <= self.now:
                _, _, name, packet, src = heapq.heappop(self._queue)
                host = self.host(name)
                self.apply(host, host.paths.receive(packet, src, self.now))
            for host in (self.a, self.b):
                deadline = host.paths.next_deadline()
                if deadline is not None and deadline <= self.now:
                    self.apply(host, host.paths.tick(self.now))
        raise AssertionError("simulation did not settle (a deadline that never advances?)")

    def push_candidates(self) -> None:
        """The coordinator pushes each host's candidates to the other at the same moment."""
        for me in (self.a, self.b):
            peer = self.peer_of(me)
            self.apply(me, me.paths.set_candidates(peer.candidates(), self.now))


def pair(kind_a: str, kind_b: str, **world) -> World:
    a = Host("a", "192.168.1.2", make_nat(kind_a, "198.51.100.1") if kind_a != "open" else None)
    b = Host("b", "10.0.0.2", make_nat(kind_b, "203.0.113.1") if kind_b != "open" else None)
    if kind_a == "open":
        a.local = ("198.51.100.1", WG_PORT)
    if kind_b == "open":
        b.local = ("203.0.113.1", WG_PORT)
    return World(a, b, **world)
