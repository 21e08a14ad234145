"""The STUN client against a real STUN server (Debian's coturn), through real Linux NATs.

A small lab of network namespaces (names carry the pid):

    open host 10.203.0.2 ---- 10.203.0.1  "internet"  10.204.0.1 ---- 10.204.0.2 (wan) router (lan) 192.168.77.1
                                 coturn on 203.0.113.1:3478                                       |
                                       and 203.0.113.2:3478                          NAT host 192.168.77.2

The router NATs its LAN with nftables: plain ``masquerade`` (port-restricted cone, the Linux
default: one mapping for every destination) or ``masquerade random`` (symmetric: a new
mapping per destination). The test drives ``StunClient`` from a UDP socket in the open host
or the NAT host; the I/O loop is here, the client is the sans-I/O one the agent uses.
Under CI=true a missing tool (coturn's ``turnserver``, ``nft``) fails the test.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pywg.nat.stun import Attr, StunError, TransportAddress, answer_binding, binding_request, parse
from pywg.nat.stun_client import (
    BindingFailure,
    BindingResult,
    MappingBehavior,
    Outcome,
    RetransmitPolicy,
    StunClient,
    classify_mapping,
)
from pywg.testing.netns import BedUnavailable, check_bed, delete_namespaces, entered, run

pytestmark = pytest.mark.netns

TOOLS = ("ip", "ss", "turnserver", "turnutils_stunclient", "nft")
SERVERS = (TransportAddress.of("203.0.113.1", 3478), TransportAddress.of("203.0.113.2", 3478))
OPEN_HOST, ROUTER_WAN, NAT_HOST = "10.203.0.2", "10.204.0.2", "192.168.77.2"
# The RFC's shape, scaled to a lab link: sends at 0, 0.2, 0.6, 1.4, 3.0, 6.2 s, failure at 7.8 s
# (a slow first answer from a busy machine is retransmitted for, not failed).
POLICY = RetransmitPolicy(rto=0.2, max_transmissions=6, last_wait_factor=8)
# For the server that never answers: sends at 0, 0.1, 0.3, 0.7 s, failure at 1.1 s.
SHORT_POLICY = RetransmitPolicy(rto=0.1, max_transmissions=4, last_wait_factor=4)


class NatLab:
    def __init__(self) -> None:
        tag = str(os.getpid())
        self.tag = tag
        self.inet, self.open_host, self.router, self.nat_host = (f"pst{tag}{x}" for x in "iorh")
        self.wan = f"ps{tag}ri"
        self.workdir = Path(tempfile.mkdtemp(prefix="pywg-stun-"))
        self.coturn: subprocess.Popen[bytes] | None = None

    @property
    def namespaces(self) -> tuple[str, ...]:
        return self.inet, self.open_host, self.router, self.nat_host

    def _link(self, ns_a: str, dev_a: str, addr_a: str, ns_b: str, dev_b: str, addr_b: str) -> None:
        run("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            run("ip", "addr", "add", addr, "dev", dev, ns=ns)
            run("ip", "link", "set", dev, "up", ns=ns)

    def open(self) -> None:
        self.close_namespaces()
        tag = self.tag
        for ns in self.namespaces:
            run("ip", "netns", "add", ns)
            run("ip", "link", "set", "lo", "up", ns=ns)
        for server in SERVERS:
            run("ip", "addr", "add", f"{server.ip}/32", "dev", "lo", ns=self.inet)
        self._link(self.inet, f"ps{tag}io", "10.203.0.1/24", self.open_host, f"ps{tag}oi", f"{OPEN_HOST}/24")
        self._link(self.inet, f"ps{tag}ir", "10.204.0.1/24", self.router, self.wan, f"{ROUTER_WAN}/24")
        self._link(self.router, f"ps{tag}rh", "192.168.77.1/24", self.nat_host, f"ps{tag}hr", f"{NAT_HOST}/24")
        run("ip", "route", "add", "default", "via", "10.203.0.1", ns=self.open_host)
        run("ip", "route", "add", "default", "via", "10.204.0.1", ns=self.router)
        run("ip", "route", "add", "default", "via", "192.168.77.1", ns=self.nat_host)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.router)

    def start_coturn(self) -> None:
        """coturn as a plain STUN server (no TURN relay, no auth) on both server addresses."""
        argv = ["turnserver", "-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls", "--no-tcp", "-z",
                "--log-file", "stdout", "--simple-log", "--pidfile", str(self.workdir / "turnserver.pid"),
                "--userdb", str(self.workdir / "turndb"), "-p", str(SERVERS[0].port)]
        for server in SERVERS:
            argv += ["-L", str(server.ip)]
        with open(self.workdir / "turnserver.log", "wb") as log:
            self.coturn = subprocess.Popen(["ip", "netns", "exec", self.inet, *argv], stdout=log,
                                           stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        wanted = {str(server) for server in SERVERS}
        while True:
            listening = {line.split()[3] for line in run("ss", "-Hlun", ns=self.inet).splitlines() if line.strip()}
            if wanted <= listening:
                return
            if self.coturn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"turnserver did not start listening on {sorted(wanted)}: {self.coturn_log()}")
            time.sleep(0.05)

    def coturn_log(self) -> str:
        path = self.workdir / "turnserver.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def nat(self, masquerade: str) -> None:
        """Replace the router's ruleset: LAN traffic out of the WAN port NATed by ``masquerade``."""
        ruleset = f"""
flush ruleset
table ip pywg_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{self.wan}" {masquerade}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{self.wan}" ct state new drop
    }}
}}
"""
        run("nft", "-f", "-", ns=self.router, input=ruleset.encode())

    def udp_socket(self, ns: str, address: str, port: int = 0) -> socket.socket:
        with entered(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.setblocking(False)
        return sock

    def close_namespaces(self) -> None:
        delete_namespaces(self.namespaces)

    def close(self) -> None:
        if self.coturn is not None and self.coturn.poll() is None:
            self.coturn.terminate()
            try:
                self.coturn.wait(5)
            except subprocess.TimeoutExpired:
                self.coturn.kill()
                self.coturn.wait()
        self.close_namespaces()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    try:
        check_bed(TOOLS)
    except BedUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the STUN lab is required under CI=true: {exc}")
        pytest.skip(f"STUN lab unavailable: {exc}")
    nat_lab = NatLab()
    try:
        nat_lab.open()
        nat_lab.start_coturn()
        yield nat_lab
    finally:
        nat_lab.close()


def bindings(sock: socket.socket, servers: tuple[TransportAddress, ...],
             policy: RetransmitPolicy = POLICY) -> tuple[list[Outcome], StunClient]:
    """Run one Binding transaction per server from ``sock`` until all have ended."""
    client = StunClient(os.urandom, policy)
    for server in servers:
        transmit = client.start(server, time.monotonic())
        sock.sendto(transmit.datagram, transmit.destination.as_tuple())
    while len(client):
        deadline = client.next_deadline()
        assert deadline is not None
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        while readable:
            try:
                data, source = sock.recvfrom(2048)
            except BlockingIOError:
                break
            client.receive(data, source[:2], now)
        for transmit in client.tick(now):
            sock.sendto(transmit.datagram, transmit.destination.as_tuple())
    outcomes = client.take_completed()
    # Only late duplicates (answers to retransmissions of a finished transaction) may be dropped.
    retransmissions = sum(o.transmissions - 1 for o in outcomes)
    assert set(client.drops) <= {"unknown transaction"}, client.drops
    assert client.drops["unknown transaction"] <= retransmissions, client.drops
    return outcomes, client


def local_address(sock: socket.socket) -> TransportAddress:
    return TransportAddress.of(*sock.getsockname()[:2])


def test_reflexive_address_without_nat_is_the_sockets(lab: NatLab) -> None:
    with lab.udp_socket(lab.open_host, OPEN_HOST) as sock:
        me = local_address(sock)
        outcomes, _ = bindings(sock, SERVERS)
    assert all(isinstance(o, BindingResult) for o in outcomes), outcomes
    assert {o.server for o in outcomes} == set(SERVERS)
    for outcome in outcomes:
        assert outcome.reflexive == me
        assert 0 < outcome.rtt < 1.0
    report = classify_mapping(outcomes, [me])
    assert report.behavior == MappingBehavior.ENDPOINT_INDEPENDENT, report.reason
    assert report.reflexive == me and report.behind_nat is False
    assert report.to_json()["mapping"] == "endpoint-independent"


def test_port_restricted_cone_nat_is_endpoint_independent(lab: NatLab) -> None:
    lab.nat("masquerade")
    with lab.udp_socket(lab.nat_host, NAT_HOST) as sock:
        me = local_address(sock)
        outcomes, _ = bindings(sock, SERVERS)
    assert all(isinstance(o, BindingResult) for o in outcomes), outcomes
    assert {str(o.reflexive.ip) for o in outcomes} == {ROUTER_WAN}
    report = classify_mapping(outcomes, [me])
    assert report.behavior == MappingBehavior.ENDPOINT_INDEPENDENT, report.reason
    assert report.behind_nat is True
    assert report.reflexive is not None and str(report.reflexive.ip) == ROUTER_WAN


def test_symmetric_nat_is_endpoint_dependent(lab: NatLab) -> None:
    lab.nat("masquerade random")
    with lab.udp_socket(lab.nat_host, NAT_HOST) as sock:
        me = local_address(sock)
        outcomes, _ = bindings(sock, SERVERS)
    assert all(isinstance(o, BindingResult) for o in outcomes), outcomes
    assert {str(o.reflexive.ip) for o in outcomes} == {ROUTER_WAN}
    assert len({o.reflexive.port for o in outcomes}) == 2
    report = classify_mapping(outcomes, [me])
    assert report.behavior == MappingBehavior.ENDPOINT_DEPENDENT, report.reason
    assert report.behind_nat is True and report.reflexive is None
    assert report.to_json()["mapping"] == "endpoint-dependent"


def test_silent_server_gets_the_bounded_retransmissions(lab: NatLab) -> None:
    """A UDP socket on the server side that never answers: it must receive exactly
    ``max_transmissions`` copies of one request, and the transaction must then fail."""
    silent = TransportAddress.of(str(SERVERS[0].ip), 3499)
    with (lab.udp_socket(lab.inet, str(silent.ip), silent.port) as sink,
          lab.udp_socket(lab.open_host, OPEN_HOST) as sock):
        started = time.monotonic()
        outcomes, _ = bindings(sock, (silent, SERVERS[1]), SHORT_POLICY)
        elapsed = time.monotonic() - started
        received = []
        while True:
            try:
                received.append(sink.recvfrom(2048)[0])
            except BlockingIOError:
                break
    failed = [o for o in outcomes if isinstance(o, BindingFailure)]
    assert [f.server for f in failed] == [silent]
    assert failed[0].reason == f"no response after {SHORT_POLICY.max_transmissions} transmissions"
    assert len(received) == SHORT_POLICY.max_transmissions
    assert len(set(received)) == 1 and parse(received[0]).transaction_id == failed[0].transaction_id
    assert SHORT_POLICY.schedule()[1] <= elapsed < SHORT_POLICY.schedule()[1] + 1.0
    report = classify_mapping(outcomes)
    assert report.behavior == MappingBehavior.UNKNOWN
    assert "fewer than two servers" in report.reason



def test_coturn_reply_is_parsed_whole(lab: NatLab) -> None:
    """coturn's own reply to our Tailscale-form request: FINGERPRINT checked, both mapped
    addresses ours, RFC 5780 attributes (RESPONSE-ORIGIN, OTHER-ADDRESS) decoded."""
    with lab.udp_socket(lab.open_host, OPEN_HOST) as sock:
        me = local_address(sock)
        txid, request = binding_request(os.urandom)
        sock.sendto(request, SERVERS[0].as_tuple())
        assert select.select([sock], [], [], 2.0)[0], "coturn did not answer"
        data, source = sock.recvfrom(2048)
    assert TransportAddress.of(*source[:2]) == SERVERS[0]
    reply = parse(data)
    assert reply.transaction_id == txid and reply.fingerprint
    assert reply.get(Attr.XOR_MAPPED_ADDRESS) == reply.get(Attr.MAPPED_ADDRESS) == me
    assert reply.get(Attr.RESPONSE_ORIGIN) == SERVERS[0]
    assert reply.get(Attr.OTHER_ADDRESS) is not None
    assert reply.get(Attr.SOFTWARE).startswith("Coturn")


def test_our_responder_answers_coturns_client(lab: NatLab) -> None:
    """``answer_binding`` as the STUN server, coturn's ``turnutils_stunclient`` as the client:
    it must print the address and port our responder saw it come from."""
    server = TransportAddress.of(str(SERVERS[0].ip), 3490)
    seen: list[tuple[str, int]] = []
    stop = threading.Event()
    with lab.udp_socket(lab.inet, str(server.ip), server.port) as sock:
        def serve() -> None:
            while not stop.is_set():
                if not select.select([sock], [], [], 0.05)[0]:
                    continue
                data, source = sock.recvfrom(2048)
                try:
                    reply = answer_binding(data, source[:2], software="pywg")
                except StunError:
                    continue
                if reply is not None:
                    seen.append(source[:2])
                    sock.sendto(reply, source)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            out = run("turnutils_stunclient", "-p", str(server.port), "-L", OPEN_HOST, str(server.ip),
                      ns=lab.open_host, timeout=15)
        finally:
            stop.set()
            thread.join(5)
    assert seen, "turnutils_stunclient sent no Binding request"
    host, port = seen[0]
    assert host == OPEN_HOST
    assert f"UDP reflexive addr: {host}:{port}" in out, out
