"""``pywg agent status``: the agent's ``status.json`` checked against the process that
wrote it, as JSON or as text for people.

``status.json`` is what the agent last wrote; if the agent is gone it is stale. So the
status adds ``running`` and ``pid`` from ``agent.pid`` and the process table (a pid that
is not a ``pywg agent`` process any more does not count), and a status of a stopped
agent says so: ``coordinatorConnected`` false, and the text leads with "not running".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pywg.manage.types import InvalidConfig, parse_time
from pywg.mesh.health import rtt_text


def agent_pid(state: Path) -> int | None:
    """The pid of the ``pywg agent`` that runs from ``state``, None if none does."""
    try:
        pid = int((state / "agent.pid").read_text())
        os.kill(pid, 0)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"agent" in argv and any(a.endswith(b"pywg") for a in argv) else None


def load(state: Path) -> dict[str, Any] | None:
    """``status.json`` with ``running`` and ``pid``; None when there is none."""
    try:
        status: dict[str, Any] = json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return None
    pid = agent_pid(state)
    status["running"] = pid is not None
    status["pid"] = pid
    if isinstance(status.get("keyCreatedAt"), int | float):
        status["keyAgeSeconds"] = round(time.time() - status["keyCreatedAt"], 1)
    if pid is None:
        status["coordinatorConnected"] = False
    return status


def _age(seconds: float) -> str:
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _bytes(n: object) -> str:
    if not isinstance(n, int):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def handshake_age(text: object, now: float) -> str:
    """A peer's ``lastHandshake`` (RFC 3339 or null) as an age: "12 s ago", "never"."""
    if not isinstance(text, str):
        return "never"
    try:
        when = parse_time(text)
    except InvalidConfig:
        return "?"
    return "never" if when is None else _age(now - when.timestamp())


def render(status: dict[str, Any], now: float | None = None) -> str:
    """The status as text: the node, the agent process, then one block per peer."""
    now = time.time() if now is None else now
    updated = status.get("updatedAt")
    written = _age(now - updated) if isinstance(updated, int | float) else "?"
    if status.get("running"):
        agent = f"running (pid {status.get('pid')})"
    else:
        agent = f"not running (this status is stale: written {written})"
    coordinator = "connected" if status.get("coordinatorConnected") else "not connected"
    lines = [
        f"node: {status.get('name')} ({status.get('nodeId')})",
        f"  interface: {status.get('interface')}  addresses: {status.get('internalIp')} {status.get('internalIpv6')}",
        f"  agent: {agent}",
        f"  coordinator: {status.get('coordinator')} ({coordinator}, revision {status.get('revision')})",
        f"  status written: {written}",
    ]
    created, due = status.get("keyCreatedAt"), status.get("nextRotationAt")
    if isinstance(created, int | float):
        nxt = f"in {_span(due - now)}" if isinstance(due, int | float) else "not scheduled (--rotate-every)"
        rotating = status.get("rotation")
        doing = f"; rotating now ({rotating.get('phase')})" if isinstance(rotating, dict) else ""
        lines.append(f"  key: {status.get('publicKey')} made {_age(now - created)}; next rotation {nxt}{doing}")
    if status.get("lastRotationError"):
        lines.append(f"  last rotation failed: {status['lastRotationError']}")
    lines += _nat_lines(status)
    peers = status.get("peers") or []
    lines.append(f"peers: {len(peers)}")
    for p in peers:
        lines += [
            f"  {p.get('name') or '?'} ({p.get('nodeId') or 'not a mesh node'}): {p.get('status', '?')}",
            f"    path: {_path_text(p)}",
            f"    endpoint: {p.get('endpoint') or '(none)'}  addresses: {p.get('internalIp')} {p.get('internalIpv6')}",
            f"    latest handshake: {handshake_age(p.get('lastHandshake'), now)}  round trip: {rtt_text(p.get('latencyUs'))}",
            f"    transfer: {_bytes(p.get('rxBytes'))} received, {_bytes(p.get('txBytes'))} sent",
        ]
    return "\n".join(lines)


def _ms(value: object) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) and not isinstance(value, bool) else "?"


def _nat_lines(status: dict[str, Any]) -> list[str]:
    """Our NAT: candidates, mapping behaviour, behind a NAT or not, and the keepalive."""
    nat = status.get("nat")
    if not isinstance(nat, dict):
        return []
    candidates = ", ".join(f"{c.get('endpoint')} ({c.get('source')})" for c in nat.get("candidates") or []
                           if isinstance(c, dict)) or "(none)"
    found = nat.get("behindNat")
    behind = "behind a NAT" if found is True else "no NAT" if found is False else "NAT not known"
    keepalive = nat.get("keepalive")
    lines = [(f"  NAT: mapping {nat.get('mapping', '?')}, {behind}; "
             f"keepalive {f'{keepalive} s' if keepalive else 'off'}"),
             f"  candidates: {candidates}"]
    if nat.get("keepaliveSource"):
        lines.append(f"  keepalive: {nat['keepaliveSource']}")
    if nat.get("reason"):
        lines.append(f"  traversal: {nat['reason']}")
    return lines


def _path_text(peer: dict[str, Any]) -> str:
    """A peer's path: "direct via ENDPOINT, RTT", or "none (REASON)"."""
    path = peer.get("path")
    if path is None:
        return "?"
    if path == "direct":
        rtt = f", {_ms(peer.get('rttMs'))}" if peer.get("rttMs") is not None else ""
        text = f"direct{rtt}"
    else:
        text = str(path)
    if peer.get("reason"):
        text += f" ({peer['reason']})"
    tried = [c for c in peer.get("candidates") or [] if isinstance(c, dict)]
    if tried:
        text += "; tried " + ", ".join(
            f"{c.get('endpoint')} [{'/'.join(c.get('sources') or [])}] "
            + (_ms(c.get("rttMs")) if c.get("rttMs") is not None else "no pong") for c in tried)
    return text
