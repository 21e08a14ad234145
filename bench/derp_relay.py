"""Packets per second relayed between two clients through ``pywg derp serve`` and through
Tailscale's derper 1.102.3, in the same run, alternating rounds; medians reported.

Both servers run as processes on loopback (plain HTTP). Each round: client A blasts
pre-framed SendPackets of ``--size`` bytes to B for ``--seconds``; B counts the RecvPacket
bytes it gets (the servers drop what B's queue cannot hold, so this is delivered rate).
The clients are hand-driven sockets (pywg's sans-I/O DerpClient for the handshake), so the
client side costs the same for both servers.

    flock /tmp/pywg-heavy.lock .venv/bin/python bench/derp_relay.py --rounds 5
    flock /tmp/pywg-heavy.lock .venv/bin/python bench/derp_relay.py --clients 1000 --rounds 3

With ``--clients N`` each round connects N clients (N/2 pairs) to each server in turn: the
server's RSS growth divided by N is the memory per client, and then every sender writes
batches of 16 packets to its partner for ``--seconds`` while the receivers count what
arrives: the aggregate packets per second the server relayed among N concurrent clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pywg.derp import DerpClient, NodePrivateKey, build_upgrade_request
from pywg.derp.frames import SendPacket
from pywg.testing.netns import PEERS_DIR

DERPER = PEERS_DIR / "derper-1.102.3" / "bin" / "derper"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(kind: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A relay process of ``kind`` ("pywg" or "derper") and its port, once it accepts."""
    config = workdir / f"{kind}.json"
    config.write_text(json.dumps({"PrivateKey": NodePrivateKey.generate().private_text()}))
    config.chmod(0o600)
    port = _free_port()
    if kind == "derper":
        argv = [str(DERPER), "-a", f"127.0.0.1:{port}", "-c", str(config), "-stun=false", "-http-port", "-1"]
    else:
        argv = [str(Path(sys.executable).with_name("pywg")), "derp", "serve", "--listen", f"127.0.0.1:{port}",
                "--config", str(config),
                "--client-rate", "0"]  # unlimited, as derper is by default: the relay's own capacity
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start")
        time.sleep(0.05)


async def _connect(port: int, key: NodePrivateKey) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(build_upgrade_request(f"127.0.0.1:{port}"))
    await reader.readuntil(b"\r\n\r\n")
    client = DerpClient(key)
    client.receive_data(await reader.readexactly(5 + 8 + 32), 0.0)
    writer.write(client.data_to_send())
    await writer.drain()
    return reader, writer


class _Flow:
    """Senders writing flat out and receivers counting bytes, until ``stop``."""

    def __init__(self) -> None:
        self.received = 0
        self.stopped = False

    async def receive(self, reader: asyncio.StreamReader, read_size: int) -> None:
        while not self.stopped:
            data = await reader.read(read_size)
            if not data:
                return
            self.received += len(data)

    async def send(self, writer: asyncio.StreamWriter, chunk: bytes) -> None:
        while not self.stopped:
            writer.write(chunk)
            await writer.drain()

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        self.stopped = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def one_round(port: int, size: int, seconds: float) -> float:
    """Packets per second B received from A during ``seconds`` of A sending flat out."""
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()
    _, wa = await _connect(port, key_a)
    rb, wb = await _connect(port, key_b)
    await asyncio.sleep(0.2)  # both registered
    frame_len = 5 + 32 + size
    chunk = SendPacket(key_b.public, bytes(size)).pack() * 64
    flow = _Flow()
    receiver = asyncio.create_task(flow.receive(rb, 1 << 20))
    await asyncio.sleep(0.1)
    start_bytes = flow.received
    sender = asyncio.create_task(flow.send(wa, chunk))
    await asyncio.sleep(seconds)
    end_bytes = flow.received
    await flow.stop([sender, receiver])
    for writer in (wa, wb):
        writer.close()
    # Subtract the handshake frames (ServerInfo etc.) B got before the sender started.
    return (end_bytes - start_bytes) / frame_len / seconds


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def many_round(pid: int, port: int, clients: int, size: int, seconds: float) -> tuple[float, float]:
    """(aggregate packets/s relayed, KiB of server RSS per connected client) for ``clients``."""
    keys = [NodePrivateKey.generate() for _ in range(clients)]
    base = _rss_kib(pid)
    conns = []
    for i in range(0, clients, 50):  # in steps, well inside any accept limit
        conns += await asyncio.gather(*(_connect(port, k) for k in keys[i:i + 50]))
    await asyncio.sleep(1.0)
    per_client = (_rss_kib(pid) - base) / clients
    flow = _Flow()
    tasks = [asyncio.create_task(flow.receive(r, 1 << 16)) for r, _ in conns]
    await asyncio.sleep(0.3)
    start_bytes = flow.received
    chunks = [SendPacket(keys[i + 1].public, bytes(size)).pack() * 16 for i in range(0, clients - 1, 2)]
    tasks += [asyncio.create_task(flow.send(conns[i][1], chunk)) for i, chunk in zip(range(0, clients - 1, 2), chunks,
                                                                                      strict=True)]
    await asyncio.sleep(seconds)
    end_bytes = flow.received
    await flow.stop(tasks)
    for _, writer in conns:
        writer.close()
    await asyncio.sleep(0.5)
    return (end_bytes - start_bytes) / (5 + 32 + size) / seconds, per_client


def main_many(args: argparse.Namespace) -> int:
    results: dict[str, dict[str, list[float]]] = {k: {"pps": [], "kib_per_client": []} for k in ("pywg", "derper")}
    with tempfile.TemporaryDirectory(prefix="pywg-derp-bench-") as tmp:
        for _ in range(args.rounds):
            for kind in results:  # a fresh process each round: its RSS growth is all this round's
                process, port = start_server(kind, Path(tmp))
                try:
                    pps, kib = asyncio.run(many_round(process.pid, port, args.clients, args.size, args.seconds))
                finally:
                    process.terminate()
                    process.wait(10)
                results[kind]["pps"].append(pps)
                results[kind]["kib_per_client"].append(kib)
    report: dict[str, object] = {
        kind: {"median_pps": round(statistics.median(v["pps"])), "pps_rounds": [round(x) for x in v["pps"]],
               "median_kib_per_client": round(statistics.median(v["kib_per_client"]), 1),
               "kib_per_client_rounds": [round(x, 1) for x in v["kib_per_client"]]}
        for kind, v in results.items()}
    report["clients"] = args.clients
    report["packet_bytes"] = args.size
    print(json.dumps(report, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=1200, help="packet bytes")
    parser.add_argument("--clients", type=int, default=0, help="N concurrent clients in N/2 pairs (0: one pair)")
    args = parser.parse_args()
    if args.clients:
        return main_many(args)
    results: dict[str, list[float]] = {"pywg": [], "derper": []}
    with tempfile.TemporaryDirectory(prefix="pywg-derp-bench-") as tmp:
        servers = {kind: start_server(kind, Path(tmp)) for kind in results}
        try:
            for _ in range(args.rounds):
                for kind, (_, port) in servers.items():
                    results[kind].append(asyncio.run(one_round(port, args.size, args.seconds)))
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(10)
    report = {kind: {"median_pps": round(statistics.median(v)), "rounds": [round(x) for x in v]}
              for kind, v in results.items()}
    report["ratio_pywg_over_derper"] = round(report["pywg"]["median_pps"] / report["derper"]["median_pps"], 3)
    report["packet_bytes"] = args.size
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
