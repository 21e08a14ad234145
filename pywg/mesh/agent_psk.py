"""The agent's side of per-pair preshared keys (the coordinator's: :mod:`pywg.mesh.psk_api`).

:class:`PairKeys` decides, for the peer changes of one push, which preshared key each peer
gets, asking the coordinator for the keys it does not know yet in one request (batches of
``psk.MAX_PEERS``). The rule: a peer is added or changed only once its key is known. When
the coordinator has the feature on, that is the pair's key; when it answers 501 (off), no
key, and peers that had one lose it. A peer whose key cannot be had now (the coordinator
unreachable, the peer gone or re-keyed meanwhile) is held back: left as it is on the
interface (or not added yet), and the caller tries again later. A peer whose key is
unchanged is not touched, so its sessions stay.

What the device has is remembered per peer (``installed``), and what the coordinator
answered per node (``known``; a pair's key is by node ids, so a peer renamed to its node's
new key keeps it) with the answer's ``secretId``. After a restart every key is asked;
after a reconnect, whether the feature is on and the secret the same (one request with an
empty list), every key again only if not. Only peers whose key differs from the device's
are updated.
Nothing here logs a key; :class:`PairKeys` has no repr of its keys.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pywg.manage.key import InvalidKey, Key
from pywg.mesh import psk
from pywg.mesh.reconcile import PeerChange, PeerSpec

log = logging.getLogger(__name__)
Post = Callable[[dict[str, Any]], Awaitable[tuple[int, Any]]]
_PEER_FIELD = re.compile(r"peers\[(\d+)\]\.(?:nodeId|publicKey)")


class PskUnavailable(Exception):
    """The coordinator's preshared-key answer could not be had or read (try again later)."""


@dataclass(frozen=True)
class Fetched:
    enabled: bool
    keys: dict[str, Key] = field(default_factory=dict)  # peer public key -> its pair key
    refused: frozenset[str] = frozenset()  # peers the coordinator does not know (so) now
    secret_id: str = ""  # names the coordinator's secret (the keys change with it)


async def fetch(post: Post, peers: Sequence[tuple[str, str]]) -> Fetched:
    """The pair keys of this node with ``peers`` (node id, public key); an empty list only
    asks whether the feature is on and with which secret. Raises PskUnavailable."""
    todo = list(peers)
    keys: dict[str, Key] = {}
    refused: set[str] = set()
    secret_id: str | None = None
    first = True
    while todo or first:
        first = False
        batch = todo[:psk.MAX_PEERS]
        status, data = await post({"peers": [{"nodeId": i, "publicKey": k} for i, k in batch]})
        if status == 501:
            return Fetched(enabled=False)
        culprit = _PEER_FIELD.fullmatch(data.get("field", "")) if isinstance(data, dict) else None
        if status in (404, 409) and culprit and int(culprit.group(1)) < len(batch):
            gone = batch[int(culprit.group(1))]
            refused.add(gone[1])
            todo.remove(gone)
            continue
        if status != 200:
            reason = data.get("error") if isinstance(data, dict) else None
            raise PskUnavailable(f"the coordinator answered {status}: {reason or data!r:.200}")
        keys.update(_read_answer(data, batch))
        if secret_id not in (None, data.get("secretId")):
            raise PskUnavailable("the coordinator's secret changed while the keys were fetched")
        secret_id = data.get("secretId")
        todo = todo[len(batch):]
    return Fetched(enabled=True, keys=keys, refused=frozenset(refused), secret_id=str(secret_id))


def _read_answer(data: Any, batch: Sequence[tuple[str, str]]) -> dict[str, Key]:
    if not isinstance(data, dict) or not isinstance(data.get("presharedKeys"), list):
        raise PskUnavailable("the coordinator's answer has no presharedKeys array")
    if not isinstance(data.get("secretId"), str):
        raise PskUnavailable("the coordinator's answer has no secretId")
    items = data["presharedKeys"]
    if len(items) != len(batch):
        raise PskUnavailable(f"asked for {len(batch)} preshared keys, got {len(items)}")
    out: dict[str, Key] = {}
    for (node_id, public), item in zip(batch, items, strict=True):
        if not isinstance(item, dict) or item.get("nodeId") != node_id or item.get("publicKey") != public:
            raise PskUnavailable(f"the answer for node {node_id} is for another node or key")
        try:
            key = Key.parse(item.get("presharedKey"))  # type: ignore[arg-type]
        except (InvalidKey, TypeError, AttributeError):
            raise PskUnavailable(f"the preshared key for node {node_id} is not a key") from None
        if key.is_zero():
            raise PskUnavailable(f"the preshared key for node {node_id} is all zeros")
        out[public] = key
    return out


def http_post(session: aiohttp.ClientSession, url: str, token: str, ssl: Any) -> Post:
    """A :data:`Post` to the coordinator's preshared-keys call at ``url``."""
    async def post(body: dict[str, Any]) -> tuple[int, Any]:
        try:
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, ssl=ssl,
                                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                return resp.status, data
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PskUnavailable(f"the coordinator is unreachable ({exc or type(exc).__name__})") from None
    return post


class Retry:
    """Runs ``fn`` again later, once per :meth:`schedule` not yet pending: after ``first``
    seconds, doubling up to ``most`` until :meth:`reset`. A failure of ``fn`` is logged."""

    def __init__(self, fn: Callable[[], Awaitable[None]], first: float = 1.0, most: float = 30.0) -> None:
        self.fn, self.first, self.most = fn, first, most
        self.delay = first
        self._task: asyncio.Task[None] | None = None

    def schedule(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._later(), name="pywg-agent-psk-retry")

    async def _later(self) -> None:
        await asyncio.sleep(self.delay)
        self._task = None  # from here, fn's own hold schedules the next try
        self.delay = min(self.delay * 2, self.most)
        try:
            await self.fn()
        except Exception:  # the next push or retry tries again
            log.exception("applying the topology failed")

    def reset(self) -> None:
        self.delay = self.first

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


class PairKeys:
    """The preshared keys of this agent's peers: on the device, and as the coordinator gave them."""

    def __init__(self) -> None:
        self.enabled: bool | None = None  # None: to be asked (at start and after a reconnect)
        self.installed: dict[str, Key | None] = {}  # peer public key -> the device's key
        self.known: dict[str, Key] = {}  # peer node id -> the pair key (a pair's key is by node ids)
        self.secret_id: str | None = None  # the coordinator's secret the known keys are from
        self._ids: Mapping[str, str] = {}  # peer public key -> node id, as of the last push

    def __repr__(self) -> str:
        return f"PairKeys(enabled={self.enabled}, peers={len(self.installed)})"

    def forget(self) -> None:
        """Ask again whether the feature is on, and with which secret (after a reconnect:
        the coordinator may have been restarted with the feature off, on, or another
        secret; with another secret every key is fetched again)."""
        self.enabled = None

    def on_device(self, public_key: str, key: Key | None) -> None:
        """Record the key a peer has (the device's, or one just configured)."""
        self.installed[public_key] = key

    def removed(self, public_key: str) -> None:
        """A peer left the device (removed, or renamed to its node's new key)."""
        self.installed.pop(public_key, None)

    def key_for(self, public_key: str) -> Key | None:
        """The key to configure a peer with (once :meth:`prepare` let it through)."""
        node_id = self._ids.get(public_key)
        return self.known.get(node_id) if self.enabled and node_id is not None else None

    def _ready(self, public_key: str) -> bool:
        if self.enabled is None:
            return False
        return not self.enabled or self._ids.get(public_key) in self.known

    async def prepare(self, post: Post, changes: list[PeerChange], current: Mapping[str, PeerSpec],
                      desired: Mapping[str, PeerSpec], node_ids: Mapping[str, str]) -> tuple[list[PeerChange], set[str]]:
        """The changes to make now (``changes`` without the held-back peers, plus updates
        of unchanged peers whose key is to change) and the public keys held back
        (``node_ids``: public key -> node id of the pushed nodes). Each change's key is then
        :meth:`key_for` its spec's key; the caller reports what it configured (:meth:`on_device`)."""
        self._ids = dict(node_ids)
        ids = set(node_ids.values())
        self.known = {i: k for i, k in self.known.items() if i in ids}  # nodes gone: their keys too

        def need() -> list[tuple[str, str]]:
            return [(node_ids[k], k) for k in desired if k in node_ids and node_ids[k] not in self.known]

        if self.enabled is None or (self.enabled and need()):
            try:
                got = await fetch(post, need())
                if got.enabled and got.secret_id != self.secret_id and self.known:
                    self.known.clear()  # another secret: every key is another
                    got = await fetch(post, need())
            except PskUnavailable:
                pass  # held back below; the caller tries again
            else:
                self.enabled = got.enabled
                self.secret_id = got.secret_id if got.enabled else None
                if not got.enabled:
                    self.known.clear()
                self.known.update({node_ids[k]: key for k, key in got.keys.items()})

        def target(c: PeerChange) -> str:  # the key a change configures (a rename's new one)
            return c.spec.public_key if c.spec is not None else c.public_key

        held = {target(c) for c in changes if c.op != "remove" and not self._ready(target(c))}
        touched = {c.public_key for c in changes} | {target(c) for c in changes}
        rekeyed = [PeerChange("update", k, desired[k]) for k in desired
                   if k in current and k not in touched and self._ready(k)
                   and self.installed.get(k) != self.key_for(k)]
        return [c for c in changes if target(c) not in held] + rekeyed, held
