"""What `pywg daemon` and `pywg stats` tell a user (issue 16), on the namespace bed: a
second daemon for a running interface says "already running"; the stats show which crypto
backend and data path are active; PYWG_PUREPYTHON=1 warns once; a keystore that cannot
be used is one message, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pywg import fastpath
from pywg.testing.netns import Bed

pytestmark = pytest.mark.netns


def pywg(ns: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "pywg.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, **(env or {})))


def test_second_daemon_says_already_running(bed: Bed) -> None:
    name = bed.unique_ifname("st")
    first = pywg(bed.ns_a, "daemon", name)
    assert first.returncode == 0, first.stderr
    again = pywg(bed.ns_a, "daemon", name)
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    assert f"{name}: already running" in again.stderr and "Errno" not in again.stderr, again.stderr
    again = pywg(bed.ns_a, "daemon", "-f", name)
    assert again.returncode == 1 and "already running" in again.stderr, again.stderr


@pytest.mark.parametrize("pure", [False, True], ids=["default", "PYWG_PUREPYTHON=1"])
def test_stats_show_crypto_backend_and_data_path(bed: Bed, pure: bool) -> None:
    name = bed.unique_ifname("st")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYWG_")}
    if pure:
        env["PYWG_PUREPYTHON"] = "1"
    started = subprocess.run(["ip", "netns", "exec", bed.ns_a, sys.executable, "-m", "pywg.cli", "daemon", name],
                             capture_output=True, text=True, timeout=60, check=False, env=env)
    assert started.returncode == 0, started.stderr
    # PYWG_PUREPYTHON=1 warns once; with the extensions built, a default start is quiet.
    warnings = started.stderr.count("Warning")
    assert warnings == (1 if pure or not fastpath.NATIVE_AVAILABLE else 0), started.stderr
    if pure:
        assert "PYWG_PUREPYTHON=1" in started.stderr
    shown = pywg(bed.ns_a, "stats", name)
    assert shown.returncode == 0, shown.stderr
    stats = json.loads(shown.stdout)
    crypto, path = stats["crypto"], stats["data_path"]
    assert crypto["pure_python_requested"] is pure
    if pure or not fastpath.NATIVE_AVAILABLE:
        assert crypto["backend"] == "python" and crypto["native_extensions"] is False
        assert path["hop"] is False and path["tun_offload"] is False
    else:
        assert crypto["backend"] == fastpath.BACKEND and crypto["native_extensions"] is True
        assert path == {"threads": True, "hop": True, "tun_offload": True, "udp_gso": True, "udp_gro": True,
                        "native_offload": True}


def test_rotate_with_an_unusable_keystore_is_one_message(bed: Bed, tmp_path: Path) -> None:
    name = bed.unique_ifname("st")
    key_file = tmp_path / "k"
    assert pywg(bed.ns_a, "key", "generate", "--private-key-file", str(key_file)).returncode == 0
    created = pywg(bed.ns_a, "interface", "create", name, "--private-key-file", str(key_file))
    assert created.returncode == 0, created.stderr
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = pywg(bed.ns_a, "key", "rotate", name, "--keystore", str(not_a_dir))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("pywg: ") and str(not_a_dir) in done.stderr, done.stderr
    shown = pywg(bed.ns_a, "interface", "show", name, "--json")
    assert json.loads(shown.stdout)["publicKey"] == subprocess.run(
        ["wg", "pubkey"], input=key_file.read_text(), capture_output=True, text=True, check=True).stdout.strip()
