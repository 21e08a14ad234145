"""The cffi extensions (native/build_*.py) are registered here; all metadata is in pyproject.toml.

The extensions are optional: pywg runs without them on its pure-Python path (it warns once
at run time). When they cannot be built (no C compiler, no Python headers: ``CC=false pip
install .`` shows it), the build says so in one warning and the install goes on without
them. ``PYWG_REQUIRE_NATIVE=1`` makes a failed build an error instead (for CI of the fast
path and packagers who want it).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

BUILD_FAILURES = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)


class OptionalBuildExt(build_ext):
    """build_ext that warns, and leaves the extension out, when it cannot compile it."""

    failed: list[tuple[str, str]]

    def run(self) -> None:
        self.failed = []
        try:
            super().run()
        except BUILD_FAILURES as exc:  # e.g. no compiler at all (PlatformError)
            self._skip("all", exc)
        if self.failed:  # one warning for the lot
            names = ", ".join(name for name, _ in self.failed)
            why = "; ".join(dict.fromkeys(reason for _, reason in self.failed))
            print(f"WARNING: pywg: the C extensions could not be built ({names}: {why}); installing "
                  "without them: pywg runs on its pure-Python path (slower). Install a C compiler and "
                  "the Python headers, then reinstall, to get the fast path.", file=sys.stderr)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except BUILD_FAILURES as exc:
            self._skip(ext.name, exc)

    def _skip(self, name: str, exc: BaseException) -> None:
        if os.environ.get("PYWG_REQUIRE_NATIVE", "") not in ("", "0"):
            raise exc
        text = " ".join(str(exc).split())
        if len(text) > 160:  # a compiler command line: its start and how it ended
            text = f"{text[:70]} ... {text[-70:]}"
        self.failed.append((name, f"{type(exc).__name__}: {text}"))

    def get_outputs(self) -> list[str]:
        failed = {name for name, _ in getattr(self, "failed", ())}
        if "all" in failed:
            return []
        return [self.get_ext_fullpath(ext.name) for ext in self.extensions if ext.name not in failed]


setup(cffi_modules=["native/build_fastpath.py:ffibuilder", "native/build_offload.py:ffibuilder"],
      cmdclass={"build_ext": OptionalBuildExt})
