"""Keepalive tuning on a real NAT: a router whose UDP conntrack timeout is 3 s (per namespace).
The lifetime search (pywg.nat.keepalive) learns it from trials through the router, and the
chosen interval keeps a mapping alive for three timeouts while an idle one dies."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pywg.nat.keepalive import MappingLifetimeSearch
from pywg.testing.natlab import OTHER_INTERNET_ADDRESS, NatLab, NatType, Router, receives
from tests.needs import nat_lab

pytestmark = pytest.mark.netns
TIMEOUT = 3


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[NatLab, Router]]:
    with nat_lab(NatType.PORT_RESTRICTED_CONE, coturn=False, mapping_timeout=TIMEOUT) as opened:
        yield opened, opened.routers[0]


def trial(lab: NatLab, router: Router, idle: float, keepalive: float | None = None) -> tuple[float, bool]:
    """Open a mapping towards an observer, stay idle (or send keepalives every ``keepalive``
    seconds) for ``idle`` seconds, then the observer sends: (measured idle, did it arrive)."""
    with (lab.udp_socket(router.host_ns, router.host_address) as host,
          lab.udp_socket(lab.inet, OTHER_INTERNET_ADDRESS, 0) as observer):
        target = observer.getsockname()
        host.sendto(b"open", target)
        last = time.monotonic()  # the mapping's idle time runs from its last packet
        opened = receives(observer, 0.3)
        assert opened, "the observer got nothing through the NAT"
        mapped = opened[0][1]
        assert mapped[0] == router.wan_address
        end = last + idle
        while keepalive is not None and time.monotonic() + keepalive < end:
            time.sleep(keepalive)
            host.sendto(b"keepalive", target)
            last = time.monotonic()
        time.sleep(max(0.0, end - time.monotonic()))
        measured = time.monotonic() - last
        observer.sendto(b"are you there", mapped)
        return measured, any(data == b"are you there" for data, _ in receives(host, 0.3))


def test_lifetime_is_learnt_and_the_interval_keeps_the_mapping(lab: tuple[NatLab, Router]) -> None:
    nat_lab, router = lab
    search = MappingLifetimeSearch(low=1.0, high=6.0, resolution=0.5)
    while not search.done:
        search.record(*trial(nat_lab, router, search.probe()))
    interval = search.keepalive_interval()
    print(f"mapping survived {search.survived:.2f} s idle, died after {search.died:.2f} s; "
          f"keepalive every {interval:.2f} s ({search.trials} trials)")
    assert search.survived is not None and search.died is not None
    assert TIMEOUT - 1.0 <= search.survived < search.died <= TIMEOUT + 1.0
    assert interval is not None and interval < TIMEOUT
    # With the interval the mapping outlives three timeouts; idle as long, it is gone.
    assert trial(nat_lab, router, 3 * TIMEOUT, keepalive=interval)[1] is True
    assert trial(nat_lab, router, 3 * TIMEOUT)[1] is False
