"""The agent's NAT traversal glue without root: the disco key file, STUN server lists, the
peers handed from the mesh view, and how `pywg agent status` shows paths and the NAT."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.mesh import agent_status
from pywg.mesh.agent_traversal import (
    NO_TRAVERSAL,
    AgentTraversal,
    handshake_path,
    load_disco_key,
)
from pywg.mesh.reconcile import MeshView
from pywg.nat.disco import DiscoKey
from pywg.nat.stun import TransportAddress
from pywg.nat.stun_servers import MAX_SERVERS, BadServerList, format_server, parse_server, parse_server_list


def test_the_disco_key_is_made_once_0600_and_never_shown(tmp_path: Path) -> None:
    key = load_disco_key(tmp_path)
    path = tmp_path / "disco.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_disco_key(tmp_path).public == key.public  # kept across restarts
    secret = path.read_text().strip()
    nat = AgentTraversal(key, None)
    shown = repr(key) + repr(nat) + repr(nat.own_status(25))
    assert secret not in shown and bytes.fromhex(secret).hex() not in shown
    assert nat.own_status(25)["discoKey"] == base64.b64encode(key.public).decode()
    path.write_text("not hex\n")
    with pytest.raises(ValueError, match="disco.key: not a disco private key"):
        load_disco_key(tmp_path)


def test_stun_server_lists_are_ip_and_port_and_errors_name_the_culprit() -> None:
    """The agent reads the coordinator's list (and its --stun) with pywg.nat.stun_servers."""
    assert parse_server_list(["203.0.113.1:3478", " [2001:db8::1]:3478"]) == (
        TransportAddress.of("203.0.113.1", 3478), TransportAddress.of("2001:db8::1", 3478))
    with pytest.raises(BadServerList, match=r"stunServers\[0\]: the host is an IP address, got 'stun.example'"):
        parse_server_list(["stun.example:3478"])
    with pytest.raises(BadServerList, match=r"stunServers\[1\]: expected a HOST:PORT string, got int"):
        parse_server_list(["203.0.113.1:3478", 5])
    with pytest.raises(BadServerList, match=r"stunServers\[1\]: '203.0.113.1:3478' is given twice"):
        parse_server_list(["203.0.113.1:3478", "203.0.113.1:3478"])
    with pytest.raises(BadServerList, match=f"at most {MAX_SERVERS}"):
        parse_server_list([f"203.0.113.{i}:3478" for i in range(1, MAX_SERVERS + 2)])
    with pytest.raises(BadServerList, match="stunServers: expected a list"):
        parse_server_list("203.0.113.1:3478")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(st.one_of(st.text(max_size=30), st.integers(), st.none(),
                                    st.builds(lambda a, p: f"203.0.113.{a}:{p}", st.integers(0, 300),
                                              st.integers(-1, 70000))), max_size=20),
                 st.text(max_size=20), st.integers(), st.none()))
def test_the_stun_server_list_reader_accepts_servers_or_names_the_entry(value: object) -> None:
    try:
        servers = parse_server_list(value)
    except BadServerList as exc:
        assert str(exc).startswith("stunServers")
    else:
        assert isinstance(value, list) and len(servers) == len(value) <= MAX_SERVERS
        assert [format_server(s) for s in servers] == [format_server(parse_server(v)) for v in value]


def test_a_bad_list_from_the_coordinator_keeps_the_servers_it_had() -> None:
    nat = AgentTraversal(DiscoKey.generate(os.urandom), None)
    nat.from_coordinator({"stunServers": ["203.0.113.1:3478"]})
    nat.from_coordinator({"stunServers": ["203.0.113.1:3478", "nonsense"]})
    assert nat.stun_servers == (TransportAddress.of("203.0.113.1", 3478),)


def test_the_coordinators_stun_servers_are_taken_unless_overridden() -> None:
    key = DiscoKey.generate(os.urandom)
    nat = AgentTraversal(key, None)
    nat.from_coordinator({"nodes": []})  # absent: tolerated
    assert nat.stun_servers == ()
    nat.from_coordinator({"stunServers": ["203.0.113.1:3478", "203.0.113.2:3478"]})
    assert [str(s) for s in nat.stun_servers] == ["203.0.113.1:3478", "203.0.113.2:3478"]
    nat.from_coordinator({"stunServers": ["bad"]})  # unusable: logged, the last good list kept
    assert len(nat.stun_servers) == 2
    forced = AgentTraversal(key, (TransportAddress.of("198.51.100.1", 3478),))
    forced.from_coordinator({"stunServers": ["203.0.113.1:3478"]})
    assert [str(s) for s in forced.stun_servers] == ["198.51.100.1:3478"]
    assert forced.apply(MeshView(), "n0", "k") is None  # not started: the reconcile's own endpoints


def test_the_daemon_engines_path_comes_from_the_handshake() -> None:
    assert handshake_path(12.0)["path"] == "direct"
    assert handshake_path(200.0)["path"] == "none" and handshake_path(None)["path"] == "none"
    assert handshake_path(None)["reason"] == NO_TRAVERSAL


def test_status_text_shows_each_peers_path_and_our_nat() -> None:
    status = {
        "running": True, "pid": 1, "name": "a", "nodeId": "n1", "updatedAt": 100.0,
        "nat": {"candidates": [{"endpoint": "192.168.1.2:51820", "source": "local"},
                               {"endpoint": "198.51.100.7:51820", "source": "stun"}],
                "mapping": "endpoint-independent", "behindNat": True, "keepalive": 25},
        "peers": [
            {"name": "b", "nodeId": "n2", "status": "connected", "path": "direct", "endpoint": "203.0.113.9:4000",
             "rttMs": 12.345, "reason": None,
             "candidates": [{"endpoint": "203.0.113.9:4000", "sources": ["stun"], "rttMs": 12.345},
                            {"endpoint": "10.0.0.9:51820", "sources": ["local"], "rttMs": None}]},
            {"name": "c", "nodeId": "n3", "status": "connecting", "path": "none", "endpoint": None, "rttMs": None,
             "reason": "no pong from any of 2 candidates within 5 s", "candidates": []},
        ],
    }
    text = agent_status.render(status, now=100.0)
    assert "NAT: mapping endpoint-independent, behind a NAT; keepalive 25 s" in text
    assert "candidates: 192.168.1.2:51820 (local), 198.51.100.7:51820 (stun)" in text
    assert ("path: direct, 12.3 ms; tried 203.0.113.9:4000 [stun] 12.3 ms, 10.0.0.9:51820 [local] no pong"
            in text)
    assert "path: none (no pong from any of 2 candidates within 5 s)" in text
    assert "endpoint: 203.0.113.9:4000" in text and "endpoint: (none)" in text
    status["nat"] = {"candidates": [], "mapping": "unknown", "behindNat": False, "keepalive": 0}
    assert "no NAT; keepalive off" in agent_status.render(status, now=100.0)
