"""A quick control-plane load run: a real ``pywg coordinator serve`` process on SQLite,
simulated agents in this process (registrations, then WebSocket watchers).

    python -m bench.coordinator_load [--registrations 2000] [--watchers 500] [--changes 5]

Prints registrations per second, the latency from one change (an endpoint update) to
its arrival at every watcher (p50/p99), and the server's resident memory per connected
watcher. Not part of ``make bench``: the scale benchmark (1,000 and 10,000 agents,
PostgreSQL replicas) comes with the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import aiohttp

from pywg.manage.key import Key


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def run(url: str, key: str, pid: int, n_reg: int, n_watch: int, n_changes: int) -> None:
    """Agents resume their watch by revision (no snapshot), as after a registration."""
    pubs = [Key.generate_private().public_key().to_base64() for _ in range(n_reg)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        async def register(i: int) -> tuple[str, str, int]:
            body = {"authKey": key, "name": f"n{i}", "publicKey": pubs[i]}
            async with s.post(url + "/api/v1/register", json=body) as r:
                answer = await r.json()
                assert r.status == 201, answer
                return answer["id"], answer["token"], answer["revision"]

        t = time.perf_counter()
        nodes = await asyncio.gather(*(register(i) for i in range(n_reg)))
        dt = time.perf_counter() - t
        print(f"registrations: {n_reg} in {dt:.2f} s = {n_reg / dt:.0f}/s (64 in flight)")

    before = rss_kib(pid)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    head = max(n[2] for n in nodes)
    try:
        gate = asyncio.Semaphore(32)

        async def connect(i: int) -> aiohttp.ClientWebSocketResponse:
            async with gate:
                return await session.ws_connect(f"{url.replace('http', 'ws', 1)}/api/v1/watch?since={head}",
                                                headers={"Authorization": f"Bearer {nodes[i % n_reg][1]}"})

        t = time.perf_counter()
        watchers = await asyncio.gather(*(connect(i) for i in range(n_watch)))
        print(f"watchers: {n_watch} connected in {time.perf_counter() - t:.2f} s")
        await asyncio.sleep(0.5)
        per_watcher = (rss_kib(pid) - before) / max(1, n_watch)
        latencies: list[float] = []
        node_id, token, _ = nodes[0]
        for round_ in range(n_changes):
            t0 = time.perf_counter()
            body = {"endpoints": [f"192.0.2.1:{1000 + round_}"]}
            async with session.put(f"{url}/api/v1/nodes/{node_id}/endpoints", json=body,
                                   headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200

            async def arrival(ws: aiohttp.ClientWebSocketResponse, sent: float) -> float:
                msg = json.loads((await ws.receive()).data)
                assert msg["kind"] in ("node.changed",), msg
                return time.perf_counter() - sent

            latencies.extend(await asyncio.gather(*(arrival(w, t0) for w in watchers)))
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
        print(f"push to {n_watch} watchers: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({n_changes} changes)")
        print(f"server memory per connected watcher: {per_watcher:.1f} KiB")
        for ws in watchers:
            await ws.close()
    finally:
        await session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registrations", type=int, default=2000)
    parser.add_argument("--watchers", type=int, default=500)
    parser.add_argument("--changes", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:{tmp}/c.db"
        cli = [sys.executable, "-m", "pywg.cli", "coordinator"]
        key = subprocess.run([*cli, "authkey", "create", "--reusable", "--store", store],
                             check=True, capture_output=True, text=True).stdout.strip()
        serve = subprocess.Popen([*cli, "serve", "--listen", "127.0.0.1:0", "--store", store,
                                  "--limit-per-address", "1e9", "--limit-per-key", "1e9"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert serve.stdout is not None
            url = serve.stdout.readline().split("listening on ")[1].split()[0]
            asyncio.run(run(url, key, serve.pid, args.registrations, args.watchers, args.changes))
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(10)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
