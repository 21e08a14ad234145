"""Every Bind behaves the same (pywg.device.bind): the real UDP bind on the loopback, the
UDP bind over the in-memory network the device tests use, and the relay bind. One suite,
run against each: what is sent arrives whole, from the sender's address, a run as its
messages in order; what cannot be sent is counted by reason, never raised; nothing goes
out after close; each bind takes only its own kind of endpoint."""

from __future__ import annotations

import os
import select
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pywg.device.bind import Bind, RelayBind, UdpBind, messages, unmapped
from pywg.protocol.actions import DropReason, Endpoint
from pywg.protocol.endpoint import RelayEndpoint
from pywg.testing.memory import MemoryNetwork

REGION = 7


class LoopRelay:
    """Two nodes of one DERP region in memory: a send to a node key lands in that node's
    inbox, from the sender's key (what a relay server does); ``full`` refuses sends."""

    def __init__(self) -> None:
        self.inboxes: dict[bytes, list[tuple[bytes, RelayEndpoint]]] = {}
        self.full = False

    def node(self, key: bytes) -> LoopRelayNode:
        self.inboxes[key] = []
        return LoopRelayNode(self, key)


@dataclass
class LoopRelayNode:
    relay: LoopRelay
    key: bytes

    def send(self, region: int, node_key: bytes, data: bytes) -> bool:
        inbox = self.relay.inboxes.get(node_key)
        if self.relay.full or region != REGION or inbox is None:
            return False
        inbox.append((bytes(data), RelayEndpoint(REGION, self.key)))
        return True


@dataclass
class Case:
    """A sender bind, where it sends to, what arrived there, and the sender's address as
    the receiver sees it."""

    sender: Bind
    destination: Endpoint
    other_kind: Endpoint  # an endpoint of the kind this bind does not take
    source: Endpoint
    received: Callable[[int], list[tuple[bytes, Endpoint]]]
    refuse: Callable[[bool], tuple[DropReason, Endpoint]]  # (True: from now on refuse; False: stop)
    drops: Counter[DropReason] = field(default_factory=Counter)
    closers: list[Callable[[], None]] = field(default_factory=list)


def _udp_receiver(bind: UdpBind, sock: socket.socket) -> Callable[[int], list[tuple[bytes, Endpoint]]]:
    def received(count: int) -> list[tuple[bytes, Endpoint]]:
        got: list[tuple[bytes, Endpoint]] = []
        deadline = time.monotonic() + 2.0
        while len(got) < count and time.monotonic() < deadline:
            select.select([sock], [], [], 0.05)
            got += [(r.data, r.source) for r in bind.receive(sock, 64)]
        time.sleep(0.02)  # and nothing more
        got += [(r.data, r.source) for r in bind.receive(sock, 64)]
        return got
    return received


def udp_case() -> Case:
    sender, receiver = UdpBind.open(0), UdpBind.open(0)
    assert receiver.v4 is not None
    case = Case(sender, ("127.0.0.1", receiver.port), RelayEndpoint(REGION, bytes(32)),
                ("127.0.0.1", sender.port), _udp_receiver(receiver, receiver.v4),
                lambda _: (DropReason.UDP_SEND_ERROR, ("0.0.0.0", 0)))  # the kernel: EINVAL, port 0
    case.closers += [sender.close, receiver.close]
    return case


def memory_case() -> Case:
    network = MemoryNetwork()
    sender = network.host("192.0.2.1", "2001:db8::1").open_bind(0)
    receiver = network.host("192.0.2.2", "2001:db8::2").open_bind(0)
    assert receiver.v4 is not None
    def refuse(on: bool) -> tuple[DropReason, Endpoint]:
        (network.unreachable.add if on else network.unreachable.discard)("198.51.100.1")
        return DropReason.UDP_SEND_ERROR, ("198.51.100.1", 9)  # ENETUNREACH: no route

    case = Case(sender, ("192.0.2.2", receiver.port), RelayEndpoint(REGION, bytes(32)),
                ("192.0.2.1", sender.port), _udp_receiver(receiver, receiver.v4), refuse)
    case.closers += [sender.close, receiver.close]
    return case


def relay_case() -> Case:
    relay = LoopRelay()
    me, peer = b"\x01" * 32, b"\x02" * 32
    sender = RelayBind(relay.node(me))
    relay.node(peer)

    def received(count: int) -> list[tuple[bytes, Endpoint]]:
        inbox = relay.inboxes[peer]
        got, inbox[:] = list(inbox), []
        return [(data, source) for data, source in got]

    def refuse(on: bool) -> tuple[DropReason, Endpoint]:
        relay.full = on  # the relay's queue is full
        return DropReason.RELAY_SEND_DROPPED, RelayEndpoint(REGION, peer)

    case = Case(sender, RelayEndpoint(REGION, peer), ("192.0.2.9", 51820), RelayEndpoint(REGION, me), received,
                refuse)
    case.closers.append(sender.close)
    return case


KINDS = {"udp": udp_case, "memory": memory_case, "relay": relay_case}


@pytest.fixture(params=sorted(KINDS))
def case(request: pytest.FixtureRequest) -> Case:
    made = KINDS[request.param]()
    made.sender.on_drop = lambda reason, n: made.drops.update({reason: n})  # type: ignore[method-assign]
    yield made  # type: ignore[misc]
    for close in made.closers:
        close()


def test_a_datagram_arrives_whole_from_the_senders_address(case: Case) -> None:
    datagram = os.urandom(148)
    assert case.sender.send(datagram, case.destination) == 1
    assert case.received(1) == [(datagram, case.source)]
    assert not case.drops


def test_a_run_arrives_as_its_messages_in_order(case: Case) -> None:
    run = b"".join(bytes([i]) * 100 for i in range(4)) + b"\x09" * 37  # four of 100, one of 37
    sends = case.sender.send(run, case.destination, stride=100)
    got = case.received(5)
    assert [data for data, _ in got] == [run[i:i + 100] for i in range(0, len(run), 100)]
    assert {source for _, source in got} == {case.source}
    assert sends == 5 and not case.drops  # one by one: this bind has no GSO on


def test_each_bind_takes_only_its_own_kind_of_endpoint(case: Case) -> None:
    assert case.sender.accepts(case.destination) and not case.sender.accepts(case.other_kind)
    assert case.sender.send(b"x" * 60, case.other_kind, stride=20) == 0
    assert case.received(0) == []
    assert sum(case.drops.values()) == 3  # every message of the run counted, none raised


def test_nothing_goes_out_after_close_and_it_is_counted(case: Case) -> None:
    case.sender.close()
    assert case.sender.send(b"late", case.destination) == 0
    assert case.received(0) == []
    reason = DropReason.RELAY_MISSING if isinstance(case.destination, RelayEndpoint) else DropReason.NO_SOCKET_FOR_ENDPOINT
    assert case.drops == Counter({reason: 1})
    case.sender.close()  # twice: harmless


def test_a_refused_send_is_counted_and_the_bind_keeps_sending(case: Case) -> None:
    expected, refused = case.refuse(True)
    assert case.sender.send(b"refused", refused) == 1  # tried: one system send
    assert case.drops == Counter({expected: 1})
    case.refuse(False)
    assert case.sender.send(b"after", case.destination) == 1
    assert case.received(1) == [(b"after", case.source)]


# --- the UDP bind's own ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["udp", "memory"])
def test_an_ipv4_mapped_endpoint_goes_over_ipv4(kind: str) -> None:
    case = KINDS[kind]()
    try:
        assert isinstance(case.destination, tuple)
        mapped = (f"::ffff:{case.destination[0]}", case.destination[1])
        assert unmapped(mapped) == case.destination
        assert case.sender.send(b"mapped", mapped) == 1
        assert case.received(1) == [(b"mapped", case.source)]
    finally:
        for close in case.closers:
            close()


@pytest.mark.parametrize("kind", ["udp", "memory"])
def test_ipv6_reaches_the_same_port(kind: str) -> None:
    case = KINDS[kind]()
    try:
        sender = case.sender
        assert isinstance(sender, UdpBind) and sender.v4 is not None and sender.v6 is not None
        assert sender.v4.getsockname()[1] == sender.v6.getsockname()[1] == sender.port
        host6 = "::1" if kind == "udp" else "2001:db8::2"
        receiver_port = case.destination[1]  # type: ignore[index]
        assert sender.send(b"six", (host6, receiver_port)) == 1
        assert not case.drops
    finally:
        for close in case.closers:
            close()


def test_udp_gso_sends_a_run_in_one_call_and_it_arrives_as_datagrams() -> None:
    case = udp_case()
    try:
        sender = case.sender
        assert isinstance(sender, UdpBind)
        if not sender.gso_supported():
            pytest.fail("this kernel refuses UDP_SEGMENT on a UDP socket (Linux >= 4.18 has it)")
        sender.gso = True
        run = b"".join(bytes([i]) * 200 for i in range(10)) + b"\x77" * 11
        assert sender.send(run, case.destination, stride=200) == 1  # one sendmsg
        got = case.received(11)
        assert [data for data, _ in got] == [run[i:i + 200] for i in range(0, len(run), 200)]
        assert sender.gso  # not refused
    finally:
        for close in case.closers:
            close()


def test_udp_gro_receives_a_run_as_one_batch_with_its_segment_size() -> None:
    sender, receiver = UdpBind.open(0), UdpBind.open(0)
    try:
        sender.gso = True
        receiver.enable_gro()
        assert receiver.v4 is not None
        run = b"\x05" * 300 + b"\x06" * 300 + b"\x07" * 120
        sender.send(run, ("127.0.0.1", receiver.port), stride=300)
        select.select([receiver.v4], [], [], 2.0)
        got = receiver.receive(receiver.v4, 64)
        assert b"".join(r.data for r in got) == run
        assert all(r.segment == 300 or len(r.data) == r.segment for r in got)
        assert any(len(r.data) > r.segment for r in got)  # coalesced: loopback keeps the GSO batch
    finally:
        sender.close()
        receiver.close()


def test_the_memory_bind_marks_its_sockets() -> None:
    bind = MemoryNetwork().host("192.0.2.1").open_bind(0, fwmark=51)
    try:
        assert [s.fwmark for s in bind.sockets] == [51]  # type: ignore[attr-defined]
        bind.set_fwmark(52)
        assert [s.fwmark for s in bind.sockets] == [52]  # type: ignore[attr-defined]
    finally:
        bind.close()


def test_messages_counts_a_run() -> None:
    assert [messages(b"x" * n, 100) for n in (1, 100, 101, 200, 201)] == [1, 1, 2, 2, 3]
    assert messages(b"x" * 500, 0) == 1
