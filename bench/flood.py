"""Floods on the namespace bed (root, Linux): does a tunnel keep its traffic while its
listening port is flooded? pywg and the peer implementations, in the same run.

    .venv/bin/python -m bench.flood                       # 1 round, every flood, table on stdout
    .venv/bin/python -m bench.flood --rounds 3 --write-results
    .venv/bin/python -m bench.flood --impls pywg,wireguard-go-2025 --floods mac1,garbage

For each implementation X, each round builds a bed with X on both sides (A the legitimate
peer, B the victim) and measures, unflooded, TCP A->B (iperf3). Then for each flood, a
flooder in A's namespace (bench/flood_sender.py, bounded in rate and time, aimed only at
B's bed address) sends at B's WireGuard port while, in turn:
- A pings B through the tunnel every 20 ms (loss);
- iperf3 TCP A->B runs (the share of the unflooded throughput kept);
- A drops its session (the peer removed and added again with ``wg``) and pings until B
  answers: the time a new legitimate handshake takes during the flood.
B's daemon CPU (cores busy) and RSS (peak over the flood, and after it) are read from /proc.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.bed import CLK_TCK, PEERS, RESULTS, BenchError, iperf3, machine, make_side, other_activity
from pywg.testing.netns import Bed, check_bed, run
from pywg.testing.tunnel import Side, connect

FLOODS = ("garbage", "shaped", "mac1", "mac1-spoofed", "replay", "oversized")
IMPLS = ("pywg", *PEERS)  # pywg and every peer implementation on the bed
SECTION = "## Floods: the tunnel under hostile traffic"
RATE = 70_000
OVERSIZED_RATE = 2_000  # 65,000-byte datagrams: 130 MB/s already
SPOOF_NET = "10.250.0.0/16"
PING_INTERVAL = 0.02


@dataclass
class FloodRun:
    impl: str
    flood: str
    round: int
    figures: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssPeak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            try:
                self.peak = max(self.peak, proc_rss_mb(self.pid))
            except OSError:
                return

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def ping_loss(a: Side, b: Side, seconds: float) -> float:
    count = int(seconds / PING_INTERVAL)
    out = run("ping", "-n", "-q", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "1", b.tunnel4,
              ns=a.ns, check=False, timeout=seconds + 30)
    match = re.search(r"(\d+) received", out)
    return 100.0 * (count - int(match.group(1))) / count if match else 100.0


def new_handshake_seconds(bed: Bed, a: Side, b: Side, limit: float = 15.0) -> float:
    """A forgets its session with B (peer removed, added again); seconds until B answers."""
    psk = bed.workdir / f"{a.ifname}.psk"
    a.wg("set", a.ifname, "peer", b.public, "remove")
    args = ["set", a.ifname, "peer", b.public, "allowed-ips", f"{b.tunnel4}/32,{b.tunnel6}/128",
            "endpoint", f"{bed.outer_b}:{b.port}"]
    if psk.exists():
        args += ["preshared-key", str(psk)]
    a.wg(*args)
    start = time.monotonic()
    while time.monotonic() - start < limit:
        done = subprocess.run(["ip", "netns", "exec", a.ns, "ping", "-n", "-c", "1", "-W", "0.25", b.tunnel4],
                              capture_output=True, check=False)
        if done.returncode == 0:
            return time.monotonic() - start
    raise BenchError(f"no handshake within {limit:.0f} s")


def start_flood(bed: Bed, a: Side, b: Side, flood: str, seconds: float) -> subprocess.Popen[bytes]:
    rate = OVERSIZED_RATE if flood == "oversized" else RATE
    argv = [sys.executable, "-m", "bench.flood_sender", flood, "--target", f"{bed.outer_b}:{b.port}",
            "--seconds", str(seconds), "--rate", str(rate), "--public-key", b.public,
            "--spoof-net", SPOOF_NET, "--replay-from", f"{bed.outer_a}:{a.port}"]
    return subprocess.Popen(["ip", "netns", "exec", a.ns, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)


def measure(impl: str, floods: list[str], round_: int, seconds: float) -> list[FloodRun]:
    runs: list[FloodRun] = []
    with Bed() as bed:
        a, b = make_side(bed, bed.ns_a, impl, 1), make_side(bed, bed.ns_b, impl, 2)
        connect(bed, a, b)
        # Spoofed sources: B answers them through A's link, so the reverse path checks pass.
        run("ip", "route", "add", SPOOF_NET, "via", bed.outer_a, ns=bed.ns_b)
        run("ping", "-n", "-c", "3", "-i", "0.2", "-W", "5", b.tunnel4, ns=a.ns)
        baseline = iperf3(a, b, int(seconds))["end"]["sum_received"]["bits_per_second"] / 1e6
        pid = b.daemon.process.pid
        for flood in floods:
            result = FloodRun(impl, flood, round_)
            runs.append(result)
            rss0, cpu0, wall0 = proc_rss_mb(pid), proc_cpu(pid), time.monotonic()
            peak = RssPeak(pid)
            peak.start()
            replay_capture = 1.0 if flood == "replay" else 0.0
            sender = start_flood(bed, a, b, flood, 2 * seconds + replay_capture + 8)
            try:
                result.figures["ping_loss"] = ping_loss(a, b, seconds + replay_capture)
                tcp = iperf3(a, b, int(seconds))["end"]["sum_received"]["bits_per_second"] / 1e6
                result.figures["tcp_kept"] = 100.0 * tcp / baseline
                result.figures["handshake_s"] = new_handshake_seconds(bed, a, b)
            except (BenchError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                result.problems.append(str(exc))
            finally:
                result.figures["cpu_cores"] = (proc_cpu(pid) - cpu0) / (time.monotonic() - wall0)
                sender.kill()
                out, _err = sender.communicate()
                result.figures["rss_peak_mb"] = peak.stop() - rss0
            try:
                report = json.loads(out.decode().strip().splitlines()[-1])
                result.figures["sent"] = report.get("sent", 0)
            except (IndexError, json.JSONDecodeError):
                # killed before printing: the count is what the rate and time imply
                result.figures["sent"] = float("nan")
            time.sleep(1.0)
            result.figures["rss_after_mb"] = proc_rss_mb(pid) - rss0
            if b.daemon.process.poll() is not None:
                result.problems.append(f"{impl} died: {b.daemon.log()[-500:]}")
                break
            # Let the victim leave "under load" before the next flood.
            time.sleep(1.0)
    return runs


COLUMNS = [("ping_loss", "ping loss %", "{:.1f}"), ("tcp_kept", "TCP kept %", "{:.0f}"),
           ("handshake_s", "new handshake s", "{:.2f}"), ("cpu_cores", "victim CPU cores", "{:.2f}"),
           ("rss_peak_mb", "RSS peak +MB", "{:.1f}"), ("rss_after_mb", "RSS after +MB", "{:.1f}")]


def table(runs: list[FloodRun], impls: list[str], floods: list[str]) -> str:
    lines = ["| flood | implementation | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "| --- | --- |" + " ---: |" * len(COLUMNS)]
    for flood in floods:
        for impl in impls:
            mine = [r for r in runs if r.impl == impl and r.flood == flood]
            cells = []
            for key, _, fmt in COLUMNS:
                values = [r.figures[key] for r in mine if key in r.figures]
                cells.append(fmt.format(statistics.median(values)) if values else "-")
            lines.append(f"| {flood} | {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--floods", default=",".join(FLOODS))
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    impls, floods = args.impls.split(","), args.floods.split(",")
    unknown = sorted(set(floods) - set(FLOODS))
    if unknown:
        parser.error(f"--floods: unknown {', '.join(unknown)} (known: {', '.join(FLOODS)})")
    check_bed()
    busy = other_activity()
    runs: list[FloodRun] = []
    for round_ in range(args.rounds):
        order = impls if round_ % 2 == 0 else impls[::-1]
        for impl in order:
            runs += measure(impl, floods, round_, args.seconds)
    text = table(runs, impls, floods)
    problems = [f"- {r.impl} / {r.flood} round {r.round}: {p}" for r in runs for p in r.problems]
    info = machine()
    body = "\n".join([
        SECTION, "",
        (f"`python -m bench.flood --rounds {args.rounds} --seconds {args.seconds:g}` on {info.get('cpu', '?')}, "
        f"revision {info.get('pywg', '?')}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Floods of {RATE:,} datagrams/s ({OVERSIZED_RATE:,}/s for oversized) from A's namespace at B's "
        "WireGuard port; medians over rounds. TCP kept: iperf3 during the flood / unflooded, same bed."),
        "", text, "",
        *(["Problems:", *problems, ""] if problems else []),
        *([f"Other activity during the run (figures may be noisy): {len(busy)} item(s)", ""] if busy else []),
    ])
    print(body)
    if args.write_results:
        current = RESULTS.read_text()
        start = current.find(SECTION)
        if start < 0:
            current = current.rstrip() + "\n\n" + body
        else:
            nxt = current.find("\n## ", start + len(SECTION))
            current = current[:start] + body + (current[nxt:] if nxt >= 0 else "\n")
        RESULTS.write_text(current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
