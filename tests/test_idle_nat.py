"""Issue 14's keepalive "must hold" on the NAT lab: two agents behind port-restricted cones
whose UDP mappings time out after 30 s; the tunnel idle for 5 minutes (10 timeouts: no
health echoes, no data, only WireGuard's persistent keepalives, 25 s by default, just
inside the NATs' 30 s); then the other side's first packet still arrives.

The 5 minutes are a background scenario (tests/background.py): they run in a thread from
the session's start, on a lab of their own, while the rest of the suite runs; the test at
the end of the run reports what happened."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
from background import Scenario
from natmeshbed import NatMeshBed
from needs import nat_lab

from pywg.testing.natlab import NatType

pytestmark = pytest.mark.netns

NAT_TIMEOUT = 30
IDLE = 300.0  # 10 NAT timeouts


def idle_tunnel(stop: threading.Event) -> None:
    with tempfile.TemporaryDirectory(prefix="pywg-idle-") as tmp, nat_lab() as lab:
        ra = lab.add_router(NatType.PORT_RESTRICTED_CONE, mapping_timeout=NAT_TIMEOUT)
        rb = lab.add_router(NatType.PORT_RESTRICTED_CONE, mapping_timeout=NAT_TIMEOUT)
        bed = NatMeshBed(lab, Path(tmp), port=18241, prefix="h14i",
                         health_interval=3600.0)  # no echoes: only keepalives cross the NATs while idle
        try:
            with bed.pair(ra, rb, out=SCENARIO.output.append) as (a, b):
                a_ip, b_ip = bed.wait_direct(a, b)
                assert bed.ping(a, b_ip, count=2)
                for agent in (a, b):
                    keepalive = bed.status(agent).get("keepalive")
                    assert isinstance(keepalive, int) and 0 < keepalive < NAT_TIMEOUT, keepalive
                if stop.wait(IDLE):  # idle: no data either way
                    return  # the session ended first
                assert bed.ping(b, a_ip, count=1, wait=3.0), "the other side's first packet was lost"
        finally:
            bed.close()


SCENARIO = Scenario("idle tunnel behind 30 s NATs", idle_tunnel, timeout=IDLE + 240.0)


@pytest.mark.minutes
@pytest.mark.background(SCENARIO)
def test_an_idle_tunnel_behind_30_s_nat_timeouts_still_gets_the_first_packet_after_5_minutes() -> None:
    SCENARIO.result()
    print(f"the scenario took {SCENARIO.seconds:.0f} s, alongside the rest of the run")
