"""``pywg agent up|status|down|rotate``: the mesh agent from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_STATE = "/var/lib/pywg/agent"


class AgentCliError(Exception):
    pass


def add_parser(commands: Any) -> None:
    """Add ``agent`` and its subcommands to the ``pywg`` parser."""
    agent = commands.add_parser("agent", help="the mesh agent: join a coordinator's mesh")
    sub = agent.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="register and keep the interface in step with the mesh (foreground)")
    up.add_argument("--coordinator", required=True, metavar="URL", help="e.g. http://10.0.0.1:8080; replicas: a comma list, tried in turn")
    cred = up.add_mutually_exclusive_group(required=True)
    cred.add_argument("--authkey-file", metavar="FILE",
                      help="the pre-auth key, read from FILE ('-': stdin); never on the command line")
    cred.add_argument("--svid", metavar="CERT", help="register with this X.509-SVID (PEM chain, leaf first; "
                      "re-read when it changes on disk) over mTLS; needs --svid-key and --trust-bundle")
    up.add_argument("--svid-key", metavar="KEY", help="the SVID's private key (PEM); it never leaves this host")
    up.add_argument("--trust-bundle", "--ca", metavar="PEM",
                    help="CA certificates that verify an https:// coordinator (default: the system's)")
    up.add_argument("--interface", default="pywg0", metavar="IFNAME")
    up.add_argument("--state-dir", default=DEFAULT_STATE, metavar="DIR")
    up.add_argument("--name", metavar="NAME", help="the node name (a DNS label; default: the host name)")
    up.add_argument("--listen-port", type=int, default=51820, metavar="PORT")
    up.add_argument("--daemon-command", metavar="CMD", help="the UAPI daemon (default pywg-daemon; e.g. wireguard-go)")
    up.add_argument("--engine", choices=("daemon", "in-process"), default="daemon",
                    help="daemon (default): the interface is a UAPI daemon's and outlives the agent (a "
                         "restart or crash of the agent keeps the tunnels); in-process: pywg's engine runs "
                         "in the agent (still serving the UAPI socket for wg), and ends with it")
    up.add_argument("--health-interval", type=float, default=10.0, metavar="SECONDS",
                    help="how often to probe the peers and report health to the coordinator (0.5..3600; "
                         "default 10); 3 missed reports and the coordinator shows this node offline; a peer "
                         "silent for 15 s + this is reported disconnected")
    up.add_argument("--rotate-every", metavar="DURATION",
                    help="rotate the node's key mesh-wide when it is this old, e.g. 30d, 12h (its age is kept "
                    "in the KeyStore, so restarts keep the schedule)")
    up.add_argument("--stun", metavar="IP:PORT[,IP:PORT...]",
                    help="STUN servers for NAT traversal (--engine in-process), instead of the coordinator's; "
                         "two or more on different addresses tell the NAT's mapping behaviour")
    up.add_argument("--derp-plain-http", action="store_true",
                    help="dial the coordinator's DERP relays over plain HTTP, without TLS (test labs only)")
    up.add_argument("--derp-remeasure", type=float, default=60.0, metavar="SECONDS",
                    help="how often to measure the DERP regions again and move the home region to one "
                         "clearly faster (1..3600; default 60)")
    up.add_argument("--nat-observer", metavar="IP:PORT",
                    help="the NAT mapping-lifetime observer (coordinator serve --nat-observer) to learn the "
                         "keepalive from, instead of the coordinator's (--engine in-process)")
    up.set_defaults(handler=_run(_up))
    status = sub.add_parser("status", help="the node, its peers and the coordinator connection")
    status.add_argument("--state-dir", default=DEFAULT_STATE, metavar="DIR")
    status.add_argument("--json", action="store_true", help="print status.json with running and pid")
    status.set_defaults(handler=_run(_status))
    down = sub.add_parser("down", help="stop the agent and remove its interface")
    down.add_argument("--state-dir", default=DEFAULT_STATE, metavar="DIR")
    down.set_defaults(handler=_run(_down))
    rotate = sub.add_parser("rotate", help="give the running agent's node a new key, mesh-wide, without loss; "
                            "prints the new public key once it is in use")
    rotate.add_argument("--state-dir", default=DEFAULT_STATE, metavar="DIR")
    rotate.add_argument("--overlap", type=float, default=None, metavar="SECONDS",
                        help="how long the old key stays accepted once the new one is in use (default 15)")
    rotate.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="give up waiting for the agent after this long (the rotation goes on)")
    rotate.set_defaults(handler=_run(_rotate))


def _run(fn: Any) -> Any:
    def handler(args: argparse.Namespace) -> int:
        from pywg.manage.types import InvalidConfig

        try:
            return int(fn(args))
        except AgentCliError as exc:
            print(f"pywg: {exc}", file=sys.stderr)
            return 2
        except InvalidConfig as exc:
            print(f"pywg: {exc.field + ': ' if exc.field else ''}{exc.reason}", file=sys.stderr)
            return 2
    return handler


def _read_authkey(path: str) -> str:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise AgentCliError(f"--authkey-file: {exc.strerror}: {path}") from None
    key = text.strip()
    if not key or "\n" in key:
        raise AgentCliError(f"--authkey-file: expected one pre-auth key in {path}")
    return key


def _up(args: argparse.Namespace) -> int:
    from pywg.manage.types import Endpoint, InvalidConfig
    from pywg.mesh.agent import Agent, AgentConfig, RegistrationFailed
    from pywg.mesh.failover import BadCoordinatorList, parse_urls
    from pywg.mesh.wire import read_name

    try:
        urls = parse_urls(args.coordinator)
    except BadCoordinatorList as exc:
        raise AgentCliError(f"--coordinator: {exc}") from None
    if args.engine == "in-process" and args.daemon_command is not None:
        raise AgentCliError("--daemon-command: a daemon is not used with --engine in-process")
    if not 1 <= args.listen_port <= 65535:
        raise AgentCliError(f"--listen-port: expected 1..65535, got {args.listen_port}")
    from pywg.mesh import health

    if not health.MIN_INTERVAL_S <= args.health_interval <= health.MAX_INTERVAL_S:
        raise AgentCliError(f"--health-interval: expected {health.MIN_INTERVAL_S:g}..{health.MAX_INTERVAL_S:g} "
                            f"seconds, got {args.health_interval:g}")
    if not 1 <= args.derp_remeasure <= 3600:  # (NaN fails too)
        raise AgentCliError(f"--derp-remeasure: expected 1..3600 seconds, got {args.derp_remeasure:g}")
    name = args.name or re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower()).strip("-")[:63]
    try:
        read_name(name)
    except InvalidConfig as exc:
        raise AgentCliError(f"--name: {exc.reason}") from None
    from pywg.mesh.agent_tls import agent_tls

    tls = agent_tls(urls, args.trust_bundle, args.svid, args.svid_key, AgentCliError)
    rotate_every = None
    if args.rotate_every is not None:
        from pywg.mesh.cli import CliError, parse_duration

        try:
            rotate_every = parse_duration(args.rotate_every, "--rotate-every")
        except CliError as exc:
            raise AgentCliError(str(exc)) from None
    stun = None
    if args.stun is not None:
        if args.engine != "in-process":
            raise AgentCliError("--stun: NAT traversal needs --engine in-process")
        from pywg.nat import stun_servers

        try:
            stun = tuple(stun_servers.format_server(s) for s in stun_servers.parse_servers(args.stun))
        except stun_servers.BadServerList as exc:
            raise AgentCliError(f"--stun: {exc}") from None
    observer = None
    if args.nat_observer is not None:
        if args.engine != "in-process":
            raise AgentCliError("--nat-observer: NAT traversal needs --engine in-process")
        try:
            ep = Endpoint.parse(args.nat_observer.strip())
        except InvalidConfig as exc:
            raise AgentCliError(f"--nat-observer: {exc.reason} (an IP address and a port, e.g. 203.0.113.1:3479)") \
                from None
        observer = (str(ep.host), ep.port)
    auth_key = _read_authkey(args.authkey_file) if args.authkey_file is not None else ""
    config = AgentConfig(coordinator=",".join(urls), auth_key=auth_key, tls=tls,
                         interface=args.interface, state_dir=Path(args.state_dir), name=name,
                         listen_port=args.listen_port, command=args.daemon_command, engine=args.engine,
                         health_interval=args.health_interval, rotate_every=rotate_every, stun=stun,
                         derp_plain_http=args.derp_plain_http, derp_remeasure=args.derp_remeasure,
                         nat_observer=observer)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pywg agent: %(message)s")
    agent = Agent(config)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await agent.run()
        except asyncio.CancelledError:
            pass
        finally:
            (Path(args.state_dir) / "agent.pid").unlink(missing_ok=True)

    try:
        asyncio.run(main())
    except RegistrationFailed as exc:
        what = "--authkey-file" if args.authkey_file is not None else "--svid"
        print(f"pywg: {what}: the coordinator refused the registration: {exc}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    from pywg.mesh import agent_status

    status = agent_status.load(Path(args.state_dir))
    if status is None:
        raise AgentCliError(f"--state-dir: no agent status in {args.state_dir} (is `pywg agent up` running?)")
    print(json.dumps(status, indent=2) if args.json else agent_status.render(status))
    return 0


def _alive(state: Path) -> int | None:
    from pywg.mesh.agent_status import agent_pid

    return agent_pid(state)


def _down(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    pid = _alive(state)
    if pid is None:
        raise AgentCliError(f"--state-dir: no agent runs from {args.state_dir}")
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if _alive(state) is None:
            break
        time.sleep(0.1)
    else:
        raise AgentCliError(f"the agent (pid {pid}) did not stop within 10 s of SIGTERM; its interface is left up")
    try:
        iface = json.loads((state / "status.json").read_text())["interface"]
    except (OSError, ValueError, KeyError):
        return 0
    subprocess.run(["ip", "link", "del", str(iface)], capture_output=True, check=False)  # the daemon exits with it
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from pywg.mesh import control

    if args.overlap is not None and not 0 <= args.overlap <= 3600:
        raise AgentCliError(f"--overlap: expected 0..3600 seconds, got {args.overlap}")
    body: dict[str, Any] = {"op": "rotate"}
    if args.overlap is not None:
        body["overlap"] = args.overlap
    try:
        answer = control.request(Path(args.state_dir), body, args.timeout)
    except control.NoAgent as exc:
        raise AgentCliError(f"--state-dir: no agent runs from {args.state_dir} ({exc})") from None
    except TimeoutError:
        raise AgentCliError(f"the agent did not finish within {args.timeout:g} s (is the coordinator down?); "
                            "it goes on with the rotation: see `pywg agent status`") from None
    except (OSError, ValueError, TypeError) as exc:
        raise AgentCliError(f"the agent's control socket failed: {exc}") from None
    if not answer.get("ok"):
        field = answer.get("field")
        raise AgentCliError(f"{field + ': ' if field else ''}{answer.get('error', answer)}")
    print(answer["publicKey"])
    return 0
