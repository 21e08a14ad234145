"""Where one registration's time goes on the PostgreSQL store (no HTTP, no clients): a private
PostgreSQL, one :class:`~pywg.mesh.postgres_store.PostgresStore`, registrations one by one
(``register``) and in batches (``register_many``, when this pywg has it), every statement
timed by its first words.

    python -m bench.register_profile [--count 2000] [--batch 32]

Prints, per mode, registrations per second and, per kind of statement, how many ran per
registration and the microseconds they took per registration (round trip and server time);
"commit + Python" is the rest: the commit, building rows and records, JSON, hashing.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.coordinator_load import postgres
from pywg.manage.key import Key
from pywg.mesh import postgres_store
from pywg.mesh.store import NodeRequest


class Timed:
    """A psycopg connection whose ``execute`` times each statement by its first words."""

    def __init__(self, db: Any, spent: dict[str, float], runs: collections.Counter[str]) -> None:
        self._db, self._spent, self._runs = db, spent, runs

    def execute(self, sql: Any, *args: Any, **kw: Any) -> Any:
        label = " ".join(re.sub(r"\s+", " ", str(sql)).strip().split()[:3])[:40]
        t = time.perf_counter()
        try:
            return self._db.execute(sql, *args, **kw)
        finally:
            self._spent[label] += time.perf_counter() - t
            self._runs[label] += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def profile(store: postgres_store.PostgresStore, key: str, count: int, batch: int, tag: str) -> None:
    spent: dict[str, float] = collections.defaultdict(float)
    runs: collections.Counter[str] = collections.Counter()
    connect: Callable[[], Any] = store._connect
    store._connect = lambda: Timed(connect(), spent, runs)  # type: ignore[method-assign, assignment, return-value]
    requests = [NodeRequest(name=f"{tag}{i}", public_key=Key.generate_private().public_key()) for i in range(count)]
    t = time.perf_counter()
    if batch <= 1:
        for r in requests:
            store.register(r, key, now=time.time())
    else:
        from pywg.mesh.store import RegisterCall

        for lo in range(0, count, batch):
            store.register_many([RegisterCall(r, key, time.time()) for r in requests[lo:lo + batch]])
    wall = time.perf_counter() - t
    store._connect = connect  # type: ignore[method-assign]
    print(f"{'one by one' if batch <= 1 else f'batches of {batch}'}: {count / wall:.0f} registrations/s, "
          f"{wall / count * 1e6:.0f} us each")
    for label, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {runs[label] / count:5.2f} x {label:40s} {s / count * 1e6:7.1f} us")
    print(f"  {'':8s}{'commit + Python':40s} {(wall - sum(spent.values())) / count * 1e6:7.1f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with postgres() as (url, _):
        store = postgres_store.PostgresStore(url)
        try:
            key = store.create_auth_key(reusable=True, expires_at=None, now=time.time())[1]
            profile(store, key, args.count, 1, "a")
            if hasattr(store, "register_many") and args.batch > 1:
                profile(store, key, args.count, args.batch, "b")
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
