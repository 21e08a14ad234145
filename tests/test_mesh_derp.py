"""Issue 15 in the mesh on the NAT lab: agents whose NATs allow no punch reach each other
through DERP (``pywg derp serve`` and Tailscale's derper in the internet namespace, handed
out by ``pywg coordinator serve --derp-map``); a pair that can punch starts on DERP and
moves to direct without loss; a dead direct path falls back to DERP within 3 s; a killed
DERP server of a meshed region moves its clients to the other within 3 s.

Everything is real (tests/natmeshbed.py): the CLI, the engines, nftables NATs, the relays;
the tests read ``pywg agent status --json`` and ping through the tunnel.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import natmeshbed as nb
import pytest
from natmeshbed import Agent, NatMeshBed
from needs import nat_lab, unavailable

from pywg.testing.natlab import NatLab
from pywg.testing.netns import run

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    if not nb.DERPER.exists():
        unavailable(f"Tailscale's derper ({nb.DERPER}; make peers)")
    with nat_lab() as opened:
        yield opened


def make_bed(lab: NatLab, tmp: Path, kinds: tuple[str, ...], port: int, base: int, tls: bool = False) -> NatMeshBed:
    """A bed whose relays are on 203.0.113.(base + i) (each bed its own, they run at once)."""
    return NatMeshBed(lab, tmp, coordinators=1, port=port, derp=kinds, derp_base=base, derp_tls=tls)


@pytest.fixture(scope="module")
def bed(lab: NatLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatMeshBed]:
    """Two meshed ``pywg derp serve`` of region 900."""
    mesh = make_bed(lab, tmp_path_factory.mktemp("derpmesh"), ("pywg", "pywg"), 18321, 20)
    try:
        yield mesh
    finally:
        mesh.close()


def both_paths(bed: NatMeshBed, a: Agent, b: Agent, path: str, timeout: float) -> None:
    bed.wait_path(a, b, (path,), timeout)
    bed.wait_path(b, a, (path,), timeout)


def check_relayed(bed: NatMeshBed, a: Agent, b: Agent) -> None:
    """Both sides report path "derp" in region 900 and pings go through the tunnel both ways."""
    ip_a, ip_b = bed.wait_registered(a)[0], bed.wait_registered(b)[0]
    both_paths(bed, a, b, "derp", 25.0)
    for x, y in ((a, b), (b, a)):
        entry = bed.peer(x, y)
        assert entry is not None and entry["region"] == nb.DERP_REGION, entry
    assert bed.status_file(a)["nat"]["derp"]["homeRegion"] == nb.DERP_REGION
    assert bed.ping(a, ip_b, count=5, interval=0.2, wait=3.0), "no ping a -> b through DERP"
    assert bed.ping(b, ip_a, count=5, interval=0.2, wait=3.0), "no ping b -> a through DERP"
    for x, y in ((a, b), (b, a)):  # WireGuard itself sends to the relay, and the relay carried it
        assert device_endpoint(bed, x, y).startswith(f"derp:{nb.DERP_REGION}/"), device_endpoint(bed, x, y)
        relay = bed.stats(x)["relay"]
        assert relay["sent"] > 0 and relay["received"] > 0, relay


# test_mesh_nat.py's matrix without DERP: these pairs end "none"; with a DERP map, "derp".
NO_PUNCH = [(a, b) for a, b in nb.PAIRS if nb.expected(a, b) == "none"]


@pytest.mark.parametrize(("kind_a", "kind_b"), NO_PUNCH, ids=[f"{a}+{b}" for a, b in NO_PUNCH])
def test_pairs_without_a_punch_reach_each_other_through_pywg_derp(bed: NatMeshBed, lab: NatLab,
                                                                   kind_a: str, kind_b: str) -> None:
    with bed.pair(nb.router_for(lab, kind_a), nb.router_for(lab, kind_b)) as (a, b):
        check_relayed(bed, a, b)


def test_symmetric_pair_through_tailscales_derper(lab: NatLab, tmp_path_factory: pytest.TempPathFactory) -> None:
    derper_bed = make_bed(lab, tmp_path_factory.mktemp("derper"), ("derper",), 18322, 30)
    try:
        with derper_bed.pair(nb.router_for(lab, nb.SYM), nb.router_for(lab, nb.SYM)) as (a, b):
            check_relayed(derper_bed, a, b)
            derper = derper_bed.relays[0]
            assert derper.kind == "derper" and derper.process.poll() is None
            for x in (a, b):
                assert relay_server(derper_bed, x) == f"{derper.address}:{derper.port}"
    finally:
        derper_bed.close()


@pytest.mark.parametrize(("kind", "port", "base"), [("pywg", 18325, 60), ("derper", 18326, 70)])
def test_symmetric_pair_over_https_derp_with_a_pinned_self_signed_certificate(
        lab: NatLab, tmp_path_factory: pytest.TempPathFactory, kind: str, port: int, base: int) -> None:
    """The relay serves only HTTPS (`pywg derp serve --tls-cert/--tls-key`, derper -certmode
    manual), its DERP map node pins the certificate (CertName sha256-raw:...), and the agents
    run without --derp-plain-http, as in production with self-signed relays."""
    tls_bed = make_bed(lab, tmp_path_factory.mktemp(f"derp-tls-{kind}"), (kind,), port, base, tls=True)
    try:
        node = json.loads(tls_bed.derp_map.read_text())["Regions"][str(nb.DERP_REGION)]["Nodes"][0]  # type: ignore[union-attr]
        assert node["CertName"].startswith("sha256-raw:"), node
        with tls_bed.pair(nb.router_for(lab, nb.SYM), nb.router_for(lab, nb.SYM)) as (a, b):
            assert "--derp-plain-http" not in a.argv
            check_relayed(tls_bed, a, b)
            relay = tls_bed.relays[0]
            for x in (a, b):
                region = tls_bed.stats(x)["relay"]["regions"][str(nb.DERP_REGION)]
                assert region["connected"] and region["tls"] is True, region
                assert region["address"] == f"{relay.address}:{relay.port}", region
    finally:
        tls_bed.close()


def block(lab: NatLab, wan_a: str, wan_b: str) -> str:
    """An nft rule in the internet namespace drops UDP between two routers' WAN addresses."""
    table = "h15g_block"
    rules = (f"add table inet {table}\n"
             f"add chain inet {table} h15gfwd {{ type filter hook forward priority -10; policy accept; }}\n"
             f"add rule inet {table} h15gfwd ip saddr {wan_a} ip daddr {wan_b} meta l4proto udp drop\n"
             f"add rule inet {table} h15gfwd ip saddr {wan_b} ip daddr {wan_a} meta l4proto udp drop\n")
    return run("nft", "-f", "-", ns=lab.inet, input=rules.encode())


def unblock(lab: NatLab) -> None:
    run("nft", "delete", "table", "inet", "h15g_block", ns=lab.inet, check=False)


def device_endpoint(bed: NatMeshBed, agent: Agent, other: Agent) -> str:
    """The endpoint ``agent``'s device has for ``other`` (``pywg stats``): IP:port or derp:..."""
    key = bed.status_file(other)["publicKey"]
    peer = next(p for p in bed.stats(agent)["peers"] if p["public_key"] == key)
    return str(peer["endpoint"])


def relay_server(bed: NatMeshBed, agent: Agent, region: int = nb.DERP_REGION) -> str:
    """The DERP server the agent's relay is connected to in ``region`` (``pywg stats``)."""
    entry = bed.stats(agent)["relay"]["regions"][str(region)]
    assert entry["connected"], entry
    return str(entry["address"])


def largest_gap(times: list[float], after: float) -> float:
    later = [t for t in times if t >= after - 1.0]
    return max((b - a for a, b in itertools.pairwise(later)), default=0.0)


def test_starts_on_derp_moves_to_direct_without_loss_and_falls_back_within_3s(
        bed: NatMeshBed, lab: NatLab) -> None:
    ra, rb = nb.router_for(lab, nb.FULL), nb.router_for(lab, nb.FULL)
    assert ra is not None and rb is not None
    block(lab, ra.wan_address, rb.wan_address)
    try:
        with bed.pair(ra, rb) as (a, b):
            ip_b = bed.wait_registered(b)[0]
            bed.wait_registered(a)
            both_paths(bed, a, b, "derp", 25.0)
            assert bed.ping(a, ip_b, count=3, interval=0.2, wait=3.0)
            pinger = bed.pinger(a, ip_b, interval=0.02)  # 50 a second
            time.sleep(1.0)
            unblock(lab)
            lifted = time.monotonic()
            both_paths(bed, a, b, "direct", 20.0)
            on_derp = time.monotonic() - lifted
            time.sleep(1.0)
            for x, y in ((a, b), (b, a)):  # WireGuard itself sends direct now (not just the status)
                assert not device_endpoint(bed, x, y).startswith("derp:"), device_endpoint(bed, x, y)
            out = nb.stop_pinger(pinger)
            sent, got = nb.ping_summary(out)
            print(f"DERP -> direct: {on_derp:.2f} s after the block was lifted; ping {got}/{sent}")
            assert sent >= 50 and got == sent, f"lost {sent - got} of {sent} across the move to direct"

            # The direct path dies: back to DERP, the ping resumes within 3 s.
            pinger = bed.pinger(a, ip_b, interval=0.02)
            time.sleep(1.0)
            dropped_at = time.time()
            block(lab, ra.wan_address, rb.wan_address)
            bed.wait_path(a, b, ("derp",), 10.0)
            time.sleep(2.0)
            for x, y in ((a, b), (b, a)):
                assert device_endpoint(bed, x, y).startswith("derp:"), device_endpoint(bed, x, y)
            out = nb.stop_pinger(pinger)
            gap = largest_gap(nb.reply_times(out), dropped_at)
            print(f"direct -> DERP: replies stopped for {gap:.2f} s")
            assert gap < 3.0, f"the ping stopped for {gap:.2f} s after the direct path died"
            unblock(lab)
    finally:
        unblock(lab)


def test_killing_the_derp_server_in_use_moves_clients_to_the_other_within_3s(
        lab: NatLab, tmp_path_factory: pytest.TempPathFactory) -> None:
    mesh = make_bed(lab, tmp_path_factory.mktemp("derpfail"), ("pywg", "pywg"), 18323, 40)
    try:
        with mesh.pair(nb.router_for(lab, nb.SYM), nb.router_for(lab, nb.SYM)) as (a, b):
            ip_b = mesh.wait_registered(b)[0]
            mesh.wait_registered(a)
            both_paths(mesh, a, b, "derp", 25.0)
            assert mesh.ping(a, ip_b, count=3, interval=0.2, wait=3.0)
            first, second = mesh.relays  # both clients prefer the region's first node
            for x in (a, b):
                assert relay_server(mesh, x) == f"{first.address}:{first.port}"
            pinger = mesh.pinger(a, ip_b, interval=0.02)
            time.sleep(1.0)
            killed_at = time.time()
            first.process.kill()
            first.process.wait(5)
            time.sleep(4.0)
            out = nb.stop_pinger(pinger)
            gap = largest_gap(nb.reply_times(out), killed_at)
            print(f"DERP failover: replies stopped for {gap:.2f} s")
            assert nb.reply_times(out)[-1] > killed_at + 2.0, "no reply after the server was killed"
            for x in (a, b):  # both moved to the region's other node
                assert relay_server(mesh, x) == f"{second.address}:{second.port}"
            assert gap < 3.0, f"the ping stopped for {gap:.2f} s after the DERP server died"
    finally:
        mesh.close()


def home_region(bed: NatMeshBed, agent: Agent) -> int | None:
    return bed.status_file(agent).get("nat", {}).get("derp", {}).get("homeRegion")


def wait_home(bed: NatMeshBed, agents: tuple[Agent, ...], region: int, timeout: float) -> None:
    nb.wait_for(f"home region {region} on {', '.join(a.name for a in agents)}",
                lambda: all(home_region(bed, a) == region for a in agents), timeout)


def test_the_home_region_moves_when_its_relay_dies_and_the_traffic_follows(
        lab: NatLab, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two regions, one relay each (900 favoured by the map's RegionScore); a symmetric pair
    relays through 900. Its relay is killed: both agents measure again (--derp-remeasure 2),
    move home to 901, tell the coordinator, and the ping through the tunnel resumes."""
    regions = NatMeshBed(lab, tmp_path_factory.mktemp("derphome"), port=18327, derp=("pywg", "pywg"),
                         derp_base=80, derp_regions=True)
    try:
        first, second = regions.relays
        regions.write_derp_map(regions.relays, score={second.region: 5.0})
        regions.restart_coordinator()
        with regions.pair(nb.router_for(lab, nb.SYM), nb.router_for(lab, nb.SYM),
                          extra=("--derp-remeasure", "2")) as (a, b):
            ip_b = regions.wait_registered(b)[0]
            regions.wait_registered(a)
            both_paths(regions, a, b, "derp", 25.0)
            wait_home(regions, (a, b), first.region, 10.0)
            assert regions.ping(a, ip_b, count=3, interval=0.2, wait=3.0)
            pinger = regions.pinger(a, ip_b, interval=0.02)
            time.sleep(1.0)
            killed_at = time.time()
            first.process.kill()
            first.process.wait(5)
            wait_home(regions, (a, b), second.region, 15.0)
            moved = time.time() - killed_at
            time.sleep(3.0)
            out = nb.stop_pinger(pinger)
            times = nb.reply_times(out)
            gap = largest_gap(times, killed_at)
            print(f"home region {first.region} -> {second.region} {moved:.2f} s after its relay died; "
                  f"replies stopped for {gap:.2f} s")
            assert times and times[-1] > killed_at + moved, "no reply after the home moved"
            for x in (a, b):
                assert relay_server(regions, x, second.region) == f"{second.address}:{second.port}"
                assert regions.peer(x, b if x is a else a)["region"] == second.region  # type: ignore[index]
            assert gap < 10.0, f"the ping stopped for {gap:.2f} s"
    finally:
        regions.close()


def test_a_changed_derp_map_is_followed_a_new_relay_in_the_new_region(
        lab: NatLab, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The coordinator starts with region 900 only, then (restarted) hands out a map with
    region 901 only: the agents run a new relay there, move home, and the tunnel carries on."""
    regions = NatMeshBed(lab, tmp_path_factory.mktemp("derpmapchange"), port=18328, derp=("pywg", "pywg"),
                         derp_base=90, derp_regions=True)
    try:
        first, second = regions.relays
        regions.write_derp_map([first])
        regions.restart_coordinator()
        with regions.pair(nb.router_for(lab, nb.SYM), nb.router_for(lab, nb.SYM)) as (a, b):
            ip_b = regions.wait_registered(b)[0]
            regions.wait_registered(a)
            both_paths(regions, a, b, "derp", 25.0)
            wait_home(regions, (a, b), first.region, 10.0)
            assert regions.ping(a, ip_b, count=3, interval=0.2, wait=3.0)
            regions.write_derp_map([second])
            changed_at = time.time()
            regions.restart_coordinator()
            wait_home(regions, (a, b), second.region, 20.0)
            nb.wait_for("a ping over the new region", lambda: regions.ping(a, ip_b, count=1, wait=1.0), 20.0)
            print(f"DERP map changed: pings through region {second.region} {time.time() - changed_at:.2f} s "
                  "after the coordinator restarted")
            for x in (a, b):
                assert relay_server(regions, x, second.region) == f"{second.address}:{second.port}"
                assert str(regions.stats(x)["relay"]["home"]) == str(second.region)
    finally:
        regions.close()

