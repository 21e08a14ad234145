"""``pywg coordinator ...``: the coordinator from the shell.

- ``serve --listen ADDR:PORT --store sqlite:PATH|postgresql://... [--prefix4 CIDR] [--prefix6 CIDR]
  [--admin-token-file FILE] [--limit-per-address RATE[:BURST]] [--limit-per-key RATE[:BURST]]``:
  aiohttp on uvloop until SIGINT/SIGTERM. Port 0 picks a free port; the address bound is
  printed (``listening on http://HOST:PORT``). ``--admin-token-file``: the admin token
  (read if the file exists, else a new one is written there, mode 0600).
  ``--tls-cert FILE --tls-key FILE``: HTTPS; with ``--client-ca BUNDLE --trust-domain D[,D]``
  agents may register with an X.509-SVID instead of a pre-auth key (see pywg.mesh.spiffe).
- ``serve ... --stun HOST:PORT[,HOST:PORT...]``: the STUN servers agents use (IPv4:PORT,
  [IPv6]:PORT), handed to them as ``stunServers``.
- ``serve ... --preshared-keys SECRET_FILE``: per-pair preshared keys (pywg.mesh.psk);
  ``psk-secret create FILE`` writes a new secret (0600, never overwriting).
- ``authkey create --store STORE [--reusable] [--expires DURATION]`` prints a new
  pre-auth key (only the key, on stdout); ``authkey list``, ``authkey revoke ID``.
- ``nodes --store STORE [--json]``: each node with its last contact and health report and
  the connections it reports (status, last handshake, rx/tx bytes, endpoint);
  ``node remove ID --store STORE``.
- ``topology --coordinator URL --token-file FILE [--json]``: the spec's MeshTopology
  from a running coordinator (``--json``: the MeshTopology alone; the text also shows the
  ``stunServers`` served beside it); FILE holds the admin token (``serve --admin-token-file``)
  or a node token.

``--database`` is another spelling of ``--store``. With ``postgresql://...`` any number
of ``serve`` processes share the database (their watchers are woken by NOTIFY).
The store commands work on the file directly, also while ``serve`` runs on it (the
server sees their changes within its poll interval). Exit status: 0 done, 1 the
operation failed, 2 bad input; errors name the option, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pywg.manage.types import InvalidConfig

# Store fields -> the option that set them, for error messages.
_OPTION_OF_FIELD = {"prefix4": "--prefix4", "prefix6": "--prefix6", "id": "ID"}
_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")


class CliError(Exception):
    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def parse_duration(text: str, option: str = "--expires") -> float:
    """``90s``, ``15m``, ``24h``, ``7d``, ``1h30m`` -> seconds (> 0)."""
    m = _DURATION.fullmatch(text)
    if not text or not m:
        raise CliError(f"{option}: expected a duration like 90s, 15m, 24h, 7d or 1h30m, got {text!r}")
    d, h, mi, s = (int(g or 0) for g in m.groups())
    seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    if seconds <= 0:
        raise CliError(f"{option}: the duration must be more than 0")
    return float(seconds)


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[V6]:PORT``; port 0 picks one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise CliError(f"--listen: expected ADDR:PORT (IPv6: [ADDR]:PORT), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise CliError(f"--listen: the address is an IP address, got {host!r}") from None
    return host, int(port)


def _parse_limit(text: str, option: str) -> tuple[float, float]:
    rate, _, burst = text.partition(":")
    try:
        r = float(rate)
        b = float(burst) if burst else max(1.0, r)
    except ValueError:
        raise CliError(f"{option}: expected RATE[:BURST] (registrations per second), got {text!r}") from None
    if not (r > 0 and b >= 1 and r < float("inf") and b < float("inf")):
        raise CliError(f"{option}: the rate must be > 0 and the burst >= 1")
    return r, b


class _StoreOption(argparse.Action):
    """--store/--database: remembers which spelling was given, so errors name it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.store_option = option_string or "--store"


def add_parser(commands: Any) -> None:
    """Add ``coordinator`` and its subcommands to the ``pywg`` parser."""
    coord = commands.add_parser("coordinator", help="the mesh coordinator: serve, pre-auth keys, nodes")
    sub = coord.add_subparsers(dest="action", required=True)

    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", "--database", required=True, metavar="STORE", action=_StoreOption,
                       help="sqlite:PATH, or postgresql://USER[:PASSWORD]@HOST:PORT/DB shared by replicas")

    serve = sub.add_parser("serve", help="run the coordinator (aiohttp on uvloop)")
    serve.add_argument("--listen", required=True, metavar="ADDR:PORT", help="e.g. 0.0.0.0:8080 or [::]:8080")
    store_arg(serve)
    serve.add_argument("--prefix4", metavar="CIDR", help="the mesh IPv4 prefix (default 100.64.0.0/10)")
    serve.add_argument("--prefix6", metavar="CIDR", help="the mesh IPv6 prefix (default: a random ULA /48)")
    serve.add_argument("--admin-token-file", metavar="FILE",
                       help="the admin token: read if FILE exists, else created (mode 0600)")
    serve.add_argument("--poll-interval", type=float, default=0.25, metavar="SECONDS",
                       help="how often to look for other processes' writes (default 0.25; "
                            "PostgreSQL's NOTIFY wakes the server at once, the poll is the fallback)")
    serve.add_argument("--offline-after", type=float, default=90.0, metavar="SECONDS",
                       help="a node without contact for this long is shown offline, unless its health "
                            "reports say their interval: then after 3 missed reports (default 90)")
    serve.add_argument("--limit-per-address", metavar="RATE[:BURST]", default="5:20",
                       help="registrations per second from one source address (default 5:20)")
    serve.add_argument("--limit-per-key", metavar="RATE[:BURST]", default="50:200",
                       help="registrations per second with one pre-auth key (default 50:200)")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate (chain)")
    serve.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    serve.add_argument("--client-ca", metavar="BUNDLE",
                       help="PEM CA bundle: clients may register with an X.509-SVID chaining to it")
    serve.add_argument("--trust-domain", metavar="DOMAIN[,DOMAIN]",
                       help="the SPIFFE trust domains whose SVIDs may register (with --client-ca)")
    serve.add_argument("--preshared-keys", metavar="SECRET_FILE",
                       help="give every pair of nodes a preshared key derived from this secret "
                            "(0600; the same file on every replica; see psk-secret create)")
    serve.add_argument("--stun", metavar="HOST:PORT[,HOST:PORT]",
                       help="STUN servers the agents use (IPv4:PORT or [IPv6]:PORT; two let them "
                            "classify their NAT's mapping); sent in the register response, the topology "
                            "and the watch snapshot as stunServers")
    serve.add_argument("--derp-map", metavar="FILE",
                       help="the DERP relays (Tailscale's DERPMap JSON) the agents use when no direct "
                            "path exists; sent in the register response, the topology and the watch "
                            "snapshot as derpMap")
    serve.add_argument("--nat-observer", metavar="IP:PORT",
                       help="serve the NAT mapping-lifetime observer on this UDP address (agents behind "
                            "a NAT learn their keepalive from it); sent to agents as natObserver")
    serve.set_defaults(handler_fn=_serve)
    psk_secret = sub.add_parser("psk-secret", help="the secret per-pair preshared keys derive from")
    psk_create = psk_secret.add_subparsers(dest="pskaction", required=True).add_parser(
        "create", help="write a new random secret to FILE (0600; never overwrites)")
    psk_create.add_argument("file", metavar="FILE")
    psk_create.set_defaults(handler_fn=_psk_secret_create)

    authkey = sub.add_parser("authkey", help="pre-auth keys").add_subparsers(dest="keyaction", required=True)
    create = authkey.add_parser("create", help="a new pre-auth key (printed once; stored hashed)")
    store_arg(create)
    create.add_argument("--reusable", action="store_true", help="may register any number of nodes")
    create.add_argument("--expires", metavar="DURATION", help="e.g. 1h, 7d (default: never)")
    create.set_defaults(handler_fn=_authkey_create)
    listing = authkey.add_parser("list", help="pre-auth keys (ids and state, never the secrets)")
    store_arg(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler_fn=_authkey_list)
    revoke = authkey.add_parser("revoke", help="revoke a pre-auth key (its nodes stay)")
    revoke.add_argument("id", metavar="ID")
    store_arg(revoke)
    revoke.set_defaults(handler_fn=_authkey_revoke)

    nodes = sub.add_parser("nodes", help="the registered nodes")
    store_arg(nodes)
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(handler_fn=_nodes)
    node = sub.add_parser("node", help="one node").add_subparsers(dest="nodeaction", required=True)
    remove = node.add_parser("remove", help="remove a node (and its token and connections)")
    remove.add_argument("id", metavar="ID")
    store_arg(remove)
    remove.set_defaults(handler_fn=_node_remove)

    topo = sub.add_parser("topology", help="the spec's MeshTopology from a running coordinator")
    topo.add_argument("--coordinator", required=True, metavar="URL", help="e.g. http://10.0.0.1:8080")
    topo.add_argument("--token-file", required=True, metavar="FILE", help="the admin token or a node token")
    topo.add_argument("--json", action="store_true", help="print the MeshTopology JSON")
    topo.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    topo.add_argument("--trust-bundle", "--ca", metavar="PEM", help="CA certificates that verify an https:// coordinator")
    topo.set_defaults(handler_fn=_topology)

    coord.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run a ``coordinator`` subcommand; errors become a message and an exit status."""
    from pywg.mesh.store import StoreError

    try:
        return int(args.handler_fn(args)) if hasattr(args, "handler_fn") else 2
    except CliError as exc:
        print(f"pywg: {exc}", file=sys.stderr)
        return exc.status
    except InvalidConfig as exc:
        where = _OPTION_OF_FIELD.get(exc.field, exc.field)
        print(f"pywg: {where + ': ' if where else ''}{exc.reason}", file=sys.stderr)
        return 2
    except StoreError as exc:
        where = _OPTION_OF_FIELD.get(exc.field, exc.field)
        print(f"pywg: {where + ': ' if where else ''}{exc.reason}", file=sys.stderr)
        return 2 if exc.status == 400 else 1
    except OSError as exc:
        print(f"pywg: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    except Exception as exc:  # sqlite3.Error and the like: one line, no traceback
        option = getattr(args, "store_option", "--store")
        if type(exc).__module__ == "sqlite3":
            print(f"pywg: {option}: {exc}", file=sys.stderr)
            return 1
        if type(exc).__module__.startswith("psycopg"):  # the server went away mid-command
            from pywg.mesh.postgres_store import _scrub, redact

            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"pywg: {option}: {redact(args.store)}: {_scrub(line, args.store)}", file=sys.stderr)
            return 1
        raise


def _open(args: argparse.Namespace, **kw: Any) -> Any:
    from pywg.mesh.store import open_store

    return open_store(args.store, field=getattr(args, "store_option", "--store"), **kw)


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- store commands ---------------------------------------------------------------------


def _authkey_create(args: argparse.Namespace) -> int:
    expires = None if args.expires is None else parse_duration(args.expires)
    store = _open(args)
    try:
        now = time.time()
        info, text = store.create_auth_key(
            reusable=args.reusable, expires_at=None if expires is None else now + expires, now=now
        )
    finally:
        store.close()
    print(text)
    kind = "reusable" if info.reusable else "one-off"
    print(f"pre-auth key {info.id}: {kind}, expires {_when(info.expires_at)}", file=sys.stderr)
    return 0


def _authkey_list(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        keys, now = store.auth_keys(), time.time()
    finally:
        store.close()
    rows = [
        {"id": k.id, "reusable": k.reusable, "state": k.state(now), "uses": k.uses,
         "createdAt": _when(k.created_at), "expiresAt": None if k.expires_at is None else _when(k.expires_at)}
        for k in keys
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['id']}  {'reusable' if r['reusable'] else 'one-off':8}  {r['state']:7}  "
                  f"uses {r['uses']}  expires {r['expiresAt'] or 'never'}")
    return 0


def _authkey_revoke(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        info = store.revoke_auth_key(args.id, now=time.time())
    finally:
        store.close()
    print(f"revoked pre-auth key {info.id}")
    return 0


def _nodes(args: argparse.Namespace) -> int:
    from pywg.mesh.health import rtt_text

    store = _open(args)
    try:
        nodes, health = store.nodes(), store.connection_health()
    finally:
        store.close()
    by_from: dict[str, list[Any]] = {}
    for h in health:
        by_from.setdefault(h.connection.from_node, []).append(h)
    if args.json:
        rows = [{**n.view(), "identity": f"{n.identity_kind}:{n.identity}",
                 "createdAt": _when(n.created_at), "lastContact": _when(n.last_contact),
                 "lastReport": None if n.last_report is None else _when(n.last_report),
                 "offlineAfter": n.offline_after,
                 "connections": [h.to_dict() for h in by_from.get(n.id, [])]} for n in nodes]
        print(json.dumps(rows, indent=2))
        return 0
    names = {n.id: n.name for n in nodes}
    for n in nodes:
        eps = ",".join(str(e) for e in n.endpoints) or "-"
        state = "online" if n.online else "offline"
        report = "never" if n.last_report is None else _when(n.last_report)
        print(f"{n.id}  {n.name}  {n.ipv4}  {n.ipv6}  {eps}  {state}, last contact {_when(n.last_contact)}, "
              f"last report {report}")
        for h in by_from.get(n.id, []):
            c = h.connection
            hs = "never" if h.last_handshake is None else _when(h.last_handshake)
            print(f"  -> {names.get(c.to_node, c.to_node)}: {c.status.value}, rtt {rtt_text(c.latency_us)}, "
                  f"handshake {hs}, "
                  f"rx {h.rx_bytes if h.rx_bytes is not None else '?'} B, "
                  f"tx {h.tx_bytes if h.tx_bytes is not None else '?'} B, endpoint {h.endpoint or '-'}")
    return 0


def _node_remove(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        node = store.node(args.id)
        revision = store.remove_node(args.id, now=time.time())
    finally:
        store.close()
    print(f"removed node {args.id} ({node.name if node else '?'}) at revision {revision}")
    return 0


# --- serve --------------------------------------------------------------------------------


def _admin_token(path: str | None) -> str | None:
    """The admin token's digest (the file is read, or created with a new token)."""
    from pywg.mesh import credentials

    if path is None:
        return None
    try:
        with open(path) as f:
            token = f.read().strip()
    except FileNotFoundError:
        token = credentials.new_admin_token()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    if not token.startswith(credentials.ADMIN_TOKEN_PREFIX) or len(token) < 40:
        raise CliError(f"--admin-token-file: {path} does not hold an admin token "
                       f"({credentials.ADMIN_TOKEN_PREFIX}...)")
    return credentials.digest(token)


def _psk_secret(path: str | None) -> Any:
    from pywg.mesh import psk

    try:
        return None if path is None else psk.load_secret_file(path)
    except psk.SecretFileError as exc:
        raise CliError(f"--preshared-keys: {exc}") from None


def _psk_secret_create(args: argparse.Namespace) -> int:
    from pywg.mesh import psk

    try:
        psk.create_secret_file(args.file)
    except FileExistsError:
        raise CliError(f"FILE: {args.file} exists; it is not overwritten (agents' keys derive from it)", 1) from None
    print(f"pywg coordinator: wrote a new preshared-key secret to {args.file} (mode 0600)", file=sys.stderr)
    return 0


def _tls_options(args: argparse.Namespace) -> tuple[Any, tuple[str, ...]]:
    """The server's TLS context (None: plain HTTP) and the allowed SPIFFE trust domains."""
    from pywg.mesh import spiffe, tls

    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together")
    if args.client_ca is not None and args.tls_cert is None:
        raise CliError("--client-ca needs --tls-cert and --tls-key (SVIDs are presented over TLS)")
    if (args.client_ca is None) != (args.trust_domain is None):
        raise CliError("--client-ca and --trust-domain go together")
    domains: tuple[str, ...] = ()
    if args.trust_domain is not None:
        try:
            domains = tuple(spiffe.parse_trust_domain(d.strip()) for d in args.trust_domain.split(","))
        except spiffe.SvidError as exc:
            raise CliError(f"--trust-domain: {exc.reason}") from None
    if args.tls_cert is None:
        return None, domains
    try:
        return tls.server_context(args.tls_cert, args.tls_key, args.client_ca), domains
    except tls.TlsError as exc:
        raise CliError(str(exc)) from None


def _derp_map(path: str | None) -> dict[str, Any] | None:
    """``--derp-map FILE`` read strictly (pywg.derp.derpmap): its JSON as agents get it."""
    from pywg.derp.derpmap import DerpMapError, parse_derp_map

    if path is None:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"--derp-map: {path}: {exc.strerror or exc}") from None
    try:
        derp_map = parse_derp_map(text)
    except DerpMapError as exc:
        raise CliError(f"--derp-map: {path}: {exc}") from None
    if not derp_map.regions:
        raise CliError(f"--derp-map: {path}: no regions")
    return derp_map.to_json()


def _stun_servers(text: str | None) -> tuple[str, ...]:
    """``--stun``'s servers as the agents get them ("HOST:PORT" each)."""
    from pywg.nat import stun_servers

    if text is None:
        return ()
    try:
        return tuple(stun_servers.format_server(s) for s in stun_servers.parse_servers(text))
    except stun_servers.BadServerList as exc:
        raise CliError(f"--stun: {exc}") from None


def _nat_observer(text: str | None) -> str | None:
    """``--nat-observer``'s address, "IP:PORT" (an address the agents can send to)."""
    if text is None:
        return None
    from pywg.manage.types import Endpoint, InvalidConfig

    try:
        ep = Endpoint.parse(text.strip())
    except InvalidConfig as exc:
        raise CliError(f"--nat-observer: {exc.reason} (an IP address and a UDP port, e.g. 203.0.113.1:3479)") from None
    if ep.host.is_unspecified or ep.port == 0:
        raise CliError("--nat-observer: agents send to this address: give a concrete IP and port, e.g. 203.0.113.1:3479")
    return str(ep)


def _serve(args: argparse.Namespace) -> int:
    from pywg.mesh import addressing
    from pywg.mesh.coordinator import Config, Limits

    host, port = parse_listen(args.listen)
    prefix4 = None if args.prefix4 is None else addressing.parse_prefix4(args.prefix4, "--prefix4")
    prefix6 = None if args.prefix6 is None else addressing.parse_prefix6(args.prefix6, "--prefix6")
    a_rate, a_burst = _parse_limit(args.limit_per_address, "--limit-per-address")
    k_rate, k_burst = _parse_limit(args.limit_per_key, "--limit-per-key")
    if not 1.0 <= args.offline_after <= 86400 * 365:
        raise CliError("--offline-after: expected 1 to 31536000 seconds")
    if not 0.01 <= args.poll_interval <= 3600:
        raise CliError("--poll-interval: expected 0.01 to 3600 seconds")
    stun = _stun_servers(args.stun)
    derp_map = _derp_map(args.derp_map)
    observer = _nat_observer(args.nat_observer)
    admin = _admin_token(args.admin_token_file)
    tls, trust_domains = _tls_options(args)
    config = Config(admin_token_digest=admin, limits=Limits(a_rate, a_burst, k_rate, k_burst),
                    poll_interval=args.poll_interval, offline_after=args.offline_after,
                    trust_domains=trust_domains, preshared_secret=_psk_secret(args.preshared_keys),
                    stun_servers=stun, derp_map=derp_map, nat_observer=observer)
    store = _open(args, prefix4=prefix4, prefix6=prefix6)
    try:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:  # uvloop is not built for this platform
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve_async(store, config, host, port, tls))
    finally:
        store.close()


async def _start_nat_observer(app: Any, store: Any, config: Any) -> Any:
    """The mapping-lifetime observer on ``config.nat_observer`` (None when not asked for)."""
    if config.nat_observer is None:
        return None
    from pywg.manage.types import Endpoint
    from pywg.mesh.coordinator import COORDINATOR
    from pywg.mesh.nat_observer import NatObserver, store_lookup

    ep = Endpoint.parse(config.nat_observer)
    try:
        observer = await NatObserver.serve(str(ep.host), ep.port, store_lookup(app[COORDINATOR].run, store.token_digest))
    except OSError as exc:
        raise CliError(f"--nat-observer {config.nat_observer}: {exc.strerror or exc}", 1) from None
    print(f"pywg coordinator: NAT observer on udp {config.nat_observer}", flush=True)
    return observer


async def _serve_async(store: Any, config: Any, host: str, port: int, tls: Any = None) -> int:
    from aiohttp import web

    from pywg.mesh.coordinator import create_app

    app = create_app(store, config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise CliError(f"--listen {host}:{port}: {exc.strerror or exc}", 1) from None
        observer = await _start_nat_observer(app, store, config)
        for addr in runner.addresses:
            shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            print(f"pywg coordinator: listening on {'https' if tls else 'http'}://{shown}:{addr[1]} "
                  f"(store {store.prefix4} {store.prefix6})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            if observer is not None:
                await observer.close()
    finally:
        await runner.cleanup()
    return 0


# --- topology ------------------------------------------------------------------------------


def _topology(args: argparse.Namespace) -> int:
    from pywg.manage.types import MeshTopology

    try:
        with open(args.token_file) as f:
            token = f.read().strip()
    except OSError as exc:
        raise CliError(f"--token-file: {exc.strerror}: {args.token_file}") from None
    url = args.coordinator.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CliError(f"--coordinator: expected http://HOST:PORT or https://..., got {args.coordinator!r}")
    from pywg.mesh import agent_tls

    contexts = agent_tls.agent_tls([url], args.trust_bundle, None, None, CliError)
    status, body = asyncio.run(_get(url + "/api/v1/topology", token, args.timeout,
                                    contexts.current() if contexts else True))
    if status != 200:
        try:
            reason = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            reason = body[:200]
        raise CliError(f"--coordinator: {url} answered {status}: {reason}", 1)
    try:
        data = json.loads(body)
        stun = data.pop("stunServers", []) if isinstance(data, dict) else []
    except ValueError:
        raise CliError(f"--coordinator: {url} answered no JSON: {body[:200]!r}", 1) from None
    topo = MeshTopology.from_json(json.dumps(data))
    if args.json:
        print(topo.to_json())  # the spec's MeshTopology only (a strict reader takes it as it is)
        return 0
    for n in topo.nodes:
        print(f"{n.id}  {n.internal_ip}  {n.public_key.to_base64()}  {n.endpoint or '-'}  {n.region or '-'}")
    for c in topo.connections:
        print(f"{c.from_node} -> {c.to_node}  {c.status.value}{'  (relay)' if c.via_relay else ''}")
    if stun:
        print(f"stun {','.join(str(s) for s in stun)}")
    return 0


async def _get(url: str, token: str, timeout: float, tls: Any = True) -> tuple[int, str]:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url, headers={"Authorization": f"Bearer {token}"}, ssl=tls) as resp,
        ):
            return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(f"--coordinator: cannot reach {url}: {exc or type(exc).__name__}", 1) from None
