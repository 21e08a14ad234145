"""The Endpoint value type: parse and format round-trip, canonical hosts, IPv4-mapped
normalisation, tuple compatibility, and clear errors for text that is no endpoint."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pywg.protocol.endpoint import Endpoint, EndpointError, RelayEndpoint
from pywg.uapi.protocol import UapiError, format_endpoint, parse_endpoint


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 65535))
def test_format_then_parse_is_the_same_endpoint(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                               port: int) -> None:
    endpoint = Endpoint.of(str(address), port)
    assert Endpoint.parse(str(endpoint)) == endpoint
    assert str(endpoint) == format_endpoint(endpoint)  # the UAPI's text, byte for byte
    assert parse_endpoint(str(endpoint)) == endpoint


def test_hosts_are_canonical_and_it_is_a_tuple() -> None:
    endpoint = Endpoint.parse("[2001:DB8:0::1]:51820")
    assert endpoint == ("2001:db8::1", 51820) and hash(endpoint) == hash(("2001:db8::1", 51820))
    assert str(endpoint) == "[2001:db8::1]:51820" and endpoint.is_ipv6
    with pytest.raises(AttributeError):
        endpoint.port = 1  # type: ignore[misc]


def test_ipv4_mapped_normalises_to_ipv4() -> None:
    assert Endpoint.parse("[::ffff:192.0.2.1]:7").unmapped() == Endpoint("192.0.2.1", 7)
    assert Endpoint.parse("192.0.2.1:7").unmapped() == Endpoint("192.0.2.1", 7)
    assert Endpoint.parse("[2001:db8::1]:7").unmapped() == Endpoint("2001:db8::1", 7)


@pytest.mark.parametrize("text, field", [
    ("192.0.2.1", "expected IP:port"), ("example.com:1", "not an IP"), ("192.0.2.1:70000", "port"),
    ("[192.0.2.1]:1", "square brackets"), ("2001:db8::1:5", "square brackets"), ("[::1]:", "expected"),
])
def test_no_endpoint_is_a_clear_error(text: str, field: str) -> None:
    with pytest.raises(EndpointError, match=field):
        Endpoint.parse(text)


@given(st.text(max_size=40))
def test_parse_takes_any_text_and_agrees_with_uapi_on_what_it_accepts(text: str) -> None:
    try:
        endpoint = Endpoint.parse(text)
    except EndpointError:
        return
    try:
        assert parse_endpoint(text) == endpoint
    except UapiError:
        pass  # the UAPI refuses a few more (zones with odd names); never less


def test_relay_endpoint_is_checked() -> None:
    relay = RelayEndpoint.of(1, bytes(range(32)))
    assert relay == (1, bytes(range(32))) and str(relay).startswith("derp:1/")
    with pytest.raises(EndpointError, match="region"):
        RelayEndpoint.of(0, bytes(32))
    with pytest.raises(EndpointError, match="node key"):
        RelayEndpoint.of(1, bytes(31))


@pytest.mark.parametrize("text", ["[::ffff:0:0]:0", "[::ffff:0.0.0.0]:0", "[::FFFF:c000:201]:9"])
def test_ipv4_mapped_text_is_one_canonical_form(text: str) -> None:
    endpoint = Endpoint.parse(text)
    assert endpoint == parse_endpoint(text)
    assert endpoint.host.startswith("::ffff:") and "." in endpoint.host
