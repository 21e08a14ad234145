"""pywg.manage.types: the spec's types and their JSON (issue 5, "Types and JSON").

Round trips, exact field names, secrets left out unless asked for, strict parsing whose
every error names the field at fault, hypothesis round trips over generated objects, and
hand-written fixtures (tests/fixtures/manage, written to Go's encoding rules) that pywg
must read and write back byte for byte.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.manage.key import Key
from pywg.manage.types import (
    ConnectionStatus,
    Endpoint,
    InterfaceConfig,
    InterfaceStats,
    InvalidConfig,
    MeshConnection,
    MeshNode,
    MeshTopology,
    PeerStats,
    WireGuardInterface,
    WireGuardPeer,
    format_time,
    parse_time,
    validate_interface_name,
)

FIXTURES = Path(__file__).parent / "fixtures" / "manage"

# Test keys (from `wg genkey | wg pubkey`, `wg genpsk`); the fixtures use the same.
PRIV_A = "WNlBoF6fSKnfLq+bl2USdsnCToz37hf2QhB1bXl9Rn0="
PUB_A = "AP00p24HdIcomKo2gjRPLV48dQDLpW4h+7FsKr9B7RA="
PRIV_B = "mKECwrjAvHUef28nLkvuHyhejT+9wzyazCmCfcFsAXY="
PUB_B = "LBBVDMY0Z8PcT6aGQz9dqcXIG27JZNhmsLUCnYMXdxs="
PUB_C = "igV051a1HGiu2ox574FNcXlbucgloXhYtkEEX3IhpU4="
PUB_D = "gQW+n+PiX5/gVndkS6psP74J/drV1aAMQiKKX9rUpSY="
PSK_1 = "M9k4KTTR7TEiBmqV1XVvxMUGNibOG3q+4URJplilU5k="
PSK_2 = "hSFTpsHUCnIIdAFnuRbwhMMEjqLEWqg/WIaoYBgaf8Q="
ZERO = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="

net = ipaddress.ip_network
iface_addr = ipaddress.ip_interface


def t(text: str) -> datetime:
    value = parse_time(text)
    assert value is not None
    return value


def sample_peers() -> list[WireGuardPeer]:
    return [
        WireGuardPeer(
            public_key=Key.parse(PUB_B),
            preshared_key=Key.parse(PSK_1),
            endpoint=Endpoint.parse("203.0.113.7:51820"),
            allowed_ips=[net("10.100.0.2/32"), net("192.168.50.0/24")],
            persistent_keepalive=25,
            last_handshake=datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC),
        ),
        WireGuardPeer(
            public_key=Key.parse(PUB_C),
            endpoint=Endpoint(host=ipaddress.ip_address("2001:db8::7"), port=51821),
            allowed_ips=(net("10.100.0.3/32"), net("fd00:100::3/128")),
            last_handshake=datetime(2026, 11, 25, 9, 59, 58, 500000, tzinfo=UTC),
        ),
        WireGuardPeer(
            public_key=Key.parse(PUB_D),
            preshared_key=Key.parse(PSK_2),
            allowed_ips=[net("10.100.0.4/32")],
        ),
    ]


def sample_interface() -> WireGuardInterface:
    """The interface of wireguard_interface*.json, built in Python."""
    return WireGuardInterface(
        name="wg0",
        private_key=Key.parse(PRIV_A),
        listen_port=51820,
        fw_mark=4660,
        peers=sample_peers(),
        address=iface_addr("10.100.0.1/16"),
        mtu=1420,
    )


def sample_config() -> InterfaceConfig:
    return InterfaceConfig(
        name="wg1",
        private_key=Key.parse(PRIV_B),
        listen_port=51821,
        peers=[
            WireGuardPeer(
                public_key=Key.parse(PUB_A),
                preshared_key=Key.parse(PSK_1),
                endpoint=Endpoint.parse("198.51.100.1:51820"),
                allowed_ips=[net("10.100.0.0/16")],
                persistent_keepalive=25,
            )
        ],
        address=iface_addr("10.100.0.2/16"),
        mtu=1380,
    )


def sample_stats() -> InterfaceStats:
    return InterfaceStats(
        name="wg0",
        public_key=Key.parse(PUB_A),
        listen_port=51820,
        collected_at=datetime(2026, 11, 25, 10, 0, 5, 1, tzinfo=UTC),
        peers=[
            PeerStats(
                public_key=Key.parse(PUB_B),
                endpoint=Endpoint.parse("203.0.113.7:51820"),
                last_handshake=datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC),
                rx_bytes=2**64 - 1,
                tx_bytes=9812,
                handshakes=3,
                latency_us=1840,
            ),
            PeerStats(public_key=Key.parse(PUB_D), tx_bytes=148),
        ],
    )


def sample_topology() -> MeshTopology:
    return MeshTopology(
        nodes=[
            MeshNode(
                id="coordinator-1",
                public_key=Key.parse(PUB_A),
                endpoint=Endpoint.parse("203.0.113.1:51820"),
                internal_ip=ipaddress.ip_address("10.100.0.1"),
                region="eu-central",
            ),
            MeshNode(
                id="agent-b",
                public_key=Key.parse(PUB_B),
                endpoint=Endpoint.parse("[2001:db8::b]:41641"),
                internal_ip=ipaddress.ip_address("fd00:100::b"),
                region="são-paulo",
            ),
            MeshNode(
                id="agent-c",
                public_key=Key.parse(PUB_C),
                internal_ip=ipaddress.ip_address("10.100.0.3"),
                region="us-east & backup",
            ),
        ],
        connections=[
            MeshConnection(
                from_node="agent-b",
                to_node="coordinator-1",
                status=ConnectionStatus.CONNECTED,
                latency_us=182000,
            ),
            MeshConnection(
                from_node="agent-c",
                to_node="coordinator-1",
                status=ConnectionStatus.CONNECTED,
                via_relay=True,
                latency_us=95250,
            ),
            MeshConnection(from_node="agent-c", to_node="agent-b", status=ConnectionStatus.CONNECTING),
        ],
        coordinator="coordinator-1",
    )


def strip_secrets(obj: Any) -> Any:
    """What the JSON without secrets can give back."""
    if isinstance(obj, WireGuardPeer):
        return dataclasses.replace(obj, preshared_key=None)
    if isinstance(obj, WireGuardInterface):
        return dataclasses.replace(
            obj, private_key=None, public_key=obj.public_key, peers=[strip_secrets(p) for p in obj.peers]
        )
    if isinstance(obj, InterfaceConfig):
        return dataclasses.replace(obj, private_key=None, peers=[strip_secrets(p) for p in obj.peers])
    return obj


# --- fixtures written by hand to Go's encoding -----------------------------------------------

FIXTURE_FILES = {
    # file: (type, written with secrets, indent (None: json.Marshal))
    "wireguard_interface.json": (WireGuardInterface, False, 2),
    "wireguard_interface_secrets.json": (WireGuardInterface, True, 2),
    "wireguard_interface_compact.json": (WireGuardInterface, False, None),
    "wireguard_interface_unconfigured_compact.json": (WireGuardInterface, False, None),
    "interface_config.json": (InterfaceConfig, True, 2),
    "interface_stats.json": (InterfaceStats, False, 2),
    "mesh_topology.json": (MeshTopology, False, 2),
}


def test_every_fixture_is_listed() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(FIXTURE_FILES)
    assert (FIXTURES / "README.md").is_file()


@pytest.mark.parametrize("name", sorted(FIXTURE_FILES))
def test_fixture_parses_and_reemits_byte_identical(name: str) -> None:
    cls, secrets, indent = FIXTURE_FILES[name]
    raw = (FIXTURES / name).read_bytes()
    obj = cls.from_json(raw)
    assert (obj.to_json(include_secrets=secrets, indent=indent) + "\n").encode() == raw
    # and from a str, and through to_dict/json.loads
    assert cls.from_json(raw.decode()) == obj
    assert obj.to_dict(include_secrets=secrets) == json.loads(raw)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wireguard_interface_secrets.json", sample_interface()),
        ("wireguard_interface.json", strip_secrets(sample_interface())),
        ("interface_config.json", sample_config()),
        ("interface_stats.json", sample_stats()),
        ("mesh_topology.json", sample_topology()),
    ],
)
def test_fixture_means_what_python_builds(name: str, expected: Any) -> None:
    cls = FIXTURE_FILES[name][0]
    assert cls.from_json((FIXTURES / name).read_text()) == expected


def test_compact_fixture_values() -> None:
    iface = WireGuardInterface.from_json((FIXTURES / "wireguard_interface_compact.json").read_text())
    assert iface.private_key is None
    assert iface.address == iface_addr("fd00:100::7/64")
    (peer,) = iface.peers
    assert str(peer.endpoint) == "[fe80::1%eth0]:51820"
    assert peer.last_handshake == datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)
    assert peer.allowed_ips == (net("fd00:100::/64"), net("0.0.0.0/0"))
    bare = WireGuardInterface.from_json(
        (FIXTURES / "wireguard_interface_unconfigured_compact.json").read_text()
    )
    assert bare == WireGuardInterface(name="wg-new")
    assert bare.public_key is None and bare.address is None


def test_secret_fixture_public_key_matches_private() -> None:
    iface = WireGuardInterface.from_json((FIXTURES / "wireguard_interface_secrets.json").read_text())
    assert iface.private_key is not None
    assert iface.public_key == iface.private_key.public_key() == Key.parse(PUB_A)


# --- exact field names -----------------------------------------------------------------------


def test_interface_field_names() -> None:
    iface = sample_interface()
    assert list(iface.to_dict()) == ["name", "publicKey", "listenPort", "fwMark", "peers", "address", "mtu"]
    assert list(iface.to_dict(include_secrets=True)) == list(WireGuardInterface.JSON_FIELDS)
    assert "fwMark" not in dataclasses.replace(iface, fw_mark=0).to_dict()


def test_peer_field_names() -> None:
    full, bare_endpoint, no_endpoint = sample_peers()
    assert list(full.to_dict(include_secrets=True)) == list(WireGuardPeer.JSON_FIELDS)
    assert list(full.to_dict(include_secrets=True)) == [
        "publicKey",
        "presharedKey",
        "endpoint",
        "allowedIps",
        "persistentKeepalive",
        "lastHandshake",
    ]
    assert list(full.to_dict()) == [
        "publicKey",
        "endpoint",
        "allowedIps",
        "persistentKeepalive",
        "lastHandshake",
    ]
    # presharedKey omitted when unset even with secrets; endpoint omitted when unknown
    assert "presharedKey" not in bare_endpoint.to_dict(include_secrets=True)
    assert list(no_endpoint.to_dict()) == ["publicKey", "allowedIps", "persistentKeepalive", "lastHandshake"]
    assert no_endpoint.to_dict()["lastHandshake"] is None


def test_other_field_names() -> None:
    assert list(sample_config().to_dict(include_secrets=True)) == [
        "name",
        "privateKey",
        "listenPort",
        "peers",
        "address",
        "mtu",
    ]
    topo = sample_topology().to_dict()
    assert list(topo) == ["nodes", "connections", "coordinator"]
    assert list(topo["nodes"][0]) == ["id", "publicKey", "endpoint", "internalIp", "region"]
    assert list(topo["connections"][1]) == ["from", "to", "status", "viaRelay", "latencyUs"]
    assert list(topo["connections"][2]) == ["from", "to", "status", "viaRelay"]
    stats = sample_stats().to_dict()
    assert list(stats) == ["name", "publicKey", "listenPort", "collectedAt", "peers"]
    assert list(stats["peers"][0]) == list(PeerStats.JSON_FIELDS)
    assert list(stats["peers"][1]) == ["publicKey", "lastHandshake", "rxBytes", "txBytes"]
    for cls in (MeshTopology, MeshNode, MeshConnection, InterfaceStats, InterfaceConfig):
        assert all(f[0].islower() and "_" not in f for f in cls.JSON_FIELDS)


# --- secrets ---------------------------------------------------------------------------------

SECRETS = (PRIV_A, PRIV_B, PSK_1, PSK_2)


@pytest.mark.parametrize("obj", [sample_interface(), sample_config(), *sample_peers()], ids=repr)
def test_secrets_left_out_by_default(obj: Any) -> None:
    for text in (obj.to_json(), obj.to_json(indent=None), json.dumps(obj.to_dict())):
        assert not any(s in text for s in SECRETS)
        assert "privateKey" not in text and "presharedKey" not in text


def test_secrets_present_when_asked() -> None:
    text = sample_interface().to_json(include_secrets=True)
    assert f'"privateKey": "{PRIV_A}"' in text
    assert f'"presharedKey": "{PSK_1}"' in text and f'"presharedKey": "{PSK_2}"' in text
    assert f'"privateKey":"{PRIV_B}"' in sample_config().to_json(include_secrets=True, indent=None)


@pytest.mark.parametrize(
    "obj", [sample_interface(), sample_config(), sample_stats(), sample_topology(), *sample_peers()], ids=type
)
def test_repr_never_shows_private_material(obj: Any) -> None:
    for text in (repr(obj), str(obj), repr([obj]), repr({"x": obj})):
        for secret in SECRETS:
            assert secret not in text
            assert Key.parse(secret).hex() not in text
            assert repr(bytes(Key.parse(secret))) not in text
    if isinstance(obj, WireGuardInterface | InterfaceConfig):
        assert "private_key=<hidden>" in repr(obj)


def test_repr_shows_public_keys() -> None:
    assert PUB_A in repr(sample_interface()) and PUB_B in repr(sample_interface())
    assert repr(Endpoint.parse("[2001:db8::1]:51820")) == "Endpoint('[2001:db8::1]:51820')"


def test_key_errors_do_not_echo_the_key() -> None:
    almost = PRIV_A[:-2] + "="  # 43 characters of a private key
    with pytest.raises(InvalidConfig) as err:
        WireGuardInterface.from_json(json.dumps({"name": "wg0", "privateKey": almost}))
    assert err.value.field == "privateKey"
    assert PRIV_A[:20] not in str(err.value)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [sample_interface(), sample_config(), sample_stats(), sample_topology(), *sample_peers()],
    ids=type,
)
@pytest.mark.parametrize("indent", [2, None, 4])
def test_round_trip(obj: Any, indent: int | None) -> None:
    cls = type(obj)
    text = obj.to_json(include_secrets=True, indent=indent)
    back = cls.from_json(text)
    assert back == obj
    assert back.to_json(include_secrets=True, indent=indent) == text
    assert cls.from_dict(obj.to_dict(include_secrets=True)) == obj
    assert cls.from_json(obj.to_json()) == strip_secrets(obj)


def test_hashable_and_frozen() -> None:
    iface = sample_interface()
    assert hash(iface) == hash(WireGuardInterface.from_json(iface.to_json(include_secrets=True)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        iface.mtu = 1280  # type: ignore[misc]
    assert isinstance(iface.peers, tuple) and isinstance(iface.peers[0].allowed_ips, tuple)


# --- encodings -------------------------------------------------------------------------------


def test_address_keeps_host_bits_allowed_ips_are_masked() -> None:
    doc = {
        "name": "wg0",
        "address": "10.0.0.1/24",
        "peers": [{"publicKey": PUB_B, "allowedIps": ["10.0.1.77/24", "fd00::1:2/64", "192.0.2.1/32"]}],
    }
    iface = WireGuardInterface.from_dict(doc)
    assert str(iface.address) == "10.0.0.1/24"
    assert iface.to_dict()["address"] == "10.0.0.1/24"
    assert iface.to_dict()["peers"][0]["allowedIps"] == ["10.0.1.0/24", "fd00::/64", "192.0.2.1/32"]
    v6 = WireGuardInterface.from_dict({"name": "wg0", "address": "fd00::1/64"})
    assert v6.to_dict()["address"] == "fd00::1/64"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("192.0.2.1:51820", "192.0.2.1:51820"),
        ("[2001:db8::1]:1", "[2001:db8::1]:1"),
        ("[2001:DB8:0:0::1]:65535", "[2001:db8::1]:65535"),
        ("[fe80::1%eth0]:51820", "[fe80::1%eth0]:51820"),
        ("[::ffff:192.0.2.1]:51820", "192.0.2.1:51820"),  # as Go prints a v4-in-v6 UDPAddr
    ],
)
def test_endpoint_forms(text: str, canonical: str) -> None:
    ep = Endpoint.parse(text)
    assert str(ep) == canonical
    assert Endpoint.parse(str(ep)) == ep


@pytest.mark.parametrize(
    "text",
    [
        "192.0.2.1",
        "192.0.2.1:",
        "192.0.2.1:0",
        "192.0.2.1:65536",
        "192.0.2.1:051820",
        "192.0.2.1:+80",
        "192.0.2.1:http",
        "2001:db8::1:51820",
        "[192.0.2.1]:51820",
        "[2001:db8::1]51820",
        "vpn.example.com:51820",
        ":51820",
        "",
        "[]:1",
    ],
)
def test_endpoint_rejects(text: str) -> None:
    with pytest.raises(InvalidConfig):
        Endpoint.parse(text)
    with pytest.raises(InvalidConfig) as err:
        WireGuardPeer.from_dict({"publicKey": PUB_B, "endpoint": text})
    assert err.value.field == "endpoint"


def test_endpoint_constructor_checks() -> None:
    with pytest.raises(InvalidConfig):
        Endpoint(host=ipaddress.ip_address("192.0.2.1"), port=0)
    with pytest.raises(InvalidConfig):
        Endpoint(host="192.0.2.1", port=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfig):
        Endpoint(host=ipaddress.ip_address("192.0.2.1"), port=True)


@pytest.mark.parametrize(
    ("text", "expected", "reemitted"),
    [
        ("2026-11-25T10:00:00Z", datetime(2026, 11, 25, 10, tzinfo=UTC), "2026-11-25T10:00:00Z"),
        (
            "2026-11-25T10:00:00.5Z",
            datetime(2026, 11, 25, 10, 0, 0, 500000, tzinfo=UTC),
            "2026-11-25T10:00:00.5Z",
        ),
        ("2026-11-25T10:00:00.000Z", datetime(2026, 11, 25, 10, tzinfo=UTC), "2026-11-25T10:00:00Z"),
        (
            "2026-11-25T10:00:00.123456789Z",  # Go's nanoseconds: truncated to microseconds
            datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC),
            "2026-11-25T10:00:00.123456Z",
        ),
        ("2026-11-25T11:30:00+01:30", datetime(2026, 11, 25, 10, tzinfo=UTC), "2026-11-25T10:00:00Z"),
        ("2026-11-25T05:00:00-05:00", datetime(2026, 11, 25, 10, tzinfo=UTC), "2026-11-25T10:00:00Z"),
        ("0001-01-01T00:00:00Z", None, None),  # Go's zero time
        (
            "0999-01-02T03:04:05.000001Z",
            datetime(999, 1, 2, 3, 4, 5, 1, tzinfo=UTC),
            "0999-01-02T03:04:05.000001Z",
        ),
    ],
)
def test_last_handshake_encoding(text: str, expected: datetime | None, reemitted: str | None) -> None:
    peer = WireGuardPeer.from_dict({"publicKey": PUB_B, "lastHandshake": text})
    assert peer.last_handshake == expected
    if expected is not None:
        assert peer.last_handshake is not None and peer.last_handshake.tzinfo is UTC
    assert peer.to_dict()["lastHandshake"] == reemitted


def test_last_handshake_null_and_python_values() -> None:
    assert WireGuardPeer.from_dict({"publicKey": PUB_B, "lastHandshake": None}).last_handshake is None
    east = timezone(timedelta(hours=9))
    peer = WireGuardPeer(public_key=Key.parse(PUB_B), last_handshake=datetime(2026, 11, 25, 19, tzinfo=east))
    assert peer.last_handshake == datetime(2026, 11, 25, 10, tzinfo=UTC)
    assert peer.to_dict()["lastHandshake"] == "2026-11-25T10:00:00Z"
    zero = WireGuardPeer(public_key=Key.parse(PUB_B), last_handshake=datetime(1, 1, 1, tzinfo=UTC))
    assert zero.last_handshake is None
    with pytest.raises(InvalidConfig) as err:
        WireGuardPeer(public_key=Key.parse(PUB_B), last_handshake=datetime(2026, 11, 25))
    assert err.value.field == "lastHandshake"


def test_format_time_matches_go_rfc3339nano() -> None:
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=UTC)) == "2026-01-02T03:04:05.12Z"
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, 1, tzinfo=UTC)) == "2026-01-02T03:04:05.000001Z"
    assert format_time(datetime(12, 1, 2, tzinfo=UTC)) == "0012-01-02T00:00:00Z"


def test_persistent_keepalive_is_integer_seconds() -> None:
    peer = WireGuardPeer.from_dict({"publicKey": PUB_B, "persistentKeepalive": 25})
    assert peer.persistent_keepalive == 25
    assert peer.to_json(indent=None).count('"persistentKeepalive":25,') == 1


def test_zero_values_and_nil_slices() -> None:
    # missing non-required fields take Go's zero values; null slices are empty
    assert WireGuardInterface.from_json('{"name":"wg0"}') == WireGuardInterface(name="wg0")
    assert WireGuardInterface.from_json('{"name":"wg0","peers":null}').peers == ()
    peer = WireGuardPeer.from_json(f'{{"publicKey":"{PUB_B}","allowedIps":null}}')
    assert peer == WireGuardPeer(public_key=Key.parse(PUB_B))
    assert MeshTopology.from_json("{}") == MeshTopology()
    assert MeshTopology.from_json('{"nodes":null,"connections":null}').to_json(indent=None) == (
        '{"nodes":[],"connections":[],"coordinator":""}'
    )
    # an all-zero key is Go's zero value: no key
    bare = WireGuardInterface.from_dict({"name": "wg0", "privateKey": ZERO, "publicKey": ZERO})
    assert bare.private_key is None and bare.public_key is None
    assert bare.to_dict(include_secrets=True)["publicKey"] is None
    psk = WireGuardPeer.from_dict({"publicKey": PUB_B, "presharedKey": ZERO})
    assert psk.preshared_key is None
    assert "presharedKey" not in psk.to_dict(include_secrets=True)


def test_public_key_derived_from_private() -> None:
    iface = WireGuardInterface(name="wg0", private_key=Key.parse(PRIV_A))
    assert iface.public_key == Key.parse(PUB_A)
    assert WireGuardInterface.from_dict({"name": "wg0", "privateKey": PRIV_A}).public_key == Key.parse(PUB_A)
    assert sample_config().public_key == Key.parse(PRIV_B).public_key() == Key.parse(PUB_B)
    # rotating: replace both, or let public_key be derived again
    rotated = dataclasses.replace(iface, private_key=Key.parse(PRIV_B), public_key=None)
    assert rotated.public_key == Key.parse(PUB_B)
    with pytest.raises(InvalidConfig) as err:
        dataclasses.replace(iface, private_key=Key.parse(PRIV_B))
    assert err.value.field == "publicKey"


def test_go_escaping_of_text() -> None:
    node = MeshNode(
        id="a<b>&c",
        public_key=Key.parse(PUB_A),
        internal_ip=ipaddress.ip_address("10.0.0.1"),
        region='line\u2028para\u2029 "q" back\\slash ünï',
    )
    text = node.to_json(indent=None)
    assert '"id":"a\\u003cb\\u003e\\u0026c"' in text
    assert '"region":"line\\u2028para\\u2029 \\"q\\" back\\\\slash ünï"' in text
    assert MeshNode.from_json(text) == node
    assert MeshNode.from_json(text.encode()) == node


def test_stats_totals_and_connection_status_text() -> None:
    stats = sample_stats()
    assert stats.rx_bytes == 2**64 - 1 and stats.tx_bytes == 9812 + 148
    conn = MeshConnection(from_node="a", to_node="b", status="connected")  # type: ignore[arg-type]
    assert conn.status is ConnectionStatus.CONNECTED
    topo = sample_topology()
    node = topo.node("agent-b")
    assert node is not None and node.region == "são-paulo"
    assert topo.node("nope") is None


# --- strict parsing: every error names the field ---------------------------------------------

DELETE = object()


def mutated(base: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


IFACE_DOC = json.loads((FIXTURES / "wireguard_interface_secrets.json").read_text())
CONFIG_DOC = json.loads((FIXTURES / "interface_config.json").read_text())
STATS_DOC = json.loads((FIXTURES / "interface_stats.json").read_text())
TOPO_DOC = json.loads((FIXTURES / "mesh_topology.json").read_text())

BAD_INTERFACE = [
    # (path, value, expected field, words in the reason)
    (("name",), 7, "name", "expected a string"),
    (("name",), None, "name", "expected a string"),
    (("name",), DELETE, "name", "missing"),
    (("name",), "", "name", "empty"),
    (("name",), "a" * 16, "name", "15 bytes"),
    (("name",), "é" * 8, "name", "15 bytes"),
    (("name",), "wg/0", "name", "'/'"),
    (("name",), "wg 0", "name", "' '"),
    (("name",), "wg\u00a00", "name", "'\\xa0'"),
    (("name",), "wg:0", "name", "':'"),
    (("name",), "wg\n0", "name", "control"),
    (("name",), "..", "name", "not a valid"),
    (("Name",), "wg0", "Name", "unknown field"),
    (("privateKey",), "not a key", "privateKey", "44 base64"),
    (("privateKey",), 5, "privateKey", "expected a base64 key"),
    (("privateKey",), PRIV_A + "\n", "privateKey", "whitespace"),
    (("privateKey",), "!" * 43 + "=", "privateKey", "base64"),
    (("publicKey",), PUB_B, "publicKey", "does not match privateKey"),
    (("publicKey",), [], "publicKey", "expected a base64 key"),
    (("listenPort",), 65536, "listenPort", "out of range 0..65535"),
    (("listenPort",), -1, "listenPort", "out of range"),
    (("listenPort",), "51820", "listenPort", "expected an integer, got string"),
    (("listenPort",), 51820.0, "listenPort", "expected an integer, got number"),
    (("listenPort",), True, "listenPort", "expected an integer, got boolean"),
    (("listenPort",), None, "listenPort", "expected an integer, got null"),
    (("fwMark",), 2**32, "fwMark", "out of range 0..4294967295"),
    (("fwMark",), -1, "fwMark", "out of range"),
    (("fwMark",), None, "fwMark", "got null"),
    (("peers",), "x", "peers", "expected an array"),
    (("peers",), {}, "peers", "expected an array"),
    (("peers", 1), 1, "peers[1]", "expected a JSON object"),
    (("peers", 1, "publicKey"), PUB_B, "peers[1].publicKey", "duplicate peer public key (same as peers[0])"),
    (("peers", 2, "publicKey"), ZERO, "peers[2].publicKey", "all zeros"),
    (("peers", 2, "publicKey"), DELETE, "peers[2].publicKey", "missing"),
    (("peers", 2, "bogus"), 1, "peers[2].bogus", "unknown field"),
    (("peers", 0, "presharedKey"), "x", "peers[0].presharedKey", "44 base64"),
    (("peers", 0, "endpoint"), "203.0.113.7", "peers[0].endpoint", "host:port"),
    (("peers", 0, "endpoint"), "vpn.example.com:51820", "peers[0].endpoint", "IP address"),
    (("peers", 0, "endpoint"), "203.0.113.7:0", "peers[0].endpoint", "out of range 1..65535"),
    (("peers", 0, "endpoint"), 51820, "peers[0].endpoint", "expected an endpoint string"),
    (("peers", 0, "allowedIps"), "10.0.0.0/8", "peers[0].allowedIps", "expected an array"),
    (("peers", 0, "allowedIps", 1), "10.0.0.0", "peers[0].allowedIps[1]", "CIDR"),
    (("peers", 0, "allowedIps", 1), "10.0.0.0/33", "peers[0].allowedIps[1]", "out of range 0..32"),
    (("peers", 0, "allowedIps", 1), "fd00::/129", "peers[0].allowedIps[1]", "out of range 0..128"),
    (("peers", 0, "allowedIps", 1), "10.0.0.0/255.0.0.0", "peers[0].allowedIps[1]", "CIDR"),
    (("peers", 0, "allowedIps", 1), "10.0.0.0/08", "peers[0].allowedIps[1]", "CIDR"),
    (("peers", 0, "allowedIps", 1), "010.0.0.0/8", "peers[0].allowedIps[1]", "not an IP address"),
    (("peers", 0, "allowedIps", 1), "fe80::%eth0/64", "peers[0].allowedIps[1]", "CIDR"),
    (("peers", 0, "allowedIps", 1), None, "peers[0].allowedIps[1]", "expected a CIDR string"),
    (("peers", 1, "persistentKeepalive"), 65536, "peers[1].persistentKeepalive", "out of range 0..65535"),
    (("peers", 1, "persistentKeepalive"), -1, "peers[1].persistentKeepalive", "out of range"),
    (("peers", 1, "persistentKeepalive"), "25s", "peers[1].persistentKeepalive", "expected an integer"),
    (("peers", 1, "persistentKeepalive"), 2.5, "peers[1].persistentKeepalive", "expected an integer"),
    (("peers", 1, "lastHandshake"), "2026-11-25 10:00:00Z", "peers[1].lastHandshake", "RFC 3339"),
    (("peers", 1, "lastHandshake"), "2026-11-25T10:00:00", "peers[1].lastHandshake", "RFC 3339"),
    (("peers", 1, "lastHandshake"), "2026-13-01T00:00:00Z", "peers[1].lastHandshake", "invalid time"),
    (("peers", 1, "lastHandshake"), "2026-11-25T10:00:00+24:00", "peers[1].lastHandshake", "offset"),
    (("peers", 1, "lastHandshake"), "2026-11-25T10:00:00.Z", "peers[1].lastHandshake", "RFC 3339"),
    (("peers", 1, "lastHandshake"), 0, "peers[1].lastHandshake", "expected an RFC 3339 time"),
    (("address",), "10.0.0.1", "address", "CIDR"),
    (("address",), "host/24", "address", "not an IP address"),
    (("address",), 5, "address", "expected a CIDR string"),
    (("mtu",), 575, "mtu", "576..65535 (or 0"),
    (("mtu",), 65536, "mtu", "out of range"),
    (("mtu",), "1420", "mtu", "expected an integer"),
    (("mtu",), None, "mtu", "got null"),
]


@pytest.mark.parametrize(("path", "value", "field", "words"), BAD_INTERFACE)
def test_interface_strict_errors(path: tuple[Any, ...], value: Any, field: str, words: str) -> None:
    doc = mutated(IFACE_DOC, path, value)
    with pytest.raises(InvalidConfig) as err:
        WireGuardInterface.from_dict(doc)
    assert err.value.field == field
    assert words in err.value.reason
    assert str(err.value) == f"{field}: {err.value.reason}"
    with pytest.raises(InvalidConfig) as err2:  # the same through JSON text
        WireGuardInterface.from_json(json.dumps(doc))
    assert err2.value.field == field


BAD_CONFIG = [
    (("name",), "x" * 20, "name", "15 bytes"),
    (("name",), DELETE, "name", "missing"),
    (("publicKey",), PUB_B, "publicKey", "unknown field"),
    (("privateKey",), "short", "privateKey", "44 base64"),
    (("listenPort",), 70000, "listenPort", "out of range"),
    (("fwMark",), 1.5, "fwMark", "expected an integer"),
    (("peers", 0, "allowedIps", 0), "10.100.0.0/", "peers[0].allowedIps[0]", "CIDR"),
    (("peers", 0, "endpoint"), "[2001:db8::1]", "peers[0].endpoint", "host:port"),
    (("address",), "10.100.0.2/40", "address", "out of range 0..32"),
    (("mtu",), 100, "mtu", "576"),
]


@pytest.mark.parametrize(("path", "value", "field", "words"), BAD_CONFIG)
def test_config_strict_errors(path: tuple[Any, ...], value: Any, field: str, words: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        InterfaceConfig.from_dict(mutated(CONFIG_DOC, path, value))
    assert (err.value.field, words in err.value.reason) == (field, True), str(err.value)


BAD_STATS = [
    (("collectedAt",), DELETE, "collectedAt", "missing"),
    (("collectedAt",), None, "collectedAt", "expected an RFC 3339 time string, got null"),
    (("collectedAt",), "0001-01-01T00:00:00Z", "collectedAt", "zero time"),
    (("collectedAt",), "yesterday", "collectedAt", "RFC 3339"),
    (("name",), "", "name", "empty"),
    (("publicKey",), "x", "publicKey", "44 base64"),
    (("peers", 0, "rxBytes"), -1, "peers[0].rxBytes", "out of range"),
    (("peers", 0, "rxBytes"), 2**64, "peers[0].rxBytes", "out of range"),
    (("peers", 0, "txBytes"), "9812", "peers[0].txBytes", "expected an integer"),
    (("peers", 0, "handshakes"), "3", "peers[0].handshakes", "expected an integer"),
    (("peers", 0, "latencyUs"), -5, "peers[0].latencyUs", "out of range"),
    (("peers", 0, "latencyUs"), 1.5, "peers[0].latencyUs", "expected an integer"),
    (("peers", 1, "publicKey"), PUB_B, "peers[1].publicKey", "duplicate"),
    (("peers", 1, "persistentKeepalive"), 25, "peers[1].persistentKeepalive", "unknown field"),
    (("peers", 1, "endpoint"), "x:1", "peers[1].endpoint", "IP address"),
]


@pytest.mark.parametrize(("path", "value", "field", "words"), BAD_STATS)
def test_stats_strict_errors(path: tuple[Any, ...], value: Any, field: str, words: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        InterfaceStats.from_dict(mutated(STATS_DOC, path, value))
    assert (err.value.field, words in err.value.reason) == (field, True), str(err.value)


BAD_TOPOLOGY = [
    (("nodes",), "x", "nodes", "expected an array"),
    (("nodes", 0, "id"), "", "nodes[0].id", "empty"),
    (("nodes", 0, "id"), DELETE, "nodes[0].id", "missing"),
    (("nodes", 1, "id"), "coordinator-1", "nodes[1].id", "duplicate id (same as nodes[0])"),
    (("nodes", 1, "publicKey"), PUB_A, "nodes[1].publicKey", "duplicate publicKey"),
    (("nodes", 1, "publicKey"), ZERO, "nodes[1].publicKey", "all zeros"),
    (("nodes", 1, "publicKey"), "nope", "nodes[1].publicKey", "44 base64"),
    (("nodes", 2, "internalIp"), "10.100.0.3/32", "nodes[2].internalIp", "not an IP address"),
    (("nodes", 2, "internalIp"), "10.100.0.1", "nodes[2].internalIp", "duplicate internalIp"),
    (("nodes", 2, "internalIp"), "fe80::1%eth0", "nodes[2].internalIp", "zone"),
    (("nodes", 2, "internalIp"), DELETE, "nodes[2].internalIp", "missing"),
    (("nodes", 2, "endpoint"), None, "nodes[2].endpoint", "expected an endpoint string, got null"),
    (("nodes", 0, "endpoint"), "203.0.113.1", "nodes[0].endpoint", "host:port"),
    (("nodes", 0, "region"), 5, "nodes[0].region", "expected a string"),
    (("nodes", 0, "region"), "a\x00b", "nodes[0].region", "control"),
    (("nodes", 0, "zone"), "x", "nodes[0].zone", "unknown field"),
    (("connections", 0, "from"), "ghost", "connections[0].from", "no node has id 'ghost'"),
    (("connections", 0, "to"), "agent-b", "connections[0].to", "two different nodes"),
    (("connections", 0, "to"), DELETE, "connections[0].to", "missing"),
    (("connections", 0, "status"), "up", "connections[0].status", "unknown status 'up'"),
    (("connections", 0, "status"), None, "connections[0].status", "expected a status string"),
    (("connections", 0, "viaRelay"), "false", "connections[0].viaRelay", "expected a boolean"),
    (("connections", 0, "viaRelay"), 0, "connections[0].viaRelay", "expected a boolean"),
    (("connections", 0, "latencyUs"), -1, "connections[0].latencyUs", "out of range"),
    (
        ("connections", 2, "to"),
        "coordinator-1",
        "connections[2]",
        "duplicate connection (same as connections[1])",
    ),
    (("coordinator",), "nobody", "coordinator", "no node has id 'nobody'"),
    (("coordinator",), None, "coordinator", "expected a string"),
    (("extra",), [], "extra", "unknown field"),
]


@pytest.mark.parametrize(("path", "value", "field", "words"), BAD_TOPOLOGY)
def test_topology_strict_errors(path: tuple[Any, ...], value: Any, field: str, words: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        MeshTopology.from_dict(mutated(TOPO_DOC, path, value))
    assert (err.value.field, words in err.value.reason) == (field, True), str(err.value)


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("", "", "invalid JSON"),
        ("{", "", "invalid JSON"),
        ("[]", "", "expected a JSON object, got array"),
        ('"wg0"', "", "expected a JSON object, got string"),
        ("null", "", "expected a JSON object, got null"),
        ('{"name":"wg0","mtu":NaN}', "", "invalid JSON"),
        ('{"name":"wg0","name":"wg1"}', "name", "more than once"),
        (
            '{"name":"wg0","peers":[{"publicKey":"' + PUB_B + '","allowedIps":[],"allowedIps":[]}]}',
            "peers[0].allowedIps",
            "more than once",
        ),
        ('{"name":"wg0"} x', "", "invalid JSON"),
        (b'{"name":"wg\xff"}', "", "invalid JSON"),
        ("[" * 100000, "", "invalid JSON"),
    ],
)
def test_document_level_errors(text: str | bytes, field: str, words: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        WireGuardInterface.from_json(text)
    assert err.value.field == field
    assert words in err.value.reason


def test_invalid_config_is_a_value_error() -> None:
    err = InvalidConfig("out of range", "peers[1].allowedIps[0]")
    assert isinstance(err, ValueError)
    assert (err.field, err.reason, str(err)) == (
        "peers[1].allowedIps[0]",
        "out of range",
        "peers[1].allowedIps[0]: out of range",
    )
    assert str(InvalidConfig("bad document")) == "bad document"


# --- constructors validate as parsing does -------------------------------------------------------


def peer(**kw: Any) -> WireGuardPeer:
    return WireGuardPeer(**{"public_key": Key.parse(PUB_B), **kw})


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: WireGuardInterface(name="x" * 16), "name"),
        (lambda: WireGuardInterface(name=b"wg0"), "name"),
        (lambda: WireGuardInterface(name="wg0", listen_port=-1), "listenPort"),
        (lambda: WireGuardInterface(name="wg0", fw_mark=2**32), "fwMark"),
        (lambda: WireGuardInterface(name="wg0", mtu=575), "mtu"),
        (lambda: WireGuardInterface(name="wg0", private_key=PRIV_A), "privateKey"),
        (lambda: WireGuardInterface(name="wg0", address=net("10.0.0.0/24")), "address"),
        (lambda: WireGuardInterface(name="wg0", address="10.0.0.1/24"), "address"),
        (lambda: WireGuardInterface(name="wg0", peers=[peer(), peer()]), "peers[1].publicKey"),
        (lambda: WireGuardInterface(name="wg0", peers=[peer(), "x"]), "peers[1]"),
        (lambda: WireGuardInterface(name="wg0", peers=peer()), "peers"),
        (lambda: InterfaceConfig(name="wg 0"), "name"),
        (lambda: InterfaceConfig(name="wg0", peers=[peer(), peer()]), "peers[1].publicKey"),
        (lambda: InterfaceConfig(name="wg0", mtu=70000), "mtu"),
        (lambda: peer(public_key=Key(bytes(32))), "publicKey"),
        (lambda: peer(public_key=PUB_B), "publicKey"),
        (lambda: peer(preshared_key=PSK_1), "presharedKey"),
        (lambda: peer(endpoint="203.0.113.7:51820"), "endpoint"),
        (lambda: peer(allowed_ips=["10.0.0.0/8"]), "allowedIps[0]"),
        (lambda: peer(allowed_ips=[net("10.0.0.0/8"), iface_addr("10.0.0.1/8")]), "allowedIps[1]"),
        (lambda: peer(allowed_ips="10.0.0.0/8"), "allowedIps"),
        (lambda: peer(persistent_keepalive=True), "persistentKeepalive"),
        (lambda: peer(persistent_keepalive=65536), "persistentKeepalive"),
        (lambda: peer(last_handshake=datetime(2026, 1, 1)), "lastHandshake"),
        (lambda: peer(last_handshake="2026-01-01T00:00:00Z"), "lastHandshake"),
        (lambda: PeerStats(public_key=Key.parse(PUB_B), rx_bytes=-1), "rxBytes"),
        (lambda: PeerStats(public_key=Key.parse(PUB_B), handshakes=1.0), "handshakes"),
        (lambda: InterfaceStats(name="wg0", collected_at=None), "collectedAt"),
        (lambda: InterfaceStats(name="wg0", collected_at=datetime(2026, 1, 1)), "collectedAt"),
        (lambda: MeshConnection(from_node="a", to_node="a", status=ConnectionStatus.CONNECTED), "to"),
        (lambda: MeshConnection(from_node="a", to_node="b", status="up"), "status"),
        (lambda: MeshConnection(from_node="a", to_node="b", status=1), "status"),
        (lambda: MeshConnection(from_node="", to_node="b", status="connected"), "from"),
        (
            lambda: MeshNode(
                id="n", public_key=Key.parse(PUB_A), internal_ip=ipaddress.ip_address("fe80::1%2")
            ),
            "internalIp",
        ),
        (lambda: MeshNode(id="n", public_key=Key.parse(PUB_A), internal_ip="10.0.0.1"), "internalIp"),
        (lambda: MeshTopology(coordinator="x"), "coordinator"),
        (lambda: MeshTopology(nodes=[1]), "nodes[0]"),
    ],
)
def test_constructor_errors_name_the_field(build: Any, field: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        build()
    assert err.value.field == field


def test_replace_revalidates() -> None:
    with pytest.raises(InvalidConfig) as err:
        dataclasses.replace(sample_interface(), name="interface-name-too-long")
    assert err.value.field == "name"


@pytest.mark.parametrize("name", ["wg0", "a", "x" * 15, "é" * 7, "wg-agent_7.v2", "ünï"])
def test_valid_interface_names(name: str) -> None:
    assert validate_interface_name(name) == name
    assert WireGuardInterface(name=name).name == name


# --- hypothesis: round trips over generated objects ----------------------------------------------

keys = st.binary(min_size=32, max_size=32).map(Key)
peer_keys = keys.filter(lambda k: not k.is_zero())


def _valid_name(name: str) -> bool:
    try:
        validate_interface_name(name)
    except InvalidConfig:
        return False
    return True


names = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_.-]{0,14}", fullmatch=True),
    st.text(min_size=1, max_size=15),
).filter(_valid_name)
texts = st.text(st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from('<>&\u2028\u2029"\\'))
u16 = st.integers(0, 65535)


@st.composite
def networks(draw: st.DrawFn) -> Any:
    addr = draw(st.ip_addresses())
    plen = draw(st.integers(0, addr.max_prefixlen))
    return ipaddress.ip_network((addr, plen), strict=False)


@st.composite
def addresses(draw: st.DrawFn) -> Any:
    addr = draw(st.ip_addresses())
    plen = draw(st.integers(0, addr.max_prefixlen))
    return ipaddress.ip_interface((addr, plen))


endpoints = st.builds(Endpoint, host=st.ip_addresses(), port=st.integers(1, 65535))
times = st.none() | st.datetimes(
    min_value=datetime(1, 1, 1, 0, 0, 1), max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=st.just(UTC)
)

wg_peers = st.builds(
    WireGuardPeer,
    public_key=peer_keys,
    preshared_key=st.none() | keys,
    endpoint=st.none() | endpoints,
    allowed_ips=st.lists(networks(), max_size=4),
    persistent_keepalive=u16,
    last_handshake=times,
)
peer_lists = st.lists(wg_peers, max_size=4, unique_by=lambda p: bytes(p.public_key))
mtus = st.just(0) | st.integers(576, 65535)
interfaces = st.builds(
    WireGuardInterface,
    name=names,
    private_key=st.none() | keys,
    public_key=st.none(),
    listen_port=u16,
    fw_mark=st.integers(0, 2**32 - 1),
    peers=peer_lists,
    address=st.none() | addresses(),
    mtu=mtus,
)
public_only_interfaces = st.builds(
    WireGuardInterface,
    name=names,
    public_key=st.none() | keys,
    peers=peer_lists,
    address=st.none() | addresses(),
)
configs = st.builds(
    InterfaceConfig,
    name=names,
    private_key=st.none() | keys,
    listen_port=u16,
    fw_mark=st.integers(0, 2**32 - 1),
    peers=peer_lists,
    address=st.none() | addresses(),
    mtu=mtus,
)
opt_u64 = st.none() | st.integers(0, 2**64 - 1)
peer_stats = st.builds(
    PeerStats,
    public_key=peer_keys,
    endpoint=st.none() | endpoints,
    last_handshake=times,
    rx_bytes=st.integers(0, 2**64 - 1),
    tx_bytes=st.integers(0, 2**64 - 1),
    handshakes=opt_u64,
    latency_us=st.none() | st.integers(0, 2**63 - 1),
)
stats = st.builds(
    InterfaceStats,
    name=names,
    public_key=st.none() | keys,
    listen_port=u16,
    collected_at=times.filter(lambda x: x is not None),
    peers=st.lists(peer_stats, max_size=4, unique_by=lambda p: bytes(p.public_key)),
)


@st.composite
def topologies(draw: st.DrawFn) -> MeshTopology:
    ids = draw(st.lists(texts.filter(bool), max_size=5, unique=True))
    node_keys = draw(st.lists(peer_keys, min_size=len(ids), max_size=len(ids), unique_by=bytes))
    ips = draw(
        st.lists(st.ip_addresses(), min_size=len(ids), max_size=len(ids), unique=True).filter(
            lambda xs: all(getattr(x, "scope_id", None) is None for x in xs)
        )
    )
    nodes = [
        MeshNode(id=i, public_key=k, endpoint=draw(st.none() | endpoints), internal_ip=ip, region=draw(texts))
        for i, k, ip in zip(ids, node_keys, ips, strict=True)
    ]
    pairs = [(a, b) for a in ids for b in ids if a != b]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=6)) if pairs else []
    connections = [
        MeshConnection(
            from_node=a,
            to_node=b,
            status=draw(st.sampled_from(ConnectionStatus)),
            via_relay=draw(st.booleans()),
            latency_us=draw(st.none() | st.integers(0, 2**63 - 1)),
        )
        for a, b in chosen
    ]
    coordinator = draw(st.sampled_from(["", *ids]))
    return MeshTopology(nodes=nodes, connections=connections, coordinator=coordinator)


any_model = st.one_of(wg_peers, interfaces, public_only_interfaces, configs, peer_stats, stats, topologies())


@settings(max_examples=300, deadline=None)
@given(obj=any_model, indent=st.sampled_from([2, None]))
def test_hypothesis_round_trip(obj: Any, indent: int | None) -> None:
    cls = type(obj)
    text = obj.to_json(include_secrets=True, indent=indent)
    back = cls.from_json(text)
    assert back == obj
    assert back.to_json(include_secrets=True, indent=indent) == text  # byte-identical re-emission
    assert list(json.loads(text)) == [f for f in cls.JSON_FIELDS if f in json.loads(text)]
    public = obj.to_json(indent=indent)
    assert cls.from_json(public) == strip_secrets(obj)
    assert '"privateKey"' not in public and '"presharedKey"' not in public
    secrets = [getattr(obj, "private_key", None), getattr(obj, "preshared_key", None)]
    secrets += [getattr(p, "preshared_key", None) for p in getattr(obj, "peers", ())]
    public_keys = set(re.findall(r"[A-Za-z0-9+/]{43}=", public))
    for secret in secrets:
        if secret is not None and secret.to_base64() not in public_keys:  # (unless also a public key)
            assert secret.to_base64() not in public
            assert secret.to_base64() not in repr(obj)


@settings(max_examples=200, deadline=None)
@given(
    when=st.datetimes(
        min_value=datetime(1000, 1, 2),
        max_value=datetime(9998, 12, 30),
        timezones=st.builds(
            timezone, st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timedelta(minutes=m))
        ),
    )
)
def test_hypothesis_times_with_offsets(when: datetime) -> None:
    text = when.isoformat().replace("+00:00", "Z")
    parsed = parse_time(text)
    assert parsed == when and parsed is not None and parsed.tzinfo is UTC
    assert parse_time(format_time(when)) == when
