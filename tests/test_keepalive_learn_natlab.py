"""Keepalive learning end to end on the NAT lab: `pywg coordinator serve --nat-observer` in the
lab's internet, one `pywg agent up --engine in-process` behind a port-restricted cone whose UDP
mapping timeout is 6 s, another on the open host (no NAT). The agent behind the NAT learns the
mapping's lifetime from the observer on side sockets and keeps alive inside it (shown in
`pywg agent status --json` and in `wg show`); the open one keeps no keepalive. Idle for four
timeouts (no health echoes), the tunnel still receives the open side's first packet."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from natmeshbed import NatMeshBed

from pywg.testing.natlab import TOOLS, NatLab, NatType
from pywg.testing.netns import BedUnavailable, check_bed
from tests.needs import unavailable

pytestmark = pytest.mark.netns
TIMEOUT = 6
OBSERVER_PORT = 3479


@pytest.fixture
def lab() -> Iterator[NatLab]:
    try:
        check_bed(TOOLS)
    except BedUnavailable as exc:
        unavailable(f"the NAT lab: {exc}")
    with NatLab() as nat_lab:
        nat_lab.start_coturn()
        yield nat_lab


def test_the_agent_learns_a_6_s_nat_timeout_and_the_idle_tunnel_still_gets_the_first_packet(
        lab: NatLab, tmp_path: Path) -> None:
    router = lab.add_router(NatType.PORT_RESTRICTED_CONE, mapping_timeout=TIMEOUT)
    bed = NatMeshBed(lab, tmp_path, port=18231, health_interval=3600.0, prefix="h14k",
                     coordinator_args=lambda address: ["--nat-observer", f"{address}:{OBSERVER_PORT}"])
    started = time.monotonic()
    try:
        with bed.pair(router, None) as (nat, open_):
            nat_ip, _ = bed.wait_registered(nat)
            open_ip, _ = bed.wait_registered(open_)
            bed.wait_path(nat, open_)
            bed.wait_path(open_, nat)
            assert bed.ping(nat, open_ip, count=2)  # a WireGuard session, as any use makes one

            def learnt() -> dict[str, object] | None:
                own = bed.status(nat).get("nat") or {}
                return own if str(own.get("keepaliveSource", "")).startswith("learnt") else None

            deadline = time.monotonic() + 40
            own = None
            while own is None and time.monotonic() < deadline:
                own = learnt()
                time.sleep(0.5)
            assert own is not None, bed.status(nat).get("nat")
            took = time.monotonic() - started
            keepalive = bed.status(nat)["keepalive"]
            assert isinstance(keepalive, int) and 1 <= keepalive < TIMEOUT, own
            assert own["keepalive"] == keepalive and own["behindNat"] is True
            assert own["keepaliveLearning"]["state"] == "learnt"  # type: ignore[index]
            # the survived/died bounds bracket the router's timeout
            text = str(own["keepaliveSource"])
            survived = float(text.split("survived ")[1].split(" s")[0])
            died = float(text.split("died at ")[1].split(" s")[0])
            assert TIMEOUT - 2 <= survived < died <= TIMEOUT + 2, text
            # the WireGuard peer has it (as `wg show` reads the agent's UAPI socket)
            shown = subprocess.run(["ip", "netns", "exec", nat.ns, "wg", "show", nat.ifname, "persistent-keepalive"],
                                   capture_output=True, text=True, check=True).stdout.split()
            assert shown[1] == str(keepalive), shown
            # the open host found no NAT: no keepalive
            other = bed.status(open_)
            assert other["nat"]["behindNat"] is False and other["keepalive"] == 0, other["nat"]
            assert other["nat"]["keepaliveSource"] == "no NAT"
            status_text = bed.pywg("agent", "status", "--state-dir", str(nat.state))
            assert f"keepalive {keepalive} s" in status_text and "keepalive: learnt: mapping survived" in status_text
            print(f"learnt {text}, keepalive {keepalive} s, {took:.1f} s after start")
            time.sleep(4 * TIMEOUT)  # idle: no echoes, no data; only the keepalives cross the NAT
            assert bed.ping(open_, nat_ip, count=1, wait=2.0), "the other side's first packet was lost"
    finally:
        bed.close()
