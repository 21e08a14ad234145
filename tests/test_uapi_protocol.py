"""The UAPI configuration protocol, sans I/O: framing, set validation, get formatting.

Expected texts and errno values are written out by hand from wireguard-go's
``device/uapi.go`` (IpcGetOperation, IpcSetOperation, IpcHandle) and ``ipc/uapi_unix.go``;
tests/test_uapi_wireguard_go.py checks the same facts against the running daemon.
Hypothesis drives the round trips and the fuzzing (nothing but ``UapiError`` escapes).
"""

from __future__ import annotations

import base64
import ipaddress
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywg.uapi.protocol import (
    IPC_ERROR_INVALID,
    IPC_ERROR_IO,
    IPC_ERROR_PORT_IN_USE,
    IPC_ERROR_PROTOCOL,
    IPC_ERROR_UNKNOWN,
    MAX_LINE_BYTES,
    UNCHANGED,
    AllowedIPChange,
    DeviceChanges,
    DeviceSnapshot,
    PeerChanges,
    PeerSnapshot,
    Request,
    RequestReader,
    SetRequest,
    UapiError,
    format_errno,
    format_get,
    format_ip,
    format_prefix,
    format_set,
    parse_get,
    parse_set,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PRIVATE = bytes.fromhex("e0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e4f")  # clamped
PEER_A = bytes.fromhex("1f2e3d4c5b6a798897a6b5c4d3e2f10f1e2d3c4b5a69788796a5b4c3d2e1f000")
PEER_B = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf")
PSK = bytes.fromhex("5a" * 32)
PK_LINE = f"public_key={PEER_A.hex()}"
ZERO_HEX = "00" * 32


def request_errno(lines: list[str]) -> int:
    with pytest.raises(UapiError) as info:
        parse_set(lines)
    return info.value.errno


# --- errno table ------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="errno numbers are platform values")
def test_errno_values_are_wireguard_gos_on_linux() -> None:
    # ipc/uapi_unix.go: -EIO, -EPROTO, -EINVAL, -EADDRINUSE and a hard-coded -55.
    assert (IPC_ERROR_IO, IPC_ERROR_PROTOCOL, IPC_ERROR_INVALID, IPC_ERROR_PORT_IN_USE,
            IPC_ERROR_UNKNOWN) == (-5, -71, -22, -98, -55)


def test_errno_trailer_is_written_negative_like_wireguard_go() -> None:
    assert format_errno(0) == "errno=0\n\n"
    assert format_errno(IPC_ERROR_INVALID) == f"errno={-22 if sys.platform == 'linux' else IPC_ERROR_INVALID}\n\n"
    assert UapiError(IPC_ERROR_PROTOCOL, "x").response() == f"errno={IPC_ERROR_PROTOCOL}\n\n"


# --- set: what a valid request means ------------------------------------------------------


def test_a_request_as_wg_sends_it() -> None:
    body = [
        f"private_key={PRIVATE.hex()}", "listen_port=51820", "fwmark=0", "replace_peers=true",
        f"public_key={PEER_A.hex()}", f"preshared_key={PSK.hex()}", "endpoint=192.0.2.1:51820",
        "persistent_keepalive_interval=25", "replace_allowed_ips=true",
        "allowed_ip=10.0.0.0/24", "allowed_ip=fd00::/64",
        f"public_key={PEER_B.hex()}", "remove=true",
    ]
    assert parse_set(body) == SetRequest(
        DeviceChanges(private_key=PRIVATE, listen_port=51820, fwmark=0, replace_peers=True),
        (
            PeerChanges(
                PEER_A, preshared_key=PSK, endpoint=("192.0.2.1", 51820), persistent_keepalive=25,
                replace_allowed_ips=True,
                allowed_ips=(AllowedIPChange(ipaddress.ip_network("10.0.0.0/24")),
                             AllowedIPChange(ipaddress.ip_network("fd00::/64"))),
            ),
            PeerChanges(PEER_B, remove=True),
        ),
    )


def test_empty_set_changes_nothing() -> None:
    request = parse_set([])
    assert request == SetRequest()
    assert request.device.private_key is UNCHANGED and request.device.listen_port is None


def test_pairs_are_accepted_as_well_as_lines() -> None:
    assert parse_set([("listen_port", "1"), ("fwmark", "2")]) == parse_set(["listen_port=1", "fwmark=2"])
    with pytest.raises(TypeError):
        parse_set("listen_port=1")


def test_private_key_is_clamped_and_all_zero_removes_it() -> None:
    # wireguard-go: NoisePrivateKey.FromMaybeZeroHex clamps unless the key is all zero.
    raw = bytes([0xFF] * 32)
    assert parse_set([f"private_key={raw.hex()}"]).device.private_key == bytes([0xF8] + [0xFF] * 30 + [0x7F])
    assert parse_set([f"private_key={ZERO_HEX}"]).device.private_key is None


def test_hex_is_accepted_in_either_case() -> None:
    upper = parse_set([f"public_key={PEER_B.hex().upper()}", f"preshared_key={PSK.hex().upper()}"])
    assert upper.peers[0].public_key == PEER_B and upper.peers[0].preshared_key == PSK


def test_all_zero_preshared_key_clears_it() -> None:
    assert parse_set([PK_LINE, f"preshared_key={ZERO_HEX}"]).peers[0].preshared_key is None
    assert parse_set([PK_LINE]).peers[0].preshared_key is UNCHANGED


def test_last_value_wins_and_numbers_take_leading_zeros() -> None:
    # strconv.ParseUint(value, 10, 16) accepts leading zeros.
    request = parse_set(["listen_port=1", "listen_port=00051820", "fwmark=4294967295"])
    assert request.device.listen_port == 51820 and request.device.fwmark == 4294967295


def test_remove_ends_the_section_but_later_lines_are_still_validated() -> None:
    lines = [PK_LINE, "endpoint=192.0.2.1:1", "remove=true", "allowed_ip=10.0.0.0/8", "update_only=true"]
    assert parse_set(lines).peers == (PeerChanges(PEER_A, remove=True),)
    assert request_errno([PK_LINE, "remove=true", "allowed_ip=10.0.0.0/99"]) == IPC_ERROR_INVALID


def test_replace_allowed_ips_drops_the_lines_before_it() -> None:
    peer = parse_set([PK_LINE, "allowed_ip=10.0.0.0/8", "replace_allowed_ips=true", "allowed_ip=10.1.0.0/16"])
    assert peer.peers[0].replace_allowed_ips
    assert [str(a) for a in peer.peers[0].allowed_ips] == ["10.1.0.0/16"]


def test_allowed_ips_are_masked_and_written_as_go_writes_them() -> None:
    peer = parse_set([PK_LINE, "allowed_ip=10.0.0.1/24", "allowed_ip=::ffff:10.1.2.3/120",
                      "allowed_ip=FD00:0:0:0::1/64", "allowed_ip=-192.168.1.0/24", "allowed_ip=0.0.0.0/0"])
    assert [str(a) for a in peer.peers[0].allowed_ips] == [
        "10.0.0.0/24", "::ffff:10.1.2.0/120", "fd00::/64", "-192.168.1.0/24", "0.0.0.0/0"]
    assert peer.peers[0].allowed_ips[3].remove


@pytest.mark.parametrize(("value", "expected"), [
    ("192.0.2.1:51820", ("192.0.2.1", 51820)),
    ("[2001:DB8::1]:0", ("2001:db8::1", 0)),
    ("[::FFFF:192.0.2.1]:5", ("::ffff:192.0.2.1", 5)),
    ("[fe80::1%eth0]:51820", ("fe80::1%eth0", 51820)),
    ("[::]:65535", ("::", 65535)),
])
def test_endpoints(value: str, expected: tuple[str, int]) -> None:
    assert parse_set([PK_LINE, f"endpoint={value}"]).peers[0].endpoint == expected


def test_sections_for_the_same_key_stay_separate_and_ordered() -> None:
    request = parse_set([PK_LINE, "persistent_keepalive_interval=5", PK_LINE, "update_only=true",
                         "protocol_version=1"])
    assert request.peers == (PeerChanges(PEER_A, persistent_keepalive=5), PeerChanges(PEER_A, update_only=True))


# --- set: every error and its errno -------------------------------------------------------

KEY_ERRORS = ["abc", "g" * 64, "a" * 63, "a" * 66, "", " " + "a" * 63, "0x" + "a" * 62]
INVALID = [
    *([f"private_key={bad}"] for bad in KEY_ERRORS),
    *([f"public_key={bad}"] for bad in KEY_ERRORS),
    *([PK_LINE, f"preshared_key={bad}"] for bad in KEY_ERRORS),
    *([f"listen_port={bad}"] for bad in ["65536", "-1", "+1", " 1", "1 ", "0x10", "1_0", "", "١", "1e3",
                                         "9" * 30]),
    *([f"fwmark={bad}"] for bad in ["4294967296", "-0", "x"]),
    *([f"replace_peers={bad}"] for bad in ["True", "1", "false", "", "true "]),
    ["foo=bar"], ["=1"], ["Private_key=" + ZERO_HEX],
    ["protocol_version=1"], ["endpoint=192.0.2.1:5"], ["allowed_ip=10.0.0.0/8"],  # peer keys, no peer yet
    [PK_LINE, "listen_port=1"], [PK_LINE, f"private_key={ZERO_HEX}"], [PK_LINE, "replace_peers=true"],
    *([PK_LINE, f"{key}={bad}"] for key in ("remove", "update_only", "replace_allowed_ips")
      for bad in ["True", "yes", "1", ""]),
    *([PK_LINE, f"endpoint={bad}"] for bad in [
        "localhost:51820", "192.0.2.1", "192.0.2.1:", ":5", "[192.0.2.1]:5", "::1:5", "[::1:5", "[]:5",
        "192.0.2.1:65536", "01.2.3.4:5", "192.0.2.1%eth0:5", "192.0.2.1:-1", "[fe80::1%]:5", "1.2.3:5",
        "192.0.2.1:5 ", ""]),
    *([PK_LINE, f"persistent_keepalive_interval={bad}"] for bad in ["65536", "-1", "", "25s"]),
    *([PK_LINE, f"allowed_ip={bad}"] for bad in [
        "10.0.0.0", "10.0.0.0/33", "::/129", "fe80::1%eth0/64", "10.0.0.0/+8", "10.0.0.0/08", "10.0.0.0/-0",
        "host/8", "--10.0.0.0/8", "10.0.0.0/8/8", "/8", "10.0.0.0/", "", "-"]),
    *([PK_LINE, f"protocol_version={bad}"] for bad in ["2", "0", "", "01", "1 "]),
    [PK_LINE, "bogus=1"], [PK_LINE, "last_handshake_time_sec=0"], [PK_LINE, "tx_bytes=0"],
]


@pytest.mark.parametrize("lines", INVALID, ids=lambda lines: repr(lines[-1])[:60])
def test_invalid_argument(lines: list[str]) -> None:
    assert request_errno(lines) == IPC_ERROR_INVALID


def test_a_line_without_equals_is_a_protocol_error() -> None:
    assert request_errno(["listen_port"]) == IPC_ERROR_PROTOCOL
    assert request_errno([PK_LINE, ""]) == IPC_ERROR_PROTOCOL


def test_the_first_bad_line_decides_the_errno() -> None:
    # wireguard-go stops at the first bad line; so does the validation.
    assert request_errno(["listen_port=x", "nokey"]) == IPC_ERROR_INVALID
    assert request_errno(["nokey", "listen_port=x"]) == IPC_ERROR_PROTOCOL


def test_error_messages_say_what_to_fix_without_echoing_secrets() -> None:
    secret = "ab" * 31 + "zz"
    for lines in ([f"private_key={secret}"], [PK_LINE, f"preshared_key={secret}"]):
        with pytest.raises(UapiError) as info:
            parse_set(lines)
        assert secret not in str(info.value) and secret not in repr(info.value)
        assert lines[-1].split("=")[0] in str(info.value)
    for pasted in ([PRIVATE.hex()], [f"private_key={PRIVATE.hex()}", PSK.hex()]):  # a key without "key="
        with pytest.raises(UapiError) as info:
            parse_set(pasted)
        assert pasted[-1] not in str(info.value)
    with pytest.raises(UapiError) as info:
        list(RequestReader().feed(f"set=1\n{PSK.hex()}\n\n".encode()))
    assert PSK.hex() not in str(info.value) and info.value.errno == IPC_ERROR_PROTOCOL
    with pytest.raises(UapiError, match="device key 'listen_port' after a peer"):
        parse_set([PK_LINE, "listen_port=1"])
    with pytest.raises(UapiError, match="IPv6 address must be in square brackets"):
        parse_set([PK_LINE, "endpoint=::1:5"])


# --- get ---------------------------------------------------------------------------------

FULL_STATE = DeviceSnapshot(
    private_key=PRIVATE, listen_port=51820, fwmark=4660,
    peers=[
        PeerSnapshot(PEER_A, preshared_key=PSK, endpoint=("192.0.2.1", 51820),
                     last_handshake_ns=1_700_000_000_123_456_789, tx_bytes=1024, rx_bytes=2048,
                     persistent_keepalive=25, allowed_ips=["10.0.0.0/24", "fd00::/64"]),
        PeerSnapshot(PEER_B, endpoint=("2001:db8::1", 443)),
    ],
)
# What wireguard-go's IpcGetOperation writes for FULL_STATE, followed by IpcHandle's status.
FULL_TEXT = (
    f"private_key={PRIVATE.hex()}\n"
    "listen_port=51820\n"
    "fwmark=4660\n"
    f"public_key={PEER_A.hex()}\n"
    f"preshared_key={'5a' * 32}\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.1:51820\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=123456789\n"
    "tx_bytes=1024\n"
    "rx_bytes=2048\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=10.0.0.0/24\n"
    "allowed_ip=fd00::/64\n"
    f"public_key={PEER_B.hex()}\n"
    f"preshared_key={ZERO_HEX}\n"
    "protocol_version=1\n"
    "endpoint=[2001:db8::1]:443\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n"
    "\n"
)


def test_format_get_matches_wireguard_go_line_for_line() -> None:
    assert format_get(FULL_STATE) == FULL_TEXT


def test_a_fresh_device_says_only_errno() -> None:
    # No key, port 0, fwmark 0: wireguard-go writes none of the three.
    assert format_get(DeviceSnapshot()) == "errno=0\n\n"
    assert format_get(DeviceSnapshot(listen_port=7)) == "listen_port=7\nerrno=0\n\n"


def test_parse_get_reads_format_get_back() -> None:
    assert parse_get(FULL_TEXT) == FULL_STATE
    assert parse_get(FULL_TEXT.removesuffix("errno=0\n\n")) == FULL_STATE
    assert parse_get("errno=0\n\n") == DeviceSnapshot()


def test_parse_get_errors() -> None:
    with pytest.raises(UapiError) as info:
        parse_get("errno=-5\n\n")
    assert info.value.errno == IPC_ERROR_IO
    for bad in ["listen_port=1", "bogus=1\n", "listen_port=1\nlisten_port=2\n", "listen_port=x\n",
                f"public_key={PEER_A.hex()}\nlast_handshake_time_nsec=1000000000\n", "tx_bytes=1\n",
                f"public_key={PEER_A.hex()}\nprotocol_version=2\n", "listen_port\n", "\n\n",
                "errno=x\n\n", f"public_key={PEER_A.hex()}\nendpoint=host:1\n"]:
        with pytest.raises(UapiError) as info:
            parse_get(bad)
        assert info.value.errno == IPC_ERROR_PROTOCOL, bad


def test_format_get_refuses_impossible_state() -> None:
    for snapshot in (DeviceSnapshot(private_key=b"short"), DeviceSnapshot(listen_port=70000),
                     DeviceSnapshot(peers=[PeerSnapshot(PEER_A, tx_bytes=-1)]),
                     DeviceSnapshot(peers=[PeerSnapshot(PEER_A, preshared_key=b"x")])):
        with pytest.raises(ValueError):
            format_get(snapshot)


# --- secrets stay out of reprs --------------------------------------------------------------


def test_no_secret_in_any_repr() -> None:
    secrets = [PRIVATE.hex(), PSK.hex(), base64.b64encode(PRIVATE).decode(), base64.b64encode(PSK).decode(),
               repr(PRIVATE), repr(PSK)]
    request = parse_set([f"private_key={PRIVATE.hex()}", PK_LINE, f"preshared_key={PSK.hex()}"])
    reader_request = next(RequestReader().feed(format_set(request).encode()))
    for text in (repr(request), str(request), repr(request.device), repr(request.peers),
                 repr(FULL_STATE), str(FULL_STATE), repr(FULL_STATE.peers[0]), repr(reader_request),
                 str(reader_request), repr([reader_request])):
        for secret in secrets:
            assert secret not in text
    assert "<redacted>" in repr(request.device) and "<redacted>" in repr(FULL_STATE)


# --- the stream reader ------------------------------------------------------------------------


def read_all(data: bytes, reader: RequestReader | None = None) -> list[Request]:
    return list((reader or RequestReader()).feed(data))


def test_reader_get_and_set_compare_as_plain_tuples() -> None:
    assert read_all(b"get=1\n\n") == [("get", [])]
    assert read_all(b"set=1\nlisten_port=1\nfwmark=2\n\n") == [("set", [("listen_port", "1"), ("fwmark", "2")])]
    assert read_all(b"set=1\nx=a=b\n\n") == [("set", [("x", "a=b")])]  # split at the first '='


def test_reader_pipelined_requests_and_partial_input() -> None:
    reader = RequestReader()
    assert read_all(b"get=1\n\nset=1\nfwmark=1\n\nge", reader) == [("get", []), ("set", [("fwmark", "1")])]
    assert read_all(b"t=1\n", reader) == []
    assert read_all(b"\n", reader) == [("get", [])]


def test_reader_drops_a_trailing_cr_from_set_lines_only() -> None:
    # bufio.ScanLines drops "\r"; the operation line is compared whole, so set=1\r\n is garbage.
    assert read_all(b"set=1\nfwmark=7\r\n\r\n") == [("set", [("fwmark", "7")])]
    with pytest.raises(UapiError) as info:
        read_all(b"set=1\r\n")
    assert info.value.errno == IPC_ERROR_PROTOCOL and info.value.fatal


@pytest.mark.parametrize("garbage", [b"hello\n", b"GET", b"get=2\n", b"\n", b"get=1", b"set=1 ", b"get=1\r"])
def test_reader_garbage_operation_is_fatal_at_once(garbage: bytes) -> None:
    reader = RequestReader()
    data = garbage if garbage not in (b"get=1",) else garbage + b"x"
    with pytest.raises(UapiError) as info:
        read_all(data, reader)
    assert (info.value.errno, info.value.fatal) == (IPC_ERROR_PROTOCOL, True)
    with pytest.raises(UapiError) as again:  # the stream stays dead
        read_all(b"get=1\n\n", reader)
    assert again.value.fatal


def test_reader_waits_on_a_prefix_of_an_operation() -> None:
    assert read_all(b"se") == []


def test_reader_trailing_byte_after_get_is_invalid_but_not_fatal() -> None:
    reader = RequestReader()
    with pytest.raises(UapiError) as info:
        read_all(b"get=1\nXget=1\n\n", reader)
    assert (info.value.errno, info.value.fatal) == (IPC_ERROR_INVALID, False)
    assert read_all(b"", reader) == [("get", [])]  # the bad byte was consumed, as wireguard-go does


def test_reader_line_without_equals_consumes_the_request() -> None:
    reader = RequestReader()
    with pytest.raises(UapiError) as info:
        read_all(b"set=1\nfwmark=1\nnokey\nlisten_port=1\n\nget=1\n\n", reader)
    assert (info.value.errno, info.value.fatal) == (IPC_ERROR_PROTOCOL, False)
    assert read_all(b"", reader) == [("get", [])]
    with pytest.raises(UapiError) as first:  # an earlier invalid line is what wireguard-go reports
        read_all(b"set=1\nfwmark=x\nnokey\n\n")
    assert first.value.errno == IPC_ERROR_INVALID


def test_reader_line_length_limit_is_wireguard_gos_scanner_limit() -> None:
    longest = b"k=" + b"v" * (MAX_LINE_BYTES - 2)
    assert read_all(b"set=1\n" + longest + b"\n\n") == [("set", [("k", "v" * (MAX_LINE_BYTES - 2))])]
    reader = RequestReader()
    with pytest.raises(UapiError) as info:  # noticed before the newline arrives
        read_all(b"set=1\n" + longest + b"v", reader)
    assert (info.value.errno, info.value.fatal) == (IPC_ERROR_IO, True)


def test_reader_request_limits() -> None:
    with pytest.raises(UapiError) as info:
        read_all(b"set=1\n" + b"a=b\n" * 11 + b"\n", RequestReader(max_request_lines=10))
    assert (info.value.errno, info.value.fatal) == (IPC_ERROR_IO, True)
    with pytest.raises(UapiError) as info:
        read_all(b"set=1\n" + b"a=bbbbbbb\n" * 11 + b"\n", RequestReader(max_request_bytes=100))
    assert (info.value.errno, info.value.fatal) == (IPC_ERROR_IO, True)
    assert len(read_all(b"set=1\n" + b"a=b\n" * 10 + b"\n", RequestReader(max_request_lines=10))[0].pairs) == 10


def test_reader_end_of_stream() -> None:
    # wireguard-go's scanner applies an unterminated set at EOF, last partial line included.
    for data, expected in [
        (b"set=1\nfwmark=1", [("set", [("fwmark", "1")])]),
        (b"set=1\nfwmark=1\n", [("set", [("fwmark", "1")])]),
        (b"set=1\nfwmark=1\r", [("set", [("fwmark", "1")])]),
        (b"set=1\n", [("set", [])]),
        (b"get=1\n", []),
        (b"ge", []),
        (b"", []),
        (b"get=1\n\nset=1\na=b", [("get", []), ("set", [("a", "b")])]),
    ]:
        reader = RequestReader()
        reader.feed(data)  # not iterated: feed_eof drains what is buffered
        assert list(reader.feed_eof()) == expected, data
        with pytest.raises(RuntimeError):
            reader.feed(b"get=1\n\n")


def test_reader_keeps_undecodable_bytes_and_parse_set_rejects_them() -> None:
    [request] = read_all(b"set=1\nlisten_port=\xff\n\n")
    with pytest.raises(UapiError) as info:
        parse_set(request.pairs)
    assert info.value.errno == IPC_ERROR_INVALID


# --- properties and fuzzing -------------------------------------------------------------------

keys32 = st.binary(min_size=32, max_size=32)
nonzero_keys = keys32.filter(lambda k: any(k))
clamped_keys = nonzero_keys.map(lambda k: bytes([k[0] & 248]) + k[1:31] + bytes([(k[31] & 127) | 64]))
addresses = st.ip_addresses()
endpoints = st.tuples(addresses.map(format_ip), st.integers(0, 65535))


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address = draw(addresses)
    return ipaddress.ip_network((address, draw(st.integers(0, address.max_prefixlen))), strict=False)


@st.composite
def peer_changes(draw: st.DrawFn) -> PeerChanges:
    public_key = draw(keys32)
    if draw(st.booleans()):
        return PeerChanges(public_key, remove=True)
    return PeerChanges(
        public_key,
        update_only=draw(st.booleans()),
        preshared_key=draw(st.sampled_from([UNCHANGED, None]) | nonzero_keys),
        endpoint=draw(st.none() | endpoints),
        persistent_keepalive=draw(st.none() | st.integers(0, 65535)),
        replace_allowed_ips=draw(st.booleans()),
        allowed_ips=tuple(draw(st.lists(st.builds(AllowedIPChange, networks(), st.booleans()), max_size=4))),
    )


set_requests = st.builds(
    SetRequest,
    st.builds(DeviceChanges, st.sampled_from([UNCHANGED, None]) | clamped_keys,
              st.none() | st.integers(0, 65535), st.none() | st.integers(0, 2**32 - 1), st.booleans()),
    st.lists(peer_changes(), max_size=4).map(tuple),
)

snapshots = st.builds(
    DeviceSnapshot,
    st.none() | nonzero_keys,
    st.integers(0, 65535),
    st.integers(0, 2**32 - 1),
    st.lists(st.builds(
        PeerSnapshot, keys32, st.none() | nonzero_keys, st.none() | endpoints,
        st.none() | st.integers(1, 2**63 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
        st.integers(0, 65535), st.lists(networks().map(format_prefix), max_size=4)), max_size=4),
)


@SETTINGS
@given(set_requests, st.data())
def test_set_round_trip_through_the_reader_in_any_chunks(request: SetRequest, data: st.DataObject) -> None:
    wire = format_set(request).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    reader = RequestReader()
    got = [r for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) for r in reader.feed(wire[a:b])]
    assert len(got) == 1 and got[0].op == "set"
    assert parse_set(got[0].pairs) == request


@SETTINGS
@given(snapshots)
def test_get_round_trip(snapshot: DeviceSnapshot) -> None:
    text = format_get(snapshot)
    assert parse_get(text) == snapshot
    assert format_get(parse_get(text)) == text


@SETTINGS
@given(addresses, st.integers(0, 128))
def test_prefix_text_is_canonical(address: ipaddress.IPv4Address | ipaddress.IPv6Address, bits: int) -> None:
    bits = min(bits, address.max_prefixlen)
    text = format_prefix(ipaddress.ip_network((address, bits), strict=False))
    [change] = parse_set([PK_LINE, f"allowed_ip={format_ip(address)}/{bits}"]).peers[0].allowed_ips
    assert str(change) == text


FRAGMENTS = [b"get=1\n", b"set=1\n", b"\n", b"\r\n", b"=", b"public_key=", PEER_A.hex().encode(), b"true",
             b"listen_port=", b"allowed_ip=", b"10.0.0.0/8", b"endpoint=[::1]:5", b"remove=true", b"\xff"]
streams = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=12), max_size=30)


@SETTINGS
@given(streams, st.booleans())
def test_fuzz_reader_raises_only_uapi_errors(chunks: list[bytes], eof: bool) -> None:
    reader = RequestReader(max_line_bytes=64, max_request_bytes=512, max_request_lines=16)
    requests: list[Request] = []
    for chunk in [*chunks, None] if eof else chunks:
        while True:
            try:
                requests.extend(reader.feed_eof() if chunk is None else reader.feed(chunk))
                break
            except UapiError as exc:
                assert exc.errno in (IPC_ERROR_IO, IPC_ERROR_PROTOCOL, IPC_ERROR_INVALID)
                if exc.fatal:
                    return
                chunk = chunk if chunk is None else b""  # not fatal: reply, carry on with the buffer
    for request in requests:
        assert request.op in ("get", "set")
        try:
            parse_set(request.pairs)
        except UapiError as exc:
            assert exc.errno in (IPC_ERROR_PROTOCOL, IPC_ERROR_INVALID)


@SETTINGS
@given(st.binary(max_size=200))
def test_fuzz_reader_on_arbitrary_bytes_after_set(data: bytes) -> None:
    try:
        list(RequestReader().feed(b"set=1\n" + data))
    except UapiError:
        pass


@SETTINGS
@given(st.binary(max_size=400), st.data())
def test_fuzz_reader_chunking_does_not_matter(data: bytes, draw: st.DataObject) -> None:
    def run(chunks: list[bytes]) -> list[object]:
        reader = RequestReader(max_line_bytes=32)
        events: list[object] = []
        for chunk in [*chunks, None]:
            while True:
                try:
                    events.extend(reader.feed_eof() if chunk is None else reader.feed(chunk))
                    break
                except UapiError as exc:
                    events.append((exc.errno, exc.fatal))
                    if exc.fatal:
                        return events
                    chunk = chunk if chunk is None else b""
        return events

    stream = b"set=1\n" + data if draw.draw(st.booleans()) else data
    cut = draw.draw(st.integers(0, len(stream)))
    assert run([stream]) == run([stream[:cut], stream[cut:]]) == run([bytes([b]) for b in stream])


lines = st.one_of(
    st.text(max_size=40),
    st.tuples(st.sampled_from(["public_key", "private_key", "preshared_key", "listen_port", "fwmark", "endpoint",
                               "allowed_ip", "remove", "update_only", "replace_peers", "replace_allowed_ips",
                               "persistent_keepalive_interval", "protocol_version", "x"]),
              st.sampled_from([PEER_A.hex(), ZERO_HEX, "true", "1", "65535", "10.0.0.0/8", "-::/0",
                               "[fe80::1%x]:1", "1.2.3.4:5", ""]) | st.text(max_size=70))
    .map("=".join),
)


@SETTINGS
@given(st.lists(lines, max_size=12))
def test_fuzz_parse_set_raises_only_uapi_errors(body: list[str]) -> None:
    try:
        request = parse_set(body)
    except UapiError as exc:
        assert exc.errno in (IPC_ERROR_PROTOCOL, IPC_ERROR_INVALID) and not exc.fatal
        return
    assert parse_set(format_set(request).split("\n")[1:-2]) == request


@SETTINGS
@given(st.text(max_size=300) | st.lists(lines, max_size=12).map(lambda ls: "\n".join(ls) + "\n"))
def test_fuzz_parse_get_raises_only_uapi_errors(text: str) -> None:
    try:
        parse_get(text)
    except UapiError:
        pass
