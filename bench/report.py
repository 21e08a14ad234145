"""Run the pywg benchmarks and print bench/RESULTS.md (markdown) on standard output.

    python bench/report.py > bench/RESULTS.md         # run the benchmarks, then report
    python bench/report.py --json run.json            # report on an earlier --benchmark-json

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (benchmark name, what the row measures, unit of one operation)
ROWS = [
    ("test_handshake_dispatchers",
     "Handshake: A.initiate_handshake, B.datagram_received(initiation), A.datagram_received(response)",
     "handshake"),
    ("test_x25519_as_pywg_calls_it",
     "Reference: only the X25519 calls pywg makes in one handshake (6 dh + 3 dh_pubkey on bytes)",
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
  handshake (counted by instrumenting `noise.dh`/`dh_pubkey` during the benchmark),
  bytes in and bytes out. Not a floor: it shows how much of the handshake gap is X25519
  work pywg does beyond the 8 needed (see the count below the table).
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
part of `make test`, whose testpaths is `tests`); `python bench/report.py > bench/RESULTS.md`
runs them with `--benchmark-json` and regenerates this file. Numbers depend on the
machine and its load: compare ratios, and rerun on the machine you care about.
"""


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
            (f"X25519 in one pywg handshake (instrumented): {info.get('x25519_dh_calls')} `dh` calls and "
            f"{info.get('x25519_pubkey_calls')} `dh_pubkey` calls = {info.get('x25519_scalar_mults')} "
            f"scalar multiplications (each private key imported from bytes costs one, as OpenSSL "
            f"derives its public key), against {info.get('x25519_scalar_mults_needed')} needed."),
        ]
    lines += [
        "",
        "Rounds: " + ", ".join(f"{b['name']} {b['stats']['rounds']}" for b in data["benchmarks"]) + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="report on this --benchmark-json file instead of running")
    args = parser.parse_args()
    data = json.loads(args.json.read_text()) if args.json else run_benchmarks()
    sys.stdout.write(report(data))


if __name__ == "__main__":
    main()
