"""Every CLI error a user can make gets one clear message naming the option at fault, exit
status 2 (bad input) or 1 (the operation failed), and never a traceback (issue 16).

These run the real command (``python -m pywg.cli``) as a subprocess; none needs a running
interface: a name nobody serves is the "operation failed" case.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pywg.manage.key import Key

GOOD_KEY = Key.generate_private().public_key().to_base64()
KEY_33_BYTES = base64.b64encode(os.urandom(33)).decode()  # 44 characters, no '='
NOBODY = f"nosuch{os.getpid() % 100000}"  # an interface nobody serves


def pywg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pywg.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


CASES = [
    # (arguments, exit status, what the message must contain)
    (("key", "rotate", NOBODY, "--keystore", "{tmp}/keys"), 1, f"no interface {NOBODY}"),
    (("key", "rotate", NOBODY, "--keystore", "{tmp}/keys", "--overlap", "-1"), 2, "--overlap"),
    (("key", "rotate", NOBODY, "--keystore", "{tmp}/keys", "--overlap", "nan"), 2, "--overlap"),
    (("key", "rotate", NOBODY, "--keystore", "{tmp}/keys", "--overlap", "soon"), 2, "--overlap"),
    (("key", "rotate", NOBODY, "--keystore", "{tmp}/keys", "--timeout", "0"), 2, "--timeout"),
    (("key", "rotate", NOBODY, "--keystore", "{tmp}/keys", "--peer", NOBODY), 2, f"--peer {NOBODY}"),
    (("key", "generate"), 2, "--private-key-file"),
    (("key", "generate", "--private-key-file", "{tmp}/no/such/dir/k"), 2, "--private-key-file"),
    (("peer", "add", "wg0", "--public-key", KEY_33_BYTES), 2, "--public-key: a key is 32 bytes"),
    (("peer", "add", "wg0", "--public-key", "bogus"), 2, "--public-key"),
    (("peer", "add", "wg0", "--public-key", GOOD_KEY, "--endpoint", "192.0.2.1"), 2, "--endpoint"),
    (("peer", "add", "wg0", "--public-key", GOOD_KEY, "--endpoint", "[fd00::1:51820"), 2, "--endpoint"),
    (("peer", "add", "wg0", "--public-key", GOOD_KEY, "--endpoint", "no-such-host.invalid:51820"), 2,
     "--endpoint"),
    (("peer", "add", "wg0", "--public-key", GOOD_KEY, "--allowed-ips", "10.0.0.300/32"), 2, "--allowed-ips"),
    (("peer", "add", "wg0", "--public-key", GOOD_KEY, "--persistent-keepalive", "x"), 2,
     "--persistent-keepalive"),
    (("peer", "add", "wg0", "--public-key", GOOD_KEY, "--preshared-key-file", "{tmp}/missing"), 2,
     "--preshared-key-file"),
    (("peer", "update", "wg0", "--public-key", GOOD_KEY, "--new-public-key", KEY_33_BYTES), 2,
     "--new-public-key"),
    (("peer", "add", NOBODY, "--public-key", GOOD_KEY), 1, f"no interface {NOBODY}"),
    (("peer", "update", NOBODY, "--public-key", GOOD_KEY, "--new-public-key", GOOD_KEY), 1,
     f"no interface {NOBODY}"),
    (("interface", "create", "x" * 16), 2, "at most 15 bytes"),
    (("interface", "create", "wg0", "--private-key-file", "{tmp}/missing"), 2, "--private-key-file"),
    (("interface", "create", "wg0", "--listen-port", "65536"), 2, "--listen-port"),
    (("interface", "create", "wg0", "--mtu", "1"), 2, "--mtu"),
    (("interface", "create", "wg0", "--address", "10.0.0.1"), 2, "--address"),
    (("interface", "create", "wg0", "--implementation", ""), 2, "--implementation"),
    (("interface", "show", NOBODY), 1, f"no interface {NOBODY}"),
    (("interface", "delete", NOBODY), 1, f"no interface {NOBODY}"),
    (("stats", NOBODY), 1, NOBODY),
    (("daemon", "-f", "bad/name"), 2, "invalid interface name"),
]


@pytest.mark.parametrize(("args", "status", "message"), CASES, ids=lambda v: " ".join(v) if isinstance(v, tuple)
                         else str(v))
def test_cli_error_is_one_clear_message(tmp_path: Path, args: tuple[str, ...], status: int, message: str) -> None:
    done = pywg(*(arg.replace("{tmp}", str(tmp_path)) for arg in args))
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == status, (done.returncode, done.stderr)
    assert message in done.stderr, done.stderr
    assert done.stdout == ""


def test_key_file_with_a_33_byte_key_names_the_size(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    key_file.write_text(KEY_33_BYTES + "\n")
    done = pywg("interface", "create", "wg0", "--private-key-file", str(key_file))
    assert done.returncode == 2 and "--private-key-file" in done.stderr and "33 bytes" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
