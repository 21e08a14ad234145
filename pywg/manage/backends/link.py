"""The link side of an interface, through ``ip`` (iproute2), from asyncio.

Both backends set the address and MTU the way wg-quick does (``ip addr add``,
``ip link set mtu N up``) and read them back with ``ip -j addr show``. ``netns`` names a
network namespace (``ip -n NS``); None is this process's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import socket
from collections.abc import Iterator
from typing import Any

from pywg.device.netns import entered

from .base import BackendFailure, IPInterface, LinkState

IP_TIMEOUT = 10.0
NOT_FOUND_MARKERS = ("does not exist", "Cannot find device")


async def run_ip(*args: str, netns: str | None = None, check: bool = True) -> tuple[int, str, str]:
    """``ip [-n NS] ARGS``: (status, stdout, stderr). With ``check``, a nonzero status
    raises BackendFailure carrying ip's message. Cancelling kills the command."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise BackendFailure(f"cannot run {argv[0]}: {exc.strerror}", exc.errno) from None
    try:
        async with asyncio.timeout(IP_TIMEOUT):
            out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(BaseException):
            await asyncio.shield(proc.wait())
        raise
    status = proc.returncode if proc.returncode is not None else -1
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace").strip()
    if check and status != 0:
        raise BackendFailure(f"{' '.join(argv)} failed: {stderr or f'exit status {status}'}")
    return status, stdout, stderr


@contextlib.contextmanager
def inside(netns: str | None) -> Iterator[None]:
    """This thread in namespace ``netns`` for the block (None: stay). No awaits inside."""
    if netns is None:
        yield
    else:
        with entered(netns):
            yield


def udp_port_in_use(port: int, netns: str | None) -> bool:
    """Whether binding UDP ``port`` (IPv4 or IPv6, any address) fails with EADDRINUSE in
    ``netns``. A probe: the port may be taken or freed right after."""
    with inside(netns):
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM)
            except OSError:
                continue  # no IPv6 here
            with sock:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        return True
                    if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                        raise
    return False


def _where(netns: str | None) -> str:
    return f"network namespace {netns}" if netns else "this network namespace"


async def link_exists(name: str, netns: str | None) -> bool:
    status, _, _ = await run_ip("link", "show", "dev", name, netns=netns, check=False)
    return status == 0


async def link_names(netns: str | None) -> set[str]:
    _, out, _ = await run_ip("-j", "link", "show", netns=netns)
    return {entry["ifname"] for entry in json.loads(out or "[]") if "ifname" in entry}


def _first_address(entries: list[dict[str, Any]]) -> IPInterface | None:
    for entry in entries:
        if entry.get("scope") not in ("global", "site") or "local" not in entry:
            continue
        with contextlib.suppress(ValueError):
            return ipaddress.ip_interface(f"{entry['local']}/{entry['prefixlen']}")
    return None


async def link_state(name: str, netns: str | None) -> LinkState:
    status, out, err = await run_ip("-j", "addr", "show", "dev", name, netns=netns, check=False)
    if status != 0:
        if any(marker in err for marker in NOT_FOUND_MARKERS):
            return LinkState(present=False)
        raise BackendFailure(f"ip addr show dev {name} failed in {_where(netns)}: {err}")
    entries = json.loads(out or "[]")
    if not entries:
        return LinkState(present=False)
    entry = entries[0]
    return LinkState(present=True, mtu=int(entry.get("mtu", 0)),
                     address=_first_address(entry.get("addr_info", [])),
                     up="UP" in entry.get("flags", []))


async def configure_link(name: str, netns: str | None, mtu: int, address: IPInterface | None) -> None:
    """Address (if any), MTU (if nonzero) and up, as wg-quick does."""
    if address is not None:
        await run_ip("addr", "add", str(address), "dev", name, netns=netns)
    mtu_args = ["mtu", str(mtu)] if mtu else []
    await run_ip("link", "set", "dev", name, *mtu_args, "up", netns=netns)


async def delete_link(name: str, netns: str | None) -> bool:
    """``ip link del``; False when there was no such link."""
    status, _, err = await run_ip("link", "del", "dev", name, netns=netns, check=False)
    if status == 0:
        return True
    if any(marker in err for marker in NOT_FOUND_MARKERS):
        return False
    raise BackendFailure(f"ip link del {name} failed in {_where(netns)}: {err}")
