"""The DERP map: Tailscale's DERPMap JSON in, typed regions and nodes out, every fault
named by its field path; and how a node becomes dial targets (TLS, pins, plain HTTP)."""

from __future__ import annotations

import copy
import json
import ssl
from typing import Any

import pytest

from pywg.derp import NodePrivateKey
from pywg.derp.derpmap import DerpMapError, parse_derp_map
from pywg.device.derp_client import DerpRelayClient, DialTarget

NOTE_EXAMPLE = ('{"Regions":{"900":{"RegionID":900,"RegionCode":"lab","RegionName":"Lab",'
                '"Nodes":[{"Name":"900a","RegionID":900,"HostName":"derp.lab.example",'
                '"IPv4":"192.0.2.10","IPv6":"none","STUNPort":3478,"DERPPort":443,"CanPort80":true}]}},'
                '"omitDefaultRegions":true}')

TWO_REGIONS: dict[str, Any] = {
    "HomeParams": {"RegionScore": {"901": 0.8}},
    "Regions": {
        "900": {"RegionID": 900, "RegionCode": "lab", "RegionName": "Lab", "Latitude": 48.1, "Longitude": 11,
                "Nodes": [{"Name": "900s", "RegionID": 900, "HostName": "stun.lab", "STUNOnly": True},
                          {"Name": "900a", "RegionID": 900, "HostName": "a.lab", "IPv4": "10.0.0.1",
                           "IPv6": "fd00::1", "DERPPort": 3340, "STUNPort": -1,
                           "CertName": "sha256-raw:" + "ab" * 32}]},
        "901": {"RegionID": 901, "RegionCode": "two", "NoMeasureNoHome": True,
                "Nodes": [{"Name": "901a", "RegionID": 901, "HostName": "b.lab", "InsecureForTests": True}]},
    },
}


def test_the_notes_example() -> None:
    derp_map = parse_derp_map(NOTE_EXAMPLE)
    assert derp_map.omit_default_regions and derp_map.region_score is None
    region = derp_map.regions[900]
    assert (region.region_code, region.region_name) == ("lab", "Lab")
    (node,) = region.nodes
    assert node.name == "900a" and node.host_name == "derp.lab.example" and node.can_port80
    assert node.port == 443 and node.stun == 3478
    assert node.dial_addresses() == ["192.0.2.10"]  # IPv6 "none": that family is off
    assert parse_derp_map(derp_map.to_json()) == derp_map
    assert json.loads(NOTE_EXAMPLE) == derp_map.to_json()


def test_two_regions_defaults_and_round_trip() -> None:
    derp_map = parse_derp_map(TWO_REGIONS)
    lab, two = derp_map.regions[900], derp_map.regions[901]
    assert [n.name for n in lab.derp_nodes] == ["900a"]  # the STUN-only node relays nothing
    node = lab.derp_nodes[0]
    assert node.port == 3340 and node.stun is None and node.dial_addresses() == ["fd00::1", "10.0.0.1"]
    assert two.no_measure_no_home and two.nodes[0].port == 443 and two.nodes[0].stun == 3478
    assert two.nodes[0].dial_addresses() == ["b.lab"]  # no literal IPs: resolve the name
    assert derp_map.region_score == {901: 0.8}
    assert derp_map.node("901a") is two.nodes[0] and derp_map.node("nope") is None
    assert parse_derp_map(json.dumps(derp_map.to_json())) == derp_map


def test_keys_match_case_insensitively_as_go_decodes() -> None:
    lowered = json.loads(json.dumps(TWO_REGIONS).replace('"HostName"', '"hostname"')
                         .replace('"RegionID"', '"regionid"'))
    assert parse_derp_map(lowered) == parse_derp_map(TWO_REGIONS)


def broken(path: list[str | int], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(TWO_REGIONS)
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


@pytest.mark.parametrize(("doc", "field", "words"), [
    (broken(["Regions", "900", "Nodes", 1, "HostName"], KeyError), "Regions.900.Nodes[1].HostName",
     "required"),
    (broken(["Regions", "900", "Nodes", 1, "HostName"], ""), "Regions.900.Nodes[1].HostName", "empty"),
    (broken(["Regions", "900", "Nodes", 1, "Name"], KeyError), "Regions.900.Nodes[1].Name", "required"),
    (broken(["Regions", "900", "Nodes", 1, "DERPPort"], "443"), "Regions.900.Nodes[1].DERPPort", "int"),
    (broken(["Regions", "900", "Nodes", 1, "DERPPort"], 70000), "Regions.900.Nodes[1].DERPPort", "0..65535"),
    (broken(["Regions", "900", "Nodes", 1, "STUNPort"], -2), "Regions.900.Nodes[1].STUNPort", "-1..65535"),
    (broken(["Regions", "900", "Nodes", 1, "STUNOnly"], 1), "Regions.900.Nodes[1].STUNOnly", "bool"),
    (broken(["Regions", "900", "Nodes", 1, "DERPPort"], True), "Regions.900.Nodes[1].DERPPort", "int"),
    (broken(["Regions", "900", "Nodes", 1, "IPv4"], "fd00::9"), "Regions.900.Nodes[1].IPv4", "IPv4"),
    (broken(["Regions", "900", "Nodes", 1, "RegionID"], 901), "Regions.900.Nodes[1].RegionID", "901"),
    (broken(["Regions", "900", "Nodes", 1, "Name"], "901a"), "Regions.901.Nodes[0].Name", "901a"),
    (broken(["Regions", "900", "RegionID"], 902), "Regions.900.RegionID", "key"),
    (broken(["Regions", "900", "RegionID"], KeyError), "Regions.900.RegionID", "required"),
    (broken(["Regions", "900", "Nodes"], {"a": 1}), "Regions.900.Nodes", "list"),
    (broken(["Regions", "900", "Nodes", 0], "node"), "Regions.900.Nodes[0]", "object"),
    (broken(["Regions", "901"], []), "Regions.901", "object"),
    (broken(["Regions", "abc"], {}), "Regions.abc", "RegionID"),
    (broken(["HomeParams", "RegionScore", "901"], 0), "HomeParams.RegionScore.901", "positive"),
    (broken(["HomeParams", "RegionScore", "x"], 1), "HomeParams.RegionScore.x", "RegionID"),
    (broken(["omitDefaultRegions"], "yes"), "omitDefaultRegions", "bool"),
    ("[1, 2]", "(map)", "object"),
    ("{not json", "(map)", "JSON"),
])
def test_faults_name_the_field(doc: Any, field: str, words: str) -> None:
    with pytest.raises(DerpMapError) as caught:
        parse_derp_map(doc if isinstance(doc, str) else json.dumps(doc))
    assert caught.value.field == field
    assert words in caught.value.detail
    assert str(caught.value).startswith(field + ": ")


def test_node_dial_targets() -> None:
    derp_map = parse_derp_map(TWO_REGIONS)
    pinned = DialTarget.for_node(derp_map.regions[900].derp_nodes[0])
    assert [t.host for t in pinned] == ["fd00::1", "10.0.0.1"]
    assert all(t.cert_sha256 == bytes.fromhex("ab" * 32) and t.port == 3340 for t in pinned)
    assert pinned[0].ssl is not None and pinned[0].ssl.verify_mode is ssl.CERT_NONE  # the pin is the check
    assert pinned[0].host_header == "a.lab:3340" and pinned[0].node_name == "900a"
    plain = DialTarget.for_node(derp_map.regions[900].derp_nodes[0], plain_http=True)
    assert all(t.ssl is None and t.cert_sha256 is None for t in plain)
    (insecure,) = DialTarget.for_node(derp_map.regions[901].nodes[0])
    assert insecure.ssl is not None and insecure.ssl.verify_mode is ssl.CERT_NONE
    assert insecure.host == "b.lab" and insecure.port == 443 and insecure.host_header == "b.lab"
    verified = parse_derp_map(NOTE_EXAMPLE).regions[900].nodes[0]
    (target,) = DialTarget.for_node(verified)
    assert target.ssl is not None and target.ssl.verify_mode is ssl.CERT_REQUIRED
    assert target.ssl.check_hostname and target.server_hostname == "derp.lab.example"
    assert target.host == "192.0.2.10"


def test_a_region_client_tries_relaying_nodes_in_order() -> None:
    derp_map = parse_derp_map(TWO_REGIONS)
    client = DerpRelayClient.for_region(NodePrivateKey.generate(), derp_map.regions[900], plain_http=True)
    assert [(t.node_name, t.host) for t in client.targets] == [("900a", "fd00::1"), ("900a", "10.0.0.1")]
    only_stun_nodes = [TWO_REGIONS["Regions"]["900"]["Nodes"][0]]
    stun_only = parse_derp_map(broken(["Regions", "900", "Nodes"], only_stun_nodes))
    with pytest.raises(ValueError, match="region 900: no DERP node"):
        DerpRelayClient.for_region(NodePrivateKey.generate(), stun_only.regions[900])
