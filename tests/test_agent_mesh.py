"""Agents in network namespaces form a mesh through a real coordinator, with real
WireGuard daemons (pywg's, and wireguard-go 2025 for one agent): no `wg` command."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshbed import MeshBed, mesh_bed, wait_for

pytestmark = pytest.mark.netns

PREFIX = "i13a"  # every namespace and link of this test starts with it
WGO = Path.home() / ".cache/pywg/peers/wireguard-go-0.0.20250522/bin/wireguard"


@pytest.fixture
def mesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MeshBed]:
    with mesh_bed(request, tmp_path, prefix=PREFIX, subnet="10.213.0.0/24", port=18213,
                  prefix4="100.100.0.0/16", prefix6="fd13:a::/48", count=4) as m:
        yield m


def test_mesh_forms_survives_the_coordinator_and_follows_removals(mesh: MeshBed) -> None:
    if not WGO.exists():
        pytest.fail(f"wireguard-go 2025 is needed at {WGO} (python3 tests/peers/install.py)")
    started = time.monotonic()
    mesh.up(1)
    mesh.up(2)
    mesh.up(3, daemon=str(WGO))
    addr = {i: mesh.addresses(i) for i in (1, 2, 3)}
    for i in (1, 2, 3):
        wait_for(f"agent{i} has its two peers", lambda i=i: len(mesh.peer_names(i)) == 2)
    for a in (1, 2, 3):
        for b in (1, 2, 3):
            if a != b:
                wait_for(f"agent{a} pings agent{b} over IPv4", lambda a=a, b=b: mesh.ping(a, addr[b][0]))
                wait_for(f"agent{a} pings agent{b} over IPv6", lambda a=a, b=b: mesh.ping(a, addr[b][1]))
    print(f"three agents up to a full mesh of pings: {time.monotonic() - started:.2f} s")
    st = mesh.status(1)
    assert st["coordinatorConnected"] is True
    assert all(p["lastHandshake"] for p in st["peers"])  # type: ignore[index, union-attr]
    assert st["device"]["implementation"] == "pywg" and "backend" in st["device"]["crypto"]  # type: ignore[index]
    assert st["device"]["data_path"]  # type: ignore[index]
    assert mesh.status(3)["device"] == {"implementation": "other (UAPI only)", "engine": "daemon"}
    assert "token" not in json.dumps(st) and "private" not in json.dumps(st).lower()
    assert oct((mesh.tmp / "agent1" / "node.json").stat().st_mode & 0o777) == "0o600"
    assert oct((mesh.tmp / "agent1").stat().st_mode & 0o777) == "0o700"

    # The coordinator dies: the tunnels keep carrying pings.
    mesh.kill_coordinator()
    wait_for("agent1 sees the coordinator gone", lambda: mesh.status(1).get("coordinatorConnected") is False)
    for b in (2, 3):
        assert mesh.ping(1, addr[b][0], count=5)
    # It comes back: the agents reconnect and a fourth agent is seen by all.
    mesh.start_coordinator()
    for i in (1, 2, 3):
        wait_for(f"agent{i} reconnected", lambda i=i: mesh.status(i).get("coordinatorConnected") is True)
    mesh.up(4)
    addr[4] = mesh.addresses(4)
    for a in (1, 2, 3):
        wait_for(f"agent{a} pings agent4", lambda a=a: mesh.ping(a, addr[4][0]))

    # A node removed through the CLI leaves every other node's peers within seconds.
    node2 = str(mesh.status(2)["nodeId"])
    mesh.stop(2)  # stop it first, or it would register again
    mesh.remove_node(node2)
    t0 = time.monotonic()
    for a in (1, 3, 4):
        wait_for(f"agent{a} dropped agent2", lambda a=a: "agent2" not in mesh.peer_names(a), timeout=10)
    print(f"removal reached every agent in {time.monotonic() - t0:.2f} s")
    assert not mesh.ping(1, addr[2][0])


def test_time_from_agent_up_to_first_ping(mesh: MeshBed) -> None:
    """Median over runs of: `agent up` on a fresh node -> first ping reply from a running peer."""
    mesh.up(1)
    a1 = mesh.addresses(1)
    times = []
    for run, i in enumerate((2, 3, 4, 2, 3)):
        state = mesh.state(i)
        if i in mesh.procs:
            node = str(mesh.status(i)["nodeId"])
            mesh.stop(i)
            mesh.del_interface(i)
            mesh.remove_node(node)
            shutil.rmtree(state)
        t0 = time.monotonic()
        mesh.up(i)
        wait_for(f"run {run}: agent{i} pings agent1", lambda i=i: mesh.ping(i, a1[0], wait=1), timeout=30)
        times.append(time.monotonic() - t0)
    print(f"agent up -> first ping reply: median {statistics.median(times):.2f} s, all {[round(t, 2) for t in times]}")
    assert statistics.median(times) < 10


def test_a_refused_token_makes_the_agent_register_again(mesh: MeshBed) -> None:
    mesh.up(1)
    mesh.up(2)
    mesh.addresses(1)
    old = str(mesh.addresses(2) and mesh.status(2)["nodeId"])
    wait_for("agent1 has agent2", lambda: mesh.peer_names(1) == {"agent2"})
    mesh.remove_node(old)
    new = wait_for("agent2 registered again",
                   lambda: mesh.status(2).get("nodeId") not in (None, old) and mesh.status(2))
    wait_for("agent1 pings agent2 at its new address", lambda: mesh.ping(1, str(new["internalIp"])))
    assert mesh.peer_names(1) == {"agent2"}
