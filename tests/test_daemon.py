"""The pywg daemon driven by the stock ``wg`` and ``wg-quick``, in two network namespaces,
against itself and against the real peers (wireguard-go 0.0.20250522, boringtun 0.7.1,
Debian's wireguard-go 0.0.20220316), pywg in both roles: what a user of WireGuard tooling
would check. A peer that is not installed fails the test under CI=true (``make peers``)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from needs import require_implementation

from pywg.device.stats_server import read_stats
from pywg.protocol.constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.testing.netns import PEER_IMPLEMENTATIONS, Bed, entered, ping, run
from pywg.testing.tunnel import Side, b64, connect, iperf3, make_side, ping_fails, tunnel

pytestmark = pytest.mark.netns

PYWG_DAEMON = str(Path(sys.executable).parent / "pywg-daemon")


def ident(impl: str) -> str:
    return impl.replace("-", "_")


# A sends first (it initiates the handshake) and runs the iperf3 client.
PAIRS = [pytest.param("pywg", "pywg", id="pywg-pywg")] + [
    pytest.param(*pair, id=f"{ident(pair[0])}-{ident(pair[1])}")
    for peer in PEER_IMPLEMENTATIONS for pair in (("pywg", peer), (peer, "pywg"))]
# pywg facing each peer, pywg on A (initiating) or on B (responding).
PYWG_AND_PEER = PAIRS[1:]


def latest_handshake_is_recent(side: Side, line: dict[str, str]) -> None:
    """``wg show``'s latest handshake is a Unix time, seconds ago. boringtun 0.7.1 answers
    last_handshake_time_sec with the seconds *since* the handshake (its API writes the
    elapsed time), which ``wg`` shows as a moment in 1970: assert what it does show."""
    if side.daemon.impl == "boringtun":
        assert 0 <= int(line["latest_handshake"]) < 60, line
    else:
        assert int(line["latest_handshake"]) > time.time() - 60, line


@pytest.mark.parametrize(("impl_a", "impl_b"), PAIRS)
def test_ping_throughput_and_wg_show(bed: Bed, impl_a: str, impl_b: str) -> None:
    """Handshake, inner IPv4 and IPv6 both ways, a TCP run whose bytes all arrive, and the
    transfer counters of ``wg show`` on both sides agreeing with each other."""
    require_implementation(impl_a, impl_b)
    a, b = tunnel(bed, impl_a, impl_b)
    ping(a.ns, b.tunnel4)  # A initiates
    ping(a.ns, b.tunnel6)
    ping(b.ns, a.tunnel4)
    ping(b.ns, a.tunnel6)
    before = {side: side.daemon.peers() for side in (a, b)}
    assert before[a][b.public]["endpoint"] == f"{bed.outer_b}:{b.port}"
    assert before[b][a.public]["endpoint"] == f"{bed.outer_a}:{a.port}"  # learnt from the handshake
    assert sorted(before[a][b.public]["allowed_ips"].split(",")) == sorted([f"{b.tunnel4}/32", f"{b.tunnel6}/128"])
    for side, peer in ((a, b), (b, a)):
        line = before[side][peer.public]
        latest_handshake_is_recent(side, line)
        assert int(line["rx_bytes"]) > 0 and int(line["tx_bytes"]) > 0
    result = iperf3(bed, b)
    received = result["end"]["sum_received"]["bytes"]
    assert received > 1_000_000, f"only {received} bytes crossed the tunnel in 5 s"
    after = b.daemon.peers()[a.public]
    assert int(after["rx_bytes"]) - int(before[b][a.public]["rx_bytes"]) > received
    tcp_transfer_is_intact(a, b)
    counters_agree(a, b)


def tcp_transfer_is_intact(a: Side, b: Side, size: int = 4_000_000) -> None:
    """Random bytes over TCP from A to B's inner IPv6 address arrive whole and unchanged."""
    data = os.urandom(size)
    with entered(b.ns):
        server = socket.create_server((b.tunnel6, 0), family=socket.AF_INET6)
    got = hashlib.sha256()
    count = 0

    def receive() -> None:
        nonlocal count
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                got.update(chunk)
                count += len(chunk)

    with server:
        server.settimeout(20)
        receiver = threading.Thread(target=receive)
        receiver.start()
        with entered(a.ns):
            client = socket.create_connection((b.tunnel6, server.getsockname()[1]), timeout=20)
        with client:
            client.sendall(data)
        receiver.join(30)
    assert count == size and got.digest() == hashlib.sha256(data).digest()


def counters_agree(a: Side, b: Side, count: int = 20, payload: int = 1000) -> None:
    """``wg show`` on both sides counts the same bytes: over COUNT echo requests and replies,
    what each side says it sent is what the other says it received, and both are what the
    pings put on the wire: the IP packet padded to 16 bytes, plus the 32 bytes of header and
    tag. boringtun 0.7.1 differs twice, both asserted: it counts the inner packets' bytes
    (unpadded, no header) on both of its counters, and it sends without padding (legal: a
    receiver takes any length; the paper's senders pad), so what the other side receives
    from it is the inner packet plus 32."""
    time.sleep(0.5)  # what the TCP runs left in flight
    inner = 28 + payload  # IPv4 + ICMP headers, not a multiple of 16

    def on_wire(sender: Side) -> int:
        return (inner if sender.daemon.impl == "boringtun" else -(-inner // 16) * 16) + 32

    def counted(side: Side, sender: Side) -> int:
        return inner if side.daemon.impl == "boringtun" else on_wire(sender)

    before = {side: side.daemon.peers()[peer.public] for side, peer in ((a, b), (b, a))}
    run("ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-s", str(payload), "-W", "2", b.tunnel4, ns=a.ns)
    after = {side: side.daemon.peers()[peer.public] for side, peer in ((a, b), (b, a))}
    delta = {(side, key): int(after[side][key]) - int(before[side][key])
             for side in (a, b) for key in ("rx_bytes", "tx_bytes")}
    report = f"{a.daemon.impl} A, {b.daemon.impl} B: {list(delta.values())}"
    for sender, receiver in ((a, b), (b, a)):
        # (a keepalive may have crossed as well: 32 bytes on the wire, none for boringtun)
        assert 0 <= delta[sender, "tx_bytes"] - count * counted(sender, sender) <= 32, report
        assert 0 <= delta[receiver, "rx_bytes"] - count * counted(receiver, sender) <= 32, report


@pytest.mark.parametrize(("impl_a", "impl_b"), PAIRS[:1] + PAIRS[1::2])
def test_outer_ipv6(bed: Bed, impl_a: str, impl_b: str) -> None:
    require_implementation(impl_a, impl_b)
    a, b = tunnel(bed, impl_a, impl_b, outer6=True, psk=False)
    ping(a.ns, b.tunnel4)
    ping(b.ns, a.tunnel6)
    ping(a.ns, b.tunnel6)
    assert b.daemon.peers()[a.public]["endpoint"] == f"[{bed.outer6_a}]:{a.port}"
    assert a.daemon.peers()[b.public]["endpoint"] == f"[{bed.outer6_b}]:{b.port}"


def test_syncconf_removes_and_restores_the_peer(bed: Bed) -> None:
    a, b = tunnel(bed, "pywg", "pywg")
    ping(a.ns, b.tunnel4)
    full = a.wg("showconf", a.ifname)
    without = full.split("[Peer]")[0]
    conf = bed.secret_file("sync.conf", without)
    a.wg("syncconf", a.ifname, str(conf))
    assert a.wg("show", a.ifname, "peers").strip() == ""
    assert ping_fails(a.ns, b.tunnel4), "traffic still flows with the peer removed"
    conf.write_text(full)
    a.wg("syncconf", a.ifname, str(conf))
    assert a.wg("show", a.ifname, "peers").strip() == b.public
    ping(a.ns, b.tunnel4)
    assert a.wg("showconf", a.ifname).count("[Peer]") == 1


def test_wg_quick_up_and_down(bed: Bed) -> None:
    b = make_side(bed, bed.ns_b, "pywg", 2)
    private = dh_generate()
    name = bed.unique_ifname("wq")
    conf = bed.secret_file(f"{name}.conf", "\n".join([
        "[Interface]", f"PrivateKey = {b64(private)}", "ListenPort = 51830", "Address = 10.202.0.1/24",
        "MTU = 1400", "", "[Peer]", f"PublicKey = {b.public}", f"AllowedIPs = {b.tunnel4}/32",
        f"Endpoint = {bed.outer_b}:{b.port}", "PersistentKeepalive = 25", ""]))
    bed.set_wg_peer(b.daemon, b64(dh_pubkey(private)), allowed_ips="10.202.0.1/32")
    env = ["env", "-u", "LOG_LEVEL", f"WG_QUICK_USERSPACE_IMPLEMENTATION={PYWG_DAEMON}"]
    run(*env, "wg-quick", "up", str(conf), ns=bed.ns_a)
    sock = Path(f"/var/run/wireguard/{name}.sock")
    try:
        assert sock.exists(), "wg-quick did not start the userspace implementation"
        assert "mtu 1400" in run("ip", "link", "show", name, ns=bed.ns_a)
        # persistent keepalive: the handshake happens without any traffic
        deadline = time.monotonic() + 10
        while b.daemon.peers()[b64(dh_pubkey(private))]["latest_handshake"] == "0":
            assert time.monotonic() < deadline, "no handshake from the persistent keepalive"
            time.sleep(0.1)
        ping(bed.ns_a, b.tunnel4)
        ping(bed.ns_b, "10.202.0.1")
    finally:
        run(*env, "wg-quick", "down", str(conf), ns=bed.ns_a)
    deadline = time.monotonic() + 5
    while sock.exists():
        assert time.monotonic() < deadline, "the daemon did not go away with its interface"
        time.sleep(0.05)
    assert name not in run("ip", "link", ns=bed.ns_a)


# Peers that keep sending from the outer address they first used after it is gone:
# wireguard-go 0.0.20220316 (its sticky source address) and boringtun 0.7.1 (a UDP socket
# connected to the peer, with that source). They recover when their sockets are re-bound.
STICKY_SOURCE = ("wireguard-go", "boringtun")


@pytest.mark.parametrize(("impl_a", "impl_b"), PAIRS)
def test_roaming(bed: Bed, impl_a: str, impl_b: str) -> None:
    """A moves to a new outer address; B learns it from A's next authenticated packet."""
    require_implementation(impl_a, impl_b)
    a, b = tunnel(bed, impl_a, impl_b)
    ping(a.ns, b.tunnel4)
    run("ip", "addr", "del", f"{bed.outer_a}/24", "dev", bed.veth_a, ns=a.ns)
    run("ip", "addr", "add", "10.201.0.3/24", "dev", bed.veth_a, ns=a.ns)
    port = a.port
    if impl_a in STICKY_SOURCE:
        assert ping_fails(a.ns, b.tunnel4), f"{impl_a} roamed by itself: drop it from STICKY_SOURCE"
        port = a.port + 100
        a.wg("set", a.ifname, "listen-port", str(port))  # what its user does: new sockets
    ping(a.ns, b.tunnel4)  # no reconfiguration of B
    assert b.daemon.peers()[a.public]["endpoint"] == f"10.201.0.3:{port}"
    ping(b.ns, a.tunnel4)


def restart(bed: Bed, side: Side, peer: Side) -> None:
    side.daemon.process.send_signal(signal.SIGKILL)
    side.daemon.process.wait()
    side.daemon.uapi_socket.unlink(missing_ok=True)
    deadline = time.monotonic() + 5
    while side.ifname in run("ip", "link", ns=side.ns):  # the TUN goes with its process
        assert time.monotonic() < deadline
        time.sleep(0.05)
    side.daemon = bed.start_interface(side.ns, side.ifname, impl=side.daemon.impl,
                                      addresses=[f"{side.tunnel4}/24", f"{side.tunnel6}/64"],
                                      private_key=side.private, listen_port=side.port)


def test_restart_then_traffic_from_the_restarted_side(bed: Bed) -> None:
    a, b = tunnel(bed, "pywg", "pywg", psk=False)
    ping(a.ns, b.tunnel4)
    restart(bed, a, b)
    bed.set_wg_peer(a.daemon, b.public, allowed_ips=f"{b.tunnel4}/32", endpoint=f"{bed.outer_b}:{b.port}")
    ping(a.ns, b.tunnel4, wait=REKEY_TIMEOUT)


def test_restart_then_traffic_from_the_other_side(bed: Bed) -> None:
    """B still holds the old session: its packets are dropped by the restarted A until B's
    new-handshake timer (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT) fires."""
    a, b = tunnel(bed, "pywg", "pywg", psk=False)
    ping(a.ns, b.tunnel4)
    restart(bed, a, b)
    bed.set_wg_peer(a.daemon, b.public, allowed_ips=f"{b.tunnel4}/32", endpoint=f"{bed.outer_b}:{b.port}")
    started = time.monotonic()
    limit = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 5
    while ping_fails(b.ns, a.tunnel4):
        assert time.monotonic() - started < limit, "the tunnel did not come back within the retry time"
    drops = read_stats(a.ifname)["engine_drops"]
    assert isinstance(drops, dict) and drops.get("unknown_index", 0) > 0  # the old session's packets


def uapi(ifname: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(f"/var/run/wireguard/{ifname}.sock")
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_uapi_socket_is_root_only(bed: Bed) -> None:
    a = make_side(bed, bed.ns_a, "pywg", 1)
    assert oct(a.daemon.uapi_socket.stat().st_mode & 0o777) == "0o600"
    assert oct(a.daemon.uapi_socket.parent.stat().st_mode & 0o777) == "0o755"


def test_malformed_uapi_requests_are_refused_whole(bed: Bed) -> None:
    a, b = tunnel(bed, "pywg", "pywg")
    ping(a.ns, b.tunnel4)
    conf_before = a.wg("showconf", a.ifname)
    new_key = dh_generate().hex()
    cases = {
        b"set=1\nlisten_port=70000\n\n": b"errno=-22\n\n",
        b"set=1\nbogus_key=1\n\n": b"errno=-22\n\n",
        b"set=1\npublic_key=zz\n\n": b"errno=-22\n\n",
        # valid lines before a bad one: nothing of it is applied
        f"set=1\nprivate_key={new_key}\nreplace_peers=true\nlisten_port=x\n\n".encode(): b"errno=-22\n\n",
        b"set=1\nno equals sign\n\n": b"errno=-71\n\n",
        b"get=1\nx": b"errno=-22\n\n",
        ("set=1\npublic_key=" + bytes(32).hex() + "\n\n").encode(): b"errno=-22\n\n",  # low-order key
    }
    for request, expected in cases.items():
        assert uapi(a.ifname, request) == expected, request
    assert uapi(a.ifname, b"hello\n") == b""  # not UAPI at all: hung up on, as wireguard-go does
    assert uapi(a.ifname, b"set=1\n" + b"x" * 70000 + b"\n\n") == b"errno=-5\n\n"
    assert a.wg("showconf", a.ifname) == conf_before
    # a port already taken: refused, the device keeps its port
    with entered(a.ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        assert uapi(a.ifname, f"set=1\nlisten_port={port}\n\n".encode()) == b"errno=-98\n\n"
    assert a.wg("show", a.ifname, "listen-port").strip() == str(a.port)
    ping(a.ns, b.tunnel4)  # still serving


def test_hostile_datagrams_and_tun_packets_while_pinging(bed: Bed) -> None:
    a, b = tunnel(bed, "pywg", "pywg")
    ping(a.ns, b.tunnel4)
    pinger = subprocess.Popen(["ip", "netns", "exec", a.ns, "ping", "-n", "-q", "-c", "60", "-i", "0.05",
                               b.tunnel4], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rng = random.Random(7)
    garbage = [b"", b"\x01", b"\x04\x00\x00\x00" + os.urandom(40), b"\x01\x00\x00\x00" + bytes(144),
               b"\x02\x00\x00\x00" + bytes(88), b"\x03\x00\x00\x00" + bytes(60), os.urandom(65000)]
    garbage += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 1500))) for _ in range(200)]
    with entered(b.ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        for datagram in garbage:
            attacker.sendto(datagram, (bed.outer_a, a.port))
            time.sleep(0.001)
    bad_ip = [b"\x45", b"\x70" + bytes(40), b"\x45\x00\xff\xff" + bytes(16),
              bytes.fromhex("4500001c000000004001000001020304") + bytes(12)]  # -> 1.2.3.4: no route
    with entered(a.ns), socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800)) as raw:
        for packet in bad_ip * 5:
            raw.sendto(packet, (a.ifname, 0x0800))
    out, _ = pinger.communicate(timeout=60)
    assert b" 0% packet loss" in out, out.decode()
    stats = read_stats(a.ifname)
    engine, device = stats["engine_drops"], stats["device_drops"]
    assert isinstance(engine, dict) and isinstance(device, dict)
    assert sum(engine.values()) >= len(garbage) - 1  # every datagram dropped with a reason
    assert engine.get("unknown_index", 0) >= 1 and engine.get("bad_mac1", 0) >= 1
    assert device.get("invalid_tun_packet", 0) >= 10 and device.get("no_route", 0) >= 5
    ping(b.ns, a.tunnel4)  # and both directions still work


def test_listen_port_and_fwmark_reach_the_sockets(bed: Bed) -> None:
    a, b = tunnel(bed, "pywg", "pywg")
    a.wg("set", a.ifname, "listen-port", "40000", "fwmark", "0x1234")
    sockets = [line for line in run("ss", "-uane", ns=a.ns).splitlines() if ":40000 " in line]
    assert len(sockets) == 2 and all("fwmark:0x1234" in line for line in sockets)  # IPv4 and IPv6
    assert a.wg("show", a.ifname, "fwmark").strip() == "0x1234"
    a.wg("set", a.ifname, "fwmark", "0")
    assert all("fwmark" not in line for line in run("ss", "-uane", ns=a.ns).splitlines() if ":40000 " in line)
    ping(a.ns, b.tunnel4)  # B learns the new port from the handshake
    assert b.daemon.peers()[a.public]["endpoint"] == f"{bed.outer_a}:40000"


def test_setconf_addconf_showconf(bed: Bed) -> None:
    a, b = tunnel(bed, "pywg", "pywg")
    conf = a.wg("showconf", a.ifname)
    third = b64(dh_pubkey(dh_generate()))
    extra = bed.secret_file("extra.conf", f"[Peer]\nPublicKey = {third}\nAllowedIPs = 10.99.0.0/16\n"
                                          f"Endpoint = [fd01::9]:4000\nPersistentKeepalive = 0\n")
    a.wg("addconf", a.ifname, str(extra))
    peers = a.daemon.peers()
    assert set(peers) == {b.public, third} and peers[third]["endpoint"] == "[fd01::9]:4000"
    a.wg("setconf", a.ifname, str(bed.secret_file("orig.conf", conf)))
    assert a.wg("showconf", a.ifname) == conf  # setconf replaces: the third peer is gone
    ping(a.ns, b.tunnel4)


def test_sigterm_closes_everything(bed: Bed) -> None:
    a = make_side(bed, bed.ns_a, "pywg", 1)
    a.daemon.process.send_signal(signal.SIGTERM)
    assert a.daemon.process.wait(10) == 0
    assert not a.daemon.uapi_socket.exists()
    assert a.ifname not in run("ip", "link", ns=a.ns)


OFFLOAD_MATRIX = [
    pytest.param({"PYWG_THREADS": "0"}, id="event-loop"),
    pytest.param({"PYWG_TUN_OFFLOAD": "0", "PYWG_UDP_GSO": "0", "PYWG_UDP_GRO": "0"}, id="threads-no-offloads"),
    pytest.param({"PYWG_TUN_OFFLOAD": "0"}, id="udp-offloads-only"),
    pytest.param({"PYWG_UDP_GSO": "0", "PYWG_UDP_GRO": "0"}, id="tun-offloads-only"),
    pytest.param({"PYWG_FASTPATH_BACKEND": "python"}, id="python-crypto"),
    pytest.param({"PYWG_PUREPYTHON": "1"}, id="pure-python"),  # no C extension at all
    pytest.param({"PYWG_PUREPYTHON": "1", "PYWG_THREADS": "0"}, id="pure-python-event-loop"),
    pytest.param({"PYWG_TUN_TURNS": "0"}, id="no-tun-turns"),
    pytest.param({"PYWG_HOP": "0"}, id="no-hop"),
    pytest.param({}, id="all-on"),
]


# The full switch matrix runs against pywg itself, Debian's wireguard-go and wireguard-go
# 2025 (which sends GSO batches); against boringtun, which sends datagram by datagram like
# wireguard-go 2022, the configurations that change how pywg receives and sends.
SWITCH_CASES = [pytest.param(env.values[0], impl, id=f"{env.id}-{ident(impl)}", marks=env.marks)
                for impl in ("pywg", "wireguard-go", "wireguard-go-2025") for env in OFFLOAD_MATRIX] + [
    pytest.param(env.values[0], "boringtun", id=f"{env.id}-boringtun", marks=env.marks)
    for env in OFFLOAD_MATRIX if env.id in ("event-loop", "threads-no-offloads", "pure-python", "all-on")]


@pytest.mark.parametrize(("env", "impl_b"), SWITCH_CASES)
def test_data_path_switches(bed: Bed, env: dict[str, str], impl_b: str) -> None:
    """Each data-path configuration, against itself and against the peers: ping both
    ways and a short TCP run whose bytes all arrive."""
    require_implementation(impl_b)
    a = make_side(bed, bed.ns_a, "pywg", 1, env=env)
    b = make_side(bed, bed.ns_b, impl_b, 2, env=env)
    connect(bed, a, b)
    ping(a.ns, b.tunnel4)
    ping(b.ns, a.tunnel6)
    result = iperf3(bed, b, 2)
    assert result["end"]["sum_received"]["bytes"] > 1_000_000
    datapath = read_stats(a.ifname)["datapath"]
    assert isinstance(datapath, dict)
    threaded = env.get("PYWG_THREADS") != "0"
    assert datapath.get("threads", True) is threaded or datapath.get("options", {}).get("threads") is threaded
    # Lone packets (pings) cross in one C call when the hop is on, and only then.
    hop = (threaded and env.get("PYWG_HOP") != "0" and env.get("PYWG_FASTPATH_BACKEND") != "python"
           and env.get("PYWG_PUREPYTHON") != "1")
    before = read_stats(a.ifname)["datapath"]
    assert isinstance(before, dict)
    ping(a.ns, b.tunnel4, count=5, interval=0.05)
    ping(b.ns, a.tunnel6, count=5, interval=0.05)
    after = read_stats(a.ifname)["datapath"]
    assert isinstance(after, dict)
    if hop:
        assert after["options"]["hop"] is True
        assert after["hop_sends"] - before["hop_sends"] >= 8, after
        assert after["hop_receives"] - before["hop_receives"] >= 8, after
    else:
        assert after.get("hop_sends", 0) == 0 and after.get("hop_receives", 0) == 0, after
