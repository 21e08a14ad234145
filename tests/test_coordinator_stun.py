"""`pywg coordinator serve --stun HOST:PORT[,...]`: the real serve process hands its STUN
servers to agents in the register response, GET /api/v1/topology and the watch snapshot;
bad values are refused with a message naming them, before anything is started or written."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import urllib.request

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_coordinator_cli import Serve, post, pywg

from pywg.manage.key import Key
from pywg.manage.types import MeshTopology
from pywg.nat.stun import TransportAddress
from pywg.nat.stun_servers import MAX_SERVERS, BadServerList, format_server, parse_servers

SERVERS = "203.0.113.1:3478, [2001:DB8::1]:3479"
AS_SENT = ["203.0.113.1:3478", "[2001:db8::1]:3479"]


def get(url: str, token: str) -> dict[str, object]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


async def snapshot(url: str, token: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.ws_connect(
            url.replace("http://", "ws://") + "/api/v1/watch", headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
        msg = await asyncio.wait_for(ws.receive(), 10)
        return json.loads(msg.data)  # type: ignore[no-any-return]


def test_the_stun_servers_reach_agents_in_the_registration_the_topology_and_the_snapshot(tmp_path):
    serve = Serve(tmp_path, "--stun", SERVERS)
    try:
        key = pywg("coordinator", "authkey", "create", "--store", serve.store, "--reusable").stdout.strip()
        status, node = post(serve.url + "/api/v1/register",
                            {"authKey": key, "name": "alpha", "publicKey": Key.generate_private().public_key().to_base64(),
                             "endpoints": ["192.0.2.9:51820"]})
        assert status == 201, node
        assert node["stunServers"] == AS_SENT
        assert {"id", "name", "internalIp", "internalIpv6", "prefix4", "prefix6", "token", "revision"} <= set(node)

        token = str(node["token"])
        topo = get(serve.url + "/api/v1/topology", token)
        assert list(topo) == ["nodes", "connections", "coordinator", "stunServers"]
        assert topo["stunServers"] == AS_SENT
        assert [n["endpoint"] for n in topo["nodes"]] == ["192.0.2.9:51820"]  # type: ignore[index, union-attr]

        snap = asyncio.run(snapshot(serve.url, token))
        assert snap["type"] == "snapshot" and snap["stunServers"] == AS_SENT
        assert [n["id"] for n in snap["nodes"]] == [node["id"]]  # type: ignore[index, union-attr]

        # `coordinator topology`: --json stays the spec's MeshTopology; the text names the servers.
        shown = pywg("coordinator", "topology", "--coordinator", serve.url, "--token-file", str(serve.admin), "--json")
        assert shown.returncode == 0, shown.stderr
        assert [n.id for n in MeshTopology.from_json(shown.stdout).nodes] == [node["id"]]
        text = pywg("coordinator", "topology", "--coordinator", serve.url, "--token-file", str(serve.admin))
        assert f"stun {','.join(AS_SENT)}" in text.stdout.splitlines()
    finally:
        code, err = serve.stop()
    assert code == 0 and "Traceback" not in err


def test_without_stun_the_lists_are_empty(tmp_path):
    serve = Serve(tmp_path)
    try:
        key = pywg("coordinator", "authkey", "create", "--store", serve.store).stdout.strip()
        status, node = post(serve.url + "/api/v1/register",
                            {"authKey": key, "name": "a", "publicKey": Key.generate_private().public_key().to_base64()})
        assert status == 201 and node["stunServers"] == []
        assert get(serve.url + "/api/v1/topology", str(node["token"]))["stunServers"] == []
        assert asyncio.run(snapshot(serve.url, str(node["token"])))["stunServers"] == []
    finally:
        serve.stop()


@pytest.mark.parametrize(("value", "named"), [
    ("203.0.113.1", "'203.0.113.1'"),
    ("stun.example.com:3478", "'stun.example.com'"),
    ("203.0.113.1:0", "'0'"),
    ("203.0.113.1:65536", "'65536'"),
    ("203.0.113.1:34x", "'34x'"),
    ("2001:db8::1:3478", "'2001:db8::1:3478'"),
    ("[203.0.113.1]:3478", "'[203.0.113.1]:3478'"),
    ("203.0.113.1:3478,", "empty entry"),
    ("203.0.113.1:3478,203.0.113.1:3478", "'203.0.113.1:3478' is given twice"),
    ("0.0.0.0:3478", "0.0.0.0"),
    ("", "empty entry"),
    (",".join(f"203.0.113.{i}:3478" for i in range(1, MAX_SERVERS + 2)), f"at most {MAX_SERVERS}"),
])
def test_a_bad_stun_value_is_refused_by_name_and_nothing_is_started(tmp_path, value, named):
    store, admin = tmp_path / "c.db", tmp_path / "admin.token"
    result = pywg("coordinator", "serve", "--listen", "127.0.0.1:0", "--store", f"sqlite:{store}",
                  "--admin-token-file", str(admin), "--stun", value)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("pywg: --stun: ") and named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout
    assert not store.exists() and not admin.exists()  # nothing half-applied


addresses = st.one_of(
    st.ip_addresses(v=4).filter(lambda ip: not (ip.is_unspecified or ip.is_multicast)),
    st.ip_addresses(v=6).filter(lambda ip: not (ip.is_unspecified or ip.is_multicast or ip.ipv4_mapped)),
)
servers = st.builds(TransportAddress.of, addresses, st.integers(1, 65535))


@given(st.lists(servers, min_size=1, max_size=MAX_SERVERS, unique=True))
def test_a_written_list_reads_back_as_it_was(listed):
    assert parse_servers(",".join(format_server(s) for s in listed)) == tuple(listed)


@given(st.text(max_size=80))
def test_any_text_is_a_list_or_a_bad_server_list_error(text):
    try:
        parsed = parse_servers(text)
    except BadServerList as exc:
        assert str(exc)
    else:
        assert 1 <= len(parsed) <= MAX_SERVERS
        for server in parsed:
            assert 1 <= server.port <= 65535 and not ipaddress.ip_address(server.ip).is_unspecified
