"""The ``pywg`` command. ``pywg daemon [--foreground] IFNAME`` runs an interface the way
``wireguard-go [-f] IFNAME`` does; ``pywg-daemon IFNAME`` is the same, for
``WG_QUICK_USERSPACE_IMPLEMENTATION``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _daemon_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground instead of detaching")
    parser.add_argument("ifname", metavar="IFNAME", help="interface name (at most 15 bytes)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pywg", description="userspace WireGuard in Python")
    commands = parser.add_subparsers(dest="command", required=True)
    _daemon_args(commands.add_parser("daemon", help="run a WireGuard interface (TUN + UAPI socket)"))
    stats = commands.add_parser("stats", help="a running interface's counters (JSON)")
    stats.add_argument("ifname", metavar="IFNAME")
    args = parser.parse_args(argv)
    if args.command == "daemon":
        return _daemon(args)
    if args.command == "stats":
        return _stats(args.ifname)
    parser.error(f"unknown command {args.command}")
    return 2


def daemon_main(argv: Sequence[str] | None = None) -> int:
    """``pywg-daemon [-f] IFNAME``: a drop-in for ``wireguard-go [-f] IFNAME``."""
    parser = argparse.ArgumentParser(prog="pywg-daemon", description="run a WireGuard interface")
    _daemon_args(parser)
    return _daemon(parser.parse_args(argv))


def _stats(ifname: str) -> int:
    import json

    from pywg.device.stats_server import read_stats

    try:
        print(json.dumps(read_stats(ifname), indent=2))
    except OSError as exc:
        print(f"pywg: no pywg daemon answers for {ifname}: {exc}", file=sys.stderr)
        return 1
    return 0


def _daemon(args: argparse.Namespace) -> int:
    from pywg.device import daemon

    name = args.ifname
    if not name or len(name.encode()) > 15 or "/" in name or name.strip() != name:
        print(f"pywg: invalid interface name {name!r}: 1 to 15 bytes, no '/' or spaces", file=sys.stderr)
        return 2
    return daemon.run(name, foreground=args.foreground)


if __name__ == "__main__":
    sys.exit(main())
