"""pywg's UAPI codec against the real thing: wireguard-go, configured by the stock ``wg``.

Each test starts ``wireguard-go -f pwguNNNN`` in a network namespace of its own, talks to
its socket in /var/run/wireguard (shared by all namespaces) with a plain Python socket,
and checks that

* every key wireguard-go writes in a get response parses, and ``format_get`` writes the
  parsed snapshot back byte for byte;
* a request written by ``format_set`` is accepted and has the meaning pywg gives it;
* for malformed requests, pywg's reader and ``parse_set`` come to the errno wireguard-go
  answers (and to no answer at all where wireguard-go hangs up).

Needs root, ``ip``, ``wg`` and ``wireguard-go``: a failure under CI=true, a skip elsewhere.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pywg.uapi.protocol import (
    IPC_ERROR_PROTOCOL,
    MAX_LINE_BYTES,
    AllowedIPChange,
    DeviceChanges,
    DeviceSnapshot,
    PeerChanges,
    PeerSnapshot,
    RequestReader,
    SetRequest,
    UapiError,
    format_errno,
    format_get,
    format_set,
    parse_get,
    parse_set,
)

pytestmark = pytest.mark.netns

UAPI_DIR = Path("/var/run/wireguard")
TOOLS = ("ip", "wg", "wireguard-go")
_names = itertools.count(1)


def require_tools() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        problems.append("missing " + ", ".join(missing) + " (make debs installs them)")
    if not os.path.exists("/dev/net/tun"):
        problems.append("no /dev/net/tun")
    if problems:
        reason = "wireguard-go UAPI interop needs " + "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass
class Daemon:
    """wireguard-go serving interface ``name`` inside namespace ``name``."""

    name: str
    process: subprocess.Popen[bytes]
    workdir: Path

    @property
    def socket_path(self) -> Path:
        return UAPI_DIR / f"{self.name}.sock"

    def log(self) -> str:
        path = self.workdir / "wireguard-go.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wg(self, *args: str) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.name, "wg", *args], capture_output=True,
                              timeout=30, check=False)
        assert done.returncode == 0, f"wg {' '.join(args)}: {done.stderr.decode(errors='replace')}"
        return done.stdout.decode()

    def secret_file(self, name: str, text: str) -> str:
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        return str(path)

    def exchange(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send ``data`` on a fresh connection; read one response (up to its blank line) or EOF."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(data)
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    def get(self) -> bytes:
        return self.exchange(b"get=1\n\n")


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    require_tools()
    name = next(n for n in (f"pwgu{os.getpid() % 10000}{i}" for i in _names)
                if not os.path.exists(f"/var/run/netns/{n}") and not (UAPI_DIR / f"{n}.sock").exists())
    workdir = Path(tempfile.mkdtemp(prefix="pywg-uapi-"))
    process: subprocess.Popen[bytes] | None = None
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        with open(workdir / "wireguard-go.log", "wb") as log:
            process = subprocess.Popen(["ip", "netns", "exec", name, "wireguard-go", "-f", name],
                                       stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, LOG_LEVEL="debug"))
        wgo = Daemon(name, process, workdir)
        deadline = time.monotonic() + 10
        while not wgo.socket_path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"wireguard-go did not start: {wgo.log()}")
            time.sleep(0.02)
        yield wgo
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(FileNotFoundError):
            (UAPI_DIR / f"{name}.sock").unlink()
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def wg_keys() -> tuple[str, str]:
    """A base64 (private, public) pair from the stock ``wg``."""
    private = subprocess.run(["wg", "genkey"], capture_output=True, check=True).stdout.decode().strip()
    public = subprocess.run(["wg", "pubkey"], input=private.encode(), capture_output=True,
                            check=True).stdout.decode().strip()
    return private, public


def b64(text: str) -> bytes:
    return base64.b64decode(text)


def test_wg_configured_state_parses_and_formats_back_byte_for_byte(daemon: Daemon) -> None:
    private, _ = wg_keys()
    (_, pub_a), (_, pub_b), (_, pub_c) = wg_keys(), wg_keys(), wg_keys()
    psk_a = subprocess.run(["wg", "genpsk"], capture_output=True, check=True).stdout.decode().strip()
    psk_b = subprocess.run(["wg", "genpsk"], capture_output=True, check=True).stdout.decode().strip()
    daemon.wg(
        "set", daemon.name, "private-key", daemon.secret_file("key", private), "listen-port", "51820",
        "fwmark", "0x1234",
        "peer", pub_a, "preshared-key", daemon.secret_file("psk_a", psk_a), "endpoint", "192.0.2.1:51820",
        "persistent-keepalive", "25", "allowed-ips", "10.0.0.0/24,fd00::/64",
        "peer", pub_b, "preshared-key", daemon.secret_file("psk_b", psk_b), "endpoint", "[2001:db8::1]:443",
        "allowed-ips", "10.1.0.0/16,::ffff:10.2.0.0/112",
        "peer", pub_c, "endpoint", "[::ffff:192.0.2.7]:9", "allowed-ips", "192.168.0.0/16",
    )
    raw = daemon.get().decode()
    assert raw.endswith("errno=0\n\n"), raw

    snapshot = parse_get(raw)
    assert format_get(snapshot) == raw

    assert snapshot.private_key == b64(private)
    assert (snapshot.listen_port, snapshot.fwmark) == (51820, 0x1234)
    peers = {peer.public_key: peer for peer in snapshot.peers}
    assert set(peers) == {b64(pub_a), b64(pub_b), b64(pub_c)}
    assert peers[b64(pub_a)] == PeerSnapshot(b64(pub_a), b64(psk_a), ("192.0.2.1", 51820), None, 0, 0, 25,
                                             ["10.0.0.0/24", "fd00::/64"])
    assert peers[b64(pub_b)] == PeerSnapshot(b64(pub_b), b64(psk_b), ("2001:db8::1", 443), None, 0, 0, 0,
                                             ["10.1.0.0/16", "::ffff:10.2.0.0/112"])
    assert peers[b64(pub_c)] == PeerSnapshot(b64(pub_c), None, ("::ffff:192.0.2.7", 9), None, 0, 0, 0,
                                             ["192.168.0.0/16"])
    # The stock tool reads the same state back.
    assert daemon.wg("show", daemon.name, "private-key").strip() == private


def test_format_set_drives_wireguard_go(daemon: Daemon) -> None:
    peer_a, peer_b = b64(wg_keys()[1]), b64(wg_keys()[1])
    psk = bytes(range(32))
    request = SetRequest(
        DeviceChanges(private_key=b64(wg_keys()[0]), listen_port=40123, fwmark=7, replace_peers=True),
        (
            PeerChanges(peer_a, preshared_key=psk, endpoint=("::ffff:198.51.100.4", 1), persistent_keepalive=5,
                        allowed_ips=(AllowedIPChange(ipaddress.ip_network("10.9.0.0/16")),
                                     AllowedIPChange(ipaddress.ip_network("fd00:1::/48")))),
            PeerChanges(peer_b, endpoint=("198.51.100.5", 65535), replace_allowed_ips=True),
            PeerChanges(b64(wg_keys()[1]), update_only=True, persistent_keepalive=9),  # no such peer: ignored
        ),
    )
    assert daemon.exchange(format_set(request).encode()) == b"errno=0\n\n"
    snapshot = parse_get(daemon.get().decode())
    assert snapshot.private_key == request.device.private_key
    assert (snapshot.listen_port, snapshot.fwmark) == (40123, 7)
    assert sorted(snapshot.peers, key=lambda p: p.public_key != peer_a) == [
        PeerSnapshot(peer_a, psk, ("::ffff:198.51.100.4", 1), None, 0, 0, 5, ["10.9.0.0/16", "fd00:1::/48"]),
        PeerSnapshot(peer_b, None, ("198.51.100.5", 65535)),
    ]

    # What parse_set makes of raw lines is what wireguard-go stores: a clamped key, masked
    # prefixes, the Go spelling of an IPv4-mapped address, zero keys meaning "none".
    lines = [f"private_key={'ff' * 32}", f"public_key={peer_b.hex().upper()}", f"preshared_key={'00' * 32}",
             "allowed_ip=10.3.2.1/8", "allowed_ip=::FFFF:10.4.5.6/100", "endpoint=[::FFFF:C633:6406]:07"]
    parsed = parse_set(lines)
    assert daemon.exchange(("set=1\n" + "\n".join(lines) + "\n\n").encode()) == b"errno=0\n\n"
    snapshot = parse_get(daemon.get().decode())
    assert snapshot.private_key == parsed.device.private_key
    [changes] = parsed.peers
    [peer] = [p for p in snapshot.peers if p.public_key == peer_b]
    assert peer.preshared_key is changes.preshared_key is None
    assert peer.endpoint == changes.endpoint == ("::ffff:198.51.100.6", 7)
    assert peer.allowed_ips == [str(a) for a in changes.allowed_ips] == ["10.0.0.0/8", "::ffff:0.0.0.0/100"]


def pywg_reply(data: bytes) -> bytes:
    """What a server built on RequestReader and parse_set answers to the first request in ``data``
    (set requests and framing errors only: a get answer depends on the device)."""
    try:
        request = next(iter(RequestReader().feed(data)))
        assert request.op == "set", "this helper answers set requests only"
        parse_set(request.pairs)
    except UapiError as exc:
        if exc.fatal and exc.errno == IPC_ERROR_PROTOCOL:
            return b""  # unknown operation: wireguard-go hangs up without a word
        return exc.response().encode()
    return format_errno(0).encode()


PEER = "public_key=" + "5b" * 32 + "\n"
MALFORMED = [
    # device section
    "listen_port=65536\n", "listen_port=+1\n", "listen_port=\n", "listen_port=0x10\n", "listen_port=-1\n",
    "fwmark=4294967296\n", "replace_peers=True\n", "replace_peers=false\n", "foo=bar\n", "=\n",
    "protocol_version=1\n", "endpoint=192.0.2.1:1\n", "allowed_ip=10.0.0.0/8\n",
    "private_key=abc\n", "private_key=" + "g" * 64 + "\n", "private_key=" + "a" * 66 + "\n",
    "public_key=" + "a" * 63 + "\n", "public_key=\n",
    # lines without '=' (and which error comes first)
    "nokey\n", "listen_port=x\nnokey\n", "nokey\nlisten_port=x\n",
    # peer section
    PEER + "listen_port=1\n", PEER + "replace_peers=true\n", PEER + "remove=yes\n", PEER + "update_only=1\n",
    PEER + "replace_allowed_ips=TRUE\n", PEER + "preshared_key=zz\n", PEER + "protocol_version=2\n",
    PEER + "bogus=1\n", PEER + "tx_bytes=1\n", PEER + "persistent_keepalive_interval=65536\n",
    PEER + "endpoint=localhost:51820\n", PEER + "endpoint=192.0.2.1\n", PEER + "endpoint=192.0.2.1:\n",
    PEER + "endpoint=[192.0.2.1]:5\n", PEER + "endpoint=::1:5\n", PEER + "endpoint=[::1:5\n",
    PEER + "endpoint=192.0.2.1:65536\n", PEER + "endpoint=01.2.3.4:5\n", PEER + "endpoint=1.2.3.4%lo:5\n",
    PEER + "allowed_ip=10.0.0.0\n", PEER + "allowed_ip=10.0.0.0/33\n", PEER + "allowed_ip=::/129\n",
    PEER + "allowed_ip=fe80::1%lo/64\n", PEER + "allowed_ip=host/8\n", PEER + "allowed_ip=10.0.0.0/8/8\n",
    PEER + "remove=true\nallowed_ip=10.0.0.0/99\n",
    # accepted by both
    "", "fwmark=7\r\n", "listen_port=00000\n", "private_key=" + "00" * 32 + "\n", PEER.upper().replace("PUBLIC_KEY", "public_key"),
    PEER + "endpoint=[fe80::1%lo]:5\n", PEER + "endpoint=[fe80::1%1]:5\n", PEER + "allowed_ip=10.0.0.1/24\n",
    PEER + "protocol_version=1\nremove=true\nendpoint=192.0.2.1:1\n", PEER + "update_only=true\n",
]


@pytest.mark.parametrize("body", MALFORMED, ids=lambda body: repr(body.split("\n")[-2] if body else body)[:50])
def test_set_errno_matches_wireguard_go(daemon: Daemon, body: str) -> None:
    data = ("set=1\n" + body + "\n").encode()
    assert pywg_reply(data) == daemon.exchange(data)


@pytest.mark.parametrize("data", [
    b"get=1\nX",  # trailing byte after get=1: -22
    b"hello\n",  # unknown operation: no reply, the connection is closed
    b"set=1\r\n\n",  # the operation line is compared whole
    b"set=1\nk=" + b"v" * (MAX_LINE_BYTES - 2) + b"\n\n",  # the longest line the scanner takes: bad key, -22
    b"set=1\nk=" + b"v" * (MAX_LINE_BYTES - 1) + b"\n\n",  # one byte more: -5
], ids=["get-trailing", "garbage", "crlf-op", "longest-line", "line-too-long"])
def test_framing_matches_wireguard_go(daemon: Daemon, data: bytes) -> None:
    assert pywg_reply(data) == daemon.exchange(data)


def test_a_fresh_daemon_and_an_emptied_one_format_the_same(daemon: Daemon) -> None:
    raw = daemon.get().decode()
    assert format_get(parse_get(raw)) == raw
    assert daemon.exchange(b"set=1\nlisten_port=0\nreplace_peers=true\n\n") == b"errno=0\n\n"
    raw = daemon.get().decode()
    snapshot = parse_get(raw)
    assert snapshot.peers == [] and snapshot.private_key is None
    assert format_get(snapshot) == raw
    assert format_get(DeviceSnapshot(listen_port=snapshot.listen_port)) == raw
