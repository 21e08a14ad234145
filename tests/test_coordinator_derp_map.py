"""`pywg coordinator serve --derp-map FILE`: the real serve process hands the DERP map to
agents in the register response, the topology and the watch snapshot; a node's PUT of its
endpoints carries its home region, which its peers then see; a bad map is refused with a
message naming the field, before anything is started or written."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from test_coordinator_cli import Serve, post, pywg
from test_coordinator_stun import get, snapshot

from pywg.manage.key import Key

MAP = {"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "Nodes": [
    {"Name": "900a", "RegionID": 900, "HostName": "203.0.113.20", "IPv4": "203.0.113.20", "DERPPort": 3340}]}}}


def put(url: str, token: str, body: dict[str, object]) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


def test_the_derp_map_reaches_agents_and_the_home_region_reaches_peers(tmp_path):
    path = tmp_path / "derpmap.json"
    path.write_text(json.dumps(MAP))
    serve = Serve(tmp_path, "--derp-map", str(path))
    try:
        body = {"name": "alpha", "publicKey": Key.generate_private().public_key().to_base64(),
                "endpoints": ["192.0.2.9:51820"]}
        body["authKey"] = pywg("coordinator", "authkey", "create", "--store", serve.store, "--reusable").stdout.strip()
        status, node = post(serve.url + "/api/v1/register", body)
        assert status == 201, node
        regions = node["derpMap"]["Regions"]  # type: ignore[index]
        assert list(regions) == ["900"] and regions["900"]["Nodes"][0]["HostName"] == "203.0.113.20"
        token = str(node["token"])
        assert put(f"{serve.url}/api/v1/nodes/{node['id']}/endpoints", token,
                   {"endpoints": ["192.0.2.9:51820"], "region": "900"}) == 200
        topo = get(serve.url + "/api/v1/topology", token)
        assert topo["derpMap"] == node["derpMap"]
        assert [n["region"] for n in topo["nodes"]] == ["900"]  # type: ignore[index, union-attr]
        snap = asyncio.run(snapshot(serve.url, token))
        assert snap["derpMap"] == node["derpMap"]
        assert [n["region"] for n in snap["nodes"]] == ["900"]  # type: ignore[index, union-attr]
    finally:
        code, err = serve.stop()
    assert code == 0 and "Traceback" not in err


@pytest.mark.parametrize(("text", "named"), [
    ("{", "not JSON"),
    (json.dumps({"Regions": {"x": {}}}), "Regions.x"),
    (json.dumps({"Regions": {}}), "no regions"),
    (None, "No such file"),
])
def test_a_bad_derp_map_is_refused_by_name_and_nothing_is_started(tmp_path, text, named):
    store, admin, path = tmp_path / "c.db", tmp_path / "admin.token", tmp_path / "derpmap.json"
    if text is not None:
        path.write_text(text)
    result = pywg("coordinator", "serve", "--listen", "127.0.0.1:0", "--store", f"sqlite:{store}",
                  "--admin-token-file", str(admin), "--derp-map", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("pywg: --derp-map: ") and named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout
    assert not store.exists() and not admin.exists()  # nothing half-applied
