"""Tunnels between two userspace WireGuard daemons on the namespace bed, configured with
the stock ``wg``; and the traffic tools run through them (ping, iperf3)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from pywg.protocol.crypto import dh_generate, dh_pubkey

from .netns import Bed, Daemon, run


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@dataclass(eq=False)
class Side:
    daemon: Daemon
    ns: str
    private: str
    public: str
    port: int
    tunnel4: str
    tunnel6: str

    @property
    def ifname(self) -> str:
        return self.daemon.ifname

    def wg(self, *args: str) -> str:
        return self.daemon.wg(*args)


def make_side(bed: Bed, ns: str, impl: str, index: int, *, env: dict[str, str] | None = None,
              log_level: str = "debug") -> Side:
    """An interface in ``ns``: tunnel addresses 10.202.0.INDEX/24 and fd02::INDEX/64, UDP
    port 51820 + INDEX. ``env``: extra environment for the daemon (offload switches...)."""
    private = dh_generate()
    port = 51820 + index
    tunnel4, tunnel6 = f"10.202.0.{index}", f"fd02::{index}"
    daemon = bed.start_interface(ns, bed.unique_ifname("pw" if impl == "pywg" else "wg"), impl=impl,
                                 addresses=[f"{tunnel4}/24", f"{tunnel6}/64"],
                                 private_key=b64(private), listen_port=port, env=env, log_level=log_level)
    return Side(daemon, ns, b64(private), b64(dh_pubkey(private)), port, tunnel4, tunnel6)


def connect(bed: Bed, a: Side, b: Side, *, outer6: bool = False, psk: bool = True) -> None:
    """A knows where B is; B learns A's endpoint from A's handshake."""
    secret = b64(dh_generate()) if psk else None
    endpoint = f"[{bed.outer6_b}]:{b.port}" if outer6 else f"{bed.outer_b}:{b.port}"
    bed.set_wg_peer(a.daemon, b.public, allowed_ips=f"{b.tunnel4}/32,{b.tunnel6}/128",
                    endpoint=endpoint, preshared_key=secret)
    bed.set_wg_peer(b.daemon, a.public, allowed_ips=f"{a.tunnel4}/32,{a.tunnel6}/128",
                    preshared_key=secret)


def tunnel(bed: Bed, impl_a: str, impl_b: str, *, env: dict[str, str] | None = None,
           **kwargs: bool) -> tuple[Side, Side]:
    a, b = make_side(bed, bed.ns_a, impl_a, 1, env=env), make_side(bed, bed.ns_b, impl_b, 2, env=env)
    connect(bed, a, b, **kwargs)
    return a, b


def ping_fails(ns: str, address: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-c", "2", "-W", "1", address],
                          capture_output=True, check=False).returncode != 0


def iperf3(bed: Bed, server: Side, seconds: int = 5, *extra: str) -> dict[str, Any]:
    """A TCP run from A's namespace to ``server``; iperf3's JSON result (with
    end.sum_received, or AssertionError saying what iperf3 reported)."""
    srv = subprocess.Popen(["ip", "netns", "exec", server.ns, "iperf3", "-s", "-1", "-B", server.tunnel4],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while f"{server.tunnel4}:5201" not in run("ss", "-ltnH", ns=server.ns):
            if srv.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("iperf3 server never listened")
            time.sleep(0.05)
        done = subprocess.run(["ip", "netns", "exec", bed.ns_a, "iperf3", "-c", server.tunnel4,
                               "-t", str(seconds), "-J", *extra], capture_output=True, check=False,
                              timeout=seconds + 30)
        result: dict[str, Any] = json.loads(done.stdout or b"{}")
        if done.returncode != 0 or "sum_received" not in result.get("end", {}):
            raise AssertionError(f"iperf3 failed (exit {done.returncode}): {result.get('error')}; "
                                 f"end: {sorted(result.get('end', {}))}")
        return result
    finally:
        srv.kill()
        srv.wait()
