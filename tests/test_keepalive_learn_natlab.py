"""Keepalive learning end to end on the NAT lab: `pywg coordinator serve --nat-observer` in the
lab's internet, one `pywg agent up --engine in-process` behind a port-restricted cone whose UDP
mapping timeout is 6 s, another on the open host (no NAT). The agent behind the NAT learns the
mapping's lifetime from the observer on side sockets and keeps alive inside it (shown in
`pywg agent status --json` and in `wg show`); the open one keeps no keepalive.

Then the tunnel is idle for four timeouts (no health echoes, no data) and the open side's
first packet must still arrive. While idle the router drops disco (before conntrack sees
it): the agent's disco heartbeats, which run while the persistent keepalive makes the peer
look active, would otherwise keep the mapping alive by themselves, and the test would prove
nothing about the keepalive. The control (no observer: the default 25 s) loses that packet."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from natmeshbed import NatMeshBed

from pywg.nat.disco import MAGIC
from pywg.testing.natlab import OPEN_HOST_ADDRESS, NatLab, NatType, Router
from pywg.testing.netns import run
from tests.needs import nat_lab

pytestmark = pytest.mark.netns
TIMEOUT = 6
OBSERVER_PORT = 3479


@pytest.fixture
def lab() -> Iterator[NatLab]:
    with nat_lab() as opened:
        yield opened


def drop_disco(router: Router) -> None:
    """The router drops every disco datagram, either way, before conntrack refreshes a mapping."""
    magic = "0x" + MAGIC.hex()
    run("nft", "-f", "-", ns=router.ns, input=(
        "table inet h14k_nodisco {\n"
        "  chain pre { type filter hook prerouting priority -300; policy accept;\n"
        f"    udp length >= 46 @th,64,{len(MAGIC) * 8} {magic} counter drop\n"
        "  }\n}\n").encode())


def mapping_alive(router: Router, port: int) -> bool:
    """Whether the router's conntrack still maps the host's UDP ``port`` to the open host."""
    table = run("cat", "/proc/net/nf_conntrack", ns=router.ns)
    return any(" udp " in line and f"src={router.host_address} " in line and f"sport={port} " in line
               and f"dst={OPEN_HOST_ADDRESS} " in line for line in table.splitlines())


def learnt_status(bed: NatMeshBed, agent: Any, timeout: float = 40) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        own = bed.status(agent).get("nat") or {}
        if str(own.get("keepaliveSource", "")).startswith("learnt"):
            return dict(own)
        time.sleep(0.5)
    raise AssertionError(f"not learnt within {timeout} s: {bed.status(agent).get('nat')}")


def idle_then_first_packet(bed: NatMeshBed, router: Router, sender: Any, target: str, idle: float) -> bool:
    drop_disco(router)
    time.sleep(idle)  # idle: no echoes, no data, no disco; only WireGuard's keepalives
    return bed.ping(sender, target, count=1, wait=2.0)


def start(lab: NatLab, tmp_path: Path, observer: bool) -> tuple[Router, NatMeshBed]:
    router = lab.add_router(NatType.PORT_RESTRICTED_CONE, mapping_timeout=TIMEOUT)
    args = (lambda address: ["--nat-observer", f"{address}:{OBSERVER_PORT}"]) if observer else None
    return router, NatMeshBed(lab, tmp_path, port=18231, health_interval=3600.0, prefix="h14k",
                              coordinator_args=args)


def test_the_agent_learns_a_6_s_nat_timeout_and_the_idle_tunnel_still_gets_the_first_packet(
        lab: NatLab, tmp_path: Path) -> None:
    router, bed = start(lab, tmp_path, observer=True)
    started = time.monotonic()
    try:
        with bed.pair(router, None) as (nat, open_):
            nat_ip, open_ip = bed.wait_direct(nat, open_)
            own = learnt_status(bed, nat)
            took = time.monotonic() - started
            keepalive = bed.status(nat)["keepalive"]
            assert isinstance(keepalive, int) and 1 <= keepalive < TIMEOUT, own
            assert own["keepalive"] == keepalive and own["behindNat"] is True
            assert own["keepaliveLearning"]["state"] == "learnt"
            text = str(own["keepaliveSource"])  # "learnt: mapping survived N s, died at M s"
            survived = float(text.split("survived ")[1].split(" s")[0])
            died = float(text.split("died at ")[1].split(" s")[0])
            assert TIMEOUT - 2 <= survived < died <= TIMEOUT + 2, text
            # the WireGuard peer has it (`wg show` reads the agent's UAPI socket)
            shown = subprocess.run(["ip", "netns", "exec", nat.ns, "wg", "show", nat.ifname, "persistent-keepalive"],
                                   capture_output=True, text=True, check=True).stdout.split()
            assert shown[1] == str(keepalive), shown
            # the open host found no NAT: no keepalive
            other = bed.status(open_)["nat"]
            assert other["behindNat"] is False and other["keepalive"] == 0 and other["keepaliveSource"] == "no NAT"
            status_text = bed.pywg("agent", "status", "--state-dir", str(nat.state))
            assert f"keepalive {keepalive} s" in status_text and "keepalive: learnt: mapping survived" in status_text
            print(f"{text}, keepalive {keepalive} s, {took:.1f} s after start")
            assert bed.ping(nat, open_ip, count=2)  # a WireGuard session, as any use makes one
            assert idle_then_first_packet(bed, router, open_, nat_ip, 4 * TIMEOUT), \
                "the other side's first packet was lost"
    finally:
        bed.close()


def test_control_with_the_default_25_s_the_idle_mapping_dies_and_the_first_packet_is_lost(
        lab: NatLab, tmp_path: Path) -> None:
    router, bed = start(lab, tmp_path, observer=False)
    try:
        with bed.pair(router, None) as (nat, open_):
            nat_ip, open_ip = bed.wait_direct(nat, open_)
            own = bed.status(nat)["nat"]
            assert own["keepalive"] == 25 and own["keepaliveSource"] == "default"
            assert own["keepaliveLearning"]["state"].startswith("failed: no NAT observer")
            assert bed.ping(nat, open_ip, count=2)
            # Idle until the router's conntrack has forgotten the tunnel's mapping (a fixed idle
            # raced the keepalives: WireGuard's passive one 10 s after the last data, the 25 s
            # persistent one), then at once the open side's first packet: lost.
            drop_disco(router)
            started = time.monotonic()
            while mapping_alive(router, nat.port):
                assert time.monotonic() - started < 22.0, "the NAT kept the tunnel's mapping for 22 s idle"
                time.sleep(0.2)
            print(f"the mapping died {time.monotonic() - started:.1f} s into the idle")
            assert not bed.ping(open_, nat_ip, count=1, wait=2.0), "arrived: the test proves nothing"
    finally:
        bed.close()
