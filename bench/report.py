"""Run the pywg micro benchmarks and write their part of bench/RESULTS.md (markdown).

    python bench/report.py --write                    # run them, update bench/RESULTS.md in place
    python bench/report.py                            # run them, print the report
    python bench/report.py --json run.json            # report on an earlier --benchmark-json

With --write, sections written by other scripts (those whose heading starts with one of
KEPT_SECTIONS, e.g. bench/bed.py's namespace-bed section) are kept after the report.

pytest's own output goes to standard error, so standard output is only the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (benchmark name, what the row measures, unit of one operation)
ROWS = [
    ("test_handshake_dispatchers",
     "Handshake: A.initiate_handshake, B.datagram_received(initiation), A.datagram_received(response)",
     "handshake"),
    ("test_x25519_as_pywg_calls_it",
     "Reference: only the X25519 calls pywg makes in one handshake (2 key imports + 6 exchanges)",
     "handshake"),
    ("test_seal_aeadkey", "Seal 1420 B: Keypair.send (AeadKey.seal) with the counter nonce", "packet"),
    ("test_seal_peer_send_packet", "Seal 1420 B: Dispatcher.send_packet on an established session",
     "packet"),
    ("test_open_aeadkey", "Open 1420 B: Keypair.receive (AeadKey.open) with the counter nonce", "packet"),
    ("test_open_peer_datagram_received",
     "Open 1420 B: Dispatcher.datagram_received, pre-sealed datagrams, increasing counters", "packet"),
]

FLOORS = {
    "test_x25519_floor": "8 X25519 scalar mults on prepared keys (cryptography)",
    "test_seal_floor": "ChaCha20Poly1305.encrypt, prepared key (cryptography)",
    "test_open_floor": "ChaCha20Poly1305.decrypt, prepared key (cryptography)",
}

HEADER = """\
# pywg benchmarks

Each row times one pywg operation and, beside it, its **floor**: the least work any
implementation built on the same library (`cryptography`, i.e. OpenSSL) must do for it,
measured in the same run. **ratio** = pywg time / floor time (1.00 would be no overhead).
Figures are medians over rounds (`benchmark.pedantic`); transport rounds are batches of
1000 packets, reported per packet. MB/s counts inner-packet bytes (1420 per packet).

- **Handshake**: one complete, fresh handshake through two `Dispatcher` objects
  (initiation created, consumed and answered; response consumed, session installed, A's
  confirming keepalive sealed), with mac1 checks, BLAKE2s/HMAC chaining and 4 handshake
  AEADs. The clock advances 5.1 s per handshake (past REKEY_TIMEOUT and the 20 ms flood
  limit) so the TAI64N timestamps increase. Floor: the 8 X25519 scalar multiplications
  the protocol needs with static-static precomputed (2 ephemeral key generations;
  DH es on both sides, ee and se on both sides), on key objects prepared where possible.
- **Reference (X25519 as pywg calls it)**: the exact X25519 calls pywg makes in a
  handshake (counted by instrumenting every X25519 entry point during one handshake, and
  asserted), on `crypto.PrivateKey` objects as pywg holds them. Not a floor: it shows how
  much of the handshake gap is X25519 work beyond the 8 needed (see the count below the
  table); the rest of the gap is the Python around it (BLAKE2s/HMAC chaining, AEADs,
  messages, timers).
- **Seal / Open via AeadKey**: `Keypair.send.seal` / `Keypair.receive.open` on 1420-byte
  packets, the WireGuard nonce built from the counter per packet.
- **Seal via Dispatcher.send_packet**: the whole outbound path on an established session
  (staging, padding to the 1420 MTU, seal, transport header, timer hooks, SendDatagram).
- **Open via Dispatcher.datagram_received**: the whole inbound path for datagrams sealed
  beforehand with increasing counters (type/size check, index lookup, open, replay
  filter, keypair confirm, timers, inner-length check, DeliverPacket).
- **Floors for transport**: one bare `ChaCha20Poly1305.encrypt`/`decrypt` of 1420 bytes
  on a key object prepared once, with a prepared nonce.

Reproduce: `make bench` runs `pytest -q bench --benchmark-only` (the benchmarks are not
part of `make test`, whose testpaths is `tests`); `python bench/report.py --write`
runs them with `--benchmark-json` and regenerates this file. Numbers depend on the
machine and its load: compare ratios, and rerun on the machine you care about.
"""


@dataclass(frozen=True)
class Baseline:
    """An earlier run kept for comparison: per-operation medians in µs, floors included."""

    revision: str
    what: str
    machine: str
    per_op_us: dict[str, float]
    scalar_mults: int


# Before crypto.PrivateKey (keys passed as bytes, 15 X25519 scalar multiplications per
# handshake), the hmac-module HMAC and the per-packet trims in the Dispatcher path.
BASELINES = [
    Baseline(
        "2bde258", "the previous RESULTS.md",
        "Intel(R) Xeon(R) Processor, nproc 2, Python 3.11.7, cryptography 50.0.2 (OpenSSL 4.0.3), "
        "run 2026-11-24 21:52 UTC",
        {"test_handshake_dispatchers": 560.66, "test_x25519_as_pywg_calls_it": 461.03,
         "test_x25519_floor": 217.22, "test_seal_aeadkey": 1.82, "test_seal_peer_send_packet": 4.47,
         "test_seal_floor": 1.59, "test_open_aeadkey": 1.78, "test_open_peer_datagram_received": 5.14,
         "test_open_floor": 1.62},
        15,
    ),
    Baseline(
        "572827d", "the tree this change started from, on the machine of the current figures",
        "AMD EPYC, nproc 2, Python 3.11.7, cryptography 50.0.2 (OpenSSL 4.0.3), run 2026-11-25; "
        "median of 3 runs interleaved with 3 runs of the change",
        {"test_handshake_dispatchers": 668.90, "test_x25519_as_pywg_calls_it": 585.97,
         "test_x25519_floor": 261.48, "test_seal_aeadkey": 1.54, "test_seal_peer_send_packet": 3.83,
         "test_seal_floor": 1.33, "test_open_aeadkey": 1.56, "test_open_peer_datagram_received": 4.79,
         "test_open_floor": 1.33},
        15,
    ),
]

SHORT_LABELS = {
    "test_handshake_dispatchers": "Handshake through two Dispatchers",
    "test_x25519_as_pywg_calls_it": "Reference: pywg's X25519 calls only",
    "test_seal_aeadkey": "Seal 1420 B: AeadKey.seal",
    "test_seal_peer_send_packet": "Seal 1420 B: Dispatcher.send_packet",
    "test_open_aeadkey": "Open 1420 B: AeadKey.open",
    "test_open_peer_datagram_received": "Open 1420 B: Dispatcher.datagram_received",
}


def before_section(by_name: dict) -> list[str]:
    """Each baseline's figures beside the current run's, as µs per op (ratio to its floor)."""
    def cell(per_op_us: float | None, floor_us: float | None) -> str:
        if per_op_us is None:
            return "-"
        ratio = f" ({per_op_us / floor_us:.2f})" if floor_us else ""
        return f"{per_op_us:,.2f} µs{ratio}"

    lines = [
        "",
        "## Before",
        "",
        "Earlier figures, kept for comparison: µs per operation, and in brackets the ratio to",
        "the floor measured in the same run. Compare ratios across machines, times only within",
        "one machine.",
        "",
    ]
    lines += [f"- **{b.revision}**: {b.what}; {b.machine}." for b in BASELINES]
    lines += [
        "- **now**: the Results above.",
        "",
        "| figure | " + " | ".join(b.revision for b in BASELINES) + " | now |",
        "| --- |" + " ---: |" * (len(BASELINES) + 1),
    ]
    for name, label in SHORT_LABELS.items():
        bench = by_name.get(name)
        cells = [label]
        for b in BASELINES:
            floor_name = bench["extra_info"].get("floor") if bench else None
            cells.append(cell(b.per_op_us.get(name), b.per_op_us.get(floor_name or "")))
        if bench is None:
            cells.append("-")
        else:
            floor = by_name.get(bench["extra_info"].get("floor", ""))
            cells.append(cell(per_op(bench) * 1e6, per_op(floor) * 1e6 if floor else None))
        lines.append("| " + " | ".join(cells) + " |")
    handshake = by_name.get("test_handshake_dispatchers")
    now_mults = handshake["extra_info"].get("x25519_scalar_mults", "?") if handshake else "?"
    lines += [
        "| X25519 scalar multiplications per handshake | "
        + " | ".join(str(b.scalar_mults) for b in BASELINES) + f" | {now_mults} |",
        "",
        "Before the change the reference row timed 6 `dh` + 3 `dh_pubkey` calls on bytes (15",
        "scalar multiplications); now it times what pywg does instead (2 imports + 6 exchanges).",
    ]
    return lines


def run_benchmarks() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={out}"]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if proc.returncode != 0:
            sys.exit(f"benchmarks failed (pytest exit {proc.returncode})")
        return json.loads(out.read_text())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def crypto_versions() -> tuple[str, str]:
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    return cryptography.__version__, backend.openssl_version_text()


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pywg"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (pywg/ modified)" if dirty else "")


def per_op(bench: dict) -> float:
    """Median seconds for one operation."""
    return bench["stats"]["median"] / bench["extra_info"].get("ops_per_round", 1)


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:,.2f} µs"


def fmt_rate(bench: dict, unit: str) -> str:
    t = per_op(bench)
    rate = f"{1 / t:,.0f} {unit}s/s"
    size = bench["extra_info"].get("bytes_per_op", 0)
    if size:
        rate += f", {size / t / 1e6:,.0f} MB/s"
    return rate


def fastpath_section(by_name: dict[str, dict]) -> list[str]:
    """Batch crypto (bench/test_bench_fastpath.py): 64 x 1420-byte messages per call, per
    backend, beside `openssl speed -evp chacha20-poly1305 -bytes 1420` from the same run."""
    rows = [b for name, b in by_name.items() if name.startswith(("test_seal_gso[", "test_seal_batch[",
                                                                  "test_open_gro["))]
    if not rows:
        return []
    speed = next((b["extra_info"].get("openssl_speed_MB_per_s") for b in rows), None)
    floor = (f"the floor is `openssl speed -evp chacha20-poly1305 -bytes 1420` in the same run: {speed:.0f} MB/s"
             if speed else "openssl speed was not available in this run")
    lines = ["", "### Batch crypto (native fast path)", "",
             ("64 messages of 1420 bytes per call; per-packet time from the median and the best round "
              f"(the best round is the steadier comparison on a shared machine); {floor}."), "",
             ("| call [backend] | ns/packet (median) | ns/packet (best) | MB/s (median) | "
              "share of openssl speed (median / best) |"),
             "| --- | ---: | ---: | ---: | ---: |"]
    for bench in rows:
        info = bench["extra_info"]
        share = (f"{info['ratio_to_openssl_speed']:.0%} / {info['ratio_to_openssl_speed_best']:.0%}"
                 if "ratio_to_openssl_speed" in info else "-")
        lines.append(f"| {bench['name'].removeprefix('test_')} | {info.get('ns_per_packet', '-')} | "
                     f"{info.get('ns_per_packet_best', '-')} | {info.get('MB_per_s', 0):,.0f} | {share} |")
    return lines


def report(data: dict) -> str:
    by_name = {b["name"]: b for b in data["benchmarks"]}
    crypto, openssl = crypto_versions()
    lines = [HEADER]
    lines += [
        "## Machine",
        "",
        f"- CPU: {cpu_model()}; nproc: {nproc()}",
        (f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}"),
        (f"- cryptography {crypto} ({openssl}); pytest-benchmark "
        f"{data.get('version', '?')}"),
        (f"- pywg revision {git_revision()}; run "
        f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}"),
        "",
        "## Results",
        "",
        "| figure | pywg per op | pywg rate | floor | floor per op | floor rate | ratio |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    known = [name for name, _, _ in ROWS]
    rows = list(ROWS) + [(name, name, "op") for name, b in by_name.items()
                         if "floor" in b["extra_info"] and name not in known]
    for name, label, unit in rows:
        bench = by_name.get(name)
        if bench is None:
            continue
        floor_name = bench["extra_info"].get("floor")
        floor = by_name.get(floor_name) if floor_name else None
        cells = [label, fmt_time(per_op(bench)), fmt_rate(bench, unit)]
        if floor is None:
            cells += ["-", "-", "-", "-"]
        else:
            cells += [FLOORS.get(floor_name, floor_name), fmt_time(per_op(floor)), fmt_rate(floor, unit),
                      f"{per_op(bench) / per_op(floor):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    handshake = by_name.get("test_handshake_dispatchers")
    if handshake is not None:
        info = handshake["extra_info"]
        lines += [
            "",
            (f"X25519 in one pywg handshake (instrumented): {info.get('x25519_private_key_imports', '?')} "
            f"private-key imports (each costs one scalar multiplication, as OpenSSL derives the "
            f"public key), {info.get('x25519_generate', '?')} key generations, "
            f"{info.get('x25519_exchanges', '?')} exchanges on imported keys, "
            f"{info.get('x25519_dh_calls', '?')} `dh` and {info.get('x25519_pubkey_calls', '?')} "
            f"`dh_pubkey` calls on bytes = {info.get('x25519_scalar_mults')} scalar multiplications, "
            f"against {info.get('x25519_scalar_mults_needed')} needed."),
        ]
    lines += fastpath_section(by_name)
    lines += [
        "",
        "Rounds: " + ", ".join(f"{b['name']} {b['stats']['rounds']}" for b in data["benchmarks"]) + ".",
    ]
    lines += before_section(by_name)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="report on this --benchmark-json file instead of running")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md, keeping other sections")
    args = parser.parse_args()
    data = json.loads(args.json.read_text()) if args.json else run_benchmarks()
    text = report(data)
    if not args.write:
        sys.stdout.write(text)
        return
    results = Path(__file__).with_name("RESULTS.md")
    old = results.read_text() if results.exists() else ""
    kept = [part for part in old.split("\n## ")[1:] if part.startswith(KEPT_SECTIONS)]
    results.write_text(text + "".join("\n## " + part for part in kept))


KEPT_SECTIONS = ("Namespace bed",)


if __name__ == "__main__":
    main()
