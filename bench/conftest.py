"""Fixtures for the pywg benchmarks; the helpers live in bench/support.py."""

from __future__ import annotations

import pytest

from bench.support import Pair


@pytest.fixture
def pair() -> Pair:
    """A fresh initiator/responder pair of Dispatchers, no session yet."""
    return Pair.create()
