"""Two engines joined in memory, for tests that need time or scale (not instead of interop)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pywg.protocol.actions import Action, DeliverPacket, Drop, HandshakeCompleted, SendDatagram
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.protocol.dispatcher import Dispatcher

ENDPOINT_A = ("192.0.2.1", 51820)
ENDPOINT_B = ("192.0.2.2", 51821)
WALL = 1_700_000_000.0


def ipv4_packet(payload: bytes = b"ping", src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bytes:
    """A minimal valid IPv4 packet (protocol 253, experimental) carrying ``payload``."""
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 253, 0,
        bytes(int(x) for x in src.split(".")), bytes(int(x) for x in dst.split(".")),
    )
    return header + payload


@dataclass
class Pair:
    """Initiator-side A and responder-side B; datagrams are carried by ``pump``."""

    psk: bytes | None = None
    a: Dispatcher = field(init=False)
    b: Dispatcher = field(init=False)
    delivered: dict[str, list[bytes]] = field(default_factory=lambda: {"a": [], "b": []})
    completed: dict[str, list[bool]] = field(default_factory=lambda: {"a": [], "b": []})
    wire: list[tuple[str, bytes]] = field(default_factory=list)  # every datagram carried

    def __post_init__(self) -> None:
        ka, kb = dh_generate(), dh_generate()
        self.a = Dispatcher(ka, wall_offset=WALL)
        self.b = Dispatcher(kb, wall_offset=WALL)
        self.peer_a = self.a.add_peer(self.b.static_public, preshared_key=self.psk, endpoint=ENDPOINT_B)
        self.peer_b = self.b.add_peer(self.a.static_public, preshared_key=self.psk)
        self.pub_a, self.pub_b = dh_pubkey(ka), dh_pubkey(kb)

    def side(self, name: str) -> Dispatcher:
        return self.a if name == "a" else self.b

    def pump(self, actions: list[Action], origin: str, now: float, *, lose: bool = False) -> list[Action]:
        """Carry every SendDatagram to the other side until quiet; return the other actions."""
        queue = [(origin, a) for a in actions]
        rest: list[Action] = []
        while queue:
            who, action = queue.pop(0)
            if isinstance(action, SendDatagram):
                if lose:
                    continue
                dest = "b" if who == "a" else "a"
                self.wire.append((who, action.data))
                source = ENDPOINT_A if who == "a" else ENDPOINT_B
                queue += [(dest, x) for x in self.side(dest).datagram_received(action.data, source, now)]
            else:
                if isinstance(action, DeliverPacket):
                    self.delivered[who].append(action.packet)
                elif isinstance(action, HandshakeCompleted):
                    self.completed[who].append(action.initiator)
                rest.append(action)
        return rest

    def send(self, origin: str, packet: bytes, now: float) -> list[Action]:
        peer = self.pub_b if origin == "a" else self.pub_a
        return self.pump(self.side(origin).send_packet(peer, packet, now), origin, now)

    def tick(self, now: float) -> list[Action]:
        return self.pump(self.a.tick(now), "a", now) + self.pump(self.b.tick(now), "b", now)

    def establish(self, now: float = 0.0) -> None:
        self.send("a", ipv4_packet(b"hello"), now)
        assert self.completed == {"a": [True], "b": [False]}


def drops_of(actions: list[Action]) -> list[Drop]:
    return [a for a in actions if isinstance(a, Drop)]
