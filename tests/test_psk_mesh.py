"""Per-pair preshared keys in a real mesh: a coordinator with ``--preshared-keys`` and three
agents in network namespaces (two on pywg's daemon, one on wireguard-go 2025). ``wg show
IF preshared-keys`` on both ends of every pair shows the same key, a different one per
pair; without the option, ``(none)``; pings pass either way."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from meshbed import PYWG, MeshBed, mesh_bed, sh
from meshbed import wait_for as eventually

pytestmark = pytest.mark.netns

PREFIX = "h13k"  # every namespace and link of this test starts with it
AGENTS = (1, 2, 3)
WGO = Path.home() / ".cache/pywg/peers/wireguard-go-0.0.20250522/bin/wireguard"


def secret_file(tmp: Path) -> Path:
    """A new coordinator secret for ``--preshared-keys`` (``pywg coordinator psk-secret create``)."""
    path = tmp / "psk.secret"
    sh(PYWG, "coordinator", "psk-secret", "create", str(path))
    return path


@contextlib.contextmanager
def psk_mesh(request: pytest.FixtureRequest, tmp: Path, *coordinator_options: str) -> Iterator[MeshBed]:
    """Namespaces 0..3 on a bridge (0: the coordinator, with ``coordinator_options``)."""
    if not WGO.exists():
        pytest.fail(f"wireguard-go 2025 is needed at {WGO} (python3 tests/peers/install.py)")
    with mesh_bed(request, tmp, prefix=PREFIX, subnet="10.217.0.0/24", port=18217, prefix4="100.117.0.0/16",
                  prefix6="fd17:a::/48", count=len(AGENTS), coordinator_options=coordinator_options) as m:
        yield m


@pytest.fixture
def keyed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MeshBed]:
    """The coordinator started with ``--preshared-keys``."""
    with psk_mesh(request, tmp_path, "--preshared-keys", str(secret_file(tmp_path))) as m:
        yield m


@pytest.fixture
def plain(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MeshBed]:
    """The coordinator started without ``--preshared-keys``."""
    with psk_mesh(request, tmp_path) as m:
        yield m


def psks(m: MeshBed, i: int) -> dict[str, str]:
    """``wg show IF preshared-keys`` of agent i: peer public key -> key or "(none)"."""
    out = m.in_ns(i, "wg", "show", m.ifname(i), "preshared-keys").stdout
    return dict(line.split("\t") for line in out.splitlines() if line)


def with_two_peers(m: MeshBed, i: int) -> dict[str, Any]:
    """Agent i's status once it shows two peers, else {}."""
    st = m.status(i)
    return st if len(st.get("peers", [])) == 2 else {}


def form(m: MeshBed) -> dict[int, dict]:
    """Start the three agents (agent3 on wireguard-go); every pair pings both ways."""
    started = time.monotonic()
    m.up(1)
    m.up(2)
    m.up(3, daemon=str(WGO))
    st = {i: eventually(f"agent{i} has two peers", partial(with_two_peers, m, i)) for i in AGENTS}
    for a in AGENTS:
        for b in AGENTS:
            if a != b:
                eventually(f"agent{a} pings agent{b}", partial(m.ping, a, st[b]["internalIp"]))
                eventually(f"agent{a} pings agent{b} (IPv6)", partial(m.ping, a, st[b]["internalIpv6"]))
    print(f"three agents up to pings both ways: {time.monotonic() - started:.2f} s")
    return st


def pair_keys(m: MeshBed, st: dict[int, dict]) -> dict[tuple[int, int], str]:
    """Each pair's preshared key if both ends of every pair show the same real one, else {}."""
    shown = {i: psks(m, i) for i in AGENTS}
    out = {}
    for a, b in ((1, 2), (1, 3), (2, 3)):
        ab, ba = shown[a].get(st[b]["publicKey"]), shown[b].get(st[a]["publicKey"])
        if ab != ba or ab in (None, "(none)", "A" * 43 + "="):
            return {}
        out[(a, b)] = ab
    return out


def test_with_preshared_keys_each_pair_shares_its_own_key(keyed: MeshBed) -> None:
    bed = keyed
    st = form(bed)  # the peers were added with their keys: a handshake proves both ends agree
    keys = pair_keys(bed, st)
    assert keys, {i: psks(bed, i) for i in AGENTS}
    assert len(set(keys.values())) == 3, "two pairs share a preshared key"
    # agent1 rotates its key: its peers rename it in place and keep the pair's key (it
    # belongs to the two nodes); the handshakes with the new key need both ends to agree.
    rotate = subprocess.run([PYWG, "agent", "rotate", "--state-dir", str(bed.state(1)),
                             "--overlap", "2"], check=False, capture_output=True, text=True, timeout=60, env=bed.env)
    assert rotate.returncode == 0, rotate.stderr
    new = rotate.stdout.strip()
    assert new != st[1]["publicKey"] and len(new) == 44
    st[1] = {**st[1], "publicKey": new}
    assert eventually("the pairs keep their keys under agent1's new key", lambda: pair_keys(bed, st)) == keys
    for b in (2, 3):
        assert eventually(f"agent{b} pings agent1 after its rotation", partial(bed.ping, b, st[1]["internalIp"]))
    # The keys are secrets: not in status.json, the logs, the topology or `coordinator nodes`.
    admin_view = bed.pywg("coordinator", "nodes", "--store", bed.store, "--json")
    texts = [admin_view] + [p.read_text() for p in bed.tmp.glob("*.log")] + \
        [(bed.state(i) / "status.json").read_text() for i in AGENTS]
    for text in texts:
        assert not any(k in text for k in keys.values())


def test_without_preshared_keys_peers_have_none_then_turned_on_they_get_them(plain: MeshBed) -> None:
    bed = plain
    st = form(bed)
    for i in AGENTS:
        shown = psks(bed, i)
        assert set(shown) == {st[j]["publicKey"] for j in AGENTS if j != i}
        assert set(shown.values()) == {"(none)"}
    # The coordinator comes back with --preshared-keys: at their reconnect the agents ask
    # again and give every pair its key; the tunnels carry on.
    bed.stop_coordinator()
    t0 = time.monotonic()
    bed.restart_coordinator("--preshared-keys", str(secret_file(bed.tmp)))
    keys = eventually("every pair has its preshared key", lambda: pair_keys(bed, st))
    print(f"coordinator back with --preshared-keys -> every pair keyed: {time.monotonic() - t0:.2f} s")
    assert len(set(keys.values())) == 3
    for a in AGENTS:
        for b in AGENTS:
            if a != b:
                eventually(f"agent{a} pings agent{b}", partial(bed.ping, a, st[b]["internalIp"]))
