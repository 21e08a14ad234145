"""Entering a named network namespace for the current thread (Linux, ``setns(2)``).

Sockets and TUN devices created inside the block stay in that namespace after it ends;
only the calling thread moves, the rest of the process stays where it was. Used by the
in-process backend (pywg.manage.backends.link) and by the test beds (pywg.testing).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the block with this thread inside namespace ``ns`` (sockets made there stay there)."""
    with open("/proc/thread-self/ns/net", "rb") as here, open(f"{NETNS_DIR}/{ns}", "rb") as there:
        _setns(there.fileno())
        try:
            yield
        finally:
            _setns(here.fileno())
