"""pywg's DERP client against Tailscale's own relay server, derper (real interop).

derper runs in namespace A of the bed on 10.201.0.1 (plain HTTP, a key file we wrote, no
STUN, never ``-dev``); the pywg clients run in namespace B and reach it over the veth.
Under CI=true a missing derper binary fails the test naming it (``make peers`` builds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from pywg.derp import Connected, NodePrivateKey, NodePublicKey
from pywg.derp.derpmap import parse_derp_map
from pywg.derp.frames import PeerGone, PeerGoneReason, PeerPresent, PeerPresentFlags
from pywg.device.derp_client import CertificatePinMismatch, DerpNotConnected, DerpRelayClient
from pywg.testing.certs import self_signed
from pywg.testing.netns import Bed, entered, stop_process

DERPER = Path.home() / ".cache" / "pywg" / "peers" / "derper-1.102.3" / "bin" / "derper"
PORT = 3340
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"

pytestmark = pytest.mark.netns

T = TypeVar("T")


def require_derper() -> Path:
    if DERPER.is_file() and os.access(DERPER, os.X_OK):
        return DERPER
    message = f"Tailscale's derper is required and missing: {DERPER} (make peers builds it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Derper:
    """A derper process in a namespace of the bed, with the key we gave it."""

    bed: Bed
    key: NodePrivateKey
    key_file: Path
    log_path: Path
    address: str = ""
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def public_key(self) -> NodePublicKey:
        return self.key.public

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.bed.ns_a, str(DERPER), "-a", f"{self.address}:{PORT}",
                 "-c", str(self.key_file), "-stun=false", "-http-port", "-1", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"derper exited {self.process.returncode}: {self.log()}")
            with entered(self.bed.ns_b), socket.socket() as probe:
                probe.settimeout(0.5)
                if probe.connect_ex((self.address, PORT)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"derper did not listen on {self.address}:{PORT}: {self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running_derper(bed: Bed, *extra_args: str) -> Iterator[Derper]:
    require_derper()
    key = NodePrivateKey.generate()
    key_file = bed.secret_file("derper.json", json.dumps({"PrivateKey": key.private_text()}))
    server = Derper(bed, key, key_file, bed.workdir / "derper.log", address=bed.outer_a,
                    extra_args=extra_args)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def derper(bed: Bed) -> Iterator[Derper]:
    with running_derper(bed) as server:
        yield server


def in_namespace(ns: str, main: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine with its sockets made in namespace ``ns``."""
    async def wrapped() -> T:
        return await main()
    with entered(ns):
        return asyncio.run(wrapped())


def relay_client(derper: Derper, key: NodePrivateKey, **kwargs: object) -> DerpRelayClient:
    return DerpRelayClient(key, derper.address, PORT, expected_server_key=derper.public_key,
                           **kwargs)  # type: ignore[arg-type]


async def next_event_of(client: DerpRelayClient, kind: type[T], timeout: float = 5.0) -> T:
    async with asyncio.timeout(timeout):
        while True:
            event = await client.next_event()
            if isinstance(event, kind):
                return event


def test_two_clients_relay_packets_ping_and_see_peer_gone(derper: Derper) -> None:
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()
    stranger = NodePrivateKey.generate().public

    async def main() -> None:
        async with relay_client(derper, key_a) as a, relay_client(derper, key_b) as b:
            await a.wait_connected(10)
            await b.wait_connected(10)
            # The handshake completed with the key we gave derper (pinned), and ServerInfo opened.
            connected = await next_event_of(a, Connected)
            assert connected.server_key == derper.public_key and connected.info.version == 2
            assert a.server_key == derper.public_key

            # A -> B and B -> A, every size from 1 byte to the 64 KiB limit, in order.
            payloads = [b"x", b"hello over derp", os.urandom(1400), os.urandom(65536)]
            for payload in payloads:
                assert await a.send(key_b.public, payload)
            for payload in payloads:
                src, got = await asyncio.wait_for(b.recv(), 5)
                assert src == key_a.public and got == payload
            for i in range(20):
                assert await b.send(key_a.public, f"reply {i}".encode())
            for i in range(20):
                src, got = await asyncio.wait_for(a.recv(), 5)
                assert (src, got) == (key_b.public, f"reply {i}".encode())

            # Ping/Pong with derper, both clients.
            for client in (a, b):
                rtt = await client.ping(timeout=3)
                assert 0 < rtt < 1

            # derper drops a packet for an unknown key; a disco-looking one earns PeerGone(NotHere).
            assert await a.send(stranger, b"plain wireguard bytes to nobody")
            assert await a.send(stranger, DISCO_MAGIC + bytes(32 + 24 + 16))
            gone = await next_event_of(a, PeerGone)
            assert gone == PeerGone(stranger, PeerGoneReason.NOT_HERE)

            # B leaves: A, which received from B, is told B is gone (Disconnected).
            await b.close()
            gone = await next_event_of(a, PeerGone)
            assert gone == PeerGone(key_b.public, PeerGoneReason.DISCONNECTED)
            assert not await b.send(key_a.public, b"after close")
            assert b.stats.dropped_not_connected == 1
            assert a.stats.dropped_queue_full == 0 and a.stats.disconnects == 0
            assert a.stats.packets_sent == len(payloads) + 2 and b.stats.packets_received == len(payloads)
            assert a.stats.packets_received == 20 and b.stats.packets_sent == 20

    in_namespace(derper.bed.ns_b, main)
    assert "panic" not in derper.log()


def test_clients_reconnect_when_derper_restarts(derper: Derper) -> None:
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()

    async def main() -> None:
        async with (relay_client(derper, key_a, backoff_max=0.5) as a,
                    relay_client(derper, key_b, backoff_max=0.5) as b):
            await a.wait_connected(10)
            await b.wait_connected(10)
            assert await a.send(key_b.public, b"before")
            assert await asyncio.wait_for(b.recv(), 5) == (key_a.public, b"before")

            await asyncio.to_thread(derper.stop)
            async with asyncio.timeout(5):
                while a.connected or b.connected:
                    await asyncio.sleep(0.02)
            assert not await a.send(key_b.public, b"lost while down")
            with pytest.raises(DerpNotConnected):
                await a.ping()

            started = time.monotonic()
            await asyncio.to_thread(derper.start)
            await a.wait_connected(10)
            await b.wait_connected(10)
            reconnect = time.monotonic() - started
            assert a.stats.connects == 2 and b.stats.connects == 2
            assert a.stats.disconnects == 1 and a.stats.dropped_not_connected == 1
            assert await a.send(key_b.public, b"after")
            assert await asyncio.wait_for(b.recv(), 5) == (key_a.public, b"after")
            assert await b.send(key_a.public, b"and back")
            assert await asyncio.wait_for(a.recv(), 5) == (key_b.public, b"and back")
            print(f"reconnected {reconnect:.2f} s after derper listened again")
            assert reconnect < 3

    in_namespace(derper.bed.ns_b, main)


def test_a_client_pinned_to_another_key_never_connects(derper: Derper) -> None:
    async def main() -> None:
        impostor_check = DerpRelayClient(NodePrivateKey.generate(), derper.address, PORT,
                                         expected_server_key=NodePrivateKey.generate().public,
                                         backoff_initial=0.05, backoff_max=0.1)
        async with impostor_check:
            with contextlib.suppress(TimeoutError):
                await impostor_check.wait_connected(1.0)
            assert not impostor_check.connected
            assert impostor_check.stats.connect_failures >= 2  # it kept retrying, with backoff
            assert impostor_check.last_error is not None
            assert "server_key_mismatch" in impostor_check.last_error

    in_namespace(derper.bed.ns_b, main)


def test_tls_with_a_verified_certificate_and_with_a_sha256_raw_pin(bed: Bed) -> None:
    cert_dir = bed.workdir / "certs"
    cert_dir.mkdir()
    pin = self_signed(cert_dir, [bed.outer_a], stem=bed.outer_a).pin
    tls_flags = ("-certmode", "manual", "-certdir", str(cert_dir), "-hostname", bed.outer_a)
    with running_derper(bed, *tls_flags) as derper:
        # derper prints the CertName a DERP map should carry for it: the same pin.
        assert pin in derper.log()
        key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()
        verified = ssl.create_default_context(cafile=str(cert_dir / f"{bed.outer_a}.crt"))

        async def main() -> None:
            async with (relay_client(derper, key_a, ssl=verified) as a,
                        relay_client(derper, key_b, cert_pin=pin) as b,
                        relay_client(derper, NodePrivateKey.generate(), cert_pin="sha256-raw:" + "00" * 32,
                                     backoff_initial=0.05, backoff_max=0.1) as wrong):
                await a.wait_connected(10)
                await b.wait_connected(10)
                assert a._writer is not None and a._writer.get_extra_info("ssl_object").version() == "TLSv1.3"
                assert await a.send(key_b.public, b"over tls")
                assert await asyncio.wait_for(b.recv(), 5) == (key_a.public, b"over tls")
                assert await b.send(key_a.public, b"pinned")
                assert await asyncio.wait_for(a.recv(), 5) == (key_b.public, b"pinned")
                with contextlib.suppress(TimeoutError):
                    await wrong.wait_connected(0.5)
                assert not wrong.connected and wrong.stats.connect_failures >= 1
                assert wrong.last_error is not None
                assert wrong.last_error.startswith(CertificatePinMismatch.__name__)
                assert pin.removeprefix("sha256-raw:") in wrong.last_error

        in_namespace(bed.ns_b, main)
        # The impostor check happened before any DERP byte: derper saw no client key from it.
        assert "receive client key" not in derper.log()


def test_a_region_client_skips_dead_nodes_and_a_mesh_watcher_sees_it(bed: Bed) -> None:
    """A DERP map region whose first node does not answer: the client moves on to derper
    (sending Ideal-Node); a watcher holding the mesh key sees every client come and go,
    with its address and flags (NotIdeal for the one that is not on its ideal node)."""
    mesh_key = os.urandom(32)
    mesh_file = bed.secret_file("mesh.key", mesh_key.hex())
    derp_map = parse_derp_map({"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "Nodes": [
        {"Name": "900s", "RegionID": 900, "HostName": "stun.lab", "IPv4": bed.outer_a, "STUNOnly": True},
        {"Name": "900a", "RegionID": 900, "HostName": "gone.lab", "IPv4": "10.201.0.9", "DERPPort": PORT},
        {"Name": "900b", "RegionID": 900, "HostName": "derp.lab", "IPv4": bed.outer_a, "IPv6": "none",
         "DERPPort": PORT}]}}})
    with running_derper(bed, "-mesh-psk-file", str(mesh_file)) as derper:
        watcher_key, key_a, key_b = (NodePrivateKey.generate() for _ in range(3))

        async def main() -> None:
            async with relay_client(derper, watcher_key, mesh_key=mesh_key, watch_conns=True,
                                    preferred=False) as watcher:
                await watcher.wait_connected(10)
                region = derp_map.regions[900]
                started = time.monotonic()
                region_client = DerpRelayClient.for_region(key_a, region, plain_http=True,
                                                           node_dial_timeout=0.5)
                async with region_client as a, relay_client(derper, key_b) as b:
                    await a.wait_connected(10)
                    await b.wait_connected(10)
                    assert 0.5 <= time.monotonic() - started < 3  # one dead node's dial timeout
                    assert a.target is not None and a.target.node_name == "900b"
                    assert await a.send(key_b.public, b"via the region")
                    assert await asyncio.wait_for(b.recv(), 5) == (key_a.public, b"via the region")
                    present: dict[NodePublicKey, PeerPresent] = {}
                    async with asyncio.timeout(5):
                        while not {key_a.public, key_b.public} <= present.keys():
                            event = await next_event_of(watcher, PeerPresent)
                            present[event.peer] = event
                    for key in (key_a.public, key_b.public):
                        assert present[key].endpoint is not None
                        assert present[key].endpoint[0] == bed.outer_b and present[key].endpoint[1] > 0
                    assert present[key_a.public].flags == PeerPresentFlags.NOT_IDEAL
                    assert present[key_b.public].flags == PeerPresentFlags.IS_REGULAR
                gone = {(await next_event_of(watcher, PeerGone)).peer for _ in range(2)}
                assert gone == {key_a.public, key_b.public}

        in_namespace(bed.ns_b, main)
