"""The agent's decision logic: watch messages -> mesh view -> peer changes."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.mesh.reconcile import (
    BadMessage,
    MeshView,
    PeerSpec,
    apply_message,
    apply_plan,
    desired_peers,
    plan,
)

SELF_ID, SELF_KEY = "n-self", base64.b64encode(b"\x01" * 32).decode()


def key(i: int) -> str:
    return base64.b64encode(bytes([i + 2]) * 32).decode()


def node(i: int, port: int = 51820, key_of: int | None = None) -> dict[str, object]:
    return {"id": f"n{i}", "name": f"n{i}", "publicKey": key(i if key_of is None else key_of),
            "internalIp": f"100.64.0.{i + 2}", "internalIpv6": f"fd7a::{i + 2:x}",
            "endpoints": [f"10.0.0.{i + 2}:{port}"], "region": "", "online": True}


def snapshot(revision: int, nodes: list[dict[str, object]]) -> dict[str, object]:
    return {"type": "snapshot", "revision": revision, "nodes": nodes, "connections": []}


def test_snapshot_gives_every_other_node_as_a_peer() -> None:
    view = MeshView()
    me = {**node(9), "id": SELF_ID, "publicKey": SELF_KEY}
    apply_message(view, snapshot(3, [node(0), node(1), me]))
    peers = desired_peers(view, SELF_ID, SELF_KEY, keepalive=25)
    assert set(peers) == {key(0), key(1)}
    assert peers[key(0)] == PeerSpec(key(0), ("100.64.0.2/32", "fd7a::2/128"), "10.0.0.2:51820", 25)


def test_unchanged_peers_are_left_alone_and_changed_ones_updated() -> None:
    view = MeshView()
    apply_message(view, snapshot(1, [node(0), node(1)]))
    have = desired_peers(view, SELF_ID, SELF_KEY)
    apply_message(view, {"type": "change", "revision": 2, "kind": "node.changed", "nodeId": "n1", "node": node(1, port=4000)})
    apply_message(view, {"type": "change", "revision": 3, "kind": "node.added", "nodeId": "n2", "node": node(2)})
    apply_message(view, {"type": "change", "revision": 4, "kind": "node.removed", "nodeId": "n0", "node": {"id": "n0"}})
    changes = plan(have, desired_peers(view, SELF_ID, SELF_KEY))
    assert [(c.op, c.public_key) for c in changes] == [("remove", key(0)), ("update", key(1)), ("add", key(2))]


def test_old_revisions_are_ignored() -> None:
    view = MeshView()
    apply_message(view, snapshot(5, [node(0)]))
    assert not apply_message(view, {"type": "change", "revision": 5, "kind": "node.removed", "nodeId": "n0"})
    assert "n0" in view.nodes


@pytest.mark.parametrize("msg", [
    {}, {"type": "snapshot"}, {"type": "snapshot", "revision": 1, "nodes": {}},
    {"type": "snapshot", "revision": 1, "nodes": [{"id": 3}]},
    {"type": "change", "revision": True, "kind": "node.added"},
    {"type": "change", "revision": 2, "kind": "node.added", "node": {"id": "x"}},
    {"type": "change", "revision": 2, "kind": "node.removed"},
    {"type": "nonsense", "revision": 2},
])
def test_malformed_messages_raise_and_change_nothing(msg: dict[str, object]) -> None:
    view = MeshView()
    apply_message(view, snapshot(1, [node(0)]))
    before = (view.revision, dict(view.nodes))
    with pytest.raises(BadMessage):
        apply_message(view, msg)
    assert (view.revision, view.nodes) == before


# A delta is (kind, node index, variant): variants change the endpoint or the key.
deltas = st.lists(st.tuples(st.sampled_from(["node.added", "node.changed", "node.removed", "connection.changed"]),
                            st.integers(0, 5), st.integers(0, 3)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), unique=True), deltas, st.integers(0, 40))
def test_any_sequence_of_deltas_converges_to_the_final_topology(start: list[int], seq: list[tuple[str, int, int]],
                                                                 reconnect_at: int) -> None:
    """Applying the plan after every delta (with a reconnect that resumes by snapshot
    somewhere along the way) ends with the same peers as planning the final topology at once."""
    truth: dict[str, dict[str, object]] = {f"n{i}": node(i) for i in start}
    view = MeshView()
    apply_message(view, snapshot(1, list(truth.values())))
    peers = apply_plan({}, plan({}, desired_peers(view, SELF_ID, SELF_KEY)))
    for rev, (kind, i, variant) in enumerate(seq, start=2):
        nid = f"n{i}"
        if kind == "node.removed":
            truth.pop(nid, None)
            msg: dict[str, object] = {"type": "change", "revision": rev, "kind": kind, "nodeId": nid, "node": {"id": nid}}
        elif kind == "connection.changed":
            msg = {"type": "change", "revision": rev, "kind": kind, "nodeId": nid, "connection": {}}
        else:
            truth[nid] = node(i, port=51820 + variant, key_of=i + 6 * (variant % 2))
            msg = {"type": "change", "revision": rev, "kind": kind, "nodeId": nid, "node": truth[nid]}
        if rev == reconnect_at:  # the watch dropped: the agent resumes from a fresh snapshot
            view.synced = False
            apply_message(view, snapshot(rev, list(truth.values())))
        else:
            apply_message(view, msg)
            apply_message(view, msg)  # a replayed message changes nothing
        peers = apply_plan(peers, plan(peers, desired_peers(view, SELF_ID, SELF_KEY)))
    final = MeshView()
    apply_message(final, snapshot(len(seq) + 1, list(truth.values())))
    assert peers == desired_peers(final, SELF_ID, SELF_KEY)
    assert plan(peers, desired_peers(final, SELF_ID, SELF_KEY)) == []


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_fuzzed_messages_raise_bad_message_or_apply(msg: object) -> None:
    view = MeshView()
    if not isinstance(msg, dict):
        return
    try:
        apply_message(view, msg)
    except BadMessage:
        return
    desired_peers(view, SELF_ID, SELF_KEY)
