"""`pywg agent up --engine in-process`: pywg's engine runs in the agent process (no
daemon), serves the UAPI socket so `wg show` works, meshes with a daemon-backed agent over
IPv4 and IPv6, and its interface ends with the agent."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshbed import PYWG, MeshBed, mesh_bed, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture
def mesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MeshBed]:
    with mesh_bed(request, tmp_path, prefix="h13e", subnet="10.219.0.0/24", port=18219,
                  prefix4="100.119.0.0/16", prefix6="fd19:a::/48", count=2) as m:
        yield m


def daemons_for(ifname: str) -> list[int]:
    """The pids of processes whose command line names ``ifname`` and is a WireGuard daemon."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ifname.encode() in argv and any(a.endswith((b"pywg-daemon", b"wireguard")) for a in argv):
            found.append(int(proc.name))
    return found


def test_an_in_process_agent_meshes_serves_wg_and_ends_with_its_interface(mesh: MeshBed) -> None:
    mesh.up(1, "--engine", "in-process")
    mesh.up(2)
    addr = {i: mesh.addresses(i) for i in (1, 2)}
    for a, b in ((1, 2), (2, 1)):
        wait_for(f"agent{a} has agent{b}", lambda a=a, b=b: mesh.peer_names(a) == {f"agent{b}"})
        for target in addr[b]:
            wait_for(f"agent{a} pings {target}", lambda a=a, t=target: mesh.ping(a, t))
    st = mesh.status(1)
    assert st["device"]["implementation"] == "pywg" and st["device"]["engine"] == "in-process"
    assert mesh.status(2)["device"]["engine"] == "daemon"
    assert daemons_for(mesh.ifname(1)) == [] and daemons_for(mesh.ifname(2)) != []
    # `wg` talks to the agent's own UAPI socket.
    assert mesh.wg_peers(1) == {mesh.status(2)["publicKey"]}
    assert mesh.wg_key(1) == st["publicKey"]

    mesh.stop(1)  # SIGTERM: the agent and its engine end, and the interface with them
    wait_for("agent1's interface gone", lambda: subprocess.run(
        ["ip", "-n", mesh.ns(1), "link", "show", mesh.ifname(1)], check=False, capture_output=True).returncode != 0,
        timeout=10)
    assert not mesh.ping(2, addr[1][0])


def test_in_process_refuses_a_daemon_command(tmp_path: Path) -> None:
    out = subprocess.run([PYWG, "agent", "up", "--coordinator", "http://127.0.0.1:9", "--engine", "in-process",
                          "--daemon-command", "wireguard-go", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2 and "--daemon-command" in out.stderr and "Traceback" not in out.stderr
