"""The fast path (pywg.fastpath): every backend gives cryptography's bytes.

Backends: ``openssl`` (the C extension over libcrypto's EVP), ``portable`` (the C
extension's own ChaCha20-Poly1305) and ``python`` (cryptography, the fallback). Each
test runs on every backend; under CI=true a missing C extension is a build bug and fails.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg import fastpath
from pywg.fastpath import OVERHEAD, Backend, padded_len, sealed_len
from pywg.protocol.peer import padded_length

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "vectors" / "chacha20poly1305_rfc8439.json").read_text())
IN_CI = os.environ.get("CI") == "true"
PURE_REQUESTED = os.environ.get("PYWG_PUREPYTHON", "") not in ("", "0")


def _native_lib():
    """pywg._fastpath's lib, or skip (fail under CI=true: the build must produce it)."""
    try:
        from pywg import _fastpath  # type: ignore[attr-defined]
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"pywg._fastpath was not built (a build bug under CI): {exc}")
        pytest.skip(f"pywg._fastpath not built: {exc}")
    return _fastpath.ffi, _fastpath.lib


@pytest.fixture(params=fastpath.BACKENDS)
def fp(request) -> Backend:
    name = request.param
    if name not in fastpath.available_backends():
        if name != "python":
            _native_lib()  # fails under CI when the extension is missing
        if PURE_REQUESTED:
            pytest.skip("PYWG_PUREPYTHON=1: the native backends are not loaded")
        pytest.skip(f"backend {name} unavailable here ({fastpath.OPENSSL_LIBRARY})")
    return fastpath.backend(name)


def reference_seal(key: bytes, receiver_index: int, counter: int, packet: bytes, mtu: int) -> bytes:
    """A transport message built with cryptography and the protocol's own padding."""
    padded = padded_length(len(packet), mtu or None)
    nonce = bytes(4) + struct.pack("<Q", counter)
    return (struct.pack("<IIQ", 4, receiver_index, counter)
            + ChaCha20Poly1305(key).encrypt(nonce, packet + bytes(padded - len(packet)), None))


# --- the build ----------------------------------------------------------------------------


def test_extension_is_built_and_chosen() -> None:
    ffi, lib = _native_lib()
    assert lib.pywg_fp_default_backend() in (lib.PYWG_FP_OPENSSL, lib.PYWG_FP_PORTABLE)
    if PURE_REQUESTED:
        assert fastpath.BACKEND == "python"
        return
    assert fastpath.NATIVE_AVAILABLE
    default = "openssl" if lib.pywg_fp_default_backend() == lib.PYWG_FP_OPENSSL else "portable"
    assert fastpath.BACKEND == (os.environ.get("PYWG_FASTPATH_BACKEND") or default)
    assert fastpath.available_backends()[0] == default
    # the rule: portable where its 16-lane kernels run or libcrypto is missing
    expected = ("portable" if lib.pywg_fp_portable_lanes() >= 16 or not lib.pywg_fp_openssl_available()
                else "openssl")
    assert default == expected
    assert fastpath.seal_batch.__self__ is fastpath.backend(fastpath.BACKEND)  # type: ignore[attr-defined]
    description = ffi.string(lib.pywg_fp_openssl_describe()).decode()
    assert description.startswith("libcrypto") == bool(lib.pywg_fp_openssl_available()), description


def test_missing_extension_warns_once_and_falls_back() -> None:
    script = (
        "import sys, warnings\n"
        "sys.modules['pywg._fastpath'] = None  # as if the build had failed\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import pywg.fastpath as f\n"
        "    import pywg.fastpath\n"
        "    f.seal_batch(bytes(32), 1, 0, [b'x'])\n"
        "print(f.BACKEND, f.available_backends(), len(caught), caught[0].category.__name__,\n"
        "      'not built' in str(caught[0].message))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYWG_PUREPYTHON", "PYWG_FASTPATH"))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True).stdout.split()
    assert out == ["python", "['python']", "1", "RuntimeWarning", "True"]


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("PYWG_PUREPYTHON", "1", "python"),
    ("PYWG_FASTPATH_BACKEND", "python", "python"),
    ("PYWG_FASTPATH_BACKEND", "portable", "portable"),
])
def test_environment_picks_the_backend(variable: str, value: str, expected: str) -> None:
    if expected != "python":
        _native_lib()
    script = ("import warnings\nwith warnings.catch_warnings(record=True) as caught:\n"
              "    warnings.simplefilter('always')\n    import pywg.fastpath as f\n    import pywg.device.daemon\n"
              "print(f.BACKEND, len(caught), all(str(variable) in str(w.message) for w in caught))"
              .replace("variable", repr(variable)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYWG_PUREPYTHON", "PYWG_FASTPATH"))}
    env[variable] = value
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True).stdout.split()
    # PYWG_PUREPYTHON=1 says so once (the README promises it); a backend asked for by name is quiet.
    assert out == [expected, "1" if variable == "PYWG_PUREPYTHON" else "0", "True"]


# --- RFC 8439 vectors ---------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["aead"], ids=lambda v: v["name"][:28])
def test_rfc8439_aead(fp: Backend, vector: dict) -> None:
    key, nonce, aad = (bytes.fromhex(vector[k]) for k in ("key", "nonce", "aad"))
    plaintext, ciphertext, tag = (bytes.fromhex(vector[k]) for k in ("plaintext", "ciphertext", "tag"))
    assert fp.aead_seal(key, nonce, plaintext, aad) == ciphertext + tag
    assert fp.aead_open(key, nonce, ciphertext + tag, aad) == plaintext
    assert fp.aead_open(key, nonce, ciphertext + tag, aad + b"\x00") is None
    for position in (0, len(ciphertext) // 2, len(ciphertext) + 15):
        tampered = bytearray(ciphertext + tag)
        tampered[position] ^= 0x80
        assert fp.aead_open(key, nonce, bytes(tampered), aad) is None


def test_rfc8439_chacha20_and_poly1305_primitives() -> None:
    """The portable code's pieces on their own (A.1, A.2, A.3 and A.4)."""
    ffi, lib = _native_lib()

    def chacha20(key: bytes, nonce: bytes, counter: int, data: bytes) -> bytes:
        out = bytearray(len(data))
        lib.pywg_fp_chacha20(key, nonce, counter, ffi.from_buffer(data), ffi.from_buffer(out), len(data))
        return bytes(out)

    def poly1305(key: bytes, message: bytes) -> bytes:
        tag = bytearray(16)
        lib.pywg_fp_poly1305(key, ffi.from_buffer(message), len(message), ffi.from_buffer(tag))
        return bytes(tag)

    for v in VECTORS["chacha20_block"]:
        keystream = bytes.fromhex(v["keystream"])
        key, nonce = bytes.fromhex(v["key"]), bytes.fromhex(v["nonce"])
        assert chacha20(key, nonce, v["counter"], bytes(len(keystream))) == keystream, v["name"]
    for v in VECTORS["chacha20_encrypt"]:
        key, nonce = bytes.fromhex(v["key"]), bytes.fromhex(v["nonce"])
        plaintext, ciphertext = bytes.fromhex(v["plaintext"]), bytes.fromhex(v["ciphertext"])
        assert chacha20(key, nonce, v["initial_counter"], plaintext) == ciphertext, v["name"]
    for v in VECTORS["poly1305"]:
        assert poly1305(bytes.fromhex(v["key"]), bytes.fromhex(v["message"])) == bytes.fromhex(v["tag"]), v["name"]
    for v in VECTORS["poly1305_keygen"]:
        key, nonce = bytes.fromhex(v["key"]), bytes.fromhex(v["nonce"])
        assert chacha20(key, nonce, 0, bytes(32)) == bytes.fromhex(v["otk"]), v["name"]


def test_poly1305_against_cryptography() -> None:
    """Random keys and every length up to 4 blocks, plus the carries near 2^130 - 5."""
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    ffi, lib = _native_lib()
    rng = random.Random(1305)
    keys = [rng.randbytes(32) for _ in range(20)] + [b"\xff" * 32, bytes(32), b"\xff" * 16 + bytes(16)]
    for key in keys:
        for length in [*range(65), 255, 256, 1024, 1420]:
            for message in (rng.randbytes(length), b"\xff" * length):
                tag = bytearray(16)
                lib.pywg_fp_poly1305(key, ffi.from_buffer(message), length, ffi.from_buffer(tag))
                assert bytes(tag) == Poly1305.generate_tag(key, message), (key.hex(), length)


def test_padded_len_matches_the_protocol() -> None:
    _ffi, lib = _native_lib() if fastpath.NATIVE_AVAILABLE else (None, None)
    for mtu in (0, 1, 15, 16, 17, 100, 1280, 1420, 1425, 9000):
        for length in [*range(300), *range(1400, 1450), *range(2800, 2900), 65535]:
            expected = padded_length(length, mtu or None)
            assert padded_len(length, mtu) == expected, (length, mtu)
            assert sealed_len(length, mtu) == expected + OVERHEAD
            if lib is not None:
                assert lib.pywg_fp_padded_len(length, mtu) == expected, (length, mtu)


@pytest.mark.parametrize("lanes", [1, 4, 8])
def test_every_portable_kernel_width(lanes: int) -> None:
    """The portable backend with its kernels capped (PYWG_PORTABLE_LANES): the 1-block,
    4-, 8- and (by the other tests, on an AVX-512 machine) 16-lane paths all agree."""
    _ffi, lib = _native_lib()
    if lib.pywg_fp_portable_lanes() < lanes:
        pytest.skip(f"this CPU has no {lanes}-lane kernel")
    script = """
import random, struct, sys
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pywg import fastpath
from pywg._fastpath import lib
assert lib.pywg_fp_portable_lanes() == int(sys.argv[1]), lib.pywg_fp_portable_lanes()
fp = fastpath.backend("portable")
rng = random.Random(sys.argv[1])
key = rng.randbytes(32)
aead = ChaCha20Poly1305(key)
packets = [rng.randbytes(n) for n in [*range(0, 1501, 7), 4000, 9000]]
for mtu in (0, 1420):
    sealed = fp.seal_batch(key, 5, 40, packets, mtu)
    for i, (p, m) in enumerate(zip(packets, sealed)):
        nonce = bytes(4) + struct.pack("<Q", 40 + i)
        assert aead.decrypt(nonce, m[16:], None)[:len(p)] == p, (len(p), mtu)
    sealed[3] = sealed[3][:-1] + bytes([sealed[3][-1] ^ 1])
    opened = fp.open_batch(key, sealed)
    assert [x is None for _, x in opened] == [i == 3 for i in range(len(packets))]
    assert all(x[:len(p)] == p for p, (_, x) in zip(packets, opened) if x is not None)
data = rng.randbytes(1380 * 40 + 77)
run = fp.seal_gso(key, 1, 0, data, 1380, 1420)
gro = fp.open_gro(key, run.data, run.stride)
assert all(gro.ok) and bytes(gro.data[39 * gro.stride:39 * gro.stride + 1380]) == data[39 * 1380:40 * 1380]
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYWG_PUREPYTHON", "PYWG_FASTPATH"))}
    env["PYWG_PORTABLE_LANES"] = str(lanes)
    done = subprocess.run([sys.executable, "-c", script, str(lanes)], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=False)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


# --- cross-checks against cryptography ----------------------------------------------------


@pytest.mark.parametrize("mtu", [0, 1420])
def test_every_length_matches_cryptography(fp: Backend, mtu: int) -> None:
    rng = random.Random(mtu)
    key = rng.randbytes(32)
    packets = [rng.randbytes(length) for length in range(1501)]
    sealed = fp.seal_batch(key, 0xA1B2C3D4, 1000, packets, mtu)
    for i, packet in enumerate(packets):
        assert sealed[i] == reference_seal(key, 0xA1B2C3D4, 1000 + i, packet, mtu), len(packet)
    opened = fp.open_batch(key, sealed)
    for i, (counter, plaintext) in enumerate(opened):
        assert counter == 1000 + i
        assert plaintext is not None and plaintext[:i] == packets[i]
        assert plaintext[i:] == bytes(padded_len(i, mtu) - i)


def test_opens_what_cryptography_sealed(fp: Backend) -> None:
    rng = random.Random(7)
    key = rng.randbytes(32)
    lengths = [rng.randrange(0, 9000) for _ in range(200)]
    messages = [reference_seal(key, 9, 2**63 + i, rng.randbytes(n), 0) for i, n in enumerate(lengths)]
    aead = ChaCha20Poly1305(key)
    for (counter, plaintext), message in zip(fp.open_batch(key, messages), messages):
        assert counter == int.from_bytes(message[8:16], "little")
        assert plaintext == aead.decrypt(bytes(4) + message[8:16], message[16:], None)


@pytest.mark.parametrize("count", [1, 1000])
def test_batch_sizes(fp: Backend, count: int) -> None:
    rng = random.Random(count)
    key = rng.randbytes(32)
    packets = [rng.randbytes(rng.randrange(0, 1421)) for _ in range(count)]
    sealed = fp.seal_batch(key, 3, 2**64 - count, packets, 1420)  # the last counter is 2^64 - 1
    assert [m[8:16] for m in sealed] == [struct.pack("<Q", 2**64 - count + i) for i in range(count)]
    assert sealed == [reference_seal(key, 3, 2**64 - count + i, p, 1420) for i, p in enumerate(packets)]
    assert [c for c, _ in fp.open_batch(key, sealed)] == [2**64 - count + i for i in range(count)]
    assert fp.seal_batch(key, 3, 0, [], 0) == [] and fp.open_batch(key, []) == []


def test_bit_flips_fail_only_their_packet(fp: Backend) -> None:
    rng = random.Random(99)
    key = rng.randbytes(32)
    packets = [rng.randbytes(rng.randrange(0, 1500)) for _ in range(64)]
    sealed = [bytearray(m) for m in fp.seal_batch(key, 1, 0, packets, 0)]
    flipped = set(rng.sample(range(64), 16))
    for i in flipped:
        bit = rng.randrange(8 * 8, 8 * len(sealed[i]))  # counter, ciphertext or tag (authenticated)
        sealed[i][bit // 8] ^= 1 << (bit % 8)
    for i, (counter, plaintext) in enumerate(fp.open_batch(key, [bytes(m) for m in sealed])):
        if i in flipped:
            assert plaintext is None
        else:
            assert counter == i and plaintext is not None and plaintext[:len(packets[i])] == packets[i]
    # the buffer variant zeroes a failed packet's output and leaves its neighbours' alone
    src = b"".join(sealed)
    offsets = [sum(map(len, sealed[:i])) for i in range(64)]
    dst = bytearray(b"\xee" * len(src))
    opened = fp.open_into(key, src, offsets, [len(m) for m in sealed], dst, offsets)
    for i in range(64):
        body = dst[offsets[i]:offsets[i] + len(sealed[i]) - OVERHEAD]
        assert opened.ok[i] == (i not in flipped)
        assert opened.lengths[i] == (0 if i in flipped else len(body))
        assert body == (bytes(len(body)) if i in flipped else packets[i] + bytes(len(body) - len(packets[i])))
        assert dst[offsets[i] + len(body):offsets[i] + len(sealed[i])] == b"\xee" * OVERHEAD


def test_short_and_foreign_messages(fp: Backend) -> None:
    key = bytes(range(32))
    good = fp.seal_batch(key, 1, 5, [b"ping"])[0]
    results = fp.open_batch(key, [b"", b"\x04" * 20, good[:31], good, fp.seal_batch(bytes(32), 1, 6, [b"x"])[0]])
    assert results[0] == (0, None)
    assert results[1] == (int.from_bytes(b"\x04" * 8, "little"), None)
    assert results[2] == (5, None)
    assert results[3] == (5, b"ping" + bytes(12))
    assert results[4] == (6, None)


# --- buffer variants ----------------------------------------------------------------------


def test_seal_into_and_open_into_at_offsets(fp: Backend) -> None:
    rng = random.Random(5)
    key = rng.randbytes(32)
    packets = [rng.randbytes(rng.randrange(0, 1500)) for _ in range(40)]
    src = bytearray(rng.randbytes(100))
    src_offsets = []
    for p in packets:  # with gaps of junk between packets
        src_offsets.append(len(src))
        src += p + rng.randbytes(rng.randrange(0, 40))
    dst = bytearray(b"\xaa" * 100_000)
    dst_offsets = sorted(rng.sample(range(0, 100_000 - 1600, 1600), 40))
    rng.shuffle(dst_offsets)  # outputs in any order
    lengths = fp.seal_into(key, 77, 500, src, src_offsets, [len(p) for p in packets], dst, dst_offsets, 1420)
    expected = [reference_seal(key, 77, 500 + i, p, 1420) for i, p in enumerate(packets)]
    assert lengths == [len(m) for m in expected]
    for offset, message in zip(dst_offsets, expected):
        assert dst[offset:offset + len(message)] == message
        assert dst[offset + len(message):offset + len(message) + 1] == b"\xaa"
    out = bytearray(len(dst))
    plain_offsets = [o + 3 for o in dst_offsets]
    opened = fp.open_into(key, memoryview(dst), dst_offsets, lengths, out, plain_offsets)
    assert all(opened.ok) and opened.counters == list(range(500, 540))
    for offset, length, packet in zip(plain_offsets, opened.lengths, packets):
        assert length == padded_len(len(packet), 1420)
        assert out[offset:offset + len(packet)] == packet


def test_in_place_seal_and_open(fp: Backend) -> None:
    """Plaintext at o + 16 sealed to o in one buffer, then opened back to o + 16."""
    rng = random.Random(6)
    key = rng.randbytes(32)
    packets = [rng.randbytes(rng.randrange(0, 1421)) for _ in range(30)]
    stride = 1420 + OVERHEAD
    buf = bytearray(stride * 30)
    for i, p in enumerate(packets):
        buf[i * stride + 16:i * stride + 16 + len(p)] = p
    starts = [i * stride for i in range(30)]
    lengths = fp.seal_into(key, 2, 0, buf, [s + 16 for s in starts], list(map(len, packets)), buf, starts, 1420)
    for i, p in enumerate(packets):
        assert buf[starts[i]:starts[i] + lengths[i]] == reference_seal(key, 2, i, p, 1420)
    opened = fp.open_into(key, buf, starts, lengths, buf, [s + 16 for s in starts])
    assert all(opened.ok)
    for i, p in enumerate(packets):
        assert buf[starts[i] + 16:starts[i] + 16 + len(p)] == p


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_overlapping_layouts_agree_across_backends(seed: int) -> None:
    """Outputs overlapping inputs in arbitrary ways: every backend writes the same bytes
    (each message is read whole before it is written, in order)."""
    rng = random.Random(seed)
    key = rng.randbytes(32)
    n = rng.randrange(1, 6)
    size = 4000
    base = bytearray(rng.randbytes(size))
    lengths = [rng.randrange(0, 600) for _ in range(n)]
    src_offsets = [rng.randrange(0, size - 700) for _ in range(n)]
    dst_offsets = [rng.randrange(0, size - 700) for _ in range(n)]
    mtu = rng.choice([0, 100, 1420])
    results = {}
    for name in fastpath.available_backends():
        buf = bytearray(base)
        lens = fastpath.backend(name).seal_into(key, 1, 0, buf, src_offsets, lengths, buf, dst_offsets, mtu)
        opened = fastpath.backend(name).open_into(key, buf, dst_offsets, lens, buf,
                                                  [(o * 7) % (size - 700) for o in src_offsets])
        results[name] = (bytes(buf), lens, opened)
    values = list(results.values())
    assert all(v == values[0] for v in values[1:]), list(results)


def test_gso_layout_and_gro_round_trip(fp: Backend) -> None:
    rng = random.Random(40)
    key = rng.randbytes(32)
    segment = 1380
    data = rng.randbytes(segment * 39 + 500)  # 40 segments, the last one shorter
    run = fp.seal_gso(key, 0xDEAD, 77, data, segment, 1420)
    assert run.messages == 40 and run.stride == sealed_len(segment, 1420) == 32 + 1392
    assert len(run.data) == 39 * run.stride + sealed_len(500, 1420)
    for i in range(40):
        message = run.data[i * run.stride:(i + 1) * run.stride]
        assert bytes(message) == reference_seal(key, 0xDEAD, 77 + i, data[i * segment:(i + 1) * segment], 1420)
    # the same layout opened as a UDP_GRO buffer
    gro = fp.open_gro(key, run.data, run.stride)
    assert all(gro.ok) and gro.counters == list(range(77, 117)) and gro.stride == run.stride - OVERHEAD
    for i in range(40):
        chunk = data[i * segment:(i + 1) * segment]
        assert gro.data[i * gro.stride:i * gro.stride + len(chunk)] == chunk
    # in place: plaintext i lands at 16 + i * stride of the receive buffer itself
    receive = bytearray(run.data)
    view = memoryview(receive)
    in_place = fp.open_gro(key, view, run.stride, out=view[16:], out_stride=run.stride)
    assert all(in_place.ok)
    for i in range(40):
        chunk = data[i * segment:(i + 1) * segment]
        assert receive[16 + i * run.stride:16 + i * run.stride + len(chunk)] == chunk
    # into a caller's buffer, and empty input
    out = bytearray(len(run.data) + 10)
    again = fp.seal_gso(key, 0xDEAD, 77, data, segment, 1420, out=out)
    assert again.data == run.data and out[len(run.data):] == bytes(10)
    assert fp.seal_gso(key, 1, 0, b"", segment).messages == 0


@pytest.mark.parametrize("mtu", [0, 1420])
@pytest.mark.parametrize("segment", [1, 15, 16, 17, 64, 100, 1392, 1415, 1420, 2000])
def test_seal_gso_every_group_shape(fp: Backend, segment: int, mtu: int) -> None:
    """seal_gso seals runs of equal segments in groups side by side (16 keystreams per wide
    run, 8 MACs per IFMA step, the rest one by one): every count around those sizes, full
    or short last segment, padded lengths that are and are not whole Poly1305 blocks, gives
    exactly the reference messages."""
    rng = random.Random(segment * 7 + mtu)
    key = rng.randbytes(32)
    for count in (1, 2, 7, 8, 9, 16, 17, 33):
        for short_last in (0, segment // 2):
            if short_last and count == 1:
                continue
            data = rng.randbytes(segment * count - short_last)
            run = fp.seal_gso(key, 9, 1000 * count, data, segment, mtu)
            assert run.messages == count
            for i in range(count):
                chunk = data[i * segment:(i + 1) * segment]
                message = bytes(run.data[i * run.stride:i * run.stride + sealed_len(len(chunk), mtu)])
                assert message == reference_seal(key, 9, 1000 * count + i, chunk, mtu), (count, short_last, i)


@pytest.mark.parametrize("segment", [1, 16, 17, 100, 1392, 1415, 2000])
def test_open_gro_every_group_shape(fp: Backend, segment: int) -> None:
    """open_gro checks every tag before decrypting, the messages of one length side by side:
    around the group sizes, with a short last message and with a forged message at each
    place of a group, exactly the forged ones fail (zeroed) and the rest open."""
    rng = random.Random(segment)
    key = rng.randbytes(32)
    for count in (1, 2, 7, 8, 9, 16, 17, 33):
        data = rng.randbytes(segment * count - (segment // 2 if count > 1 else 0))
        run = fp.seal_gso(key, 9, 500, data, segment, 1420)
        forged = {i for i in (0, 7, 8, count - 1) if i < count} if count > 2 else set()
        received = bytearray(run.data)
        for i in forged:
            received[i * run.stride + 20] ^= 0x40  # a ciphertext byte
        gro = fp.open_gro(key, bytes(received), run.stride)
        assert [not ok for ok in gro.ok] == [i in forged for i in range(count)], (count, forged)
        for i in range(count):
            chunk = data[i * segment:(i + 1) * segment]
            got = bytes(gro.data[i * gro.stride:i * gro.stride + len(chunk)])
            assert got == (bytes(len(chunk)) if i in forged else chunk), (count, i)


# --- caller mistakes ----------------------------------------------------------------------


def test_out_of_bounds_raises_before_writing(fp: Backend) -> None:
    key = bytes(32)
    src = bytes(1000)
    dst = bytearray(b"\x55" * 2000)
    untouched = bytes(dst)

    def seal(**change: object) -> list[int]:
        args: dict[str, Any] = {"src_offsets": [0, 100], "src_lengths": [100, 100],
                                "dst_offsets": [0, 200], "mtu": 0}
        args.update(change)
        return fp.seal_into(key, 1, 0, src, args["src_offsets"], args["src_lengths"], dst,
                            args["dst_offsets"], args["mtu"])

    cases: list[dict[str, object]] = [
        {"src_offsets": [0, 901]},          # input past the end
        {"src_lengths": [100, 1000]},       # input longer than the buffer
        {"src_offsets": [0, -1]},           # negative offset
        {"dst_offsets": [0, 1900]},         # output past the end (100 B -> 144 B)
        {"dst_offsets": [0, 2**64 - 10]},   # offsets that would wrap around
        {"src_offsets": [0, 2**64 - 10]},
        {"src_lengths": [100, 2**32 + 1]},  # not a u32
        {"src_lengths": [100]},             # count mismatch
        {"dst_offsets": [0, 200, 400]},
        {"mtu": -1},
    ]
    for change in cases:
        with pytest.raises(ValueError):
            seal(**change)
        assert dst == untouched, change
    with pytest.raises(ValueError):
        fp.seal_into(bytes(31), 1, 0, src, [0], [10], dst, [0])
    with pytest.raises(ValueError):
        fp.seal_into(key, 2**32, 0, src, [0], [10], dst, [0])
    with pytest.raises(ValueError):
        fp.seal_into(key, 1, 2**64 - 1, src, [0, 10], [10, 10], dst, [0, 100])  # counter overflow
    with pytest.raises(TypeError):
        fp.seal_into(key, 1, 0, src, [0], [10], bytes(2000), [0])  # read-only output
    assert dst == untouched
    assert seal() == [144, 144]  # the unchanged arguments are fine (100 B pads to 112)

    message = fp.seal_batch(key, 1, 0, [bytes(100)])[0]
    out = bytearray(b"\x55" * 200)
    for offsets, lengths, dst_offsets in [([0], [len(message) + 1], [0]), ([1], [len(message)], [0]),
                                          ([0], [len(message)], [100]), ([0], [len(message)], [-5])]:
        with pytest.raises(ValueError):
            fp.open_into(key, message, offsets, lengths, out, dst_offsets)
        assert out == b"\x55" * 200
    with pytest.raises(ValueError):
        fp.seal_gso(key, 1, 0, bytes(3000), 1420, 1420, out=bytearray(3000))
    with pytest.raises(ValueError):
        fp.seal_gso(key, 1, 0, bytes(3000), 0)
    with pytest.raises(ValueError):
        fp.open_gro(key, bytes(3000), 1452, out=bytearray(100))
    with pytest.raises(ValueError):
        fp.open_gro(key, bytes(3000), 1452, out_stride=10)
    with pytest.raises(ValueError):
        fp.seal_batch(bytes(16), 1, 0, [b"x"])


def test_c_checks_bounds_by_itself() -> None:
    """The C layer refuses out-of-range offsets even when called without the wrapper."""
    ffi, lib = _native_lib()
    src, dst = bytes(100), bytearray(200)
    out_len = ffi.new("uint32_t[]", 1)
    for in_off, in_len, out_off in [(1, 100, 0), (0, 100, 100), (2**64 - 1, 2, 0), (0, 2**31, 0)]:
        rc = lib.pywg_fp_seal_batch(0, bytes(32), 1, 0, 1, ffi.from_buffer(src), len(src),
                                    ffi.new("size_t[]", [in_off]), ffi.new("uint32_t[]", [in_len]), 0,
                                    ffi.from_buffer(dst), len(dst), ffi.new("size_t[]", [out_off]), out_len)
        assert rc in (lib.PYWG_FP_EBOUNDS, lib.PYWG_FP_EARG)
    assert dst == bytes(200)


# --- threads ------------------------------------------------------------------------------


def test_threads_share_nothing(fp: Backend) -> None:
    rng = random.Random(8)
    jobs = [(rng.randbytes(32), [rng.randbytes(rng.randrange(0, 1500)) for _ in range(50)]) for _ in range(8)]
    expected = [fp.seal_batch(key, 1, 0, packets, 1420) for key, packets in jobs]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        key, packets = jobs[i]
        for _ in range(20):
            sealed = fp.seal_batch(key, 1, 0, packets, 1420)
            assert all(p is not None for _, p in fp.open_batch(key, sealed))
        results[i] = sealed

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == expected


@pytest.mark.parametrize("name", ["openssl", "portable"])
def test_native_calls_release_the_gil(name: str) -> None:
    _native_lib()
    if name not in fastpath.available_backends():
        pytest.skip(f"{name} unavailable")
    fp = fastpath.backend(name)
    data = bytes(32 << 20)
    out = bytearray(len(data) * 2)
    ticks = 0
    stop = False

    def spin() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.01)
        before = ticks
        fp.seal_gso(bytes(32), 1, 0, data, 1420, 1420, out=out)  # tens of ms in C
        during = ticks - before
    finally:
        stop = True
        thread.join()
    assert during > 1000, f"the other thread ran {during} times while C worked: GIL held?"
