"""Shared fixtures. The namespace bed is required under CI=true: a missing tool fails."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pywg.lab.netns import Bed, BedUnavailable, check_bed


def require_bed() -> None:
    """Fail under CI=true, skip elsewhere, when the machine cannot host the bed."""
    try:
        check_bed()
    except BedUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the namespace bed is required under CI=true: {exc}")
        pytest.skip(f"namespace bed unavailable: {exc}")


@pytest.fixture
def bed() -> Iterator[Bed]:
    require_bed()
    with Bed() as b:
        yield b
