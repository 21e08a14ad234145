"""The coordinator scale benchmark (control plane only): real ``pywg coordinator serve``
processes, simulated agents in ``--clients`` processes (asyncio clients: register, then one watch
WebSocket each, spread round-robin over the replicas).

    python -m bench.coordinator_load --agents 1000 10000 [--store sqlite|postgresql]
                                     [--replicas N] [--changes 5] [--clients 1]

``--store postgresql`` starts a private PostgreSQL (Debian's server, as the tests do) and
N replicas (default 2) on one database; ``sqlite`` runs one coordinator. For each agent
count it prints registrations per second (64 in flight), the latency from one change (an
endpoint update through replica 0) to its arrival at every agent (p50/p99, agents of
every replica), and the servers' resident memory per connected agent (RSS delta /
agents). The clients share the 2 cores with the servers, so latencies include their own
time to read 10,000 messages. Not part of ``make bench`` (minutes, and fds: the file
limit is raised to what the hard limit allows).

Where the cores go during registration: the CPU seconds the replicas, PostgreSQL (the
postmaster and its backends) and the client processes used in that phase, beside its
wall time. ``--rounds N`` repeats everything N times, the stores alternating within a
round (``--store sqlite postgresql``), and prints each figure's median at the end.
PostgreSQL's port and data directory follow ``PYWG_PG_PORTS`` / ``PYWG_PG_DIR`` (see
tests/postgres_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp

from pywg.manage.key import Key

CLI = [sys.executable, "-m", "pywg.cli", "coordinator"]
IN_FLIGHT = 64


def raise_fd_limit(want: int) -> int:
    """Raise RLIMIT_NOFILE (for this process and the servers it starts) to ``want`` if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard) if os.geteuid() == 0 else min(want, hard),
                                                         max(want, hard) if os.geteuid() == 0 else hard))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """The CPU seconds (user + system) process ``pid`` used so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family(pid: int) -> list[int]:
    """``pid`` and its children (a postmaster and its backends)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return [pid, *kids]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


class Agents:
    """One client process's share of the simulated agents, driven by commands over a pipe."""

    def __init__(self, conn: Connection, urls: list[str], key: str, indices: range, in_flight: int) -> None:
        self.conn, self.urls, self.key, self.indices = conn, urls, key, indices
        self.gate = asyncio.Semaphore(in_flight)
        self.nodes: list[tuple[str, str, int]] = []
        self.watchers: list[aiohttp.ClientWebSocketResponse] = []

    async def command(self) -> tuple:  # type: ignore[type-arg]
        return await asyncio.get_running_loop().run_in_executor(None, self.conn.recv)  # type: ignore[no-any-return]

    async def register(self, session: aiohttp.ClientSession, i: int) -> tuple[str, str, int]:
        body = {"authKey": self.key, "name": f"n{i}", "publicKey": Key.generate_private().public_key().to_base64(),
                "endpoints": [f"198.51.100.1:{1 + i % 60000}"]}
        async with self.gate, session.post(self.urls[i % len(self.urls)] + "/api/v1/register", json=body) as r:
            answer = await r.json()
            assert r.status == 201, answer
            return answer["id"], answer["token"], answer["revision"]

    async def connect(self, session: aiohttp.ClientSession, i: int, node: tuple[str, str, int],
                      head: int) -> aiohttp.ClientWebSocketResponse:
        async with self.gate:
            return await session.ws_connect(f"{self.urls[i % len(self.urls)].replace('http', 'ws', 1)}/api/v1/watch",
                                            params={"since": str(head)}, heartbeat=None,
                                            headers={"Authorization": f"Bearer {node[1]}"})

    @staticmethod
    async def arrival(ws: aiohttp.ClientWebSocketResponse, node_id: str) -> float:
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        assert data["type"] == "change" and data["nodeId"] == node_id, data
        return time.monotonic()  # system-wide: comparable with the driver's clock

    async def run(self) -> None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                        timeout=aiohttp.ClientTimeout(total=120))
        try:
            while True:
                cmd = await self.command()
                if cmd[0] == "register":
                    t = time.monotonic()
                    self.nodes = list(await asyncio.gather(*(self.register(session, i) for i in self.indices)))
                    self.conn.send((t, time.monotonic(), max(n[2] for n in self.nodes), self.nodes[0][:2]))
                elif cmd[0] == "connect":
                    self.watchers = list(await asyncio.gather(
                        *(self.connect(session, i, n, cmd[1]) for i, n in zip(self.indices, self.nodes, strict=True))))
                    self.conn.send(rss_kib(os.getpid()))
                elif cmd[0] == "arm":
                    arrivals = [asyncio.ensure_future(self.arrival(w, cmd[1])) for w in self.watchers]
                    await asyncio.sleep(0.1)  # every reader waits before the change is made
                    self.conn.send("armed")
                    self.conn.send(await asyncio.gather(*arrivals))
                else:
                    return
        finally:
            await asyncio.gather(*(w.close() for w in self.watchers), return_exceptions=True)
            await session.close()


def client_process(conn: Connection, urls: list[str], key: str, indices: range, in_flight: int) -> None:
    asyncio.run(Agents(conn, urls, key, indices, in_flight).run())


def simulate(urls: list[str], key: str, pids: list[int], n: int, n_changes: int, n_clients: int,
             db_pid: int | None = None) -> dict[str, float]:
    """Drive ``n_clients`` client processes holding ``n`` agents between them (``db_pid``: the
    PostgreSQL postmaster, for its CPU time)."""
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for k in range(n_clients):
        mine, theirs = ctx.Pipe()
        procs.append(ctx.Process(target=client_process, daemon=True,
                                 args=(theirs, urls, key, range(k, n, n_clients), max(1, IN_FLIGHT // n_clients))))
        procs[-1].start()
        pipes.append(mine)
    result: dict[str, float] = {"agents": n, "replicas": len(urls), "client_processes": n_clients}
    try:
        groups = {"replicas": pids, "postgres": family(db_pid) if db_pid else [],
                  "clients": [proc.pid for proc in procs if proc.pid is not None]}
        cpu_before = {g: sum(cpu_s(p) for p in ps) for g, ps in groups.items()}
        for p in pipes:
            p.send(("register",))
        answers = [p.recv() for p in pipes]
        dt = max(a[1] for a in answers) - min(a[0] for a in answers)
        result["registrations_per_s"] = n / dt
        print(f"  registrations: {n} in {dt:.2f} s = {n / dt:.0f}/s ({IN_FLIGHT} in flight)", flush=True)
        for g, ps in groups.items():
            if ps:
                result[f"register_cpu_{g}_s"] = sum(cpu_s(p) for p in ps) - cpu_before[g]
        print("  CPU while registering: " + ", ".join(
            f"{g} {result[f'register_cpu_{g}_s']:.2f} s" for g in groups if f"register_cpu_{g}_s" in result)
            + f" (wall {dt:.2f} s, 2 cores: {2 * dt:.2f} CPU s)", flush=True)
        head = max(a[2] for a in answers)
        node_id, token = answers[0][3]
        before = sum(rss_kib(p) for p in pids)
        t = time.monotonic()
        for p in pipes:
            p.send(("connect", head))
        client_kib = sum(p.recv() for p in pipes)
        dt = time.monotonic() - t
        result["connect_s"] = dt
        print(f"  watchers: {n} connected in {dt:.2f} s", flush=True)
        time.sleep(1.0)
        result["server_kib_per_agent"] = (sum(rss_kib(p) for p in pids) - before) / n
        result["client_mib"] = client_kib / 1024
        latencies: list[float] = []
        for round_ in range(n_changes):
            for p in pipes:
                p.send(("arm", node_id))
            for p in pipes:
                assert p.recv() == "armed"
            sent = time.monotonic()
            req = urllib.request.Request(f"{urls[0]}/api/v1/nodes/{node_id}/endpoints", method="PUT",
                                         data=json.dumps({"endpoints": [f"192.0.2.1:{1000 + round_}"]}).encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
            for p in pipes:
                latencies.extend(t - sent for t in p.recv())
            time.sleep(0.5)
        latencies.sort()
        result["push_p50_ms"] = percentile(latencies, 0.50) * 1000
        result["push_p99_ms"] = percentile(latencies, 0.99) * 1000
        result["push_max_ms"] = latencies[-1] * 1000
        print(f"  push to {n} agents: p50 {result['push_p50_ms']:.0f} ms, p99 {result['push_p99_ms']:.0f} ms, "
              f"max {result['push_max_ms']:.0f} ms ({n_changes} changes)", flush=True)
        print(f"  server memory per connected agent: {result['server_kib_per_agent']:.1f} KiB "
              f"(client processes {result['client_mib']:.0f} MiB)", flush=True)
    finally:
        for p in pipes:
            with contextlib.suppress(OSError):
                p.send(("stop",))
        for proc in procs:
            proc.join(30)
    return result


@contextlib.contextmanager
def postgres() -> Iterator[tuple[str, int]]:
    """A private PostgreSQL: a database's URL and the postmaster's pid."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from postgres_server import postgres_server  # type: ignore[import-not-found]  # tests/: a private initdb

    with postgres_server() as pg:
        yield pg.database(), pg.proc.pid


@contextlib.contextmanager
def coordinators(store: str, n: int, tmp: str) -> Iterator[tuple[list[str], list[int]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        urls = []
        for r in range(n):
            log = open(os.path.join(tmp, f"replica{r}.log"), "w")  # noqa: SIM115
            procs.append(subprocess.Popen([*CLI, "serve", "--listen", "127.0.0.1:0", "--store", store,
                                           "--prefix4", "100.64.0.0/10", "--prefix6", "fd00:5c::/48",
                                           "--limit-per-address", "1e9", "--limit-per-key", "1e9"],
                                          stdout=subprocess.PIPE, stderr=log, text=True))
            assert procs[-1].stdout is not None
            line = procs[-1].stdout.readline()
            if "listening on " not in line:
                raise RuntimeError(f"replica {r} did not start: {Path(log.name).read_text()[-2000:]}")
            urls.append(line.split("listening on ")[1].split()[0])
        yield urls, [p.pid for p in procs]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def one_run(store_kind: str, replicas: int, n: int, n_changes: int, n_clients: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        db_pid = None
        if store_kind == "postgresql":
            store, db_pid = stack.enter_context(postgres())
        else:
            store = f"sqlite:{tmp}/c.db"
        key = subprocess.run([*CLI, "authkey", "create", "--reusable", "--store", store],
                             check=True, capture_output=True, text=True).stdout.strip()
        urls, pids = stack.enter_context(coordinators(store, replicas, tmp))
        return simulate(urls, key, pids, n, n_changes, n_clients, db_pid)


FIGURES = ("registrations_per_s", "push_p50_ms", "push_p99_ms", "server_kib_per_agent",
           "register_cpu_replicas_s", "register_cpu_postgres_s", "register_cpu_clients_s")


def print_medians(results: list[dict[str, float | str]]) -> None:
    """Each figure's median over the rounds, per store and agent count."""
    print("medians:", flush=True)
    for store, n in dict.fromkeys((str(r["store"]), int(r["agents"])) for r in results):
        runs = [r for r in results if r["store"] == store and r["agents"] == n]
        figures = ", ".join(
            f"{name} {median([float(r[name]) for r in runs]):.1f} "
            f"({' / '.join(f'{float(r[name]):.1f}' for r in runs)})"
            for name in FIGURES if all(name in r for r in runs))
        print(f"  {store}, {n} agents, {len(runs)} runs: {figures}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--store", choices=("sqlite", "postgresql"), nargs="+", default=["sqlite"],
                        help="one or more: they alternate within each round")
    parser.add_argument("--replicas", type=int, help="PostgreSQL's coordinators (default 2; SQLite has 1)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every run N times (default 1)")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1, help="client processes sharing the agents (default 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON lines to FILE")
    args = parser.parse_args()
    if args.replicas is not None and args.replicas < 1:
        parser.error("--replicas: at least 1")
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    limit = raise_fd_limit(max(args.agents) + 1024)  # per process: one socket per agent
    print(f"fd limit {limit}; stores {' '.join(args.store)}, {args.rounds} round(s)", flush=True)
    results: list[dict[str, float | str]] = []
    for round_ in range(1, args.rounds + 1):
        for store in args.store:
            replicas = 1 if store == "sqlite" else args.replicas or 2
            for n in args.agents:
                print(f"round {round_}, {store} ({replicas} coordinator process(es)), {n} agents:", flush=True)
                result: dict[str, float | str] = {"store": store, "round": round_,
                                                  **one_run(store, replicas, n, args.changes, args.clients)}
                results.append(result)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(result) + "\n")
    if args.rounds > 1 or len(args.store) > 1:
        print_medians(results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
