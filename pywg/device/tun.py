"""The TUN device (python-pytun): raw IP packets in and out, non-blocking."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

import pytun

DEFAULT_MTU = 1420
VNET_HDR_LEN = 10
READ_SIZE = 65535
SIOCGIFMTU = 0x8921
# The errors of a TUN write that mean the interface is gone. Others (EIO while the
# interface is down, EINVAL for a packet the kernel refuses) lose that packet only, as in
# wireguard-go: counted as DropReason.TUN_WRITE_FAILED, the device keeps running.
WRITE_GONE_ERRNOS = {errno.EBADFD, errno.ENXIO, errno.ENODEV}


def write_failure_is_gone(err: int | None) -> bool:
    """Whether a TUN write failing with ``err`` means the interface is gone (else one lost packet)."""
    return err in WRITE_GONE_ERRNOS


class TunError(RuntimeError):
    pass


class Tun:
    """A layer-3 TUN interface without packet information headers."""

    def __init__(self, name: str, mtu: int = DEFAULT_MTU, *, vnet_hdr: bool = False) -> None:
        """``vnet_hdr``: every read and write carries a virtio-net header (offloads)."""
        if not name or len(name.encode()) > 15 or "/" in name or name in (".", ".."):
            raise TunError(f"invalid interface name {name!r}: 1 to 15 bytes, no '/'")
        try:
            flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet_hdr else 0)
            self._device = pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as exc:
            if exc.args and exc.args[0] == errno.EBUSY:
                raise TunError(f"already running: a TUN interface {name} exists in this "
                               "network namespace and another process (a pywg daemon, wireguard-go) has "
                               f"it open; stop that one first (ip link del {name})") from exc
            raise TunError(f"cannot create TUN interface {name!r}: {exc}") from exc
        self.name: str = self._device.name
        self.vnet_hdr = vnet_hdr
        self._plain_header = bytes(VNET_HDR_LEN) if vnet_hdr else b""
        os.set_blocking(self._device.fileno(), False)
        self._device.mtu = mtu
        # For reading the MTU later from any thread: a socket made now, in the TUN's
        # network namespace (ioctls by name resolve in the socket's namespace).
        self._control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def fileno(self) -> int:
        return self._device.fileno()

    @property
    def mtu(self) -> int:
        """The interface MTU now (0 if it cannot be read: the interface is going away)."""
        try:
            request = struct.pack("16si", self.name.encode(), 0)
            return int(struct.unpack_from("16si", fcntl.ioctl(self._control, SIOCGIFMTU, request))[1])
        except OSError:
            return 0

    def read(self) -> bytes | None:
        """One packet, or None when nothing is waiting. OSError when the interface is gone."""
        try:
            return os.read(self.fileno(), READ_SIZE)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> bool:
        """One IP packet (with an empty virtio-net header when the TUN wants one); False if
        the TUN's queue was full (the packet is lost: the caller counts DropReason.TUN_FULL)."""
        return self.write_frame(self._plain_header + packet if self._plain_header else packet)

    def write_frame(self, frame: bytes) -> bool:
        """Exactly these bytes (a virtio-net header first when ``vnet_hdr``); False if the
        kernel queue was full: the packet is lost, as on a congested link."""
        try:
            os.write(self.fileno(), frame)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        self._control.close()
        self._device.close()
