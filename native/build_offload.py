"""cffi build script for ``pywg._offload`` (out-of-line API mode): TUN offload helpers
(virtio-net header split, TCP coalescing). Registered in setup.py beside _fastpath;
``pip install -e .`` builds it."""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

HEADER = Path(__file__).with_name("offload.h")


def _cdef() -> str:
    """offload.h as cffi reads it: its declarations and its integer #defines (the include
    guard and #include lines dropped; comments are fine)."""
    keep = []
    for line in HEADER.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            match = re.fullmatch(r"#define (\w+) \(?(-?\w+)\)?(\s*/\*.*\*/)?", line.strip())
            if not match or match.group(1).endswith("_H"):
                continue
            line = f"#define {match.group(1)} {match.group(2)}"
        keep.append(line)
    return "\n".join(keep)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "pywg._offload",
    '#include "offload.h"\n',
    sources=["native/offload.c"],
    include_dirs=["native"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-fvisibility=hidden"],
)
