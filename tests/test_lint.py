"""`make lint` holds in every test run: ruff's checks over the code, tests and benchmarks,
and mypy over the package (DESIGN.md's habits: type hints on public APIs, mypy clean)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [("ruff", "check", "pywg", "tests", "bench"), ("mypy", "pywg")],
                         ids=["ruff", "mypy"])
def test_lint_is_clean(command: tuple[str, ...]) -> None:
    tool = BIN / command[0]
    assert tool.exists(), f"{command[0]} is missing from the virtualenv (make venv installs the test extras)"
    done = subprocess.run([str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
