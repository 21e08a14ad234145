"""The NAT lab (pywg.testing.natlab) behaves as the NAT types it claims, seen from a host
behind each router with the STUN client and Debian's coturn in the internet namespace:
mapping (one reflexive port for every destination or one per destination, always on the
router's public address) and filtering (who else may send to that mapping)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pywg.nat.stun import TransportAddress
from pywg.nat.stun_client import BindingFailure, BindingResult, MappingBehavior, classify_mapping
from pywg.testing.natlab import (
    OTHER_INTERNET_ADDRESS,
    STUN_SERVERS,
    NatLab,
    NatType,
    Router,
    receives,
    stun_bindings,
)
from pywg.testing.netns import run
from tests.needs import nat_lab

pytestmark = pytest.mark.netns

MAPPING = {
    NatType.PORT_RESTRICTED_CONE: MappingBehavior.ENDPOINT_INDEPENDENT,
    NatType.FULL_CONE: MappingBehavior.ENDPOINT_INDEPENDENT,
    NatType.ADDRESS_RESTRICTED_CONE: MappingBehavior.ENDPOINT_INDEPENDENT,
    NatType.SYMMETRIC: MappingBehavior.ENDPOINT_DEPENDENT,
}
# Which strangers reach the mapping the host made towards STUN_SERVERS[0]:
# (the server's address from another port, another internet address).
FILTERING = {
    NatType.PORT_RESTRICTED_CONE: (False, False),
    NatType.FULL_CONE: (True, True),
    NatType.ADDRESS_RESTRICTED_CONE: (True, False),
    NatType.SYMMETRIC: (False, False),
}


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    with nat_lab(*NatType) as opened:
        yield opened


def router_of(lab: NatLab, nat: NatType) -> Router:
    return next(r for r in lab.routers if r.nat is nat)


@pytest.mark.parametrize("nat", list(MAPPING), ids=lambda n: n.value)
def test_mapping_behaviour_and_reflexive_address(lab: NatLab, nat: NatType) -> None:
    router = router_of(lab, nat)
    with lab.udp_socket(router.host_ns, router.host_address) as sock:
        me = sock.getsockname()
        outcomes = stun_bindings(sock)
    assert all(isinstance(o, BindingResult) for o in outcomes), outcomes
    assert {str(o.reflexive.ip) for o in outcomes} == {router.wan_address}
    report = classify_mapping(outcomes, [TransportAddress.of(*me[:2])])
    assert report.behavior is MAPPING[nat], report.reason
    assert report.behind_nat is True
    if MAPPING[nat] is MappingBehavior.ENDPOINT_INDEPENDENT:
        assert report.reflexive is not None and str(report.reflexive.ip) == router.wan_address
        assert report.reflexive.port == me[1]  # masquerade keeps a free port
    else:
        assert len({o.reflexive.port for o in outcomes}) == 2


@pytest.mark.parametrize("nat", list(FILTERING), ids=lambda n: n.value)
def test_filtering_of_strangers(lab: NatLab, nat: NatType) -> None:
    router = router_of(lab, nat)
    with (lab.udp_socket(router.host_ns, router.host_address) as sock,
          lab.udp_socket(lab.inet, str(STUN_SERVERS[0].ip), 4000) as same_address,
          lab.udp_socket(lab.inet, OTHER_INTERNET_ADDRESS, 4000) as other_address):
        outcomes = stun_bindings(sock, STUN_SERVERS[:1])
        assert isinstance(outcomes[0], BindingResult), outcomes
        mapped = outcomes[0].reflexive.as_tuple()
        same_address.sendto(b"same address", mapped)
        other_address.sendto(b"other address", mapped)
        got = {data for data, _ in receives(sock, 0.5)}
    assert ((b"same address" in got), (b"other address" in got)) == FILTERING[nat], got


def test_udp_blocked_gets_no_answer(lab: NatLab) -> None:
    router = router_of(lab, NatType.UDP_BLOCKED)
    with lab.udp_socket(router.host_ns, router.host_address) as sock:
        outcomes = stun_bindings(sock)
    assert len(outcomes) == 2 and all(isinstance(o, BindingFailure) for o in outcomes), outcomes
    assert classify_mapping(outcomes).behavior is MappingBehavior.UNKNOWN


def test_open_host_is_not_behind_nat(lab: NatLab) -> None:
    with lab.udp_socket(lab.open_host, "10.209.0.2") as sock:
        outcomes = stun_bindings(sock)
        me = TransportAddress.of(*sock.getsockname()[:2])
    report = classify_mapping(outcomes, [me])
    assert report.behavior is MappingBehavior.ENDPOINT_INDEPENDENT and report.behind_nat is False


def test_close_leaves_no_namespace() -> None:
    with nat_lab(NatType.SYMMETRIC, coturn=False) as opened:
        prefix = opened.prefix
        assert sum(ns.startswith(prefix + "-") for ns in run("ip", "netns", "list").split()) == 4
        assert "pywg_natlab" in run("nft", "list", "tables", ns=opened.routers[0].ns)
    assert not [ns for ns in run("ip", "netns", "list").split() if ns.startswith(prefix + "-")]
