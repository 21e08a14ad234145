"""Key rotation without loss, in memory: the engine's overlap (add_static_key, promote,
drop), rename_peer, the UAPI extension keys that reach them, and the KeyManager
(rotation orchestration, scheduling with jitter, expiration alerts) with a fake clock.

The same story runs for real, two daemons in network namespaces under a 100-per-second
ping, in tests/test_rotation.py.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from engine_pair import ENDPOINT_A, Pair, ipv4_packet

from pywg.device.device import Device
from pywg.device.uapi_server import answer
from pywg.manage.key import Key
from pywg.manage.keymanager import (
    KeyExpiring,
    KeyManager,
    RotationFailed,
    RotationSchedule,
)
from pywg.manage.keystore import KeyStore
from pywg.manage.tunnel import TunnelManager
from pywg.protocol.actions import DropReason, SendDatagram
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.protocol.dispatcher import SECONDARY_KEY_LIFETIME
from pywg.protocol.endpoint import RelayEndpoint
from pywg.protocol.messages import message_type
from pywg.uapi.protocol import (
    IPC_ERROR_INVALID,
    UNCHANGED,
    DeviceChanges,
    PeerChanges,
    RequestReader,
    SetRequest,
    UapiError,
    format_get,
    format_set,
    parse_get,
    parse_set,
)

# --- the engine -------------------------------------------------------------------------


def data(pair: Pair, origin: str, now: float, payload: bytes = b"x") -> list[Any]:
    """One packet from ``origin``; returns the handshake messages it caused."""
    src, dst = ("10.0.0.1", "10.0.0.2") if origin == "a" else ("10.0.0.2", "10.0.0.1")
    before = len(pair.wire)
    pair.send(origin, ipv4_packet(payload, src, dst), now)
    return [message_type(d) for _, d in pair.wire[before:] if message_type(d) != 4]


def rename_on_b(pair: Pair, old: bytes, new: bytes) -> Any:
    """B learns A's new key (and the pair addresses B's packets to it)."""
    peer = pair.b.rename_peer(old, new)
    pair.pub_a = new
    return peer


def test_overlap_accepts_initiations_to_either_key_and_keeps_sessions() -> None:
    pair = Pair()
    pair.establish(0.0)
    old_public, new_private = pair.pub_a, dh_generate()
    new_public = dh_pubkey(new_private)
    session_a, session_b = pair.peer_a.keypairs.current, pair.peer_b.keypairs.current

    pair.a.add_static_key(new_private)
    assert pair.a.static_public == old_public and pair.a.secondary_public == new_public
    assert data(pair, "a", 1.0) == [] and data(pair, "b", 1.0) == []  # the sessions flow on
    assert pair.peer_a.keypairs.current is session_a

    # B initiates to the old key: answered.
    pair.pump(pair.b.force_handshake(old_public, 2.0), "b", 2.0)
    assert pair.completed["b"][-1] is True
    # B learns the new key: the same Peer, its session untouched, now named by the new key.
    peer_b = pair.peer_b
    renamed = rename_on_b(pair, old_public, new_public)
    assert renamed is peer_b and list(pair.b.peers) == [new_public] and peer_b.public_key == new_public
    session_b = peer_b.keypairs.current
    assert data(pair, "b", 3.0) == [] and peer_b.keypairs.current is session_b
    assert pair.delivered["a"][-1] == ipv4_packet(b"x", "10.0.0.2", "10.0.0.1")
    # B initiates to the new key: the secondary answers it (mac1 keyed by the new key).
    handshakes = len(pair.completed["a"])
    pair.pump(pair.b.force_handshake(new_public, 4.0), "b", 4.0)
    assert len(pair.completed["a"]) == handshakes + 1 and pair.a.drops[DropReason.BAD_MAC1] == 0
    assert data(pair, "a", 4.5) == [] and data(pair, "b", 4.5) == []

    # A promotes the new key: no session ends; its own initiations now use the new key.
    session_a = pair.peer_a.keypairs.current
    pair.a.promote_static_key()
    assert pair.a.static_public == new_public and pair.a.secondary_public == old_public
    assert pair.peer_a.keypairs.current is session_a and data(pair, "a", 5.0) == []
    pair.pump(pair.a.force_handshake(pair.pub_b, 6.0), "a", 6.0)
    assert pair.completed["a"][-1] is True and pair.b.drops == {}
    assert data(pair, "a", 6.5) == [] and data(pair, "b", 6.5) == []
    assert pair.a.drops == {}  # nothing was lost on either side

    # The overlap ends: an initiation to the old key fails mac1 and is counted.
    pair.a.drop_secondary_key()
    assert pair.a.secondary_public is None and pair.peer_a.secondary_static_static is None
    rename_on_b(pair, new_public, old_public)  # a B that still believes the old key
    pair.pump(pair.b.force_handshake(old_public, 7.0), "b", 7.0)
    assert pair.a.drops[DropReason.BAD_MAC1] == 1
    assert data(pair, "a", 7.5) == []  # and A's session, made with the new key, still flows


def test_promote_keeps_the_initiation_in_flight() -> None:
    pair = Pair()
    in_flight = pair.a.initiate_handshake(pair.pub_b, 0.0)  # made with the old key
    pair.a.add_static_key(dh_generate())
    pair.a.promote_static_key()
    pair.pump(in_flight, "a", 0.1)  # B still knows the old key: it answers; A completes
    assert pair.completed == {"a": [True], "b": [False]}


def test_rename_drops_the_handshake_in_flight_and_the_next_goes_to_the_new_key() -> None:
    pair = Pair()
    new_private = dh_generate()
    new_public = dh_pubkey(new_private)
    pair.a.add_static_key(new_private)
    pair.peer_b.endpoint = ENDPOINT_A
    in_flight = pair.b.initiate_handshake(pair.pub_a, 0.0)  # to the old key
    rename_on_b(pair, pair.pub_a, new_public)
    assert pair.peer_b.handshake is None
    pair.pump(in_flight, "b", 0.0)  # A answers, but B no longer waits for that response
    assert pair.b.drops[DropReason.UNKNOWN_INDEX] == 1 and pair.completed["b"] == []
    # B's next initiation (not held back by the rate limit) goes to the new key.
    out = pair.b.send_packet(new_public, ipv4_packet(b"y", "10.0.0.2", "10.0.0.1"), 0.1)
    assert [message_type(a.data) for a in out if isinstance(a, SendDatagram)] == [1]
    pair.pump(out, "b", 0.1)
    assert pair.completed["b"] == [True] and pair.delivered["a"] == [ipv4_packet(b"y", "10.0.0.2", "10.0.0.1")]
    # The retransmission timer of the dropped initiation was for it: no stray handshake.
    assert pair.peer_b.handshake is None


def test_rename_moves_a_relay_endpoint_to_the_new_key() -> None:
    """Over DERP a peer is addressed by its key: the renamed peer's handshake initiation (and
    every datagram after it) goes to the key it rotated to, not to its old node key."""
    pair = Pair()
    new_public = dh_pubkey(dh_generate())
    pair.peer_b.endpoint = RelayEndpoint(900, pair.pub_a)
    other = RelayEndpoint(900, dh_pubkey(dh_generate()))  # a relay address of some other key: kept
    pair.peer_a.endpoint = other
    assert rename_on_b(pair, pair.pub_a, new_public).endpoint == RelayEndpoint(900, new_public)
    pair.a.rename_peer(pair.pub_b, dh_pubkey(dh_generate()))
    assert pair.peer_a.endpoint == other


def test_rotation_under_traffic_loses_nothing() -> None:
    """100 packets a second each way while A rotates, steps 0.5 s apart, plus rekeys."""
    pair = Pair()
    pair.establish(0.0)
    new_private = dh_generate()
    new_public = dh_pubkey(new_private)

    def step(tick: int, now: float) -> None:
        if tick == 100:
            pair.a.add_static_key(new_private)
        elif tick == 150:  # B initiates to the old key
            pair.pump(pair.b.force_handshake(pair.pub_a, now), "b", now)
        elif tick == 200:
            rename_on_b(pair, pair.pub_a, new_public)
        elif tick == 250:
            pair.a.promote_static_key()
        elif tick == 260:
            pair.pump(pair.a.force_handshake(pair.pub_b, now), "a", now)
        elif tick == 300:  # B initiates to the new key
            pair.pump(pair.b.force_handshake(new_public, now), "b", now)
        elif tick == 400:
            pair.a.drop_secondary_key()

    sent = 0
    for tick in range(1, 600):
        now = tick / 100
        step(tick, now)
        for origin in ("a", "b"):
            pair.send(origin, ipv4_packet(tick.to_bytes(2, "big"), *(("10.0.0.1", "10.0.0.2") if origin == "a"
                                                                        else ("10.0.0.2", "10.0.0.1"))), now)
            sent += 1
        pair.tick(now)
    assert len(pair.delivered["a"]) + len(pair.delivered["b"]) == sent + 1  # + establish's packet
    assert pair.a.drops == {} and pair.b.drops == {}
    assert pair.a.static_public == new_public and pair.peer_b.public_key == new_public
    assert len(pair.completed["a"]) >= 4  # every forced handshake completed


def test_own_keys_are_never_peers_and_bad_steps_are_refused() -> None:
    pair = Pair()
    secondary = dh_generate()
    with pytest.raises(ValueError, match="no secondary key"):
        pair.a.promote_static_key()
    with pytest.raises(ValueError, match="already"):
        pair.a.add_static_key(bytes(pair.a.static_private or b""))
    with pytest.raises(ValueError, match="a peer has"):
        pair.a.add_static_key(bytes(pair.b.static_private or b""))  # B's key: B is A's peer
    pair.a.add_static_key(secondary)
    pair.a.add_static_key(secondary)  # the same again: nothing changes
    with pytest.raises(ValueError, match="secondary public key"):
        pair.a.add_peer(dh_pubkey(secondary))
    other = dh_pubkey(dh_generate())
    pair.a.add_peer(other)
    with pytest.raises(ValueError, match="own public keys"):
        pair.a.rename_peer(pair.pub_b, dh_pubkey(secondary))
    with pytest.raises(ValueError, match="own public keys"):
        pair.a.rename_peer(pair.pub_b, pair.pub_a)
    with pytest.raises(ValueError, match="another peer"):
        pair.a.rename_peer(pair.pub_b, other)
    with pytest.raises(ValueError, match="low-order"):
        pair.a.rename_peer(pair.pub_b, bytes(32))
    with pytest.raises(KeyError):
        pair.a.rename_peer(dh_pubkey(dh_generate()), dh_pubkey(dh_generate()))
    assert pair.a.rename_peer(pair.pub_b, pair.pub_b) is pair.peer_a  # to itself: nothing
    assert list(pair.a.peers) == [pair.pub_b, other]
    # rename keeps the peer's place in the order
    third = dh_pubkey(dh_generate())
    pair.a.rename_peer(pair.pub_b, third)
    assert list(pair.a.peers) == [third, other]
    keyless = Pair().a
    keyless.set_private_key(None)
    with pytest.raises(ValueError, match="no private key"):
        keyless.add_static_key(secondary)


def test_a_new_private_key_ends_the_overlap_and_the_sessions() -> None:
    pair = Pair()
    pair.establish(0.0)
    pair.a.add_static_key(dh_generate())
    pair.a.set_private_key(dh_generate())
    assert pair.a.secondary_public is None and pair.a.secondary_private is None
    assert pair.peer_a.keypairs.current is None


def test_dispatcher_repr_shows_no_secret() -> None:
    pair = Pair()
    secondary = dh_generate()
    pair.a.add_static_key(secondary)
    text = repr(pair.a)
    assert "secondary_public_key=" in text
    for secret in (secondary, pair.a.static_private or b""):
        assert secret.hex()[:16] not in text and base64.b64encode(secret).decode()[:16] not in text


# --- the UAPI extension keys ------------------------------------------------------------

HEX = "0f" * 32


def test_extension_keys_parse_format_and_round_trip() -> None:
    peer = dh_pubkey(dh_generate())
    new = dh_pubkey(dh_generate())
    request = parse_set([f"pywg_secondary_private_key={'ff' * 32}", "pywg_promote_secondary=true",
                         f"public_key={peer.hex()}", f"pywg_rename_to={new.hex()}", "pywg_rekey=true"])
    clamped = bytearray(b"\xff" * 32)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    assert request.device == DeviceChanges(secondary_private_key=bytes(clamped), promote_secondary=True)
    assert request.peers == (PeerChanges(peer, rename_to=new, rekey=True),)
    assert request.uses_extensions
    assert parse_set(format_set(request).split("\n")[1:-2]) == request
    dropped = parse_set([f"pywg_secondary_private_key={'00' * 32}"])
    assert dropped.device.secondary_private_key is None
    # A request without them is what it was, and is written byte for byte as before.
    plain = parse_set([f"private_key={HEX}", "listen_port=1", f"public_key={peer.hex()}", "allowed_ip=10.0.0.0/8"])
    assert not plain.uses_extensions and plain.device.secondary_private_key is UNCHANGED
    assert format_set(plain) == (f"set=1\nprivate_key=08{'0f' * 30}4f\nlisten_port=1\npublic_key={peer.hex()}\n"
                                 "allowed_ip=10.0.0.0/8\n\n")
    # Secrets stay out of reprs.
    assert "ff" * 8 not in repr(request) and "<redacted>" in repr(request.device)
    assert "rename_to=" in repr(request.peers[0])


@pytest.mark.parametrize(("lines", "message"), [
    ([f"public_key={HEX}", "pywg_rename_to=" + "00" * 32], "all-zero"),
    ([f"public_key={HEX}", "pywg_rename_to=abc"], "64 hex digits"),
    ([f"public_key={HEX}", "pywg_rekey=yes"], "only accepted value"),
    (["pywg_promote_secondary=1"], "only accepted value"),
    (["pywg_secondary_private_key=zz"], "64 hex digits"),
    (["pywg_rename_to=" + HEX], "before any public_key"),
    ([f"public_key={HEX}", "pywg_promote_secondary=true"], "after a peer section"),
    (["pywg_unknown=1"], "invalid UAPI device key"),
])
def test_extension_keys_bad_values(lines: list[str], message: str) -> None:
    with pytest.raises(UapiError, match=message) as caught:
        parse_set(lines)
    assert caught.value.errno == IPC_ERROR_INVALID


class FakeTun:
    """Enough of a Tun for a Device that is configured but never started."""

    vnet_hdr = False
    mtu = 1420

    def __init__(self, name: str) -> None:
        self.name = name


def device(name: str = "wgtest") -> Device:
    return Device(FakeTun(name))  # type: ignore[arg-type]


def uapi(dev: Device, *lines: str) -> str:
    """A set request through the UAPI answer function: the errno line."""
    return answer(dev, "set", [tuple(line.split("=", 1)) for line in lines])  # type: ignore[misc]


def test_device_applies_the_extension_keys_atomically() -> None:
    async def main() -> None:
        dev = device()
        own, new = dh_generate(), dh_generate()
        remote_old, remote_new, other = (dh_pubkey(dh_generate()) for _ in range(3))
        assert uapi(dev, f"private_key={own.hex()}", f"public_key={remote_old.hex()}",
                    "allowed_ip=10.9.0.0/24", "endpoint=192.0.2.9:51820",
                    f"public_key={other.hex()}", "allowed_ip=10.8.0.0/24") == "errno=0\n\n"
        get_before = format_get(dev.snapshot())
        peer = dev.dispatcher.peers[remote_old]
        # Secondary key and rename in one request.
        assert uapi(dev, f"pywg_secondary_private_key={new.hex()}", f"public_key={remote_old.hex()}",
                    f"pywg_rename_to={remote_new.hex()}") == "errno=0\n\n"
        assert dev.dispatcher.secondary_public == dh_pubkey(new)
        assert dev.dispatcher.peers[remote_new] is peer and remote_old not in dev.dispatcher.peers
        snap = dev.snapshot()
        assert [p.public_key for p in snap.peers] == [remote_new, other]  # same place, same routes
        assert snap.peers[0].allowed_ips == ["10.9.0.0/24"] and snap.peers[0].endpoint == ("192.0.2.9", 51820)
        # get shows exactly what wireguard-go would: no extension keys, the private key only.
        text = format_get(snap)
        assert "pywg" not in text and new.hex() not in text
        assert text.replace(remote_new.hex(), remote_old.hex()) == get_before
        # Refusals, each leaving everything as it was.
        for lines, reason in [
            ((f"public_key={dh_pubkey(new).hex()}", "allowed_ip=10.7.0.0/24"), "secondary public key"),
            ((f"public_key={other.hex()}", f"pywg_rename_to={remote_new.hex()}"), "another peer"),
            ((f"public_key={other.hex()}", f"pywg_rename_to={dh_pubkey(new).hex()}"), "own public keys"),
            ((f"public_key={other.hex()}", f"pywg_rename_to={dh_pubkey(own).hex()}"), "own public keys"),
            ((f"public_key={other.hex()}", f"pywg_rename_to=01{'00' * 31}"), "low-order"),
            ((f"pywg_secondary_private_key={own.hex()}",), "private_key already"),
            (("listen_port=0", f"public_key={other.hex()}", "replace_allowed_ips=true",
              f"public_key={remote_new.hex()}", f"pywg_rename_to={other.hex()}"), "another peer"),
        ]:
            before = format_get(dev.snapshot())
            with pytest.raises(UapiError, match=reason) as caught:
                dev.apply(parse_set(list(lines)))
            assert caught.value.errno == IPC_ERROR_INVALID
            assert format_get(dev.snapshot()) == before and dev.dispatcher.secondary_public == dh_pubkey(new)
        # Promote: the new key is the private key; the old one is still accepted.
        assert uapi(dev, "pywg_promote_secondary=true") == "errno=0\n\n"
        assert dev.dispatcher.static_public == dh_pubkey(new) and dev.dispatcher.secondary_public == dh_pubkey(own)
        assert parse_get(format_get(dev.snapshot())).private_key == new
        assert uapi(dev, f"pywg_secondary_private_key={'00' * 32}") == "errno=0\n\n"
        assert dev.dispatcher.secondary_public is None
        assert uapi(dev, "pywg_promote_secondary=true") == f"errno={IPC_ERROR_INVALID}\n\n"
        # The secondary key's public key was taken by a peer: refused; with replace_peers, fine.
        taken = dh_generate()
        assert uapi(dev, f"public_key={dh_pubkey(taken).hex()}") == "errno=0\n\n"
        assert uapi(dev, f"pywg_secondary_private_key={taken.hex()}") == f"errno={IPC_ERROR_INVALID}\n\n"
        # a rename in a section that removes the peer does nothing
        assert uapi(dev, f"public_key={other.hex()}", "remove=true", f"pywg_rename_to={remote_old.hex()}") \
            == "errno=0\n\n"
        assert other not in dev.dispatcher.peers and remote_old not in dev.dispatcher.peers
        # update_only: a peer that is not there is neither made nor renamed
        assert uapi(dev, f"public_key={other.hex()}", "update_only=true",
                    f"pywg_rename_to={remote_old.hex()}") == "errno=0\n\n"
        assert other not in dev.dispatcher.peers and remote_old not in dev.dispatcher.peers

    asyncio.run(main())


# --- KeyManager: orchestration ------------------------------------------------------------


class MemoryBackend:
    """Devices configured through the UAPI answer function, as a daemon would be;
    ``pywg=False`` answers like wireguard-go to the extension keys (-22)."""

    kind = "memory"

    def __init__(self, *, pywg: bool = True) -> None:
        self.devices: dict[str, Device] = {}
        self.pywg = pywg
        self.requests: list[str] = []
        self.refuse: Callable[[str], bool] | None = None  # refuse (-5) the next request it matches

    def add(self, name: str, private: bytes) -> Device:
        dev = self.devices[name] = device(name)
        dev.apply(SetRequest(DeviceChanges(private_key=private)))
        return dev

    async def exchange(self, name: str, request: str) -> str:
        self.requests.append(request)
        if self.refuse is not None and self.refuse(request):
            self.refuse = None
            return "errno=-5\n\n"
        if not self.pywg and "pywg_" in request:
            return "errno=-22\n\n"
        return "".join(answer(self.devices[name], r.op, r.pairs) for r in RequestReader().feed(request.encode()))


def link(dev: Device, peer: Device, net: str, endpoint: str | None = None) -> None:
    lines = [f"public_key={peer.dispatcher.static_public.hex()}", f"allowed_ip={net}",  # type: ignore[union-attr]
             f"preshared_key={'11' * 32}", "persistent_keepalive_interval=25"]
    assert uapi(dev, *lines, *([f"endpoint={endpoint}"] if endpoint else [])) == "errno=0\n\n"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys", use_credentials=False)


def mesh(pywg_remote: bool = True) -> tuple[MemoryBackend, MemoryBackend, bytes]:
    """Node n (and remote r1, pywg) on one backend, remote r2 on another (pywg or not)."""
    here, there = MemoryBackend(), MemoryBackend(pywg=pywg_remote)
    own = dh_generate()
    n = here.add("n", own)
    r1 = here.add("r1", dh_generate())
    r2 = there.add("r2", dh_generate())
    link(n, r1, "10.0.1.0/24", "192.0.2.1:51820")
    link(n, r2, "10.0.2.0/24", "192.0.2.2:51820")
    link(r1, n, "10.0.0.1/32", "192.0.2.10:51820")
    link(r2, n, "10.0.0.1/32", "192.0.2.10:51820")
    return here, there, own


@pytest.mark.parametrize("pywg_remote", [True, False], ids=["pywg-remotes", "wireguard-go-remote"])
def test_rotate_keys(store: KeyStore, pywg_remote: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        here, there, own = mesh(pywg_remote)
        clock = FakeClock()
        manager = TunnelManager(here)  # type: ignore[arg-type]
        keys = KeyManager(store, manager, clock=clock, sleep=clock.sleep)
        keys.store_private_key("n", Key(own), created=clock.now - 1000)
        n, r1, r2 = here.devices["n"], here.devices["r1"], there.devices["r2"]
        r1_peer = r1.dispatcher.peers[dh_pubkey(own)]
        r2_before = r2.snapshot().peers[0]

        new = await keys.rotate_keys("n", peers=[(manager, "r1"), (TunnelManager(there), "r2")],  # type: ignore[arg-type]
                                     overlap=7.0)

        assert n.dispatcher.static_public == bytes(new) and n.dispatcher.secondary_public is None
        assert clock.sleeps == [7.0]  # waited for the overlap, then dropped the old key
        assert r1.dispatcher.peers[bytes(new)] is r1_peer  # renamed: the same peer, sessions and all
        after = r2.snapshot().peers[0]
        assert after.public_key == bytes(new)
        assert (after.preshared_key, after.endpoint, after.persistent_keepalive, after.allowed_ips) == \
            (r2_before.preshared_key, r2_before.endpoint, r2_before.persistent_keepalive, r2_before.allowed_ips)
        if pywg_remote:
            assert any("pywg_rename_to" in r for r in there.requests)
        else:
            assert any("remove=true" in r for r in there.requests)  # replaced
        # The promotion asked for a handshake with each remote (rekey), in one request.
        promote = next(r for r in here.requests if "pywg_promote_secondary" in r)
        assert promote.count("pywg_rekey=true") == 2
        # The keystore: the new key as n, the old one as n.previous, creation times beside them.
        assert store.load_private_key("n").public_key() == new
        assert store.load_private_key("n.previous") == Key(own)
        assert keys.key_info("n").created == clock.now - 7.0
        assert keys.key_info("n.previous").created == clock.now - 7.0 - 1000
        for name in (".n.meta", ".n.previous.meta"):
            assert stat.S_IMODE(os.stat(store.directory / name).st_mode) == 0o600
        assert store.list_ids() == ["n", "n.previous"]  # the metadata are not keys

    asyncio.run(main())
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    for key_id in ("n", "n.previous"):
        secret = store.load_private_key(key_id)
        assert secret.to_base64() not in text and secret.hex() not in text


def test_rotate_keys_against_a_node_that_is_not_pywg(store: KeyStore) -> None:
    """N itself answers -22 to the extensions: plain rotation (remotes first, then N)."""
    async def main() -> None:
        here, there, _ = mesh()
        here.pywg = False  # n and r1 behave like wireguard-go
        clock = FakeClock()
        keys = KeyManager(store, TunnelManager(here), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
        new = await keys.rotate_keys("n", peers=[(there, "r2"), (here, "r1")], overlap=5.0)
        assert here.devices["n"].dispatcher.static_public == bytes(new)
        assert bytes(new) in there.devices["r2"].dispatcher.peers  # renamed (pywg)
        assert bytes(new) in here.devices["r1"].dispatcher.peers  # replaced
        assert here.requests[-1].startswith("set=1\nprivate_key=")  # N last; no overlap to wait for
        assert clock.sleeps == []

    asyncio.run(main())


@pytest.mark.parametrize("failing", ["pywg_promote_secondary", "remove=true"])
def test_a_failed_rotation_is_undone(store: KeyStore, failing: str) -> None:
    async def main() -> None:
        here, there, own = mesh(pywg_remote=False)
        clock = FakeClock()
        keys = KeyManager(store, TunnelManager(here), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
        keys.store_private_key("n", Key(own))
        gets = {name: format_get(dev.snapshot()) for name, dev in [*here.devices.items(), *there.devices.items()]}
        r1_peer = here.devices["r1"].dispatcher.peers[dh_pubkey(own)]
        target = here if failing.startswith("pywg") else there
        target.refuse = lambda request: failing in request
        with pytest.raises(RotationFailed, match="nothing changed") as caught:
            await keys.rotate_keys("n", peers=[(here, "r1"), (there, "r2")])
        assert caught.value.undone
        after = {name: format_get(dev.snapshot()) for name, dev in [*here.devices.items(), *there.devices.items()]}
        assert after == gets
        assert here.devices["n"].dispatcher.secondary_public is None
        assert here.devices["r1"].dispatcher.peers[dh_pubkey(own)] is r1_peer  # renamed back
        assert store.load_private_key("n") == Key(own) and store.list_ids() == ["n"]

    asyncio.run(main())


def test_rotate_keys_refuses_what_it_cannot_do(store: KeyStore) -> None:
    async def main() -> None:
        here, there, _ = mesh()
        keys = KeyManager(store, TunnelManager(here))  # type: ignore[arg-type]
        stranger = there.add("r3", dh_generate())  # does not know n
        with pytest.raises(Exception, match="has no peer"):
            await keys.rotate_keys("n", peers=[(there, "r3")])
        assert stranger.dispatcher.peers == {} and here.devices["n"].dispatcher.secondary_public is None
        assert store.list_ids() == []
        with pytest.raises(Exception, match="needs a TunnelManager"):
            await KeyManager(store).rotate_keys("n")

    asyncio.run(main())


def test_background_overlap_and_aclose(store: KeyStore) -> None:
    async def main() -> None:
        here, _, _ = mesh()
        gate = asyncio.Event()

        async def sleep(seconds: float) -> None:
            await gate.wait()

        keys = KeyManager(store, TunnelManager(here), sleep=sleep)  # type: ignore[arg-type]
        n = here.devices["n"]
        await keys.rotate_keys("n", peers=[(here, "r1")], wait=False)
        assert n.dispatcher.secondary_public is not None  # the overlap runs on
        gate.set()
        await keys.wait_idle()
        assert n.dispatcher.secondary_public is None
        gate.clear()
        await keys.rotate_keys("n", peers=[(here, "r1")], wait=False)
        await keys.aclose()  # ends the overlap now
        assert n.dispatcher.secondary_public is None

    asyncio.run(main())


# --- KeyManager: schedule and alerts --------------------------------------------------------


def test_schedule_math_with_jitter_bounds() -> None:
    schedule = RotationSchedule(max_age=1000.0, jitter=0.2, alert_lead=50.0)
    created = 5000.0
    times = [schedule.rotate_at(created, Key.generate_private().public_key()) for _ in range(2000)]
    assert all(created + 1000 - 50 - 200 <= t <= created + 1000 - 50 for t in times)
    assert max(times) - min(times) > 150  # spread over the window
    key = Key.generate_private().public_key()
    assert schedule.rotate_at(created, key) == schedule.rotate_at(created, key)  # stable for a key
    assert schedule.rotate_at(created, u=0.0) == created + 950
    assert schedule.rotate_at(created, u=0.5) == created + 850
    assert schedule.expires_at(created) == created + 1000 and schedule.alert_at(created) == created + 950
    assert RotationSchedule(100.0).lead == 5.0  # default lead: 5% of the maximum age
    assert RotationSchedule(100.0, jitter=0.0).rotate_at(0.0, key) == 95.0
    for max_age, jitter, lead in [(0.0, 0.1, None), (float("inf"), 0.1, None), (10.0, 1.0, None),
                                  (10.0, -0.1, None), (10.0, 0.1, 10.0), (10.0, 0.5, 5.0)]:
        with pytest.raises(ValueError):
            RotationSchedule(max_age, jitter, lead)
    with pytest.raises(ValueError):
        schedule.rotate_at(created, u=1.0)


def test_alerts_fire_once_ahead_of_expiry(store: KeyStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pywg.manage.keymanager")

    async def main() -> None:
        clock = FakeClock(1_000_000.0)
        keys = KeyManager(store, clock=clock, sleep=clock.sleep)
        private, public = keys.generate_key_pair()
        keys.store_private_key("wg0", private)
        schedule = RotationSchedule(max_age=1000.0, jitter=0.1, alert_lead=100.0)
        keys.schedule_rotation("wg0", schedule, auto_rotate=False)
        called: list[KeyExpiring] = []
        unsubscribe = keys.subscribe(called.append)
        queue = keys.alerts()

        assert await keys.check() == clock.now + 900  # the next thing: the alert
        clock.now += 899.0
        await keys.check()
        assert called == [] and queue.empty()
        clock.now += 1.0
        assert await keys.check() == clock.now + 100  # then: expiry
        assert len(called) == 1 and queue.qsize() == 1
        event = queue.get_nowait()
        assert event == called[0]
        assert (event.iface, event.key_id, event.public_key, event.expired) == ("wg0", "wg0", public, False)
        assert event.seconds_left == 100.0 and event.expires_at == 1_001_000.0
        for _ in range(3):
            clock.now += 10.0
            await keys.check()
        assert len(called) == 1  # once
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "expires in" in warnings[0].getMessage()
        clock.now = 1_001_000.0
        assert await keys.check() is None
        assert len(called) == 2 and called[1].expired and queue.get_nowait().expired
        await keys.check()
        assert len(called) == 2
        unsubscribe()
        # A new key (rotated by hand, say) starts a new cycle.
        keys.store_private_key("wg0", Key.generate_private())
        clock.now += 2000.0
        await keys.check()
        assert len(called) == 2 and queue.qsize() == 2  # unsubscribed callback; the queue got both
        for text in (repr(keys), repr(event), caplog.text):
            assert private.to_base64() not in text and private.hex() not in text

    asyncio.run(main())


def test_the_scheduler_rotates_when_due(store: KeyStore) -> None:
    async def main() -> None:
        here, _, own = mesh()
        n = here.devices["n"]
        clock = FakeClock(2_000_000.0)
        blocked = asyncio.Event()

        async def sleep(seconds: float) -> None:
            if n.dispatcher.static_public != dh_pubkey(own):  # rotated: the test is over
                blocked.set()
                await asyncio.Event().wait()
            await clock.sleep(seconds)

        manager = TunnelManager(here)  # type: ignore[arg-type]
        keys = KeyManager(store, manager, clock=clock, sleep=sleep)
        keys.store_private_key("n", Key(own))
        schedule = RotationSchedule(max_age=3600.0, jitter=0.2, alert_lead=60.0)
        keys.schedule_rotation("n", schedule, peers=[(manager, "r1")], overlap=0.0)
        alerts = keys.alerts()
        due = schedule.rotate_at(clock.now, Key(own).public_key())
        assert 2_000_000.0 + 3600 * 0.8 - 60 <= due < 2_000_000.0 + 3600 - 60
        task = keys.start()
        assert keys.start() is task
        await asyncio.wait_for(blocked.wait(), 10)
        new_public = n.dispatcher.static_public
        assert new_public is not None and n.dispatcher.secondary_public is None
        assert here.devices["r1"].dispatcher.peers.get(new_public) is not None
        assert store.load_private_key("n").public_key() == Key(new_public)
        assert keys.key_info("n").created == pytest.approx(due)  # rotated when due
        assert clock.sleeps[0] == pytest.approx(due - 2_000_000.0)  # slept until then in one go
        await keys.aclose()
        assert task.done() and alerts.empty()  # rotated before any alert was due

    asyncio.run(main())


def test_check_rotates_only_when_due_and_retries_a_failure(store: KeyStore) -> None:
    async def main() -> None:
        here, _, own = mesh()
        clock = FakeClock(3_000_000.0)
        keys = KeyManager(store, TunnelManager(here), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
        keys.store_private_key("n", Key(own))
        schedule = RotationSchedule(max_age=1000.0, jitter=0.0, alert_lead=100.0)
        keys.schedule_rotation("n", schedule, peers=[(here, "r1")], overlap=0.0)
        assert await keys.check() == 3_000_900.0
        clock.now = 3_000_899.0
        assert await keys.check() == 3_000_900.0 and keys.key_info("n").public_key == Key(own).public_key()
        clock.now = 3_000_900.0
        here.refuse = lambda request: "pywg_secondary_private_key" in request
        # Failed: retried 300 s later; meanwhile the alert went out (the key expires soon).
        assert await keys.check() == 3_001_000.0  # next: the expiry alert
        assert keys.key_info("n").public_key == Key(own).public_key()
        clock.now = 3_000_999.0
        assert await keys.check() == 3_001_000.0  # no retry before its time
        assert keys.key_info("n").public_key == Key(own).public_key()
        clock.now = 3_000_900.0 + 300.0
        assert await keys.check() == clock.now + 900.0  # rotated; the next one is due then
        assert keys.key_info("n").public_key != Key(own).public_key()

    asyncio.run(main())


def test_key_without_metadata_counts_from_its_file(store: KeyStore) -> None:
    clock = FakeClock(5_000_000_000.0)
    keys = KeyManager(store, clock=clock)
    key = Key.generate_private()
    store.store_private_key("plain", key)  # as `wg genkey` would have put it there
    mtime = os.stat(store.directory / "plain").st_mtime
    info = keys.key_info("plain")
    assert info.created == mtime and info.public_key == key.public_key()
    assert (store.directory / ".plain.meta").exists()
    # Metadata for another key (the file was replaced behind our back) is not believed.
    other = Key.generate_private()
    store.store_private_key("plain", other)
    assert keys.key_info("plain").public_key == other.public_key()
    with pytest.raises(Exception, match="no key"):
        keys.key_info("missing")


def test_secondary_key_expires_when_the_overlap_is_never_ended() -> None:
    """A rotation whose manager died mid-overlap: the engine drops the old key by itself."""
    pair = Pair()
    pair.establish(0.0)
    pair.a.add_static_key(dh_generate(), now=1.0)
    pair.a.promote_static_key(now=2.0)  # the old primary is now the secondary, for a while
    assert pair.a.secondary_public is not None
    assert pair.a.next_deadline() is not None and pair.a.next_deadline() <= 2.0 + SECONDARY_KEY_LIFETIME
    pair.a.tick(2.0 + SECONDARY_KEY_LIFETIME - 1)
    assert pair.a.secondary_public is not None
    pair.a.tick(2.0 + SECONDARY_KEY_LIFETIME)
    assert pair.a.secondary_public is None and pair.a.secondary_key is None
