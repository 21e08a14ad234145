"""pywg's DERP relay server (``pywg.device.derp_server``) with pywg's relay clients on
loopback: packets relayed with their source key, ping, PeerGone on disconnect and for
unknown disco destinations, a duplicate key replacing the older connection, the allowlist,
the HTTP endpoints, hostile bytes before and after the upgrade, a slow reader flooded
while others keep talking, and the STUN responder."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from pywg.derp import Connected, NodePrivateKey, build_upgrade_request
from pywg.derp.client import DerpClient
from pywg.derp.frames import PeerGone, PeerGoneReason, SendPacket, ServerKey
from pywg.device.derp_client import DerpRelayClient
from pywg.device.derp_server import ConfigError, DerpRelayServer, load_allowlist, load_or_create_key
from pywg.nat.stun_client import BindingResult, StunClient

DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"
T = TypeVar("T")


def run(coro_fn: Callable[[DerpRelayServer], Awaitable[None]], **kwargs: object) -> DerpRelayServer:
    async def main() -> DerpRelayServer:
        server = DerpRelayServer(NodePrivateKey.generate(), "127.0.0.1", 0, stun_port=0,
                                 **kwargs)  # type: ignore[arg-type]
        await server.start()
        try:
            async with asyncio.timeout(60):
                await coro_fn(server)
        finally:
            await server.close()
        return server
    return asyncio.run(main())


def client(server: DerpRelayServer, key: NodePrivateKey, **kwargs: object) -> DerpRelayClient:
    return DerpRelayClient(key, "127.0.0.1", server.port, expected_server_key=server.public_key,
                           **kwargs)  # type: ignore[arg-type]


async def next_event_of(c: DerpRelayClient, kind: type[T], timeout: float = 5.0) -> T:
    async with asyncio.timeout(timeout):
        while True:
            event = await c.next_event()
            if isinstance(event, kind):
                return event


async def raw_derp(server: DerpRelayServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(build_upgrade_request("127.0.0.1"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert f"Derp-Public-Key: {server.public_key.untyped_hex()}".encode() in head
    await reader.readexactly(5 + 8 + 32)  # ServerKey
    return reader, writer


async def raw_client(server: DerpRelayServer, key: NodePrivateKey
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A DERP connection driven by hand: the ClientInfo of ``key`` sent, nothing read after ServerKey."""
    reader, writer = await raw_derp(server)
    raw = DerpClient(key)
    raw.receive_data(ServerKey(server.public_key).pack(), 0)
    writer.write(raw.data_to_send())
    await writer.drain()
    return reader, writer


async def http_get(server: DerpRelayServer, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def test_two_clients_relay_packets_ping_peer_gone() -> None:
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()
    stranger = NodePrivateKey.generate().public

    async def body(server: DerpRelayServer) -> None:
        async with client(server, key_a) as a, client(server, key_b) as b:
            await a.wait_connected(10)
            await b.wait_connected(10)
            connected = await next_event_of(a, Connected)
            assert connected.server_key == server.public_key and connected.info.version == 2
            payloads = [b"x", b"hello over derp", os.urandom(1400), os.urandom(65536)]
            for payload in payloads:
                assert await a.send(key_b.public, payload)
            for payload in payloads:
                src, got = await asyncio.wait_for(b.recv(), 5)
                assert src == key_a.public and got == payload
            for i in range(20):
                assert await b.send(key_a.public, f"reply {i}".encode())
            for i in range(20):
                assert await asyncio.wait_for(a.recv(), 5) == (key_b.public, f"reply {i}".encode())
            assert 0 < await a.ping(timeout=3) < 1
            # Unknown destination: dropped and counted; a disco packet earns PeerGone(NotHere).
            assert await a.send(stranger, b"wireguard bytes to nobody")
            assert await a.send(stranger, DISCO_MAGIC + bytes(32 + 24 + 16))
            gone = await next_event_of(a, PeerGone)
            assert gone.peer == stranger and gone.reason == PeerGoneReason.NOT_HERE
            assert server.state.stats.dropped["unknown_destination"] == 2
            # B leaves: A, which sent to B, hears PeerGone(Disconnected).
            await b.close()
            gone = await next_event_of(a, PeerGone)
            assert gone.peer == key_b.public and gone.reason == PeerGoneReason.DISCONNECTED
            assert not server.state.is_connected(key_b.public)
        assert server.state.stats.packets_forwarded == 24

    run(body)


def test_a_newer_connection_with_the_same_key_replaces_the_old() -> None:
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()

    async def body(server: DerpRelayServer) -> None:
        async with client(server, key_a) as a:
            await a.wait_connected(10)
            # A hand-driven connection for B, then the real B with the same key.
            old_reader, old_writer = await raw_client(server, key_b)
            await asyncio.sleep(0.2)
            assert server.state.is_connected(key_b.public)
            async with client(server, key_b) as b:
                await b.wait_connected(10)
                # The old connection is closed by the server; packets go to the new one.
                while await asyncio.wait_for(old_reader.read(65536), 5):
                    pass  # ServerInfo, then EOF: the server closed it
                assert await a.send(key_b.public, b"to the newest B")
                assert await asyncio.wait_for(b.recv(), 5) == (key_a.public, b"to the newest B")
                assert server.state.stats.closed["replaced"] == 1
                assert server.state.client_count == 2
            old_writer.close()

    run(body)


def test_verify_clients_refuses_keys_not_on_the_list(tmp_path: Path) -> None:
    allowed, refused = NodePrivateKey.generate(), NodePrivateKey.generate()
    listing = tmp_path / "allow.txt"
    listing.write_text(f"# the nodes\n{allowed.public}\n\n")
    allow = load_allowlist(listing)

    async def body(server: DerpRelayServer) -> None:
        async with client(server, allowed) as a, client(server, refused, backoff_max=0.5) as r:
            await a.wait_connected(10)
            await asyncio.sleep(1.0)
            assert not r.connected and r.stats.connect_failures >= 1
            assert server.state.stats.closed["not_allowed"] >= 1
            assert server.state.is_connected(allowed.public)
            assert not server.state.is_connected(refused.public)

    run(body, allow=allow)
    bad = tmp_path / "bad.txt"
    bad.write_text("nodekey:1234\n")
    with pytest.raises(ConfigError, match="--verify-clients.*line 1"):
        load_allowlist(bad)


def test_http_endpoints_and_garbage_before_the_upgrade() -> None:
    async def body(server: DerpRelayServer) -> None:
        probe = await http_get(server, b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
        assert probe.startswith(b"HTTP/1.1 200 ")
        g204 = await http_get(server, b"GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: abc123\r\n\r\n")
        assert g204.startswith(b"HTTP/1.1 204 ") and b"X-Tailscale-Response: response abc123" in g204
        plain = await http_get(server, b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n")
        assert plain.startswith(b"HTTP/1.1 426 ")
        assert (await http_get(server, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        garbage = await http_get(server, os.urandom(300).replace(b"\r\n\r\n", b"") + b"\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")
        huge = await http_get(server, b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 431 ")
        assert server.http.rejected["not_http"] == 1 and server.http.rejected["head_too_large"] == 1
        # The relay still serves a DERP client afterwards.
        key = NodePrivateKey.generate()
        async with client(server, key) as c:
            await c.wait_connected(10)

    run(body)


@pytest.mark.parametrize("hostile", [
    pytest.param(b"\x04\x00\x00\x00\x03abc", id="frame-before-client-info"),
    pytest.param(b"\x02\x00\x00\x00\x10" + bytes(16), id="truncated-client-info"),
    pytest.param(b"\x02\x00\x00\x00\x60" + os.urandom(0x60), id="client-info-box-does-not-open"),
    pytest.param(b"\x02\x00\x10\x00\x00", id="client-info-over-256k"),
    pytest.param(b"\x02\x00\x00\x00\x40" + bytes(20), id="stream-ends-inside-a-frame"),
])
def test_hostile_bytes_after_the_upgrade_close_only_that_client(hostile: bytes) -> None:
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()

    async def body(server: DerpRelayServer) -> None:
        async with client(server, key_a) as a, client(server, key_b) as b:
            await a.wait_connected(10)
            await b.wait_connected(10)
            reader, writer = await raw_derp(server)
            writer.write(hostile)
            if hostile.startswith(b"\x02\x00\x00\x00\x40"):
                writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
            assert await a.send(key_b.public, b"still relaying")
            assert await asyncio.wait_for(b.recv(), 5) == (key_a.public, b"still relaying")
            assert server.state.client_count == 2

    server = run(body)
    assert sum(server.state.stats.closed.values()) >= (0 if hostile.startswith(b"\x02\x00\x00\x00\x40") else 1)


def test_oversized_and_unknown_frames_from_a_connected_client() -> None:
    key_a, key_b, key_c = (NodePrivateKey.generate() for _ in range(3))

    async def body(server: DerpRelayServer) -> None:
        async with client(server, key_a) as a, client(server, key_b) as b:
            await a.wait_connected(10)
            await b.wait_connected(10)
            reader, writer = await raw_client(server, key_c)
            writer.write(b"\x7f\x00\x00\x00\x02hi")  # an unknown type: skipped, as derper does
            writer.write(SendPacket(key_b.public, b"ok").pack())
            assert await asyncio.wait_for(b.recv(), 5) == (key_c.public, b"ok")
            # A SendPacket of 64 KiB + 1 packet bytes: over the limit, the client is closed.
            writer.write(b"\x04" + struct.pack(">I", 32 + 65537) + key_b.public.raw + bytes(65537))
            while await asyncio.wait_for(reader.read(65536), 5):
                pass
            writer.close()
            assert server.state.stats.closed["frame"] == 1
            assert not server.state.is_connected(key_c.public)
            assert await a.send(key_b.public, b"after")
            assert await asyncio.wait_for(b.recv(), 5) == (key_a.public, b"after")

    run(body)


def test_a_flood_to_a_slow_reader_drops_and_counts_while_others_keep_talking() -> None:
    key_flood, key_slow, key_c, key_d = (NodePrivateKey.generate() for _ in range(4))

    async def body(server: DerpRelayServer) -> None:
        # The slow reader handshakes by hand and then never reads.
        _, slow_writer = await raw_client(server, key_slow)
        slow_writer.transport.pause_reading()  # type: ignore[attr-defined]
        async with client(server, key_flood) as f, client(server, key_c) as c, client(server, key_d) as d:
            for x in (f, c, d):
                await x.wait_connected(10)
            payload = os.urandom(1200)
            for i in range(20000):
                await f.send(key_slow.public, payload)
                if i % 2000 == 0:
                    assert await c.send(key_d.public, b"ping %d" % i)
                    assert await asyncio.wait_for(d.recv(), 5) == (key_c.public, b"ping %d" % i)
            await asyncio.sleep(0.5)
            assert server.state.stats.dropped["queue_full"] > 0
            assert await c.send(key_d.public, b"last")
            assert await asyncio.wait_for(d.recv(), 5) == (key_c.public, b"last")
        slow_writer.close()

    run(body)


def test_stun_responder_answers_binding_and_ignores_garbage() -> None:
    async def body(server: DerpRelayServer) -> None:
        assert server.stun_port
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3)
        stun = StunClient(os.urandom)
        loop = asyncio.get_running_loop()
        with sock:
            sock.sendto(b"garbage that is not stun", ("127.0.0.1", server.stun_port))
            sock.sendto(bytes(20), ("127.0.0.1", server.stun_port))  # a header, not a Binding request
            transmit = stun.start(("127.0.0.1", server.stun_port), loop.time())
            sock.sendto(transmit.datagram, ("127.0.0.1", server.stun_port))
            reply, source = await loop.run_in_executor(None, sock.recvfrom, 2048)
            outcome = stun.receive(reply, source, loop.time())
            assert isinstance(outcome, BindingResult), outcome
            assert outcome.reflexive.as_tuple() == sock.getsockname()
        assert server.stun.answered == 1 and sum(server.stun.drops.values()) == 2

    run(body)


def test_server_key_file_is_private_and_derper_shaped(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "derper.json"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"PrivateKey": key.private_text()}
    assert load_or_create_key(path).public == key.public
    path.write_text('{"PrivateKey": "nope"}')
    with pytest.raises(ConfigError, match="--config"):
        load_or_create_key(path)



@pytest.mark.parametrize(("args", "option"), [
    (["--listen", "127.0.0.1"], "--listen"),
    (["--listen", "127.0.0.1:99999"], "--listen"),
    (["--listen", "127.0.0.1:0", "--stun-port", "70000"], "--stun-port"),
    (["--listen", "127.0.0.1:0", "--tls-cert", "/nonexistent.crt"], "--tls-key"),
    (["--listen", "127.0.0.1:0", "--verify-clients", "/nonexistent-allowlist"], "--verify-clients"),
])
def test_cli_errors_name_the_option_and_create_nothing(tmp_path: Path, args: list[str], option: str) -> None:
    import subprocess
    import sys

    config = tmp_path / "keys" / "derp.json"
    done = subprocess.run([str(Path(sys.executable).with_name("pywg")), "derp", "serve", *args, "--config",
                           str(config)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and done.stderr.startswith(f"pywg: {option}:"), done.stderr
    assert "Traceback" not in done.stderr and not config.exists()
