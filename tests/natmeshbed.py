"""The mesh on the NAT lab: real `pywg coordinator serve --stun` processes in the lab's
internet namespace (coturn serving STUN beside them) and `pywg agent up --engine in-process`
processes on the lab's hosts, behind routers of given NAT types or on the open host.

    internet ns: coturn 203.0.113.1:3478 + 203.0.113.2:3478, coordinator k on 203.0.113.(10+k):PORT
    router r (nft NAT of its type) -- host r: an agent (interface h14a<n>, port 41000+n)
    open host 10.209.0.2: agents with no NAT

Several coordinators (``coordinators=K``) let K pairs of agents run at once without seeing
each other: coordinator k hands out 100.121.k.0/24 and fd21:k::/48, so two of its agents
on the open host never share a route. With ``derp=`` the internet namespace also runs DERP
relays of region 900 (``pywg derp serve`` or Tailscale's derper, on 203.0.113.(20+i), plain
HTTP; several ``pywg derp serve`` mesh with each other) and the coordinators hand out
their DERP map (``--derp-map``). Every agent gets a fresh node name, interface,
listen port (so no conntrack entry of an earlier agent is reused) and state directory.

:meth:`NatMeshBed.pair` starts two agents on one coordinator and, when the body fails,
prints their logs and the coordinator's; afterwards it stops them and removes their
nodes, so the next pair starts on an empty mesh. Everything is real: the CLI, the
engines, the routers' nftables; the bed only reads (``pywg agent status --json``,
``pywg coordinator nodes --json``, ``pywg stats``) and pings from the hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshbed import wait_for

from pywg.testing.certs import self_signed
from pywg.testing.natlab import OPEN_HOST_ADDRESS, STUN_SERVERS, NatLab, NatType, Router
from pywg.testing.netns import run, stop_process

BIN = Path(sys.executable).parent
DERPER = Path.home() / ".cache" / "pywg" / "peers" / "derper-1.102.3" / "bin" / "derper"
DERP_REGION = 900
DERP_BASE = 20  # relay i listens on 203.0.113.(20 + i):3340 (derp_base= for another bed at once)
DERP_PORT = 3340
PYWG = str(BIN / "pywg")
PREFIX = "h14a"  # interface names
COORDINATOR_BASE = 10  # coordinator k listens on 203.0.113.(10 + k)
STUN = ",".join(str(s) for s in STUN_SERVERS)
OPEN = "open"  # the open host's "NAT type" in the test's tables

PRC, SYM, FULL, ARC, BLOCKED = (t.value for t in NatType)
CONES = (PRC, FULL, ARC)


def expected(a: str, b: str) -> str:
    """Where two NAT types allow a punch (RFC 4787): UDP blocked never; a symmetric NAT
    with another symmetric or a port-restricted cone never (its mapped port is unknown to
    a peer whose NAT filters by port); every other pair does."""
    pair = {a, b}
    if BLOCKED in pair:
        return "none"
    if pair == {SYM} or pair == {SYM, PRC}:
        return "none"
    return "direct"


KINDS = (PRC, SYM, FULL, ARC, BLOCKED, OPEN)
PAIRS = [(a, b) for i, a in enumerate(KINDS) for b in KINDS[i:] if (a, b) != (OPEN, OPEN)]  # one open host


@dataclass
class Coordinator:
    index: int
    address: str
    port: int
    store: str
    keyfile: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"


@dataclass
class Relay:
    """A DERP server in the internet namespace (``kind``: "pywg" or "derper")."""

    kind: str
    name: str
    address: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]
    region: int = 0  # the DERP region it serves
    pin: str | None = None  # the DERP map's CertName for it (TLS)


@dataclass
class Agent:
    """One `pywg agent up` on a lab host (``router`` None: the open host)."""

    name: str
    router: Router | None
    ns: str
    ifname: str
    port: int
    state: Path
    log: Path
    coordinator: Coordinator
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    argv: list[str] = field(default_factory=list)  # the `pywg agent up` command, for restart

    @property
    def nat(self) -> str:
        return OPEN if self.router is None else self.router.nat.value


class NatMeshBed:
    """Coordinators in ``lab``'s internet namespace; agents started with :meth:`up`."""

    def __init__(self, lab: NatLab, tmp: Path, *, coordinators: int = 1, port: int = 18221,
                 health_interval: float = 0.5, prefix: str = PREFIX,
                 coordinator_args: Callable[[str], list[str]] | None = None, derp: tuple[str, ...] = (),
                 derp_base: int = DERP_BASE, derp_tls: bool = False, derp_regions: bool = False) -> None:
        self.lab = lab
        self.derp_regions = derp_regions  # relay i serves region 900 + i (none meshed); else all 900, meshed
        self.derp_tls = derp_tls  # the relays serve HTTPS (self-signed, pinned in the map); else plain HTTP
        self.prefix = prefix  # of the agents' interface names
        self.coordinator_args = coordinator_args  # more `serve` arguments, given its address
        self.tmp = tmp
        self.health_interval = health_interval
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.coordinators: list[Coordinator] = []
        self.agents: list[Agent] = []
        self._count = 0
        self.relays: list[Relay] = []
        self.derp_map: Path | None = None
        try:
            if derp:
                self._start_relays(derp, derp_base)
            for k in range(coordinators):
                self.coordinators.append(self._start_coordinator(k, port))
        except BaseException:
            self.close()
            raise

    # --- DERP ---------------------------------------------------------------------------

    def _start_relays(self, kinds: tuple[str, ...], base: int) -> None:
        """One DERP server per kind on 203.0.113.(base + i), all of region 900 (the ``pywg``
        ones mesh together), or with ``derp_regions`` each of its own region 900 + i. Another
        bed's relays on those addresses: an error."""
        mesh_key = self.tmp / "derp-mesh.key"
        mesh_key.write_text(os.urandom(32).hex() + "\n")
        mesh_key.chmod(0o600)
        addresses = [f"203.0.113.{base + i}" for i in range(len(kinds))]
        scheme = "https" if self.derp_tls else "http"
        pywg_urls = [] if self.derp_regions else [
            f"{scheme}://{a}:{DERP_PORT}" for a, k in zip(addresses, kinds, strict=True) if k == "pywg"]
        for i, (kind, address) in enumerate(zip(kinds, addresses, strict=True)):
            run("ip", "addr", "replace", f"{address}/32", "dev", "lo", ns=self.lab.inet)
            probe = ["ip", "netns", "exec", self.lab.inet, "bash", "-c", f"exec 3<>/dev/tcp/{address}/{DERP_PORT}"]
            if subprocess.run(probe, check=False, capture_output=True).returncode == 0:
                raise RuntimeError(f"{address}:{DERP_PORT} is served already (another bed's relay?)")
            config = self.tmp / f"derp{i}.json"
            tls = None
            if self.derp_tls:
                certs = self.tmp / f"derp{i}-certs"
                certs.mkdir(mode=0o700, exist_ok=True)
                tls = self_signed(certs, [address], stem=address)  # derper's manual mode: ADDR.crt/.key
            if kind == "derper":
                argv = [str(DERPER), "-a", f"{address}:{DERP_PORT}", "-c", str(config), "-stun=false",
                        "-http-port", "-1"]
                if tls is not None:
                    argv += ["-certmode", "manual", "-certdir", str(tls.cert.parent), "-hostname", address]
            else:
                argv = [PYWG, "derp", "serve", "--listen", f"{address}:{DERP_PORT}", "--config", str(config)]
                if tls is not None:
                    argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
                others = [u for u in pywg_urls if u != f"{scheme}://{address}:{DERP_PORT}"]
                if others:
                    argv += ["--mesh-with", ",".join(others), "--mesh-key", str(mesh_key)]
            log = self.tmp / f"derp{i}-{kind}.log"
            with open(log, "ab") as out:
                process = subprocess.Popen(["ip", "netns", "exec", self.lab.inet, *argv], stdout=out,
                                           stderr=subprocess.STDOUT, env=self.env)
            region = DERP_REGION + i if self.derp_regions else DERP_REGION
            relay = Relay(kind, f"{region}{chr(ord('a') + i)}", address, DERP_PORT, log, process, region,
                          tls.pin if tls is not None else None)
            self.relays.append(relay)
            wait_for(f"DERP server {relay.name} ({kind}) to listen", lambda p=process, c=probe: p.poll() is None and subprocess.run(
                c, check=False, capture_output=True).returncode == 0, timeout=15)
        self.derp_map = self.tmp / "derpmap.json"
        self.write_derp_map(self.relays)

    def write_derp_map(self, relays: list[Relay], score: dict[int, float] | None = None) -> None:
        """The DERP map coordinators hand out (read at their start): these relays, by region;
        ``score``: HomeParams.RegionScore."""
        regions: dict[str, dict[str, Any]] = {}
        for r in relays:
            region = regions.setdefault(str(r.region), {"RegionID": r.region, "RegionCode": f"lab{r.region}",
                                                        "RegionName": "the NAT lab", "Nodes": []})
            region["Nodes"].append({"Name": r.name, "RegionID": r.region, "HostName": r.address, "IPv4": r.address,
                                    "IPv6": "none", "DERPPort": r.port, "STUNPort": -1,
                                    **({"CertName": r.pin} if r.pin else {})})
        assert self.derp_map is not None
        home_params = {"HomeParams": {"RegionScore": {str(r): v for r, v in score.items()}}} if score else {}
        self.derp_map.write_text(json.dumps({"Regions": regions, **home_params}))

    def stop_relay(self, relay: Relay) -> None:
        stop_process(relay.process)

    # --- the coordinators ----------------------------------------------------------------

    def _start_coordinator(self, k: int, port: int) -> Coordinator:
        address = f"203.0.113.{COORDINATOR_BASE + k}"
        run("ip", "addr", "replace", f"{address}/32", "dev", "lo", ns=self.lab.inet)
        store = f"sqlite:{self.tmp / f'coord{k}.db'}"
        keyfile = self.tmp / f"authkey{k}"
        key = self.pywg("coordinator", "authkey", "create", "--store", store, "--reusable").strip()
        keyfile.write_text(key + "\n")
        log = self.tmp / f"coord{k}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.inet, PYWG, "coordinator", "serve", "--listen", f"{address}:{port}",
                 "--store", store, "--prefix4", f"100.121.{k}.0/24", "--prefix6", f"fd21:{k:x}::/48",
                 "--stun", STUN, "--poll-interval", "0.05",
                 *(self.coordinator_args(address) if self.coordinator_args else []),
                 *(["--derp-map", str(self.derp_map)] if self.derp_map is not None else [])],
                stdout=out, stderr=subprocess.STDOUT, env=self.env)
        coordinator = Coordinator(k, address, port, store, keyfile, log, process)
        probe = ["ip", "netns", "exec", self.lab.inet, "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"]
        wait_for(f"coordinator {k} to listen", lambda: process.poll() is None and subprocess.run(
            probe, check=False, capture_output=True).returncode == 0, timeout=15)
        return coordinator

    def restart_coordinator(self, k: int = 0) -> None:
        """Stop coordinator ``k`` and start it again on its store and address (it reads the
        DERP map file again: write_derp_map first)."""
        old = self.coordinators[k]
        stop_process(old.process)
        self.coordinators[k] = self._start_coordinator(k, old.port)

    def nodes(self, k: int = 0) -> dict[str, dict[str, Any]]:
        """``pywg coordinator nodes --json`` of coordinator ``k``, by node name."""
        out = self.pywg("coordinator", "nodes", "--json", "--store", self.coordinators[k].store)
        return {n["name"]: n for n in json.loads(out)}

    # --- agents --------------------------------------------------------------------------

    def pywg(self, *args: str, ns: str | None = None, check: bool = True, timeout: float = 30) -> str:
        """``pywg ARGS`` (in namespace ``ns``), its stdout."""
        where = ["ip", "netns", "exec", ns] if ns else []
        done = subprocess.run([*where, PYWG, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"pywg {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def up(self, router: Router | None, coordinator: int = 0, *extra: str) -> Agent:
        """``pywg agent up --engine in-process`` on ``router``'s host (None: the open host)."""
        n = self._count = self._count + 1
        coord = self.coordinators[coordinator]
        kind = "open" if router is None else router.nat.value.split("-")[0]
        name = f"{kind}{n}"
        ns = self.lab.open_host if router is None else router.host_ns
        state, log = self.tmp / f"agent-{name}", self.tmp / f"agent-{name}.log"
        ifname, port = f"{self.prefix}{n}", 41000 + n
        cmd = [PYWG, "agent", "up", "--coordinator", coord.url, "--authkey-file", str(coord.keyfile),
               "--interface", ifname, "--state-dir", str(state), "--name", name, "--listen-port", str(port),
               "--engine", "in-process", "--health-interval", str(self.health_interval),
               *(["--derp-plain-http"] if self.derp_map is not None and not self.derp_tls else []), *extra]
        with open(log, "ab") as out:
            process = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                       env=self.env)
        agent = Agent(name, router, ns, ifname, port, state, log, coord, process, argv=cmd)
        self.agents.append(agent)
        return agent

    def restart(self, agent: Agent) -> None:
        """Stop the agent and start it again with the same command and state directory."""
        self.stop(agent)
        with open(agent.log, "ab") as out:
            agent.process = subprocess.Popen(["ip", "netns", "exec", agent.ns, *agent.argv], stdout=out,
                                             stderr=subprocess.STDOUT, env=self.env)
        agent.started = time.monotonic()

    def stop(self, agent: Agent) -> None:
        """SIGTERM to the agent (its in-process interface ends with it)."""
        stop_process(agent.process)
        run("ip", "link", "del", agent.ifname, ns=agent.ns, check=False)

    def remove(self, agent: Agent) -> None:
        """Stop the agent and remove its node from its coordinator's store."""
        self.stop(agent)
        node_id = self.status_file(agent).get("nodeId")
        if node_id:
            self.pywg("coordinator", "node", "remove", str(node_id), "--store", agent.coordinator.store, check=False)
        if agent in self.agents:
            self.agents.remove(agent)

    @contextlib.contextmanager
    def pair(self, a: Router | None, b: Router | None, coordinator: int = 0,
             out: Callable[[str], None] = print, extra: tuple[str, ...] = ()) -> Iterator[tuple[Agent, Agent]]:
        """Two agents (on ``a``'s and ``b``'s hosts) on one coordinator, ``extra`` added to their
        ``agent up``; their logs go to ``out`` when the body fails; stopped and removed from the
        mesh afterwards."""
        agents = (self.up(a, coordinator, *extra), self.up(b, coordinator, *extra))
        try:
            yield agents
        except BaseException:
            out(self.logs(agents))
            raise
        finally:
            for agent in agents:
                self.remove(agent)

    # --- reading the agents ---------------------------------------------------------------

    def status(self, agent: Agent) -> dict[str, Any]:
        """``pywg agent status --json`` ({} before the agent's first status)."""
        out = self.pywg("agent", "status", "--json", "--state-dir", str(agent.state), check=False)
        with contextlib.suppress(ValueError):
            return dict(json.loads(out))
        return {}

    @staticmethod
    def status_file(agent: Agent) -> dict[str, Any]:
        """The agent's status.json as it is now (what ``agent status`` reads; cheap to poll)."""
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads((agent.state / "status.json").read_text()))
        return {}

    def peer(self, agent: Agent, other: Agent, status: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """``agent``'s status entry for ``other`` (by name), None while it has none."""
        status = self.status_file(agent) if status is None else status
        return next((p for p in status.get("peers", []) if p.get("name") == other.name), None)

    def wait_registered(self, agent: Agent, timeout: float = 20.0) -> tuple[str, str]:
        """The agent's mesh IPv4 and IPv6 addresses once it has registered."""
        st = wait_for(f"{agent.name} registered", lambda: s if (s := self.status_file(agent)).get("internalIp")
                      else None, timeout)
        return str(st["internalIp"]), str(st["internalIpv6"])

    def wait_direct(self, a: Agent, b: Agent, timeout: float = 20.0) -> tuple[str, str]:
        """Both registered and on a direct path to each other: their mesh IPv4 addresses.

        A ping first (retried): with a long health interval nothing else is sent, and an idle
        peer's path is trusted only 6.5 s after its last pong (it then shows "none" until data
        flows); the data keeps both sides heartbeating while their status is read."""
        ips = self.wait_registered(a, timeout)[0], self.wait_registered(b, timeout)[0]
        wait_for(f"a ping from {a.name} to {b.name}", lambda: self.ping(a, ips[1], count=1, wait=1.0), timeout)
        self.wait_path(a, b, timeout=timeout)
        self.wait_path(b, a, timeout=timeout)
        return ips

    def wait_path(self, agent: Agent, other: Agent, paths: tuple[str, ...] = ("direct",),
                  timeout: float = 20.0) -> dict[str, Any]:
        """``agent``'s entry for ``other`` once its ``path`` is one of ``paths``."""
        def reached() -> dict[str, Any] | None:
            entry = self.peer(agent, other)
            return entry if entry is not None and entry.get("path") in paths else None

        try:
            return wait_for(f"{agent.name}'s path to {other.name} to be {'/'.join(paths)}", reached, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last entry: {self.peer(agent, other)}") from None

    def public_address(self, agent: Agent) -> str:
        """The address the internet sees the agent's host from: its NAT's WAN address now."""
        if agent.router is None:
            return OPEN_HOST_ADDRESS
        return self.lab.routers[agent.router.index].wan_address

    def stats(self, agent: Agent) -> dict[str, Any]:
        """``pywg stats IFNAME`` of the agent's in-process engine."""
        return dict(json.loads(self.pywg("stats", agent.ifname, ns=agent.ns)))

    # --- traffic -------------------------------------------------------------------------

    def ping(self, agent: Agent, address: str, count: int = 3, interval: float = 0.2, wait: float = 2.0) -> bool:
        """``ping`` from the agent's host to ``address`` (a mesh address): every reply came."""
        done = subprocess.run(["ip", "netns", "exec", agent.ns, "ping", "-n", "-q", "-c", str(count), "-i",
                               f"{interval:g}", "-W", f"{wait:g}", address], capture_output=True, check=False,
                              timeout=count * interval + wait + 10)
        return done.returncode == 0

    def pinger(self, agent: Agent, address: str, interval: float = 0.1) -> subprocess.Popen[str]:
        """A running ``ping -D -O`` from the agent's host (stop it with :func:`stop_pinger`)."""
        return subprocess.Popen(["ip", "netns", "exec", agent.ns, "ping", "-n", "-D", "-O", "-i", f"{interval:g}",
                                 "-W", "1", address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # --- the end -------------------------------------------------------------------------

    def logs(self, agents: tuple[Agent, ...] | list[Agent] | None = None, tail: int = 6000) -> str:
        agents = self.agents if agents is None else agents
        coords = sorted({a.coordinator.index for a in agents}) if agents else range(len(self.coordinators))
        files = [a.log for a in agents] + [self.coordinators[k].log for k in coords] + [r.log for r in self.relays]
        parts = []
        for f in files:
            text = f.read_text(errors="replace") if f.exists() else "(no log)"
            parts.append(f"--- {f.name}\n{text[-tail:]}\n")
        return "".join(parts)

    def close(self) -> None:
        """Stop every agent and coordinator this bed started (the lab removes the rest)."""
        for agent in self.agents:
            agent.process.terminate()
        for agent in list(self.agents):
            self.stop(agent)
        self.agents.clear()
        for coord in self.coordinators:
            stop_process(coord.process)
        for relay in self.relays:
            stop_process(relay.process)


def ping_summary(output: str) -> tuple[int, int]:
    """(transmitted, received) from ping's summary line."""
    for line in output.splitlines():
        if "packets transmitted" in line:
            parts = line.split(",")
            return int(parts[0].split()[0]), int(parts[1].split()[0])
    return 0, 0


def stop_pinger(process: subprocess.Popen[str]) -> str:
    """SIGINT to a :meth:`NatMeshBed.pinger` (ping prints its summary); its whole output."""
    process.send_signal(2)
    try:
        out, _ = process.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out


def reply_times(output: str) -> list[float]:
    """The ``-D`` timestamps (seconds since the epoch) of the replies in ping's output."""
    times = []
    for line in output.splitlines():
        if line.startswith("[") and "bytes from" in line:
            times.append(float(line[1:line.index("]")]))
    return times


def router_for(lab: NatLab, nat: str) -> Router | None:
    """A new router of NAT type ``nat`` (a NatType value; OPEN: None, the open host)."""
    return None if nat == OPEN else lab.add_router(NatType(nat))


def time_to_direct(bed: NatMeshBed, ra: Router | None, rb: Router | None, k: int = 0,
                   timeout: float = 15.0) -> float:
    """Fresh agents on ``ra``'s and ``rb``'s hosts: seconds from "both up, each with the
    other's candidates" (both status files list the peer with candidates: the coordinator's
    push reached both) to "both report the path direct" (the agent writes its status when a
    path changes; polled every 10 ms)."""
    with bed.pair(ra, rb, k) as (A, B):
        def pushed() -> bool:
            return all((e := bed.peer(x, y)) is not None and bool(e.get("candidates")) for x, y in ((A, B), (B, A)))

        wait_for("both agents to have the other's candidates", pushed, timeout, interval=0.01)
        t0 = time.monotonic()
        wait_for("a direct path on both sides",
                 lambda: all((e := bed.peer(x, y)) is not None and e.get("path") == "direct"
                             for x, y in ((A, B), (B, A))), timeout, interval=0.01)
        return time.monotonic() - t0
