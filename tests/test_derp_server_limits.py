"""``pywg derp serve``'s limits, WebSocket upgrade and graceful stop: a flooding client is held
to its byte rate while another pair keeps flowing, a client that never reads does not grow the
server's memory (RSS of the real process), the accept rate and the connection limit close
excess connections, DERP over WebSocket (aiohttp's client, subprotocol "derp") relays to and
from a plain client, a WebSocket protocol breach is closed and counted, and SIGTERM sends
Restarting to every client and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from test_derp_server import raw_client, run

from pywg.derp import DerpClient, NodePrivateKey
from pywg.derp.frames import FrameDecoder, RecvPacket, Restarting, SendPacket, ServerInfo
from pywg.derp.limits import RelayLimits
from pywg.device.derp_client import DerpRelayClient
from pywg.device.derp_server import DerpRelayServer

PYWG = Path(sys.executable).with_name("pywg")


def test_a_flooding_client_is_held_to_its_rate_while_others_flow() -> None:
    keys = [NodePrivateKey.generate() for _ in range(4)]
    rate = 2 << 20

    async def body(server: DerpRelayServer) -> None:
        flood, sink, c, d = (DerpRelayClient(k, "127.0.0.1", server.port) for k in keys)
        async with flood, sink, c, d:
            for x in (flood, sink, c, d):
                await x.wait_connected(10)
            payload = os.urandom(1200)
            start = time.monotonic()
            latencies = []

            async def blast() -> None:
                while time.monotonic() - start < 3:
                    await flood.send(sink.public_key, payload)

            blaster = asyncio.create_task(blast())
            for i in range(10):
                sent = time.monotonic()
                assert await c.send(d.public_key, b"meanwhile %d" % i)
                assert await asyncio.wait_for(d.recv(), 5) == (c.public_key, b"meanwhile %d" % i)
                latencies.append(time.monotonic() - sent)
                await asyncio.sleep(0.2)
            await blaster
            elapsed = time.monotonic() - start
            delivered = sink.stats.bytes_received
            # At most burst + rate * time went through (a little slack for frame headers).
            assert delivered <= 1.1 * ((256 << 10) + rate * elapsed), delivered
            assert server.http.rate_limited_reads > 0
            assert max(latencies) < 1.0, latencies

    run(body, limits=RelayLimits(client_rate=rate, client_burst=256 << 10))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, NodePrivateKey]:
    key = NodePrivateKey.generate()
    config = tmp_path / "derp.json"
    config.write_text(json.dumps({"PrivateKey": key.private_text()}))
    config.chmod(0o600)
    port = _free_port()
    proc = subprocess.Popen([str(PYWG), "derp", "serve", "--listen", f"127.0.0.1:{port}", "--config", str(config),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None and time.monotonic() < deadline
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port, key
        time.sleep(0.05)


class _Relay:
    def __init__(self, port: int, key: NodePrivateKey) -> None:
        self.port, self.public_key = port, key.public


def test_a_client_that_never_reads_does_not_grow_server_memory(tmp_path: Path) -> None:
    proc, port, key = _start(tmp_path, "--client-rate", "0", "--write-timeout", "0")
    relay = _Relay(port, key)
    k_flood, k_slow = NodePrivateKey.generate(), NodePrivateKey.generate()

    async def main() -> None:
        _, slow_writer = await raw_client(relay, k_slow)  # type: ignore[arg-type]
        slow_writer.transport.pause_reading()  # type: ignore[attr-defined]
        async with DerpRelayClient(k_flood, "127.0.0.1", port) as flood:
            await flood.wait_connected(10)
            payload = os.urandom(16000)
            for _ in range(200):
                await flood.send(k_slow.public, payload)
            await asyncio.sleep(0.5)
            before = _rss_kib(proc.pid)
            for _ in range(4000):  # 64 MB more for a reader that takes nothing
                await flood.send(k_slow.public, payload)
            await asyncio.sleep(0.5)
            after = _rss_kib(proc.pid)
            assert after - before < 24 << 10, (before, after)
            assert proc.poll() is None
        slow_writer.close()

    try:
        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(10)


def test_accept_rate_and_connection_limit_close_excess_connections() -> None:
    async def body(server: DerpRelayServer) -> None:
        held = []
        for _ in range(5):
            held.append(await asyncio.open_connection("127.0.0.1", server.port))
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            got = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            got = b""
        assert got == b""
        assert server.http.rejected["too_many_connections"] + server.http.rejected["accept_rate"] >= 1
        for _, w in held:
            w.close()
        writer.close()

    run(body, limits=RelayLimits(max_connections=3, accept_rate=1, accept_burst=4))


async def _ws_connect(session: aiohttp.ClientSession, port: int) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(f"http://127.0.0.1:{port}/derp", protocols=("derp",), compress=0)


def test_derp_over_websocket_relays_with_a_plain_client() -> None:
    key_ws, key_plain = NodePrivateKey.generate(), NodePrivateKey.generate()

    async def body(server: DerpRelayServer) -> None:
        async with aiohttp.ClientSession() as session, DerpRelayClient(key_plain, "127.0.0.1", server.port) as plain:
            await plain.wait_connected(10)
            ws = await _ws_connect(session, server.port)
            assert ws.protocol == "derp"
            client = DerpClient(key_ws, expected_server_key=server.public_key)
            decoder = FrameDecoder()
            frames: list[object] = []

            async def read_frames(kind: type, count: int = 1) -> list[object]:
                found: list[object] = []
                while len(found) < count:
                    while frames:
                        frame = frames.pop(0)
                        if isinstance(frame, kind):
                            found.append(frame)
                    if len(found) >= count:
                        break
                    message = await asyncio.wait_for(ws.receive(), 5)
                    assert message.type == aiohttp.WSMsgType.BINARY, message
                    client.receive_data(message.data, 0.0)
                    frames.extend(decoder.feed(message.data))
                return found

            message = await asyncio.wait_for(ws.receive(), 5)
            client.receive_data(message.data, 0.0)  # ServerKey
            await ws.send_bytes(client.data_to_send())  # ClientInfo
            await read_frames(ServerInfo)
            # WebSocket -> plain, one DERP frame split over two messages and two frames in one.
            frame = SendPacket(key_plain.public, b"from the browser").pack()
            await ws.send_bytes(frame[:7])
            await ws.send_bytes(frame[7:] + SendPacket(key_plain.public, b"second").pack())
            assert await asyncio.wait_for(plain.recv(), 5) == (key_ws.public, b"from the browser")
            assert await asyncio.wait_for(plain.recv(), 5) == (key_ws.public, b"second")
            # plain -> WebSocket
            big = os.urandom(60000)
            assert await plain.send(key_ws.public, big)
            (got,) = await read_frames(RecvPacket)
            assert got == RecvPacket(key_plain.public, big)  # type: ignore[comparison-overlap]
            await ws.close()
            # A text message breaks the protocol: the server closes it and counts it.
            ws2 = await _ws_connect(session, server.port)
            await ws2.send_str("not binary")
            message = await asyncio.wait_for(ws2.receive(), 5)
            while message.type == aiohttp.WSMsgType.BINARY:
                message = await asyncio.wait_for(ws2.receive(), 5)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert server.http.websocket_errors["unsupported_data"] == 1
            await ws2.close()
            assert await plain.send(key_ws.public, b"server still serving")

    run(body)


def test_sigterm_sends_restarting_to_every_client_and_exits_cleanly(tmp_path: Path) -> None:
    proc, port, _ = _start(tmp_path)
    keys = [NodePrivateKey.generate() for _ in range(3)]

    async def main() -> None:
        clients = [DerpRelayClient(k, "127.0.0.1", port, backoff_initial=5, backoff_max=5) for k in keys]
        for c in clients:
            c.start()
            await c.wait_connected(10)
        proc.send_signal(signal.SIGTERM)
        for c in clients:
            async with asyncio.timeout(5):
                while True:
                    event = await c.next_event()
                    if isinstance(event, Restarting):
                        break
            assert event.reconnect_in_ms > 0 and event.try_for_ms >= event.reconnect_in_ms
        for c in clients:
            async with asyncio.timeout(5):
                while c.connected:
                    await asyncio.sleep(0.05)
            await c.close()

    try:
        asyncio.run(main())
        assert proc.wait(10) == 0
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert "stopping" in out and "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
