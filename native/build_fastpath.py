"""cffi build script for ``pywg._fastpath`` (out-of-line API mode).

setup.py registers it with ``cffi_modules=["native/build_fastpath.py:ffibuilder"]``, so
``pip install .`` and ``pip install -e .`` compile it with the C compiler and the Python
headers alone: OpenSSL is not linked but loaded at run time (native/evp.c), so no OpenSSL
headers are needed either.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# setuptools wants source paths relative to the project root (the directory of setup.py).
# hop.c finishes checksums with offload.c's pywg_checksum (compiled into both extensions,
# hidden in each).
SOURCES = ["native/fastpath.c", "native/evp.c", "native/portable.c", "native/hop.c", "native/offload.c",
           "native/screen.c"]
HEADERS = ["fastpath.h", "hop.h", "screen.h"]


def _cdef() -> str:
    """The headers without their preprocessor lines: the declarations cffi parses."""
    text = []
    for name in HEADERS:
        with open(os.path.join(HERE, name), encoding="utf-8") as header:
            text += [line for line in header if not line.lstrip().startswith("#")]
    return "".join(text)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "pywg._fastpath",
    '#include "fastpath.h"\n#include "hop.h"\n#include "screen.h"\n',
    sources=SOURCES,
    include_dirs=["native"],
    libraries=[] if sys.platform == "darwin" else ["dl", "pthread"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-fvisibility=hidden"],
)
