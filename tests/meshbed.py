"""A mesh bed: a bridge, a coordinator process in namespace ``<prefix>n0`` and `pywg agent
up` processes in namespaces ``<prefix>n1..``, every name starting with the test's prefix
and every address in its subnet, so parallel tests never collide.

Agent ``i`` lives in ``<prefix>n<i>`` (address: the subnet's host ``i + 1``) with the
WireGuard interface ``<prefix>w<i>`` and its state in ``tmp/agent<i>``. Everything is
real: the coordinator and the agents are the installed ``pywg`` command, the interfaces
pywg daemons (or another UAPI daemon), driven only by the agents (no ``wg set``).
The coordinator may take more options (``coordinator_options``: TLS, ``--preshared-keys``)
and be restarted with others (:meth:`MeshBed.restart_coordinator`); the root namespace may
have an address on the bridge (``host_address``), e.g. to call the coordinator from the test.
Use :func:`mesh_bed` in a fixture: it dumps the logs when the test fails and cleans up
everything it made, also after failures.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from bridge_lan import BridgeLan
from needs import require_bed

from pywg.testing.netns import stop_process

BIN = Path(sys.executable).parent
PYWG = str(BIN / "pywg")
T = TypeVar("T")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def wait_for(what: str, fn: Callable[[], T], timeout: float = 20.0, interval: float = 0.1) -> T:
    """``fn()``'s first truthy value within ``timeout`` seconds; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def end(p: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Terminate ``p`` and wait for it; killed after ``grace`` seconds."""
    stop_process(p, grace)


def remove_leftovers(prefix: str) -> None:
    """Namespaces and the bridge of an earlier run that was killed before its cleanup."""
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{prefix}n"):
            sh("ip", "netns", "del", name, check=False)
    sh("ip", "link", "del", f"{prefix}br", check=False)


class MeshBed:
    """A coordinator and ``count`` agents' namespaces on one bridge (agents start with :meth:`up`)."""

    def __init__(self, tmp: Path, *, prefix: str, subnet: str, port: int, prefix4: str, prefix6: str,
                 count: int, coordinator_options: Sequence[str] = (), scheme: str = "http",
                 host_address: str | None = None) -> None:
        """``coordinator_options``: more options of ``pywg coordinator serve`` (``scheme``
        "https" when they make it serve TLS); ``host_address`` (CIDR): the root namespace's
        address on the bridge."""
        self.tmp = tmp
        self.prefix = prefix
        self.subnet = ipaddress.ip_network(subnet)
        self.port = port
        self.prefix4, self.prefix6 = prefix4, prefix6
        self.store = f"sqlite:{tmp / 'coord.db'}"
        self.coord_ip = str(self.host(0))
        self.url = f"{scheme}://{self.coord_ip}:{port}"
        self.coordinator_options = list(coordinator_options)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.coord: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.admin_token_file = tmp / "admin-token"
        self.keyfile = tmp / "authkey"
        self.indexes: list[int] = []  # the namespaces made so far
        remove_leftovers(prefix)
        self.lan = BridgeLan(prefix, host_address)
        try:
            for i in range(count + 1):
                self.add_namespace(i)
            key = sh(PYWG, "coordinator", "authkey", "create", "--store", self.store, "--reusable").strip()
            self.keyfile.write_text(key + "\n")
            self.start_coordinator()
        except BaseException:
            self.close()
            raise

    # --- places --------------------------------------------------------------------------

    def host(self, i: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """Namespace ``i``'s address on the bridge."""
        return self.subnet[i + 1]

    def ns(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    def ifname(self, i: int) -> str:
        return f"{self.prefix}w{i}"

    def veth(self, i: int) -> str:
        """The bridge's end of namespace ``i``'s link (``eth0`` inside)."""
        return f"{self.prefix}v{i}"

    @property
    def bridge(self) -> str:
        return self.lan.bridge

    def state(self, i: int) -> Path:
        return self.tmp / f"agent{i}"

    def add_namespace(self, i: int) -> str:
        """Namespace ``<prefix>n<i>`` on the bridge (for an agent that joins later)."""
        ns = self.lan.add(i, f"{self.host(i)}/{self.subnet.prefixlen}")
        self.indexes.append(i)
        return ns

    # --- the coordinator -------------------------------------------------------------------

    def start_coordinator(self) -> None:
        """``pywg coordinator serve`` in namespace 0; returns once it accepts connections."""
        log = open(self.tmp / "coord.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.coord = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(0), PYWG, "coordinator", "serve", "--listen",
             f"{self.coord_ip}:{self.port}", "--store", self.store, "--prefix4", self.prefix4,
             "--prefix6", self.prefix6, "--admin-token-file", str(self.admin_token_file),
             *self.coordinator_options],
            stdout=log, stderr=log, env=self.env)
        probe = ["ip", "netns", "exec", self.ns(0), "bash", "-c", f"exec 3<>/dev/tcp/{self.coord_ip}/{self.port}"]
        wait_for("the coordinator to listen",
                 lambda: self.coord is not None and self.coord.poll() is None
                 and subprocess.run(probe, check=False, capture_output=True).returncode == 0, timeout=15)

    def stop_coordinator(self) -> None:
        """SIGTERM to the coordinator; returns once it has exited."""
        assert self.coord is not None
        end(self.coord)

    def restart_coordinator(self, *options: str) -> None:
        """Stop the coordinator (if it still runs) and start it again with ``options``
        instead of the earlier ``coordinator_options`` (same store, listener and log)."""
        self.stop_coordinator()
        self.coordinator_options = list(options)
        self.start_coordinator()

    def kill_coordinator(self) -> None:
        assert self.coord is not None
        self.coord.send_signal(signal.SIGKILL)
        self.coord.wait(10)

    def remove_node(self, node_id: str) -> None:
        """``pywg coordinator node remove ID`` on the store."""
        sh(PYWG, "coordinator", "node", "remove", node_id, "--store", self.store)

    def node_list(self) -> list[dict[str, Any]]:
        """``pywg coordinator nodes --json`` on the store."""
        return list(json.loads(self.pywg("coordinator", "nodes", "--json", "--store", self.store)))

    def nodes(self) -> dict[str, dict[str, Any]]:
        """:meth:`node_list` by node name."""
        return {n["name"]: n for n in self.node_list()}

    def connections(self, name: str) -> dict[str, dict[str, Any]]:
        """What node ``name`` last reported, by the peer's name, as ``coordinator nodes --json`` shows it."""
        nodes = self.nodes()
        names = {n["id"]: n["name"] for n in nodes.values()}
        return {names[c["to"]]: c for c in nodes[name]["connections"]}

    def topology(self) -> dict[str, Any]:
        """``pywg coordinator topology --coordinator URL --json`` (admin token; run beside the coordinator)."""
        out = self.pywg("coordinator", "topology", "--coordinator", self.url, "--token-file",
                        str(self.admin_token_file), "--json", ns=0)
        return json.loads(out)  # type: ignore[no-any-return]

    # --- agents ----------------------------------------------------------------------------

    def pywg(self, *args: str, ns: int | None = None, check: bool = True) -> str:
        """The output of ``pywg ARGS`` (in namespace ``ns`` if given, else in the root one)."""
        where = ["ip", "netns", "exec", self.ns(ns)] if ns is not None else []
        return subprocess.run([*where, PYWG, *args], check=check, capture_output=True, text=True, env=self.env,
                              timeout=60).stdout

    def in_ns(self, i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``args`` run in namespace ``i``, output captured."""
        return subprocess.run(["ip", "netns", "exec", self.ns(i), *args], check=check, capture_output=True,
                              text=True, timeout=60)

    def up(self, i: int, *extra: str, daemon: str | None = None, health_interval: float = 1.0,
           auth: Sequence[str] | None = None) -> float:
        """``pywg agent up`` in namespace ``i`` (``extra``: more options; ``auth``: how it
        registers, the bed's pre-auth key by default); the monotonic time it was started."""
        auth = ["--authkey-file", str(self.keyfile)] if auth is None else list(auth)
        cmd = [PYWG, "agent", "up", "--coordinator", self.url, *auth,
               "--interface", self.ifname(i), "--state-dir", str(self.state(i)), "--name", f"agent{i}",
               "--health-interval", str(health_interval), *extra]
        if daemon:
            cmd += ["--daemon-command", daemon]
        log = open(self.tmp / f"agent{i}.log", "ab")  # noqa: SIM115 (the process keeps it)
        started = time.monotonic()
        self.procs[i] = subprocess.Popen(["ip", "netns", "exec", self.ns(i), *cmd], stdout=log, stderr=log,
                                         env=self.env)
        return started

    def stop(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Stop agent ``i`` with ``sig`` (its interface stays until :meth:`close` or
        ``del_interface``)."""
        p = self.procs.pop(i)
        if sig != signal.SIGTERM and p.poll() is None:
            p.send_signal(sig)
        end(p)

    def daemon_pid(self, i: int) -> int:
        """The pywg-daemon serving agent ``i``'s interface (started by that agent, in its namespace)."""
        for pid in sh("ip", "netns", "pids", self.ns(i)).split():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(a.endswith(b"pywg-daemon") for a in argv) and self.ifname(i).encode() in argv:
                return int(pid)
        raise AssertionError(f"no pywg-daemon in {self.ns(i)}")

    def del_interface(self, i: int) -> None:
        sh("ip", "-n", self.ns(i), "link", "del", self.ifname(i), check=False)

    def status(self, i: int) -> dict[str, Any]:
        """``pywg agent status`` of agent ``i`` ({} before its first status)."""
        out = sh(PYWG, "agent", "status", "--json", "--state-dir", str(self.state(i)), check=False)
        return json.loads(out) if out else {}

    def addresses(self, i: int, timeout: float = 20.0) -> tuple[str, str]:
        """Agent ``i``'s mesh IPv4 and IPv6 addresses, once it has registered."""
        st = wait_for(f"agent{i} registered", lambda: s if (s := self.status(i)).get("internalIp") else {}, timeout)
        return str(st["internalIp"]), str(st["internalIpv6"])

    def registered(self, i: int) -> tuple[str, str] | None:
        """Agent ``i``'s mesh addresses as soon as it has registered (from its node.json,
        written right after the registration; only the addresses are read), else None."""
        try:
            node = json.loads((self.state(i) / "node.json").read_text())
        except (OSError, ValueError):
            return None
        return str(node["internalIp"]), str(node["internalIpv6"])

    def node_id(self, i: int) -> str:
        return str(wait_for(f"agent{i}'s node id", lambda: self.status(i).get("nodeId")))

    def peer_names(self, i: int) -> set[str]:
        """The names of agent ``i``'s peers, as ``pywg agent status`` shows them."""
        return {str(p.get("name")) for p in self.status(i).get("peers", [])}

    def wg_peers(self, i: int) -> set[str]:
        """The public keys ``wg show IFNAME peers`` lists on agent ``i``'s interface (reading only)."""
        return set(sh("ip", "netns", "exec", self.ns(i), "wg", "show", self.ifname(i), "peers").split())

    def wg_key(self, i: int) -> str:
        """The public key ``wg show IFNAME public-key`` gives for agent ``i``'s interface."""
        return sh("ip", "netns", "exec", self.ns(i), "wg", "show", self.ifname(i), "public-key").strip()

    # --- traffic ---------------------------------------------------------------------------

    def ping(self, i: int, addr: str, count: int = 1, wait: int = 1, interval: float = 1.0) -> bool:
        """True when ``ping`` from namespace ``i`` to ``addr`` got its replies (``count`` of
        them, sent ``interval`` seconds apart)."""
        return self.in_ns(i, "ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}", "-W", str(wait), addr,
                          check=False).returncode == 0

    def first_replies(self, targets: Sequence[tuple[int, str]], *, timeout: float = 10.0,
                      interval: float = 0.01) -> dict[tuple[int, str], float | None]:
        """Ping every ``(namespace, address)`` of ``targets`` at once (every ``interval``
        seconds) until each has its first reply: the monotonic time of each first reply,
        None for one that got none within ``timeout``."""
        procs = {(i, addr): subprocess.Popen(
            ["ip", "netns", "exec", self.ns(i), "ping", "-n", "-q", "-c", "1", "-i", str(interval),
             "-w", str(int(timeout)), addr], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i, addr in targets}
        replies: dict[tuple[int, str], float | None] = {}
        while len(replies) < len(procs):
            for target, p in procs.items():
                if target not in replies and p.poll() is not None:
                    replies[target] = time.monotonic() if p.returncode == 0 else None
            time.sleep(0.002)
        return replies

    # --- the end ---------------------------------------------------------------------------

    def logs(self, tail: int = 4000) -> str:
        return "".join(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}\n"
                       for f in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        """Stop every process this bed started and remove every interface, namespace and the bridge."""
        for p in self.procs.values():
            p.terminate()  # all at once, then wait for each
        for p in (*self.procs.values(), *([self.coord] if self.coord is not None else [])):
            end(p)
        self.procs.clear()
        for i in self.indexes:
            self.del_interface(i)  # its daemon exits with it
        for i in self.indexes:
            for pid in sh("ip", "netns", "pids", self.ns(i), check=False).split():  # what is left of this bed's
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "link", "del", self.veth(i), check=False)  # at once: a namespace's teardown is deferred
        self.lan.close()


@contextlib.contextmanager
def mesh_bed(request: pytest.FixtureRequest, tmp: Path, **layout: Any) -> Iterator[MeshBed]:
    """A :class:`MeshBed` (keywords as its constructor's) for the test of ``request``: the
    machine must host namespaces (a missing tool fails under CI=true); the logs are printed
    when the test fails; everything is removed afterwards, also after a failure."""
    require_bed()
    failed_before = request.session.testsfailed
    bed = MeshBed(tmp, **layout)
    try:
        yield bed
    except BaseException:
        print(bed.logs())
        raise
    else:
        if request.session.testsfailed > failed_before:  # the test body failed (pytest raises nothing here)
            print(bed.logs())
    finally:
        bed.close()
