"""Round-trip time of one packet relayed through ``pywg derp serve`` and through derper 1.102.3.

Two clients on loopback, one thread, blocking sockets with TCP_NODELAY: A sends one SendPacket
to B; as soon as B's socket has the RecvPacket, B sends one back to A; A's clock stops when it
has it. Each round-trip crosses the server twice, nothing else runs between, so the time is
the server's per-packet path (read, look up, frame, write) twice plus two loopback hops. The
servers alternate by round, a fresh pair of clients each round; medians over rounds reported.

    flock /tmp/pywg-heavy.lock .venv/bin/python -m bench.derp_ping --rounds 6 --pings 2000
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.derp_relay import start_server
from pywg.derp import DerpClient, NodePrivateKey, build_upgrade_request
from pywg.derp.frames import HEADER_LEN, SendPacket
from pywg.derp.keys import KEY_LEN


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the relay closed the connection")
        data += chunk
    return bytes(data)


def _connect(port: int, key: NodePrivateKey) -> socket.socket:
    """A handshaken DERP client socket (the ServerInfo read, so nothing else is in flight)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(build_upgrade_request(f"127.0.0.1:{port}"))
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += _read_exactly(sock, 1)
    client = DerpClient(key)
    client.receive_data(_read_exactly(sock, HEADER_LEN + 8 + KEY_LEN), 0.0)
    sock.sendall(client.data_to_send())
    header = _read_exactly(sock, HEADER_LEN)  # ServerInfo
    _read_exactly(sock, int.from_bytes(header[1:], "big"))
    return sock


def one_round(port: int, pings: int, size: int) -> list[float]:
    """The round-trip times (microseconds) of ``pings`` packets A -> B -> A."""
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()
    a, b = _connect(port, key_a), _connect(port, key_b)
    try:
        to_b = SendPacket(key_b.public, bytes(size)).pack()
        to_a = SendPacket(key_a.public, bytes(size)).pack()
        recv_len = HEADER_LEN + KEY_LEN + size
        for _ in range(20):  # warm up (and make sure both are registered)
            a.sendall(to_b)
            _read_exactly(b, recv_len)
            b.sendall(to_a)
            _read_exactly(a, recv_len)
        times = []
        for _ in range(pings):
            start = time.perf_counter_ns()
            a.sendall(to_b)
            _read_exactly(b, recv_len)
            b.sendall(to_a)
            _read_exactly(a, recv_len)
            times.append((time.perf_counter_ns() - start) / 1000)
        return times
    finally:
        a.close()
        b.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pings", type=int, default=2000, help="round trips per round")
    parser.add_argument("--size", type=int, default=100, help="packet bytes")
    parser.add_argument("--only", choices=("pywg", "derper"), help="one server only (profiling)")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["pywg", "derper"]
    medians: dict[str, list[float]] = {kind: [] for kind in kinds}
    p90s: dict[str, list[float]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="pywg-derp-ping-") as tmp:
        servers = {kind: start_server(kind, Path(tmp)) for kind in kinds}
        try:
            for _ in range(args.rounds):
                for kind, (_, port) in servers.items():
                    times = sorted(one_round(port, args.pings, args.size))
                    medians[kind].append(statistics.median(times))
                    p90s[kind].append(times[int(len(times) * 0.9)])
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(10)
    report: dict[str, object] = {
        kind: {"median_rtt_us": round(statistics.median(medians[kind]), 1),
               "round_medians_us": [round(x, 1) for x in medians[kind]],
               "median_p90_us": round(statistics.median(p90s[kind]), 1)}
        for kind in kinds}
    if len(kinds) == 2:
        report["ratio_pywg_over_derper"] = round(statistics.median(medians["pywg"])
                                                 / statistics.median(medians["derper"]), 3)
    report["packet_bytes"] = args.size
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
