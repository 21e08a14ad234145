"""A test bed of two network namespaces joined by a veth pair (root, Linux).

Used by the interop tests, the demo and the benchmarks alike. Names carry the process
id, so several beds can coexist; ``close()`` removes everything it created, processes
included. Each side runs one userspace implementation (IMPLEMENTATIONS: pywg, Debian's
wireguard-go 0.0.20220316, wireguard-go 0.0.20250522, boringtun), configured with the
stock ``wg``. The pinned peers are built by ``make peers`` (tests/peers/install.py) into
``~/.cache/pywg/peers/NAME-VERSION`` (or ``$PYWG_PEERS_DIR``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from pywg.device.netns import entered

REQUIRED_TOOLS = ("ip", "wg", "wireguard-go", "ping")
UAPI_DIR = Path("/var/run/wireguard")
PEERS_DIR = Path(os.environ.get("PYWG_PEERS_DIR") or Path.home() / ".cache" / "pywg" / "peers")


@dataclass(frozen=True)
class Implementation:
    """A userspace WireGuard the bed can start: ``argv + [IFNAME]`` serves IFNAME's UAPI socket
    in the foreground. ``binary`` is a name on PATH or a path in PEERS_DIR."""

    name: str
    binary: str
    args: tuple[str, ...] = ()
    version: str = ""

    def path(self) -> str | None:
        """Where the binary is, or None when it is not installed."""
        if os.sep in self.binary:
            return self.binary if os.access(self.binary, os.X_OK) else None
        return shutil.which(self.binary)


def _peer(dirname: str, binary: str) -> str:
    return str(PEERS_DIR / dirname / "bin" / binary)


# The names tests, the demo and the benchmarks use. "wireguard-go" is Debian's package (on PATH).
IMPLEMENTATIONS = {
    "pywg": Implementation("pywg", sys.executable, ("-m", "pywg.cli", "daemon", "-f")),
    "wireguard-go": Implementation("wireguard-go", "wireguard-go", ("-f",), "0.0.20220316"),
    "wireguard-go-2025": Implementation("wireguard-go-2025", _peer("wireguard-go-0.0.20250522", "wireguard"),
                                        ("-f",), "0.0.20250522"),
    # boringtun drops to $USER's uid after creating the TUN unless told not to: as root here
    # that changes nothing, but say so; its log goes to stdout in the foreground.
    "boringtun": Implementation("boringtun", _peer("boringtun-cli-0.7.1", "boringtun-cli"),
                                ("--disable-drop-privileges", "-f"), "0.7.1"),
}
# The real peers pywg is measured and interop-tested against.
PEER_IMPLEMENTATIONS = ("wireguard-go-2025", "boringtun", "wireguard-go")


class BedUnavailable(RuntimeError):
    """The machine cannot host the bed (not root, a tool missing, no /dev/net/tun)."""


def stop_process(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate ``process`` if it still runs and wait for it; killed after ``grace`` s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def delete_namespaces(names: Sequence[str]) -> None:
    """Delete the named network namespaces, killing what still runs in them first (a
    process left inside would keep a deleted namespace, and its links, alive)."""
    for ns in names:
        if os.path.exists(f"/var/run/netns/{ns}"):
            for pid in run("ip", "netns", "pids", ns, check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            run("ip", "netns", "del", ns, check=False)


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


def check_implementation(impl: str) -> str:
    """The path of ``impl``'s binary; BedUnavailable naming it when it is not installed."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {impl!r} (known: {', '.join(IMPLEMENTATIONS)})")
    implementation = IMPLEMENTATIONS[impl]
    path = implementation.path()
    if path is None:
        how = "make debs installs it" if impl == "wireguard-go" else "make peers builds it"
        raise BedUnavailable(f"{impl} {implementation.version}: no {implementation.binary} ({how})")
    return path


def run(*args: str, ns: str | None = None, input: bytes | None = None, check: bool = True,
        timeout: float = 30.0) -> str:
    """Run a command (in namespace ``ns``); raise with its stderr when it fails."""
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace")


@dataclass
class Daemon:
    """A userspace WireGuard process (one of IMPLEMENTATIONS) serving one interface."""

    impl: str
    ns: str
    ifname: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def uapi_socket(self) -> Path:
        return UAPI_DIR / f"{self.ifname}.sock"

    def wg(self, *args: str, input: bytes | None = None) -> str:
        return run("wg", *args, ns=self.ns, input=input)

    def peers(self) -> dict[str, dict[str, str]]:
        """``wg show IF dump``, peer lines, by public key."""
        fields = ("preshared_key", "endpoint", "allowed_ips", "latest_handshake", "rx_bytes", "tx_bytes",
                  "persistent_keepalive")
        lines = self.wg("show", self.ifname, "dump").splitlines()[1:]
        return {line.split("\t")[0]: dict(zip(fields, line.split("\t")[1:], strict=True)) for line in lines}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process)
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
    outer6_a: str = "fd01::1"
    outer6_b: str = "fd01::2"
    processes: list[Daemon] = field(default_factory=list)
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
            self.veth_a, self.veth_b = veth_a, veth_b
            for ns, dev, addr, addr6 in ((self.ns_a, veth_a, self.outer_a, self.outer6_a),
                                         (self.ns_b, veth_b, self.outer_b, self.outer6_b)):
                run("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns)
                run("ip", "-6", "addr", "add", f"{addr6}/64", "dev", dev, "nodad", ns=ns)
                run("ip", "link", "set", dev, "up", ns=ns)
        except BaseException:
            self.close()
            raise

    def close_namespaces(self) -> None:
        delete_namespaces((self.ns_a, self.ns_b))

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

    def start_daemon(self, ns: str, ifname: str, impl: str = "pywg",
                     log_level: str = "debug", env: dict[str, str] | None = None) -> Daemon:
        """Start implementation ``impl`` (``pywg daemon -f IFNAME``, ``wireguard-go -f IFNAME``,
        ...) in ``ns``; return once its UAPI socket exists."""
        argv = [check_implementation(impl), *IMPLEMENTATIONS[impl].args, ifname]
        if impl == "boringtun" and log_level in ("error", "info", "debug"):
            argv[1:1] = ["--verbosity", log_level]
        log_path = self.workdir / f"{ifname}.log"
        environment = dict(os.environ, LOG_LEVEL=log_level, **(env or {}))
        with open(log_path, "ab") as log:
            process = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                       stdout=log, stderr=subprocess.STDOUT, env=environment)
        daemon = Daemon(impl, ns, ifname, process, log_path)
        self.processes.append(daemon)
        deadline = time.monotonic() + 15
        while not daemon.uapi_socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{impl} did not start: {daemon.log()}")
            time.sleep(0.02)
        return daemon

    def start_interface(self, ns: str, ifname: str, *, impl: str = "pywg", addresses: Sequence[str],
                        private_key: str, listen_port: int, env: dict[str, str] | None = None,
                        log_level: str = "debug") -> Daemon:
        """A daemon with its key and port set by ``wg``, its addresses added and the link up."""
        daemon = self.start_daemon(ns, ifname, impl, log_level=log_level, env=env)
        key_file = self.secret_file(f"{ifname}.key", private_key)
        daemon.wg("set", ifname, "private-key", str(key_file), "listen-port", str(listen_port))
        for address in addresses:
            run("ip", "addr", "add", address, "dev", ifname, *(["nodad"] if ":" in address else []), ns=ns)
        run("ip", "link", "set", ifname, "up", ns=ns)
        return daemon

    def start_wireguard_go(self, ns: str, ifname: str, *, address: str, private_key: str,
                           listen_port: int) -> Daemon:
        return self.start_interface(ns, ifname, impl="wireguard-go", addresses=[address],
                                    private_key=private_key, listen_port=listen_port)

    def set_wg_peer(self, wgo: Daemon, public_key: str, *, allowed_ips: str,
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
