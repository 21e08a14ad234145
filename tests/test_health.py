"""Health reports without a network: the strict reader (fuzzed), the offline window, the
agent's liveness decisions on a fake clock, and what `pywg agent status` prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.manage.key import Key
from pywg.manage.types import ConnectionStatus, Endpoint, InvalidConfig, PeerStats
from pywg.mesh import agent_status, health, wire
from pywg.mesh.agent_health import HANDSHAKE_FRESH_S, Liveness, peer_entries
from pywg.mesh.echoes import Echoes
from pywg.testing.icmp import Echo, build_echo

PYWG = str(Path(sys.executable).parent / "pywg")
GOOD = {"to": "n1", "status": "connected", "viaRelay": False, "latencyUs": None,
        "lastHandshake": "2026-12-03T06:00:00Z", "rxBytes": 1234, "txBytes": 5678, "endpoint": "10.216.0.2:51820"}


# --- the reader -------------------------------------------------------------------------------


def test_a_full_report_reads_into_typed_peers_and_the_interval():
    report = wire.read_health({"interval": 2, "connections": [GOOD, {"to": "n2", "status": "connecting"}]}, "me")
    assert report.interval == 2.0
    first, second = report.peers
    assert (first.connection.from_node, first.connection.to_node, first.connection.status) == (
        "me", "n1", ConnectionStatus.CONNECTED)
    assert first.last_handshake == datetime(2026, 12, 3, 6, 0, tzinfo=UTC)
    assert (first.rx_bytes, first.tx_bytes, first.endpoint) == (1234, 5678, Endpoint.parse("10.216.0.2:51820"))
    # An older agent's entry (the spec's fields only) still reads; its counters are unknown.
    assert (second.last_handshake, second.rx_bytes, second.tx_bytes, second.endpoint) == (None, None, None, None)
    assert wire.read_health({"connections": []}, "me").interval is None


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"connections": [{**GOOD, "rtt": 5}]}, "connections[0].rtt", "unknown field"),
    ({"connections": [], "intervall": 2}, "intervall", "unknown field"),
    ({"connections": [{**GOOD, "rxBytes": -1}]}, "connections[0].rxBytes", "0.."),
    ({"connections": [{**GOOD, "txBytes": 2 ** 63}]}, "connections[0].txBytes", "0.."),
    ({"connections": [{**GOOD, "rxBytes": 1.5}]}, "connections[0].rxBytes", "integer"),
    ({"connections": [{**GOOD, "rxBytes": True}]}, "connections[0].rxBytes", "integer"),
    ({"connections": [{**GOOD, "rxBytes": "12"}]}, "connections[0].rxBytes", "integer"),
    ({"connections": [{**GOOD, "lastHandshake": "yesterday"}]}, "connections[0].lastHandshake", "RFC 3339"),
    ({"connections": [{**GOOD, "lastHandshake": "2026-02-30T00:00:00Z"}]}, "connections[0].lastHandshake", "invalid"),
    ({"connections": [{**GOOD, "lastHandshake": 1764741600}]}, "connections[0].lastHandshake", "RFC 3339"),
    ({"connections": [{**GOOD, "endpoint": "10.0.0.1"}]}, "connections[0].endpoint", ""),
    ({"connections": [{**GOOD, "endpoint": 51820}]}, "connections[0].endpoint", "host:port"),
    ({"connections": [{**GOOD, "status": "fine"}]}, "connections[0].status", ""),
    ({"connections": [{**GOOD, "latencyUs": -5}]}, "connections[0].latencyUs", ""),
    ({"connections": [GOOD, GOOD]}, "connections[1]", "duplicate"),
    ({"connections": ["n1"]}, "connections[0]", "expected an object"),
    ({"connections": {"n1": GOOD}}, "connections", "expected an array"),
    ({"connections": [GOOD] * (wire.MAX_CONNECTIONS + 1)}, "connections", "at most"),
    ({"interval": 0.1, "connections": []}, "interval", "0.5..3600"),
    ({"interval": 7200, "connections": []}, "interval", "0.5..3600"),
    ({"interval": "10", "connections": []}, "interval", "number"),
    ({"interval": False, "connections": []}, "interval", "number"),
    ({"interval": 10}, "connections", "missing"),
])
def test_bad_reports_name_the_field(body, field, words):
    with pytest.raises(InvalidConfig) as err:
        wire.read_health(body, "me")
    assert err.value.field == field and words in err.value.reason, (err.value.field, err.value.reason)


def test_a_bad_body_over_the_wire_is_an_error_naming_the_field():
    with pytest.raises(InvalidConfig) as err:
        wire.read_health(wire.parse_body(b'{"connections": [{"to": "n1", "status": "connected", '
                                         b'"rxBytes": 1, "rxBytes": 2}]}'), "me")
    assert err.value.field == "rxBytes" and "more than once" in err.value.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
entries = st.fixed_dictionaries({}, optional={
    "to": st.sampled_from(["n1", "n2", "me", ""]) | json_values,
    "from": st.sampled_from(["me", "n1"]) | json_values,
    "status": st.sampled_from(["connected", "connecting", "disconnected", "up"]) | json_values,
    "viaRelay": st.booleans() | json_values,
    "latencyUs": st.integers(-2, 2 ** 64) | json_values,
    "lastHandshake": st.sampled_from(["2026-12-03T06:00:00Z", "2026-12-03T06:00:00.123456789+01:00",
                                      "0001-01-01T00:00:00Z", "2026-13-01T00:00:00Z", ""]) | json_values,
    "rxBytes": st.integers(-2, 2 ** 64) | json_values,
    "txBytes": st.integers(-2, 2 ** 64) | json_values,
    "endpoint": st.sampled_from(["10.216.0.2:51820", "[fd16:a::1]:1", "host:1", "1.2.3.4:0"]) | json_values,
    "extra": json_values,
})
bodies = st.fixed_dictionaries({}, optional={
    "connections": st.lists(entries, max_size=4) | json_values,
    "interval": st.floats(0, 5000, allow_nan=False) | st.integers(-5, 5000) | json_values,
}) | st.dictionaries(st.sampled_from(["connections", "interval", "x"]), json_values, max_size=3)


@settings(max_examples=600, deadline=None)
@given(bodies)
def test_any_json_is_a_typed_report_or_an_invalid_config(body):
    try:
        report = wire.read_health(body, "me")
    except InvalidConfig as exc:
        assert isinstance(exc.field, str) and exc.reason
        top = exc.field.split("[")[0].split(".")[0]
        assert top in body or "missing" in exc.reason or "more than once" in exc.reason, (exc.field, exc.reason)
        return
    assert isinstance(report, health.HealthReport)
    assert report.interval is None or health.MIN_INTERVAL_S <= report.interval <= health.MAX_INTERVAL_S
    assert len({p.connection.to_node for p in report.peers}) == len(report.peers) == len(body["connections"])
    for p in report.peers:
        assert p.connection.from_node in ("me", "n1")
        for n in (p.rx_bytes, p.tx_bytes):
            assert n is None or (type(n) is int and 0 <= n < 2 ** 63)
        assert p.last_handshake is None or p.last_handshake.tzinfo is not None


def test_the_offline_window_is_three_reports_within_bounds():
    assert health.offline_window(10) == 30
    assert health.offline_window(0.5) == health.MIN_WINDOW_S == 3
    assert health.offline_window(3600) == health.MAX_WINDOW_S == 3 * 3600


# --- the agent's liveness ---------------------------------------------------------------------


def test_a_peer_is_connecting_then_connected_then_disconnected_when_its_echoes_go_unanswered():
    live = Liveness(interval=1)
    assert live.silence_limit == 8  # two echoes in a row, each unanswered for its 6 s timeout
    t = 1000.0
    assert live.status("k", last_handshake=None, silent_for=None, now=t) is ConnectionStatus.CONNECTING
    assert live.status("k", last_handshake=t + 1, silent_for=0.2, now=t + 1) is ConnectionStatus.CONNECTED
    for step in range(2, 9):  # answers keep arriving
        assert live.status("k", last_handshake=t + 1, silent_for=0.5, now=t + step) is ConnectionStatus.CONNECTED
    # The peer dies: no more replies; its handshake is still "fresh" for minutes.
    assert live.status("k", last_handshake=t + 1, silent_for=8, now=t + 16) is ConnectionStatus.CONNECTED
    assert live.status("k", last_handshake=t + 1, silent_for=8.5, now=t + 16.5) is ConnectionStatus.DISCONNECTED
    # It comes back: replies again.
    assert live.status("k", last_handshake=t + 30, silent_for=0.01, now=t + 30) is ConnectionStatus.CONNECTED


def test_a_peer_that_never_answers_becomes_disconnected_and_a_stale_handshake_too():
    live = Liveness(interval=10)
    assert live.silence_limit == 26
    assert live.status("a", last_handshake=None, silent_for=None, now=0) is ConnectionStatus.CONNECTING
    assert live.status("a", last_handshake=None, silent_for=None, now=25) is ConnectionStatus.CONNECTING
    assert live.status("a", last_handshake=None, silent_for=None, now=26) is ConnectionStatus.DISCONNECTED
    # A handshake but echoes never answered (ICMP dropped on the peer): not connected.
    assert live.status("c", last_handshake=0, silent_for=None, now=0) is ConnectionStatus.CONNECTING
    assert live.status("c", last_handshake=0, silent_for=None, now=30) is ConnectionStatus.DISCONNECTED
    # Echoes answered, but no handshake for 180 s: no session can be up.
    for t in (0.0, 100.0, HANDSHAKE_FRESH_S - 1):
        assert live.status("b", last_handshake=0, silent_for=1, now=t) is ConnectionStatus.CONNECTED
    assert live.status("b", last_handshake=0, silent_for=1, now=HANDSHAKE_FRESH_S) is ConnectionStatus.DISCONNECTED


def test_peer_entries_report_mesh_nodes_with_their_counters_and_round_trip_and_forget_removed_peers():
    k1, k2 = (Key.generate_private().public_key() for _ in range(2))
    hs = datetime(2026, 12, 3, 6, 0, 5, tzinfo=UTC)
    stats = (PeerStats(public_key=k1, endpoint=Endpoint.parse("10.216.0.3:51820"), last_handshake=hs,
                       rx_bytes=700, tx_bytes=900),
             PeerStats(public_key=k2))  # not (or no longer) a node of the view
    nodes = {k1.to_base64(): {"id": "n1", "name": "one", "internalIp": "100.116.0.1", "internalIpv6": "fd16:a::1"}}
    live = Liveness(interval=10)
    echoes = Echoes(identifier=7, cookie=b"c", stale_after=live.silence_limit)
    shown, report = peer_entries(stats, nodes, live, echoes, hs.timestamp() + 1, 50.0)
    assert report == [{"to": "n1", "status": "connecting", "latencyUs": None, "lastHandshake": "2026-12-03T06:00:05Z",
                       "rxBytes": 700, "txBytes": 900, "endpoint": "10.216.0.3:51820"}]
    # An echo answered in 1.5 ms: connected, with its round trip.
    request = echoes.request(k1.to_base64(), "100.116.0.1", 50.0)
    echoes.received(build_echo(Echo(0, "100.116.0.1", "100.116.0.2", 7, 0, request[8:])), "100.116.0.1", 50.0015,
                    v6=False)
    shown, report = peer_entries(stats, nodes, live, echoes, hs.timestamp() + 2, 51.0)
    assert (report[0]["status"], report[0]["latencyUs"]) == ("connected", 1500)
    assert wire.read_health({"interval": 10, "connections": report}, "me").peers[0].connection.latency_us == 1500
    assert [p["name"] for p in shown] == ["one", None] and shown[0]["latencyUs"] == 1500
    assert shown[1]["status"] == "connecting" and shown[1]["latencyUs"] is None
    # Silent past the limit: disconnected, and its round trip is unknown again.
    shown, report = peer_entries(stats, nodes, live, echoes, hs.timestamp() + 30, 80.0)
    assert (report[0]["status"], report[0]["latencyUs"]) == ("disconnected", None)
    peer_entries(stats[:1], nodes, live, echoes, hs.timestamp() + 31, 81.0)
    assert set(live._first) == {k1.to_base64()}


# --- pywg agent status ------------------------------------------------------------------------


def _state(tmp_path: Path, pid: int | None) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    status = {"nodeId": "n0", "name": "alpha", "interface": "h13hw0", "internalIp": "100.116.0.1",
              "internalIpv6": "fd16:a::1", "coordinator": "http://10.216.0.1:18216", "coordinatorConnected": True,
              "revision": 7, "updatedAt": 1_800_000_000.0,
              "peers": [{"nodeId": "n1", "name": "bravo", "status": "connected", "endpoint": "10.216.0.3:51820",
                         "internalIp": "100.116.0.2", "internalIpv6": "fd16:a::2",
                         "lastHandshake": "2027-01-15T08:00:00Z", "rxBytes": 3 * 1024 * 1024, "txBytes": 512,
                         "latencyUs": 2504}]}
    (state / "status.json").write_text(json.dumps(status))
    if pid is not None:
        (state / "agent.pid").write_text(str(pid))
    return state


def test_status_text_shows_handshake_age_transfer_endpoint_and_the_process(tmp_path):
    # A process whose command line is an agent's (as the real agent writes agent.pid once it runs).
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)", PYWG,
                             "agent", "up"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        state = _state(tmp_path, proc.pid)
        status = agent_status.load(state)
        assert status is not None and (status["running"], status["pid"]) == (True, proc.pid)
        hs = datetime(2027, 1, 15, 8, 0, tzinfo=UTC).timestamp()
        text = agent_status.render(status, now=hs + 42)
        assert f"agent: running (pid {proc.pid})" in text
        assert "bravo (n1): connected" in text and "latest handshake: 42 s ago  round trip: 2.50 ms" in text
        assert "3.0 MiB received, 512 B sent" in text and "endpoint: 10.216.0.3:51820" in text
        out = subprocess.run([PYWG, "agent", "status", "--json", "--state-dir", str(state)], capture_output=True,
                             text=True, check=True).stdout
        assert json.loads(out)["running"] is True and json.loads(out)["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    out = subprocess.run([PYWG, "agent", "status", "--state-dir", str(state)], capture_output=True, text=True,
                         check=True).stdout
    assert "agent: not running (this status is stale" in out and "(not connected" in out


def test_a_pid_file_naming_another_process_is_not_a_running_agent(tmp_path):
    state = _state(tmp_path, os.getpid())  # pytest is alive, but it is no pywg agent
    status = agent_status.load(state)
    assert status is not None and (status["running"], status["pid"], status["coordinatorConnected"]) == (
        False, None, False)
    assert agent_status.load(tmp_path) is None


@pytest.mark.parametrize(("flag", "value", "expected"), [
    *(("--health-interval", v, "0.5..3600") for v in ("0.1", "7200", "nan")),
    *(("--derp-remeasure", v, "1..3600") for v in ("0.5", "7200", "nan", "-1")),
])
def test_agent_up_refuses_an_interval_out_of_range_by_name(flag, value, expected):
    out = subprocess.run([PYWG, "agent", "up", "--coordinator", "http://127.0.0.1:1", "--authkey-file", "-",
                          flag, value], input="k\n", capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2 and f"{flag}: expected {expected} seconds" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
