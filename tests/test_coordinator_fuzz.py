"""Hypothesis against the coordinator's request validation: any JSON (or any bytes) is
either a valid request or an InvalidConfig naming a field; over HTTP, a 4xx JSON error
with "error" and "field", and the server goes on serving."""

from __future__ import annotations

import json

import pytest
from coordinator_server import Server, new_public_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywg.manage.types import InvalidConfig
from pywg.mesh import wire

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(wire.REGISTER_FIELDS) | st.text(max_size=12)
plausible = {
    "name": st.from_regex(r"[a-z0-9-]{0,70}", fullmatch=True) | json_values,
    "publicKey": st.builds(new_public_key) | st.text(max_size=50) | json_values,
    "discoKey": st.builds(new_public_key) | st.none() | json_values,
    "endpoints": st.lists(st.from_regex(r"(\d{1,3}\.){3}\d{1,3}:\d{1,6}|\[[0-9a-f:]{2,20}\]:\d{1,5}", fullmatch=True),
                          max_size=20) | json_values,
    "region": st.text(max_size=80) | json_values,
    "authKey": st.text(max_size=80) | json_values,
}
register_bodies = st.fixed_dictionaries(
    {}, optional={k: v for k, v in plausible.items()}
) | st.dictionaries(field_names, json_values, max_size=7)


@settings(max_examples=400, deadline=None)
@given(register_bodies)
def test_any_register_body_is_a_request_or_an_error_naming_a_field(body):
    try:
        req = wire.read_register(body)
    except InvalidConfig as exc:
        assert isinstance(exc.field, str) and exc.reason
        if exc.field:
            # The field is one the body has (an unknown one by its own name), a path into
            # one (endpoints[3]), or a required one that is missing.
            assert any(exc.field == k or exc.field.startswith(k + "[") for k in body) or (
                exc.field in wire.REGISTER_FIELDS and "missing" in exc.reason
            ), (exc.field, exc.reason)
        return
    assert wire._NAME.fullmatch(req.node.name) and len(req.node.endpoints) <= wire.MAX_ENDPOINTS
    assert req.node.public_key.to_base64() == body["publicKey"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_bytes_parse_to_an_object_or_an_invalid_config(raw):
    try:
        data = wire.parse_body(raw)
    except InvalidConfig:
        return
    assert isinstance(data, dict)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["connections", "x"]), st.lists(
    st.fixed_dictionaries({}, optional={"to": st.sampled_from(["n1", "n2", ""]) | json_values,
                                        "status": st.sampled_from(["connected", "connecting", "bad"]),
                                        "viaRelay": json_values, "latencyUs": json_values,
                                        "from": st.sampled_from(["me", "n1"])}), max_size=3) | json_values,
    max_size=2))
def test_any_health_body_is_connections_from_the_node_or_an_error(body):
    try:
        conns = wire.read_health(body, "me").connections
    except InvalidConfig as exc:
        assert isinstance(exc.field, str)
        return
    assert all(c.from_node == "me" or c.from_node == "n1" for c in conns)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fuzz") / "c.db")
    s.good_key = s.authkey()  # type: ignore[attr-defined]
    yield s
    s.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(register_bodies, st.booleans())
def test_over_http_every_bad_registration_is_a_json_error_and_the_server_keeps_serving(server, body, with_key):
    if with_key:
        body = {**body, "authKey": server.good_key}
    status, answer, _ = server.call("POST", "/api/v1/register", raw=json.dumps(body).encode())
    if status == 201:
        assert server.store.node(answer["id"]).name == body["name"]
    else:
        assert status in (400, 401, 409) and set(answer) == {"error", "field"}, (status, answer)
    assert server.call("GET", "/api/v1/topology", token="nope")[0] == 401  # still serving
