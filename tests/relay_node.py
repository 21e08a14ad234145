"""A pywg device whose one peer is reached over DERP: the harness of test_relay_netns.py.

    ip netns exec NS python tests/relay_node.py IFNAME --key FILE --peer PUBHEX
        --allowed-ip CIDR --region ID=HOST:PORT[=SERVERKEYHEX] ... --home ID --stats FILE

The device is the daemon's (TUN with offloads, the data path of the environment, UAPI at
/var/run/wireguard/IFNAME.sock so ``wg`` works), its relay a DeviceRelay with the
WireGuard key as node key; the peer's endpoint is RelayEndpoint(home, peer key) (or,
with --direct, a UDP address: the baseline). On
SIGTERM it writes the device's and the relay's stats (JSON) to --stats and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from pywg.derp import NodePrivateKey, NodePublicKey
from pywg.device import offload
from pywg.device.datapath import DataPathOptions
from pywg.device.derp_client import DialTarget
from pywg.device.device import Device
from pywg.device.relay import DeviceRelay
from pywg.device.tun import Tun
from pywg.device.uapi_server import UapiServer
from pywg.protocol.endpoint import RelayEndpoint
from pywg.uapi.protocol import parse_set


async def main(args: argparse.Namespace) -> int:
    private = bytes.fromhex(Path(args.key).read_text().strip())
    peer = bytes.fromhex(args.peer)
    options = DataPathOptions.from_environment()
    tun = Tun(args.ifname, vnet_hdr=options.tun_offload)
    if tun.vnet_hdr:
        offload.enable_tun_offloads(tun.fileno(), uso=True)
    device = Device(tun, options)
    uapi = await UapiServer.start(args.ifname, device)
    device.apply(parse_set([f"private_key={private.hex()}", f"listen_port={args.listen_port}",
                            f"public_key={peer.hex()}", f"allowed_ip={args.allowed_ip}"]))
    device.start()
    regions: dict[int, list[DialTarget]] = {}
    server_keys: dict[int, NodePublicKey] = {}
    for spec in args.region:
        rid_text, address, *key = spec.split("=")
        host, port = address.rsplit(":", 1)
        regions[int(rid_text)] = [DialTarget.make(host, int(port))]
        if key:
            server_keys[int(rid_text)] = NodePublicKey(bytes.fromhex(key[0]))
    relay = DeviceRelay(NodePrivateKey(private), regions, home=args.home,
                        client_options={"expected_server_key": server_keys.get(args.home)})
    relay.attach(device)
    relay.start()
    if args.direct:  # the baseline: plain UDP, the relay unused
        device.apply(parse_set([f"public_key={peer.hex()}", f"endpoint={args.direct}"]))
    else:
        device.set_endpoint(peer, RelayEndpoint.of(args.home, peer))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    stats = {"device": device.stats(), "relay": relay.stats()}
    Path(args.stats).write_text(json.dumps(stats, default=str))
    await relay.close()
    await uapi.close()
    device.close()
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("ifname")
    parser.add_argument("--key", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--allowed-ip", required=True)
    parser.add_argument("--region", action="append", required=True)
    parser.add_argument("--home", type=int, required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--direct", help="IP:PORT: the peer over UDP instead (a baseline)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr)
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
