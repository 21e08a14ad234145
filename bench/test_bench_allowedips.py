"""Allowed-IPs lookups (cryptokey routing) in a table of 1,000 IPv4 and 1,000 IPv6 prefixes.

    floor      int.from_bytes of the packed address and one dict.get keyed by that int:
               an exact-match table, the least any longest-prefix match must do
    lookup     AllowedIPs.lookup(packed address), IPv4 and IPv6
    packet     AllowedIPs.lookup_packet_destination(IP packet): header checks, slice, lookup

The table is 1,000 prefixes per family, one per peer, at random addresses with lengths
drawn from every possible length (the lookup cost does not depend on them). Queries
are 1,000 addresses per family, half inside a random prefix and half random.
Each round runs BATCH lookups; figures are per lookup.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from bench.support import ipv4_packet, run
from pywg.protocol.allowedips import AllowedIPs

ENTRIES = 1000
BATCH = 1000
ROUNDS = 200


def _table_and_queries(bits: int) -> tuple[AllowedIPs[object], list[bytes]]:
    rng = random.Random(bits)
    cls = ipaddress.IPv4Network if bits == 32 else ipaddress.IPv6Network
    table: AllowedIPs[object] = AllowedIPs()
    networks = []
    while len(table) < ENTRIES:
        network = cls((rng.getrandbits(bits), rng.randint(1, bits)), strict=False)
        networks.append(network)
        table.insert(network, object())
    queries = []
    for n in range(BATCH):
        if n % 2:
            network = rng.choice(networks)
            host = rng.getrandbits(bits - network.prefixlen)
            value = int(network.network_address) | host
        else:
            value = rng.getrandbits(bits)
        queries.append(value.to_bytes(bits // 8, "big"))
    return table, queries


TABLE4, QUERIES4 = _table_and_queries(32)
TABLE6, QUERIES6 = _table_and_queries(128)
# lookup_packet_destination reads the destination from the header: IPv4 16:20, IPv6 24:40.
_V4_HEADER = ipv4_packet(20)
PACKETS4 = [_V4_HEADER[:16] + q for q in QUERIES4]
PACKETS6 = [bytes([0x60]) + bytes(23) + q for q in QUERIES6]


def _floor(queries: list[bytes]):
    exact = {int.from_bytes(q, "big"): object() for q in queries[::3]}
    get = exact.get

    def batch() -> None:
        for q in queries:
            get(int.from_bytes(q))

    return batch


def _lookups(function, inputs: list[bytes]):
    def batch() -> None:
        for item in inputs:
            function(item)

    return batch


@pytest.mark.benchmark(group="allowed-IPs lookup IPv4")
def test_allowedips_floor_v4(benchmark) -> None:
    run(benchmark, _floor(QUERIES4), ops=BATCH, rounds=ROUNDS)


@pytest.mark.benchmark(group="allowed-IPs lookup IPv4")
def test_allowedips_lookup_v4(benchmark) -> None:
    assert sum(TABLE4.lookup(q) is not None for q in QUERIES4) >= BATCH // 2
    run(benchmark, _lookups(TABLE4.lookup, QUERIES4), ops=BATCH, rounds=ROUNDS, floor="test_allowedips_floor_v4")


@pytest.mark.benchmark(group="allowed-IPs lookup IPv4")
def test_allowedips_packet_destination_v4(benchmark) -> None:
    assert [TABLE4.lookup_packet_destination(p) for p in PACKETS4] == [TABLE4.lookup(q) for q in QUERIES4]
    run(benchmark, _lookups(TABLE4.lookup_packet_destination, PACKETS4), ops=BATCH, rounds=ROUNDS,
        floor="test_allowedips_floor_v4")


@pytest.mark.benchmark(group="allowed-IPs lookup IPv6")
def test_allowedips_floor_v6(benchmark) -> None:
    run(benchmark, _floor(QUERIES6), ops=BATCH, rounds=ROUNDS)


@pytest.mark.benchmark(group="allowed-IPs lookup IPv6")
def test_allowedips_lookup_v6(benchmark) -> None:
    assert sum(TABLE6.lookup(q) is not None for q in QUERIES6) >= BATCH // 2
    run(benchmark, _lookups(TABLE6.lookup, QUERIES6), ops=BATCH, rounds=ROUNDS, floor="test_allowedips_floor_v6")


@pytest.mark.benchmark(group="allowed-IPs lookup IPv6")
def test_allowedips_packet_destination_v6(benchmark) -> None:
    assert [TABLE6.lookup_packet_destination(p) for p in PACKETS6] == [TABLE6.lookup(q) for q in QUERIES6]
    run(benchmark, _lookups(TABLE6.lookup_packet_destination, PACKETS6), ops=BATCH, rounds=ROUNDS,
        floor="test_allowedips_floor_v6")
