"""What a test needs from the machine: the namespace bed and the real peers. Missing, it
fails the test under CI=true (naming what is missing) and skips it elsewhere."""

from __future__ import annotations

import os

import pytest

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
