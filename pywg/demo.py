"""`make demo`: real tunnels between two network namespaces, each step printed as it
happens. Part 1: pywg's engine and wireguard-go, message by message. Part 2: the pywg
daemon on both sides, configured with the stock `wg`. Part 3: the pywg daemon against
wireguard-go. Part 4 (pywg.demo_mesh): a coordinator and three agents. Part 5
(pywg.demo_nat): two agents behind two NATs punch through. Not a recording."""

from __future__ import annotations

import asyncio
import statistics
import struct
import sys

from pywg import demo_mesh, demo_nat
from pywg.device.udp_engine import UdpEngine
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.protocol.messages import MessageError, message_type
from pywg.testing.netns import Bed, BedUnavailable, check_bed, ping, run
from pywg.testing.pinger import Pinger
from pywg.testing.tunnel import b64, iperf3, tunnel

TUNNEL_A, TUNNEL_B = "10.202.0.1", "10.202.0.2"
WG_PORT = 51820
NAMES = {1: "handshake initiation", 2: "handshake response", 3: "cookie reply", 4: "transport data"}


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def describe(way: str, data: bytes, endpoint: tuple[str, int]) -> str:
    arrow = f"pywg -> {endpoint[0]}:{endpoint[1]}" if way == "out" else f"pywg <- {endpoint[0]}:{endpoint[1]}"
    try:
        kind = message_type(data)
    except MessageError as exc:
        return f"  {arrow}  {len(data)} bytes, not WireGuard ({exc})"
    text = f"  {arrow}  {NAMES[kind]}, {len(data)} bytes"
    if kind == 1:
        sender, = struct.unpack_from("<I", data, 4)
        text += f", sender index {sender:#010x}, ephemeral {data[8:40].hex()[:16]}..., mac1 {data[116:132].hex()}"
    elif kind == 2:
        sender, receiver = struct.unpack_from("<II", data, 4)
        text += f", sender index {sender:#010x}, receiver index {receiver:#010x}"
    elif kind == 4:
        receiver, counter = struct.unpack_from("<IQ", data, 4)
        what = "keepalive" if len(data) == 32 else f"{len(data) - 32 - 16} bytes of padded IP packet"
        text += f", receiver index {receiver:#010x}, counter {counter} ({what})"
    return text


async def demo(bed: Bed) -> None:
    step("keys (private keys stay in memory and in a 0600 file for `wg`; never printed)")
    pywg_private, wgo_private = dh_generate(), dh_generate()
    pywg_public, wgo_public = dh_pubkey(pywg_private), dh_pubkey(wgo_private)
    print(f"  pywg         public key {b64(pywg_public)}  (namespace {bed.ns_a}, {bed.outer_a})")
    print(f"  wireguard-go public key {b64(wgo_public)}  (namespace {bed.ns_b}, {bed.outer_b})")

    step(f"wireguard-go in namespace {bed.ns_b}, configured with the stock `wg`")
    wgo = bed.start_wireguard_go(bed.ns_b, bed.unique_ifname(), address=f"{TUNNEL_B}/24",
                                 private_key=b64(wgo_private), listen_port=WG_PORT)
    engine = await UdpEngine.start(pywg_private, bed.udp_socket(bed.ns_a, bed.outer_a))
    port = engine.local_address[1]
    bed.set_wg_peer(wgo, b64(pywg_public), allowed_ips=f"{TUNNEL_A}/32", endpoint=f"{bed.outer_a}:{port}")
    print(f"  wireguard-go -f {wgo.ifname}; wg set {wgo.ifname} listen-port {WG_PORT} private-key <file> "
          f"peer {b64(pywg_public)[:8]}... allowed-ips {TUNNEL_A}/32 endpoint {bed.outer_a}:{port}")
    print(f"  pywg engine on UDP {bed.outer_a}:{port}, tunnel address {TUNNEL_A}, "
          f"peer {b64(wgo_public)[:8]}... at {bed.outer_b}:{WG_PORT}")
    engine.dispatcher.add_peer(wgo_public, endpoint=(bed.outer_b, WG_PORT))
    pinger = Pinger(engine, TUNNEL_A)
    engine.wire_tap = lambda way, data, endpoint: print(describe(way, data, endpoint), flush=True)

    try:
        step(f"pywg pings {TUNNEL_B} through the tunnel: the packet waits for a handshake")
        rtt = await pinger.ping(wgo_public, TUNNEL_B)
        print(f"  echo reply from {TUNNEL_B}: {rtt * 1000:.2f} ms (handshake included)")

        step("nine more pings on the established session")
        engine.wire_tap = None
        rtts = [await pinger.ping(wgo_public, TUNNEL_B) * 1000 for _ in range(9)]
        print(f"  RTT min/median/max {min(rtts):.3f}/{statistics.median(rtts):.3f}/{max(rtts):.3f} ms")

        step(f"the stock ping in {bed.ns_b} pings pywg ({TUNNEL_A}) through wireguard-go")
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", bed.ns_b, "ping", "-n", "-c", "3", "-i", "0.2", TUNNEL_A,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        print("  " + out.decode().strip().replace("\n", "\n  "))
        if proc.returncode != 0:
            raise RuntimeError("ping through wireguard-go to pywg failed")

        step(f"`wg show {wgo.ifname}` in {bed.ns_b}: wireguard-go's view of pywg")
        print("  " + run("wg", "show", wgo.ifname, ns=bed.ns_b).strip().replace("\n", "\n  "))
        peer = engine.dispatcher.peers[wgo_public]
        print(f"\n  pywg's view: {peer.handshakes_completed} handshake, rx {peer.rx_bytes} B, "
              f"tx {peer.tx_bytes} B, drops {dict(engine.dispatcher.drops) or 'none'}")
    finally:
        engine.close()


def indent(text: str) -> str:
    return "  " + text.strip().replace("\n", "\n  ")


def daemons(bed: Bed, impl_a: str, impl_b: str) -> None:
    """Two daemons configured with `wg`: ping both ways, a short iperf3, `wg show`."""
    a, b = tunnel(bed, impl_a, impl_b)
    print(f"  {bed.ns_a}: {impl_a} as {a.ifname} ({a.tunnel4}, {a.tunnel6}), UDP {a.port}")
    print(f"  {bed.ns_b}: {impl_b} as {b.ifname} ({b.tunnel4}, {b.tunnel6}), UDP {b.port}")
    print(f"  configured with: wg set IF private-key FILE listen-port N peer KEY preshared-key FILE "
          f"allowed-ips ... [endpoint {bed.outer_b}:{b.port}]")
    step(f"ping through the tunnel: {bed.ns_a} -> {b.tunnel4} (the first packet waits for the handshake)")
    print(indent(ping(a.ns, b.tunnel4, count=3)))
    step(f"ping over IPv6 inside the tunnel: {bed.ns_b} -> {a.tunnel6}")
    print(indent(ping(b.ns, a.tunnel6, count=3)))
    step("3 seconds of iperf3 TCP through the tunnel")
    result = iperf3(bed, b, 3)
    print(f"  {result['end']['sum_received']['bits_per_second'] / 1e6:.1f} Mbit/s received "
          f"({result['end']['sum_received']['bytes'] / 1e6:.1f} MB)")
    step(f"`wg show` in {bed.ns_a}")
    print(indent(a.wg("show", a.ifname)))


def main() -> int:
    try:
        check_bed()
    except BedUnavailable as exc:
        print(f"pywg demo needs the namespace bed: {exc}", file=sys.stderr)
        return 2
    print("Part 1: pywg's protocol engine and wireguard-go, message by message")
    step("two network namespaces joined by a veth pair")
    with Bed() as bed:
        print(f"  {bed.ns_a} {bed.outer_a}/24 <-veth-> {bed.ns_b} {bed.outer_b}/24")
        asyncio.run(demo(bed))
        step("cleaning up: wireguard-go stopped, namespaces deleted")
    print("\nPart 2: the pywg daemon on both sides (TUN + UAPI, driven by the stock wg)")
    with Bed() as bed:
        daemons(bed, "pywg", "pywg")
        step("cleaning up")
    print("\nPart 3: the pywg daemon against wireguard-go")
    with Bed() as bed:
        daemons(bed, "pywg", "wireguard-go")
        step("cleaning up")
    demo_mesh.main()
    demo_nat.main()
    print("done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
