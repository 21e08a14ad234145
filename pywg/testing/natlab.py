"""A lab of real Linux NATs (root): an "internet" namespace, routers NATting a LAN with nftables,
and hosts behind them. Recipes from DESIGN.md "Test beds".

    internet (coturn on 203.0.113.1:3478 and 203.0.113.2:3478, extra address 203.0.113.3)
      |-- 10.210.N.1/24 ---- 10.210.N.2/24 (wan) router N (lan) 192.168.(100+N).1/24
      |                                                  |-- host N 192.168.(100+N).2
      |-- 10.209.0.1/24 ---- open host 10.209.0.2 (no NAT)

Every router's input chain drops new flows arriving on its WAN port (``iifname wan ct state
new drop``) so an early punch from a peer cannot take the port and remap the host. Names
carry the pid and an instance counter, so several labs coexist; ``close()`` kills what runs in
the lab's namespaces and deletes them, which removes their nftables tables with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Self

from pywg.device.netns import entered
from pywg.nat.stun import TransportAddress
from pywg.nat.stun_client import Outcome, RetransmitPolicy, StunClient
from pywg.testing.netns import check_bed, run

TOOLS = ("ip", "ss", "nft", "turnserver", "sysctl")
STUN_SERVERS = (TransportAddress.of("203.0.113.1", 3478), TransportAddress.of("203.0.113.2", 3478))
OTHER_INTERNET_ADDRESS = "203.0.113.3"
OPEN_HOST_ADDRESS = "10.209.0.2"
# Sends at 0, 0.2, 0.6, 1.4, 3.0 s, failure at 4.6 s: a busy machine is retransmitted for.
LAB_POLICY = RetransmitPolicy(rto=0.2, max_transmissions=5, last_wait_factor=8)
_instances = itertools.count()
MAX_ROUTERS = 150  # router i has 10.210.i.0/24 outside and 192.168.(100 + i).0/24 inside


class NatType(Enum):
    """How a router treats its LAN's UDP (RFC 4787 terms in the docstrings of the rules)."""

    PORT_RESTRICTED_CONE = "port-restricted-cone"
    SYMMETRIC = "symmetric"
    FULL_CONE = "full-cone"
    ADDRESS_RESTRICTED_CONE = "address-restricted-cone"
    UDP_BLOCKED = "udp-blocked"


@dataclass(frozen=True)
class Router:
    """One NAT: its namespace, WAN device and address, and the host behind it."""

    index: int
    nat: NatType
    ns: str
    wan: str
    wan_address: str
    lan_address: str
    host_ns: str
    host_address: str


def ruleset(router: Router, mapping_timeout: int = 30) -> str:
    """The router's whole nftables ruleset for its NAT type (``flush ruleset`` first)."""
    wan, host = router.wan, router.host_address
    masquerade = "masquerade random" if router.nat is NatType.SYMMETRIC else "masquerade"
    prerouting = forward_extra = postrouting_extra = sets = ""
    if router.nat is NatType.FULL_CONE:
        # Endpoint-independent filtering: anything to a mapped port reaches the host.
        prerouting = f'iifname "{wan}" meta l4proto udp dnat to {host}'
    elif router.nat is NatType.ADDRESS_RESTRICTED_CONE:
        # Address-dependent filtering: only addresses the host has sent to may come in (any port).
        sets = (f"set contacted {{ type ipv4_addr . inet_service; flags dynamic, timeout; "
                f"timeout {mapping_timeout}s; }}")
        postrouting_extra = (f'oifname "{wan}" meta l4proto udp update @contacted '
                             f"{{ ip daddr . udp sport timeout {mapping_timeout}s }}")
        prerouting = f'iifname "{wan}" meta l4proto udp ip saddr . udp dport @contacted dnat to {host}'
    elif router.nat is NatType.UDP_BLOCKED:
        forward_extra = "meta l4proto udp drop"
    return f"""
flush ruleset
table ip pywg_natlab {{
    {sets}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {prerouting}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        {forward_extra}
    }}
    chain mark_out {{
        type filter hook postrouting priority filter; policy accept;
        {postrouting_extra}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" {masquerade}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{wan}" ct state new drop
    }}
}}
"""


class NatLab:
    """The lab; use as a context manager. ``add_router`` makes a router of a NAT type with one
    host behind it; ``start_coturn`` serves STUN on STUN_SERVERS in the internet namespace."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000}x{next(_instances)}"
        self.prefix = f"nl{self.tag}"
        self.inet = f"{self.prefix}-inet"
        self.open_host = f"{self.prefix}-open"
        self.routers: list[Router] = []
        self.namespaces: list[str] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="pywg-natlab-"))
        self.coturn: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netns(self, name: str) -> str:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "link", "set", "lo", "up", ns=name)
        return name

    def _link(self, ns_a: str, dev_a: str, addr_a: str, ns_b: str, dev_b: str, addr_b: str) -> None:
        run("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            run("ip", "addr", "add", addr, "dev", dev, ns=ns)
            run("ip", "link", "set", dev, "up", ns=ns)

    def open(self) -> None:
        """The internet namespace (STUN addresses on its loopback) and the open host."""
        check_bed(TOOLS)
        self._netns(self.inet)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.inet)  # routes between routers
        for address in [*(str(s.ip) for s in STUN_SERVERS), OTHER_INTERNET_ADDRESS]:
            run("ip", "addr", "add", f"{address}/32", "dev", "lo", ns=self.inet)
        self._netns(self.open_host)
        self._link(self.inet, f"{self.prefix}io", "10.209.0.1/24", self.open_host, f"{self.prefix}oi",
                   f"{OPEN_HOST_ADDRESS}/24")
        run("ip", "route", "add", "default", "via", "10.209.0.1", ns=self.open_host)

    def add_router(self, nat: NatType, mapping_timeout: int = 30) -> Router:
        """A router NATting its LAN as ``nat`` and one host behind it; the router's UDP conntrack
        timeouts (unreplied and replied) are set to ``mapping_timeout`` seconds."""
        i = len(self.routers)
        if i >= MAX_ROUTERS:
            raise ValueError(f"at most {MAX_ROUTERS} routers per lab")
        router = Router(i, nat, self._netns(f"{self.prefix}-r{i}"), f"{self.prefix}w{i}", f"10.210.{i}.2",
                        f"192.168.{100 + i}.1", self._netns(f"{self.prefix}-h{i}"), f"192.168.{100 + i}.2")
        self._link(self.inet, f"{self.prefix}i{i}", f"10.210.{i}.1/24", router.ns, router.wan,
                   f"{router.wan_address}/24")
        self._link(router.ns, f"{self.prefix}l{i}", f"{router.lan_address}/24", router.host_ns,
                   f"{self.prefix}h{i}", f"{router.host_address}/24")
        run("ip", "route", "add", "default", "via", f"10.210.{i}.1", ns=router.ns)
        run("ip", "route", "add", "default", "via", router.lan_address, ns=router.host_ns)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router.ns)
        self.set_mapping_timeout(router, mapping_timeout)
        run("nft", "-f", "-", ns=router.ns, input=ruleset(router, mapping_timeout).encode())
        self.routers.append(router)
        return router

    def set_mapping_timeout(self, router: Router, seconds: int) -> None:
        """The router's UDP conntrack timeouts (per network namespace on this kernel)."""
        run("sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={seconds}",
            f"net.netfilter.nf_conntrack_udp_timeout_stream={seconds}", ns=router.ns)

    def change_wan_address(self, router: Router) -> str:
        """Give the router a new WAN address (the ISP re-numbered it): masquerade forgets every
        mapping made on the old one, and nothing reaches the old address any more. Returns the
        new address."""
        old = router.wan_address
        last = int(old.rsplit(".", 1)[1])
        new = f"{old.rsplit('.', 1)[0]}.{2 if last == 254 else last + 1}"
        run("ip", "addr", "del", f"{old}/24", "dev", router.wan, ns=router.ns)
        run("ip", "addr", "add", f"{new}/24", "dev", router.wan, ns=router.ns)
        run("ip", "route", "replace", "default", "via", f"10.210.{router.index}.1", ns=router.ns)
        # The internet forgets the old address (its neighbour entry would keep delivering to
        # the router, whose cone rules would let old flows in: an ISP routes it elsewhere).
        run("ip", "neigh", "flush", "to", old, ns=self.inet, check=False)
        i = self.routers.index(router)
        self.routers[i] = dataclasses.replace(router, wan_address=new)
        return new

    def start_coturn(self) -> None:
        """coturn as a plain STUN server (no TURN relay, no auth) on both STUN_SERVERS."""
        argv = ["turnserver", "-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls", "--no-tcp", "-z",
                "--log-file", "stdout", "--simple-log", "--pidfile", str(self.workdir / "turnserver.pid"),
                "--userdb", str(self.workdir / "turndb"), "-p", str(STUN_SERVERS[0].port)]
        for server in STUN_SERVERS:
            argv += ["-L", str(server.ip)]
        with open(self.workdir / "turnserver.log", "wb") as log:
            self.coturn = subprocess.Popen(["ip", "netns", "exec", self.inet, *argv], stdout=log,
                                           stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        wanted = {str(server) for server in STUN_SERVERS}
        while True:
            listening = {line.split()[3] for line in run("ss", "-Hlun", ns=self.inet).splitlines() if line.strip()}
            if wanted <= listening:
                return
            if self.coturn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"turnserver did not start listening on {sorted(wanted)}")
            time.sleep(0.05)

    def udp_socket(self, ns: str, address: str = "0.0.0.0", port: int = 0) -> socket.socket:
        """A non-blocking UDP socket made in namespace ``ns`` and bound there."""
        with entered(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        """Stop coturn, kill what runs in the lab's namespaces, delete them and the workdir."""
        if self.coturn is not None and self.coturn.poll() is None:
            self.coturn.terminate()
            try:
                self.coturn.wait(5)
            except subprocess.TimeoutExpired:
                self.coturn.kill()
                self.coturn.wait()
        for ns in reversed(self.namespaces):
            if os.path.exists(f"/var/run/netns/{ns}"):
                for pid in run("ip", "netns", "pids", ns, check=False).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
                run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def stun_bindings(sock: socket.socket, servers: tuple[TransportAddress, ...] = STUN_SERVERS,
                  policy: RetransmitPolicy = LAB_POLICY) -> list[Outcome]:
    """Run one Binding transaction per server from ``sock`` until every one has ended."""
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
    return client.take_completed()


def receives(sock: socket.socket, timeout: float) -> list[tuple[bytes, tuple[str, int]]]:
    """Every datagram ``sock`` receives within ``timeout`` seconds."""
    got: list[tuple[bytes, tuple[str, int]]] = []
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        with contextlib.suppress(BlockingIOError):
            data, source = sock.recvfrom(2048)
            got.append((data, source[:2]))
    return got
