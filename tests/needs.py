"""What a test needs from the machine: the namespace bed and the real peers. Missing, it
fails the test under CI=true (naming what is missing) and skips it elsewhere."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from pywg.testing.natlab import TOOLS, NatLab, NatType
from pywg.testing.netns import BedUnavailable, check_bed, check_implementation


def unavailable(reason: str) -> None:
    """Fail under CI=true, skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required under CI=true: {reason}")
    pytest.skip(reason)


def require_bed() -> None:
    """The machine can host the namespace bed (root, ip, wg, wireguard-go, /dev/net/tun)."""
    try:
        check_bed()
    except BedUnavailable as exc:
        unavailable(f"the namespace bed: {exc}")


def require_implementation(*impls: str) -> None:
    """Each of ``impls`` (names in pywg.testing.netns.IMPLEMENTATIONS) is installed."""
    for impl in impls:
        try:
            check_implementation(impl)
        except BedUnavailable as exc:
            unavailable(f"peer not installed: {exc}")


@contextlib.contextmanager
def nat_lab(*routers: NatType, coturn: bool = True, mapping_timeout: int = 30) -> Iterator[NatLab]:
    """A NAT lab (its tools checked first) with a router of each type in ``routers`` (UDP
    mapping timeout ``mapping_timeout`` s) and, with ``coturn``, STUN on STUN_SERVERS."""
    try:
        check_bed((*TOOLS, "ping"))
    except BedUnavailable as exc:
        unavailable(f"the NAT lab: {exc}")
    with NatLab() as lab:
        for nat in routers:
            lab.add_router(nat, mapping_timeout=mapping_timeout)
        if coturn:
            lab.start_coturn()
        yield lab
