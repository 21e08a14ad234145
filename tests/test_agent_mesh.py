"""Agents in network namespaces form a mesh through a real coordinator, with real
WireGuard daemons (pywg's, and wireguard-go 2025 for one agent): no `wg` command."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent
PREFIX = "i13a"  # every namespace and link of this test starts with it
BRIDGE = f"{PREFIX}br"
COORD_IP = "10.213.0.1"
PORT = 18213
WGO = Path.home() / ".cache/pywg/peers/wireguard-go-0.0.20250522/bin/wireguard"


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = f"sqlite:{tmp / 'coord.db'}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.coord: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        for i in range(5):
            self.namespace(i)
        self.keyfile = tmp / "authkey"
        key = sh(str(BIN / "pywg"), "coordinator", "authkey", "create", "--store", self.store, "--reusable").strip()
        self.keyfile.write_text(key + "\n")
        self.start_coordinator()

    def namespace(self, i: int) -> None:
        ns, veth = f"{PREFIX}n{i}", f"{PREFIX}v{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"10.213.0.{i + 1}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def start_coordinator(self) -> None:
        log = open(self.tmp / "coord.log", "ab")  # noqa: SIM115
        self.coord = subprocess.Popen(
            ["ip", "netns", "exec", f"{PREFIX}n0", str(BIN / "pywg"), "coordinator", "serve",
             "--listen", f"{COORD_IP}:{PORT}", "--store", self.store, "--prefix4", "100.100.0.0/16",
             "--prefix6", "fd13:a::/48"], stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if subprocess.run(["ip", "netns", "exec", f"{PREFIX}n0", "bash", "-c",
                               f"exec 3<>/dev/tcp/{COORD_IP}/{PORT}"], check=False, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError((self.tmp / "coord.log").read_text())

    def kill_coordinator(self) -> None:
        assert self.coord is not None
        self.coord.send_signal(signal.SIGKILL)
        self.coord.wait(10)

    def up(self, i: int, *, daemon: str | None = None) -> None:
        state = self.tmp / f"agent{i}"
        cmd = [str(BIN / "pywg"), "agent", "up", "--coordinator", f"http://{COORD_IP}:{PORT}",
               "--authkey-file", str(self.keyfile), "--interface", f"{PREFIX}w{i}",
               "--state-dir", str(state), "--name", f"agent{i}", "--health-interval", "1"]
        if daemon:
            cmd += ["--daemon-command", daemon]
        log = open(self.tmp / f"agent{i}.log", "ab")  # noqa: SIM115
        self.procs[f"agent{i}"] = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}n{i}", *cmd],
                                                  stdout=log, stderr=log, env=self.env)

    def status(self, i: int) -> dict[str, object]:
        out = sh(str(BIN / "pywg"), "agent", "status", "--json", "--state-dir", str(self.tmp / f"agent{i}"),
                 check=False)
        return json.loads(out) if out else {}

    def close(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.coord and self.coord.poll() is None:
            self.coord.terminate()
            self.coord.wait(10)
        for i in range(5):
            sh("ip", "-n", f"{PREFIX}n{i}", "link", "del", f"{PREFIX}w{i}", check=False)
            sh("ip", "netns", "del", f"{PREFIX}n{i}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)


def wait_for(what: str, fn, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def ping(ns: int, addr: str, count: int = 1, wait: int = 1) -> bool:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}n{ns}", "ping", "-n", "-q", "-c", str(count),
                           "-W", str(wait), addr], check=False, capture_output=True).returncode == 0


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    for tool in ("ip", "ping", "bash"):
        if subprocess.run(["which", tool], check=False, capture_output=True).returncode != 0:
            pytest.fail(f"{tool} is needed")
    m = Mesh(tmp_path)
    try:
        yield m
    except BaseException:
        for f in sorted(tmp_path.glob("*.log")):
            print(f"--- {f.name}\n{f.read_text()[-3000:]}")
        raise
    finally:
        m.close()


def addresses(m: Mesh, i: int) -> tuple[str, str]:
    st = wait_for(f"agent{i} registered", lambda: m.status(i).get("internalIp") and m.status(i))
    return str(st["internalIp"]), str(st["internalIpv6"])


def peer_names(m: Mesh, i: int) -> set[str]:
    return {str(p.get("name")) for p in m.status(i).get("peers", [])}  # type: ignore[union-attr]


def test_mesh_forms_survives_the_coordinator_and_follows_removals(mesh: Mesh) -> None:
    if not WGO.exists():
        pytest.fail(f"wireguard-go 2025 is needed at {WGO} (python3 tests/peers/install.py)")
    started = time.monotonic()
    mesh.up(1)
    mesh.up(2)
    mesh.up(3, daemon=str(WGO))
    addr = {i: addresses(mesh, i) for i in (1, 2, 3)}
    for i in (1, 2, 3):
        wait_for(f"agent{i} has its two peers", lambda i=i: len(peer_names(mesh, i)) == 2)
    for a in (1, 2, 3):
        for b in (1, 2, 3):
            if a != b:
                wait_for(f"agent{a} pings agent{b} over IPv4", lambda a=a, b=b: ping(a, addr[b][0]))
                wait_for(f"agent{a} pings agent{b} over IPv6", lambda a=a, b=b: ping(a, addr[b][1]))
    print(f"three agents up to a full mesh of pings: {time.monotonic() - started:.2f} s")
    st = mesh.status(1)
    assert st["coordinatorConnected"] is True
    assert all(p["lastHandshake"] for p in st["peers"])  # type: ignore[index, union-attr]
    assert st["device"]["implementation"] == "pywg" and "backend" in st["device"]["crypto"]  # type: ignore[index]
    assert st["device"]["data_path"]  # type: ignore[index]
    assert mesh.status(3)["device"] == {"implementation": "other (UAPI only)"}
    assert "token" not in json.dumps(st) and "private" not in json.dumps(st).lower()
    assert oct((mesh.tmp / "agent1" / "node.json").stat().st_mode & 0o777) == "0o600"
    assert oct((mesh.tmp / "agent1").stat().st_mode & 0o777) == "0o700"

    # The coordinator dies: the tunnels keep carrying pings.
    mesh.kill_coordinator()
    wait_for("agent1 sees the coordinator gone", lambda: mesh.status(1).get("coordinatorConnected") is False)
    for b in (2, 3):
        assert ping(1, addr[b][0], count=5)
    # It comes back: the agents reconnect and a fourth agent is seen by all.
    mesh.start_coordinator()
    for i in (1, 2, 3):
        wait_for(f"agent{i} reconnected", lambda i=i: mesh.status(i).get("coordinatorConnected") is True)
    mesh.up(4)
    addr[4] = addresses(mesh, 4)
    for a in (1, 2, 3):
        wait_for(f"agent{a} pings agent4", lambda a=a: ping(a, addr[4][0]))

    # A node removed through the CLI leaves every other node's peers within seconds.
    node2 = str(mesh.status(2)["nodeId"])
    mesh.procs.pop("agent2").terminate()  # stop it first, or it would register again
    sh(str(BIN / "pywg"), "coordinator", "node", "remove", node2, "--store", mesh.store)
    t0 = time.monotonic()
    for a in (1, 3, 4):
        wait_for(f"agent{a} dropped agent2", lambda a=a: "agent2" not in peer_names(mesh, a), timeout=10)
    print(f"removal reached every agent in {time.monotonic() - t0:.2f} s")
    assert not ping(1, addr[2][0])


def test_time_from_agent_up_to_first_ping(mesh: Mesh) -> None:
    """Median over runs of: `agent up` on a fresh node -> first ping reply from a running peer."""
    mesh.up(1)
    a1 = addresses(mesh, 1)
    times = []
    for run, i in enumerate((2, 3, 4, 2, 3)):
        state = mesh.tmp / f"agent{i}"
        if f"agent{i}" in mesh.procs:
            node = str(mesh.status(i)["nodeId"])
            p = mesh.procs.pop(f"agent{i}")
            p.terminate()
            p.wait(10)
            sh("ip", "-n", f"{PREFIX}n{i}", "link", "del", f"{PREFIX}w{i}", check=False)
            sh(str(BIN / "pywg"), "coordinator", "node", "remove", node, "--store", mesh.store)
            subprocess.run(["rm", "-rf", str(state)], check=True)
        t0 = time.monotonic()
        mesh.up(i)
        wait_for(f"run {run}: agent{i} pings agent1", lambda i=i: ping(i, a1[0], wait=1), timeout=30)
        times.append(time.monotonic() - t0)
    print(f"agent up -> first ping reply: median {statistics.median(times):.2f} s, all {[round(t, 2) for t in times]}")
    assert statistics.median(times) < 10


def test_a_refused_token_makes_the_agent_register_again(mesh: Mesh) -> None:
    mesh.up(1)
    mesh.up(2)
    addresses(mesh, 1)
    old = str(addresses(mesh, 2) and mesh.status(2)["nodeId"])
    wait_for("agent1 has agent2", lambda: peer_names(mesh, 1) == {"agent2"})
    sh(str(BIN / "pywg"), "coordinator", "node", "remove", old, "--store", mesh.store)
    new = wait_for("agent2 registered again",
                   lambda: mesh.status(2).get("nodeId") not in (None, old) and mesh.status(2))
    wait_for("agent1 pings agent2 at its new address", lambda: ping(1, str(new["internalIp"])))
    assert peer_names(mesh, 1) == {"agent2"}
