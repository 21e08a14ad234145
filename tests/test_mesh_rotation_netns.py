"""Mesh-wide key rotation with real processes: a coordinator and four agents (pywg's
daemon each) in five namespaces on one bridge. Every ordered pair pings at 50 per second
over IPv4 and IPv6 while `pywg agent rotate` runs and after it: zero lost; every peer shows
the new key (`wg show`). Then an agent restarted with --rotate-every rotates on its own,
again with zero lost; and a rotation that meets a dead coordinator (and an agent killed
with SIGKILL in the middle) is finished once the coordinator is back, with zero lost."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent
PREFIX = "h13r"  # every namespace and link of this test starts with it
BRIDGE = f"{PREFIX}br"
COORD_IP = "10.214.0.1"
PORT = 18214
AGENTS = (1, 2, 3, 4)
RATE = 50  # pings per second per ordered pair and family


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = f"sqlite:{tmp / 'coord.db'}"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.coord: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.cleanup()  # what a killed earlier run may have left
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        for i in (0, *AGENTS):
            ns, veth = f"{PREFIX}n{i}", f"{PREFIX}v{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"10.214.0.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.keyfile = tmp / "authkey"
        key = sh(str(BIN / "pywg"), "coordinator", "authkey", "create", "--store", self.store, "--reusable").strip()
        self.keyfile.write_text(key + "\n")
        self.start_coordinator()

    def start_coordinator(self) -> None:
        log = open(self.tmp / "coord.log", "ab")  # noqa: SIM115
        self.coord = subprocess.Popen(
            ["ip", "netns", "exec", f"{PREFIX}n0", str(BIN / "pywg"), "coordinator", "serve",
             "--listen", f"{COORD_IP}:{PORT}", "--store", self.store, "--prefix4", "100.114.0.0/16",
             "--prefix6", "fd14:a::/48"], stdout=log, stderr=log, env=self.env)
        wait_for("the coordinator listens", lambda: subprocess.run(
            ["ip", "netns", "exec", f"{PREFIX}n0", "bash", "-c", f"exec 3<>/dev/tcp/{COORD_IP}/{PORT}"],
            check=False, capture_output=True).returncode == 0, timeout=15)

    def kill_coordinator(self) -> None:
        assert self.coord is not None
        self.coord.send_signal(signal.SIGKILL)
        self.coord.wait(10)

    def state(self, i: int) -> Path:
        return self.tmp / f"agent{i}"

    def up(self, i: int, *extra: str) -> None:
        cmd = [str(BIN / "pywg"), "agent", "up", "--coordinator", f"http://{COORD_IP}:{PORT}",
               "--authkey-file", str(self.keyfile), "--interface", f"{PREFIX}w{i}",
               "--state-dir", str(self.state(i)), "--name", f"agent{i}", "--health-interval", "1", *extra]
        log = open(self.tmp / f"agent{i}.log", "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}n{i}", *cmd],
                                         stdout=log, stderr=log, env=self.env)

    def stop(self, i: int, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop(i)
        p.send_signal(sig)
        p.wait(10)

    def status(self, i: int) -> dict[str, object]:
        out = sh(str(BIN / "pywg"), "agent", "status", "--json", "--state-dir", str(self.state(i)), check=False)
        return json.loads(out) if out else {}

    def wg_peers(self, i: int) -> set[str]:
        return set(sh("ip", "netns", "exec", f"{PREFIX}n{i}", "wg", "show", f"{PREFIX}w{i}", "peers").split())

    def wg_key(self, i: int) -> str:
        return sh("ip", "netns", "exec", f"{PREFIX}n{i}", "wg", "show", f"{PREFIX}w{i}", "public-key").strip()

    def cleanup(self) -> None:
        for i in (0, *AGENTS):
            sh("ip", "-n", f"{PREFIX}n{i}", "link", "del", f"{PREFIX}w{i}", check=False)
            sh("ip", "netns", "del", f"{PREFIX}n{i}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)

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
        self.cleanup()


def event(what: str) -> None:
    print(f"{time.time():.2f} {what}")


def wait_for(what: str, fn, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def ping_once(ns: int, addr: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}n{ns}", "ping", "-n", "-q", "-c", "1", "-W", "1", addr],
                          check=False, capture_output=True).returncode == 0


class Pings:
    """Every ordered pair of agents, IPv4 and IPv6, ``RATE`` a second for ``seconds``."""

    def __init__(self, addr: dict[int, tuple[str, str]], seconds: float, logs: Path) -> None:
        count = str(int(seconds * RATE))
        self.procs: dict[tuple[int, int, str], subprocess.Popen[bytes]] = {}
        self.logs = logs  # one file each: a pipe nobody reads while they run would stall them
        for a in AGENTS:
            for b in AGENTS:
                if a == b:
                    continue
                for fam, target in zip(("v4", "v6"), addr[b], strict=True):
                    with open(logs / f"ping-{a}-{b}-{fam}.out", "w") as out:
                        self.procs[(a, b, fam)] = subprocess.Popen(
                            ["ip", "netns", "exec", f"{PREFIX}n{a}", "ping", "-n", "-D", "-c", count,
                             "-i", str(1 / RATE), "-W", "2", target], stdout=out, stderr=subprocess.STDOUT)

    def results(self, timeout: float) -> dict[tuple[int, int, str], tuple[int, int]]:
        """(transmitted, received) of each pair, once every ping has ended."""
        out = {}
        self.missing: dict[tuple[int, int, str], list[str]] = {}
        deadline = time.monotonic() + timeout
        for pair, p in self.procs.items():
            p.wait(max(0.1, deadline - time.monotonic()))
            text = (self.logs / "ping-{}-{}-{}.out".format(*pair)).read_text()
            m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
            assert m, f"{pair}: {text}"
            out[pair] = (int(m.group(1)), int(m.group(2)))
            replies = {int(seq): float(ts) for ts, seq in re.findall(r"\[(\d+\.\d+)\].*icmp_seq=(\d+) ", text)}
            gaps = [n for n in range(1, out[pair][0] + 1) if n not in replies]
            # Each lost packet, with the time of the reply before it (UNIX seconds).
            self.missing[pair] = [f"seq {n} after {max((t for q, t in replies.items() if q < n), default=0):.2f}"
                                  for n in gaps[:5]]
        return out

    def kill(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def assert_no_loss(pings: Pings, results: dict[tuple[int, int, str], tuple[int, int]], expected: int) -> None:
    lost = {pair: (sent - got, pings.missing[pair]) for pair, (sent, got) in results.items() if sent != got}
    assert not lost, f"lost packets per (from, to, family): {lost}"
    assert all(sent == expected for sent, _ in results.values()), results
    print(f"{len(results)} pings streams x {expected} packets: 0 lost")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    needs.require_bed()  # root, ip, wg, /dev/net/tun (fails under CI=true, never skips there)
    m = Mesh(tmp_path)
    try:
        yield m
    except BaseException:
        for f in sorted(tmp_path.glob("*.log")):
            print(f"--- {f.name}\n{f.read_text()[-4000:]}")
        raise
    finally:
        m.close()


def full_mesh(m: Mesh) -> dict[int, tuple[str, str]]:
    for i in AGENTS:
        m.up(i)
    addr = {}
    for i in AGENTS:
        st = wait_for(f"agent{i} registered", lambda i=i: m.status(i).get("internalIp") and m.status(i))
        addr[i] = (str(st["internalIp"]), str(st["internalIpv6"]))
    for a in AGENTS:
        for b in AGENTS:
            if a != b:
                for target in addr[b]:
                    wait_for(f"agent{a} pings {target}", lambda a=a, t=target: ping_once(a, t))
    return addr


def everyone_has(m: Mesh, i: int, key: str) -> bool:
    return all(key in m.wg_peers(j) for j in AGENTS if j != i)


def test_rotation_on_request_and_on_schedule_loses_no_packet(mesh: Mesh) -> None:
    addr = full_mesh(mesh)
    old = str(mesh.status(1)["publicKey"])
    assert mesh.wg_key(1) == old and everyone_has(mesh, 1, old)
    created_before = mesh.status(1)["keyCreatedAt"]

    # 1. `pywg agent rotate` while every pair pings at 50/s, and 9 s after.
    seconds = 12.0
    pings = Pings(addr, seconds, mesh.tmp)
    try:
        time.sleep(1.0)
        t0, rotated_at = time.monotonic(), time.time()
        out = subprocess.run([str(BIN / "pywg"), "agent", "rotate", "--state-dir", str(mesh.state(1)),
                              "--overlap", "3"], check=False, capture_output=True, text=True, timeout=60, env=mesh.env)
        took = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        new = out.stdout.strip()
        print(f"`pywg agent rotate`: the new key in use after {took:.2f} s")
        assert new != old and len(new) == 44
        assert mesh.wg_key(1) == new  # agent1's device initiates with the new key
        assert everyone_has(mesh, 1, new) and not any(old in mesh.wg_peers(j) for j in AGENTS if j != 1)
        results = pings.results(timeout=seconds + 20)
    finally:
        pings.kill()
    assert_no_loss(pings, results, int(seconds * RATE))
    st = mesh.status(1)
    assert st["publicKey"] == new and st["rotation"] is None  # the overlap ended (3 s)
    assert rotated_at < st["keyCreatedAt"] < rotated_at + took  # type: ignore[operator]
    assert st["keyCreatedAt"] > created_before  # type: ignore[operator]
    assert st["keyAgeSeconds"] == pytest.approx(time.time() - rotated_at, abs=2.0)
    assert sorted(os.listdir(mesh.state(1) / "keys")) == [".wireguard.meta", "wireguard"]
    assert not (mesh.state(1) / "rotation.json").exists()
    keys_log = (mesh.tmp / "agent1.log").read_text()
    private = (mesh.state(1) / "keys" / "wireguard").read_text().strip()
    assert private not in keys_log and private not in json.dumps(st)
    # The coordinator's topology has the new key for the same node.
    topo = json.loads(sh(str(BIN / "pywg"), "coordinator", "nodes", "--store", mesh.store, "--json"))
    assert new in json.dumps(topo) and old not in json.dumps(topo)

    # 2. agent2 restarted with a schedule; its key is older than the period: it rotates on its
    # own, while every pair pings (the restart itself loses nothing either).
    key2 = str(mesh.status(2)["publicKey"])
    seconds = 30.0
    pings = Pings(addr, seconds, mesh.tmp)
    try:
        time.sleep(1.0)
        mesh.stop(2)
        mesh.up(2, "--rotate-every", "20s")
        rotated = wait_for("agent2's scheduled rotation", lambda: (k := mesh.status(2).get("publicKey")) != key2 and k,
                           timeout=25)
        assert mesh.status(2)["rotateEvery"] == 20.0
        wait_for("every peer has agent2's new key", lambda: everyone_has(mesh, 2, str(rotated)), timeout=5)
        results = pings.results(timeout=seconds + 20)
    finally:
        pings.kill()
    assert_no_loss(pings, results, int(seconds * RATE))
    st2 = mesh.status(2)
    assert st2["nextRotationAt"] == pytest.approx(st2["keyCreatedAt"] + 20.0)  # type: ignore[operator]
    assert mesh.wg_key(2) == st2["publicKey"] and everyone_has(mesh, 2, str(st2["publicKey"]))


def test_a_rotation_outlives_a_dead_coordinator_and_a_killed_agent(mesh: Mesh) -> None:
    addr = full_mesh(mesh)

    def rotate(i: int, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "pywg"), "agent", "rotate", "--state-dir", str(mesh.state(i)), *extra],
                              check=False, capture_output=True, text=True, timeout=30, env=mesh.env)

    old = str(mesh.status(3)["publicKey"])
    seconds = 35.0
    pings = Pings(addr, seconds, mesh.tmp)
    try:
        time.sleep(1.0)
        mesh.kill_coordinator()
        out = rotate(3, "--timeout", "3")
        assert out.returncode == 2 and "did not finish within 3 s" in out.stderr, out.stderr
        journal = json.loads((mesh.state(3) / "rotation.json").read_text())
        assert journal["phase"] == "prepared" and journal["oldPublicKey"] == old
        assert "private" not in json.dumps(journal).lower()
        assert mesh.wg_key(3) == old  # still the old key: nothing was promoted
        # The agent dies in the middle (its device stays), and comes back.
        again = rotate(3)
        assert again.returncode == 2 and "in progress already (phase prepared)" in again.stderr, again.stderr
        event("agent3 killed")
        mesh.stop(3, signal.SIGKILL)
        time.sleep(1.0)
        mesh.up(3)
        event("agent3 started")
        time.sleep(2.0)
        assert mesh.status(3)["rotation"]["phase"] == "prepared"  # type: ignore[index]
        mesh.start_coordinator()
        event("coordinator started")
        new = journal["newPublicKey"]
        wait_for("the rotation finished", lambda: mesh.wg_key(3) == new, timeout=20)
        wait_for("every peer has the new key", lambda: everyone_has(mesh, 3, new), timeout=5)
        # Killed again during the overlap of a second rotation: back up, it ends the overlap.
        event("second rotation")
        second = rotate(3, "--overlap", "4")
        assert second.returncode == 0, second.stderr
        newer = second.stdout.strip()
        event("agent3 killed")
        mesh.stop(3, signal.SIGKILL)
        assert json.loads((mesh.state(3) / "rotation.json").read_text())["phase"] == "promoted"
        mesh.up(3)
        event("agent3 started")
        wait_for("the overlap ended after the restart", lambda: mesh.status(3).get("rotation", 0) is None
                 and not (mesh.state(3) / "rotation.json").exists(), timeout=20)
        assert mesh.wg_key(3) == newer and everyone_has(mesh, 3, newer)
        assert sorted(os.listdir(mesh.state(3) / "keys")) == [".wireguard.meta", "wireguard"]
        results = pings.results(timeout=seconds + 20)
    finally:
        pings.kill()
    assert_no_loss(pings, results, int(seconds * RATE))
    assert mesh.status(3)["publicKey"] == newer


def test_a_rotation_the_coordinator_refuses_is_undone(mesh: Mesh) -> None:
    """The node is removed while its rotation waits for the coordinator: the coordinator
    refuses the key (unknown token), the agent undoes the rotation (old key kept, new one
    deleted) and registers again, reachable by every peer."""
    full_mesh(mesh)
    st = mesh.status(4)
    old, node4 = str(st["publicKey"]), str(st["nodeId"])
    mesh.kill_coordinator()
    out = subprocess.run([str(BIN / "pywg"), "agent", "rotate", "--state-dir", str(mesh.state(4)), "--timeout", "2"],
                         check=False, capture_output=True, text=True, timeout=30, env=mesh.env)
    assert out.returncode == 2 and "did not finish" in out.stderr
    sh(str(BIN / "pywg"), "coordinator", "node", "remove", node4, "--store", mesh.store)
    mesh.start_coordinator()
    wait_for("the rotation undone", lambda: mesh.status(4).get("rotation", 0) is None, timeout=20)
    st = mesh.status(4)
    assert st["publicKey"] == old and mesh.wg_key(4) == old
    assert "refused the new key" in str(st["lastRotationError"]) or "removed" in str(st["lastRotationError"])
    assert sorted(os.listdir(mesh.state(4) / "keys")) == [".wireguard.meta", "wireguard"]
    assert not (mesh.state(4) / "rotation.json").exists()
    new_id = wait_for("agent4 registered again", lambda: (i := mesh.status(4).get("nodeId")) != node4 and i)
    assert new_id
    ip4 = str(wait_for("agent4's new address", lambda: mesh.status(4).get("internalIp")))
    for a in (1, 2, 3):
        wait_for(f"agent{a} pings agent4 again", lambda a=a: ping_once(a, ip4))
        assert old in mesh.wg_peers(a)


def test_rotate_without_an_agent_says_so(tmp_path: Path) -> None:
    out = subprocess.run([str(BIN / "pywg"), "agent", "rotate", "--state-dir", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "no agent runs from" in out.stderr and out.stdout == ""
