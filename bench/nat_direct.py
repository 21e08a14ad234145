"""Time to a direct path through the real mesh on the NAT lab, ten tries per pair of NAT
types that allows a punch (tests/natmeshbed.py: `pywg coordinator serve --stun` in the lab's
internet, coturn, `pywg agent up --engine in-process` behind nftables NATs).

Each try starts two fresh agents (new node, interface, port, so no NAT state of an earlier
try is reused) and measures from "both up, each with the other's candidates" (both
`status.json` list the peer with candidates: the coordinator's push reached both sides) to
"both report path direct". p50/p95 per pair and over all tries; ``--write`` replaces this
benchmark's section of bench/RESULTS.md. Root, one run at a time:

    flock /tmp/pywg-heavy.lock .venv/bin/python bench/nat_direct.py --tries 10 --write
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from natmeshbed import PAIRS, NatMeshBed, expected, router_for, time_to_direct

from pywg.testing.natlab import NatLab

RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## Mesh on the NAT lab: time to direct path (bench/nat_direct.py)"
GOAL_P95 = 2.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(tries: int) -> dict[tuple[str, str], list[float]]:
    times: dict[tuple[str, str], list[float]] = {}
    with NatLab() as lab:
        lab.start_coturn()
        bed = NatMeshBed(lab, Path(tempfile.mkdtemp(prefix="pywg-natdirect-")))
        try:
            for a, b in (p for p in PAIRS if expected(*p) == "direct"):
                ra, rb = router_for(lab, a), router_for(lab, b)
                times[(a, b)] = [time_to_direct(bed, ra, rb) for _ in range(tries)]
                t = times[(a, b)]
                print(f"{a} + {b}: p50 {statistics.median(t) * 1000:.0f} ms, p95 {percentile(t, 0.95) * 1000:.0f} ms,"
                      f" max {max(t) * 1000:.0f} ms", flush=True)
        finally:
            bed.close()
    return times


def section(times: dict[tuple[str, str], list[float]], tries: int) -> str:
    every = [t for ts in times.values() for t in ts]
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip()
    lines = [
        HEADING, "",
        "The whole mesh, end to end: `pywg coordinator serve --stun 203.0.113.1:3478,203.0.113.2:3478` in the",
        "lab's internet namespace (coturn serving both), two fresh `pywg agent up --engine in-process` per try",
        "behind real nftables NATs (or on the open host). Measured from both agents up with the other's",
        "candidates (the coordinator's push reached both `status.json`) to both reporting path \"direct\"",
        "(the agent writes its status on every push and path change; polled every 10 ms; 0 ms: the first",
        "status listing the peer's candidates already said direct, the punch took less than the write).",
        f"{tries} tries per pair, {datetime.date.today().isoformat()}, commit {revision}.",
        "",
        "| NATs | p50 | p95 | max |",
        "|------|-----|-----|-----|",
    ]
    for (a, b), ts in times.items():
        lines.append(f"| {a} + {b} | {statistics.median(ts) * 1000:.0f} ms | {percentile(ts, 0.95) * 1000:.0f} ms "
                     f"| {max(ts) * 1000:.0f} ms |")
    p95 = percentile(every, 0.95)
    lines += [(f"| **all {len(every)} tries** | **{statistics.median(every) * 1000:.0f} ms** | "
              f"**{p95 * 1000:.0f} ms** | {max(every) * 1000:.0f} ms |"), "",
              (f"Goal p95 < {GOAL_P95:g} s: {'met' if p95 < GOAL_P95 else 'NOT met'}. Pairs with no direct path "
              "(symmetric + symmetric, symmetric + port-restricted cone, UDP blocked + any) are checked by "
              "tests/test_mesh_nat.py, not timed."), ""]
    return "\n".join(lines) + "\n"


def write(text: str) -> None:
    current = RESULTS.read_text()
    if HEADING in current:
        start = current.index(HEADING)
        nxt = current.find("\n## ", start + len(HEADING))
        current = current[:start] + text + (current[nxt + 1:] if nxt != -1 else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(current)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    args = parser.parse_args()
    times = measure(args.tries)
    text = section(times, args.tries)
    print(text)
    if args.write:
        write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
