"""The opt-in Prometheus endpoint of a daemon (``pywg daemon --metrics ADDR:PORT``): GET
/metrics answers with the text exposition of the device's metrics snapshot, served on the
event loop (aiohttp). Off unless asked for: the counters are the operator's, and nothing
listens on a TCP port by default. Serves the counters only (public keys, never a secret)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .metrics import DeviceMetrics
from .prometheus import DeviceCollector


class MetricsAddressError(ValueError):
    """A --metrics value that is not ADDR:PORT."""


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``IPv4:PORT`` or ``[IPv6]:PORT`` (port 1-65535); MetricsAddressError naming the problem."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise MetricsAddressError(f"--metrics: expected ADDR:PORT (e.g. 127.0.0.1:9586), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise MetricsAddressError(f"--metrics: {host!r} is not an IP address") from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise MetricsAddressError(f"--metrics: port {port} is not in 1..65535")
    return host, port


class MetricsServer:
    def __init__(self, runner: web.AppRunner) -> None:
        self._runner = runner

    @classmethod
    async def start(cls, snapshot: Callable[[], DeviceMetrics], host: str, port: int) -> MetricsServer:
        """Listen on ``host``:``port`` (OSError if it cannot)."""
        registry = CollectorRegistry()
        registry.register(DeviceCollector(snapshot))

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        return cls(runner)

    @property
    def port(self) -> int:
        for address in self._runner.addresses:
            return int(address[1])
        return 0

    async def close(self) -> None:
        await self._runner.cleanup()
