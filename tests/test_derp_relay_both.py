"""The same relay-client tests against both servers, side by side: ``pywg derp serve`` and
Tailscale's derper 1.102.3 (``-a 127.0.0.1:PORT -c KEYFILE``, plain HTTP, never ``-dev``),
each a real process on loopback, with pywg's relay clients. Fails under CI=true when
derper is missing."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from needs import unavailable

from pywg.derp import DerpClient, NodePrivateKey, NodePublicKey, build_upgrade_request
from pywg.derp.frames import PeerGone, PeerGoneReason
from pywg.device.derp_client import DerpRelayClient
from pywg.testing.netns import PEERS_DIR

DERPER = PEERS_DIR / "derper-1.102.3" / "bin" / "derper"
T = TypeVar("T")


@dataclass
class Relay:
    name: str
    port: int
    public_key: NodePublicKey


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["pywg", "derper"])
def relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Relay]:
    key = NodePrivateKey.generate()
    config = tmp_path / "keys" / "derp.json"
    config.parent.mkdir(mode=0o700)
    config.write_text(json.dumps({"PrivateKey": key.private_text()}))
    config.chmod(0o600)
    port = free_port()
    if request.param == "derper":
        if not DERPER.is_file():
            unavailable(f"peer not installed: derper 1.102.3: no {DERPER} (make peers builds it)")
        argv = [str(DERPER), "-a", f"127.0.0.1:{port}", "-c", str(config), "-stun=false", "-http-port", "-1"]
    else:
        argv = [str(Path(sys.executable).with_name("pywg")), "derp", "serve", "--listen", f"127.0.0.1:{port}",
                "--config", str(config)]
    log = tmp_path / "relay.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield Relay(request.param, port, key.public)
    finally:
        process.terminate()
        process.wait(10)


def client(relay: Relay, key: NodePrivateKey) -> DerpRelayClient:
    return DerpRelayClient(key, "127.0.0.1", relay.port, expected_server_key=relay.public_key)


async def next_event_of(c: DerpRelayClient, kind: type[T], timeout: float = 5.0) -> T:
    async with asyncio.timeout(timeout):
        while True:
            event = await c.next_event()
            if isinstance(event, kind):
                return event


def test_relay_packets_both_ways_and_peer_gone(relay: Relay) -> None:
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()

    async def main() -> None:
        async with client(relay, key_a) as a, client(relay, key_b) as b:
            await a.wait_connected(10)
            await b.wait_connected(10)
            payloads = [b"x", os.urandom(1400), os.urandom(65536)]
            for payload in payloads:
                assert await a.send(key_b.public, payload)
            for payload in payloads:
                assert await asyncio.wait_for(b.recv(), 5) == (key_a.public, payload)
            assert await b.send(key_a.public, b"back")
            assert await asyncio.wait_for(a.recv(), 5) == (key_b.public, b"back")
            assert 0 < await a.ping(timeout=3) < 1
            await b.close()
            gone = await next_event_of(a, PeerGone)
            assert gone.peer == key_b.public and gone.reason == PeerGoneReason.DISCONNECTED

    asyncio.run(main())


async def raw_client(relay: Relay, key: NodePrivateKey) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A DERP connection driven by hand (it never reconnects): upgrade and ClientInfo sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(build_upgrade_request(f"127.0.0.1:{relay.port}"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    raw = DerpClient(key)
    raw.receive_data(await reader.readexactly(5 + 8 + 32), 0.0)  # ServerKey
    writer.write(raw.data_to_send())
    await writer.drain()
    return reader, writer


def test_a_second_connection_with_the_same_key_gets_the_packets(relay: Relay) -> None:
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()

    async def main() -> None:
        async with client(relay, key_a) as a:
            await a.wait_connected(10)
            _, old_writer = await raw_client(relay, key_b)
            await asyncio.sleep(0.3)
            async with client(relay, key_b) as second:
                await second.wait_connected(10)
                await asyncio.sleep(0.3)
                assert await a.send(key_b.public, b"for the newest")
                assert await asyncio.wait_for(second.recv(), 5) == (key_a.public, b"for the newest")
            old_writer.close()

    asyncio.run(main())
