"""A test bed of two network namespaces joined by a veth pair (root, Linux).

Used by the interop tests, the demo and the benchmarks alike. Names carry the process
id, so several beds can coexist; ``close()`` removes everything it created, processes
included. ``wireguard-go`` runs in a namespace and is configured with the stock ``wg``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

REQUIRED_TOOLS = ("ip", "wg", "wireguard-go", "ping")
UAPI_DIR = Path("/var/run/wireguard")
CLONE_NEWNET = 0x40000000


class BedUnavailable(RuntimeError):
    """The machine cannot host the bed (not root, a tool missing, no /dev/net/tun)."""


def check_bed(tools: Sequence[str] = REQUIRED_TOOLS) -> None:
    """Raise BedUnavailable naming everything that is missing."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        problems.append("missing tools: " + ", ".join(missing) + " (make debs installs them)")
    if not os.path.exists("/dev/net/tun"):
        problems.append("no /dev/net/tun")
    if problems:
        raise BedUnavailable("; ".join(problems))


def run(*args: str, ns: str | None = None, input: bytes | None = None, check: bool = True,
        timeout: float = 30.0) -> str:
    """Run a command (in namespace ``ns``); raise with its stderr when it fails."""
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace")


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the block with this thread inside namespace ``ns`` (sockets made there stay there)."""
    with open("/proc/thread-self/ns/net", "rb") as here, open(f"/var/run/netns/{ns}", "rb") as there:
        _setns(there.fileno())
        try:
            yield
        finally:
            _setns(here.fileno())


@dataclass
class WireGuardGo:
    """A wireguard-go process serving one interface in a namespace."""

    ns: str
    ifname: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def uapi_socket(self) -> Path:
        return UAPI_DIR / f"{self.ifname}.sock"

    def wg(self, *args: str, input: bytes | None = None) -> str:
        return run("wg", *args, ns=self.ns, input=input)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.uapi_socket.unlink()


@dataclass
class Bed:
    """Namespaces A and B, veth ``10.201.0.1/24`` (A) -- ``10.201.0.2/24`` (B)."""

    tag: str = field(default_factory=lambda: str(os.getpid()))
    outer_a: str = "10.201.0.1"
    outer_b: str = "10.201.0.2"
    ns_a: str = field(init=False)
    ns_b: str = field(init=False)
    processes: list[WireGuardGo] = field(default_factory=list)
    workdir: Path = field(init=False)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.ns_a, self.ns_b = f"pwg{self.tag}a", f"pwg{self.tag}b"
        self.workdir = Path(tempfile.mkdtemp(prefix="pywg-bed-"))
        os.chmod(self.workdir, 0o700)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        check_bed()
        self.close_namespaces()
        veth_a, veth_b = f"pv{self.tag}a"[:15], f"pv{self.tag}b"[:15]
        try:
            for ns in (self.ns_a, self.ns_b):
                run("ip", "netns", "add", ns)
                run("ip", "link", "set", "lo", "up", ns=ns)
            run("ip", "link", "add", veth_a, "netns", self.ns_a, "type", "veth",
                "peer", "name", veth_b, "netns", self.ns_b)
            for ns, dev, addr in ((self.ns_a, veth_a, self.outer_a), (self.ns_b, veth_b, self.outer_b)):
                run("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns)
                run("ip", "link", "set", dev, "up", ns=ns)
        except BaseException:
            self.close()
            raise

    def close_namespaces(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            if os.path.exists(f"/var/run/netns/{ns}"):
                for pid in run("ip", "netns", "pids", ns, check=False).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
                run("ip", "netns", "del", ns, check=False)

    def close(self) -> None:
        for proc in self.processes:
            proc.stop()
        self.processes.clear()
        self.close_namespaces()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def unique_ifname(self, stem: str = "wg") -> str:
        self._counter += 1
        return f"{stem}{self.tag}{self._counter}"[-15:]

    def udp_socket(self, ns: str, address: str, port: int = 0) -> socket.socket:
        """A non-blocking UDP socket bound inside namespace ``ns``."""
        with entered(ns):
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.setblocking(False)
        return sock

    def secret_file(self, name: str, text: str) -> Path:
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        return path

    def start_wireguard_go(self, ns: str, ifname: str, *, address: str, private_key: str,
                           listen_port: int, log_level: str = "debug") -> WireGuardGo:
        """Start ``wireguard-go -f IFNAME`` in ``ns``; set its key, port and tunnel address."""
        log_path = self.workdir / f"{ifname}.log"
        env = dict(os.environ, LOG_LEVEL=log_level)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", ifname],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
        wgo = WireGuardGo(ns, ifname, process, log_path)
        self.processes.append(wgo)
        deadline = time.monotonic() + 10
        while not wgo.uapi_socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go did not start: {wgo.log()}")
            time.sleep(0.02)
        key_file = self.secret_file(f"{ifname}.key", private_key)
        wgo.wg("set", ifname, "private-key", str(key_file), "listen-port", str(listen_port))
        run("ip", "addr", "add", address, "dev", ifname, ns=ns)
        run("ip", "link", "set", ifname, "up", ns=ns)
        return wgo

    def set_wg_peer(self, wgo: WireGuardGo, public_key: str, *, allowed_ips: str,
                    endpoint: str | None = None, preshared_key: str | None = None,
                    persistent_keepalive: int | None = None) -> None:
        args = ["set", wgo.ifname, "peer", public_key, "allowed-ips", allowed_ips]
        if endpoint:
            args += ["endpoint", endpoint]
        if preshared_key:
            args += ["preshared-key", str(self.secret_file(f"{wgo.ifname}.psk", preshared_key))]
        if persistent_keepalive is not None:
            args += ["persistent-keepalive", str(persistent_keepalive)]
        wgo.wg(*args)


def ping(ns: str, address: str, *, count: int = 1, wait: float = 10.0, interval: float = 0.2) -> str:
    """``ping`` from namespace ``ns``; raises if no reply came back."""
    return run("ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait), address, ns=ns,
               timeout=wait * count + 10)
