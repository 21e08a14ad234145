"""Key rotation for real, under a 100-per-second ping, in two network namespaces.

- Two pywg daemons: node A rotates its key with the KeyManager, through the pywg UAPI
  extension keys (B renames A's peer, A promotes its new key and starts a handshake
  with it): not one ping is lost, B knows A only by its new key, and a handshake with
  the new key completed after the promotion.
- pywg A against wireguard-go B: the same KeyManager call falls back to replacing A's
  peer on B (wireguard-go answers -22 to the extension keys). B's sessions with A end,
  so some pings are lost until A's handshake with the new key completes; the
  interruption (lost pings x 10 ms) is measured, printed and must stay below one
  REKEY_TIMEOUT.
- The plainest rotation, with the stock ``wg`` only (``wg set B peer OLD remove``, then
  the new key as a peer of B, then ``wg set A private-key NEW``): measured the same way.

The daemons were set up with ``wg`` (pywg.testing.tunnel); the KeyManager reaches them
through a TunnelManager whose UapiBackend talks to their existing sockets.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pywg.manage.backends import UapiBackend
from pywg.manage.key import Key
from pywg.manage.keymanager import KeyManager
from pywg.manage.keystore import KeyStore
from pywg.manage.tunnel import TunnelManager
from pywg.manage.uapi_client import exchange as uapi_exchange
from pywg.manage.uapi_client import get as uapi_get
from pywg.protocol.constants import REKEY_TIMEOUT
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.testing.netns import Bed, ping
from pywg.testing.tunnel import Side, b64, connect, make_side, tunnel
from pywg.uapi.protocol import IPC_ERROR_INVALID

pytestmark = pytest.mark.netns

INTERVAL = 0.01  # 100 pings a second


@dataclass
class PingResult:
    transmitted: int
    received: int
    longest_loss: int  # the longest run of consecutive pings that got no answer
    max_rtt: float  # seconds; a packet held behind a handshake comes back late, not lost

    @property
    def lost(self) -> int:
        return self.transmitted - self.received

    @property
    def interruption(self) -> float:
        """How long the tunnel carried nothing, at most: the longest run of lost pings
        (one every INTERVAL), or the slowest answer if that is longer."""
        return max(self.longest_loss * INTERVAL, self.max_rtt)

    def __str__(self) -> str:
        return (f"{self.lost} of {self.transmitted} pings lost (longest run {self.longest_loss}), "
                f"slowest answer {self.max_rtt * 1000:.1f} ms: interruption ~{self.interruption * 1000:.0f} ms")


class Pings:
    """``ping -i 0.01 -c COUNT`` from namespace A in the background."""

    def __init__(self, bed: Bed, destination: str, count: int) -> None:
        self.count = count
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", bed.ns_a, "ping", "-n", "-i", str(INTERVAL), "-c", str(count),
             "-W", "2", destination], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def result(self) -> PingResult:
        out, _ = self.process.communicate(timeout=self.count * INTERVAL + 60)
        text = out.decode()
        found = re.search(r"(\d+) packets transmitted, (\d+) received", text)
        assert found, f"no ping summary: {text}"
        answers = {int(seq): float(rtt) / 1000
                   for seq, rtt in re.findall(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms", text)}
        longest = run = 0
        for seq in range(1, int(found[1]) + 1):
            run = 0 if seq in answers else run + 1
            longest = max(longest, run)
        return PingResult(int(found[1]), int(found[2]), longest, max(answers.values(), default=0.0))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def warm_up(bed: Bed, b: Side) -> None:
    """A session exists before the rotation starts (its first packet waited for it)."""
    ping(bed.ns_a, b.tunnel4, count=3, interval=0.1)


async def rotate(tmp_path: Path, a: Side, b: Side, *, overlap: float = 1.0) -> Key:
    manager = TunnelManager(UapiBackend())
    keys = KeyManager(KeyStore(tmp_path / "keys", use_credentials=False), manager)
    keys.store_private_key(a.ifname, Key.parse(a.private))
    try:
        return await keys.rotate_keys(a.ifname, peers=[(manager, b.ifname)], overlap=overlap)
    finally:
        await keys.aclose()


def handshakes(side: Side) -> dict[str, int]:
    """Completed handshakes per peer (base64 key), from the pywg stats socket."""
    counts = asyncio.run(UapiBackend().handshake_counts(side.ifname))
    assert counts is not None, f"no stats socket for {side.ifname}"
    return {b64(key): n for key, n in counts.items()}


@pytest.mark.parametrize("env", [pytest.param({}, id="threaded-datapath"),
                                 pytest.param({"PYWG_THREADS": "0"}, id="event-loop-datapath")])
def test_rotation_between_pywg_nodes_loses_no_packet(bed: Bed, tmp_path: Path, env: dict[str, str]) -> None:
    a, b = tunnel(bed, "pywg", "pywg", env=env)
    warm_up(bed, b)
    before = handshakes(a)[b.public]
    pings = Pings(bed, b.tunnel4, 400)
    try:
        time.sleep(1.0)  # rotate in the middle of the stream
        started = time.time_ns()
        new = asyncio.run(rotate(tmp_path, a, b))
        result = pings.result()
    finally:
        pings.kill()
    print(f"\nrotation between pywg nodes: {result}")
    assert result.transmitted == 400 and result.received == 400, f"pings lost during the rotation: {result}"
    # B knows A only by the new key, and A uses it.
    assert set(b.daemon.peers()) == {new.to_base64()}
    assert a.wg("show", a.ifname, "public-key").strip() == new.to_base64() != a.public
    # A handshake with the new key completed after the rotation began (A's rekey).
    assert handshakes(a)[b.public] > before
    snapshot = asyncio.run(uapi_get(a.daemon.uapi_socket))
    assert snapshot.peers[0].last_handshake_ns is not None and snapshot.peers[0].last_handshake_ns > started
    # And the tunnel still works both ways after the overlap ended.
    ping(bed.ns_b, a.tunnel4, count=2, interval=0.1)


def test_rotation_against_wireguard_go_is_bounded_by_one_handshake(bed: Bed, tmp_path: Path) -> None:
    a, b = tunnel(bed, "pywg", "wireguard-go")
    warm_up(bed, b)
    old = a.public
    # wireguard-go answers -22 to pywg's extension keys, and changes nothing.
    shown = b.wg("show", b.ifname, "dump")
    for request in (f"set=1\npywg_secondary_private_key={dh_generate().hex()}\n\n",
                    (f"set=1\npublic_key={Key.parse(old).hex()}\nupdate_only=true\n"
                    f"pywg_rename_to={dh_pubkey(dh_generate()).hex()}\n\n")):
        assert asyncio.run(uapi_exchange(b.daemon.uapi_socket, request)) == f"errno={IPC_ERROR_INVALID}\n\n"
    assert b.wg("show", b.ifname, "dump") == shown
    pings = Pings(bed, b.tunnel4, 800)
    try:
        time.sleep(1.0)
        new = asyncio.run(rotate(tmp_path, a, b))
        result = pings.result()
    finally:
        pings.kill()
    print(f"\nrotation against wireguard-go (KeyManager: B's peer replaced, A rekeys): {result}")
    assert result.transmitted == 800 and result.interruption < REKEY_TIMEOUT
    peers = b.daemon.peers()
    assert set(peers) == {new.to_base64()} and old not in peers
    assert peers[new.to_base64()]["allowed_ips"] == f"{a.tunnel4}/32,{a.tunnel6}/128"
    assert peers[new.to_base64()]["preshared_key"] != "(none)"  # the preshared key came along
    ping(bed.ns_b, a.tunnel4, count=2, interval=0.1)


def test_plain_rotation_with_wg_against_wireguard_go(bed: Bed) -> None:
    """No pywg extension at all: what any WireGuard user can do with ``wg set``."""
    a = make_side(bed, bed.ns_a, "pywg", 1)
    b = make_side(bed, bed.ns_b, "wireguard-go", 2)
    psk = b64(dh_generate())
    bed.set_wg_peer(a.daemon, b.public, allowed_ips=f"{b.tunnel4}/32", endpoint=f"{bed.outer_b}:{b.port}",
                    preshared_key=psk)
    bed.set_wg_peer(b.daemon, a.public, allowed_ips=f"{a.tunnel4}/32", preshared_key=psk)
    warm_up(bed, b)
    new_private = dh_generate()
    new_public = b64(dh_pubkey(new_private))
    key_file = bed.secret_file("rotated.key", b64(new_private))
    pings = Pings(bed, b.tunnel4, 800)
    try:
        time.sleep(1.0)
        endpoint = b.daemon.peers()[a.public]["endpoint"]
        b.wg("set", b.ifname, "peer", a.public, "remove")
        bed.set_wg_peer(b.daemon, new_public, allowed_ips=f"{a.tunnel4}/32", endpoint=endpoint, preshared_key=psk)
        a.wg("set", a.ifname, "private-key", str(key_file))  # ends A's sessions: a handshake at once
        result = pings.result()
    finally:
        pings.kill()
    print(f"\nplain rotation with wg (pywg A, wireguard-go B): {result}")
    assert result.transmitted == 800 and result.interruption < REKEY_TIMEOUT
    assert set(b.daemon.peers()) == {new_public}


def test_cli_key_rotate(bed: Bed, tmp_path: Path) -> None:
    """`pywg key rotate IFNAME --keystore DIR --peer PEER`: the interface uses the printed key
    at once, the key is in the keystore (0600 in 0700), the peer knows the new key, the
    running session keeps carrying traffic (tests/test_cli_rotation.py has the rest)."""
    a = make_side(bed, bed.ns_a, "pywg", 1)
    b = make_side(bed, bed.ns_b, "pywg", 2)
    connect(bed, a, b)
    ping(a.ns, b.tunnel4)
    store = tmp_path / "keys"
    out = subprocess.run(["ip", "netns", "exec", a.ns, sys.executable, "-m", "pywg.cli", "key", "rotate",
                          a.ifname, "--keystore", str(store), "--peer", b.ifname, "--overlap", "0"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    new_public = out.stdout.strip()
    assert new_public != a.public and len(new_public) == 44
    assert a.daemon.wg("show", a.ifname, "public-key").strip() == new_public
    assert set(b.daemon.peers()) == {new_public}
    assert (store / a.ifname).stat().st_mode & 0o777 == 0o600 and store.stat().st_mode & 0o777 == 0o700
    ping(a.ns, b.tunnel4)  # the session made with the old key still carries traffic
