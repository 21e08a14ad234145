"""The daemon's life: create the TUN, serve UAPI, detach like ``wireguard-go IFNAME``, and
close everything on SIGTERM/SIGINT or when the interface is deleted."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

try:
    import uvloop
except ImportError:  # optional off Linux
    uvloop = None  # type: ignore[assignment]

from .assembly import assemble_device
from .metrics_server import MetricsServer
from .stats_server import STATS_DIR, StatsServer
from .tun import Tun, TunError
from .uapi_server import SOCKET_DIR, UapiServer

log = logging.getLogger("pywg")

LOG_LEVELS = {"debug": logging.DEBUG, "verbose": logging.DEBUG, "info": logging.INFO,
              "error": logging.ERROR, "silent": logging.CRITICAL + 10}


def configure_logging(ifname: str) -> None:
    """LOG_LEVEL as for wireguard-go: debug (or verbose), info, error (default), silent."""
    level = LOG_LEVELS.get(os.environ.get("LOG_LEVEL", "error").lower(), logging.ERROR)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(levelname)s: ({ifname}) %(asctime)s %(message)s")


async def serve(ifname: str, ready: int | None = None, *, open_tun: Callable[..., Tun] = Tun,
                uapi_dir: Path = SOCKET_DIR, stats_dir: Path = STATS_DIR,
                metrics: tuple[str, int] | None = None) -> int:
    """Run the device until told to stop; write one byte to fd ``ready`` once serving.
    ``metrics``: also serve Prometheus text at http://ADDR:PORT/metrics. (``open_tun`` and
    the directories: the defaults but in tests.)"""
    loop = asyncio.get_running_loop()
    device = assemble_device(ifname, open_tun=open_tun)
    uapi: UapiServer | None = None
    stats: StatsServer | None = None
    try:
        uapi = await UapiServer.start(ifname, device, uapi_dir)
        stats = await StatsServer.start(ifname, device.stats, stats_dir)
        exporter = await MetricsServer.start(device.metrics, *metrics) if metrics is not None else None
    except BaseException:
        for server in (stats, uapi):  # nothing left half-started (a --metrics port in use)
            if server is not None:
                await server.close()
        device.close()
        raise
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    device.on_gone = stop.set
    device.start()
    log.info("device %s started, UAPI at %s", ifname, uapi.path)
    if ready is not None:  # detached: tell the parent, then let go of its terminal
        os.write(ready, b"\x01")
        os.close(ready)
        if os.environ.get("LOG_LEVEL") is None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
    await stop.wait()
    log.info("shutting down %s", ifname)
    await uapi.close()
    await stats.close()
    if exporter is not None:
        await exporter.close()
    device.close()
    return 0


def run(ifname: str, *, foreground: bool, metrics: tuple[str, int] | None = None) -> int:
    """``pywg daemon [--foreground] [--metrics ADDR:PORT] IFNAME``: returns the process exit status."""
    configure_logging(ifname)
    if foreground:
        return _run_loop(ifname, None, metrics)
    read_end, write_end = os.pipe()
    if os.fork() > 0:  # the parent waits until the child serves, or says why it could not
        os.close(write_end)
        answer = os.read(read_end, 1)
        return 0 if answer == b"\x01" else 1
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    os._exit(_run_loop(ifname, write_end, metrics))


def _run_loop(ifname: str, ready: int | None, metrics: tuple[str, int] | None = None) -> int:
    try:
        if uvloop is not None:
            return uvloop.run(serve(ifname, ready, metrics=metrics))
        return asyncio.run(serve(ifname, ready, metrics=metrics))
    except (TunError, OSError) as exc:
        print(f"pywg: {ifname}: {exc}", file=sys.stderr)
        return 1
