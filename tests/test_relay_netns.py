"""WireGuard over DERP between two real pywg devices in namespaces (root; heavy).

Three namespaces (prefix h15d, 10.222.0.0/16): A (10.222.1.2) and B (10.222.2.2) route to
each other through R (10.222.1.1 / 10.222.2.1), whose nftables drops every forwarded UDP
datagram: no direct WireGuard path. R runs both relays: ``pywg derp serve`` and Tailscale's
derper 1.102.3 (``-a ADDR:PORT -c KEYFILE``, plain HTTP, never ``-dev``). Each side is a
pywg device with a DeviceRelay (tests/relay_node.py) whose peer's endpoint is a
RelayEndpoint; ``ping`` crosses the tunnel, ``wg show`` reads the relayed peer. The
measurement test runs ping and an iperf3 TCP stream over each relay, alternating, in one
run, and prints the figures (it asserts that traffic flowed, never how fast).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from needs import require_bed, unavailable

from pywg.derp import NodePrivateKey
from pywg.device.netns import entered
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.testing.netns import PEERS_DIR, delete_namespaces, run, stop_process

DERPER = PEERS_DIR / "derper-1.102.3" / "bin" / "derper"
HERE = Path(__file__).parent
R_A, A_ADDR, R_B, B_ADDR = "10.222.1.1", "10.222.1.2", "10.222.2.1", "10.222.2.2"
TUNNEL = {"a": "10.222.100.1", "b": "10.222.100.2"}
PORTS = {"pywg": 3340, "derper": 3341}
REGIONS = {"pywg": 1, "derper": 2}
WG_PORT = 51820
NFT_BLOCK_UDP = """
table inet h15d {
    chain forward {
        type filter hook forward priority 0; policy accept;
        meta l4proto udp counter drop
    }
}
"""


@dataclass
class Lab:
    tag: str
    workdir: Path
    ns: dict[str, str] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)
    relays: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    relay_keys: dict[str, NodePrivateKey] = field(default_factory=dict)

    def secret(self, name: str, text: str) -> Path:
        directory = self.workdir / "keys"
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / name
        path.write_text(text)
        path.chmod(0o600)
        return path

    def udp_dropped(self) -> int:
        out = run("nft", "list", "table", "inet", "h15d", ns=self.ns["r"])
        match = re.search(r"counter packets (\d+)", out)
        assert match, out
        return int(match.group(1))


def _wait_listening(ns: str, host: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        assert process.poll() is None, log.read_text(errors="replace")
        with entered(ns), socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex((host, port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on {host}:{port}: {log.read_text(errors='replace')}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_bed()
    for tool in ("nft", "iperf3"):
        if shutil.which(tool) is None:
            unavailable(f"missing tool: {tool}")
    if not (DERPER.is_file() and os.access(DERPER, os.X_OK)):
        unavailable(f"peer not installed: derper 1.102.3: no {DERPER} (make peers builds it)")
    tag = f"{os.getpid() % 100000}"
    lab = Lab(tag, tmp_path_factory.mktemp("relaylab"))
    lab.ns = {side: f"h15d-{tag}-{side}" for side in ("r", "a", "b")}
    try:
        for ns in lab.ns.values():
            run("ip", "netns", "add", ns)
            run("ip", "link", "set", "lo", "up", ns=ns)
        r = lab.ns["r"]
        for side, r_addr, addr in (("a", R_A, A_ADDR), ("b", R_B, B_ADDR)):
            ns = lab.ns[side]
            run("ip", "link", "add", f"h15d{side}", "netns", r, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "addr", "add", f"{r_addr}/24", "dev", f"h15d{side}", ns=r)
            run("ip", "link", "set", f"h15d{side}", "up", ns=r)
            run("ip", "addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            run("ip", "link", "set", "eth0", "up", ns=ns)
            run("ip", "route", "add", "default", "via", r_addr, ns=ns)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=r)
        run("nft", "-f", "-", ns=r, input=NFT_BLOCK_UDP.encode())
        for name in ("pywg", "derper"):
            key = lab.relay_keys[name] = NodePrivateKey.generate()
            config = lab.secret(f"{name}.json", json.dumps({"PrivateKey": key.private_text()}))
            if name == "derper":
                argv = [str(DERPER), "-a", f"{R_A}:{PORTS[name]}", "-c", str(config), "-stun=false",
                        "-http-port", "-1"]
            else:
                argv = [str(Path(sys.executable).with_name("pywg")), "derp", "serve", "--listen",
                        f"{R_A}:{PORTS[name]}", "--config", str(config)]
            log = lab.workdir / f"{name}.log"
            with open(log, "wb") as out:
                lab.relays[name] = subprocess.Popen(["ip", "netns", "exec", r, *argv], stdout=out,
                                                    stderr=subprocess.STDOUT)
            _wait_listening(lab.ns["b"], R_A, PORTS[name], lab.relays[name], log)
        lab.keys = {"a": dh_generate(), "b": dh_generate()}
        yield lab
    finally:
        for process in lab.relays.values():
            stop_process(process)
        delete_namespaces(list(lab.ns.values()))


@dataclass
class Node:
    side: str
    process: subprocess.Popen[bytes]
    stats_path: Path
    log_path: Path

    def stop(self) -> dict[str, object]:
        stop_process(self.process, grace=10)
        assert self.process.returncode == 0, self.log_path.read_text(errors="replace")
        return json.loads(self.stats_path.read_text())  # type: ignore[no-any-return]


@contextlib.contextmanager
def tunnel(lab: Lab, relay: str, direct: bool = False) -> Iterator[dict[str, Node]]:
    """Both devices up, each peer's endpoint RelayEndpoint(relay's region, peer key), or
    (``direct``) the peer's UDP address."""
    nodes: dict[str, Node] = {}
    region = REGIONS[relay]
    spec = f"{region}={R_A}:{PORTS[relay]}={lab.relay_keys[relay].public.untyped_hex()}"
    outer = {"a": A_ADDR, "b": B_ADDR}
    try:
        for side, other in (("a", "b"), ("b", "a")):
            ifname = f"h15d{side}{lab.tag}"[:15]
            key_file = lab.secret(f"wg-{side}.key", lab.keys[side].hex())
            stats = lab.workdir / f"{relay}-{side}.json"
            log = lab.workdir / f"{relay}-{side}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    ["ip", "netns", "exec", lab.ns[side], sys.executable, str(HERE / "relay_node.py"), ifname,
                     "--key", str(key_file), "--peer", dh_pubkey(lab.keys[other]).hex(),
                     "--allowed-ip", f"{TUNNEL[other]}/32", "--region", spec, "--home", str(region),
                     "--stats", str(stats), "--listen-port", str(WG_PORT),
                     *(["--direct", f"{outer[other]}:{WG_PORT}"] if direct else [])],
                    stdout=out, stderr=subprocess.STDOUT)
            nodes[side] = Node(side, process, stats, log)
        # B's interface up first: A's kernel may still retransmit into the tunnel for a TCP
        # connection of the round before, and a pywg device whose TUN write fails (EIO on
        # an interface that is down) closes itself.
        for side in ("b", "a"):
            ifname, node = f"h15d{side}{lab.tag}"[:15], nodes[side]
            sock = Path(f"/var/run/wireguard/{ifname}.sock")
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert node.process.poll() is None and time.monotonic() < deadline, node.log_path.read_text()
                time.sleep(0.02)
            run("sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1", ns=lab.ns[side])  # no IPv6 chatter
            run("ip", "addr", "add", f"{TUNNEL[side]}/24", "dev", ifname, ns=lab.ns[side])
            run("ip", "link", "set", ifname, "up", ns=lab.ns[side])
        yield nodes
    finally:
        for node in nodes.values():
            stop_process(node.process, grace=10)


def ping(lab: Lab, count: int, interval: float = 0.05, deadline: int = 10) -> tuple[int, float]:
    """(replies, average RTT in ms) of ``ping`` from A to B's tunnel address."""
    out = run("ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-w", str(deadline), TUNNEL["b"],
              ns=lab.ns["a"], check=False, timeout=deadline + 5)
    received = re.search(r"(\d+) received", out)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
    return (int(received.group(1)) if received else 0), (float(rtt.group(1)) if rtt else float("nan"))


def wait_for_tunnel(lab: Lab) -> None:
    """The first handshake (over the relay): a ping answered within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ping(lab, 1, deadline=1)[0] == 1:
            return
    raise AssertionError("no ping answered over the relay within 10 s")


@pytest.mark.parametrize("relay", ["pywg", "derper"])
def test_ping_through_the_tunnel_over_the_relay_with_direct_udp_blocked(lab: Lab, relay: str) -> None:
    dropped_before = lab.udp_dropped()
    with tunnel(lab, relay) as nodes:
        # A datagram straight to B's WireGuard port would die at R: show that it does.
        with entered(lab.ns["a"]), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.sendto(b"direct?", (B_ADDR, 51820))
        wait_for_tunnel(lab)
        replies, _ = ping(lab, 20, interval=0.02)
        assert replies == 20
        show = run("wg", "show", f"h15da{lab.tag}"[:15], "dump", ns=lab.ns["a"])
        peer_line = show.strip().splitlines()[1].split("\t")
        assert peer_line[0] and peer_line[2] == "(none)"  # a relayed peer: no IP endpoint (as UAPI has none)
        assert int(peer_line[4]) > 0  # latest handshake
        stats = {side: node.stop() for side, node in nodes.items()}
    assert lab.udp_dropped() > dropped_before  # the probe (at least) died at R
    for side in ("a", "b"):
        device, relay_stats = stats[side]["device"], stats[side]["relay"]
        assert device["device_drops"] == {}, device  # type: ignore[index]
        assert device["datapath"].get("udp_receives", 0) == 0  # type: ignore[index,union-attr]
        assert relay_stats["drops"] == {}, relay_stats  # type: ignore[index]
        assert relay_stats["received"] >= 21 and relay_stats["sent"] >= 21  # type: ignore[index,operator]
        peer = device["peers"][0]  # type: ignore[index]
        assert peer["endpoint"].startswith(f"derp:{REGIONS[relay]}/") and peer["handshakes"] >= 1


def iperf(lab: Lab, seconds: float) -> float:
    """Mbit/s of one TCP stream from A to B through the tunnel."""
    server = subprocess.Popen(["ip", "netns", "exec", lab.ns["b"], "iperf3", "-s", "-1", "-B", TUNNEL["b"]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while True:
            if f"{TUNNEL['b']}:5201" in run("ss", "-ltnH", ns=lab.ns["b"]):  # (a probe would be its one client)
                break
            assert server.poll() is None and time.monotonic() < deadline, "iperf3 -s did not listen"
            time.sleep(0.05)
        out = run("iperf3", "-c", TUNNEL["b"], "-t", str(seconds), "-J", ns=lab.ns["a"], timeout=seconds + 20)
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        stop_process(server)


@contextlib.contextmanager
def udp_allowed(lab: Lab) -> Iterator[None]:
    """R forwards UDP for a while (the direct baseline), then drops it again."""
    run("nft", "delete", "table", "inet", "h15d", ns=lab.ns["r"])
    try:
        yield
    finally:
        run("nft", "-f", "-", ns=lab.ns["r"], input=NFT_BLOCK_UDP.encode())


def test_measure_rtt_and_throughput_over_pywg_relay_and_derper_alternating(lab: Lab) -> None:
    """Each relay twice, alternating, and once the direct UDP path as the baseline."""
    results: dict[str, list[tuple[float, float]]] = {"pywg": [], "derper": [], "direct": []}
    for relay in ("pywg", "derper", "pywg", "derper", "direct"):
        with contextlib.ExitStack() as stack:
            if relay == "direct":
                stack.enter_context(udp_allowed(lab))
            nodes = stack.enter_context(tunnel(lab, "pywg" if relay == "direct" else relay,
                                               direct=relay == "direct"))
            wait_for_tunnel(lab)
            replies, rtt = ping(lab, 30, interval=0.02)
            assert replies == 30
            mbits = iperf(lab, 2)
            assert mbits > 0
            relayed = [node.stop()["relay"]["sent"] for node in nodes.values()]  # type: ignore[index]
        assert all(relayed) if relay != "direct" else not any(relayed), (relay, relayed)  # the path named
        results[relay].append((rtt, mbits))
    for relay, runs in results.items():
        text = ", ".join(f"{rtt:.3f} ms / {mbits:.1f} Mbit/s" for rtt, mbits in runs)
        print(f"\nover {relay}: ping RTT / TCP throughput per round: {text}")
