"""The opt-in Prometheus endpoint of a daemon (``pywg daemon --metrics ADDR:PORT``): GET
/metrics answers with the text exposition of the device's metrics snapshot, served on the
event loop (aiohttp). Off unless asked for: the counters are the operator's, and nothing
listens on a TCP port by default. Serves the counters only (public keys, never a secret)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pywg.protocol.endpoint import Endpoint, EndpointError

from .metrics import DeviceMetrics
from .prometheus import DeviceCollector


class MetricsAddressError(ValueError):
    """A --metrics value that is not ADDR:PORT."""


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``IPv4:PORT`` or ``[IPv6]:PORT`` (port 1-65535); MetricsAddressError naming the problem."""
    try:
        endpoint = Endpoint.parse(text)
    except EndpointError as exc:
        raise MetricsAddressError(f"--metrics ADDR:PORT: {exc}") from None
    if endpoint.port == 0:
        raise MetricsAddressError("--metrics ADDR:PORT: port 0 is not in 1..65535")
    return endpoint.host, endpoint.port


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
