"""Sealing and opening 1420-byte transport packets, at three depths, beside the bare AEAD.

    floor      cryptography's ChaCha20Poly1305 on a prepared key object and nonce
    AeadKey    pywg.protocol.crypto.AeadKey.seal/open (Keypair.send/.receive) with the
               WireGuard counter nonce built per packet
    peer path  Dispatcher.send_packet (stage, pad, seal, header, timers) on an established
               session; Dispatcher.datagram_received of pre-sealed datagrams with increasing
               counters (index lookup, open, replay filter, keypair confirm, timers, inner
               length check, DeliverPacket)

Each round runs BATCH operations; figures are per packet of PACKET_SIZE inner bytes.
"""

from __future__ import annotations

import itertools
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bench.support import ENDPOINT_A, PACKET_SIZE, Pair, ipv4_packet, run
from pywg.protocol.actions import DeliverPacket, SendDatagram
from pywg.protocol.constants import TAG_LEN, TRANSPORT_HEADER_SIZE
from pywg.protocol.crypto import aead_nonce
from pywg.protocol.keypair import Keypair

BATCH = 1000
ROUNDS = 100
PACKET = ipv4_packet(PACKET_SIZE)
NONCE = aead_nonce(7)


def _keypair() -> Keypair:
    return Keypair(os.urandom(32), os.urandom(32), local_index=1, remote_index=2, created=0.0,
                   initiator=True)


# --- seal ---------------------------------------------------------------------------


@pytest.mark.benchmark(group="seal 1420 B")
def test_seal_floor(benchmark) -> None:
    encrypt = ChaCha20Poly1305(os.urandom(32)).encrypt

    def batch() -> None:
        for _ in range(BATCH):
            encrypt(NONCE, PACKET, None)

    run(benchmark, batch, ops=BATCH, rounds=ROUNDS, bytes_per_op=PACKET_SIZE)


@pytest.mark.benchmark(group="seal 1420 B")
def test_seal_aeadkey(benchmark) -> None:
    seal = _keypair().send.seal
    counters = itertools.count()

    def batch() -> None:
        for counter in itertools.islice(counters, BATCH):
            seal(counter, PACKET)

    run(benchmark, batch, ops=BATCH, rounds=ROUNDS, bytes_per_op=PACKET_SIZE, floor="test_seal_floor")


@pytest.mark.benchmark(group="seal 1420 B")
def test_seal_peer_send_packet(benchmark, pair: Pair) -> None:
    pair.establish()
    send_packet, peer_key, now = pair.a.send_packet, pair.b.static_public, pair.now
    (first,) = send_packet(peer_key, PACKET, now)
    assert isinstance(first, SendDatagram)
    assert len(first.data) == TRANSPORT_HEADER_SIZE + PACKET_SIZE + TAG_LEN  # not padded

    def batch() -> None:
        for _ in range(BATCH):
            send_packet(peer_key, PACKET, now)

    run(benchmark, batch, ops=BATCH, rounds=ROUNDS, bytes_per_op=PACKET_SIZE, floor="test_seal_floor")
    assert not pair.a.drops, pair.a.drops


# --- open ---------------------------------------------------------------------------


@pytest.mark.benchmark(group="open 1420 B")
def test_open_floor(benchmark) -> None:
    aead = ChaCha20Poly1305(os.urandom(32))
    sealed = aead.encrypt(NONCE, PACKET, None)
    decrypt = aead.decrypt

    def batch() -> None:
        for _ in range(BATCH):
            decrypt(NONCE, sealed, None)

    run(benchmark, batch, ops=BATCH, rounds=ROUNDS, bytes_per_op=PACKET_SIZE)


@pytest.mark.benchmark(group="open 1420 B")
def test_open_aeadkey(benchmark) -> None:
    # Open what the other side sealed: its send key is our receive key.
    key = os.urandom(32)
    sender = Keypair(key, os.urandom(32), local_index=1, remote_index=2, created=0.0, initiator=True)
    receiver = Keypair(os.urandom(32), key, local_index=2, remote_index=1, created=0.0, initiator=False)
    sealed = sender.send.seal(7, PACKET)
    open_ = receiver.receive.open
    assert open_(7, sealed) == PACKET

    def batch() -> None:
        for _ in range(BATCH):
            open_(7, sealed)

    run(benchmark, batch, ops=BATCH, rounds=ROUNDS, bytes_per_op=PACKET_SIZE, floor="test_open_floor")


@pytest.mark.benchmark(group="open 1420 B")
def test_open_peer_datagram_received(benchmark, pair: Pair) -> None:
    pair.establish()
    send_packet, peer_key, now = pair.a.send_packet, pair.b.static_public, pair.now
    receive = pair.b.datagram_received
    delivered = 0

    def make_batch() -> tuple[tuple[list[bytes]], dict]:
        """BATCH datagrams sealed by A, counters increasing (not timed)."""
        datagrams = [send_packet(peer_key, PACKET, now)[0].data for _ in range(BATCH)]
        return (datagrams,), {}

    def batch(datagrams: list[bytes]) -> None:
        nonlocal delivered
        for data in datagrams:
            receive(data, ENDPOINT_A, now)
        delivered += len(datagrams)

    (probe,), _ = make_batch()
    (action,) = receive(probe[0], ENDPOINT_A, now)
    assert isinstance(action, DeliverPacket) and action.packet == PACKET
    run(benchmark, batch, ops=BATCH, rounds=ROUNDS, bytes_per_op=PACKET_SIZE, floor="test_open_floor",
        setup=make_batch)
    assert not pair.b.drops, pair.b.drops
    assert pair.b.peers[pair.a.static_public].rx_bytes >= delivered * (PACKET_SIZE + 32)
