"""Shared fixtures. The namespace bed is required under CI=true: a missing tool fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from needs import require_bed
from postgres_server import PostgresServer, postgres_server

from pywg.testing.netns import Bed


@pytest.fixture
def bed() -> Iterator[Bed]:
    require_bed()
    with Bed() as b:
        yield b


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the session (see postgres_server.py)."""
    with postgres_server() as server:
        yield server
