"""The ``pywg`` command.

- ``pywg daemon [--foreground] IFNAME`` runs an interface the way ``wireguard-go [-f]
  IFNAME`` does; ``pywg-daemon IFNAME`` is the same, for
  ``WG_QUICK_USERSPACE_IMPLEMENTATION``. ``pywg stats IFNAME``: a daemon's counters.
- ``pywg interface create|delete|show|list``, ``pywg peer add|remove|update``: the
  TunnelManager (``pywg.manage.tunnel``) from the shell. ``--json`` prints the spec's types.
- ``pywg key generate``: a key pair. ``pywg key rotate IFNAME --keystore DIR``: a new key
  without loss (KeyManager.rotate_keys); every peer must learn it: ``--peer PEER_IFNAME``
  renames it on an interface of this machine, ``--tell-peers`` prints what each other peer
  must run (``pywg peer update PEER_IFNAME --public-key OLD --new-public-key NEW``), and
  without either the command refuses while the interface has peers. The new key is
  printed as soon as it is in use, then the overlap counts down; an interrupt is reported
  with the state it left (undone before the new key is in use, else the overlap ended).

``interface create`` starts a daemon (``--implementation``, default ``pywg-daemon``; or
e.g. ``wireguard-go``) through the UAPI backend, because an in-process interface lives
only as long as its process: ``--backend inprocess`` runs the interface inside this
command, which then stays in the foreground until interrupted or the interface is
deleted. Every other command talks to the interface's UAPI socket, so it works on
interfaces made either way (and by ``wg-quick``). Exit status: 0 done, 1 the operation
failed (no such interface, peer exists, backend refused...), 2 bad input, 130
interrupted; each error is one line naming the option at fault, never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_loading(signum: int, frame: object) -> None:
    print("pywg: interrupted", file=sys.stderr)
    sys.exit(130)


# Run as the command (not imported): a Ctrl-C while the rest loads is a quiet exit; main()
# puts Python's KeyboardInterrupt back once it runs.
if __name__ == "__main__" or os.path.basename(sys.argv[0]) in ("pywg", "pywg-daemon"):
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import argparse
import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from pywg.manage.key import Key
    from pywg.manage.tunnel import TunnelManager
    from pywg.manage.types import WireGuardInterface, WireGuardPeer

# JSON field -> the option that gave it, for error messages.
OPTION_OF_FIELD = {
    "name": "NAME", "privateKey": "--private-key-file", "listenPort": "--listen-port", "fwMark": "--fwmark",
    "address": "--address", "mtu": "--mtu", "publicKey": "--public-key", "presharedKey": "--preshared-key-file",
    "endpoint": "--endpoint", "allowedIps": "--allowed-ips", "persistentKeepalive": "--persistent-keepalive",
}


#: How often ``key rotate`` says how much of the overlap is left (seconds).
PROGRESS_EVERY = 5.0


class UsageError(Exception):
    """Bad input on the command line: exit status 2."""


def _daemon_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground instead of detaching")
    parser.add_argument("--metrics", metavar="ADDR:PORT",
                        help="also serve Prometheus metrics at http://ADDR:PORT/metrics (off by default)")
    parser.add_argument("ifname", metavar="IFNAME", help="interface name (at most 15 bytes)")


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("pywg: interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The ``pywg`` command: main()'s status as the exit status. An interrupt exits 130 and
    nothing else: CPython marks a KeyboardInterrupt that passed through exec()'d code (the
    methods dataclasses build while a module loads) as unhandled, even once main() caught it,
    and then kills itself with SIGINT at exit instead of returning the status."""
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: a late Ctrl-C does not change the status
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(status)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="pywg", description="userspace WireGuard in Python")
    commands = parser.add_subparsers(dest="command", required=True)
    _daemon_args(commands.add_parser("daemon", help="run a WireGuard interface (TUN + UAPI socket)"))
    stats = commands.add_parser("stats", help="a running interface's counters (JSON)")
    stats.add_argument("ifname", metavar="IFNAME")
    _interface_parsers(commands)
    _peer_parsers(commands)
    _key_parsers(commands)
    from pywg.mesh.cli import add_parser as _coordinator_parsers

    _coordinator_parsers(commands)
    _derp_parsers(commands)
    from pywg.mesh.agent_cli import add_parser as _agent_parsers

    _agent_parsers(commands)
    args = parser.parse_args(argv)
    if args.command == "daemon":
        return _daemon(args)
    if args.command == "stats":
        return _stats(args.ifname)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return _report_errors(handler, args)


def daemon_main(argv: Sequence[str] | None = None) -> int:
    """``pywg-daemon [-f] IFNAME``: a drop-in for ``wireguard-go [-f] IFNAME``."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(prog="pywg-daemon", description="run a WireGuard interface")
    _daemon_args(parser)
    return _daemon(parser.parse_args(argv))


def _stats(ifname: str) -> int:
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
    metrics = None
    if args.metrics is not None:
        from pywg.device.metrics_server import MetricsAddressError, parse_metrics_address

        try:
            metrics = parse_metrics_address(args.metrics)
        except MetricsAddressError as exc:
            print(f"pywg: {exc}", file=sys.stderr)
            return 2
    return daemon.run(name, foreground=args.foreground, metrics=metrics)


# --- the management commands -----------------------------------------------------------


def _derp_parsers(commands: Any) -> None:
    derp = commands.add_parser("derp", help="the DERP relay (Tailscale's protocol)")
    sub = derp.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="run a DERP relay and STUN responder until SIGTERM/SIGINT")
    from pywg.device.derp_serve_options import add_serve_options

    add_serve_options(serve)
    serve.set_defaults(handler=_derp_serve)


def _derp_serve(args: argparse.Namespace) -> int:
    from pywg.device.derp_server import ConfigError, run_serve

    try:
        return run_serve(args)
    except ConfigError as exc:
        print(f"pywg: {exc}", file=sys.stderr)
        return 2


def _interface_parsers(commands: Any) -> None:
    iface = commands.add_parser("interface", help="create, delete, show WireGuard interfaces")
    sub = iface.add_subparsers(dest="action", required=True)

    create = sub.add_parser("create", help="create an interface (started as a daemon, see --backend)")
    create.add_argument("name", metavar="NAME")
    keys = create.add_mutually_exclusive_group()
    keys.add_argument("--private-key-file", metavar="FILE", help="the private key, base64 as `wg genkey` writes")
    keys.add_argument("--generate-key", action="store_true", help="generate a new private key")
    create.add_argument("--listen-port", type=_integer, default=0, metavar="N", help="UDP port (default: random)")
    create.add_argument("--fwmark", type=_integer, default=0, metavar="N", help="firewall mark (0: none)")
    create.add_argument("--address", metavar="CIDR", help="interface address, e.g. 10.0.0.1/24")
    create.add_argument("--mtu", type=_integer, default=0, metavar="N", help="MTU (default 1420)")
    create.add_argument("--backend", choices=("uapi", "inprocess"), default="uapi",
                        help="uapi (default): start a daemon; inprocess: run the interface in this "
                        "process, in the foreground until interrupted")
    create.add_argument("--implementation", metavar="CMD", default="pywg-daemon",
                        help="the daemon for --backend uapi, run as `CMD NAME` (default pywg-daemon; "
                        "e.g. wireguard-go)")
    _common(create)
    create.set_defaults(handler=_interface_create)

    delete = sub.add_parser("delete", help="delete an interface")
    delete.add_argument("name", metavar="NAME")
    _common(delete, json_output=False)
    delete.set_defaults(handler=_interface_delete)

    show = sub.add_parser("show", help="show an interface (no secrets)")
    show.add_argument("name", metavar="NAME")
    _common(show)
    show.set_defaults(handler=_interface_show)

    listing = sub.add_parser("list", help="names of the interfaces served here")
    _common(listing)
    listing.set_defaults(handler=_interface_list)


def _peer_parsers(commands: Any) -> None:
    peer = commands.add_parser("peer", help="add, remove, update an interface's peers")
    sub = peer.add_subparsers(dest="action", required=True)
    for action, text in (("add", "add a peer"), ("update", "change a peer (options not given stay as they are)"),
                         ("remove", "remove a peer")):
        p = sub.add_parser(action, help=text)
        p.add_argument("name", metavar="NAME", help="the interface")
        p.add_argument("--public-key", required=True, metavar="KEY", help="the peer's public key (base64)")
        if action == "update":
            p.add_argument("--new-public-key", metavar="KEY",
                           help="the peer rotated its key: it answers to this one from now on (a pywg "
                           "daemon keeps its sessions; other implementations get the peer replaced)")
        if action != "remove":
            p.add_argument("--allowed-ips", action="append", metavar="CIDR[,CIDR...]",
                           help="the peer's allowed IPs (comma-separated, repeatable; '' for none)")
            p.add_argument("--endpoint", metavar="HOST:PORT", help="where the peer is (IPv6: [ADDR]:PORT)")
            p.add_argument("--persistent-keepalive", type=_integer, metavar="SECONDS", help="0: off")
            p.add_argument("--preshared-key-file", metavar="FILE", help="preshared key file (empty: none)")
        _common(p, json_output=False)
        p.set_defaults(handler={"add": _peer_add, "update": _peer_update, "remove": _peer_remove}[action])


def _key_parsers(commands: Any) -> None:
    key = commands.add_parser("key", help="key pairs")
    sub = key.add_subparsers(dest="action", required=True)
    gen = sub.add_parser("generate", help="a new key pair: prints the public key; the private key goes "
                         "where you say")
    gen.add_argument("--private-key-file", metavar="OUT", help="write the private key here (mode 0600, new file)")
    gen.add_argument("--print-private", action="store_true", help="also print the private key")
    gen.add_argument("--json", action="store_true", help="print JSON: publicKey (privateKey if asked)")
    gen.set_defaults(handler=_key_generate)
    rot = sub.add_parser(
        "rotate", help="give a running interface a new key without loss: the new key is stored in the "
        "keystore and used at once (printed then), the old one is still accepted for --overlap seconds; "
        "every peer must learn the new key (--peer, or --tell-peers)",
        description="Each peer of IFNAME must learn the new key, or its tunnel dies once the sessions "
        "in place expire (about 3 minutes). Peers served on this machine are named with --peer and "
        "renamed in place (sessions kept). When IFNAME has other peers, the command refuses, unless "
        "--tell-peers: then it prints, for each of them, the command that gives it the new key, to run "
        "there before the overlap ends (make --overlap long enough).")
    rot.add_argument("ifname", metavar="IFNAME")
    rot.add_argument("--keystore", required=True, metavar="DIR", help="keystore directory (0700)")
    rot.add_argument("--peer", action="append", default=[], metavar="PEER_IFNAME",
                     help="an interface on this machine (any network namespace) that has IFNAME as a "
                     "peer: it learns the new key in place; repeatable")
    rot.add_argument("--tell-peers", action="store_true",
                     help="go ahead although some peers are not given with --peer: print what each "
                     "of them must run before the overlap ends")
    rot.add_argument("--overlap", type=_seconds, default=15.0, metavar="SECONDS",
                     help="how long the old key is still accepted (default 15)")
    _common(rot)
    rot.set_defaults(handler=_key_rotate)


def _common(parser: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON (the spec's types)")
    parser.add_argument("--timeout", type=_positive_seconds, default=30.0, metavar="SECONDS",
                        help="give up after this long (default 30)")


def _integer(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a decimal integer, got {text!r}") from None


def _seconds(text: str) -> float:
    """A number of seconds >= 0 (argparse names the option in its message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


class Refused(Exception):
    """The command will not do what was asked, and says why: exit status 1."""


def _report_errors(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Every failure as one message naming what is at fault, never a traceback
    (``PYWG_DEBUG=1`` shows one for an unexpected error)."""
    from pywg.manage.keymanager import KeyManagerError
    from pywg.manage.keystore import KeyStoreError
    from pywg.manage.tunnel import ManagerError, PeerExists
    from pywg.manage.types import InvalidConfig

    try:
        return handler(args)
    except InvalidConfig as exc:
        where = OPTION_OF_FIELD.get(exc.field.split(".")[-1].split("[")[0], exc.field) if exc.field else ""
        print(f"pywg: {where + ': ' if where else ''}{exc.reason}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"pywg: {exc}", file=sys.stderr)
        return 2
    except PeerExists as exc:
        print(f"pywg: {exc} (to change it: pywg peer update {exc.iface} --public-key "
              f"{exc.public_key.to_base64()} ...)", file=sys.stderr)
        return 1
    except (ManagerError, KeyManagerError, Refused) as exc:
        print(f"pywg: {exc}", file=sys.stderr)
        return 1
    except KeyStoreError as exc:
        print(f"pywg: --keystore {getattr(args, 'keystore', '')}: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"pywg: no answer within {getattr(args, 'timeout', 0):g} s (--timeout)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pywg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still no traceback unless asked for
        if os.environ.get("PYWG_DEBUG", "") not in ("", "0"):
            raise
        print(f"pywg: {args.command} {getattr(args, 'action', '')} failed: {type(exc).__name__}: {exc} "
              "(PYWG_DEBUG=1 shows where)", file=sys.stderr)
        return 1


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # optional off Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def _manager(backend: Any = None) -> TunnelManager:
    from pywg.manage.backends import UapiBackend
    from pywg.manage.tunnel import TunnelManager

    return TunnelManager(backend if backend is not None else UapiBackend())


def _with_manager(args: argparse.Namespace, action: Callable[[TunnelManager], Awaitable[int]],
                  backend: Any = None) -> int:
    async def go() -> int:
        async with _manager(backend) as manager:
            manager.default_timeout = args.timeout
            return await action(manager)

    return _run(go())


def _read_key(path: str, option: str) -> Key | None:
    """A base64 key from a file (None when the file is empty)."""
    from pywg.manage.key import InvalidKey, Key

    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror}") from None
    if not text:
        return None
    try:
        return Key.parse(text)
    except InvalidKey as exc:
        raise UsageError(f"{option} {path}: {exc}") from None


def _print_interface(iface: WireGuardInterface, as_json: bool) -> None:
    if as_json:
        print(iface.to_json())
        return
    lines = [f"interface: {iface.name}"]
    if iface.public_key is not None:
        lines.append(f"  public key: {iface.public_key.to_base64()}")
    lines.append(f"  listening port: {iface.listen_port}")
    if iface.fw_mark:
        lines.append(f"  fwmark: {iface.fw_mark:#x}")
    lines.append(f"  address: {iface.address if iface.address is not None else '(none)'}")
    lines.append(f"  mtu: {iface.mtu}")
    for peer in iface.peers:
        lines += ["", f"peer: {peer.public_key.to_base64()}"]
        if peer.preshared_key is not None:
            lines.append("  preshared key: (hidden)")
        if peer.endpoint is not None:
            lines.append(f"  endpoint: {peer.endpoint}")
        lines.append(f"  allowed ips: {', '.join(map(str, peer.allowed_ips)) or '(none)'}")
        if peer.last_handshake is not None:
            lines.append(f"  latest handshake: {peer.last_handshake.isoformat(timespec='seconds')}")
        if peer.persistent_keepalive:
            lines.append(f"  persistent keepalive: every {peer.persistent_keepalive} seconds")
    print("\n".join(lines))


# --- interface ---------------------------------------------------------------------------


def _interface_create(args: argparse.Namespace) -> int:
    from pywg.manage.backends import InProcessBackend, UapiBackend
    from pywg.manage.key import Key
    from pywg.manage.types import InterfaceConfig

    data: dict[str, Any] = {"name": args.name, "listenPort": args.listen_port, "fwMark": args.fwmark,
                            "mtu": args.mtu}
    if args.address is not None:
        data["address"] = args.address
    config = InterfaceConfig.from_dict(data)
    private = Key.generate_private() if args.generate_key else None
    if args.private_key_file:
        private = _read_key(args.private_key_file, "--private-key-file")
    if private is not None:
        config = InterfaceConfig(name=config.name, private_key=private, listen_port=config.listen_port,
                                 fw_mark=config.fw_mark, address=config.address, mtu=config.mtu)
    if args.backend == "inprocess":
        return _run(_serve_in_process(args, config, InProcessBackend()))
    try:
        backend = UapiBackend(args.implementation)
    except ValueError as exc:
        raise UsageError(f"--implementation: {exc}") from None

    async def create(manager: TunnelManager) -> int:
        _print_interface(await manager.create_interface(config), args.json)
        return 0

    return _with_manager(args, create, backend)


async def _serve_in_process(args: argparse.Namespace, config: Any, backend: Any) -> int:
    manager = _manager(backend)
    manager.default_timeout = args.timeout
    try:
        iface = await manager.create_interface(config)
        _print_interface(iface, args.json)
        print(f"pywg: serving {iface.name} in this process (pid {os.getpid()}); Ctrl-C or "
              f"`pywg interface delete {iface.name}` ends it", file=sys.stderr)
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        while not stop.is_set() and await backend.exists(iface.name):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        return 0
    finally:
        await manager.aclose()


def _interface_delete(args: argparse.Namespace) -> int:
    async def delete(manager: TunnelManager) -> int:
        await manager.delete_interface(args.name)
        return 0

    return _with_manager(args, delete)


def _interface_show(args: argparse.Namespace) -> int:
    async def show(manager: TunnelManager) -> int:
        _print_interface(await manager.get_interface(args.name), args.json)
        return 0

    return _with_manager(args, show)


def _interface_list(args: argparse.Namespace) -> int:
    async def listing(manager: TunnelManager) -> int:
        names = await manager.list_interfaces()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0

    return _with_manager(args, listing)


# --- peer --------------------------------------------------------------------------------


def _endpoint(text: str) -> str:
    """An endpoint as the types read it; a host name is resolved (as ``wg`` does)."""
    import socket

    from pywg.manage.types import Endpoint, InvalidConfig

    try:
        return str(Endpoint.parse(text))
    except InvalidConfig as exc:
        host, sep, port = text.rpartition(":")
        if not sep or not host or host.startswith("[") or not port.isdigit():
            raise InvalidConfig(exc.reason, "endpoint") from None
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"--endpoint: cannot resolve {host!r}: {exc}") from None
    address = str(infos[0][4][0])
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _peer_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON fields the options give (only those given)."""
    data: dict[str, Any] = {}
    if args.allowed_ips is not None:
        data["allowedIps"] = [part.strip() for item in args.allowed_ips for part in item.split(",") if part.strip()]
    if args.endpoint is not None:
        data["endpoint"] = _endpoint(args.endpoint)
    if args.persistent_keepalive is not None:
        data["persistentKeepalive"] = args.persistent_keepalive
    if args.preshared_key_file is not None:
        psk = _read_key(args.preshared_key_file, "--preshared-key-file")
        data["presharedKey"] = None if psk is None else psk.to_base64()
    return data


def _parse_peer(data: dict[str, Any], option: str = "") -> WireGuardPeer:
    from pywg.manage.types import InvalidConfig, WireGuardPeer

    try:
        return WireGuardPeer.from_dict(data)
    except InvalidConfig as exc:
        if option and exc.field == "publicKey":
            raise UsageError(f"{option}: {exc.reason}") from None
        raise


def _peer_add(args: argparse.Namespace) -> int:
    peer = _parse_peer({"publicKey": args.public_key, **_peer_fields(args)})

    async def add(manager: TunnelManager) -> int:
        await manager.add_peer(args.name, peer)
        return 0

    return _with_manager(args, add)


def _peer_update(args: argparse.Namespace) -> int:
    from pywg.manage.tunnel import PeerNotFound

    given = _peer_fields(args)
    wanted = _parse_peer({"publicKey": args.public_key, **given})  # checks the input first

    new_key = None
    if args.new_public_key is not None:
        new_key = _parse_peer({"publicKey": args.new_public_key}, "--new-public-key").public_key

    async def update(manager: TunnelManager) -> int:
        current = next((p for p in (await manager.get_interface(args.name)).peers
                        if p.public_key == wanted.public_key), None)
        if current is None:
            raise PeerNotFound(args.name, wanted.public_key)
        merged = current.to_dict(include_secrets=True)
        merged.pop("lastHandshake", None)
        merged.update(given)
        kept = await manager.update_peer(args.name, _parse_peer(merged), new_public_key=new_key)
        if new_key is not None and not kept:
            print(f"pywg: {args.name} is not served by pywg, so the peer could not be renamed in place: it "
                  f"was replaced by {new_key.to_base64()} (same allowed IPs, endpoint, keepalive and "
                  "preshared key); its sessions ended, the next packet makes a handshake", file=sys.stderr)
        return 0

    return _with_manager(args, update)


def _peer_remove(args: argparse.Namespace) -> int:
    key = _parse_peer({"publicKey": args.public_key}).public_key

    async def remove(manager: TunnelManager) -> int:
        await manager.remove_peer(args.name, key)
        return 0

    return _with_manager(args, remove)


# --- key ---------------------------------------------------------------------------------


def _key_rotate(args: argparse.Namespace) -> int:
    from pywg.manage.keymanager import KeyManager
    from pywg.manage.keystore import KeyStore
    from pywg.manage.tunnel import InterfaceNotFound

    try:
        keystore = KeyStore(args.keystore)
    except ValueError as exc:
        raise UsageError(f"--keystore {args.keystore}: {exc}") from None
    for name in args.peer:
        if name == args.ifname:
            raise UsageError(f"--peer {name}: that is the interface being rotated")
    _show_progress()

    async def rotate(manager: TunnelManager) -> int:
        iface = await manager.get_interface(args.ifname)
        if iface.public_key is None:
            raise Refused(f"key rotate: {args.ifname} has no private key yet: nothing to rotate "
                          "(give it one: wg set IFNAME private-key FILE)")
        old = iface.public_key
        managed: dict[str, Key | None] = {}
        for name in args.peer:
            try:
                remote = await manager.get_interface(name)
            except InterfaceNotFound as exc:
                raise Refused(f"--peer {name}: {exc}") from None
            if old not in {p.public_key for p in remote.peers}:
                raise Refused(f"--peer {name}: {name} has no peer {old.to_base64()}, so it is not a peer of "
                              f"{args.ifname}")
            managed[name] = remote.public_key
        others = [p for p in iface.peers if p.public_key not in set(managed.values())]
        if others and not args.tell_peers:
            listed = "; ".join(_describe_peer(p) for p in others)
            raise Refused(
                f"key rotate: {args.ifname} has {len(others)} peer(s) this command would not tell the new "
                f"key: {listed}. A peer left on the old key loses the tunnel once its sessions expire "
                "(about 3 minutes). Name each peer's interface that runs on this machine with --peer "
                "PEER_IFNAME (it is renamed in place, sessions kept); for peers elsewhere add --tell-peers "
                "(and a long enough --overlap): the command then prints what each must run. Nothing was "
                "changed.")
        keys = KeyManager(keystore, manager, timeout=args.timeout)
        return await _rotate_with_progress(args, keys, manager, old, others, state)

    state: dict[str, Any] = {"new": None, "interrupted": False, "started": False}
    try:
        return _with_manager(args, rotate)
    except KeyboardInterrupt:  # before the rotation's own interrupt handling was in place
        if state["started"]:
            print(f"pywg: key rotate: interrupted; check {args.ifname} with `pywg interface show "
                  f"{args.ifname}` and its peers", file=sys.stderr)
        else:
            print("pywg: key rotate: interrupted before the rotation began; nothing changed", file=sys.stderr)
        return 130


def _describe_peer(peer: WireGuardPeer) -> str:
    where = f" at {peer.endpoint}" if peer.endpoint is not None else ""
    return f"{peer.public_key.to_base64()}{where} (allowed IPs {', '.join(map(str, peer.allowed_ips)) or 'none'})"


def _show_progress() -> None:
    """The rotation's steps (the KeyManager logs them at INFO) on stderr, as they happen."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pywg: %(message)s"))
    logger = logging.getLogger("pywg.manage.keymanager")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


async def _rotate_with_progress(args: argparse.Namespace, keys: Any, manager: TunnelManager, old: Key,
                                others: Sequence[WireGuardPeer], state: dict[str, Any]) -> int:
    """Rotate; print the new key the moment it is in use, then a countdown of the overlap.
    Ctrl-C before that undoes the rotation; during the overlap it ends the overlap at once.
    Either way the command says in which state it left the interface."""
    import time

    loop = asyncio.get_running_loop()
    where = f"{os.path.join(args.keystore, args.ifname)}, the old key as {args.ifname}.previous"

    def in_use(public: Key) -> None:
        state["new"], state["since"] = public, time.monotonic()
        print(json.dumps({"publicKey": public.to_base64()}, indent=2) if args.json else public.to_base64(),
              flush=True)
        print(f"pywg: {args.ifname} uses its new key {public.to_base64()} now (stored in {where}); the old "
              f"key stays accepted for {args.overlap:g} s", file=sys.stderr, flush=True)
        for peer in others:
            print(f"pywg: peer {_describe_peer(peer)} does not know the new key yet. Before the overlap ends, "
                  f"run there: pywg peer update PEER_IFNAME --public-key {old.to_base64()} --new-public-key "
                  f"{public.to_base64()}   (another WireGuard: wg set PEER_IFNAME peer {old.to_base64()} "
                  f"remove, then add peer {public.to_base64()} with the same allowed-ips and endpoint)",
                  file=sys.stderr, flush=True)

    task: asyncio.Task[Any] | None = None

    def interrupt() -> None:
        state["interrupted"] = True
        if task is not None:
            task.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    loop.add_signal_handler(signal.SIGTERM, interrupt)
    try:
        # An interrupt that came before the handlers were in place cancelled this task: it
        # surfaces here, before anything changed (and reads "nothing changed").
        await asyncio.sleep(0)
        if state["interrupted"]:
            raise KeyboardInterrupt
        state["started"] = True
        task = loop.create_task(keys.rotate_keys(args.ifname, peers=[(manager, name) for name in args.peer],
                                                 overlap=args.overlap, on_new_key=in_use))
        while not task.done():
            await asyncio.wait([task], timeout=PROGRESS_EVERY)
            left = args.overlap - (time.monotonic() - state["since"]) if state["new"] is not None else 0
            if not task.done() and left >= 1:
                print(f"pywg: overlap: the old key is accepted for {left:.0f} s more (Ctrl-C ends the "
                      "overlap now)", file=sys.stderr, flush=True)
        try:
            task.result()
        except asyncio.CancelledError:
            pass
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        await keys.aclose()  # an overlap cut short: the old key is dropped now
    if state["new"] is None:
        print(f"pywg: key rotate: interrupted before the new key was in use; undone: {args.ifname} keeps its "
              f"key {old.to_base64()} and its peers know it by that key", file=sys.stderr)
        return 130
    if state["interrupted"]:
        print(f"pywg: key rotate: interrupted during the overlap: {args.ifname} uses the new key "
              f"{state['new'].to_base64()} (stored in {where}); the overlap was ended early: the old key is "
              "no longer accepted" + (", so the peers listed above must be given the new key now"
                                      if others else ""), file=sys.stderr)
        return 130
    print(f"pywg: the overlap is over: {args.ifname}'s old key is no longer accepted", file=sys.stderr)
    return 0


def _key_generate(args: argparse.Namespace) -> int:
    from pywg.manage.key import Key

    if not args.private_key_file and not args.print_private:
        raise UsageError("key generate: say where the private key goes: --private-key-file OUT and/or "
                         "--print-private")
    private = Key.generate_private()
    if args.private_key_file:
        try:
            fd = os.open(args.private_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(f"--private-key-file {args.private_key_file}: exists; not overwriting a "
                             "key (remove it first)") from None
        except OSError as exc:
            raise UsageError(f"--private-key-file {args.private_key_file}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(private.to_base64() + "\n")
            f.flush()
            os.fsync(f.fileno())
    public = private.public_key().to_base64()
    if args.json:
        out: dict[str, str] = {"publicKey": public}
        if args.print_private:
            out["privateKey"] = private.to_base64()
        print(json.dumps(out, indent=2))
    else:
        if args.print_private:
            print(f"private key: {private.to_base64()}")
        print(public if not args.print_private else f"public key: {public}")
    return 0


if __name__ == "__main__":
    run()
