"""Batch seal and open of WireGuard transport messages: the native fast path.

A transport message (type 4) is ``u32 4 | u32 receiver index | u64 counter | AEAD`` in
little endian, where AEAD is ChaCha20-Poly1305 under the session key with the nonce
``4 zero bytes || u64 counter`` and no associated data, over the plaintext zero-padded
to a multiple of 16 bytes (not beyond the MTU). This module seals and opens many of
them per call.

Three backends compute exactly the same bytes:

``openssl``   the C extension ``pywg._fastpath`` driving OpenSSL's EVP ChaCha20-Poly1305
              (libcrypto loaded at run time with dlopen: its AVX2/AVX-512 assembly)
``portable``  the same extension with its own C ChaCha20-Poly1305 (RFC 8439): 16/8/4-lane
              SIMD keystream kernels picked at run time, each message's Poly1305 run
              during the next message's ChaCha20 (see native/README.md)
``python``    ``cryptography``'s ChaCha20Poly1305, one call per packet; the fallback when
              the extension is missing (one warning) or ``PYWG_PUREPYTHON=1``

``BACKEND`` names the one the module-level functions use: the extension's choice
(portable where its AVX-512 kernels run, since it then outruns EVP per message; else
openssl; portable when libcrypto is missing), or ``PYWG_FASTPATH_BACKEND`` (openssl,
portable or python). ``backend(name)`` returns any available backend as an object with
the same functions (the tests run every one).

The C calls release the GIL for the whole batch, so a worker thread can seal while the
event loop does I/O. Callers' mistakes (offsets or lengths outside a buffer, a key that
is not 32 bytes) raise ValueError before any byte is written; a packet that fails
authentication is reported per packet (ok False / None) and never affects the others.

Functions, in three depths:

- ``seal_batch(key, receiver_index, first_counter, packets, mtu)`` -> list of messages,
  ``open_batch(key, datagrams)`` -> list of (counter, plaintext or None);
- ``seal_into``/``open_into``: one source buffer plus offsets and lengths, results
  written into a caller's buffer at given offsets (in place allowed);
- ``seal_gso``: segments laid back to back in one buffer (all of ``segment_size`` but
  the last) sealed back to back at a fixed stride, ready for one ``sendmsg`` with
  UDP_SEGMENT; ``open_gro``: the reverse for a UDP_GRO receive buffer.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Sequence
from itertools import accumulate
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pywg.protocol.constants import (
    KEY_LEN,
    MESSAGE_TRANSPORT,
    PADDING_MULTIPLE,
    TAG_LEN,
    TRANSPORT_HEADER_SIZE,
)

__all__ = [
    "BACKEND", "BACKENDS", "MAX_PACKET", "NATIVE_AVAILABLE", "OPENSSL_LIBRARY", "OVERHEAD",
    "Backend", "FastpathError", "GroRun", "GsoRun", "Opened",
    "aead_open", "aead_seal", "available_backends", "backend", "open_batch", "open_gro",
    "open_into", "padded_len", "seal_batch", "seal_buffer_size", "seal_gso", "seal_into",
    "sealed_len",
]

OVERHEAD = TRANSPORT_HEADER_SIZE + TAG_LEN  # 32: header and tag around the padded plaintext
MAX_PACKET = 1 << 30  # largest plaintext of one message (PYWG_FP_MAX_LEN in the C code)
BACKENDS = ("openssl", "portable", "python")

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_HEADER = struct.Struct("<IIQ")
_NONCE_PREFIX = bytes(4)
_COUNTER = struct.Struct("<Q")

# C return codes (native/fastpath.h)
_EBOUNDS, _EARG, _EUNAVAILABLE, _EBACKEND = -1, -2, -3, -4
_NATIVE_CODES = {"openssl": 1, "portable": 2}


class FastpathError(RuntimeError):
    """The crypto library underneath failed (not the caller's fault, not the peer's)."""


class Opened(NamedTuple):
    """Per-message results of open_into: plaintext lengths (0 when not ok), whether the
    tag verified, and the counter read from each header."""

    lengths: list[int]
    ok: list[bool]
    counters: list[int]


class GsoRun(NamedTuple):
    """``messages`` sealed messages back to back in ``data``, each ``stride`` bytes but
    the last (which may be shorter): the layout of one UDP_SEGMENT send."""

    data: memoryview
    stride: int
    messages: int


class GroRun(NamedTuple):
    """Plaintext i at ``data[i * stride:][:lengths[i]]`` when ``ok[i]``."""

    data: memoryview
    stride: int
    lengths: list[int]
    ok: list[bool]
    counters: list[int]


def padded_len(length: int, mtu: int = 0) -> int:
    """WireGuard's padded plaintext length: up to a multiple of 16, not beyond the MTU.

    ``mtu`` 0 means no MTU cap. Above the MTU only the last MTU-sized unit is padded.
    """
    if mtu == 0:
        return -(-length // PADDING_MULTIPLE) * PADDING_MULTIPLE
    last = length % mtu if length > mtu else length
    padded = -(-last // PADDING_MULTIPLE) * PADDING_MULTIPLE
    return length + min(padded, mtu) - last


def sealed_len(length: int, mtu: int = 0) -> int:
    """Length of the transport message carrying a ``length``-byte packet."""
    return OVERHEAD + padded_len(length, mtu)


def seal_buffer_size(lengths: Sequence[int], mtu: int = 0) -> int:
    """Bytes needed to hold the sealed messages of packets of these lengths back to back."""
    return sum(sealed_len(length, mtu) for length in lengths)


# --- argument checks (shared by every backend) --------------------------------------------


def _check_key(key: Any) -> None:
    if len(memoryview(key)) != KEY_LEN:  # raises TypeError for a non-buffer
        raise ValueError(f"key must be {KEY_LEN} bytes, got {len(memoryview(key))}")


def _check_mtu(mtu: int) -> None:
    if not 0 <= mtu <= _U32:
        raise ValueError(f"mtu must be in 0..{_U32} (0: no MTU cap), got {mtu}")


def _check_header(receiver_index: int, first_counter: int, count: int) -> None:
    if not 0 <= receiver_index <= _U32:
        raise ValueError(f"receiver_index must be in 0..{_U32}, got {receiver_index}")
    if first_counter < 0 or first_counter + max(count - 1, 0) > _U64:
        raise ValueError(f"counters {first_counter}..{first_counter + count - 1} do not fit in 64 bits")


def _check_counts(n: int, **sequences: Sequence[int]) -> None:
    for name, seq in sequences.items():
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries, expected {n}")


def _check_range(what: str, i: int, offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"packet {i}: {what} [{offset}, {offset + length}) lies outside "
                         f"its buffer of {size} bytes")


def _check_seal_ranges(src_size: int, src_offsets: Sequence[int], src_lengths: Sequence[int],
                       dst_size: int, dst_offsets: Sequence[int], mtu: int) -> None:
    for i, (offset, length, out) in enumerate(zip(src_offsets, src_lengths, dst_offsets)):
        if not 0 <= length <= MAX_PACKET:
            raise ValueError(f"packet {i}: length {length} is not in 0..{MAX_PACKET}")
        _check_range("input", i, offset, length, src_size)
        _check_range("output", i, out, sealed_len(length, mtu), dst_size)


def _check_open_ranges(src_size: int, src_offsets: Sequence[int], src_lengths: Sequence[int],
                       dst_size: int, dst_offsets: Sequence[int]) -> None:
    for i, (offset, length, out) in enumerate(zip(src_offsets, src_lengths, dst_offsets)):
        if not 0 <= length <= MAX_PACKET + OVERHEAD:
            raise ValueError(f"message {i}: length {length} is not in 0..{MAX_PACKET + OVERHEAD}")
        _check_range("input", i, offset, length, src_size)
        if length >= OVERHEAD:
            _check_range("output", i, out, length - OVERHEAD, dst_size)


def _gso_layout(total: int, segment_size: int, mtu: int) -> tuple[int, int, int]:
    """(count, stride, bytes needed) for sealing ``total`` bytes of segments."""
    if not 0 < segment_size <= MAX_PACKET:
        raise ValueError(f"segment_size must be in 1..{MAX_PACKET}, got {segment_size}")
    if total == 0:
        return 0, sealed_len(segment_size, mtu), 0
    count = -(-total // segment_size)
    stride = sealed_len(segment_size, mtu)
    last = total - (count - 1) * segment_size
    return count, stride, (count - 1) * stride + sealed_len(last, mtu)


def _gro_layout(total: int, segment_size: int, out_stride: int | None) -> tuple[int, int, int]:
    """(count, out_stride, bytes of output needed) for opening a GRO buffer."""
    if not 0 < segment_size <= MAX_PACKET + OVERHEAD:
        raise ValueError(f"segment_size must be in 1..{MAX_PACKET + OVERHEAD}, got {segment_size}")
    body = max(segment_size - OVERHEAD, 0)
    stride = body if out_stride is None else out_stride
    if stride < body:
        raise ValueError(f"out_stride {stride} is shorter than a plaintext ({body} bytes)")
    count = -(-total // segment_size) if total else 0
    if count == 0:
        return 0, stride, 0
    last_body = max(total - (count - 1) * segment_size - OVERHEAD, 0)
    need = (count - 1) * stride + last_body
    if count > 1:
        need = max(need, (count - 2) * stride + body)
    return count, stride, need


def _writable(buf: Any) -> memoryview:
    view = memoryview(buf)
    if view.readonly:
        raise TypeError("the output buffer must be writable (a bytearray, not bytes)")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _readable(buf: Any) -> memoryview:
    view = memoryview(buf)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# --- backends -----------------------------------------------------------------------------


class Backend:
    """One implementation of the fast-path functions; see the module docstring."""

    name = "abstract"

    def __repr__(self) -> str:
        return f"<pywg.fastpath backend {self.name}>"

    def seal_batch(self, key: bytes, receiver_index: int, first_counter: int,
                   packets: Sequence[bytes], mtu: int = 0) -> list[bytes]:
        """Seal ``packets`` with counters first_counter, first_counter + 1, ..."""
        raise NotImplementedError

    def open_batch(self, key: bytes, datagrams: Sequence[bytes]) -> list[tuple[int, bytes | None]]:
        """Open transport messages: (counter from the header, plaintext or None)."""
        raise NotImplementedError

    def seal_into(self, key: bytes, receiver_index: int, first_counter: int, src: Any,
                  src_offsets: Sequence[int], src_lengths: Sequence[int], dst: Any,
                  dst_offsets: Sequence[int], mtu: int = 0) -> list[int]:
        """Seal packet i = src[src_offsets[i]:][:src_lengths[i]] to dst[dst_offsets[i]:];
        returns the message lengths (sealed_len). dst_offsets[i] + 16 == src_offsets[i]
        in the same buffer seals in place."""
        raise NotImplementedError

    def open_into(self, key: bytes, src: Any, src_offsets: Sequence[int],
                  src_lengths: Sequence[int], dst: Any, dst_offsets: Sequence[int]) -> Opened:
        """Open message i = src[src_offsets[i]:][:src_lengths[i]] into dst[dst_offsets[i]:].
        A failed message's output range is zeroed. dst_offsets[i] == src_offsets[i] + 16
        in the same buffer opens in place."""
        raise NotImplementedError

    def seal_gso(self, key: bytes, receiver_index: int, first_counter: int, segments: Any,
                 segment_size: int, mtu: int = 0, out: Any = None) -> GsoRun:
        """Seal ``segments`` (back to back, each segment_size bytes but the last) into
        ``out`` (a new bytearray when None) at stride sealed_len(segment_size, mtu)."""
        raise NotImplementedError

    def open_gro(self, key: bytes, datagrams: Any, segment_size: int, out: Any = None,
                 out_stride: int | None = None) -> GroRun:
        """Open a UDP_GRO buffer (messages of segment_size bytes but the last) into
        ``out`` at ``out_stride`` (default segment_size - 32)."""
        raise NotImplementedError

    def aead_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
        """AEAD_CHACHA20_POLY1305 with any 12-byte nonce: ciphertext || tag."""
        raise NotImplementedError

    def aead_open(self, key: bytes, nonce: bytes, sealed: bytes | memoryview, aad: bytes = b"") -> bytes | None:
        """The plaintext, or None when the tag does not verify."""
        raise NotImplementedError


class _PythonBackend(Backend):
    """cryptography's ChaCha20Poly1305, one call per packet."""

    name = "python"

    def seal_batch(self, key: bytes, receiver_index: int, first_counter: int,
                   packets: Sequence[bytes], mtu: int = 0) -> list[bytes]:
        _check_key(key)
        _check_mtu(mtu)
        _check_header(receiver_index, first_counter, len(packets))
        encrypt = ChaCha20Poly1305(bytes(key)).encrypt
        pack, out = _HEADER.pack, []
        for counter, packet in enumerate(packets, first_counter):
            length = len(packet)
            if length > MAX_PACKET:
                raise ValueError(f"packet {counter - first_counter}: length {length} is not in "
                                 f"0..{MAX_PACKET}")
            pad = padded_len(length, mtu) - length
            plaintext = bytes(packet) + bytes(pad) if pad else packet
            out.append(pack(MESSAGE_TRANSPORT, receiver_index, counter)
                       + encrypt(_NONCE_PREFIX + _COUNTER.pack(counter), plaintext, None))
        return out

    def open_batch(self, key: bytes, datagrams: Sequence[bytes]) -> list[tuple[int, bytes | None]]:
        _check_key(key)
        decrypt = ChaCha20Poly1305(bytes(key)).decrypt
        results: list[tuple[int, bytes | None]] = []
        for i, datagram in enumerate(datagrams):
            length = len(datagram)
            if length > MAX_PACKET + OVERHEAD:
                raise ValueError(f"message {i}: length {length} is not in 0..{MAX_PACKET + OVERHEAD}")
            view = memoryview(datagram)
            counter = int.from_bytes(view[8:16], "little") if length >= TRANSPORT_HEADER_SIZE else 0
            plaintext = None
            if length >= OVERHEAD:
                try:
                    plaintext = decrypt(_NONCE_PREFIX + bytes(view[8:16]), view[16:], None)
                except InvalidTag:
                    pass
            results.append((counter, plaintext))
        return results

    def seal_into(self, key: bytes, receiver_index: int, first_counter: int, src: Any,
                  src_offsets: Sequence[int], src_lengths: Sequence[int], dst: Any,
                  dst_offsets: Sequence[int], mtu: int = 0) -> list[int]:
        n = len(src_offsets)
        _check_key(key)
        _check_mtu(mtu)
        _check_counts(n, src_lengths=src_lengths, dst_offsets=dst_offsets)
        _check_header(receiver_index, first_counter, n)
        source, target = _readable(src), _writable(dst)
        _check_seal_ranges(len(source), src_offsets, src_lengths, len(target), dst_offsets, mtu)
        encrypt = ChaCha20Poly1305(bytes(key)).encrypt
        lengths = []
        for i in range(n):
            offset, length, out = src_offsets[i], src_lengths[i], dst_offsets[i]
            counter = first_counter + i
            padded = padded_len(length, mtu)
            plaintext = bytes(source[offset:offset + length]) + bytes(padded - length)
            sealed = encrypt(_NONCE_PREFIX + _COUNTER.pack(counter), plaintext, None)
            _HEADER.pack_into(target, out, MESSAGE_TRANSPORT, receiver_index, counter)
            target[out + TRANSPORT_HEADER_SIZE:out + OVERHEAD + padded] = sealed
            lengths.append(OVERHEAD + padded)
        return lengths

    def open_into(self, key: bytes, src: Any, src_offsets: Sequence[int],
                  src_lengths: Sequence[int], dst: Any, dst_offsets: Sequence[int]) -> Opened:
        n = len(src_offsets)
        _check_key(key)
        _check_counts(n, src_lengths=src_lengths, dst_offsets=dst_offsets)
        source, target = _readable(src), _writable(dst)
        _check_open_ranges(len(source), src_offsets, src_lengths, len(target), dst_offsets)
        decrypt = ChaCha20Poly1305(bytes(key)).decrypt
        result = Opened([], [], [])
        for i in range(n):
            offset, length, out = src_offsets[i], src_lengths[i], dst_offsets[i]
            message = bytes(source[offset:offset + length])
            counter = int.from_bytes(message[8:16], "little") if length >= TRANSPORT_HEADER_SIZE else 0
            plaintext = None
            if length >= OVERHEAD:
                try:
                    plaintext = decrypt(_NONCE_PREFIX + message[8:16], message[16:], None)
                except InvalidTag:
                    target[out:out + length - OVERHEAD] = bytes(length - OVERHEAD)
            if plaintext is not None:
                target[out:out + len(plaintext)] = plaintext
            result.lengths.append(len(plaintext) if plaintext is not None else 0)
            result.ok.append(plaintext is not None)
            result.counters.append(counter)
        return result

    def seal_gso(self, key: bytes, receiver_index: int, first_counter: int, segments: Any,
                 segment_size: int, mtu: int = 0, out: Any = None) -> GsoRun:
        _check_key(key)
        _check_mtu(mtu)
        source = _readable(segments)
        count, stride, need = _gso_layout(len(source), segment_size, mtu)
        _check_header(receiver_index, first_counter, count)
        target = _writable(bytearray(need) if out is None else out)
        if need > len(target):
            raise ValueError(f"out holds {len(target)} bytes, the sealed segments need {need}")
        offsets = range(0, len(source), segment_size)
        lengths = [min(segment_size, len(source) - offset) for offset in offsets]
        self.seal_into(key, receiver_index, first_counter, source, offsets, lengths, target,
                       range(0, count * stride, stride), mtu)
        return GsoRun(target[:need], stride, count)

    def open_gro(self, key: bytes, datagrams: Any, segment_size: int, out: Any = None,
                 out_stride: int | None = None) -> GroRun:
        _check_key(key)
        source = _readable(datagrams)
        count, stride, need = _gro_layout(len(source), segment_size, out_stride)
        target = _writable(bytearray(need) if out is None else out)
        if need > len(target):
            raise ValueError(f"out holds {len(target)} bytes, the plaintexts need {need}")
        offsets = range(0, len(source), segment_size)
        lengths = [min(segment_size, len(source) - offset) for offset in offsets]
        opened = self.open_into(key, source, offsets, lengths, target, range(0, count * stride, stride))
        return GroRun(target, stride, *opened)

    def aead_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
        _check_key(key)
        return ChaCha20Poly1305(bytes(key)).encrypt(bytes(nonce), bytes(plaintext), bytes(aad))

    def aead_open(self, key: bytes, nonce: bytes, sealed: bytes | memoryview, aad: bytes = b"") -> bytes | None:
        _check_key(key)
        if len(sealed) < TAG_LEN:
            raise ValueError(f"a sealed message has at least {TAG_LEN} bytes, got {len(sealed)}")
        try:
            return ChaCha20Poly1305(bytes(key)).decrypt(bytes(nonce), bytes(sealed), bytes(aad))
        except InvalidTag:
            return None


class _NativeBackend(Backend):
    """pywg._fastpath with one of its two C backends."""

    def __init__(self, name: str, ffi: Any, lib: Any) -> None:
        self.name = name
        self._code = _NATIVE_CODES[name]
        self._ffi = ffi
        self._lib = lib

    # -- helpers --

    def _sizes(self, values: Sequence[int], what: str) -> Any:
        try:
            if isinstance(values, (list, tuple)):
                return self._ffi.new("size_t[]", values)
            return self._ffi.new("size_t[]", list(values))
        except OverflowError:
            raise ValueError(f"{what} must be non-negative and fit in size_t") from None

    def _u32s(self, values: Sequence[int], what: str) -> Any:
        try:
            if isinstance(values, (list, tuple)):
                return self._ffi.new("uint32_t[]", values)
            return self._ffi.new("uint32_t[]", list(values))
        except OverflowError:
            raise ValueError(f"{what} must be in 0..{_U32}") from None

    def _raise(self, rc: int, explain: Any) -> None:
        """Turn a C error code into an exception; ``explain`` re-checks in Python."""
        if rc in (_EBOUNDS, _EARG):
            explain()  # raises ValueError with the packet and the range at fault
            raise ValueError("an offset or length is out of range")
        if rc == _EUNAVAILABLE:
            raise FastpathError(f"the {self.name} backend is not available")
        raise FastpathError(f"the {self.name} backend failed (code {rc})")

    # -- API --

    def seal_batch(self, key: bytes, receiver_index: int, first_counter: int,
                   packets: Sequence[bytes], mtu: int = 0) -> list[bytes]:
        n = len(packets)
        lengths = [len(p) for p in packets]
        if n and max(lengths) > MAX_PACKET:
            raise ValueError(f"packets are limited to {MAX_PACKET} bytes, got {max(lengths)}")
        in_len = self._u32s(lengths, "packet lengths")
        out_off = self._ffi.new("size_t[]", max(n, 1))
        out_len = self._ffi.new("uint32_t[]", max(n, 1))
        _check_mtu(mtu)
        out = bytearray(self._lib.pywg_fp_seal_layout(n, in_len, mtu, out_off))
        src = b"".join(packets)
        in_off = self._sizes(list(accumulate(lengths[:-1], initial=0)) if n else [], "offsets")

        def explain() -> None:
            _check_seal_ranges(len(src), list(accumulate(lengths[:-1], initial=0)), lengths, len(out),
                               self._ffi.unpack(out_off, n), mtu)

        self._seal(key, receiver_index, first_counter, n, src, in_off, in_len, out, out_off,
                   out_len, mtu, explain)
        data = bytes(out)
        return [data[offset:offset + size]
                for offset, size in zip(self._ffi.unpack(out_off, n), self._ffi.unpack(out_len, n))]

    def _seal(self, key: Any, receiver_index: int, first_counter: int, n: int, src: Any,
              in_off: Any, in_len: Any, dst: Any, out_off: Any, out_len: Any, mtu: int,
              explain: Any) -> None:
        _check_key(key)
        _check_mtu(mtu)
        _check_header(receiver_index, first_counter, n)
        ffi = self._ffi
        source = ffi.from_buffer(src)
        target = ffi.from_buffer(_writable(dst), require_writable=True)
        rc = self._lib.pywg_fp_seal_batch(self._code, ffi.from_buffer(key), receiver_index,
                                          first_counter, n, source, len(source), in_off, in_len,
                                          mtu, target, len(target), out_off, out_len)
        if rc:
            self._raise(rc, explain)

    def open_batch(self, key: bytes, datagrams: Sequence[bytes]) -> list[tuple[int, bytes | None]]:
        _check_key(key)
        n = len(datagrams)
        if n == 0:
            return []
        lengths = [len(d) for d in datagrams]
        src = b"".join(datagrams)
        offsets = list(accumulate(lengths[:-1], initial=0))
        dst = bytearray(len(src))
        opened = self.open_into(key, src, offsets, lengths, dst, offsets)
        view = memoryview(dst)
        return [(counter, bytes(view[o:o + length]) if ok else None)
                for o, length, ok, counter in zip(offsets, *opened)]

    def seal_into(self, key: bytes, receiver_index: int, first_counter: int, src: Any,
                  src_offsets: Sequence[int], src_lengths: Sequence[int], dst: Any,
                  dst_offsets: Sequence[int], mtu: int = 0) -> list[int]:
        n = len(src_offsets)
        _check_counts(n, src_lengths=src_lengths, dst_offsets=dst_offsets)
        in_off = self._sizes(src_offsets, "src_offsets")
        in_len = self._u32s(src_lengths, "src_lengths")
        out_off = self._sizes(dst_offsets, "dst_offsets")
        out_len = self._ffi.new("uint32_t[]", max(n, 1))

        def explain() -> None:
            _check_seal_ranges(len(_readable(src)), src_offsets, src_lengths,
                               len(_readable(dst)), dst_offsets, mtu)

        self._seal(key, receiver_index, first_counter, n, src, in_off, in_len, dst, out_off,
                   out_len, mtu, explain)
        return self._ffi.unpack(out_len, n)

    def open_into(self, key: bytes, src: Any, src_offsets: Sequence[int],
                  src_lengths: Sequence[int], dst: Any, dst_offsets: Sequence[int]) -> Opened:
        _check_key(key)
        n = len(src_offsets)
        _check_counts(n, src_lengths=src_lengths, dst_offsets=dst_offsets)
        ffi = self._ffi
        in_off = self._sizes(src_offsets, "src_offsets")
        in_len = self._u32s(src_lengths, "src_lengths")
        out_off = self._sizes(dst_offsets, "dst_offsets")
        out_len = ffi.new("uint32_t[]", max(n, 1))
        ok = ffi.new("uint8_t[]", max(n, 1))
        counters = ffi.new("uint64_t[]", max(n, 1))
        source = ffi.from_buffer(src)
        target = ffi.from_buffer(_writable(dst), require_writable=True)
        rc = self._lib.pywg_fp_open_batch(self._code, ffi.from_buffer(key), n, source, len(source),
                                          in_off, in_len, target, len(target), out_off, out_len,
                                          ok, counters)
        if rc:
            self._raise(rc, lambda: _check_open_ranges(len(_readable(src)), src_offsets, src_lengths,
                                                       len(_readable(dst)), dst_offsets))
        return Opened(ffi.unpack(out_len, n), [bool(x) for x in ffi.unpack(ok, n)],
                      ffi.unpack(counters, n))

    # seal_gso and open_gro are the data path's calls: the C code checks every range, and
    # the Python checks run only to explain a refusal.

    def seal_gso(self, key: bytes, receiver_index: int, first_counter: int, segments: Any,
                 segment_size: int, mtu: int = 0, out: Any = None) -> GsoRun:
        if len(key) != KEY_LEN:
            _check_key(key)
        ffi, lib = self._ffi, self._lib
        source = ffi.from_buffer(segments)
        if out is None:
            out = bytearray(_gso_layout(len(source), segment_size, mtu)[2])
        try:
            target = ffi.from_buffer(out, require_writable=True)
        except BufferError:
            raise TypeError("the output buffer must be writable (a bytearray, not bytes)") from None
        counted = ffi.new("size_t[2]")
        try:
            rc = lib.pywg_fp_seal_gso(self._code, ffi.from_buffer(key), receiver_index,
                                      first_counter, source, len(source), segment_size, mtu,
                                      target, len(target), counted, counted + 1)
        except OverflowError:
            rc = _EARG
        if rc:
            def explain() -> None:
                _check_mtu(mtu)
                count, _, need = _gso_layout(len(source), segment_size, mtu)
                _check_header(receiver_index, first_counter, count)
                if need > len(target):
                    raise ValueError(f"out holds {len(target)} bytes, the sealed segments need {need}")
            self._raise(rc, explain)
        return GsoRun(_readable(out)[:counted[1]], sealed_len(segment_size, mtu), counted[0])

    def open_gro(self, key: bytes, datagrams: Any, segment_size: int, out: Any = None,
                 out_stride: int | None = None) -> GroRun:
        if len(key) != KEY_LEN:
            _check_key(key)
        ffi = self._ffi
        source = ffi.from_buffer(datagrams)
        count, stride, need = _gro_layout(len(source), segment_size, out_stride)
        if out is None:
            out = bytearray(need)
        view = _writable(out)
        if need > len(view):
            raise ValueError(f"out holds {len(view)} bytes, the plaintexts need {need}")
        target = ffi.from_buffer(view, require_writable=True)
        size = max(count, 1)
        out_len = ffi.new("uint32_t[]", size)
        ok = ffi.new("uint8_t[]", size)
        counters = ffi.new("uint64_t[]", size)
        rc = self._lib.pywg_fp_open_gro(self._code, ffi.from_buffer(key), source, len(source),
                                        segment_size, target, len(target), stride, count,
                                        out_len, ok, counters)
        if rc:
            self._raise(rc, lambda: None)
        return GroRun(view, stride, ffi.unpack(out_len, count),
                      [x == 1 for x in ffi.unpack(ok, count)], ffi.unpack(counters, count))

    def aead_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
        _check_key(key)
        if len(nonce) != 12:
            raise ValueError(f"nonce must be 12 bytes, got {len(nonce)}")
        if len(plaintext) > MAX_PACKET or len(aad) > MAX_PACKET:
            raise ValueError(f"plaintext and aad are limited to {MAX_PACKET} bytes")
        ffi = self._ffi
        out = bytearray(len(plaintext) + TAG_LEN)
        rc = self._lib.pywg_fp_aead_seal(self._code, ffi.from_buffer(key), ffi.from_buffer(nonce),
                                         ffi.from_buffer(aad), len(aad), ffi.from_buffer(plaintext),
                                         len(plaintext), ffi.from_buffer(out))
        if rc:
            self._raise(rc, lambda: None)
        return bytes(out)

    def aead_open(self, key: bytes, nonce: bytes, sealed: bytes | memoryview, aad: bytes = b"") -> bytes | None:
        _check_key(key)
        if len(nonce) != 12:
            raise ValueError(f"nonce must be 12 bytes, got {len(nonce)}")
        if not TAG_LEN <= len(sealed) <= MAX_PACKET + TAG_LEN or len(aad) > MAX_PACKET:
            raise ValueError(f"a sealed message has {TAG_LEN}..{MAX_PACKET + TAG_LEN} bytes, "
                             f"got {len(sealed)}")
        ffi = self._ffi
        out = bytearray(len(sealed) - TAG_LEN)
        rc = self._lib.pywg_fp_aead_open(self._code, ffi.from_buffer(key), ffi.from_buffer(nonce),
                                         ffi.from_buffer(aad), len(aad), ffi.from_buffer(sealed),
                                         len(sealed), ffi.from_buffer(out))
        if rc < 0:
            self._raise(rc, lambda: None)
        return bytes(out) if rc == 1 else None


# --- selection ----------------------------------------------------------------------------


def _load_native() -> tuple[Any, Any] | None:
    try:
        from pywg import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _fastpath.ffi, _fastpath.lib


_PURE = os.environ.get("PYWG_PUREPYTHON", "") not in ("", "0")
_native = None if _PURE else _load_native()
NATIVE_AVAILABLE = _native is not None
OPENSSL_LIBRARY: str | None = None  # which libcrypto the openssl backend loaded

_backends: dict[str, Backend] = {}  # fastest first
if _native is not None:
    _ffi, _lib = _native
    _names = ["portable"]
    if _lib.pywg_fp_openssl_available():
        OPENSSL_LIBRARY = _ffi.string(_lib.pywg_fp_openssl_describe()).decode()
        _names.insert(0 if _lib.pywg_fp_default_backend() == _lib.PYWG_FP_OPENSSL else 1, "openssl")
    _backends = {name: _NativeBackend(name, _ffi, _lib) for name in _names}
_backends["python"] = _PythonBackend()


def available_backends() -> list[str]:
    """Names of the backends this process can use, the default first."""
    return list(_backends)


def backend(name: str) -> Backend:
    """The backend called ``name`` (one of BACKENDS); ValueError when it is unavailable."""
    try:
        return _backends[name]
    except KeyError:
        raise ValueError(f"fast-path backend {name!r} is not available here "
                         f"(available: {', '.join(available_backends())})") from None


def _choose() -> Backend:
    wanted = os.environ.get("PYWG_FASTPATH_BACKEND", "").strip().lower()
    if wanted:
        if wanted in _backends:
            return _backends[wanted]
        warnings.warn(f"PYWG_FASTPATH_BACKEND={wanted!r} is not available; using "
                      f"{available_backends()[0]}", RuntimeWarning, stacklevel=3)
    elif _PURE:
        warnings.warn("PYWG_PUREPYTHON=1: the C extensions are not used: sealing and opening run in "
                      "pure Python (cryptography), several times slower; unset it for the fast path",
                      RuntimeWarning, stacklevel=3)
    elif _native is None:
        warnings.warn("pywg._fastpath (the C extension) is not built: sealing and opening run in "
                      "pure Python, several times slower; reinstall pywg with a C compiler "
                      "and the Python headers (pip install -e .) to build it",
                      RuntimeWarning, stacklevel=3)
    return _backends[available_backends()[0]]


_default = _choose()
BACKEND: str = _default.name

seal_batch = _default.seal_batch
open_batch = _default.open_batch
seal_into = _default.seal_into
open_into = _default.open_into
seal_gso = _default.seal_gso
open_gro = _default.open_gro
aead_seal = _default.aead_seal
aead_open = _default.aead_open
