"""Meshed DERP servers of one region (``pywg derp serve --mesh-with URL,... --mesh-key FILE``):
a client on one server reaches a client on another through the mesh (WatchConns +
ForwardPacket), PeerGone travels back when the far client leaves, a wrong mesh key earns no
mesh privileges, a server listed in its own --mesh-with ignores itself, and pywg's server
meshes with Tailscale's derper 1.102.3 both ways. Real processes on loopback, pywg's relay
clients (``pywg.device.derp_client``)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from needs import unavailable

from pywg.derp import DerpClient, NodePrivateKey, NodePublicKey, build_upgrade_request
from pywg.derp.frames import FrameDecoder, PeerGone, PeerGoneReason, PeerPresent
from pywg.device.derp_client import DerpRelayClient
from pywg.device.derp_mesh import MeshConfigError, load_mesh_key, parse_mesh_with
from pywg.testing.netns import PEERS_DIR

DERPER = PEERS_DIR / "derper-1.102.3" / "bin" / "derper"
PYWG = Path(sys.executable).with_name("pywg")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_key_file(path: Path, key: NodePrivateKey) -> None:
    path.write_text(json.dumps({"PrivateKey": key.private_text()}))
    path.chmod(0o600)


@contextmanager
def process(argv: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def pywg_serve(tmp: Path, name: str, key: NodePrivateKey, port: int, mesh_with: list[int],
               mesh_key: Path) -> list[str]:
    config = tmp / f"{name}.json"
    write_key_file(config, key)
    return [str(PYWG), "derp", "serve", "--listen", f"127.0.0.1:{port}", "--config", str(config),
            "--mesh-with", ",".join(f"http://127.0.0.1:{p}" for p in mesh_with), "--mesh-key", str(mesh_key)]


@pytest.fixture
def mesh_key(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.key"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


async def next_event_of(c: DerpRelayClient, kind: type[T], timeout: float = 10.0) -> T:
    async with asyncio.timeout(timeout):
        while True:
            event = await c.next_event()
            if isinstance(event, kind):
                return event


async def reach(sender: DerpRelayClient, receiver: DerpRelayClient, timeout: float = 15.0) -> None:
    """Send until one packet arrives: the mesh learns of the receiver a moment after it connects."""
    async with asyncio.timeout(timeout):
        while True:
            await sender.send(receiver.public_key, b"are you there")
            try:
                src, payload = await asyncio.wait_for(receiver.recv(), 0.3)
            except TimeoutError:
                continue
            assert (src, payload) == (sender.public_key, b"are you there")
            return


async def exchange(a: DerpRelayClient, b: DerpRelayClient) -> None:
    """Both reach each other, then 200 packets each way arrive intact and in order."""
    await reach(a, b)
    await reach(b, a)
    for x, y in ((a, b), (b, a)):
        while not y._packets.empty():  # retries of ``reach`` that also arrived
            y._packets.get_nowait()
        for batch in range(20):  # in batches of 10: derper's queue per client is 32 packets deep
            sent = [os.urandom(1 + batch * 70 + i) for i in range(10)]
            for payload in sent:
                assert await x.send(y.public_key, payload)
            got = [await asyncio.wait_for(y.recv(), 5) for _ in sent]
            assert got == [(x.public_key, p) for p in sent]


async def across(port_a: int, server_a: NodePublicKey, port_b: int, server_b: NodePublicKey) -> None:
    """Client A on one server and B on the other exchange packets; when B leaves, A (which
    sent to B) hears PeerGone through the mesh."""
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()
    a = DerpRelayClient(key_a, "127.0.0.1", port_a, expected_server_key=server_a)
    b = DerpRelayClient(key_b, "127.0.0.1", port_b, expected_server_key=server_b)
    async with a, b:
        await a.wait_connected(10)
        await b.wait_connected(10)
        await exchange(a, b)
        await b.close()
        gone = await next_event_of(a, PeerGone)
        assert gone.peer == key_b.public and gone.reason == PeerGoneReason.DISCONNECTED


def test_two_meshed_pywg_servers_relay_between_their_clients(tmp_path: Path, mesh_key: Path) -> None:
    k1, k2 = NodePrivateKey.generate(), NodePrivateKey.generate()
    p1, p2 = free_port(), free_port()
    # Server 1's list names itself too (derper allows the whole region's list): it must ignore itself.
    s1 = pywg_serve(tmp_path, "s1", k1, p1, [p1, p2], mesh_key)
    s2 = pywg_serve(tmp_path, "s2", k2, p2, [p1], mesh_key)
    with process(s1, p1, tmp_path / "s1.log"), process(s2, p2, tmp_path / "s2.log"):
        asyncio.run(across(p1, k1.public, p2, k2.public))


async def watch(port: int, key: NodePrivateKey, mesh_key: bytes | None) -> tuple[list[object], bool]:
    """Connect as a would-be mesh peer, send WatchConns; the frames heard and whether the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(build_upgrade_request(f"127.0.0.1:{port}"))
    await reader.readuntil(b"\r\n\r\n")
    client = DerpClient(key, mesh_key=mesh_key, watch_conns=True)
    client.receive_data(await reader.readexactly(5 + 8 + 32), 0.0)
    writer.write(client.data_to_send())
    decoder = FrameDecoder()
    frames: list[object] = []
    closed = False
    try:
        async with asyncio.timeout(2):
            while True:
                data = await reader.read(65536)
                if not data:
                    closed = True
                    break
                frames += decoder.feed(data)
    except TimeoutError:
        pass
    writer.close()
    return frames, closed


def test_only_the_mesh_key_unlocks_watch_conns(tmp_path: Path, mesh_key: Path) -> None:
    k1 = NodePrivateKey.generate()
    p1 = free_port()
    s1 = pywg_serve(tmp_path, "s1", k1, p1, [free_port()], mesh_key)  # a peer that is not there
    key_a = NodePrivateKey.generate()

    async def main() -> None:
        async with DerpRelayClient(key_a, "127.0.0.1", p1) as a:
            await a.wait_connected(10)
            frames, closed = await watch(p1, NodePrivateKey.generate(), os.urandom(32))
            assert closed and not any(isinstance(f, PeerPresent) for f in frames)
            frames, closed = await watch(p1, NodePrivateKey.generate(), None)
            assert closed
            frames, closed = await watch(p1, NodePrivateKey.generate(), load_mesh_key(mesh_key))
            assert not closed
            present = [f.peer for f in frames if isinstance(f, PeerPresent)]
            assert key_a.public in present

    with process(s1, p1, tmp_path / "s1.log"):
        asyncio.run(main())


def test_mesh_options_are_checked(tmp_path: Path) -> None:
    assert [t.url for t in parse_mesh_with("http://10.0.0.1:3340,derp2.example,https://[fd00::1]:8443")] == [
        "http://10.0.0.1:3340/derp", "https://derp2.example:443/derp", "https://[fd00::1]:8443/derp"]
    for bad in ("", "ftp://x", "http://x:99999", "http://x/other", "a,,b"):
        with pytest.raises(MeshConfigError, match="--mesh-with"):
            parse_mesh_with(bad)
    key = tmp_path / "mesh.key"
    key.write_text("ab" * 32)
    key.chmod(0o644)
    with pytest.raises(MeshConfigError, match="--mesh-key.*chmod 600"):
        load_mesh_key(key)
    key.chmod(0o600)
    assert load_mesh_key(key) == bytes([0xAB]) * 32
    key.write_text("ab" * 31)
    with pytest.raises(MeshConfigError, match="--mesh-key.*64 hex"):
        load_mesh_key(key)
    config = tmp_path / "keys" / "derp.json"
    done = subprocess.run([str(PYWG), "derp", "serve", "--listen", "127.0.0.1:0", "--config", str(config),
                           "--mesh-with", "http://127.0.0.1:1"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 2 and done.stderr.startswith("pywg: --mesh-key:"), done.stderr
    assert not config.exists()


def test_pywg_meshes_with_derper_both_ways(tmp_path: Path, mesh_key: Path) -> None:
    if not DERPER.is_file():
        unavailable(f"peer not installed: derper 1.102.3: no {DERPER} (make peers builds it)")
    kd, kp = NodePrivateKey.generate(), NodePrivateKey.generate()
    pd, pp = free_port(), free_port()
    derper_config = tmp_path / "derper.json"
    write_key_file(derper_config, kd)
    # derper dials https://HOST/derp for each --mesh-with host; TS_DEBUG_USE_DERP_HTTP makes it plain HTTP.
    derper = [str(DERPER), "-a", f"127.0.0.1:{pd}", "-c", str(derper_config), "-stun=false", "-http-port", "-1",
              "-mesh-psk-file", str(mesh_key), "-mesh-with", f"127.0.0.1:{pp}"]
    env = dict(os.environ, TS_DEBUG_USE_DERP_HTTP="true")
    ours = pywg_serve(tmp_path, "pywg", kp, pp, [pd], mesh_key)
    with process(derper, pd, tmp_path / "derper.log", env), process(ours, pp, tmp_path / "pywg.log"):
        try:
            asyncio.run(across(pd, kd.public, pp, kp.public))
        except BaseException:
            print((tmp_path / "derper.log").read_text()[-3000:])
            raise
