"""The agent's list of coordinator replicas (``--coordinator URL[,URL...]``).

Replicas share one store, so a node token and a watch revision are valid on every one
of them: on a failure the agent moves to the next URL and resumes from its revision.
The first move after a working connection is immediate (with a little jitter, so the
agents of a dead replica do not all arrive at the same instant); each full round of
failures doubles the pause, up to ``backoff_max``.
"""

from __future__ import annotations

import random
import re

URL = re.compile(r"https?://[^\s/,]+")


class BadCoordinatorList(ValueError):
    """The ``--coordinator`` text is not a comma-separated list of http(s)://HOST:PORT."""


def parse_urls(text: str) -> tuple[str, ...]:
    """``http://a:1,http://b:2`` -> the URLs without trailing slashes; duplicates refused."""
    urls = tuple(u.strip().rstrip("/") for u in text.split(","))
    for u in urls:
        if not URL.fullmatch(u):
            raise BadCoordinatorList(f"expected http://HOST:PORT or https://HOST:PORT, got {u!r}")
    if len(set(urls)) != len(urls):
        raise BadCoordinatorList(f"a URL appears twice in {text!r}")
    return urls


class Replicas:
    """Which replica to talk to now, and how long to wait before the next try."""

    def __init__(self, urls: tuple[str, ...] | list[str], *, backoff_min: float = 0.2,
                 backoff_max: float = 5.0, rng: random.Random | None = None) -> None:
        if not urls:
            raise BadCoordinatorList("no coordinator URL")
        self.urls = tuple(urls)
        self.index = 0
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._failures = 0  # consecutive failures since the last success
        self.moves = 0  # how many times the agent switched replica (for status)

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def succeeded(self) -> None:
        self._failures = 0

    def failed(self) -> float:
        """Move to the next replica; the seconds to wait before trying it."""
        self._failures += 1
        if len(self.urls) > 1:
            self.index = (self.index + 1) % len(self.urls)
            self.moves += 1
        rounds = (self._failures - 1) // len(self.urls)  # full rounds of the list that failed
        if rounds == 0 and len(self.urls) > 1:
            pause = self.backoff_min / 2  # another replica: go there soon
        else:
            pause = min(self.backoff_min * 2 ** rounds, self.backoff_max)
        return pause * self._rng.uniform(0.5, 1.5)
