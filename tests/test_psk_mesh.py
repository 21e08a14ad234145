"""Per-pair preshared keys in a real mesh: a coordinator with ``--preshared-keys`` and three
agents in network namespaces (two on pywg's daemon, one on wireguard-go 2025). ``wg show
IF preshared-keys`` on both ends of every pair shows the same key, a different one per
pair; without the option, ``(none)``; pings pass either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import require_bed
from test_agent_mesh import wait_for as eventually

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent
PREFIX = "h13k"  # every namespace and link of this test starts with it
BRIDGE = f"{PREFIX}br"
COORD = "10.217.0.1"
PORT = 18217
AGENTS = (1, 2, 3)
WGO = Path.home() / ".cache/pywg/peers/wireguard-go-0.0.20250522/bin/wireguard"


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def in_ns(i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}n{i}", *args], check=check, capture_output=True, text=True)


class PskMesh:
    """A bridge, namespaces 0..3 (0: the coordinator), agents started by :meth:`agent`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = f"sqlite:{tmp / 'coord.db'}"
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.procs: list[subprocess.Popen[bytes]] = []
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        for i in (0, *AGENTS):
            ns, veth = f"{PREFIX}n{i}", f"{PREFIX}v{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"10.217.0.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.keyfile = tmp / "authkey"
        self.keyfile.write_text(sh(str(BIN / "pywg"), "coordinator", "authkey", "create", "--store", self.store,
                                   "--reusable"))

    def _spawn(self, ns: int, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}n{ns}", *cmd], stdout=log, stderr=log,
                                           env=self.env))
        return self.procs[-1]

    def coordinator(self, secret: Path | None) -> subprocess.Popen[bytes]:
        """Start the coordinator (log coordN.log, N counting starts); the process."""
        name = f"coord{sum(1 for _ in self.tmp.glob('coord*.log'))}"
        cmd = [str(BIN / "pywg"), "coordinator", "serve", "--listen", f"{COORD}:{PORT}", "--store", self.store,
               "--prefix4", "100.117.0.0/16", "--prefix6", "fd17:a::/48"]
        proc = self._spawn(0, name, cmd + (["--preshared-keys", str(secret)] if secret else []))
        eventually("the coordinator listens", lambda: "listening on" in (self.tmp / f"{name}.log").read_text(), 15)
        return proc

    def agent(self, i: int, daemon: Path | None = None) -> None:
        cmd = [str(BIN / "pywg"), "agent", "up", "--coordinator", f"http://{COORD}:{PORT}",
               "--authkey-file", str(self.keyfile), "--interface", f"{PREFIX}w{i}",
               "--state-dir", str(self.tmp / f"agent{i}"), "--name", f"agent{i}", "--health-interval", "1"]
        self._spawn(i, f"agent{i}", cmd + (["--daemon-command", str(daemon)] if daemon else []))

    def status(self, i: int) -> dict:
        path = self.tmp / f"agent{i}" / "status.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def psks(self, i: int) -> dict[str, str]:
        """``wg show IF preshared-keys`` of agent i: peer public key -> key or "(none)"."""
        out = in_ns(i, "wg", "show", f"{PREFIX}w{i}", "preshared-keys").stdout
        return dict(line.split("\t") for line in out.splitlines() if line)

    def ping(self, a: int, addr: str) -> bool:
        return in_ns(a, "ping", "-n", "-q", "-c", "1", "-W", "1", addr, check=False).returncode == 0

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for i in (0, *AGENTS):
            sh("ip", "-n", f"{PREFIX}n{i}", "link", "del", f"{PREFIX}w{i}", check=False)
            sh("ip", "netns", "del", f"{PREFIX}n{i}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[PskMesh]:
    require_bed()
    if not WGO.exists():
        pytest.fail(f"wireguard-go 2025 is needed at {WGO} (python3 tests/peers/install.py)")
    for i in (0, *AGENTS):  # a run killed earlier may have left them
        sh("ip", "netns", "del", f"{PREFIX}n{i}", check=False)
    sh("ip", "link", "del", BRIDGE, check=False)
    m = PskMesh(tmp_path)
    try:
        yield m
    except BaseException:
        for f in sorted(tmp_path.glob("*.log")):
            print(f"--- {f.name}\n{f.read_text()[-3000:]}")
        raise
    finally:
        m.close()


def form(m: PskMesh) -> dict[int, dict]:
    """Start the three agents (agent3 on wireguard-go); every pair pings both ways."""
    started = time.monotonic()
    m.agent(1)
    m.agent(2)
    m.agent(3, daemon=WGO)
    st = {i: eventually(f"agent{i} has two peers", lambda i=i: len(m.status(i).get("peers", [])) == 2 and m.status(i))
          for i in AGENTS}
    for a in AGENTS:
        for b in AGENTS:
            if a != b:
                eventually(f"agent{a} pings agent{b}", lambda a=a, b=b: m.ping(a, st[b]["internalIp"]))
                eventually(f"agent{a} pings agent{b} (IPv6)", lambda a=a, b=b: m.ping(a, st[b]["internalIpv6"]))
    print(f"three agents up to pings both ways: {time.monotonic() - started:.2f} s")
    return st


def pair_keys(m: PskMesh, st: dict[int, dict]) -> dict[tuple[int, int], str] | None:
    """Each pair's preshared key if both ends show the same real one, else None."""
    shown = {i: m.psks(i) for i in AGENTS}
    out = {}
    for a, b in ((1, 2), (1, 3), (2, 3)):
        ab, ba = shown[a].get(st[b]["publicKey"]), shown[b].get(st[a]["publicKey"])
        if ab != ba or ab in (None, "(none)", "A" * 43 + "="):
            return None
        out[(a, b)] = ab
    return out


def secret_file(m: PskMesh) -> Path:
    path = m.tmp / "psk.secret"
    sh(str(BIN / "pywg"), "coordinator", "psk-secret", "create", str(path))
    return path


def test_with_preshared_keys_each_pair_shares_its_own_key(bed: PskMesh) -> None:
    bed.coordinator(secret_file(bed))
    st = form(bed)  # the peers were added with their keys: a handshake proves both ends agree
    keys = pair_keys(bed, st)
    assert keys, {i: bed.psks(i) for i in AGENTS}
    assert len(set(keys.values())) == 3, "two pairs share a preshared key"
    # agent1 rotates its key: its peers rename it in place and keep the pair's key (it
    # belongs to the two nodes); the handshakes with the new key need both ends to agree.
    rotate = subprocess.run([str(BIN / "pywg"), "agent", "rotate", "--state-dir", str(bed.tmp / "agent1"),
                             "--overlap", "2"], check=False, capture_output=True, text=True, timeout=60, env=bed.env)
    assert rotate.returncode == 0, rotate.stderr
    new = rotate.stdout.strip()
    assert new != st[1]["publicKey"] and len(new) == 44
    st[1] = {**st[1], "publicKey": new}
    assert eventually("the pairs keep their keys under agent1's new key", lambda: pair_keys(bed, st)) == keys
    for b in (2, 3):
        assert eventually(f"agent{b} pings agent1 after its rotation", lambda b=b: bed.ping(b, st[1]["internalIp"]))
    # The keys are secrets: not in status.json, the logs, the topology or `coordinator nodes`.
    admin_view = sh(str(BIN / "pywg"), "coordinator", "nodes", "--store", bed.store, "--json")
    texts = [admin_view] + [p.read_text() for p in bed.tmp.glob("*.log")] + \
        [(bed.tmp / f"agent{i}" / "status.json").read_text() for i in AGENTS]
    for text in texts:
        assert not any(k in text for k in keys.values())


def test_without_preshared_keys_peers_have_none_then_turned_on_they_get_them(bed: PskMesh) -> None:
    coord = bed.coordinator(None)
    st = form(bed)
    for i in AGENTS:
        shown = bed.psks(i)
        assert set(shown) == {st[j]["publicKey"] for j in AGENTS if j != i}
        assert set(shown.values()) == {"(none)"}
    # The coordinator comes back with --preshared-keys: at their reconnect the agents ask
    # again and give every pair its key; the tunnels carry on.
    coord.terminate()
    coord.wait(10)
    t0 = time.monotonic()
    bed.coordinator(secret_file(bed))
    keys = eventually("every pair has its preshared key", lambda: pair_keys(bed, st))
    print(f"coordinator back with --preshared-keys -> every pair keyed: {time.monotonic() - t0:.2f} s")
    assert len(set(keys.values())) == 3
    for a in AGENTS:
        for b in AGENTS:
            if a != b:
                eventually(f"agent{a} pings agent{b}", lambda a=a, b=b: bed.ping(a, st[b]["internalIp"]))
