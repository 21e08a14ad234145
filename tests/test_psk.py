"""Per-pair preshared keys from the coordinator: the derivation, the secret file, and the
``preshared-keys`` call over HTTP (two replicas on one store, a fake clock): both ends get
the same key, nobody else gets it, bad bodies are JSON errors naming the field, the
feature off says so, and the keys appear nowhere else."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from coordinator_server import ADMIN_TOKEN, Server, Watch, new_public_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_coordinator_fuzz import json_values

from pywg.manage.key import Key
from pywg.manage.types import InvalidConfig
from pywg.mesh import credentials, psk
from pywg.mesh.coordinator import Config, Limits
from pywg.mesh.store import NodeRequest

PATH = "/api/v1/nodes/{}/preshared-keys"
BIN = Path(sys.executable).parent


def config(secret: psk.PskSecret | None) -> Config:
    return Config(admin_token_digest=credentials.digest(ADMIN_TOKEN),
                  limits=Limits(per_address_rate=1e6, per_address_burst=1e6, per_key_rate=1e6, per_key_burst=1e6),
                  poll_interval=0.05, preshared_secret=secret)


@pytest.fixture
def secret() -> psk.PskSecret:
    return psk.PskSecret(os.urandom(32))


@pytest.fixture(params=["sqlite", "postgresql"])
def replicas(request, tmp_path, secret):
    """Two coordinators on one store (a SQLite file, a database on the tests' PostgreSQL),
    given the same secret."""
    target = tmp_path / "c.db" if request.param == "sqlite" else request.getfixturevalue("postgres").database()
    a = Server(target, config(secret))
    b = Server(target, config(secret))
    yield a, b
    a.stop()
    b.stop()


def join(server: Server, name: str, key: str) -> dict:
    public = new_public_key()
    node = server.register(name, key, publicKey=public)
    return {**node, "publicKey": public}


def ask(server: Server, node: dict, *peers: dict, token: str | None = None):
    body = {"peers": [{"nodeId": p["id"], "publicKey": p["publicKey"]} for p in peers]}
    return server.call("POST", PATH.format(node["id"]), body, token=token or node["token"])


def the_key(server: Server, node: dict, peer: dict) -> str:
    status, answer, hdrs = ask(server, node, peer)
    assert status == 200, answer
    assert hdrs.get("Cache-Control") == "no-store"
    assert answer["publicKey"] == node["publicKey"]
    [item] = answer["presharedKeys"]
    assert (item["nodeId"], item["publicKey"]) == (peer["id"], peer["publicKey"])
    return str(item["presharedKey"])


# --- the derivation -------------------------------------------------------------------------


def test_a_pair_key_is_the_same_both_ways_and_differs_by_pair_and_secret(secret):
    a, b, c = (secrets.token_hex(8) for _ in range(3))
    ab = secret.pair_key(a, b)
    assert ab == secret.pair_key(b, a) and not ab.is_zero()
    assert len({ab, secret.pair_key(a, c), secret.pair_key(b, c)}) == 3
    assert psk.PskSecret(os.urandom(32)).pair_key(a, b) != ab
    # The documented construction: HMAC-SHA256(secret, label || len || id || len || id), ids sorted.
    lo, hi = sorted((a, b))
    text = psk.LABEL + b"".join(len(i).to_bytes(2, "big") + i.encode() for i in (lo, hi))
    assert bytes(ab) == hmac.new(secret.raw, text, hashlib.sha256).digest()
    # Ids are length-prefixed: ("ab", "c") and ("a", "bc") cannot collide.
    assert secret.pair_key("ab", "c") != secret.pair_key("a", "bc")
    with pytest.raises(ValueError):
        secret.pair_key(a, a)
    # The secret's id names it (the same secret, the same id) and tells nothing of it.
    assert secret.id == psk.PskSecret(secret.raw).id != psk.PskSecret(os.urandom(32)).id
    assert len(secret.id) == 16 and secret.id not in secret.raw.hex()


def test_the_secret_never_shows_itself(secret):
    assert secret.raw.hex() not in repr(secret) and base64.b64encode(secret.raw).decode() not in repr(secret)
    assert "hidden" in repr(config(secret)) and secret.raw.hex() not in repr(config(secret))


# --- the secret file ------------------------------------------------------------------------


def test_the_secret_file_is_0600_never_overwritten_and_others_readable_is_refused(tmp_path):
    path = tmp_path / "psk.secret"
    old = os.umask(0)
    try:
        psk.create_secret_file(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = psk.load_secret_file(str(path))
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        psk.create_secret_file(str(path))
    assert path.read_bytes() == before and psk.load_secret_file(str(path)).raw == first.raw
    other = tmp_path / "other"
    psk.create_secret_file(str(other))
    assert psk.load_secret_file(str(other)).raw != first.raw
    os.chmod(path, 0o640)
    with pytest.raises(psk.SecretFileError, match="chmod 600"):
        psk.load_secret_file(str(path))
    bad = tmp_path / "bad"
    for content in ("", "not base64!\n", base64.b64encode(b"x" * 31).decode()):
        bad.unlink(missing_ok=True)
        fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, content.encode())
        os.close(fd)
        with pytest.raises(psk.SecretFileError, match="32 random bytes") as err:
            psk.load_secret_file(str(bad))
        assert not content or content.strip() not in str(err.value)
    with pytest.raises(psk.SecretFileError, match="No such file"):
        psk.load_secret_file(str(tmp_path / "missing"))


def test_the_cli_makes_a_secret_and_serve_refuses_a_readable_one(tmp_path):
    path = tmp_path / "s"
    pywg = str(BIN / "pywg")
    made = subprocess.run([pywg, "coordinator", "psk-secret", "create", str(path)], check=False, capture_output=True, text=True)
    assert made.returncode == 0 and stat.S_IMODE(path.stat().st_mode) == 0o600
    again = subprocess.run([pywg, "coordinator", "psk-secret", "create", str(path)], check=False, capture_output=True, text=True)
    assert again.returncode == 1 and "not overwritten" in again.stderr
    secret_text = path.read_text().strip()
    assert secret_text not in made.stderr + made.stdout + again.stderr
    os.chmod(path, 0o644)
    serve = subprocess.run([pywg, "coordinator", "serve", "--listen", "127.0.0.1:0", "--store",
                            f"sqlite:{tmp_path / 'c.db'}", "--preshared-keys", str(path)],
                           check=False, capture_output=True, text=True, timeout=30)
    assert serve.returncode == 2 and "--preshared-keys" in serve.stderr and "0644" in serve.stderr
    assert secret_text not in serve.stderr


# --- over HTTP ------------------------------------------------------------------------------


def test_both_ends_get_the_same_key_from_either_replica_and_pairs_differ(replicas, secret):
    one, two = replicas
    key = one.authkey()
    a, b, c = join(one, "a", key), join(two, "b", key), join(one, "c", key)
    ab = the_key(one, a, b)
    assert the_key(two, b, a) == ab  # the other end, the other replica
    assert the_key(two, a, b) == ab
    ac, bc = the_key(one, a, c), the_key(two, b, c)
    assert len({ab, ac, bc}) == 3
    assert Key.parse(ab) == secret.pair_key(a["id"], b["id"])
    # Time passing changes nothing (the key is derived, not issued).
    one.clock.now += 86400 * 30
    assert the_key(one, a, b) == ab
    # A batch answers in the order asked.
    status, answer, _ = ask(one, c, b, a)
    assert status == 200 and [p["presharedKey"] for p in answer["presharedKeys"]] == [bc, ac]


def test_nobody_else_gets_a_pair_key(replicas):
    one, _ = replicas
    key = one.authkey()
    a, b, c = join(one, "a", key), join(one, "b", key), join(one, "c", key)
    ab = the_key(one, a, b)
    # C cannot act as A, the admin is in no pair, no token is no answer.
    status, err, _ = ask(one, a, b, token=c["token"])
    assert (status, err["field"]) == (403, "id")
    status, err, _ = ask(one, a, b, token=ADMIN_TOKEN)
    assert (status, err["field"]) == (403, "id")
    assert ask(one, a, b, token="pywg-node-" + "x" * 43)[0] == 401
    status, err, _ = one.call("POST", PATH.format(a["id"]), {"peers": []})
    assert (status, err["field"]) == (401, "Authorization")
    # What C can get is its own pairs, none of them A-B's key.
    status, answer, _ = ask(one, c, a, b)
    assert status == 200 and ab not in {p["presharedKey"] for p in answer["presharedKeys"]}


def test_gone_nodes_changed_keys_and_oneself_are_refused_by_field(replicas, secret):
    one, _ = replicas
    key = one.authkey()
    a, b, c = join(one, "a", key), join(one, "b", key), join(one, "c", key)
    assert one.call("DELETE", f"/api/v1/nodes/{c['id']}", token=ADMIN_TOKEN)[0] == 200
    status, err, _ = ask(one, a, b, c)
    assert (status, err["field"]) == (404, "peers[1].nodeId") and c["id"] in err["error"]
    status, err, _ = ask(one, a, {**b, "publicKey": new_public_key()})
    assert (status, err["field"]) == (409, "peers[0].publicKey")
    status, err, _ = ask(one, a, b, a)
    assert (status, err["field"]) == (400, "peers[1].nodeId")
    # An empty list is a probe: the feature is on.
    status, answer, _ = ask(one, a)
    assert status == 200 and answer == {"publicKey": a["publicKey"], "secretId": secret.id, "presharedKeys": []}


def test_a_node_with_a_new_key_keeps_its_pair_keys_and_a_stale_key_is_refused(replicas):
    """A key rotation (PUT /api/v1/nodes/{id}/key) or a renewed SVID with a new key keeps
    the node id, so its peers rename it in place with the same preshared key; whoever asks
    with the old key learns that it is stale (409)."""
    one, _ = replicas
    a = join(one, "a", one.authkey())
    first = one.store.register_spiffe(NodeRequest(name="s", public_key=Key.generate_private().public_key()),
                                      "spiffe://example.org/s", now=one.clock.now)
    s1 = {"id": first.node.id, "token": first.token, "publicKey": first.node.public_key.to_base64()}
    before = the_key(one, s1, a)
    again = one.store.register_spiffe(NodeRequest(name="s", public_key=Key.generate_private().public_key()),
                                      "spiffe://example.org/s", now=one.clock.now)
    s2 = {"id": again.node.id, "token": again.token, "publicKey": again.node.public_key.to_base64()}
    assert s2["id"] == s1["id"] and s2["publicKey"] != s1["publicKey"]
    assert the_key(one, s2, a) == before == the_key(one, a, s2)
    status, err, _ = ask(one, a, s1)  # A still asking with the old key
    assert (status, err["field"]) == (409, "peers[0].publicKey")
    # Removed and registered again: a new id, a new key for every pair.
    assert one.call("DELETE", f"/api/v1/nodes/{s2['id']}", token=ADMIN_TOKEN)[0] == 200
    back = one.store.register_spiffe(NodeRequest(name="s", public_key=Key.generate_private().public_key()),
                                     "spiffe://example.org/s", now=one.clock.now)
    s3 = {"id": back.node.id, "token": back.token, "publicKey": back.node.public_key.to_base64()}
    assert s3["id"] != s1["id"] and the_key(one, s3, a) != before


def test_off_the_call_says_so_and_the_rest_works(tmp_path):
    server = Server(tmp_path / "c.db", config(None))
    try:
        key = server.authkey()
        a, b = join(server, "a", key), join(server, "b", key)
        status, err, _ = ask(server, a, b)
        assert status == 501 and "--preshared-keys" in err["error"] and err["field"] == ""
        assert server.call("GET", "/api/v1/topology", token=a["token"])[0] == 200
    finally:
        server.stop()


BAD_BODIES = [
    (b"[]", ""),
    (b"{", ""),
    (b'{"peers": [], "peers": []}', "peers"),
    (b"{}", "peers"),
    (b'{"peers": {}}', "peers"),
    (b'{"peers": [], "x": 1}', "x"),
    (b'{"peers": [1]}', "peers[0]"),
    (b'{"peers": [{"publicKey": "K"}]}', "peers[0].nodeId"),
    (b'{"peers": [{"nodeId": 7, "publicKey": "K"}]}', "peers[0].nodeId"),
    (b'{"peers": [{"nodeId": "", "publicKey": "K"}]}', "peers[0].nodeId"),
    (b'{"peers": [{"nodeId": "a\\u0000b", "publicKey": "K"}]}', "peers[0].nodeId"),
    (b'{"peers": [{"nodeId": "ab"}]}', "peers[0].publicKey"),
    (b'{"peers": [{"nodeId": "ab", "publicKey": "nope"}]}', "peers[0].publicKey"),
    (b'{"peers": [{"nodeId": "ab", "publicKey": "K", "presharedKey": "K"}]}', "peers[0].presharedKey"),
    (b'{"peers": [{"nodeId": "ab", "publicKey": "K"}, {"nodeId": "ab", "publicKey": "K"}]}', "peers[1].nodeId"),
]


def test_bad_bodies_are_json_errors_naming_the_field_and_the_server_keeps_serving(replicas):
    one, _ = replicas
    key = one.authkey()
    a, b = join(one, "a", key), join(one, "b", key)
    for raw, field in BAD_BODIES:
        raw = raw.replace(b'"K"', json.dumps(b["publicKey"]).encode())
        status, err, _ = one.call("POST", PATH.format(a["id"]), raw=raw, token=a["token"])
        assert (status, err["field"]) == (400, field), (raw, err)
    many = {"peers": [{"nodeId": f"n{i}", "publicKey": b["publicKey"]} for i in range(psk.MAX_PEERS + 1)]}
    status, err, _ = one.call("POST", PATH.format(a["id"]), many, token=a["token"])
    assert (status, err["field"]) == (400, "peers") and str(psk.MAX_PEERS) in err["error"]
    status, err, _ = one.call("POST", PATH.format(a["id"]), raw=b"x" * (70 * 1024), token=a["token"])
    assert status == 413
    assert the_key(one, a, b)


def test_pair_keys_appear_in_no_other_answer_and_no_log(replicas, caplog):
    import asyncio

    one, _ = replicas
    caplog.set_level(logging.DEBUG)
    key = one.authkey()
    a, b = join(one, "a", key), join(one, "b", key)
    ab = the_key(one, a, b)
    ba = the_key(one, b, a)
    seen = [json.dumps(one.call("GET", "/api/v1/topology", token=ADMIN_TOKEN)[1])]

    async def snapshot() -> dict:
        async with Watch(one.url, a["token"], None) as w:
            return await w.next()

    seen.append(json.dumps(asyncio.run(snapshot())))
    store = str(one.path) if str(one.path).startswith("postgresql:") else f"sqlite:{one.path}"
    nodes = subprocess.run([str(BIN / "pywg"), "coordinator", "nodes", "--store", store, "--json"],
                           check=False, capture_output=True, text=True)
    assert nodes.returncode == 0
    seen += [nodes.stdout, caplog.text]
    for text in seen:
        assert ab not in text and ba not in text


# --- the reader, fuzzed -----------------------------------------------------------------------

items = st.fixed_dictionaries({}, optional={
    "nodeId": st.text(max_size=70) | json_values,
    "publicKey": st.builds(new_public_key) | st.text(max_size=50) | json_values,
}) | st.dictionaries(st.sampled_from(["nodeId", "publicKey", "x"]), json_values, max_size=3) | json_values
bodies = st.fixed_dictionaries({"peers": st.lists(items, max_size=6) | json_values}) \
    | st.dictionaries(st.sampled_from(["peers", "x"]) | st.text(max_size=6), json_values, max_size=3)


@settings(max_examples=500, deadline=None)
@given(bodies)
def test_any_psk_body_is_a_request_or_an_error_naming_a_field(body):
    try:
        peers = psk.read_psk_request(body)
    except InvalidConfig as exc:
        item = re.fullmatch(r"peers\[(\d+)\](\..*)?", exc.field, re.DOTALL)
        if item:
            assert int(item.group(1)) < len(body["peers"])
        else:
            assert exc.field == "peers" or (exc.field in body and exc.field != "peers"), exc.field
        return
    assert isinstance(body["peers"], list) and len(peers) == len(body["peers"])
    assert len({p.node_id for p in peers}) == len(peers)
    for peer, item in zip(peers, body["peers"], strict=True):
        assert peer.node_id == item["nodeId"] and peer.public_key.to_base64() == item["publicKey"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("pskfuzz") / "c.db", config(psk.PskSecret(os.urandom(32))))
    key = s.authkey()
    s.pair = (join(s, "a", key), join(s, "b", key))  # type: ignore[attr-defined]
    yield s
    s.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies, st.booleans())
def test_over_http_any_psk_body_is_keys_or_a_json_error_and_the_server_keeps_serving(fuzz_server, body, real_peer):
    a, b = fuzz_server.pair
    if real_peer and isinstance(body.get("peers"), list):
        body = {**body, "peers": [*body["peers"], {"nodeId": b["id"], "publicKey": b["publicKey"]}]}
    status, answer, _ = fuzz_server.call("POST", PATH.format(a["id"]), raw=json.dumps(body).encode(), token=a["token"])
    if status == 200:
        assert [p["nodeId"] for p in answer["presharedKeys"]] == [p["nodeId"] for p in body["peers"]]
    else:
        assert status in (400, 404, 409) and set(answer) == {"error", "field"}, (status, answer)
        # It names the field (a field may be called ""), or "" for a body that is not JSON (Infinity).
        assert answer["field"] or "" in body or answer["error"].startswith("invalid JSON"), answer
    assert the_key(fuzz_server, a, b)  # still serving, the same pair still answered
