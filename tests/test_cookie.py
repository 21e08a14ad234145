"""The cookie's input (paper 5.4.7: the source IP and port) as pywg.protocol.cookie makes it:
the same bytes by the quick IPv4 parse and by ipaddress, for every address form a socket
gives; and a cookie bound to its source (another address or port fails mac2)."""

from __future__ import annotations

import ipaddress
import os

from hypothesis import given
from hypothesis import strategies as st

from pywg.protocol.cookie import CookieChecker, CookieGenerator, endpoint_bytes
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.protocol.endpoint import RelayEndpoint
from pywg.protocol.messages import Initiation

ports = st.integers(0, 65535)


@given(st.ip_addresses(), ports)
def test_endpoint_bytes_are_the_packed_address_and_the_port(address: ipaddress._BaseAddress, port: int) -> None:
    assert endpoint_bytes((str(address), port)) == address.packed + port.to_bytes(2, "big")


near_ipv4 = st.lists(st.sampled_from(["1", "01", "255", "256", " 4", "+1", "\u0661", "", "0x1", "-0"]),
                     min_size=3, max_size=5).map(".".join)


@given(st.one_of(st.text(max_size=20), near_ipv4), ports)
def test_endpoint_bytes_refuse_what_is_no_address_as_ipaddress_does(host: str, port: int) -> None:
    try:
        expected: bytes | type[ValueError] = ipaddress.ip_address(host.split("%", 1)[0]).packed + port.to_bytes(2, "big")
    except ValueError:
        expected = ValueError
    try:
        got: bytes | type[ValueError] = endpoint_bytes((host, port))
    except ValueError:
        got = ValueError
    assert got == expected


def test_a_relayed_source_is_its_region_and_node_key() -> None:
    key = bytes(range(32))
    assert endpoint_bytes(RelayEndpoint(9, key)) == bytes([0, 0, 0, 9]) + key


def test_a_cookie_proves_its_own_source_only() -> None:
    responder = dh_generate()
    checker = CookieChecker(dh_pubkey(responder), os.urandom)
    generator = CookieGenerator(dh_pubkey(responder))
    message = generator.add_macs(Initiation(7, os.urandom(32), os.urandom(48), os.urandom(28)).pack(), 0.0)
    source = ("198.51.100.7", 40000)
    reply = checker.create_reply(message, 7, source, 0.0)
    assert generator.consume_reply(reply, 0.0)
    proven = generator.add_macs(Initiation(8, os.urandom(32), os.urandom(48), os.urandom(28)).pack(), 1.0)
    assert checker.check_mac1(proven) and checker.check_mac2(proven, source, 1.0)
    assert not checker.check_mac2(proven, ("198.51.100.8", 40000), 1.0)
    assert not checker.check_mac2(proven, ("198.51.100.7", 40001), 1.0)
