"""Tailscale's DERP tools, as installed by ``make peers`` (derper and derpprobe 1.102.3),
start and answer on the namespace bed: derper on namespace A's veth address with a key
file, a STUN port and a self-signed certificate for that address (never ``-dev``), and
derpprobe in namespace B probing it once (its STUN probe passes; see the test). pywg's
own DERP support is later work; this proves the tools the tests will face run here.
Fails under CI=true when the tools are missing."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from needs import unavailable

from pywg.testing.netns import PEERS_DIR, Bed, entered, run

pytestmark = pytest.mark.netns

DERP_DIR = PEERS_DIR / "derper-1.102.3" / "bin"
DERP_PORT, STUN_PORT = 8443, 3479
STUN_BINDING_REQUEST, STUN_MAGIC_COOKIE = 0x0001, 0x2112A442


def tool(name: str) -> str:
    path = DERP_DIR / name
    if not path.is_file():
        unavailable(f"peer not installed: {name} 1.102.3: no {path} (make peers builds it)")
    return str(path)


def stun_binding(bed: Bed, server: tuple[str, int]) -> tuple[str, int]:
    """Send a STUN Binding request (RFC 8489) from namespace B; the XOR-MAPPED-ADDRESS answered.
    derper answers only requests naming the SOFTWARE "tailnode" and ending in a FINGERPRINT."""
    transaction = bytes(range(12))
    software = struct.pack("!HH", 0x8022, 8) + b"tailnode"
    request = struct.pack("!HHI", STUN_BINDING_REQUEST, len(software) + 8, STUN_MAGIC_COOKIE) + transaction
    request += software
    request += struct.pack("!HHI", 0x8028, 4, zlib.crc32(request) ^ 0x5354554E)
    sock = bed.udp_socket(bed.ns_b, bed.outer_b)
    with sock:
        sock.settimeout(5)
        sock.sendto(request, server)
        reply, _ = sock.recvfrom(2048)
        local_port = sock.getsockname()[1]
    kind, length, cookie = struct.unpack("!HHI", reply[:8])
    assert kind == 0x0101 and cookie == STUN_MAGIC_COOKIE and reply[8:20] == transaction  # success response
    attrs = reply[20:20 + length]
    while attrs:
        attr, size = struct.unpack("!HH", attrs[:4])
        value = attrs[4:4 + size]
        if attr == 0x0020:  # XOR-MAPPED-ADDRESS, IPv4
            port = struct.unpack("!H", value[2:4])[0] ^ (STUN_MAGIC_COOKIE >> 16)
            address = struct.unpack("!I", value[4:8])[0] ^ STUN_MAGIC_COOKIE
            assert local_port == port
            return socket.inet_ntoa(struct.pack("!I", address)), port
        attrs = attrs[4 + (size + 3) // 4 * 4:]
    raise AssertionError(f"no XOR-MAPPED-ADDRESS in {reply.hex()}")


def test_derper_serves_and_derpprobe_probes_it(bed: Bed) -> None:
    derper, derpprobe = tool("derper"), tool("derpprobe")
    config = bed.workdir / "derper.json"  # derper writes its private key here when absent
    certs = bed.workdir / "certs"
    log = bed.workdir / "derper.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["ip", "netns", "exec", bed.ns_a, derper, "-a", f"{bed.outer_a}:{DERP_PORT}", "-c", str(config),
             "-stun-port", str(STUN_PORT), "-http-port", "-1", "-certmode", "manual", "-certdir", str(certs),
             "-hostname", bed.outer_a], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while f"{bed.outer_a}:{DERP_PORT}" not in run("ss", "-ltnH", ns=bed.ns_a):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert json.loads(config.read_text())["PrivateKey"].startswith("privkey:")
        # The node line derper logs for a self-signed IP certificate: its certificate's hash.
        match = re.search(r"Configure it in DERPMap using: .*?\n\s*(\{.*\})", log.read_text())
        assert match, log.read_text()
        node = json.loads(match.group(1))
        assert node["HostName"] == bed.outer_a and node["CertName"].startswith("sha256-raw:")

        assert stun_binding(bed, (bed.outer_a, STUN_PORT))[0] == bed.outer_b

        # derper's HTTPS endpoint: the certificate it logged, and its probe handler answering.
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed, pinned below
        with entered(bed.ns_b), socket.create_connection((bed.outer_a, DERP_PORT), timeout=5) as raw, \
                context.wrap_socket(raw) as conn:
            der = conn.getpeercert(binary_form=True)
            assert der is not None and node["CertName"] == "sha256-raw:" + hashlib.sha256(der).hexdigest()
            conn.sendall(f"GET /derp/probe HTTP/1.1\r\nHost: {bed.outer_a}\r\nConnection: close\r\n\r\n".encode())
            assert conn.recv(4096).startswith(b"HTTP/1.1 200 "), "derper's /derp/probe did not answer 200"

        node.update(IPv4=bed.outer_a, IPv6="none", DERPPort=DERP_PORT, STUNPort=STUN_PORT, RegionID=900)
        derp_map = {"Regions": {"900": {"RegionID": 900, "RegionCode": "bed", "RegionName": "namespace bed",
                                        "Nodes": [node]}}}
        map_file = bed.workdir / "derpmap.json"
        map_file.write_text(json.dumps(derp_map))
        done = subprocess.run(["ip", "netns", "exec", bed.ns_b, derpprobe, "-once", "-derp-map",
                               f"file://{map_file}"], capture_output=True, text=True, timeout=90, check=False)
        out = done.stdout + done.stderr
        # derpprobe read the map, and its STUN probe over IPv4 got derper's answer. (Its TLS and
        # mesh probes want a certificate from a public CA and a DNS host name, which a
        # namespace bed has not: they reach derper's TLS port and stop at verification; its
        # IPv6 STUN probe runs although the node says IPv6 "none". It exits 1 for those.)
        assert "good: derpmap-probe" in out, out
        assert re.search(r"good: derp/bed/\w+/udp: ", out), out
        assert "x509: certificate signed by unknown authority" in out, out
    finally:
        process.terminate()
        process.wait(10)
    assert Path(log).exists()
