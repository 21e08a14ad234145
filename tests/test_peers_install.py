"""``make peers`` (tests/peers/install.py): the pins it installs are the binaries the bed
starts, each installed binary reports its pinned version, and a machine without the
toolchain gets an error naming what is missing. Under CI=true the peers must be there."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from needs import require_implementation

from pywg.testing.netns import IMPLEMENTATIONS, PEERS_DIR

INSTALL = Path(__file__).parent / "peers" / "install.py"
# tests/peers is not a package (the script runs before any virtualenv): load it by path.
_spec = importlib.util.spec_from_file_location("peers_install", INSTALL)
assert _spec is not None and _spec.loader is not None
install = importlib.util.module_from_spec(_spec)
sys.modules["peers_install"] = install
_spec.loader.exec_module(install)

BED_PEERS = {"wireguard-go-2025": "wireguard-go", "boringtun": "boringtun-cli"}


def test_the_bed_starts_what_make_peers_installs() -> None:
    pins = {peer.name: peer for peer in install.PEERS}
    for impl, name in BED_PEERS.items():
        peer, implementation = pins[name], IMPLEMENTATIONS[impl]
        assert implementation.version == peer.version
        assert Path(implementation.binary) == PEERS_DIR / peer.dirname / "bin" / peer.binaries[0]
    assert install.default_root() == PEERS_DIR


@pytest.mark.parametrize(("impl", "version"), [
    ("wireguard-go-2025", "wireguard-go v0.0.20250522"), ("boringtun", "boringtun 0.7.1"),
    ("wireguard-go", "wireguard-go v0.0.20220316")])
def test_installed_peers_report_their_pinned_versions(impl: str, version: str) -> None:
    require_implementation(impl)
    out = subprocess.run([IMPLEMENTATIONS[impl].binary, "--version"], capture_output=True, text=True,
                         check=False, timeout=10)
    assert out.stdout.startswith(version), out


def test_check_reports_every_peer_installed() -> None:
    done = subprocess.run([sys.executable, str(INSTALL), "--check"], capture_output=True, text=True,
                          check=False, timeout=30)
    if done.returncode != 0 and os.environ.get("CI") != "true":
        pytest.skip(f"peers not installed here: {done.stdout}")
    assert done.returncode == 0, done.stdout
    assert done.stdout.count(": installed") == len(install.PEERS)


def test_a_missing_toolchain_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty))  # neither go nor cargo
    done = subprocess.run([sys.executable, str(INSTALL), "--root", str(tmp_path / "peers")],
                          capture_output=True, text=True, check=False, timeout=30, env=env)
    assert done.returncode == 1
    assert "wireguard-go-0.0.20250522: go is not on PATH (Go >= 1.26.6" in done.stderr
    assert "boringtun-cli-0.7.1: cargo is not on PATH" in done.stderr
    assert "derper-1.102.3: go is not on PATH" in done.stderr
    assert not any(tmp_path.glob("peers/*/.installed"))  # nothing passes for installed
