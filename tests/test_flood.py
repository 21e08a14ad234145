"""A short real flood on the namespace bed: hostile datagrams at the pywg daemon's port
(bench/flood_sender.py, bounded, aimed at the bed's address only). Afterwards the tunnel
still carries traffic, a fresh handshake succeeds, and every drop shows in ``pywg stats``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pywg.device.stats_server import read_stats
from pywg.testing.netns import Bed, ping, run
from pywg.testing.tunnel import tunnel

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parent.parent


def flood(bed: Bed, ns: str, kind: str, target: str, public: str, seconds: float, rate: int) -> dict[str, int]:
    argv = [sys.executable, "-m", "bench.flood_sender", kind, "--target", target, "--seconds", str(seconds),
            "--rate", str(rate), "--public-key", public, "--spoof-net", "10.250.0.0/16"]
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, cwd=ROOT, timeout=seconds + 30,
                          check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report: dict[str, int] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return report


def test_after_a_flood_the_tunnel_carries_traffic_and_a_new_handshake_succeeds(bed: Bed) -> None:
    a, b = tunnel(bed, "pywg", "pywg")
    run("ip", "route", "add", "10.250.0.0/16", "via", bed.outer_a, ns=bed.ns_b)
    ping(a.ns, b.tunnel4)
    target = f"{bed.outer_b}:{b.port}"
    sent = {kind: flood(bed, a.ns, kind, target, b.public, 1.0, 20_000)["sent"]
            for kind in ("garbage", "shaped", "mac1", "mac1-spoofed")}
    assert all(n > 5_000 for n in sent.values()), sent
    ping(a.ns, b.tunnel4, count=5, interval=0.1, wait=5)  # the session survived
    # A forgets its session: a new handshake with B, which may still be under load.
    a.wg("set", a.ifname, "peer", b.public, "remove")
    a.wg("set", a.ifname, "peer", b.public, "allowed-ips", f"{b.tunnel4}/32", "endpoint", target,
         "preshared-key", str(bed.workdir / f"{a.ifname}.psk"))
    start = time.monotonic()
    ping(a.ns, b.tunnel4, wait=10)
    assert time.monotonic() - start < 10
    stats = read_stats(b.ifname)
    drops = stats["engine_drops"]  # the screen's drops (in C, ahead of the engine) included
    assert stats["screen_drops"].get("unknown_protocol", 0) > 0, stats["screen_drops"]
    assert drops.get("unknown_protocol", 0) > 0 and drops.get("bad_mac1", 0) > 0, drops
    # Initiations with a valid mac1 were refused without a session: decrypt failures or cookies.
    assert drops.get("handshake_decrypt", 0) + drops.get("cookie_required", 0) > 0, drops
    assert b.daemon.process.poll() is None
