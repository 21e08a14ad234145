"""Two ``pywg coordinator serve`` replicas on one PostgreSQL database (Debian's server, a
private data directory and port), agents in network namespaces with both URLs: SIGKILL
the replica agents are attached to and they move to the other; a change made through
one replica reaches the agents attached to the other; a new agent whose first URL is
the dead replica registers through the other; the tunnels carry pings all along."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge_lan import BridgeLan
from postgres_server import PostgresServer, postgres_server

from pywg.manage.key import Key

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent
PREFIX = "scr"  # every namespace and link of this test starts with it
HOST_IP = "10.215.0.254"  # the replicas listen here, on the bridge in the root namespace
PORTS = (18315, 18316)
AGENTS = (1, 2, 3, 4)  # agent4 starts while replica 0, first in its list, is dead


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def wait_for(what: str, fn, timeout: float = 20.0, step: float = 0.02):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


class Replicas:
    def __init__(self, tmp: Path, pg: PostgresServer) -> None:
        self.tmp = tmp
        self.store = pg.database()
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.coords: dict[int, subprocess.Popen[bytes]] = {}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.starts = 0
        self.lan = BridgeLan(PREFIX, f"{HOST_IP}/24")
        for i in AGENTS:
            self.lan.add(i, f"10.215.0.{i}/24")
        self.keyfile = tmp / "authkey"
        key = sh(str(BIN / "pywg"), "coordinator", "authkey", "create", "--store", self.store, "--reusable").strip()
        self.keyfile.write_text(key + "\n")
        self.authkey = key
        for r in (0, 1):
            self.start_replica(r)

    def url(self, r: int) -> str:
        return f"http://{HOST_IP}:{PORTS[r]}"

    def start_replica(self, r: int) -> None:
        self.starts += 1
        path = self.tmp / f"replica{r}.start{self.starts}.log"  # a new file per start
        log = open(path, "ab")  # noqa: SIM115
        self.coords[r] = subprocess.Popen(
            [str(BIN / "pywg"), "coordinator", "serve", "--listen", f"{HOST_IP}:{PORTS[r]}", "--store", self.store,
             "--prefix4", "100.115.0.0/16", "--prefix6", "fd13:5c::/48"], stdout=log, stderr=log, env=self.env)
        wait_for(f"replica {r} listening", lambda: b"listening on" in path.read_bytes(),
                 timeout=20)

    def up(self, i: int, first: int) -> None:
        urls = f"{self.url(first)},{self.url(1 - first)}"
        cmd = [str(BIN / "pywg"), "agent", "up", "--coordinator", urls, "--authkey-file", str(self.keyfile),
               "--interface", f"{PREFIX}w{i}", "--state-dir", str(self.tmp / f"agent{i}"), "--name", f"agent{i}",
               "--health-interval", "1"]
        log = open(self.tmp / f"agent{i}.log", "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}n{i}", *cmd], stdout=log, stderr=log,
                                         env=self.env)

    def status(self, i: int) -> dict[str, Any]:
        try:
            return json.loads((self.tmp / f"agent{i}" / "status.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {}

    def peer_names(self, i: int) -> set[str]:
        return {str(p.get("name")) for p in self.status(i).get("peers", [])}

    def attached(self, i: int) -> str | None:
        st = self.status(i)
        return st.get("coordinator") if st.get("coordinatorConnected") else None

    def call(self, r: int, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        req = urllib.request.Request(self.url(r) + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        for p in [*self.procs.values(), *self.coords.values()]:
            if p.poll() is None:
                p.terminate()
        for p in [*self.procs.values(), *self.coords.values()]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for i in AGENTS:
            sh("ip", "-n", f"{PREFIX}n{i}", "link", "del", f"{PREFIX}w{i}", check=False)
        self.lan.close()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    """Needs ip, ping, and tests.needs' PostgreSQL; on a failure the logs are printed."""
    missing = [t for t in ("ip", "ping") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} needed")
    with postgres_server() as pg:
        m = Replicas(tmp_path, pg)
        ok = False
        try:
            yield m
            ok = True
        finally:
            m.close()
            logs = [] if ok else sorted(tmp_path.glob("*.log"))
            print("".join(f"--- {f.name}\n{f.read_text()[-3000:]}\n" for f in logs))


def ping(ns: int, addr: str, count: int = 1) -> bool:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}n{ns}", "ping", "-n", "-q", "-c", str(count), "-W", "1",
                           addr], check=False, capture_output=True).returncode == 0


def arrival(m: Replicas, agents: tuple[int, ...], test) -> float:  # type: ignore[no-untyped-def]
    """Seconds from now until ``test(i)`` holds for every agent."""
    t0 = time.monotonic()
    for i in agents:
        wait_for(f"agent{i}", lambda i=i: test(i), timeout=10, step=0.01)
    return time.monotonic() - t0


def test_agents_fail_over_between_replicas_and_changes_cross_replicas(replicas: Replicas) -> None:
    m = replicas
    m.up(1, first=0)
    m.up(2, first=0)
    m.up(3, first=1)
    first = (1, 2, 3)
    for i in first:
        wait_for(f"agent{i} has its two peers", lambda i=i: len(m.peer_names(i)) == 2, timeout=30)
    assert m.attached(1) == m.url(0) and m.attached(2) == m.url(0) and m.attached(3) == m.url(1)
    addr = {i: str(m.status(i)["internalIp"]) for i in first}
    for a in first:
        for b in first:
            if a != b:
                wait_for(f"agent{a} pings agent{b}", lambda a=a, b=b: ping(a, addr[b]))

    # A new node registered through replica 0 reaches agent3 (on replica 1) within 1 s; so
    # does its removal through replica 0.
    extra = m.call(0, "POST", "/api/v1/register",
                   {"authKey": m.authkey, "name": "extra", "publicKey": Key.generate_private().public_key().to_base64()})
    joined = arrival(m, (3,), lambda i: "extra" in m.peer_names(i))
    m.call(0, "DELETE", f"/api/v1/nodes/{extra['id']}", token=extra["token"])
    left = arrival(m, (3,), lambda i: "extra" not in m.peer_names(i))
    print(f"through replica 0 to an agent on replica 1: a new node in {joined * 1000:.0f} ms, "
          f"its removal in {left * 1000:.0f} ms")
    assert joined < 1.0 and left < 1.0

    # Pings between agent1 (on replica 0) and agent3 for the whole failover.
    pinger = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}n1", "ping", "-n", "-q", "-i", "0.05", "-w", "8",
                               addr[3]], stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    m.coords[0].send_signal(signal.SIGKILL)
    m.coords[0].wait(10)
    moved = arrival(m, (1, 2), lambda i: m.attached(i) == m.url(1))
    print(f"replica 0 killed: agents 1 and 2 attached to replica 1 after {moved:.2f} s")
    assert moved < 5.0

    # A new agent whose first URL is the dead replica registers through the other one.
    m.up(4, first=0)
    wait_for("agent4 attached to replica 1", lambda: m.attached(4) == m.url(1))
    addr[4] = str(m.status(4)["internalIp"])
    for a in first:
        wait_for(f"agent{a} pings agent4", lambda a=a: ping(a, addr[4]))

    # The other way: a node registered through replica 1 reaches agent1, now on replica 1 too;
    # and a restarted replica 0 serves changes that reach the agents on replica 1.
    m.start_replica(0)
    extra = m.call(0, "POST", "/api/v1/register",
                   {"authKey": m.authkey, "name": "extra2", "publicKey": Key.generate_private().public_key().to_base64()})
    joined = arrival(m, AGENTS, lambda i: "extra2" in m.peer_names(i))
    print(f"through the restarted replica 0 to every agent on replica 1: {joined * 1000:.0f} ms")
    assert joined < 1.0
    out, _ = pinger.communicate(timeout=20)
    summary = next(line for line in out.splitlines() if "transmitted" in line)
    print(f"agent1 -> agent3 during the failover: {summary}")
    sent, received = (int(summary.split()[k]) for k in (0, 3))
    assert sent > 100 and received == sent, summary
    for a in AGENTS:
        for b in AGENTS:
            if a != b:
                assert ping(a, addr[b], count=3)
