"""One assembly for the daemon and the in-process backend (pywg.device.assembly): an
in-process interface gets the daemon's data-path options and TUN offloads (the TUN is
opened with the virtio-net header and the offloads asked of the kernel), without root."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pywg import cli
from pywg.device import assembly, daemon
from pywg.device.device import Device
from pywg.device.metrics_server import MetricsAddressError, parse_metrics_address
from pywg.manage.backends import inprocess
from pywg.protocol.actions import DropReason
from pywg.testing.memory import MemoryTun, wait_until


@pytest.mark.parametrize("threads", ["0", "1"])
def test_an_in_process_interface_is_assembled_as_the_daemons(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: str) -> None:
    monkeypatch.setenv("LOG_LEVEL", "error")
    monkeypatch.setenv("PYWG_THREADS", threads)
    opened: list[tuple[str, bool]] = []
    offloads: list[int] = []
    devices: list[Device] = []

    def open_tun(name: str, *, vnet_hdr: bool) -> MemoryTun:
        opened.append((name, vnet_hdr))
        return MemoryTun(name, vnet_hdr=vnet_hdr)

    def memory_namespaced_tun(name: str, mtu: int, netns: str | None, *, vnet_hdr: bool = False) -> MemoryTun:
        return open_tun(name, vnet_hdr=vnet_hdr)

    def enable(fd: int, *, uso: bool) -> int:
        offloads.append(fd)
        return 0

    async def no_link(*args: Any, **kwargs: Any) -> bool:
        return False

    real_start = Device.start

    def start(self: Device) -> None:
        devices.append(self)
        real_start(self)

    monkeypatch.setattr(assembly.offload, "enable_tun_offloads", enable)
    monkeypatch.setattr(inprocess, "_NamespacedTun", memory_namespaced_tun)
    monkeypatch.setattr(inprocess, "link_exists", no_link)
    monkeypatch.setattr(inprocess, "configure_link", no_link)
    monkeypatch.setattr(Device, "start", start)

    async def main() -> None:
        served = asyncio.create_task(daemon.serve("asmd0", None, open_tun=open_tun, uapi_dir=tmp_path,
                                                  stats_dir=tmp_path))
        await wait_until(lambda: devices)  # the daemon's device started
        backend = inprocess.InProcessBackend(serve_uapi=False, stats_dir=None)
        await backend.create("asmi0", 1420, None)
        try:
            daemon_device, inprocess_device = devices
            assert inprocess_device is backend.device("asmi0")
            assert inprocess_device.options == daemon_device.options
            assert inprocess_device.stats()["data_path"] == daemon_device.stats()["data_path"]
            assert opened == [("asmd0", daemon_device.options.tun_offload),
                              ("asmi0", daemon_device.options.tun_offload)]
            assert inprocess_device.tun.vnet_hdr == daemon_device.tun.vnet_hdr == daemon_device.options.tun_offload
            assert len(offloads) == (2 if daemon_device.options.tun_offload else 0)  # both asked the kernel
            assert inprocess_device.stats()["data_path"]["threads"] is (threads == "1")  # type: ignore[index]
        finally:
            await backend.aclose()
            assert daemon_device.on_gone is not None
            daemon_device.on_gone()  # as when its interface is deleted: the daemon stops
            assert await asyncio.wait_for(served, 5) == 0

    asyncio.run(main())


def test_the_daemon_serves_prometheus_metrics_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "error")
    monkeypatch.setenv("PYWG_THREADS", "0")
    devices: list[Device] = []
    real_start = Device.start

    def start(self: Device) -> None:
        devices.append(self)
        real_start(self)

    monkeypatch.setattr(Device, "start", start)
    with socket.socket() as probe:  # a free port (the daemon binds it at once)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> None:
        served = asyncio.create_task(daemon.serve("promd0", None, open_tun=lambda n, **k: MemoryTun(n, **k),
                                                  uapi_dir=tmp_path, stats_dir=tmp_path,
                                                  metrics=("127.0.0.1", port)))
        await wait_until(lambda: devices)
        device = devices[0]
        device.count_drop(DropReason.NO_ROUTE, 3)
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as reply:
            assert reply.status == 200 and reply.content_type == "text/plain"
            text = await reply.text()
        assert 'pywg_drops_total{direction="outbound",interface="promd0",reason="no_route"} 3.0' in text
        assert device.on_gone is not None
        device.on_gone()
        assert await asyncio.wait_for(served, 5) == 0
        with pytest.raises(aiohttp.ClientConnectionError):  # closed with the daemon
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics"):
                pass

    asyncio.run(main())


@pytest.mark.parametrize("value, problem", [
    ("9586", "--metrics ADDR:PORT: endpoint: expected IP:port"),
    ("localhost:9586", "'localhost' is not an IP address"),
    ("127.0.0.1:0", "port 0 is not in 1..65535"), ("[::1]:x", "expected IP:port"),
    ("::1:9586", "IPv6 addresses, and only they, go in square brackets"),
])
def test_a_bad_metrics_address_is_refused_before_anything_starts(
        value: str, problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["daemon", "--foreground", "--metrics", value, "promx0"]) == 2
    assert problem in capsys.readouterr().err


def test_the_metrics_address_accepts_ipv4_and_ipv6() -> None:
    assert parse_metrics_address("127.0.0.1:9586") == ("127.0.0.1", 9586)
    assert parse_metrics_address("[::1]:9586") == ("::1", 9586)
    with pytest.raises(MetricsAddressError):
        parse_metrics_address("[::1]:99999")
