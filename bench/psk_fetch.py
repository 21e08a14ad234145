"""What per-pair preshared keys cost the coordinator: a real ``pywg coordinator serve
--preshared-keys`` (SQLite) with N registered nodes, asked over HTTP as agents ask.

    python -m bench.psk_fetch [--nodes 1000] [--in-flight 64]

Prints: one node fetching the keys of all its N-1 peers (batches of 512, as an agent that
starts does); the latency of a one-peer request (a node joined: each agent asks once);
N agents reconnecting at once (each probes with an empty list); and N agents fetching
every key at once (what a new secret costs). Shares the machine's cores with the client.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from pywg.manage.key import Key
from pywg.mesh import psk


async def _nodes(session: aiohttp.ClientSession, url: str, authkey: str, n: int) -> list[dict]:
    async def one(i: int) -> dict:
        public = Key.generate_private().public_key().to_base64()
        async with session.post(f"{url}/api/v1/register", json={"name": f"n{i}", "publicKey": public},
                                headers={"Authorization": f"Bearer {authkey}"}) as resp:
            assert resp.status == 201, await resp.text()
            return {**await resp.json(), "publicKey": public}
    out = []
    for start in range(0, n, 64):
        out += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 64))))
    return out


async def _ask(session: aiohttp.ClientSession, url: str, node: dict, peers: list[dict]) -> None:
    for start in range(0, max(1, len(peers)), psk.MAX_PEERS):
        body = {"peers": [{"nodeId": p["id"], "publicKey": p["publicKey"]} for p in peers[start:start + psk.MAX_PEERS]]}
        async with session.post(f"{url}/api/v1/nodes/{node['id']}/preshared-keys", json=body,
                                headers={"Authorization": f"Bearer {node['token']}"}) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()


async def _all(session: aiohttp.ClientSession, url: str, nodes: list[dict], every_key: bool, limit: int) -> float:
    gate = asyncio.Semaphore(limit)

    async def one(node: dict) -> None:
        async with gate:
            await _ask(session, url, node, [p for p in nodes if p is not node] if every_key else [])
    t0 = time.perf_counter()
    await asyncio.gather(*(one(n) for n in nodes))
    return time.perf_counter() - t0


async def _run(url: str, authkey: str, n: int, limit: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit)) as session:
        nodes = await _nodes(session, url, authkey, n)
        a, peers = nodes[0], nodes[1:]
        t0 = time.perf_counter()
        await _ask(session, url, a, peers)
        print(f"one node, all {len(peers)} peers' keys: {(time.perf_counter() - t0) * 1000:.1f} ms")
        times = []
        for p in peers[:200]:
            t0 = time.perf_counter()
            await _ask(session, url, a, [p])
            times.append(time.perf_counter() - t0)
        print(f"one peer's key: p50 {statistics.median(times) * 1000:.2f} ms, "
              f"p99 {sorted(times)[int(len(times) * 0.99)] * 1000:.2f} ms")
        took = await _all(session, url, nodes, False, limit)
        print(f"{n} agents reconnecting (a probe each): {took:.2f} s, {n / took:.0f} requests/s")
        took = await _all(session, url, nodes, True, limit)
        print(f"{n} agents fetching every key (a new secret): {took:.2f} s ({n * (n - 1)} keys)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=64)
    args = ap.parse_args()
    pywg = str(Path(sys.executable).parent / "pywg")
    with tempfile.TemporaryDirectory() as d:
        store = f"sqlite:{d}/c.db"
        psk.create_secret_file(f"{d}/psk.secret")
        authkey = subprocess.run([pywg, "coordinator", "authkey", "create", "--store", store, "--reusable"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        log = open(f"{d}/serve.log", "w+")  # noqa: SIM115
        serve = subprocess.Popen([pywg, "coordinator", "serve", "--listen", "127.0.0.1:0", "--store", store,
                                  "--preshared-keys", f"{d}/psk.secret", "--limit-per-address", "100000:100000",
                                  "--limit-per-key", "100000:100000"],
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while "listening on" not in Path(f"{d}/serve.log").read_text():
                if time.monotonic() > deadline or serve.poll() is not None:
                    raise SystemExit(Path(f"{d}/serve.log").read_text())
                time.sleep(0.05)
            url = Path(f"{d}/serve.log").read_text().split("listening on ")[1].split()[0]
            asyncio.run(_run(url, authkey, args.nodes, args.in_flight))
        finally:
            serve.terminate()
            serve.wait(10)


if __name__ == "__main__":
    main()
