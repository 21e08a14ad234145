"""The NAT mapping-lifetime observer (pywg.mesh.nat_observer): its wire format, its bounds
(sans-I/O, on a fake clock), a fuzzed parser, and the real UDP server with keys from a real
SQLite store (the node's key derives from its stored token digest)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.manage.key import Key
from pywg.mesh import nat_observer as obs
from pywg.mesh.cli import CliError, _nat_observer
from pywg.mesh.sqlite_store import SqliteStore
from pywg.mesh.store import NodeRequest

NODE = "0123456789abcdef"
TOKEN = "pywg-node-" + "A" * 43
KEY = obs.key_from_token(TOKEN)
WALL = 1_800_000_000.0
SRC = ("198.51.100.7", 40000)


def request(idle: int = 5, nonce: bytes = b"n" * 16, key: bytes = KEY, sent_at: float = WALL,
            node: str = NODE) -> obs.Request:
    parsed = obs.parse_request(obs.encode_request(key, node, idle, nonce, int(sent_at)))
    return parsed


def test_a_request_gets_one_reply_after_its_idle_time_no_larger_and_to_its_source() -> None:
    core = obs.ObserverCore()
    data = obs.encode_request(KEY, NODE, 5, b"x" * 16, int(WALL))
    assert len(data) == obs.REQUEST_LENGTH
    req = core.check(data)
    assert req is not None and req.node_id == NODE and req.idle == 5
    assert core.admit(req, KEY, SRC, now=100.0, wall=WALL)
    assert core.next_deadline() == 105.0
    assert core.due(104.9) == []
    [(reply, to)] = core.due(105.0)
    assert to == SRC and len(reply) < len(data)
    assert obs.parse_reply(KEY, reply) == (b"x" * 16, 5)
    assert obs.parse_reply(obs.key_from_token(TOKEN + "x"), reply) is None  # forged replies are not taken
    assert core.due(1000.0) == [] and len(core) == 0  # once only


def test_the_key_derives_from_the_stored_digest() -> None:
    from pywg.mesh import credentials

    assert obs.observer_key(credentials.digest(TOKEN)) == KEY


def test_unauthentic_unknown_stale_and_replayed_requests_are_dropped_and_counted() -> None:
    core = obs.ObserverCore()
    assert not core.admit(request(key=obs.key_from_token("other")), KEY, SRC, 0.0, WALL)
    assert not core.admit(request(), None, SRC, 0.0, WALL)
    assert not core.admit(request(sent_at=WALL - 500), KEY, SRC, 0.0, WALL)
    assert core.admit(request(), KEY, SRC, 0.0, WALL)
    assert not core.admit(request(), KEY, SRC, 1.0, WALL + 1)  # the same nonce again
    assert core.check(b"\x00" * 10) is None
    assert core.check(b"x" * obs.REQUEST_LENGTH) is None
    assert dict(core.drops) == {"unauthentic": 1, "unknown-node": 1, "stale": 1, "replayed": 1, "malformed": 2}
    assert len(core) == 1  # and the good one is still served
    assert len(core.due(10.0)) == 1


def test_the_pending_table_has_a_hard_cap_and_a_per_node_cap() -> None:
    core = obs.ObserverCore(max_pending=5, max_per_node=3)
    nonces = iter(i.to_bytes(16, "big") for i in range(100))
    admitted = [core.admit(request(nonce=next(nonces)), KEY, SRC, 0.0, WALL) for _ in range(4)]
    assert admitted == [True, True, True, False]
    assert core.drops["node-pending-full"] == 1
    other = "fedcba9876543210"
    admitted = [core.admit(request(nonce=next(nonces), node=other), KEY, SRC, 0.0, WALL) for _ in range(3)]
    assert admitted == [True, True, False] and core.drops["pending-full"] == 1
    assert len(core) == 5
    core.due(10.0)
    assert core.admit(request(nonce=next(nonces)), KEY, SRC, 10.0, WALL)  # room again


def test_idle_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="idle"):
        obs.encode_request(KEY, NODE, 0, b"n" * 16, 0)
    data = bytearray(obs.encode_request(KEY, NODE, 5, b"n" * 16, 0))
    data[20:22] = (301).to_bytes(2, "big")
    with pytest.raises(obs.BadRequest, match="idle"):
        obs.parse_request(bytes(data))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_any_datagram_is_parsed_or_dropped_never_raises(data: bytes) -> None:
    core = obs.ObserverCore()
    req = core.check(data)
    if req is None:
        assert core.drops["malformed"] == 1
    else:
        assert not core.admit(req, KEY, SRC, 0.0, WALL)  # random bytes are never authentic
    assert obs.parse_reply(KEY, data) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.binary(min_size=16, max_size=16), st.integers(0, 2**32 - 1))
def test_fuzz_requests_round_trip(idle: int, nonce: bytes, sent_at: int) -> None:
    req = obs.parse_request(obs.encode_request(KEY, NODE, idle, nonce, sent_at))
    assert (req.node_id, req.idle, req.nonce, req.sent_at) == (NODE, idle, nonce, sent_at)
    assert req.authentic(KEY) and not req.authentic(obs.key_from_token("x"))


def test_the_cli_takes_only_an_address_agents_can_send_to() -> None:
    assert _nat_observer("203.0.113.3:3479") == "203.0.113.3:3479"
    for bad in ("0.0.0.0:3479", "nohost", "203.0.113.3:0"):
        with pytest.raises(CliError, match="--nat-observer"):
            _nat_observer(bad)


def test_the_udp_server_answers_a_registered_node_and_keeps_serving_through_garbage(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "c.db"))
    try:
        _, authkey = store.create_auth_key(reusable=True, expires_at=None, now=0.0)
        reg = store.register(NodeRequest(name="n1", public_key=Key.generate_private().public_key()), authkey,
                             now=0.0)
        key = obs.key_from_token(reg.token)

        async def lookup(node_id: str) -> bytes | None:
            digest = await asyncio.to_thread(store.token_digest, node_id)
            return None if digest is None else obs.observer_key(digest)

        async def main() -> tuple[float, bytes, dict[str, int]]:
            observer = await obs.NatObserver.serve("127.0.0.1", 0, lookup)
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            try:
                for junk in (b"", b"garbage", b"pywgNOq1" + b"\x00" * 46,
                             obs.encode_request(obs.key_from_token("forged"), reg.node.id, 1, b"f" * 16,
                                                int(time.time()))):
                    sock.sendto(junk, observer.address)
                sent = time.monotonic()
                sock.sendto(obs.encode_request(key, reg.node.id, 1, b"g" * 16, int(time.time())), observer.address)
                reply = await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
                took = time.monotonic() - sent
                with pytest.raises(TimeoutError):  # nothing more: one reply, none for the junk
                    await asyncio.wait_for(loop.sock_recv(sock, 100), 1.5)
                return took, reply, dict(observer.core.drops)
            finally:
                sock.close()
                await observer.close()

        took, reply, drops = asyncio.run(main())
        assert 1.0 <= took < 2.0
        assert obs.parse_reply(key, reply) == (b"g" * 16, 1)
        assert drops == {"malformed": 3, "unauthentic": 1}
    finally:
        store.close()
