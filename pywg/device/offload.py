"""TUN and UDP offloads: fewer, larger system calls for the same packets.

TUN (IFF_VNET_HDR + TUNSETOFFLOAD): the kernel hands us TCP/UDP super-packets (TSO/USO)
with a virtio-net header, which ``split`` cuts into MTU-sized IP packets with complete
checksums before sealing; received TCP segments of one flow are ``coalesce``d into one
super-packet (GRO) before the TUN write. UDP: UDP_SEGMENT sends many datagrams of one
size in one sendmsg (GSO); UDP_GRO receives many in one recvmsg.

The work is done by the native module ``pywg._offload``; without it (or with
PYWG_PUREPYTHON=1) offloads are simply not turned on, and the kernel does the
segmentation and coalescing itself.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from pywg.protocol.checksum import internet_checksum

log = logging.getLogger(__name__)

try:
    if os.environ.get("PYWG_PUREPYTHON") == "1":
        raise ImportError("PYWG_PUREPYTHON=1")
    from pywg._offload import ffi, lib  # type: ignore[import-not-found]

    AVAILABLE = True
except ImportError as exc:  # pragma: no cover - depends on the build
    ffi = lib = None
    AVAILABLE = False
    _why = str(exc)

VNET_HDR_LEN = 10
MAX_SEGMENTS = 64
MAX_FRAME = 65535 + VNET_HDR_LEN

# <linux/if_tun.h>
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
TUN_F_USO4, TUN_F_USO6 = 0x20, 0x40
# <linux/udp.h>
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
UDP_MAX_SEGMENTS = 64


class OffloadError(ValueError):
    """A frame from the TUN that cannot be split (counted and dropped by the caller)."""


def enable_tun_offloads(fd: int, *, uso: bool = True) -> int:
    """Ask the kernel for TSO (and USO where it has it) on a vnet-header TUN; returns the
    flags granted (0: none, the kernel refused)."""
    wanted = [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN]
    if uso:
        wanted.insert(0, wanted[0] | TUN_F_USO4 | TUN_F_USO6)
    for flags in wanted:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return 0


def enable_udp_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def udp_gso_supported(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    except OSError:
        return False
    return True


def udp_offloads_available() -> bool:
    """Whether this kernel does UDP GSO and GRO (asked of a throwaway socket)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            return udp_gso_supported(probe) and enable_udp_gro(probe)
    except OSError:
        return False


def gso_cmsg(segment_size: int) -> list[tuple[int, int, bytes]]:
    return [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment_size))]


def gro_segment_size(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            return int(struct.unpack_from("=H", data)[0])
    return None


class Splitter:
    """Reusable buffers for splitting TUN frames (one per reading thread)."""

    def __init__(self) -> None:
        if not AVAILABLE:
            raise RuntimeError(f"native offload module unavailable: {_why}")
        self._out = ffi.new("uint8_t[]", MAX_FRAME + MAX_SEGMENTS * 120)
        self._off = ffi.new("uint32_t[]", MAX_SEGMENTS)
        self._len = ffi.new("uint32_t[]", MAX_SEGMENTS)
        self._view = ffi.buffer(self._out)

    def split_run(self, frame: bytes) -> tuple[memoryview, int, int]:
        """The segments back to back in one buffer (all ``size`` bytes but the last, which
        may be shorter): (data, size, count). Valid until the next call."""
        n = lib.pywg_split(frame, len(frame), self._out, len(self._out), self._off, self._len, MAX_SEGMENTS)
        if n < 0:
            raise OffloadError("malformed TUN frame" if n == lib.PYWG_OFFLOAD_BAD else "frame too large")
        total = self._off[n - 1] + self._len[n - 1]
        return memoryview(self._view)[:total], self._len[0], n

    def split(self, frame: bytes) -> list[bytes]:
        """IP packets with complete checksums; OffloadError for a malformed frame."""
        n = lib.pywg_split(frame, len(frame), self._out, len(self._out), self._off, self._len, MAX_SEGMENTS)
        if n < 0:
            raise OffloadError("malformed TUN frame" if n == lib.PYWG_OFFLOAD_BAD else "frame too large")
        view, off, length = self._view, self._off, self._len
        return [view[off[i]:off[i] + length[i]] for i in range(n)]


class Coalescer:
    """Reusable buffers for coalescing decrypted packets into TUN frames."""

    def __init__(self, max_batch: int = 256) -> None:
        if not AVAILABLE:
            raise RuntimeError(f"native offload module unavailable: {_why}")
        self.max_batch = max_batch
        self._in_off = ffi.new("uint32_t[]", max_batch)
        self._in_len = ffi.new("uint32_t[]", max_batch)
        self._out_off = ffi.new("uint32_t[]", max_batch)
        self._out_len = ffi.new("uint32_t[]", max_batch)
        self._groups = ffi.new("int32_t[]", max_batch)
        self._out = ffi.new("uint8_t[]", max_batch * (VNET_HDR_LEN + 1500) + MAX_FRAME)
        self._view = ffi.buffer(self._out)

    def coalesce(self, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        """TUN frames (virtio-net header + packet) for ``packets``, TCP runs merged."""
        frames: list[bytes] = []
        for start in range(0, len(packets), self.max_batch):
            frames += self._coalesce(packets[start:start + self.max_batch])
        return frames

    def _coalesce(self, packets: Sequence[bytes | memoryview]) -> list[bytes]:
        joined = b"".join(packets)
        pos = 0
        for i, packet in enumerate(packets):
            self._in_off[i] = pos
            self._in_len[i] = len(packet)
            pos += len(packet)
        out_cap = len(joined) + len(packets) * VNET_HDR_LEN
        if out_cap > len(self._out):
            self._out = ffi.new("uint8_t[]", out_cap)
            self._view = ffi.buffer(self._out)
        n = lib.pywg_coalesce(joined, self._in_off, self._in_len, len(packets), self._out, len(self._out),
                              self._out_off, self._out_len, self._groups)
        if n < 0:
            raise OffloadError("coalescing failed")
        view, off, length = self._view, self._out_off, self._out_len
        return [view[off[i]:off[i] + length[i]] for i in range(n)]


    def coalesce_run(self, data: Any, stride: int, lengths: Sequence[int], ok: Sequence[bool],
                     ) -> tuple[list[bytes], RunInfo]:
        """Frames for a run of opened plaintexts (i at data[i * stride:][:lengths[i]] when
        ok[i]), each cut to its IP length, keepalives skipped, TCP runs merged."""
        n = len(lengths)
        if n > self.max_batch:
            raise OffloadError("run longer than the coalescer's batch")
        out_cap = n * (VNET_HDR_LEN + stride)
        if out_cap > len(self._out):
            self._out = ffi.new("uint8_t[]", out_cap)
            self._view = ffi.buffer(self._out)
        lens = ffi.new("uint32_t[]", lengths)
        oks = ffi.new("uint8_t[]", [1 if x else 0 for x in ok])
        source = ffi.new("uint8_t[16]")
        info = ffi.new("int32_t[4]")
        base = ffi.from_buffer(data)
        frames = lib.pywg_coalesce_run(base, stride, lens, oks, n, self._out, len(self._out), self._out_off,
                                       self._out_len, self._groups, self._in_off, self._in_len, source, info)
        if frames < 0:
            raise OffloadError("coalescing failed")
        view, off, length = self._view, self._out_off, self._out_len
        result = [view[off[i]:off[i] + length[i]] for i in range(frames)]
        return result, RunInfo(info[0], bool(info[1]), bytes(ffi.buffer(source, info[2])), info[3])


class RunInfo(NamedTuple):
    invalid: int  # plaintexts that were not IP packets
    same_source: bool  # every packet kept has ``source`` as its source address
    source: bytes  # 4 or 16 bytes (empty when nothing was kept)
    kept: int


def plain_frame(packet: bytes) -> bytes:
    """A TUN frame for a packet with nothing to offload."""
    return bytes(VNET_HDR_LEN) + packet


def checksum(data: bytes) -> int:
    """The Internet checksum of ``data`` (native when available)."""
    if AVAILABLE:
        return int(lib.pywg_checksum(data, len(data), 0))
    return internet_checksum(data)
