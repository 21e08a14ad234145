"""One assembly for the daemon and the in-process backend (pywg.device.assembly): an
in-process interface gets the daemon's data-path options and TUN offloads (the TUN is
opened with the virtio-net header and the offloads asked of the kernel), without root."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pywg.device import assembly, daemon
from pywg.device.device import Device
from pywg.manage.backends import inprocess
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
