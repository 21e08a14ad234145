"""Health end to end, real processes in network namespaces: a coordinator and three pywg
agents (each with its pywg-daemon) on one bridge. After pings the coordinator shows each
connection's handshake and bytes; an agent killed with SIGKILL is offline within three of
its report intervals while its tunnels live on (its daemon still runs); once its daemon
is killed too, its peers report it disconnected; `pywg agent down` stops an agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from needs import unavailable
from test_agent_mesh import wait_for

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent
PREFIX = "h13h"  # every namespace, veth, bridge and interface of this test starts with it
BRIDGE = f"{PREFIX}br"
COORD_IP = "10.216.0.1"
PORT = 18216
AGENTS = (1, 2, 3)
INTERVAL = 1  # --health-interval: the coordinator's window for these agents is 3 s;
SILENCE = 10 + 5 + INTERVAL  # a probed peer that sent nothing for this long is disconnected


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=60).stdout


def ns(i: int) -> str:
    return f"{PREFIX}n{i}"


class Bed:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = f"sqlite:{tmp / 'coord.db'}"
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.coord: subprocess.Popen[bytes] | None = None
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        for i in (0, *AGENTS):
            veth = f"{PREFIX}v{i}"
            sh("ip", "netns", "add", ns(i))
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns(i))
            sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            sh("ip", "-n", ns(i), "addr", "add", f"10.216.0.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns(i), "link", "set", "eth0", "up")
            sh("ip", "-n", ns(i), "link", "set", "lo", "up")
        self.keyfile = tmp / "authkey"
        self.keyfile.write_text(self.pywg("coordinator", "authkey", "create", "--store", self.store,
                                          "--reusable").strip() + "\n")
        log = open(tmp / "coord.log", "ab")  # noqa: SIM115
        self.coord = subprocess.Popen(
            ["ip", "netns", "exec", ns(0), str(BIN / "pywg"), "coordinator", "serve", "--listen",
             f"{COORD_IP}:{PORT}", "--store", self.store, "--prefix4", "100.116.0.0/16", "--prefix6", "fd16:a::/48"],
            stdout=log, stderr=log, env=self.env)
        wait_for("the coordinator listening", lambda: "listening on" in (tmp / "coord.log").read_text(), 15)

    def pywg(self, *args: str, netns: str | None = None, check: bool = True) -> str:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        return subprocess.run([*prefix, str(BIN / "pywg"), *args], check=check, capture_output=True, text=True,
                              env=self.env, timeout=60).stdout

    def up(self, i: int) -> None:
        log = open(self.tmp / f"agent{i}.log", "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(
            ["ip", "netns", "exec", ns(i), str(BIN / "pywg"), "agent", "up", "--coordinator",
             f"http://{COORD_IP}:{PORT}", "--authkey-file", str(self.keyfile), "--interface", f"{PREFIX}w{i}",
             "--state-dir", str(self.state(i)), "--name", f"agent{i}", "--health-interval", str(INTERVAL)],
            stdout=log, stderr=log, env=self.env)

    def state(self, i: int) -> Path:
        return self.tmp / f"agent{i}"

    def status(self, i: int) -> dict[str, Any]:
        out = self.pywg("agent", "status", "--json", "--state-dir", str(self.state(i)), check=False)
        return json.loads(out) if out else {}

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in json.loads(self.pywg("coordinator", "nodes", "--json", "--store", self.store))}

    def daemon_pid(self, i: int) -> int:
        """The pywg-daemon serving agent i's interface (started by that agent, in its namespace)."""
        for pid in sh("ip", "netns", "pids", ns(i)).split():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(a.endswith(b"pywg-daemon") for a in argv) and f"{PREFIX}w{i}".encode() in argv:
                return int(pid)
        raise AssertionError(f"no pywg-daemon in {ns(i)}")

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
        for i in AGENTS:
            sh("ip", "-n", ns(i), "link", "del", f"{PREFIX}w{i}", check=False)  # its daemon exits with it
        for i in (0, *AGENTS):
            for pid in sh("ip", "netns", "pids", ns(i), check=False).split():  # what this test started there
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "link", "del", f"{PREFIX}v{i}", check=False)
            sh("ip", "netns", "del", ns(i), check=False)
        sh("ip", "link", "del", BRIDGE, check=False)


def ping(i: int, addr: str, count: int = 1) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns(i), "ping", "-n", "-q", "-c", str(count), "-i", "0.05",
                           "-W", "1", addr], check=False, capture_output=True).returncode == 0


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    for tool in ("ip", "ping"):
        if subprocess.run(["which", tool], check=False, capture_output=True).returncode != 0:
            unavailable(f"{tool} is needed")
    for i in (0, *AGENTS):  # a previous run that died before its cleanup
        subprocess.run(["ip", "netns", "del", ns(i)], check=False, capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], check=False, capture_output=True)
    b = Bed(tmp_path)
    try:
        yield b
    except BaseException:
        for f in sorted(tmp_path.glob("*.log")):
            print(f"--- {f.name}\n{f.read_text()[-3000:]}")
        raise
    finally:
        b.close()


def connections(b: Bed, name: str) -> dict[str, dict[str, Any]]:
    """What node ``name`` last reported, by the peer's name, as `coordinator nodes --json` shows it."""
    nodes = b.nodes()
    names = {n["id"]: n["name"] for n in nodes.values()}
    return {names[c["to"]]: c for c in nodes[name]["connections"]}


def test_health_reaches_the_coordinator_and_a_dead_node_goes_offline_then_disconnected(bed: Bed) -> None:
    for i in AGENTS:
        bed.up(i)
    addr = {i: wait_for(f"agent{i} registered", lambda i=i: bed.status(i).get("internalIp")) for i in AGENTS}
    for a in AGENTS:
        for b in AGENTS:
            if a != b:
                wait_for(f"agent{a} pings agent{b}", lambda a=a, b=b: ping(a, str(addr[b])))

    # Every node reports both peers connected, with a handshake, bytes both ways and the endpoint.
    def all_connected() -> bool:
        return all(set(c := connections(bed, f"agent{i}")) == {f"agent{j}" for j in AGENTS if j != i}
                   and all(x["status"] == "connected" and x["lastHandshake"] and x["rxBytes"] > 0
                           and x["txBytes"] > 0 for x in c.values()) for i in AGENTS)

    wait_for("every connection reported connected with its counters", all_connected, 15)
    nodes = bed.nodes()
    assert all(nodes[f"agent{i}"]["online"] and nodes[f"agent{i}"]["offlineAfter"] == 3 * INTERVAL for i in AGENTS)
    c12 = connections(bed, "agent1")["agent2"]
    assert c12["endpoint"] == "10.216.0.3:51820"
    # The counters are the tunnel's: 50 pings (84-byte packets) later agent1's report has grown by them.
    assert ping(1, str(addr[2]), count=50)
    grown = wait_for("agent1's report to count the pings", lambda: (
        (c := connections(bed, "agent1")["agent2"])["txBytes"] - c12["txBytes"] >= 50 * 84
        and c["rxBytes"] - c12["rxBytes"] >= 50 * 84 and c), 5)
    print(f"agent1 -> agent2 after 50 pings: tx {c12['txBytes']} -> {grown['txBytes']} B, "
          f"rx {c12['rxBytes']} -> {grown['rxBytes']} B")
    text = bed.pywg("agent", "status", "--state-dir", str(bed.state(1)))
    assert f"agent: running (pid {bed.procs[1].pid})" in text and "agent2 (" in text and "received" in text
    assert "latest handshake: never" not in text

    # agent3's agent dies (SIGKILL): its reports stop, the coordinator shows it offline.
    assert bed.status(3)["pid"] == bed.procs[3].pid
    bed.procs[3].send_signal(signal.SIGKILL)
    bed.procs[3].wait(10)
    killed = time.monotonic()
    wait_for("agent3 offline", lambda: not bed.nodes()["agent3"]["online"], 10)
    offline_after = time.monotonic() - killed
    print(f"agent3 offline {offline_after:.1f} s after SIGKILL (window {3 * INTERVAL} s, sweep 1 s)")
    assert offline_after <= 3 * INTERVAL + 3
    st3 = bed.status(3)
    assert (st3["running"], st3["pid"], st3["coordinatorConnected"]) == (False, None, False)
    # Its daemon still runs: the tunnels live, and its peers truthfully say so.
    assert ping(1, str(addr[3]), count=3)
    assert connections(bed, "agent1")["agent3"]["status"] == "connected"

    # Now the daemon dies too (the host is gone): its peers hear nothing and report it disconnected.
    os.kill(bed.daemon_pid(3), signal.SIGKILL)
    dead = time.monotonic()
    wait_for("agents 1 and 2 report agent3 disconnected", lambda: all(
        connections(bed, f"agent{i}")["agent3"]["status"] == "disconnected" for i in (1, 2)), SILENCE + 10)
    seen = time.monotonic() - dead
    print(f"agent3's peers report it disconnected {seen:.1f} s after its daemon died "
          f"(silence limit {SILENCE} s, report interval {INTERVAL} s)")
    assert seen <= SILENCE + 2 * INTERVAL + 3
    # The rest of the mesh is fine, both ways (each probes the other, so each hears the other).
    assert connections(bed, "agent1")["agent2"]["status"] == connections(bed, "agent2")["agent1"]["status"] == "connected"
    assert bed.nodes()["agent1"]["online"]

    # `pywg agent down` stops agent1 cleanly and removes its interface.
    t0 = time.monotonic()
    bed.pywg("agent", "down", "--state-dir", str(bed.state(1)), netns=ns(1))
    assert bed.procs[1].wait(5) == 0
    print(f"agent down took {time.monotonic() - t0:.2f} s")
    assert f"{PREFIX}w1" not in sh("ip", "-n", ns(1), "-o", "link", "show")
    assert not (bed.state(1) / "agent.pid").exists()
    assert bed.status(1)["running"] is False
    assert "not running (this status is stale" in bed.pywg("agent", "status", "--state-dir", str(bed.state(1)))
    wait_for("agent1 offline", lambda: not bed.nodes()["agent1"]["online"], 10)
