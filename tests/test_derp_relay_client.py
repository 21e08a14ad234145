"""The asyncio DERP client's failure handling: timeouts, refusals, bad frames, Restarting,
queue limits. Each case needs a server misbehaving on purpose, which derper will not do, so
the server here is a small scripted one on loopback built from the frame codec (the
well-behaved paths run against derper in test_derp_derper.py)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Self

import pytest

from pywg.derp import Connected, NodePrivateKey
from pywg.derp import frames as f
from pywg.device.derp_client import DerpRelayClient

SERVER = NodePrivateKey.generate()
PEER = NodePrivateKey.generate().public
DERPER_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
              b"Derp-Version: 2\r\nDerp-Public-Key: " + SERVER.public.untyped_hex().encode() + b"\r\n\r\n")

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, object]:
    """Answer the upgrade and the handshake as derper does; return the client's JSON."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(DERPER_101 + f.ServerKey(SERVER.public).pack())
    header = await reader.readexactly(5)
    info = f.ClientInfo.parse(await reader.readexactly(int.from_bytes(header[1:], "big")))
    body = json.loads(SERVER.open_from(info.key, info.sealed) or b"null")
    writer.write(f.ServerInfo(SERVER.seal_to(info.key, b'{"version":2}')).pack())
    await writer.drain()
    return body


class ScriptedServer:
    """Runs the next script for each connection (the last one repeats)."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.connections = 0
        self.accepted_at: list[float] = []
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        script = self.scripts[min(self.connections, len(self.scripts) - 1)]
        self.connections += 1
        self.accepted_at.append(time.monotonic())
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


def client_for(server: ScriptedServer, **kwargs: object) -> DerpRelayClient:
    options: dict[str, object] = {"backoff_initial": 0.05, "backoff_max": 0.2, "rng": random.Random(1)}
    options.update(kwargs)
    return DerpRelayClient(NodePrivateKey.generate(), "127.0.0.1", server.port, **options)  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_a_server_that_never_answers_times_out_and_is_retried() -> None:
    async def main() -> None:
        async with ScriptedServer(silent) as server, client_for(server, connect_timeout=0.2) as client:
            await until(lambda: client.stats.connect_failures >= 2)
            assert not client.connected and client.stats.connects == 0
            assert client.last_error is not None and client.last_error.startswith("TimeoutError")
    asyncio.run(main())


def test_a_refused_upgrade_is_reported_with_its_status() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 426 Upgrade Required\r\n\r\nDERP requires connection upgrade")
        await writer.drain()

    async def main() -> None:
        async with ScriptedServer(refuse) as server, client_for(server) as client:
            await until(lambda: client.stats.connect_failures >= 1)
            assert client.last_error is not None
            assert "bad_status" in client.last_error and "426" in client.last_error
    asyncio.run(main())


def test_silence_after_the_handshake_reconnects_after_the_read_timeout() -> None:
    bodies: list[dict[str, object]] = []

    async def then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bodies.append(await handshake(reader, writer))
        await asyncio.sleep(30)

    async def main() -> None:
        async with ScriptedServer(then_silent) as server, client_for(server, read_timeout=0.3) as client:
            await client.wait_connected(5)
            started = time.monotonic()
            await until(lambda: client.stats.connects == 2)
            assert time.monotonic() - started >= 0.3
            assert client.stats.disconnects == 1
            assert client.last_error is not None and "nothing from the server" in client.last_error
    asyncio.run(main())
    assert bodies[0] == {"version": 2, "CanAckPings": True}


def test_restarting_sets_the_delay_before_the_next_attempt() -> None:
    async def restart(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handshake(reader, writer)
        writer.write(f.Restarting(reconnect_in_ms=400, try_for_ms=5000).pack())
        await writer.drain()

    async def main() -> None:
        async with ScriptedServer(restart, silent) as server, client_for(server) as client:
            assert isinstance(await asyncio.wait_for(client.next_event(), 5), Connected)
            assert await asyncio.wait_for(client.next_event(), 5) == f.Restarting(400, 5000)
            await until(lambda: server.connections == 2)
            gap = server.accepted_at[1] - server.accepted_at[0]
            assert 0.4 <= gap < 1.5  # backoff alone would have waited at most 0.05 s
    asyncio.run(main())


def test_a_bad_frame_drops_the_connection_after_delivering_what_came_before() -> None:
    async def corrupt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handshake(reader, writer)
        writer.write(f.RecvPacket(PEER, b"good").pack() + b"\x05\x7f\xff\xff\xff")  # a 2 GiB frame
        await writer.drain()
        await asyncio.sleep(30)

    async def main() -> None:
        async with ScriptedServer(corrupt, silent) as server, client_for(server) as client:
            assert await asyncio.wait_for(client.recv(), 5) == (PEER, b"good")
            await until(lambda: client.stats.disconnects == 1)
            assert client.last_error is not None and "frame_too_large" in client.last_error
    asyncio.run(main())


def test_a_full_receive_queue_drops_the_oldest_and_a_callback_sees_everything() -> None:
    async def burst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handshake(reader, writer)
        writer.write(b"".join(f.RecvPacket(PEER, bytes([i])).pack() for i in range(5)))
        await writer.drain()
        await asyncio.sleep(30)

    async def main() -> None:
        async with ScriptedServer(burst) as server:
            async with client_for(server, queue_size=2) as queued:
                await until(lambda: queued.stats.dropped_queue_full == 3)
                assert [await queued.recv() for _ in range(2)] == [(PEER, b"\x03"), (PEER, b"\x04")]
            seen: list[bytes] = []

            def on_packet(src: object, packet: bytes) -> None:
                seen.append(packet)
                if packet == b"\x02":
                    raise RuntimeError("a broken callback")

            async with client_for(server, on_packet=on_packet) as called:
                await until(lambda: len(seen) == 5)
                assert called.stats.callback_errors == 1 and called.connected  # it carried on
                assert called.stats.packets_received == 5 and called.stats.bytes_received == 5
            assert seen == [bytes([i]) for i in range(5)]
    asyncio.run(main())


def test_bad_options_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="cert_name"):
        DerpRelayClient(NodePrivateKey.generate(), "127.0.0.1", 1, cert_pin="sha1:00")
    with pytest.raises(ValueError, match="64 hex"):
        DerpRelayClient(NodePrivateKey.generate(), "127.0.0.1", 1, cert_pin="sha256-raw:abcd")


def test_a_flapping_server_meets_a_growing_capped_backoff() -> None:
    async def flap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handshake(reader, writer)  # connected, then closed at once

    async def main() -> None:
        async with (ScriptedServer(flap) as server,
                    client_for(server, backoff_initial=0.05, backoff_max=0.4) as client):
            await until(lambda: server.connections >= 6)
            gaps = [b - a for a, b in zip(server.accepted_at, server.accepted_at[1:], strict=False)]
            assert client.stats.connects >= 5 and client.stats.disconnects >= 5
            # Delays 0.05, 0.1, 0.2, 0.4, 0.4 s, each jittered to half..all of itself.
            assert gaps[0] < 0.1 and gaps[3] >= 0.2 and gaps[4] >= 0.2
            assert max(gaps) < 0.4 + 0.2
    asyncio.run(main())


def test_garbage_after_the_handshake_never_ends_the_client() -> None:
    rng = random.Random(15)
    blobs = [rng.randbytes(rng.randrange(1, 300)) for _ in range(12)]
    blobs += [b"\x05\x00\x00\x00\x10" + b"x", b"\x01\x00\x00\x00\x28" + bytes(40),
              b"\x07\x00\x00\x00\x02\x01\x01"]
    served = iter(blobs)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handshake(reader, writer)
        writer.write(next(served, b""))
        await writer.drain()

    async def main() -> None:
        async with ScriptedServer(garbage) as server, client_for(server, backoff_max=0.01) as client:
            await until(lambda: server.connections > len(blobs), timeout=15)
            assert client._task is not None and not client._task.done()
            assert client.stats.unexpected_errors == 0
            assert client.stats.connects >= len(blobs)
    asyncio.run(main())


def test_bad_targets_are_refused_naming_the_field() -> None:
    key = NodePrivateKey.generate()
    with pytest.raises(ValueError, match="host"):
        DerpRelayClient(key, "")
    with pytest.raises(ValueError, match="port"):
        DerpRelayClient(key, "127.0.0.1", 0)
    with pytest.raises(ValueError, match="host"):
        DerpRelayClient(key, "127.0.0.1", 1, host_header="a\r\nb")
    with pytest.raises(ValueError, match="mesh_key"):
        DerpRelayClient(key, "127.0.0.1", 1, mesh_key=b"short")
    with pytest.raises(ValueError, match="targets"):
        DerpRelayClient(key, targets=[])
