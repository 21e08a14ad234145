"""The TUN wrapper: its MTU is read in the TUN's own namespace, from any thread."""

from __future__ import annotations

import pytest

from pywg.device.tun import Tun
from pywg.testing.netns import Bed, entered, run

pytestmark = pytest.mark.netns


def test_mtu_follows_ip_link_from_another_namespace(bed: Bed) -> None:
    with entered(bed.ns_a):
        tun = Tun(bed.unique_ifname("mt"), 1400)
    try:
        assert tun.mtu == 1400  # read from the test's own namespace
        run("ip", "link", "set", tun.name, "mtu", "1280", ns=bed.ns_a)
        assert tun.mtu == 1280
    finally:
        tun.close()
    assert tun.name not in run("ip", "link", ns=bed.ns_a)
