"""``UapiBackend``: any WireGuard implementation that serves the UAPI socket.

``create`` runs ``CMD NAME`` (default: pywg's ``pywg-daemon``; ``wireguard-go`` and
``boringtun`` work the same way) and expects it to detach once the interface exists, as
``wg-quick`` expects of ``WG_QUICK_USERSPACE_IMPLEMENTATION``; with ``netns`` it runs as
``ip netns exec NS CMD NAME``. It then waits for ``/var/run/wireguard/NAME.sock`` to answer
and sets the address and MTU with ``ip``. ``delete`` removes the link (``ip link del``):
these daemons exit when their interface goes. Requests go over the socket
(``pywg.manage.uapi_client``), one connection each.

The socket directory is shared by all network namespaces, so an interface is found by
name wherever it runs; ``link``, ``names`` and ``delete`` look at this backend's namespace.
Completed-handshake counts come from the pywg stats socket when the daemon is pywg's
(None otherwise: UAPI reports only the latest handshake time).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from pywg.device.stats_server import STATS_DIR, stats_path
from pywg.manage import uapi_client
from pywg.manage.uapi_client import SOCKET_DIR, UapiUnavailable, answers, socket_path

from .base import BackendFailure, IPInterface, LinkState, NameInUse, NotServed
from .link import configure_link, delete_link, link_exists, link_names, link_state, udp_port_in_use

log = logging.getLogger(__name__)

POLL = 0.02
STDERR_SHOWN = 2000


def default_command() -> list[str]:
    """pywg's daemon: the ``pywg-daemon`` beside this interpreter, else on PATH, else
    ``python -m pywg.cli daemon``."""
    beside = Path(sys.executable).parent / "pywg-daemon"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("pywg-daemon")
    if found:
        return [found]
    return [sys.executable, "-m", "pywg.cli", "daemon"]


def resolve_command(command: str | Sequence[str] | None) -> list[str]:
    """A command line (text is split like a shell would) that is run as ``CMD NAME``."""
    if command is None:
        return default_command()
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise ValueError("the implementation command is empty")
    if argv == ["pywg-daemon"]:
        return default_command()
    return argv


class UapiBackend:
    """Interfaces served by daemons over the UAPI socket. ``command``: what ``create``
    runs (``CMD NAME``; it must detach); ``netns``: the namespace to run it and ``ip``
    in; ``env``: the daemon's environment (default: this process's)."""

    kind = "uapi"

    def __init__(self, command: str | Sequence[str] | None = None, *, netns: str | None = None,
                 socket_dir: Path = SOCKET_DIR, stats_dir: Path | None = STATS_DIR,
                 start_timeout: float = 15.0, stop_timeout: float = 5.0,
                 env: Mapping[str, str] | None = None) -> None:
        self.command = resolve_command(command)
        self.netns = netns
        self.socket_dir = socket_dir
        self.stats_dir = stats_dir
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.env = dict(env) if env is not None else None
        self._cleanups: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"UapiBackend({shlex.join(self.command)!r}, netns={self.netns!r})"

    def _where(self) -> str:
        return f"network namespace {self.netns}" if self.netns else "this network namespace"

    def _path(self, name: str) -> Path:
        return socket_path(name, self.socket_dir)

    async def _settled(self, name: str) -> None:
        """Wait until a cleanup left behind by an interrupted ``create`` is done."""
        task = self._cleanups.get(name)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    # --- life of an interface -----------------------------------------------------------

    async def create(self, name: str, mtu: int, address: IPInterface | None, *, listen_port: int = 0) -> None:
        await self._settled(name)
        path = self._path(name)
        if await answers(path):
            raise NameInUse(f"{path} is served (by an interface of that name in some network namespace)")
        if await link_exists(name, self.netns):
            raise NameInUse(f"a network interface of that name exists in {self._where()}")
        # wireguard-go binds its port only once it sees the link up, asynchronously, and then
        # just logs a failure (the interface stays down): check the port first.
        if listen_port and udp_port_in_use(listen_port, self.netns):
            raise BackendFailure(f"UDP port {listen_port} is in use in {self._where()}", -errno.EADDRINUSE)
        spawn = asyncio.get_running_loop().create_task(self._spawn(name))
        try:
            await asyncio.shield(spawn)
            await self._wait_served(name)
            await configure_link(name, self.netns, mtu, address)
        except asyncio.CancelledError:
            # Finish the spawn and remove what it made in the background; later calls for
            # this name wait for that (_settled).
            self._cleanups[name] = asyncio.get_running_loop().create_task(self._cleanup(name, spawn))
            raise
        except BaseException:
            await self._cleanup(name, spawn)
            raise

    async def _spawn(self, name: str) -> None:
        argv = (["ip", "netns", "exec", self.netns] if self.netns else []) + [*self.command, name]
        with tempfile.TemporaryFile() as output:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output, env=self.env,
                    start_new_session=True)
            except OSError as exc:
                raise BackendFailure(f"cannot run {self.command[0]}: {exc.strerror}", exc.errno) from None
            try:
                async with asyncio.timeout(self.start_timeout):
                    status = await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise BackendFailure(f"{shlex.join(self.command)} {name} did not detach within "
                                     f"{self.start_timeout:g} s (it must daemonize, as wg-quick "
                                     "expects; do not pass a foreground flag)") from None
            if status != 0:
                output.seek(0)
                text = output.read().decode(errors="replace").strip()[-STDERR_SHOWN:]
                raise BackendFailure(f"{shlex.join(argv)} failed (exit status {status})"
                                     + (f": {text}" if text else ""))

    async def _wait_served(self, name: str) -> None:
        path = self._path(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while not await answers(path):
            if loop.time() > deadline:
                raise BackendFailure(f"{shlex.join(self.command)} {name} detached, but nobody serves "
                                     f"{path} after {self.start_timeout:g} s")
            await asyncio.sleep(POLL)

    async def _cleanup(self, name: str, spawn: asyncio.Task[None]) -> None:
        try:
            with contextlib.suppress(Exception):
                await spawn
            await self._remove(name, missing_ok=True)
        except Exception:
            log.exception("cleaning up after an interrupted create of %s failed", name)
        finally:
            if self._cleanups.get(name) is asyncio.current_task():
                del self._cleanups[name]

    async def delete(self, name: str) -> None:
        await self._settled(name)
        await self._remove(name, missing_ok=False)

    async def _remove(self, name: str, *, missing_ok: bool) -> None:
        path = self._path(name)
        served = await answers(path)
        removed = await delete_link(name, self.netns)
        if not removed:
            if served:
                raise BackendFailure(f"{path} answers, but {self._where()} has no link {name}: "
                                     "is the interface in another network namespace?")
            if not missing_ok:
                raise NotServed(f"nobody serves {path}")
        await self._wait_gone(name)

    async def _wait_gone(self, name: str) -> None:
        """The daemon exits once its link is gone (a pywg daemon closes its stats socket
        last); a socket nobody answers on is stale and removed."""
        paths = [self._path(name)]
        if self.stats_dir is not None:
            paths.append(stats_path(name, self.stats_dir))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout
        for path in paths:
            while path.exists():
                if not await answers(path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    break
                if loop.time() > deadline:
                    raise BackendFailure(f"the link {name} is gone, but its daemon still serves {path} "
                                         f"after {self.stop_timeout:g} s")
                await asyncio.sleep(POLL)

    async def aclose(self) -> None:
        """Wait for background cleanups; the daemons themselves keep running."""
        for task in list(self._cleanups.values()):
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    # --- talking to it --------------------------------------------------------------------

    async def exchange(self, name: str, request: str) -> str:
        await self._settled(name)
        try:
            return await uapi_client.exchange(self._path(name), request)
        except UapiUnavailable as exc:
            raise NotServed(exc.strerror or str(exc)) from None

    async def exists(self, name: str) -> bool:
        await self._settled(name)
        return await answers(self._path(name))

    async def link(self, name: str) -> LinkState:
        await self._settled(name)
        return await link_state(name, self.netns)

    async def device_stats(self, name: str) -> dict[str, object] | None:
        """The pywg stats socket's JSON for ``name``; None when no pywg daemon serves it."""
        if self.stats_dir is None:
            return None
        path = stats_path(name, self.stats_dir)
        if not path.exists():
            return None
        try:
            async with asyncio.timeout(2.0):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    data = await reader.read()
                finally:
                    writer.close()
            stats = json.loads(data)
        except (OSError, ValueError, TimeoutError):
            return None
        return stats if isinstance(stats, dict) and stats.get("interface") == name else None

    async def handshake_counts(self, name: str) -> dict[bytes, int] | None:
        """From the pywg stats socket, when a pywg daemon serves ``name``."""
        stats = await self.device_stats(name)
        if stats is None:
            return None
        try:
            return {base64.b64decode(p["public_key"]): int(p["handshakes"]) for p in stats["peers"]}  # type: ignore[attr-defined]
        except (ValueError, KeyError, TypeError):
            return None

    async def names(self) -> list[str]:
        if not self.socket_dir.is_dir():
            return []
        candidates = sorted(entry.name[:-len(".sock")] for entry in os.scandir(self.socket_dir)
                            if entry.name.endswith(".sock"))
        if not candidates:
            return []
        present = await link_names(self.netns)
        return [name for name in candidates if name in present and await answers(self._path(name))]
