"""A delay line between two interfaces, for tests on kernels without netem
(``CONFIG_NET_SCH_NETEM``): every frame received on ``--slow`` leaves on ``--fast``
``--delay-ms`` later; frames the other way pass at once. AF_PACKET sockets on the asyncio
loop, one process, run inside the namespace that holds both interfaces.

Frames cross it as they are, so their senders must not leave checksums to offload
(veth does by default): ``--offload-off IFACE`` turns checksum offload, TSO, GSO and GRO
off on an interface of the namespace it runs in (SIOCETHTOOL, as ``ethtool -K`` does)
and exits."""

from __future__ import annotations

import argparse
import array
import asyncio
import fcntl
import socket
import struct

ETH_P_ALL = 0x0003
SIOCETHTOOL = 0x8946
ETHTOOL_OFF = (0x17, 0x1F, 0x24, 0x2C)  # ETHTOOL_STXCSUM, _STSO, _SGSO, _SGRO
PACKET_OUTGOING = 4  # what this socket's own interface sends: not to be forwarded back


def offload_off(ifname: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for cmd in ETHTOOL_OFF:
            value = array.array("I", [cmd, 0])
            fcntl.ioctl(s, SIOCETHTOOL, struct.pack("16sP", ifname.encode(), value.buffer_info()[0]))


def _open(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


async def run(slow: str, fast: str, delay: float) -> None:
    loop = asyncio.get_running_loop()
    s_slow, s_fast = _open(slow), _open(fast)

    def send(dst: socket.socket, frame: bytes) -> None:
        try:
            dst.send(frame)
        except OSError:
            pass  # a full queue: the frame is lost, as on a wire

    def pump(src: socket.socket, dst: socket.socket, after: float) -> None:
        while True:
            try:
                frame, addr = src.recvfrom(65535)
            except BlockingIOError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            if after:
                loop.call_later(after, send, dst, frame)
            else:
                send(dst, frame)

    loop.add_reader(s_slow.fileno(), pump, s_slow, s_fast, delay)
    loop.add_reader(s_fast.fileno(), pump, s_fast, s_slow, 0.0)
    print("forwarding", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slow")
    ap.add_argument("--fast")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--offload-off")
    args = ap.parse_args()
    if args.offload_off:
        offload_off(args.offload_off)
        return
    asyncio.run(run(args.slow, args.fast, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
