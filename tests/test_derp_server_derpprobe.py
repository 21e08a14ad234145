"""Tailscale's derpprobe 1.102.3 against ``pywg derp serve`` (the CLI, a real process) on
loopback with TLS: its DERP-map, TLS, mesh (a packet relayed between two of its own
clients through our server) and IPv4 STUN probes all pass. The certificate is a
self-signed one for ``localhost``, given to derpprobe as its trust root (SSL_CERT_FILE) and
the node marked InsecureForTests. Fails under CI=true when derpprobe is missing."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from needs import unavailable

from pywg.testing.certs import self_signed
from pywg.testing.netns import PEERS_DIR

DERPPROBE = PEERS_DIR / "derper-1.102.3" / "bin" / "derpprobe"


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_derpprobe_passes_against_pywg_derp_serve(tmp_path: Path) -> None:
    if not DERPPROBE.is_file():
        unavailable(f"peer not installed: derpprobe 1.102.3: no {DERPPROBE} (make peers builds it)")
    tls = self_signed(tmp_path, ["localhost", "127.0.0.1"])
    cert, key = tls.cert, tls.key
    port, stun_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("pywg")), "derp", "serve", "--listen", f"127.0.0.1:{port}", "--stun-port",
         str(stun_port), "--config", str(tmp_path / "keys" / "derp.json"), "--tls-cert", str(cert),
         "--tls-key", str(key)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert f"on 127.0.0.1:{port}" in banner, banner + server.stdout.read()
        node = {"Name": "900a", "RegionID": 900, "HostName": "localhost", "IPv4": "127.0.0.1", "IPv6": "none",
                "DERPPort": port, "STUNPort": stun_port, "InsecureForTests": True}
        derp_map = {"Regions": {"900": {"RegionID": 900, "RegionCode": "lo", "RegionName": "loopback",
                                        "Nodes": [node]}}}
        map_file = tmp_path / "derpmap.json"
        map_file.write_text(json.dumps(derp_map))
        done = subprocess.run([str(DERPPROBE), "-once", "-derp-map", f"file://{map_file}"],
                              env={**os.environ, "SSL_CERT_FILE": str(cert)}, capture_output=True,
                              text=True, timeout=90, check=False)
        out = done.stdout + done.stderr
        assert "good: derpmap-probe" in out, out
        assert re.search(r"good: derp/lo/900a/tls: ", out), out
        assert re.search(r"good: derp/lo/900a/900a/mesh: ", out), out  # a packet through our relay
        assert re.search(r"good: derp/lo/900a/udp: ", out), out  # our STUN answered
        # Its IPv6 STUN probe runs although the node says IPv6 "none" (as against derper): bad.
        bad = re.findall(r"bad: (\S+):", out)
        assert bad == ["derp/lo/900a/udp6"], out
    finally:
        server.terminate()
        server.wait(10)
