"""Helpers shared by the pywg benchmarks (run with ``pytest bench --benchmark-only``).

Every benchmark times rounds of ``ops`` operations (``benchmark.pedantic``) and records
in ``extra_info``: ``ops_per_round``, ``bytes_per_op`` (0 when throughput is meaningless),
``floor`` (the name of the benchmark it is compared with, on pywg rows) and, after the
run, ``ops_per_s`` and ``MB_per_s``. bench/report.py reads these back from the JSON.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pywg.protocol.actions import HandshakeCompleted, SendDatagram
from pywg.protocol.crypto import dh_generate
from pywg.protocol.dispatcher import Dispatcher

ENDPOINT_A = ("192.0.2.1", 51820)
ENDPOINT_B = ("192.0.2.2", 51821)
WALL = 1_700_000_000.0
PACKET_SIZE = 1420  # WireGuard's default MTU: the largest inner packet, sealed unpadded
MTU = 1420
# The engine sends at most one initiation per REKEY_TIMEOUT (5 s) and the responder
# accepts at most one per 20 ms from a peer: step the clock past both every handshake.
HANDSHAKE_STEP = 5.1


def ipv4_packet(total: int = PACKET_SIZE) -> bytes:
    """A valid IPv4 packet of ``total`` bytes (protocol 253, experimental)."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 253, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    payload = bytes(range(256)) * (total // 256 + 1)
    return header + payload[: total - len(header)]


@dataclass
class Pair:
    """Initiator A (knows B's endpoint) and responder B, joined by hand, with a clock."""

    a: Dispatcher
    b: Dispatcher
    now: float = 0.0

    @classmethod
    def create(cls) -> Pair:
        a = Dispatcher(dh_generate(), wall_offset=WALL, mtu=MTU)
        b = Dispatcher(dh_generate(), wall_offset=WALL, mtu=MTU)
        a.add_peer(b.static_public, endpoint=ENDPOINT_B)
        b.add_peer(a.static_public)
        return cls(a, b)

    def handshake(self) -> list:
        """One fresh handshake at a later time: initiation -> B, response -> A.

        Returns A's actions after the response (HandshakeCompleted, then A's keepalive).
        """
        self.now += HANDSHAKE_STEP
        now = self.now
        (initiation,) = self.a.initiate_handshake(self.b.static_public, now)
        (response,) = self.b.datagram_received(initiation.data, ENDPOINT_A, now)
        return self.a.datagram_received(response.data, ENDPOINT_B, now)

    def establish(self) -> None:
        """A handshake, then A's keepalive to B, so both sides hold a current keypair."""
        actions = self.handshake()
        assert isinstance(actions[0], HandshakeCompleted), actions
        keepalive = actions[1]
        assert isinstance(keepalive, SendDatagram)
        confirmed = self.b.datagram_received(keepalive.data, ENDPOINT_A, self.now)
        assert isinstance(confirmed[0], HandshakeCompleted), confirmed


def run(benchmark, target, *, ops: int, rounds: int, bytes_per_op: int = 0, floor: str | None = None,
        setup=None, warmup_rounds: int = 2) -> None:
    """Time ``rounds`` calls of ``target`` (each doing ``ops`` operations); record rates."""
    benchmark.extra_info["ops_per_round"] = ops
    benchmark.extra_info["bytes_per_op"] = bytes_per_op
    if floor is not None:
        benchmark.extra_info["floor"] = floor
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1,
                       warmup_rounds=warmup_rounds)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    per_op = stats.stats.median / ops
    benchmark.extra_info["ops_per_s"] = round(1 / per_op, 1)
    if bytes_per_op:
        benchmark.extra_info["MB_per_s"] = round(bytes_per_op / per_op / 1e6, 2)
