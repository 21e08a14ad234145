"""pywg's engine on a plain UDP socket in namespace A, a real peer (configured with the
stock ``wg``) in namespace B: each of wireguard-go 0.0.20250522, boringtun 0.7.1 and
Debian's wireguard-go 0.0.20220316 (``peer``). Handshakes both ways, with and without a
preshared key, ICMP echo through the tunnel each way, a forced rekey (pywg's clock moved
past REKEY_AFTER_TIME; the real-time one is in test_long_rekey.py), and a cookie round
trip. A peer that is not installed fails the test under CI=true (``make peers``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from needs import require_implementation

from pywg.device.udp_engine import UdpEngine
from pywg.protocol.actions import DropReason
from pywg.protocol.constants import MESSAGE_INITIATION, REKEY_AFTER_TIME
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.testing.netns import PEER_IMPLEMENTATIONS, Bed, Daemon
from pywg.testing.pinger import Pinger

pytestmark = pytest.mark.netns

TUNNEL_A, TUNNEL_B = "10.202.0.1", "10.202.0.2"
WG_PORT = 51820


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@dataclass
class Tunnel:
    engine: UdpEngine
    pinger: Pinger
    wgo: Daemon
    wgo_public: bytes

    def dump(self) -> list[str]:
        """The peer line of ``wg show IF dump`` (wireguard-go's view of pywg)."""
        return self.wgo.wg("show", self.wgo.ifname, "dump").splitlines()[1].split("\t")


# Each test runs against each real peer (the implementation in namespace B).
PEERS = [pytest.param(impl, id=impl.replace("-", "_")) for impl in PEER_IMPLEMENTATIONS]


@contextlib.asynccontextmanager
async def tunnel(bed: Bed, peer: str, *, psk: bytes | None, pywg_initiates: bool) -> AsyncIterator[Tunnel]:
    """``peer`` in B and pywg's engine in A, each knowing the other; nothing sent yet."""
    require_implementation(peer)
    pywg_private, wgo_private = dh_generate(), dh_generate()
    wgo = bed.start_interface(bed.ns_b, bed.unique_ifname(), impl=peer, addresses=[f"{TUNNEL_B}/24"],
                              private_key=b64(wgo_private), listen_port=WG_PORT)
    engine = await UdpEngine.start(pywg_private, bed.udp_socket(bed.ns_a, bed.outer_a))
    try:
        wgo_public = dh_pubkey(wgo_private)
        engine.dispatcher.add_peer(
            wgo_public, preshared_key=psk,
            endpoint=(bed.outer_b, WG_PORT) if pywg_initiates else None)
        bed.set_wg_peer(wgo, b64(dh_pubkey(pywg_private)), allowed_ips=f"{TUNNEL_A}/32",
                        preshared_key=b64(psk) if psk else None,
                        endpoint=None if pywg_initiates else f"{bed.outer_a}:{engine.local_address[1]}")
        yield Tunnel(engine, Pinger(engine, TUNNEL_A), wgo, wgo_public)
    finally:
        engine.close()


async def ping_from_b(bed: Bed, *, wait: int = 10) -> str:
    """The stock ping in namespace B through the peer to pywg's tunnel address."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", bed.ns_b, "ping", "-n", "-c", "1", "-W", str(wait), TUNNEL_A,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"ping from B through the peer failed: {out.decode()}"
    return out.decode()


PSK_CASES = [pytest.param(None, id="no-psk"), pytest.param(bytes(range(32)), id="psk")]


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("psk", PSK_CASES)
def test_pywg_initiates(bed: Bed, peer: str, psk: bytes | None) -> None:
    async def scenario() -> None:
        async with tunnel(bed, peer, psk=psk, pywg_initiates=True) as t:
            rtt = await t.pinger.ping(t.wgo_public, TUNNEL_B)
            done = t.engine.handshakes.get_nowait()
            assert done.initiator and done.peer == t.wgo_public
            assert 0 < rtt < 5
            out = await ping_from_b(bed)
            assert "1 received" in out and t.pinger.answered == 1
            peer_line = t.dump()
            assert peer_line[2] == f"{bed.outer_a}:{t.engine.local_address[1]}"  # endpoint learnt
            if peer == "boringtun":  # it answers the seconds since the handshake, not a time
                assert 0 <= int(peer_line[4]) < 60
            else:
                assert int(peer_line[4]) > 0  # latest handshake
            assert int(peer_line[5]) > 0 and int(peer_line[6]) > 0  # rx and tx bytes
    asyncio.run(scenario())


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("psk", PSK_CASES)
def test_pywg_responds(bed: Bed, peer: str, psk: bytes | None) -> None:
    async def scenario() -> None:
        async with tunnel(bed, peer, psk=psk, pywg_initiates=False) as t:
            out = await ping_from_b(bed)
            assert "1 received" in out and t.pinger.answered == 1
            done = t.engine.handshakes.get_nowait()
            assert not done.initiator and done.peer == t.wgo_public
            assert t.engine.dispatcher.peers[t.wgo_public].endpoint == (bed.outer_b, WG_PORT)
            await t.pinger.ping(t.wgo_public, TUNNEL_B)
            assert t.engine.handshakes.empty()  # the one session serves both directions
    asyncio.run(scenario())


@pytest.mark.parametrize("impl", PEERS)
def test_rekey_after_rekey_after_time(bed: Bed, impl: str) -> None:
    async def scenario() -> None:
        async with tunnel(bed, impl, psk=None, pywg_initiates=True) as t:
            await t.pinger.ping(t.wgo_public, TUNNEL_B)
            peer = t.engine.dispatcher.peers[t.wgo_public]
            first = peer.keypairs.current
            assert first is not None and peer.handshakes_completed == 1
            # The peers refuse initiations less than 20 ms apart by their real clocks.
            await asyncio.sleep(0.1)
            t.engine.advance_clock(REKEY_AFTER_TIME + 1)  # pywg's clock only
            # The next packet goes out on the old session and starts a new handshake.
            await t.pinger.ping(t.wgo_public, TUNNEL_B)
            await asyncio.wait_for(t.engine.handshakes.get(), 5)  # the first
            await asyncio.wait_for(t.engine.handshakes.get(), 5)  # the rekey
            assert peer.handshakes_completed == 2
            second = peer.keypairs.current
            assert second is not None and second is not first and second.initiator
            # The peer moves to the new session too: traffic both ways uses it.
            sent_before = second.send_counter
            await t.pinger.ping(t.wgo_public, TUNNEL_B)
            await ping_from_b(bed)
            assert peer.keypairs.current is second and second.send_counter > sent_before
            assert t.engine.dispatcher.drops[DropReason.DECRYPT_FAILED] == 0
    asyncio.run(scenario())


@pytest.mark.parametrize("peer", PEERS)
def test_cookie_reply_under_load(bed: Bed, peer: str) -> None:
    """pywg under load answers the peer's initiation with a cookie reply; the peer retries
    (after REKEY_TIMEOUT) with mac2, which pywg checks and then answers."""
    async def scenario() -> None:
        async with tunnel(bed, peer, psk=None, pywg_initiates=False) as t:
            dispatcher = t.engine.dispatcher
            dispatcher.under_load = True
            initiations: list[bytes] = []
            t.engine.wire_tap = lambda way, data, _: (
                initiations.append(data) if way == "in" and data[0] == MESSAGE_INITIATION else None)
            out = await ping_from_b(bed, wait=15)
            assert "1 received" in out
            assert dispatcher.drops[DropReason.COOKIE_REQUIRED] >= 1
            assert initiations[0][132:148] == bytes(16)  # the first try had no cookie
            last = initiations[-1]
            assert last[132:148] != bytes(16)  # the retry carried mac2 ...
            source = (bed.outer_b, WG_PORT)
            assert dispatcher.cookie_checker.check_mac2(last, source, t.engine.now())  # ... a valid one
            assert dispatcher.drops[DropReason.BAD_MAC2] == 0
            done = t.engine.handshakes.get_nowait()
            assert not done.initiator
    asyncio.run(scenario())
