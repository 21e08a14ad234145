"""pywg's daemon against the real peers on the namespace bed (root, Linux): throughput,
latency and CPU cost of the same tunnel, the same tools, in the same run.

    .venv/bin/python -m bench.bed                      # 3 rounds of 5 s runs, table on stdout
    .venv/bin/python -m bench.bed --write-results      # and update bench/RESULTS.md
    python bench/bed.py --rounds 5 --seconds 10

Each round builds, for each implementation, a fresh bed (namespaces A and B joined by a
veth pair) with that implementation's daemon on both sides, configured with the stock
``wg``, and measures through the tunnel, A -> B:

- ping RTT: 200 echo requests at 10 ms intervals after a 20-ping warm-up; p50 and p99
  (nearest rank) of the per-packet times ``ping`` prints;
- TCP: ``iperf3 -J``, receiver throughput; one stream, then four (``-P 4``);
- CPU: utime + stime of both daemon processes (/proc/PID/stat) over the TCP run, per GB
  received; also as busy cores (CPU seconds / wall seconds of the run);
- UDP: ``iperf3 -u -b 0`` (no rate limit) with datagrams sized to fill the tunnel MTU
  without fragmenting; receiver throughput and loss.

Implementations, each on both sides: pywg (its C extensions in use), pywg-python (the same
daemon on its pure-Python fallback, PYWG_PUREPYTHON=1), wireguard-go 0.0.20250522,
boringtun 0.7.1 and Debian's wireguard-go 0.0.20220316 (``make peers`` builds the pinned
ones); and the mixed pairs, pywg facing each peer both ways ("pywg>boringtun": pywg on A,
the sender). The order alternates from round to round (reversed in even rounds), so a
drift of the machine's speed does not favour one of them. Figures are medians over
rounds; the ratio column is pywg / the best peer on that figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.testing.netns import (
    IMPLEMENTATIONS,
    PEER_IMPLEMENTATIONS,
    REQUIRED_TOOLS,
    Bed,
    BedUnavailable,
    Daemon,
    check_bed,
    check_implementation,
    ping,
    run,
)
from pywg.testing.tunnel import Side, b64, connect

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Namespace bed: pywg vs the real peers"
OLD_SECTIONS = ("## Namespace bed: pywg vs wireguard-go",)  # replaced by SECTION
PEERS = PEER_IMPLEMENTATIONS  # wireguard-go-2025, boringtun, wireguard-go (Debian's 2022)
MIXED = tuple(pair for peer in PEERS for pair in (f"pywg>{peer}", f"{peer}>pywg"))
IMPLS = ("pywg", "pywg-python", *PEERS, *MIXED)
LABELS = {"wireguard-go": "wireguard-go 2022", "wireguard-go-2025": "wireguard-go 2025",
          "boringtun": "boringtun"}
# "X>Y": X on side A (the sender of the TCP and UDP runs, the pinger), Y on side B.
# pywg-python: the same pywg daemon on its pure-Python fallback (no C extension used).
DAEMON_ENV = {"pywg-python": {"PYWG_PUREPYTHON": "1"}}
# pywg logs handshakes at info and every dropped packet at debug: info keeps the log useful
# without timing the logging. wireguard-go knows no "info" and falls back to errors only;
# boringtun logs handshakes at info.
LOG_LEVEL = "info"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PING_COUNT, PING_INTERVAL, PING_WARMUP = 200, 0.01, 20
IPV4_UDP_HEADERS = 28


class BenchError(RuntimeError):
    """A measurement failed (a tool reported an error, or a daemon died or stalled)."""


# --- the bed ----------------------------------------------------------------------------


def make_side(bed: Bed, ns: str, impl: str, index: int) -> Side:
    """As pywg.testing.tunnel.make_side, but with the daemon's LOG_LEVEL chosen here."""
    private = dh_generate()
    port = 51820 + index
    tunnel4, tunnel6 = f"10.202.0.{index}", f"fd02::{index}"
    pywg = impl.startswith("pywg")
    ifname = bed.unique_ifname("pw" if pywg else "wg")
    daemon = bed.start_daemon(ns, ifname, "pywg" if pywg else impl, log_level=LOG_LEVEL,
                              env=DAEMON_ENV.get(impl))
    key_file = bed.secret_file(f"{ifname}.key", b64(private))
    daemon.wg("set", ifname, "private-key", str(key_file), "listen-port", str(port))
    run("ip", "addr", "add", f"{tunnel4}/24", "dev", ifname, ns=ns)
    run("ip", "addr", "add", f"{tunnel6}/64", "dev", ifname, "nodad", ns=ns)
    run("ip", "link", "set", ifname, "up", ns=ns)
    return Side(daemon, ns, b64(private), b64(dh_pubkey(private)), port, tunnel4, tunnel6)


def check_daemon_pid(daemon: Daemon) -> None:
    """``ip netns exec`` execs: the Popen pid must be the daemon itself, alone in its
    namespace and without children, or its /proc/PID/stat would not hold its CPU time."""
    pid = daemon.process.pid
    exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if daemon.impl == "pywg":
        ok = exe.startswith("python") and b"pywg.cli" in cmdline
    else:
        ok = exe == os.path.basename(IMPLEMENTATIONS[daemon.impl].binary)
    if not ok:
        raise BenchError(f"pid {pid} is {exe} {cmdline!r}, not the {daemon.impl} daemon")
    children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    if children:
        raise BenchError(f"the {daemon.impl} daemon (pid {pid}) has children {children}")
    pids = run("ip", "netns", "pids", daemon.ns).split()
    if pids != [str(pid)]:
        raise BenchError(f"namespace {daemon.ns} holds pids {pids}, expected only {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15


def tunnel_mtu(side: Side) -> int:
    match = re.search(r"\bmtu (\d+)", run("ip", "-o", "link", "show", side.ifname, ns=side.ns))
    if match is None:
        raise BenchError(f"no MTU for {side.ifname}")
    return int(match.group(1))


def alive(sides: tuple[Side, Side]) -> None:
    for side in sides:
        code = side.daemon.process.poll()
        if code is not None:
            raise BenchError(f"the {side.daemon.impl} daemon on {side.ifname} exited with status {code}")


# --- measurements -------------------------------------------------------------------------


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ping_rtts(a: Side, b: Side) -> tuple[list[float], int]:
    """Per-packet RTTs (ms) of PING_COUNT pings A -> B after a warm-up; and how many were lost."""
    ping(a.ns, b.tunnel4, count=PING_WARMUP, interval=PING_INTERVAL, wait=2)
    out = run("ping", "-n", "-c", str(PING_COUNT), "-i", str(PING_INTERVAL), "-W", "1", b.tunnel4,
              ns=a.ns, check=False, timeout=PING_COUNT * PING_INTERVAL + 30)
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    if not times:
        raise BenchError(f"no ping reply: {out.strip()[-300:]}")
    return times, PING_COUNT - len(times)


def iperf3(a: Side, b: Side, seconds: int, *extra: str) -> dict[str, Any]:
    """One iperf3 run from A to B's tunnel address; its JSON result. Raises BenchError with
    iperf3's own error, or when it does not finish in time (a stalled tunnel)."""
    server = subprocess.Popen(["ip", "netns", "exec", b.ns, "iperf3", "-s", "-1", "-B", b.tunnel4],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            argv = ["ip", "netns", "exec", a.ns, "iperf3", "-c", b.tunnel4, "-t", str(seconds), "-J", *extra]
            try:
                done = subprocess.run(argv, capture_output=True, check=False, timeout=seconds + 30)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"iperf3 {' '.join(extra)} did not finish within {seconds + 30} s") from exc
            try:
                result: dict[str, Any] = json.loads(done.stdout or b"{}")
            except json.JSONDecodeError as exc:
                raise BenchError(f"iperf3 printed no JSON (status {done.returncode}): "
                                 f"{done.stdout[-300:]!r} {done.stderr[-300:]!r}") from exc
            error = str(result.get("error", ""))
            if done.returncode == 0 and not error:
                return result
            if "unable to connect" not in error:
                raise BenchError(f"iperf3 {' '.join(extra)} failed (status {done.returncode}): {error}")
            time.sleep(0.1)
        raise BenchError("the iperf3 server never listened")
    finally:
        server.kill()
        server.wait()


@dataclass
class Run:
    """One implementation in one round: its figures, and what went wrong."""

    impl: str
    round: int
    figures: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


FIGURES = [  # key, label, format
    ("tcp_mbps", "TCP throughput A->B, receiver (Mbit/s)", "{:,.0f}"),
    ("tcp4_mbps", "TCP, 4 streams (-P 4), receiver (Mbit/s)", "{:,.0f}"),
    ("udp_mbps", "UDP throughput A->B, receiver (Mbit/s)", "{:,.0f}"),
    ("udp_loss", "UDP loss (%)", "{:.1f}"),
    ("rtt_p50", "ping RTT p50 (ms)", "{:.3f}"),
    ("rtt_p99", "ping RTT p99 (ms)", "{:.3f}"),
    ("cpu_per_gb", "daemon CPU per GB, TCP run (CPU s/GB, both daemons)", "{:.2f}"),
    ("cpu_cores", "daemon CPU during the TCP run (cores busy, both daemons)", "{:.2f}"),
]


def measure(impl: str, round_: int, seconds: int, udp_bitrate: str) -> Run:
    """A fresh bed with ``impl`` on both sides (or "X>Y": X on A, Y on B); every figure it
    can get, problems recorded."""
    result = Run(impl, round_)
    impl_a, _, impl_b = impl.partition(">")
    with Bed() as bed:
        try:
            a, b = make_side(bed, bed.ns_a, impl_a, 1), make_side(bed, bed.ns_b, impl_b or impl_a, 2)
            connect(bed, a, b)
            sides = (a, b)
            for side in sides:
                check_daemon_pid(side.daemon)
            ping(a.ns, b.tunnel4, wait=5)  # the handshake
        except (BenchError, RuntimeError, OSError) as exc:
            result.problems.append(f"setup: {exc}")
            collect_logs(bed, result)
            return result

        def step(name: str, fn: Any) -> None:
            try:
                fn()
                alive(sides)
            except (BenchError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                result.problems.append(f"{name}: {exc}")

        def do_ping() -> None:
            times, lost = ping_rtts(a, b)
            result.figures["rtt_p50"] = nearest_rank(times, 0.50)
            result.figures["rtt_p99"] = nearest_rank(times, 0.99)
            if lost:
                result.problems.append(f"ping: {lost} of {PING_COUNT} lost")

        def do_tcp() -> None:
            pids = [side.daemon.process.pid for side in sides]
            cpu0, wall0 = sum(map(cpu_seconds, pids)), time.monotonic()
            out = iperf3(a, b, seconds)
            cpu, wall = sum(map(cpu_seconds, pids)) - cpu0, time.monotonic() - wall0
            received = out["end"]["sum_received"]
            result.figures["tcp_mbps"] = received["bits_per_second"] / 1e6
            result.figures["cpu_per_gb"] = cpu / (received["bytes"] / 1e9)
            result.figures["cpu_cores"] = cpu / wall
            result.figures["tcp_retransmits"] = out["end"]["sum_sent"].get("retransmits", 0)

        def do_tcp4() -> None:
            out = iperf3(a, b, seconds, "-P", "4")
            result.figures["tcp4_mbps"] = out["end"]["sum_received"]["bits_per_second"] / 1e6

        def do_udp() -> None:
            size = min(tunnel_mtu(a), tunnel_mtu(b)) - IPV4_UDP_HEADERS
            out = iperf3(a, b, seconds, "-u", "-b", udp_bitrate, "-l", str(size))
            end = out["end"]
            received = end.get("sum_received") or end["sum"]
            result.figures["udp_mbps"] = received["bits_per_second"] / 1e6
            summary = end["sum"]  # the server's count of lost datagrams
            result.figures["udp_loss"] = summary["lost_percent"]
            result.figures["udp_datagram"] = size

        step("ping", do_ping)
        step("tcp", do_tcp)
        step("tcp4", do_tcp4)
        step("udp", do_udp)
        if "pywg" in impl:
            result.figures.update(pywg_drops(sides))
        if result.problems:
            collect_logs(bed, result)
    return result


def pywg_drops(sides: tuple[Side, Side]) -> dict[str, float]:
    """The pywg daemons' own drop counters (device + engine), summed over both sides."""
    from pywg.device.stats_server import read_stats

    totals: dict[str, float] = {}
    for side in sides:
        try:
            stats = read_stats(side.ifname)
        except OSError:
            continue
        for kind in ("device_drops", "engine_drops"):
            counters = stats.get(kind)
            if isinstance(counters, dict):
                for reason, n in counters.items():
                    totals[f"drop:{reason}"] = totals.get(f"drop:{reason}", 0) + n
    return totals


def collect_logs(bed: Bed, result: Run) -> None:
    for daemon in bed.processes:
        log = daemon.log().strip()
        tail = "\n".join(log.splitlines()[-40:]) if log else "(empty)"
        status = daemon.process.poll()
        result.problems.append(f"log of {daemon.impl} {daemon.ifname} in {daemon.ns} "
                               f"(status {'running' if status is None else status}):\n{tail}")


# --- report -------------------------------------------------------------------------------


def other_activity() -> set[str]:
    """What else is using the bed's tools right now: other beds' namespaces, and test or
    benchmark processes not started by this run (their CPU use would skew the figures)."""
    mine = f"pwg{os.getpid()}"
    seen = {f"namespace {name}" for line in run("ip", "netns", "list", check=False).splitlines()
            if (name := line.split()[0] if line.split() else "") and not name.startswith(mine)}
    ours = {os.getpid(), os.getppid()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        words = [os.path.basename(a.decode(errors="replace")) for a in argv[:4]]
        if ppid not in ours and any(w in ("pytest", "py.test", "iperf3", "wireguard-go", "wireguard", "boringtun-cli") or "pytest" in w
                                    or w == "pywg.cli" for w in words):
            seen.add(f"process {entry.name}: {' '.join(a.decode(errors='replace') for a in argv if a)[:80]}")
    return seen


def machine() -> dict[str, str]:
    def first_line(*argv: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10, cwd=ROOT)
        except (OSError, subprocess.SubprocessError):
            return "?"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"

    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    revision = first_line("git", "rev-parse", "--short", "HEAD")
    if first_line("git", "status", "--porcelain", "--", "pywg") not in ("", "?"):
        revision += " (pywg/ modified)"
    return {
        "cpu": model,
        "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)",
        "kernel": f"Linux {platform.release()}",
        "python": f"Python {platform.python_version()} ({platform.python_implementation()})",
        **{impl: first_line(check_implementation(impl), "--version") for impl in PEERS},
        "iperf3": first_line("iperf3", "--version"),
        "pywg": revision,
    }


def median_of(runs: list[Run], impl: str, key: str) -> float | None:
    values = [r.figures[key] for r in runs if r.impl == impl and key in r.figures]
    return statistics.median(values) if values else None


def fmt(value: float | None, pattern: str) -> str:
    return "failed" if value is None else pattern.format(value)


# Which way is better, per figure: True when higher is better.
HIGHER_IS_BETTER = {"tcp_mbps": True, "tcp4_mbps": True, "udp_mbps": True, "udp_loss": False, "rtt_p50": False,
                    "rtt_p99": False, "cpu_per_gb": False, "cpu_cores": False}


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def best_peer(runs: list[Run], key: str) -> tuple[str, float] | None:
    """The peer with the best median on ``key`` (each implementation on both sides)."""
    medians = [(impl, v) for impl in PEERS if (v := median_of(runs, impl, key)) is not None]
    if not medians:
        return None
    pick = max if HIGHER_IS_BETTER[key] else min
    return pick(medians, key=lambda item: item[1])


def mixed_table(runs: list[Run]) -> str:
    """pywg facing each peer (one on each side, both ways): what a user of either sees."""
    keys = [("tcp_mbps", "{:,.0f}"), ("tcp4_mbps", "{:,.0f}"), ("udp_mbps", "{:,.0f}"), ("rtt_p50", "{:.3f}"),
            ("rtt_p99", "{:.3f}")]
    rows = [("| A -> B | TCP Mbit/s | TCP -P 4 Mbit/s | UDP Mbit/s | RTT p50 ms | RTT p99 ms "
             "| TCP / the peer facing itself | UDP / the peer facing itself |"),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for impl in MIXED:
        peer = impl.replace("pywg", "").strip(">")
        cells = [fmt(median_of(runs, impl, key), pattern) for key, pattern in keys]
        vs = [ratio(median_of(runs, impl, key), median_of(runs, peer, key)) for key in ("tcp_mbps", "udp_mbps")]
        name = " -> ".join(LABELS.get(part, part) for part in impl.split(">"))
        rows.append(f"| {name} | " + " | ".join(cells + vs) + " |")
    return "\n".join(rows)


def summary_table(runs: list[Run]) -> str:
    columns = ["pywg", "pywg-python", *PEERS]
    ran = {r.impl for r in runs}
    rows = ["| figure | " + " | ".join(LABELS.get(c, c) for c in columns) + " | best peer | pywg / best peer |",
            "| --- | " + "---: | " * len(columns) + "--- | ---: |"]
    for key, label, pattern in FIGURES:
        values = [fmt(median_of(runs, impl, key), pattern) if impl in ran else "not run" for impl in columns]
        best = best_peer(runs, key)
        best_cell = "n/a" if best is None else LABELS[best[0]]
        rows.append(f"| {label} | " + " | ".join(values) +
                    f" | {best_cell} | {ratio(median_of(runs, 'pywg', key), best[1] if best else None)} |")
    return "\n".join(rows)


def rounds_table(runs: list[Run]) -> str:
    head = ["round", "implementation", "TCP Mbit/s", "TCP retr.", "TCP -P 4", "UDP Mbit/s", "UDP loss %",
            "RTT p50 ms", "RTT p99 ms", "CPU s/GB", "CPU cores"]
    keys = [("tcp_mbps", "{:,.0f}"), ("tcp_retransmits", "{:.0f}"), ("tcp4_mbps", "{:,.0f}"), ("udp_mbps", "{:,.0f}"),
            ("udp_loss", "{:.1f}"), ("rtt_p50", "{:.3f}"), ("rtt_p99", "{:.3f}"),
            ("cpu_per_gb", "{:.2f}"), ("cpu_cores", "{:.2f}")]
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---:", "---"] + ["---:"] * len(keys)) + " |"]
    for r in runs:
        cells = [fmt(r.figures.get(k), p) if k in r.figures else "-" for k, p in keys]
        rows.append(f"| {r.round} | {r.impl} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def drops_line(runs: list[Run]) -> str:
    parts = []
    for r in runs:
        drops = {k[5:]: int(v) for k, v in r.figures.items() if k.startswith("drop:") and v}
        if "pywg" in r.impl:
            parts.append(f"round {r.round}, {r.impl}: " + (", ".join(f"{k} {v:,}" for k, v in sorted(drops.items()))
                                                  or "none"))
    return "; ".join(parts)


def section(runs: list[Run], info: dict[str, str], args: argparse.Namespace, started: datetime.datetime,
            load: tuple[str, str], others: set[str]) -> str:
    datagram = next((int(r.figures["udp_datagram"]) for r in runs if "udp_datagram" in r.figures), None)
    problems = [f"- round {r.round}, {r.impl}: " + p.replace("\n", "\n      ")
                for r in runs for p in r.problems]
    lines = [
        SECTION, "",
        "The same tunnel, built the same way, with each implementation on both sides: the pywg",
        "daemon (pywg: its C extensions in use; pywg-python: on its pure-Python fallback,",
        "PYWG_PUREPYTHON=1), wireguard-go 0.0.20250522, boringtun 0.7.1 and Debian's wireguard-go",
        "0.0.20220316 (each peer as its user gets it: default flags and threads). Two network",
        "namespaces joined by a veth pair, each daemon configured with the stock `wg` (a",
        "preshared key set), traffic from A to B through the tunnel (inner IPv4). A fresh bed",
        "for each implementation in each round; the order alternates between rounds. Figures",
        "are medians over rounds. \"best peer\" is the best of the three peers on that figure",
        "(highest throughput; lowest loss, RTT, CPU); \"pywg / best peer\" above 1 means pywg is",
        "higher: better for throughput, worse for the others. Everything (both daemons, the",
        "iperf3 client and server, the kernel's veth and TUN work) shares the machine's 2 cores.",
        "",
        f"- TCP: `iperf3 -t {args.seconds} -J`, the receiver's throughput; and with `-P 4`.",
        f"- UDP: `iperf3 -u -b {args.udp_bitrate} -l {datagram or '?'} -t {args.seconds}` (datagrams that",
        "  fill the tunnel MTU without fragmenting), the receiver's throughput and the datagrams lost.",
        (f"- ping: {PING_COUNT} echo requests at {PING_INTERVAL * 1000:.0f} ms intervals after "
        f"{PING_WARMUP} warm-up ones;"),
        "  p50/p99 by nearest rank of the per-packet times.",
        "- CPU: utime + stime of both daemon processes (/proc/PID/stat; the pid `ip netns exec`",
        "  started, checked to be the daemon itself) over the TCP run, per GB the receiver got;",
        "  and the same CPU time over the run's wall time (cores busy). pywg moves packets in",
        "  two threads (one on the fallback: its event loop); wireguard-go uses as many as it",
        "  likes; boringtun 4 (its default). Softirq work (veth, TCP stack) is charged to whatever",
        "  process it interrupts, so this is approximate.",
        f"- Daemons run with LOG_LEVEL={LOG_LEVEL}.",
        "",
        (f"Run {started:%Y-%m-%d %H:%M} UTC, {args.rounds} round{'s' if args.rounds != 1 else ''} "
         f"of {args.seconds} s runs; load average {load[0]} before, {load[1]} after."),
        *([] if not others else ["", "Other activity seen during the run (it shares the cores, so these",
                                 "figures are suspect):", *sorted(f"- {o}" for o in others)]),
        "",
        f"- CPU: {info['cpu']}; cores: {info['cores']}",
        f"- {info['kernel']}; {info['python']}",
        *(f"- {LABELS[impl]}: `{info[impl]}`" for impl in PEERS),
        f"- {info['iperf3']}",
        f"- pywg revision {info['pywg']}",
        "",
        summary_table(runs),
        "",
        "pywg facing each peer (A sends the TCP and UDP runs and pings); the last columns compare",
        "with that peer on both sides:",
        "",
        mixed_table(runs),
        "",
        "Per round:",
        "",
        rounds_table(runs),
        "",
        f"pywg's own drop counters (both daemons, whole run): {drops_line(runs) or 'n/a'}.",
        "",
    ]
    if problems:
        lines += ["Problems seen:", "", *problems, ""]
    lines += [
        "Reproduce (root): `make bench-bed`, which runs `.venv/bin/python -m bench.bed --write-results`",
        "and replaces this section; add `--rounds N --seconds S` for longer runs. Numbers depend on the",
        "machine and its load: compare the ratios.",
        "",
    ]
    return "\n".join(lines)


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace this section of RESULTS.md (up to the next ``## `` heading), or append it."""
    old = path.read_text() if path.exists() else ""
    for heading in OLD_SECTIONS:  # this section's earlier name: dropped, its figures are in git
        stale = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
        old = stale.sub("", old).rstrip("\n") + "\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}[ \t]*\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    body = text.rstrip("\n") + "\n"
    match = pattern.search(old)
    if match:
        after = old[match.end():]
        new = old[:match.start()] + body + ("\n" + after if after else "")
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + body
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs every implementation)")
    parser.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run")
    parser.add_argument("--udp-bitrate", default="0", help="iperf3 -b for the UDP run (0: no limit)")
    parser.add_argument("--write-results", action="store_true",
                        help=f"add or replace the section '{SECTION[3:]}' in {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--only", type=lambda text: tuple(text.split(",")), default=IMPLS,
                        metavar="IMPL,...", help=f"run only these (of {', '.join(IMPLS)}); others show n/a")
    args = parser.parse_args(argv)
    unknown = [impl for impl in args.only if impl not in IMPLS]
    if unknown:
        parser.error(f"--only: unknown implementation {', '.join(unknown)} (known: {', '.join(IMPLS)})")
    if args.write_results and set(args.only) != set(IMPLS):
        parser.error("--write-results replaces the whole section: it needs every implementation (no --only)")
    chosen = tuple(impl for impl in IMPLS if impl in args.only)
    try:
        check_bed((*REQUIRED_TOOLS, "iperf3"))
        for impl in PEERS:
            if any(peer in chosen for peer in (impl, f"pywg>{impl}", f"{impl}>pywg")):
                check_implementation(impl)
    except BedUnavailable as exc:
        print(f"bench.bed: {exc}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.UTC)
    info = machine()
    load_before = Path("/proc/loadavg").read_text().split()[0]
    runs: list[Run] = []
    others = other_activity()
    for round_ in range(1, args.rounds + 1):
        order = chosen if round_ % 2 else chosen[::-1]
        for impl in order:
            print(f"round {round_}/{args.rounds}: {impl} ...", file=sys.stderr, flush=True)
            result = measure(impl, round_, args.seconds, args.udp_bitrate)
            for problem in result.problems:
                print(f"  problem: {problem}", file=sys.stderr, flush=True)
            runs.append(result)
            others |= other_activity()
    load_after = Path("/proc/loadavg").read_text().split()[0]
    others |= other_activity()
    if others:
        print("warning: other activity during the run:\n  " + "\n  ".join(sorted(others)), file=sys.stderr)
    text = section(runs, info, args, started, (load_before, load_after), others)
    print(text)
    if args.write_results:
        write_results(text)
        print(f"updated {RESULTS}", file=sys.stderr)
    return 1 if any(r.problems for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
