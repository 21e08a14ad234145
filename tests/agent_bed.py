"""A mesh in network namespaces for health tests: a coordinator and pywg agents (each with
its pywg-daemon) on one bridge, every name, address and port from a :class:`Net`, so
that tests with different nets run side by side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from needs import unavailable
from test_agent_mesh import wait_for

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Net:
    prefix: str  # every namespace, veth, bridge and interface starts with it
    subnet: str  # "10.216.0": the bridge's /24, the coordinator at .1, agent i at .i+1
    port: int  # the coordinator's
    prefix4: str  # the mesh's
    prefix6: str
    agents: tuple[int, ...] = (1, 2, 3)
    interval: float = 1  # --health-interval


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=60).stdout


class Bed:
    def __init__(self, net: Net, tmp: Path) -> None:
        self.net = net
        self.tmp = tmp
        self.store = f"sqlite:{tmp / 'coord.db'}"
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.coord: subprocess.Popen[bytes] | None = None
        self.bridge = f"{net.prefix}br"
        self.coord_ip = f"{net.subnet}.1"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for i in (0, *net.agents):
            veth = f"{net.prefix}v{i}"
            sh("ip", "netns", "add", self.ns(i))
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns(i))
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            sh("ip", "-n", self.ns(i), "addr", "add", f"{net.subnet}.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", self.ns(i), "link", "set", "eth0", "up")
            sh("ip", "-n", self.ns(i), "link", "set", "lo", "up")
        self.keyfile = tmp / "authkey"
        self.keyfile.write_text(self.pywg("coordinator", "authkey", "create", "--store", self.store,
                                          "--reusable").strip() + "\n")
        log = open(tmp / "coord.log", "ab")  # noqa: SIM115
        self.coord = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(0), str(BIN / "pywg"), "coordinator", "serve", "--listen",
             f"{self.coord_ip}:{net.port}", "--store", self.store, "--prefix4", net.prefix4, "--prefix6", net.prefix6],
            stdout=log, stderr=log, env=self.env)
        wait_for("the coordinator listening", lambda: "listening on" in (tmp / "coord.log").read_text(), 15)

    def ns(self, i: int) -> str:
        return f"{self.net.prefix}n{i}"

    def pywg(self, *args: str, netns: str | None = None, check: bool = True) -> str:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        return subprocess.run([*prefix, str(BIN / "pywg"), *args], check=check, capture_output=True, text=True,
                              env=self.env, timeout=60).stdout

    def up(self, i: int) -> None:
        log = open(self.tmp / f"agent{i}.log", "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(i), str(BIN / "pywg"), "agent", "up", "--coordinator",
             f"http://{self.coord_ip}:{self.net.port}", "--authkey-file", str(self.keyfile), "--interface",
             f"{self.net.prefix}w{i}", "--state-dir", str(self.state(i)), "--name", f"agent{i}",
             "--health-interval", str(self.net.interval)],
            stdout=log, stderr=log, env=self.env)

    def state(self, i: int) -> Path:
        return self.tmp / f"agent{i}"

    def status(self, i: int) -> dict[str, Any]:
        out = self.pywg("agent", "status", "--json", "--state-dir", str(self.state(i)), check=False)
        return json.loads(out) if out else {}

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in json.loads(self.pywg("coordinator", "nodes", "--json", "--store", self.store))}

    def connections(self, name: str) -> dict[str, dict[str, Any]]:
        """What node ``name`` last reported, by the peer's name, as `coordinator nodes --json` shows it."""
        nodes = self.nodes()
        names = {n["id"]: n["name"] for n in nodes.values()}
        return {names[c["to"]]: c for c in nodes[name]["connections"]}

    def ping(self, i: int, addr: str, count: int = 1) -> bool:
        return subprocess.run(["ip", "netns", "exec", self.ns(i), "ping", "-n", "-q", "-c", str(count), "-i", "0.05",
                               "-W", "1", addr], check=False, capture_output=True).returncode == 0

    def daemon_pid(self, i: int) -> int:
        """The pywg-daemon serving agent i's interface (started by that agent, in its namespace)."""
        for pid in sh("ip", "netns", "pids", self.ns(i)).split():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(a.endswith(b"pywg-daemon") for a in argv) and f"{self.net.prefix}w{i}".encode() in argv:
                return int(pid)
        raise AssertionError(f"no pywg-daemon in {self.ns(i)}")

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.coord is not None and self.coord.poll() is None:
            self.coord.terminate()
            self.coord.wait(10)
        for i in self.net.agents:
            sh("ip", "-n", self.ns(i), "link", "del", f"{self.net.prefix}w{i}", check=False)  # its daemon exits with it
        for i in (0, *self.net.agents):
            for pid in sh("ip", "netns", "pids", self.ns(i), check=False).split():  # what this test started there
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "link", "del", f"{self.net.prefix}v{i}", check=False)
            sh("ip", "netns", "del", self.ns(i), check=False)
        sh("ip", "link", "del", self.bridge, check=False)


@contextmanager
def bed_of(net: Net, tmp: Path, tools: tuple[str, ...] = ("ip", "ping")) -> Iterator[Bed]:
    """The bed, cleaned up after the test (also a previous run's that died before its
    cleanup); the logs printed if the test fails."""
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    for tool in tools:
        if subprocess.run(["which", tool], check=False, capture_output=True).returncode != 0:
            unavailable(f"{tool} is needed")
    for i in (0, *net.agents):
        subprocess.run(["ip", "netns", "del", f"{net.prefix}n{i}"], check=False, capture_output=True)
    subprocess.run(["ip", "link", "del", f"{net.prefix}br"], check=False, capture_output=True)
    b = Bed(net, tmp)
    try:
        yield b
    except BaseException:
        for f in sorted(tmp.glob("*.log")):
            print(f"--- {f.name}\n{f.read_text()[-3000:]}")
        raise
    finally:
        b.close()
