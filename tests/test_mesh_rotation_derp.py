"""Issue 15: DERP relaying survives a key rotation. Two agents behind symmetric NATs (no
punch: they reach each other only through ``pywg derp serve``) ping each other at 50 a
second; one runs ``pywg agent rotate``. Its DERP node key is its WireGuard key, so the
peer addresses the new key once the coordinator pushes it: the rotated agent must be on the DERP server
under that key, and keep the old key's connection while the old key is still accepted.
The ping must never stop for more than a second, lose at most a few packets, keep flowing
after the overlap (old key dropped), and again after the rotated agent restarts; both
sides report the path "derp" and the peer knows the new key.

Everything is real (tests/natmeshbed.py): the CLI, the engines, nftables NATs, the relay.
"""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Iterator

import natmeshbed as nb
import pytest
from meshbed import wait_for
from natmeshbed import Agent, NatMeshBed
from needs import nat_lab

from pywg.testing.natlab import NatLab

pytestmark = pytest.mark.netns

OVERLAP = 4.0  # seconds the old key stays accepted after the new one is in use
RATE = 50  # pings a second
MAX_GAP = 1.0  # seconds without a reply, at most, across the rotation
MAX_LOST = 10  # pings lost across the rotation, at most (0.2 s at 50/s)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatMeshBed]:
    with nat_lab() as lab:
        mesh = NatMeshBed(lab, tmp_path_factory.mktemp("derprot"), port=18351, derp=("pywg",), derp_base=50,
                          prefix="h15x")
        try:
            yield mesh
        finally:
            mesh.close()


def relayed_both_ways(bed: NatMeshBed, a: Agent, b: Agent, timeout: float) -> None:
    for x, y in ((a, b), (b, a)):
        entry = bed.wait_path(x, y, ("derp",), timeout)
        assert entry["region"] == nb.DERP_REGION, entry


def gaps(times: list[float]) -> float:
    return max((q - p for p, q in itertools.pairwise(times)), default=0.0)


def pinging(bed: NatMeshBed, a: Agent, ip: str, seconds: float) -> tuple[int, int, list[float]]:
    """Ping ``ip`` from ``a`` at RATE for ``seconds``: (sent, received, reply times)."""
    pinger = bed.pinger(a, ip, interval=1 / RATE)
    time.sleep(seconds)
    out = nb.stop_pinger(pinger)
    sent, got = nb.ping_summary(out)
    return sent, got, nb.reply_times(out)


def node_key(bed: NatMeshBed, agent: Agent) -> str:
    """The DERP node key of the agent's relay (``pywg stats``), as a WireGuard key (base64)."""
    return base64.b64encode(bytes.fromhex(str(bed.stats(agent)["relay"]["node_key"]).split(":")[-1])).decode()


def test_relayed_tunnel_survives_a_key_rotation_its_overlap_and_a_restart(bed: NatMeshBed) -> None:
    lab: NatLab = bed.lab
    with bed.pair(nb.router_for(lab, nb.SYM), nb.router_for(lab, nb.SYM)) as (a, b):
        ip_b = bed.wait_registered(b)[0]
        bed.wait_registered(a)
        relayed_both_ways(bed, a, b, 25.0)
        assert bed.ping(a, ip_b, count=3, interval=0.2, wait=3.0), "no ping a -> b through DERP"
        old = bed.status_file(b)["publicKey"]
        assert node_key(bed, b) == old

        # b rotates while a and b ping each other at 50/s.
        ip_a = bed.wait_registered(a)[0]
        pingers = {"a -> b": bed.pinger(a, ip_b, interval=1 / RATE), "b -> a": bed.pinger(b, ip_a, interval=1 / RATE)}
        time.sleep(1.0)
        started = time.time()
        new = bed.pywg("agent", "rotate", "--state-dir", str(b.state), "--overlap", str(OVERLAP),
                       "--timeout", "60", ns=b.ns).strip()
        rotated_in = time.time() - started
        assert new and new != old
        # The peer's handshake with the new key came through DERP at once (the rotation waits
        # for it; a lost one means REKEY_TIMEOUT, 5 s, or the 20 s confirmation bound).
        assert rotated_in < 3.0, f"the rotation took {rotated_in:.2f} s"
        time.sleep(2.0)
        for direction, pinger in pingers.items():
            out = nb.stop_pinger(pinger)
            sent, got = nb.ping_summary(out)
            times = [t for t in nb.reply_times(out) if t >= started - 1.0]
            gap = gaps(times)
            print(f"{direction}: rotation took {rotated_in:.2f} s; ping across it {got}/{sent} "
                  f"(lost {sent - got}), longest gap {gap:.2f} s")
            assert times and times[-1] > started + rotated_in + 1.0, f"{direction}: no reply after the rotation"
            assert gap < MAX_GAP, f"{direction}: the ping stopped for {gap:.2f} s across the rotation"
            assert sent - got <= MAX_LOST, f"{direction}: lost {sent - got} of {sent} across the rotation"
        assert node_key(bed, b) == new, "b's relay is still on the DERP server under its old key"
        wait_for("a to know b by its new key", lambda: (e := bed.peer(a, b)) is not None
                 and e.get("publicKey") == new, 10.0)

        # The overlap ends (the old key is dropped): still relayed, still flowing.
        wait_for("b's rotation to end", lambda: bed.status_file(b).get("rotation", 1) is None, OVERLAP + 10.0)
        sent, got, _ = pinging(bed, a, ip_b, 2.0)
        print(f"after the overlap: ping {got}/{sent}; a's drops: {bed.stats(a)['device_drops']}")
        assert sent >= RATE and sent - got <= 1, f"lost {sent - got} of {sent} after the overlap"
        relayed_both_ways(bed, a, b, 5.0)
        status = bed.status(a)
        entry = next(p for p in status["peers"] if p["name"] == b.name)
        assert entry["path"] == "derp" and entry["publicKey"] == new, entry

        # b restarts: its relay comes back under the new key (the KeyStore's), so does the tunnel.
        bed.restart(b)
        wait_for("b's relay to run again", lambda: _relay_key(bed, b) == new, 20.0)
        relayed_both_ways(bed, a, b, 25.0)
        assert bed.ping(a, ip_b, count=20, interval=0.05, wait=3.0), "no ping a -> b after b restarted"
        assert bed.ping(b, ip_a, count=20, interval=0.05, wait=3.0), "no ping b -> a after b restarted"


def _relay_key(bed: NatMeshBed, agent: Agent) -> str | None:
    try:
        stats = bed.stats(agent)
    except (RuntimeError, ValueError):
        return None
    return None if stats.get("relay") is None else node_key(bed, agent)
