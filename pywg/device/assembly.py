"""One way to assemble an interface: the data-path options from the environment, the TUN
opened with the virtio-net header when the options ask for TUN offloads, the offloads
enabled, the Device on top. The daemon and the in-process backend both call
``assemble_device``, so an in-process interface gets what a daemon's gets."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from . import offload
from .datapath import DataPathOptions
from .device import Device
from .tun import Tun

log = logging.getLogger(__name__)

OpenTun = Callable[..., Tun]
"""Opens the TUN: ``open_tun(name, vnet_hdr=...)`` (Tun itself, or one made in a network
namespace with its MTU, or an in-memory one in tests)."""


def assemble_device(name: str, *, open_tun: OpenTun = Tun, options: DataPathOptions | None = None) -> Device:
    """Open the TUN ``name`` and build its (not yet started) Device; call on the event loop.
    ``options``: the data path (default: DataPathOptions.from_environment())."""
    if options is None:
        options = DataPathOptions.from_environment()
    tun = open_tun(name, vnet_hdr=options.tun_offload)
    try:
        if tun.vnet_hdr:
            granted = offload.enable_tun_offloads(tun.fileno(), uso=os.environ.get("PYWG_USO", "1") != "0")
            log.info("%s: TUN offloads %s", name, f"{granted:#x}" if granted else "refused by the kernel")
        device = Device(tun, options)
    except BaseException:
        tun.close()
        raise
    log.info("%s: data path %s", name, options)
    return device
