"""Two `pywg agent up --engine in-process` behind two port-restricted-cone NATs (real nftables
routers, pywg.testing.natlab), coturn for STUN and `pywg coordinator serve` in the lab's
internet: the agents punch through, each ends on path "direct" with the other router's WAN
address as its WireGuard endpoint, and a ping flows through the tunnel."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshbed import PYWG, end, sh, wait_for

from pywg.testing.natlab import OTHER_INTERNET_ADDRESS, STUN_SERVERS, NatLab, NatType, Router
from tests.needs import nat_lab

pytestmark = pytest.mark.netns
PORT = 8080
STUN = ",".join(str(s) for s in STUN_SERVERS)


class Lab:
    """The NAT lab with a coordinator in its internet and agents behind its routers."""

    def __init__(self, lab: NatLab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.store = f"sqlite:{tmp / 'coord.db'}"
        self.url = f"http://{OTHER_INTERNET_ADDRESS}:{PORT}"
        self.keyfile = tmp / "authkey"
        self.keyfile.write_text(sh(PYWG, "coordinator", "authkey", "create", "--store", self.store,
                                   "--reusable").strip() + "\n")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.coordinator = self._spawn(lab.inet, "coord", "coordinator", "serve", "--listen",
                                       f"{OTHER_INTERNET_ADDRESS}:{PORT}", "--store", self.store,
                                       "--prefix4", "10.220.0.0/24", "--prefix6", "fd14:b::/64",
                                       "--admin-token-file", str(tmp / "admin-token"))
        probe = ["ip", "netns", "exec", lab.inet, "bash", "-c", f"exec 3<>/dev/tcp/{OTHER_INTERNET_ADDRESS}/{PORT}"]
        wait_for("the coordinator to listen", lambda: self.coordinator.poll() is None
                 and subprocess.run(probe, check=False, capture_output=True).returncode == 0, timeout=15)

    def _spawn(self, ns: str, log: str, *args: str) -> subprocess.Popen[bytes]:
        out = open(self.tmp / f"{log}.log", "ab")  # noqa: SIM115 (the process keeps it)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, PYWG, *args], stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def agent(self, i: int, router: Router) -> None:
        self._spawn(router.host_ns, f"agent{i}", "agent", "up", "--coordinator", self.url, "--authkey-file",
                    str(self.keyfile), "--interface", f"h14bw{i}", "--state-dir", str(self.tmp / f"agent{i}"),
                    "--name", f"agent{i}", "--health-interval", "1", "--engine", "in-process", "--stun", STUN)

    def status(self, i: int) -> dict[str, Any]:
        out = sh(PYWG, "agent", "status", "--json", "--state-dir", str(self.tmp / f"agent{i}"), check=False)
        return json_or_empty(out)

    def logs(self) -> str:
        return "".join(f"--- {f.name}\n{f.read_text(errors='replace')[-6000:]}\n" for f in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            end(p)


def json_or_empty(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@pytest.fixture
def bed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Lab, Router, Router]]:
    with nat_lab(NatType.PORT_RESTRICTED_CONE, NatType.PORT_RESTRICTED_CONE) as opened:
        ra, rb = opened.routers
        lab = Lab(opened, tmp_path)
        failed = request.session.testsfailed
        try:
            yield lab, ra, rb
        except BaseException:
            print(lab.logs())
            raise
        else:
            if request.session.testsfailed > failed:
                print(lab.logs())
        finally:
            lab.close()


def direct_peer(lab: Lab, i: int) -> dict[str, Any] | None:
    peers = lab.status(i).get("peers") or []
    return peers[0] if len(peers) == 1 and peers[0].get("path") == "direct" else None


def test_two_agents_behind_port_restricted_cones_punch_through_and_ping(bed: tuple[Lab, Router, Router]) -> None:
    lab, ra, rb = bed
    started = time.monotonic()
    lab.agent(0, ra)
    lab.agent(1, rb)
    peer = {i: wait_for(f"agent{i} on a direct path", lambda i=i: direct_peer(lab, i), timeout=40) for i in (0, 1)}
    took = time.monotonic() - started
    for i, other in ((0, rb), (1, ra)):
        # the endpoint each sees is the other NAT's public address: the path is direct
        assert peer[i]["endpoint"].rsplit(":", 1)[0] == other.wan_address, peer[i]
        assert peer[i]["rttMs"] is not None and peer[i]["reason"] is None
        own = lab.status(i)["nat"]
        assert own["behindNat"] is True and own["mapping"] == "endpoint-independent"
        assert own["keepalive"] == 25 and lab.status(i)["keepalive"] == 25
        mine = ra if i == 0 else rb
        assert {c["source"] for c in own["candidates"]} == {"local", "stun"}
        assert any(c["endpoint"].startswith(f"{mine.wan_address}:") for c in own["candidates"])
    target = lab.status(1)["internalIp"]
    wait_for("a ping through the tunnel", lambda: subprocess.run(
        ["ip", "netns", "exec", ra.host_ns, "ping", "-n", "-q", "-c", "1", "-W", "1", target],
        check=False, capture_output=True).returncode == 0, timeout=10)
    # the WireGuard peer (as `wg show` reads it from the agent's UAPI socket) uses the punched path
    wg = sh("ip", "netns", "exec", ra.host_ns, "wg", "show", "h14bw0", "endpoints").split()
    assert wg[1].rsplit(":", 1)[0] == rb.wan_address
    text = sh(PYWG, "agent", "status", "--state-dir", str(lab.tmp / "agent0"))
    assert "path: direct" in text and "behind a NAT" in text and "keepalive 25 s" in text
    print(f"both agents direct {took:.2f} s after start")
