"""`make demo`, part 4: a mesh with no `wg` command. A coordinator and three agents in four
network namespaces on one bridge (one agent drives wireguard-go 2025 when it is installed),
every pair pinging; the coordinator killed and restarted; a node removed. Each step is
printed as it happens, with the commands a user would type."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pywg.mesh.agent_status import handshake_age
from pywg.testing.netns import IMPLEMENTATIONS, run

T = TypeVar("T")
PREFIX = "pwdm"  # every namespace, link and interface of the demo starts with it
SUBNET = "10.214.0"
COORD = f"{SUBNET}.1"
PORT = 18214
AGENTS = (1, 2, 3)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def indent(text: str) -> str:
    return "  " + text.strip().replace("\n", "\n  ")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _registered(demo: MeshDemo, i: int) -> dict[str, Any] | None:
    status = demo.status(i)
    return status if status.get("internalIp") else None


def _connected(demo: MeshDemo, i: int) -> bool:
    return demo.status(i).get("coordinatorConnected") is True


def _without(demo: MeshDemo, i: int, name: str) -> bool:
    return name not in {p.get("name") for p in demo.status(i).get("peers", [])}


class MeshDemo:
    """The namespaces, the coordinator and the agents; ``close`` removes every trace."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.bin = Path(sys.executable).parent
        self.store = f"sqlite:{work / 'coordinator.db'}"
        self.env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"}
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.agents: dict[int, subprocess.Popen[bytes]] = {}

    def ns(self, i: int) -> str:
        return f"{PREFIX}n{i}"

    def pywg(self, *args: str, ns: str | None = None) -> str:
        where = ["ip", "netns", "exec", ns] if ns else []
        done = subprocess.run([*where, str(self.bin / "pywg"), *args], capture_output=True, text=True, env=self.env,
                              check=False)
        if done.returncode:
            raise RuntimeError(f"pywg {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def open(self) -> None:
        self.close()  # what an interrupted earlier run left behind
        run("ip", "link", "add", f"{PREFIX}br", "type", "bridge")
        run("ip", "link", "set", f"{PREFIX}br", "up")
        for i in (0, *AGENTS):
            ns, veth = self.ns(i), f"{PREFIX}v{i}"
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", veth, "master", f"{PREFIX}br", "up")
            run("ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0", ns=ns)
            run("ip", "link", "set", "eth0", "up", ns=ns)
            run("ip", "link", "set", "lo", "up", ns=ns)

    def start_coordinator(self) -> None:
        log = open(self.work / "coordinator.log", "ab")  # noqa: SIM115 (the process owns it)
        self.coordinator = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(0), str(self.bin / "pywg"), "coordinator", "serve",
             "--listen", f"{COORD}:{PORT}", "--store", self.store, "--prefix4", "100.100.0.0/16",
             "--prefix6", "fd14:d::/48", "--admin-token-file", str(self.work / "admin.token")],
            stdout=log, stderr=log, env=self.env)
        wait_for("the coordinator to listen", lambda: subprocess.run(
            ["ip", "netns", "exec", self.ns(0), "bash", "-c", f"exec 3<>/dev/tcp/{COORD}/{PORT}"],
            capture_output=True, check=False).returncode == 0, timeout=15)

    def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        self.coordinator.send_signal(signal.SIGKILL)
        self.coordinator.wait(10)

    def agent_up(self, i: int, daemon: str | None) -> list[str]:
        cmd = ["pywg", "agent", "up", "--coordinator", f"http://{COORD}:{PORT}",
               "--authkey-file", str(self.work / "authkey"), "--interface", f"{PREFIX}w{i}",
               "--state-dir", str(self.work / f"agent{i}"), "--name", f"agent{i}", "--health-interval", "2"]
        if daemon:
            cmd += ["--daemon-command", daemon]
        log = open(self.work / f"agent{i}.log", "ab")  # noqa: SIM115 (the process owns it)
        self.agents[i] = subprocess.Popen(["ip", "netns", "exec", self.ns(i), str(self.bin / cmd[0]), *cmd[1:]],
                                          stdout=log, stderr=log, env=self.env)
        return cmd

    def status(self, i: int) -> dict[str, Any]:
        done = subprocess.run([str(self.bin / "pywg"), "agent", "status", "--json", "--state-dir",
                               str(self.work / f"agent{i}")],
                              capture_output=True, text=True, env=self.env, check=False)
        with contextlib.suppress(ValueError):
            return dict(json.loads(done.stdout))
        return {}

    def pings(self, i: int, address: str, count: int = 1) -> bool:
        return subprocess.run(["ip", "netns", "exec", self.ns(i), "ping", "-n", "-q", "-c", str(count), "-i", "0.2",
                               "-W", "1", address], capture_output=True, check=False).returncode == 0

    def close(self) -> None:
        for proc in self.agents.values():
            proc.terminate()
        for proc in self.agents.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.terminate()
            self.coordinator.wait(10)
        for i in AGENTS:  # the WireGuard daemons exit with their interfaces
            run("ip", "link", "del", f"{PREFIX}w{i}", ns=self.ns(i), check=False)
        for i in (0, *AGENTS):
            run("ip", "link", "del", f"{PREFIX}v{i}", check=False)  # at once: a namespace's veths go lazily
            run("ip", "netns", "del", self.ns(i), check=False)
        run("ip", "link", "del", f"{PREFIX}br", check=False)


@contextlib.contextmanager
def mesh_demo() -> Iterator[MeshDemo]:
    work = Path(tempfile.mkdtemp(prefix="pywg-mesh-demo-"))
    demo = MeshDemo(work)
    try:
        demo.open()
        yield demo
    except BaseException:
        dump_logs(work)
        raise
    finally:
        demo.close()
        shutil.rmtree(work, ignore_errors=True)


def dump_logs(work: Path, tail: int = 2000) -> None:
    """The end of every log in ``work``, to stderr (a demo step failed)."""
    for log in sorted(work.glob("*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}", file=sys.stderr)


def show_peers(demo: MeshDemo, i: int) -> None:
    st = demo.status(i)
    print(f"  agent{i}: node {st.get('nodeId')}, {st.get('internalIp')} and {st.get('internalIpv6')}, "
          f"coordinator connected: {st.get('coordinatorConnected')}")
    for peer in st.get("peers", []):
        ago = handshake_age(peer.get("lastHandshake"), time.time())
        print(f"    peer {peer.get('name')} ({peer.get('internalIp')}) at {peer.get('endpoint')}: {peer.get('status')}, "
              f"last handshake {ago}, {peer.get('rxBytes')} B received, {peer.get('txBytes')} B sent")


def mesh(demo: MeshDemo) -> None:
    wgo = IMPLEMENTATIONS["wireguard-go-2025"].path()  # None when `make peers` has not built it
    print(f"  coordinator in {demo.ns(0)} ({COORD}), agents in {', '.join(demo.ns(i) for i in AGENTS)}")
    step("a pre-auth key: pywg coordinator authkey create --store sqlite:coordinator.db --reusable")
    key = demo.pywg("coordinator", "authkey", "create", "--store", demo.store, "--reusable").strip()
    fd = os.open(demo.work / "authkey", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    print("  created; kept in a 0600 file for the agents (a secret: not printed; stored hashed by the coordinator)")
    step(f"the coordinator: pywg coordinator serve --listen {COORD}:{PORT} --store sqlite:coordinator.db")
    demo.start_coordinator()
    print("  listening (aiohttp on uvloop; REST for requests, one WebSocket per agent for pushes)")
    step("three agents, one command each; no `wg` command anywhere")
    started = time.monotonic()
    for i in AGENTS:
        daemon = wgo if i == 3 else None
        cmd = demo.agent_up(i, daemon)
        print(f"  {demo.ns(i)}: {' '.join(cmd[:5])} --authkey-file authkey --name agent{i}"
              + (" --daemon-command wireguard-go  (wireguard-go 2025 as this node's WireGuard)" if daemon else ""))
    addresses = {i: wait_for(f"agent{i} to register", partial(_registered, demo, i))
                 for i in AGENTS}
    for a in AGENTS:
        for b in AGENTS:
            if a != b:
                wait_for(f"agent{a} to ping agent{b}", partial(demo.pings, a, addresses[b]["internalIp"]))
    print(f"  every pair pings over the tunnels {time.monotonic() - started:.1f} s after the first `agent up`")
    step("ping over IPv6 between mesh addresses: agent1 -> agent3")
    print(indent(subprocess.run(["ip", "netns", "exec", demo.ns(1), "ping", "-n", "-c", "3", "-i", "0.2",
                                 str(addresses[3]["internalIpv6"])], capture_output=True, text=True,
                                check=False).stdout.splitlines()[-2]))
    step("pywg agent status (what each agent knows)")
    for i in AGENTS:
        show_peers(demo, i)
    step(f"`wg show {PREFIX}w1` in {demo.ns(1)}: the stock tool reads the agent's interface")
    print(indent(run("wg", "show", f"{PREFIX}w1", ns=demo.ns(1))))
    step("pywg coordinator topology --json (the spec's MeshTopology)")
    topology = json.loads(demo.pywg("coordinator", "topology", "--coordinator", f"http://{COORD}:{PORT}",
                                    "--token-file", str(demo.work / "admin.token"), "--json", ns=demo.ns(1)))
    print(f"  {len(topology.get('nodes', []))} nodes, {len(topology.get('connections', []))} connections; "
          f"node fields: {', '.join(sorted(topology['nodes'][0]))}")
    step("the coordinator is killed (SIGKILL): the tunnels do not notice")
    demo.kill_coordinator()
    wait_for("agent1 to see the coordinator gone", lambda: demo.status(1).get("coordinatorConnected") is False)
    for b in (2, 3):
        print(f"  agent1 -> agent{b}: {'5 of 5 pings answered' if demo.pings(1, addresses[b]['internalIp'], 5) else 'LOST'}")
    step("the coordinator is started again: the agents reconnect and resume from their last revision")
    demo.start_coordinator()
    t0 = time.monotonic()
    for i in AGENTS:
        wait_for(f"agent{i} to reconnect", partial(_connected, demo, i))
    print(f"  all three connected again after {time.monotonic() - t0:.1f} s (backoff with jitter)")
    step("agent2 stops and its node is removed: pywg coordinator node remove ID")
    demo.agents.pop(2).terminate()
    demo.pywg("coordinator", "node", "remove", str(addresses[2]["nodeId"]), "--store", demo.store)
    t0 = time.monotonic()
    for i in (1, 3):
        wait_for(f"agent{i} to drop agent2",
                 partial(_without, demo, i, "agent2"))
    print(f"  agent1 and agent3 dropped agent2 {time.monotonic() - t0:.2f} s later; they still reach each other: "
          f"{demo.pings(1, addresses[3]['internalIp'], 3)}")


def main() -> int:
    print("\nPart 4: a mesh: a coordinator and three agents, no `wg` command")
    with mesh_demo() as demo:
        mesh(demo)
        step("cleaning up: agents stopped, interfaces and namespaces deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
