"""Health end to end, real processes in network namespaces: a coordinator and three pywg
agents (each with its pywg-daemon) on one bridge. After pings the coordinator shows each
connection's handshake and bytes; an agent killed with SIGKILL is offline within three of
its report intervals while its tunnels live on (its daemon still runs); once its daemon
is killed too, its peers report it disconnected; `pywg agent down` stops an agent."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from meshbed import MeshBed, mesh_bed, sh, wait_for

from pywg.mesh.echoes import ECHO_TIMEOUT_S

pytestmark = pytest.mark.netns

PREFIX = "h13h"  # every namespace and link of this test starts with it
AGENTS = (1, 2, 3)
INTERVAL = 1.0  # --health-interval: the coordinator's window for these agents is 3 s;
SILENCE = ECHO_TIMEOUT_S + 2 * INTERVAL  # a peer whose two latest echoes went unanswered is disconnected


@pytest.fixture
def bed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MeshBed]:
    with mesh_bed(request, tmp_path, prefix=PREFIX, subnet="10.216.0.0/24", port=18216, prefix4="100.116.0.0/16",
                  prefix6="fd16:a::/48", count=len(AGENTS)) as b:
        yield b


def test_health_reaches_the_coordinator_and_a_dead_node_goes_offline_then_disconnected(bed: MeshBed) -> None:
    for i in AGENTS:
        bed.up(i, health_interval=INTERVAL)
    addr = {i: bed.addresses(i)[0] for i in AGENTS}
    for a in AGENTS:
        for b in AGENTS:
            if a != b:
                wait_for(f"agent{a} pings agent{b}", partial(bed.ping, a, addr[b]))

    # Every node reports both peers connected, with a handshake, bytes both ways and the endpoint.
    def all_connected() -> bool:
        return all(set(c := bed.connections(f"agent{i}")) == {f"agent{j}" for j in AGENTS if j != i}
                   and all(x["status"] == "connected" and x["lastHandshake"] and x["rxBytes"] > 0
                           and x["txBytes"] > 0 for x in c.values()) for i in AGENTS)

    wait_for("every connection reported connected with its counters", all_connected, 15)
    nodes = bed.nodes()
    assert all(nodes[f"agent{i}"]["online"] and nodes[f"agent{i}"]["offlineAfter"] == 3 * INTERVAL for i in AGENTS)
    c12 = bed.connections("agent1")["agent2"]
    assert c12["endpoint"] == "10.216.0.3:51820"
    # The counters are the tunnel's: 50 pings (84-byte packets) later agent1's report has grown by them.
    assert bed.ping(1, str(addr[2]), count=50, interval=0.05)
    grown = wait_for("agent1's report to count the pings", lambda: (
        (c := bed.connections("agent1")["agent2"])["txBytes"] - c12["txBytes"] >= 50 * 84
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
    assert bed.ping(1, str(addr[3]), count=3, interval=0.05)
    assert bed.connections("agent1")["agent3"]["status"] == "connected"

    # Now the daemon dies too (the host is gone): its peers hear nothing and report it disconnected.
    os.kill(bed.daemon_pid(3), signal.SIGKILL)
    dead = time.monotonic()
    wait_for("agents 1 and 2 report agent3 disconnected", lambda: all(
        bed.connections(f"agent{i}")["agent3"]["status"] == "disconnected" for i in (1, 2)), SILENCE + 10)
    seen = time.monotonic() - dead
    print(f"agent3's peers report it disconnected {seen:.1f} s after its daemon died "
          f"(silence limit {SILENCE} s, report interval {INTERVAL} s)")
    assert seen <= SILENCE + 2 * INTERVAL + 3
    # The rest of the mesh is fine, both ways (each probes the other, so each hears the other).
    assert bed.connections("agent1")["agent2"]["status"] == bed.connections("agent2")["agent1"]["status"] == "connected"
    assert bed.nodes()["agent1"]["online"]

    # `pywg agent down` stops agent1 cleanly and removes its interface.
    t0 = time.monotonic()
    bed.pywg("agent", "down", "--state-dir", str(bed.state(1)), ns=1)
    assert bed.procs[1].wait(5) == 0
    print(f"agent down took {time.monotonic() - t0:.2f} s")
    assert f"{PREFIX}w1" not in sh("ip", "-n", bed.ns(1), "-o", "link", "show")
    assert not (bed.state(1) / "agent.pid").exists()
    assert bed.status(1)["running"] is False
    assert "not running (this status is stale" in bed.pywg("agent", "status", "--state-dir", str(bed.state(1)))
    wait_for("agent1 offline", lambda: not bed.nodes()["agent1"]["online"], 10)
