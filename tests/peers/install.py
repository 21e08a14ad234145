#!/usr/bin/env python3
"""Install the pinned real WireGuard peers (and Tailscale's DERP tools) the test bed and
the benchmarks run pywg against, each built once per machine from its registry into
``~/.cache/pywg/peers/NAME-VERSION`` (or ``$PYWG_PEERS_DIR``) and reused afterwards.

    python3 tests/peers/install.py            # install what is missing, say what is there
    python3 tests/peers/install.py --check    # only check; exit 1 naming what is missing
    python3 tests/peers/install.py --fresh --root /tmp/x   # time a fresh machine's build:
                                              # empty Go and cargo caches, a new cache dir

A peer counts as installed when its directory holds a marker file recording the exact
install command and every binary it should have; anything else is rebuilt. A build goes
to NAME-VERSION.partial first and is renamed when complete, so an interrupted build never
passes for an installed one. Parallel runs (other worktrees) serialise on a lock file.
Standard library only: it runs before the virtualenv exists. Nothing here is committed
output: the binaries stay in the cache, outside the clone.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Tailscale's derper needs at least this Go (its go.mod); the others build with older ones.
GO_MIN = (1, 26, 6)


@dataclass(frozen=True)
class Peer:
    name: str
    version: str
    tool: str  # "go" or "cargo"
    packages: tuple[str, ...]
    binaries: tuple[str, ...]

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"

    def command(self, prefix: Path) -> list[str]:
        if self.tool == "go":
            return ["go", "install", *self.packages]
        return ["cargo", "install", "--locked", "--quiet", "--root", str(prefix), *self.packages,
                "--version", self.version]


PEERS = (
    # wireguard-go's newest tag, 0.0.20250522, at its commit (the module has no semver tags).
    Peer("wireguard-go", "0.0.20250522", "go",
         ("golang.zx2c4.com/wireguard@v0.0.0-20250521234502-f333402bd9cb",), ("wireguard",)),
    Peer("boringtun-cli", "0.7.1", "cargo", ("boringtun-cli",), ("boringtun-cli",)),
    Peer("derper", "1.102.3", "go",
         ("tailscale.com/cmd/derper@v1.102.3", "tailscale.com/cmd/derpprobe@v1.102.3"), ("derper", "derpprobe")),
)
MARKER = ".installed"


class InstallError(RuntimeError):
    pass


def default_root() -> Path:
    return Path(os.environ.get("PYWG_PEERS_DIR") or Path.home() / ".cache" / "pywg" / "peers")


def installed(peer: Peer, root: Path) -> bool:
    home = root / peer.dirname
    marker = home / MARKER
    if not marker.is_file() or marker.read_text().strip() != " ".join(peer.command(home)):
        return False
    return all(os.access(home / "bin" / b, os.X_OK) for b in peer.binaries)


def go_version() -> tuple[int, ...]:
    if shutil.which("go") is None:
        need = ".".join(map(str, GO_MIN))
        raise InstallError(f"go is not on PATH (Go >= {need} is needed to build wireguard-go and derper)")
    out = subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True, check=False,
                         env=dict(os.environ, GOTOOLCHAIN="local")).stdout.strip()
    match = re.match(r"go(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise InstallError(f"cannot tell the Go version from `go env GOVERSION`: {out!r}")
    return tuple(int(g or 0) for g in match.groups())


def check_toolchain(peer: Peer) -> None:
    if peer.tool == "go":
        have = go_version()
        if have < GO_MIN:
            raise InstallError(f"{peer.dirname} needs Go >= {'.'.join(map(str, GO_MIN))}, "
                               f"but go on PATH is {'.'.join(map(str, have))}")
    elif shutil.which("cargo") is None:
        raise InstallError(f"cargo is not on PATH (Rust is needed to build {peer.dirname} from crates.io)")


def build(peer: Peer, root: Path, env: dict[str, str]) -> float:
    """Build ``peer`` into ROOT/NAME-VERSION; the seconds it took."""
    check_toolchain(peer)
    home = root / peer.dirname
    partial = root / (peer.dirname + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "bin").mkdir(parents=True)
    env = dict(env, GOBIN=str(partial / "bin"), GOTOOLCHAIN="local", GOFLAGS="-trimpath")
    argv = peer.command(partial)
    log = partial / "build.log"
    print(f"peers: building {peer.dirname}: {' '.join(argv)}", flush=True)
    started = time.monotonic()
    with open(log, "wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    took = time.monotonic() - started
    if done.returncode != 0:
        tail = "\n    ".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise InstallError(f"building {peer.dirname} failed (`{' '.join(argv)}` exit {done.returncode}; "
                           f"registry or toolchain error?):\n    {tail}\n  full log: {log}")
    missing = [b for b in peer.binaries if not os.access(partial / "bin" / b, os.X_OK)]
    if missing:
        raise InstallError(f"building {peer.dirname} made no {', '.join(missing)} in {partial / 'bin'}")
    (partial / MARKER).write_text(" ".join(peer.command(home)) + "\n")
    shutil.rmtree(home, ignore_errors=True)
    partial.rename(home)
    print(f"peers: built {peer.dirname} in {took:.0f} s", flush=True)
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="the cache (default ~/.cache/pywg/peers)")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if anything is missing")
    parser.add_argument("--fresh", action="store_true",
                        help="build with empty, temporary Go module/build and cargo caches (timing)")
    args = parser.parse_args(argv)
    root: Path = args.root or default_root()
    if args.check:
        missing = [p.dirname for p in PEERS if not installed(p, root)]
        for peer in PEERS:
            print(f"peers: {peer.dirname}: {'missing' if peer.dirname in missing else 'installed'}")
        return 1 if missing else 0
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    scratch = None
    if args.fresh:
        scratch = Path(tempfile.mkdtemp(prefix="pywg-peers-fresh-"))
        cargo_bin = shutil.which("cargo")
        env.update(GOMODCACHE=str(scratch / "gomod"), GOCACHE=str(scratch / "gocache"),
                   GOPATH=str(scratch / "gopath"), CARGO_HOME=str(scratch / "cargo"),
                   CARGO_TARGET_DIR=str(scratch / "target"))
        if cargo_bin:  # rustup's proxy finds the toolchain through RUSTUP_HOME, not CARGO_HOME
            env.setdefault("RUSTUP_HOME", str(Path.home() / ".rustup"))
    errors, total = [], 0.0
    with open(root / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worktree may be building the same peer
        try:
            for peer in PEERS:
                if installed(peer, root) and not args.fresh:
                    print(f"peers: {peer.dirname} present in {root / peer.dirname}")
                    continue
                try:
                    total += build(peer, root, env)
                except (InstallError, OSError) as exc:
                    errors.append(f"{peer.dirname}: {exc}")
        finally:
            if scratch is not None:
                subprocess.run(["chmod", "-R", "u+w", str(scratch)], check=False)  # Go's read-only modcache
                shutil.rmtree(scratch, ignore_errors=True)
    if total:
        print(f"peers: {total:.0f} s of building in all")
    for error in errors:
        print(f"peers: ERROR {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
