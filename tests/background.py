"""Tests that mostly wait (minutes of an idle tunnel) run as a *background scenario*: a thread
started when the session's collection is done, so that the rest of the suite runs meanwhile;
the test itself (moved to the end of the run by conftest.py) joins the thread and reports
what it found. A scenario shares nothing with the other tests: its own lab, coordinator
and agents. Mark the test ``@pytest.mark.background(SCENARIO)``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Scenario"]


class Scenario:
    """``body(stop)`` run once in a daemon thread; ``stop`` is set when the session ends early
    (the body's waits should be ``stop.wait(seconds)``, then it cleans up and returns)."""

    def __init__(self, name: str, body: Callable[[threading.Event], None], timeout: float) -> None:
        self.name = name
        self.body = body
        self.timeout = timeout  # the most the test waits for the thread, once it is started
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.output: list[str] = []
        self.started_at: float | None = None
        self.seconds: float | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"scenario {self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.body(self.stop)
        except BaseException as exc:  # noqa: BLE001  (reported by the test, whatever it was: a skip, a failure)
            self.error = exc
        finally:
            assert self.started_at is not None
            self.seconds = time.monotonic() - self.started_at

    def result(self) -> None:
        """Wait for the scenario (starting it now if the session did not) and raise what it raised."""
        self.start()
        assert self._thread is not None and self.started_at is not None
        self._thread.join(max(0.0, self.started_at + self.timeout - time.monotonic()))
        if self._thread.is_alive():
            raise AssertionError(f"scenario {self.name} still running after {self.timeout:g} s")
        if self.error is not None:
            if self.output:
                print("\n".join(self.output))
            raise self.error

    def close(self, timeout: float = 60.0) -> None:
        """The session ends: stop the body's waits and let it clean up."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
