"""The flooder of bench/flood.py: one process in a bed namespace sending hostile datagrams
at a WireGuard port inside the bed, bounded in rate, count and time.

    ip netns exec NS python -m bench.flood_sender KIND --target ADDR:PORT --seconds S
        [--rate N] [--public-key B64] [--spoof-net 10.250.0.0/16] [--replay-from ADDR:PORT]

KIND: garbage (random bytes, random length), shaped (WireGuard-shaped: right type and
size, random contents), mac1 (handshake initiations with a valid mac1 for --public-key,
from one source), mac1-spoofed (the same from random sources in --spoof-net, raw socket),
replay (transport datagrams captured on the namespace's link from --replay-from to the
target, sent again with their original source), oversized (65,000-byte datagrams).
Only addresses given on the command line are sent to; the caller gives the bed's.
Prints one JSON line: what was sent.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import random
import socket
import struct
import sys
import time

from pywg.protocol.checksum import internet_checksum

MAX_RATE = 200_000
MAX_SECONDS = 60.0
ETH_P_IP = 0x0800


def mac1_initiation(mac1_key: bytes) -> bytes:
    body = b"\x01\x00\x00\x00" + os.urandom(4 + 32 + 48 + 28)
    return body + hashlib.blake2s(body, digest_size=16, key=mac1_key).digest() + bytes(16)


def shaped() -> bytes:
    kind = random.choice((1, 2, 3, 4))
    size = {1: 148, 2: 92, 3: 64, 4: 32 + 16 * random.randrange(0, 90)}[kind]
    return bytes((kind, 0, 0, 0)) + os.urandom(size - 4)


def ipv4_udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4 + UDP datagram with a spoofed source (sent on a raw socket)."""
    udp_len = 8 + len(payload)
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    udp = udp[:6] + struct.pack("!H", internet_checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, random.getrandbits(16), 0, 64,
                         socket.IPPROTO_UDP, 0, s, d)
    return header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:] + udp


def capture_transport(source: tuple[str, int], target: tuple[str, int], want: int, seconds: float) -> list[bytes]:
    """Transport datagrams (type 4) seen on this namespace's links from source to target."""
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    sniffer.settimeout(0.2)
    src, dst = socket.inet_aton(source[0]), socket.inet_aton(target[0])
    found: list[bytes] = []
    deadline = time.monotonic() + seconds
    try:
        while len(found) < want and time.monotonic() < deadline:
            try:
                frame = sniffer.recv(65535)
            except TimeoutError:
                continue
            ihl = (frame[0] & 15) * 4
            if len(frame) < ihl + 8 + 32 or frame[9] != socket.IPPROTO_UDP:
                continue
            if frame[12:16] != src or frame[16:20] != dst:
                continue
            sport, dport = struct.unpack("!HH", frame[ihl:ihl + 4])
            payload = frame[ihl + 8:]
            if sport == source[1] and dport == target[1] and payload[:4] == b"\x04\0\0\0":
                found.append(payload)
    finally:
        sniffer.close()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("garbage", "shaped", "mac1", "mac1-spoofed", "replay", "oversized"))
    parser.add_argument("--target", required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rate", type=int, default=70_000, help="datagrams per second")
    parser.add_argument("--public-key", help="the target's public key (mac1 kinds)")
    parser.add_argument("--spoof-net", default="10.250.0.0/16")
    parser.add_argument("--replay-from", help="ADDR:PORT of the legitimate sender (replay)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    target = (host, int(port))
    seconds, rate = min(args.seconds, MAX_SECONDS), min(args.rate, MAX_RATE)

    raw = None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    mac1_key = b""
    if args.kind.startswith("mac1"):
        if not args.public_key:
            parser.error("--public-key is needed for mac1 floods")
        mac1_key = hashlib.blake2s(b"mac1----" + base64.b64decode(args.public_key)).digest()
    replays: list[bytes] = []
    replay_source = ("", 0)
    if args.kind == "replay":
        if not args.replay_from:
            parser.error("--replay-from is needed for replay floods")
        h, _, p = args.replay_from.rpartition(":")
        replay_source = (h, int(p))
        replays = capture_transport(replay_source, target, 256, 5.0)
        if not replays:
            print(json.dumps({"kind": args.kind, "sent": 0, "error": "captured no transport datagram"}))
            return 1
    if args.kind in ("mac1-spoofed", "replay"):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        raw.setblocking(False)
    network = ipaddress.ip_network(args.spoof_net)

    sent = refused = 0
    start = time.monotonic()
    end = start + seconds
    batch = max(1, rate // 1000)  # datagrams per millisecond tick
    while (now := time.monotonic()) < end:
        due = int((now - start) * rate)
        for _ in range(min(due - sent - refused, batch)):
            try:
                if args.kind == "garbage":
                    sock.sendto(os.urandom(random.randrange(1, 1400)), target)
                elif args.kind == "shaped":
                    sock.sendto(shaped(), target)
                elif args.kind == "mac1":
                    sock.sendto(mac1_initiation(mac1_key), target)
                elif args.kind == "oversized":
                    sock.sendto(os.urandom(65000), target)
                elif args.kind == "mac1-spoofed":
                    src = str(network[random.randrange(1, network.num_addresses - 1)])
                    assert raw is not None
                    raw.sendto(ipv4_udp(src, random.randrange(1024, 65535), *target, mac1_initiation(mac1_key)),
                               target)
                else:  # replay
                    assert raw is not None
                    raw.sendto(ipv4_udp(*replay_source, *target, random.choice(replays)), target)
                sent += 1
            except (BlockingIOError, OSError):
                refused += 1  # the socket buffer is full: counted, not retried
        if due - sent - refused <= 0:
            time.sleep(0.0005)
    print(json.dumps({"kind": args.kind, "sent": sent, "refused": refused,
                      "seconds": round(time.monotonic() - start, 3), "captured": len(replays)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
