"""Rekeying in real time (``make test-long``; deselected in ``make test``): a pywg daemon
and each real peer keep a tunnel busy past REKEY_AFTER_TIME, pywg in both roles at once
(two beds): where pywg initiated the session it starts the new handshake itself; where
the peer did, pywg answers the peer's. No ping is lost across the change of session and
``wg show`` on pywg's side shows the newer handshake."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
from needs import require_bed, require_implementation

from pywg.device.stats_server import read_stats
from pywg.protocol.constants import REKEY_AFTER_TIME
from pywg.testing.netns import PEER_IMPLEMENTATIONS, Bed, ping
from pywg.testing.tunnel import Side, tunnel

pytestmark = [pytest.mark.netns, pytest.mark.long]

INTERVAL = 0.5


def pywg_view(side: Side, peer: Side) -> int:
    """The latest handshake pywg's ``wg show`` reports for the peer (a Unix time)."""
    return int(side.daemon.peers()[peer.public]["latest_handshake"])


@pytest.mark.parametrize("peer", [pytest.param(p, id=p.replace("-", "_")) for p in PEER_IMPLEMENTATIONS])
def test_rekey_across_rekey_after_time(peer: str) -> None:
    require_bed()
    require_implementation(peer)
    with Bed(tag=f"{os.getpid()}i") as bed_i, Bed(tag=f"{os.getpid()}r") as bed_r:
        tunnels = {"pywg initiates": tunnel(bed_i, "pywg", peer), f"{peer} initiates": tunnel(bed_r, peer, "pywg")}
        first = {}
        for role, (a, b) in tunnels.items():
            ping(a.ns, b.tunnel4)  # A initiates the session
            pywg, other = (a, b) if a.daemon.impl == "pywg" else (b, a)
            first[role] = pywg_view(pywg, other)
        seconds = int(REKEY_AFTER_TIME) + 15
        pingers = {role: subprocess.Popen(
            ["ip", "netns", "exec", a.ns, "ping", "-n", "-q", "-i", str(INTERVAL), "-w", str(seconds), b.tunnel4],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for role, (a, b) in tunnels.items()}
        outputs = {role: p.communicate(timeout=seconds + 30)[0].decode() for role, p in pingers.items()}
        for role, (a, b) in tunnels.items():
            out = outputs[role]
            match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            assert match, f"{role}: {out}"
            sent, received = map(int, match.groups())
            pywg, other = (a, b) if a.daemon.impl == "pywg" else (b, a)
            stats = read_stats(pywg.ifname)
            drops = {k: v for k, v in stats.items() if "drops" in k}
            assert sent >= seconds / INTERVAL * 0.9 and received == sent, f"{role}: {out}; pywg: {drops}"
            latest = pywg_view(pywg, other)
            assert latest >= first[role] + REKEY_AFTER_TIME - 5, f"{role}: no rekey ({first[role]} -> {latest})"
            assert latest <= time.time()
            ping(b.ns, a.tunnel6)  # and the new session carries the other direction and IPv6
