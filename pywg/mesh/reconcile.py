"""The agent's decisions, sans-I/O: the coordinator's watch messages fold into a mesh
view, the view gives the peers this node wants, and a plan turns the peers it has into
those (add, update, rename, remove; unchanged peers are left alone so their sessions stay;
a node that rotated its key is renamed in place, so its sessions stay too).

Messages are the watch WebSocket's JSON objects: ``{"type": "snapshot", "revision",
"nodes", "connections"}`` and ``{"type": "change", "revision", "kind", "nodeId", ...}``.
Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pywg.mesh.store import NODE_ADDED, NODE_CHANGED, NODE_REMOVED

MAX_NODES = 65_536  # bound on the view an outsider's pushes can grow


class BadMessage(ValueError):
    """A watch message this agent cannot read (dropped and counted by the caller)."""


@dataclass(frozen=True)
class PeerSpec:
    """One peer as the interface should have it."""

    public_key: str  # base64
    allowed_ips: tuple[str, ...]  # the peer's mesh addresses as /32 and /128
    endpoint: str | None  # "host:port", the first candidate; None when it has none
    persistent_keepalive: int = 0
    node_id: str | None = field(default=None, compare=False)  # None: read back from the device


@dataclass(frozen=True)
class PeerChange:
    """``op`` is "add", "update", "rename" or "remove"; ``spec`` is None for a removal. A
    rename: the peer ``public_key`` becomes ``spec`` (its node rotated its key)."""

    op: str
    public_key: str
    spec: PeerSpec | None = None


@dataclass
class MeshView:
    """The nodes as this agent last heard them, and the revision it has seen."""

    revision: int = 0
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    synced: bool = False  # True once a snapshot arrived


def _node(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("id"), str) or not value["id"]:
        raise BadMessage("a node without an id")
    if not isinstance(value.get("publicKey"), str):
        raise BadMessage("a node without a publicKey")
    return value


def apply_message(view: MeshView, msg: Mapping[str, Any]) -> bool:
    """Fold one watch message into ``view``; True when the nodes changed. Old revisions
    (already seen) are ignored; a malformed message raises BadMessage and changes nothing."""
    kind = msg.get("type")
    revision = msg.get("revision")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise BadMessage("a message without a revision")
    if kind == "snapshot":
        nodes_in = msg.get("nodes")
        if not isinstance(nodes_in, list) or len(nodes_in) > MAX_NODES:
            raise BadMessage("a snapshot without a nodes array")
        nodes = {n["id"]: n for n in (_node(v) for v in nodes_in)}
        changed = nodes != view.nodes
        view.nodes = nodes
        view.revision = revision
        view.synced = True
        return changed
    if kind == "settings":
        return False  # the coordinator's STUN servers, DERP map, NAT observer: not the view's
    if kind != "change":
        raise BadMessage(f"unknown message type {kind!r}")
    if revision <= view.revision:
        return False
    change = msg.get("kind")
    changed = False
    if change in (NODE_ADDED, NODE_CHANGED):
        node = _node(msg.get("node"))
        if node["id"] not in view.nodes and len(view.nodes) >= MAX_NODES:
            raise BadMessage("too many nodes")
        changed = view.nodes.get(node["id"]) != node
        view.nodes[node["id"]] = node
    elif change == NODE_REMOVED:
        node_id = msg.get("nodeId")
        if not isinstance(node_id, str):
            raise BadMessage("a removal without a nodeId")
        changed = view.nodes.pop(node_id, None) is not None
    view.revision = revision  # connection.* and unknown kinds only move the revision
    return changed


def _host_prefix(text: object) -> str | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return f"{ip}/{ip.max_prefixlen}"


def desired_peers(view: MeshView, self_id: str, self_key: str, *, keepalive: int = 25,
                  endpoints: Mapping[str, str | None] | None = None) -> dict[str, PeerSpec]:
    """The peers this node wants: every other node (not itself, not its own key), allowed
    IPs = its mesh addresses, endpoint = its first candidate, or, for a peer in
    ``endpoints`` (public key -> "host:port"; NAT traversal runs for it), the path the
    traversal confirmed (None while there is none)."""
    out: dict[str, PeerSpec] = {}
    for node_id in sorted(view.nodes):
        node = view.nodes[node_id]
        key = node["publicKey"]
        if node_id == self_id or key == self_key:
            continue
        ips = tuple(p for p in (_host_prefix(node.get("internalIp")), _host_prefix(node.get("internalIpv6"))) if p)
        if not ips:
            continue
        advertised = node.get("endpoints")
        endpoint = (advertised[0] if isinstance(advertised, list) and advertised and isinstance(advertised[0], str)
                    else None)
        if endpoints is not None and key in endpoints:
            endpoint = endpoints[key]
        out[key] = PeerSpec(public_key=key, allowed_ips=ips, endpoint=endpoint, persistent_keepalive=keepalive,
                            node_id=node_id)
    return out


def _renames(current: Mapping[str, PeerSpec], desired: Mapping[str, PeerSpec]) -> dict[str, str]:
    """Old key -> new key for the nodes that rotated: a peer going and one coming for the
    same node id (or, for a peer read back from the device, the same mesh addresses)."""
    coming = {spec.node_id: k for k, spec in desired.items() if k not in current}
    by_ips = {spec.allowed_ips: k for k, spec in desired.items() if k not in current}
    out: dict[str, str] = {}
    for key in sorted(current):
        if key in desired:
            continue
        spec = current[key]
        new = coming.get(spec.node_id) if spec.node_id is not None else by_ips.get(spec.allowed_ips)
        if new is not None and new not in out.values():
            out[key] = new
    return out


def plan(current: Mapping[str, PeerSpec], desired: Mapping[str, PeerSpec]) -> list[PeerChange]:
    """The changes that make ``current`` into ``desired``: removals first (a key moving
    between nodes frees its addresses), then renames (a node's new key), updates, then
    additions; equal peers untouched."""
    renames = _renames(current, desired)
    changes = [PeerChange("remove", k) for k in sorted(current) if k not in desired and k not in renames]
    changes += [PeerChange("rename", old, desired[new]) for old, new in renames.items()]
    changes += [PeerChange("update", k, desired[k]) for k in sorted(desired) if k in current and current[k] != desired[k]]
    renamed = set(renames.values())
    changes += [PeerChange("add", k, desired[k]) for k in sorted(desired) if k not in current and k not in renamed]
    return changes


def apply_plan(current: Mapping[str, PeerSpec], changes: list[PeerChange]) -> dict[str, PeerSpec]:
    """What the peer set becomes once ``changes`` are applied (for tests and dry runs)."""
    out = dict(current)
    for change in changes:
        if change.op in ("remove", "rename"):
            out.pop(change.public_key, None)
        if change.op != "remove":
            assert change.spec is not None
            out[change.spec.public_key] = change.spec
    return out
