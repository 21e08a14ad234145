"""Shared fixtures. The namespace bed is required under CI=true: a missing tool fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from background import Scenario
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


def _scenario(item: pytest.Item) -> Scenario | None:
    marker = item.get_closest_marker("background")
    return marker.args[0] if marker is not None else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Background scenarios' tests last: their threads run while everything else does."""
    items.sort(key=lambda item: _scenario(item) is not None)  # stable: the order is kept otherwise


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    for item in session.items:
        scenario = _scenario(item)
        if scenario is not None:
            scenario.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    for item in getattr(session, "items", []):
        scenario = _scenario(item)
        if scenario is not None:
            scenario.close()
