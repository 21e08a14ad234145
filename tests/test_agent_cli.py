"""`pywg agent` command-line errors: one line naming the option, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PYWG = str(Path(sys.executable).parent / "pywg")


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYWG, "agent", *args], input=stdin, capture_output=True, text=True, check=False, timeout=30)


@pytest.mark.parametrize(("args", "stdin", "option"), [
    (["up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "/nonexistent/key"], "", "--authkey-file"),
    (["up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "-"], "", "--authkey-file"),
    (["up", "--coordinator", "ftp://x", "--authkey-file", "-"], "k\n", "--coordinator"),
    (["up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "-", "--name", "Bad_Name"], "k\n", "--name"),
    (["up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "-", "--listen-port", "70000"], "k\n",
     "--listen-port"),
    (["up", "--coordinator", "http://127.0.0.1:1"], "", "--authkey-file"),
    (["up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "-", "--engine", "in-process",
      "--stun", "stun.example:3478"], "k\n", "--stun"),
    (["up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "-", "--engine", "in-process",
      "--stun", ","], "k\n", "--stun"),
    (["up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "-", "--stun", "203.0.113.1:3478"], "k\n",
     "--stun"),
    (["up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "-", "--engine", "in-process",
      "--nat-observer", "observer.example:3479"], "k\n", "--nat-observer"),
    (["up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "-", "--nat-observer", "203.0.113.1:3479"],
     "k\n", "--nat-observer"),
    (["status", "--state-dir", "/nonexistent/state"], "", "--state-dir"),
    (["down", "--state-dir", "/nonexistent/state"], "", "--state-dir"),
])
def test_errors_name_the_option(args: list[str], stdin: str, option: str) -> None:
    out = run(*args, stdin=stdin)
    assert out.returncode == 2
    assert option in out.stderr
    assert "Traceback" not in out.stderr


def test_the_auth_key_has_no_command_line_option() -> None:
    out = run("up", "--coordinator", "http://127.0.0.1:1", "--auth-key", "secret", "--authkey-file", "-")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr
