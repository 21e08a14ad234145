"""`make demo`, part 5: two agents behind two NATs find each other through the coordinator
and punch through. A NAT lab (pywg.testing.natlab): an "internet" namespace with coturn
serving STUN and the coordinator, two routers NATting their LANs with nftables as
port-restricted cones (each drops what comes in unasked), one host behind each. Every
step is printed as it happens, with the commands a user would type."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from pywg.demo_mesh import dump_logs, step, wait_for
from pywg.testing.natlab import STUN_SERVERS, NatLab, NatType, Router
from pywg.testing.netns import BedUnavailable, check_bed, run, stop_process

COORD = "203.0.113.20"  # the coordinator's address in the lab's internet
PORT = 18215
STUN = ",".join(str(s) for s in STUN_SERVERS)


class NatDemo:
    def __init__(self, lab: NatLab, work: Path) -> None:
        self.lab, self.work = lab, work
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"}
        self.store = f"sqlite:{work / 'coordinator.db'}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def pywg(self, *args: str) -> str:
        return subprocess.run([str(self.bin / "pywg"), *args], capture_output=True, text=True, env=self.env,
                              check=True, timeout=30).stdout

    def spawn(self, ns: str, log: str, *args: str) -> None:
        with open(self.work / f"{log}.log", "ab") as out:
            self.processes.append(subprocess.Popen(["ip", "netns", "exec", ns, str(self.bin / "pywg"), *args],
                                                   stdout=out, stderr=subprocess.STDOUT, env=self.env))

    def status(self, name: str) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads((self.work / name / "status.json").read_text()))
        return {}

    def peer(self, name: str, other: str) -> dict[str, Any] | None:
        return next((p for p in self.status(name).get("peers", []) if p.get("name") == other), None)

    def close(self) -> None:
        for process in self.processes:
            stop_process(process)


def punch(demo: NatDemo, routers: dict[str, Router]) -> None:
    lab = demo.lab
    step("the internet: coturn serving STUN on " + " and ".join(str(s) for s in STUN_SERVERS))
    for name, r in routers.items():
        print(f"  router {r.ns}: {r.nat.value} NAT, WAN {r.wan_address}, LAN {r.lan_address}/24 "
              f"-> {name}'s host {r.host_address}")
    step(f"pywg coordinator serve --listen {COORD}:{PORT} --stun {STUN}")
    run("ip", "addr", "replace", f"{COORD}/32", "dev", "lo", ns=lab.inet)
    key = demo.pywg("coordinator", "authkey", "create", "--store", demo.store, "--reusable").strip()
    (demo.work / "authkey").write_text(key + "\n")
    demo.spawn(lab.inet, "coordinator", "coordinator", "serve", "--listen", f"{COORD}:{PORT}", "--store",
               demo.store, "--prefix4", "100.122.0.0/24", "--prefix6", "fd22::/48", "--stun", STUN)
    probe = ["ip", "netns", "exec", lab.inet, "bash", "-c", f"exec 3<>/dev/tcp/{COORD}/{PORT}"]
    wait_for("the coordinator", lambda: subprocess.run(probe, capture_output=True, check=False).returncode == 0)
    step("pywg agent up --engine in-process on each host (the coordinator hands them the STUN servers)")
    started = time.monotonic()
    for i, (name, r) in enumerate(routers.items()):
        print(f"  {name}: pywg agent up --coordinator http://{COORD}:{PORT} --authkey-file authkey --name {name} "
              f"--interface pwdn{i} --engine in-process")
        demo.spawn(r.host_ns, name, "agent", "up", "--coordinator", f"http://{COORD}:{PORT}", "--authkey-file",
                   str(demo.work / "authkey"), "--name", name, "--interface", f"pwdn{i}", "--listen-port",
                   str(51820 + i), "--state-dir", str(demo.work / name), "--engine", "in-process",
                   "--health-interval", "1")
    (a, ra), (b, rb) = routers.items()
    step("each agent's STUN view of its NAT (pywg agent status --json: nat)")
    def nat_known(name: str) -> dict[str, Any] | None:
        nat = demo.status(name).get("nat") or {}
        return nat if nat.get("behindNat") is not None else None

    def direct(name: str, other: str) -> dict[str, Any] | None:
        entry = demo.peer(name, other)
        return entry if entry is not None and entry.get("path") == "direct" else None

    for name in (a, b):
        nat = wait_for(f"{name}'s STUN answers", partial(nat_known, name))
        cands = ", ".join(f"{c['endpoint']} ({c['source']})" for c in nat.get("candidates", []))
        print(f"  {name}: mapping {nat.get('mapping')}, behind a NAT: {nat.get('behindNat')}, "
              f"keepalive {nat.get('keepalive')} s\n    candidates: {cands}")
    step("the coordinator pushes each node's candidates to the other; both probe every one at once")
    for name, other in ((a, b), (b, a)):
        entry = wait_for(f"{name}'s direct path", partial(direct, name, other))
        tried = ", ".join(f"{c['endpoint']} ({'/'.join(c.get('sources', []))}, {c.get('pongs', 0)} pongs)"
                          for c in entry.get("candidates", []))
        print(f"  {name} -> {other}: path {entry['path']}, endpoint {entry['endpoint']}, rtt {entry.get('rttMs')} ms"
              f"\n    tried: {tried}")
    print(f"  direct both ways {time.monotonic() - started:.1f} s after the agents started")
    for name, other_router in ((a, rb), (b, ra)):
        seen = str(demo.peer(name, b if name == a else a)["endpoint"]).rsplit(":", 1)[0]  # type: ignore[index]
        verdict = "its NAT's public address: a direct path" if seen == other_router.wan_address else "NOT its NAT"
        print(f"  {name} sees the other at {seen} ({verdict}, WAN {other_router.wan_address})")
    step(f"ping through the tunnel from {a}'s host to {b}'s mesh address")
    target = str(demo.status(b)["internalIp"])
    done = subprocess.run(["ip", "netns", "exec", ra.host_ns, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", target],
                          capture_output=True, text=True, check=False)
    print("  " + "\n  ".join(line for line in done.stdout.splitlines() if "bytes from" in line or "packets" in line))
    step("pywg agent status (alice)")
    print("  " + demo.pywg("agent", "status", "--state-dir", str(demo.work / a)).strip().replace("\n", "\n  "))


@contextlib.contextmanager
def nat_demo() -> Iterator[tuple[NatDemo, dict[str, Router]]]:
    work = Path(tempfile.mkdtemp(prefix="pywg-demo-nat-"))
    with NatLab() as lab:
        lab.start_coturn()
        routers = {"alice": lab.add_router(NatType.PORT_RESTRICTED_CONE),
                   "bob": lab.add_router(NatType.PORT_RESTRICTED_CONE)}
        demo = NatDemo(lab, work)
        try:
            yield demo, routers
        except BaseException:
            dump_logs(work, 3000)
            raise
        finally:
            demo.close()
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    print("\nPart 5: two agents behind two NATs punch through, the coordinator introducing them")
    try:
        check_bed(("ip", "nft", "turnserver", "ping"))
    except BedUnavailable as exc:
        print(f"  part 5 needs the NAT lab: {exc}", file=sys.stderr)
        return 2
    with nat_demo() as (demo, routers):
        punch(demo, routers)
        step("cleaning up: agents and coordinator stopped, the lab's namespaces deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
