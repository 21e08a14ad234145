"""Key rotation's logic, without namespaces: a node's new key is a rename in the agent's
plan (never a remove + add), the rotation journal makes the keystore consistent after a
crash at any step, and the control socket refuses bad requests naming the field."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reconcile import SELF_ID, SELF_KEY, key, node

from pywg.manage.key import Key
from pywg.mesh import control
from pywg.mesh.reconcile import MeshView, PeerSpec, apply_message, apply_plan, desired_peers, plan
from pywg.mesh.rotation_journal import (
    KEY_ID,
    NEXT_ID,
    PREPARED,
    PREVIOUS_ID,
    PROMOTED,
    Journal,
    RotationState,
)


def view_of(*nodes: dict[str, object]) -> MeshView:
    view = MeshView()
    apply_message(view, {"type": "snapshot", "revision": 1, "nodes": list(nodes), "connections": []})
    return view


# --- the plan: a rotated node is renamed -------------------------------------------------------


def test_a_node_with_a_new_key_is_renamed_in_place() -> None:
    have = desired_peers(view_of(node(0), node(1)), SELF_ID, SELF_KEY)
    want = desired_peers(view_of(node(0), node(1, key_of=7)), SELF_ID, SELF_KEY)
    changes = plan(have, want)
    assert [(c.op, c.public_key, c.spec and c.spec.public_key) for c in changes] == [("rename", key(1), key(7))]
    assert apply_plan(have, changes) == want


def test_after_a_restart_the_peer_read_from_the_device_is_matched_by_its_addresses() -> None:
    want_before = desired_peers(view_of(node(0), node(1)), SELF_ID, SELF_KEY)
    from_device = {k: PeerSpec(s.public_key, s.allowed_ips, s.endpoint, s.persistent_keepalive)
                   for k, s in want_before.items()}  # no node ids: what ensure_interface reads back
    want = desired_peers(view_of(node(0, key_of=8), node(1)), SELF_ID, SELF_KEY)
    assert [(c.op, c.public_key) for c in plan(from_device, want)] == [("rename", key(0))]


def test_a_node_replaced_by_another_is_a_removal_and_an_addition() -> None:
    have = desired_peers(view_of(node(0), node(1)), SELF_ID, SELF_KEY)
    other = {**node(2), "publicKey": key(9)}
    want = desired_peers(view_of(node(0), other), SELF_ID, SELF_KEY)
    assert sorted((c.op, c.public_key) for c in plan(have, want)) == [("add", key(9)), ("remove", key(1))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), unique=True, min_size=1), st.data())
def test_any_set_of_rotations_is_only_renames(nodes: list[int], data: st.DataObject) -> None:
    rotating = data.draw(st.lists(st.sampled_from(nodes), unique=True))
    have = desired_peers(view_of(*(node(i) for i in nodes)), SELF_ID, SELF_KEY)
    want = desired_peers(view_of(*(node(i, key_of=i + 10 if i in rotating else None) for i in nodes)),
                         SELF_ID, SELF_KEY)
    changes = plan(have, want)
    assert {c.op for c in changes} <= {"rename"}
    assert sorted(c.public_key for c in changes) == sorted(key(i) for i in rotating)
    assert apply_plan(have, changes) == want


# --- the journal: a crash at any step ------------------------------------------------------------


def _state(tmp_path: Path) -> tuple[RotationState, Key]:
    tmp_path.chmod(0o700)
    state = RotationState(tmp_path)
    old = Key.generate_private()
    state.store.store_private_key(KEY_ID, old)
    return state, old


def _journal(old: Key, new: Key, phase: str = PREPARED) -> Journal:
    return Journal(phase, "n1", old.public_key().to_base64(), new.public_key().to_base64(), 15.0, 1000.0,
                   None if phase == PREPARED else 1015.0)


def test_a_new_key_stored_without_its_journal_is_deleted(tmp_path: Path) -> None:
    state, old = _state(tmp_path)
    state.store.store_private_key(NEXT_ID, Key.generate_private())  # the crash came before the journal
    assert state.recover_keys() is None
    assert state.store.list_ids() == [KEY_ID] and state.current() == old


def test_a_prepared_rotation_keeps_the_old_key_in_use_and_is_resumed(tmp_path: Path) -> None:
    state, old = _state(tmp_path)
    new = Key.generate_private()
    state.prepare(new, _journal(old, new))
    journal = state.recover_keys()
    assert journal is not None and journal.phase == PREPARED
    assert state.current() == old and state.next_key() == new
    text = (tmp_path / "rotation.json").read_text()
    assert new.to_base64() not in text and old.to_base64() not in text  # public keys only
    assert stat.S_IMODE(os.stat(tmp_path / "rotation.json").st_mode) == 0o600
    state.abandon()  # refused by the coordinator: undone
    assert state.store.list_ids() == [KEY_ID] and state.current() == old and state.load() is None


def test_a_promotion_cut_short_is_completed_on_restart(tmp_path: Path) -> None:
    state, old = _state(tmp_path)
    new = Key.generate_private()
    state.prepare(new, _journal(old, new))
    state.save(_journal(old, new, PROMOTED))  # the journal was written, the swap not done: a crash
    journal = state.recover_keys()
    assert journal is not None and journal.phase == PROMOTED
    assert state.current() == new and state.store.load_private_key(PREVIOUS_ID) == old
    assert NEXT_ID not in state.store.list_ids()
    assert state.keys.key_info(KEY_ID).public_key == new.public_key()  # its age counts from the swap
    assert state.recover_keys() == journal  # twice: the same
    state.finish()
    assert state.store.list_ids() == [KEY_ID] and state.load() is None and state.current() == new


@pytest.mark.parametrize("text", ["", "{", "[]", '{"phase": "later"}', json.dumps(
    {"phase": "prepared", "nodeId": "n", "oldPublicKey": "x", "newPublicKey": "y", "overlap": 1, "startedAt": 1})])
def test_an_unreadable_journal_is_set_aside(tmp_path: Path, text: str) -> None:
    state, old = _state(tmp_path)
    (tmp_path / "rotation.json").write_text(text)
    assert state.recover_keys() is None
    assert (tmp_path / "rotation.json.bad").read_text() == text and state.current() == old


# --- the control socket --------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=80), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["op", "overlap", "x"]) | st.text(max_size=4),
                                                        c, max_size=3), max_leaves=8).map(
    lambda v: json.dumps(v).encode())))
def test_a_control_request_parses_or_names_the_field(raw: bytes) -> None:
    try:
        op, args = control.parse_request(raw)
    except control.ControlError as exc:
        assert exc.reason and isinstance(exc.field, str)
    else:
        assert op == "rotate" and set(args) <= {"overlap"}
        assert args.get("overlap") is None or 0 <= args["overlap"] <= 3600


def test_the_control_socket_is_private_refuses_bad_requests_and_keeps_serving(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    seen: list[dict[str, object]] = []

    async def rotate(args: dict[str, object]) -> dict[str, object]:
        seen.append(args)
        return {"publicKey": "k"}

    async def scenario() -> None:
        server = control.ControlServer(tmp_path, {"rotate": rotate})
        await server.start()
        try:
            path = tmp_path / control.SOCKET_NAME
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

            async def raw(line: bytes) -> dict[str, object]:
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(line)
                await writer.drain()
                answer = json.loads(await reader.readline())
                writer.close()
                return answer  # type: ignore[no-any-return]

            for line, field in ((b"nonsense\n", "request"), (b'{"op": "explode"}\n', "op"),
                                (b'{"op": "rotate", "overlap": -1}\n', "overlap"),
                                (b'{"op": "rotate", "overlap": NaN}\n', "request"),
                                (b'{"op": "rotate", "force": true}\n', "force"),
                                (b"x" * 10_000 + b"\n", "request")):
                answer = await raw(line)
                assert answer["ok"] is False and answer["field"] == field, (line[:30], answer)
            assert seen == []  # nothing reached the handler
            answer = await asyncio.to_thread(control.request, tmp_path, {"op": "rotate", "overlap": 2}, 5)
            assert answer == {"ok": True, "publicKey": "k"} and seen == [{"overlap": 2.0}]
        finally:
            await server.close()
        assert not (tmp_path / control.SOCKET_NAME).exists()

    asyncio.run(scenario())
    with pytest.raises(control.NoAgent):
        control.request(tmp_path, {"op": "rotate"}, 1)
