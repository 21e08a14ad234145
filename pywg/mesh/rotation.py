"""Mesh-wide key rotation by the agent: ``pywg agent rotate`` and ``--rotate-every``.

The order of steps (node N rotates; R is each of its peers), and why no packet is lost:

1. N makes a new key and keeps it in its KeyStore as ``wireguard.next``, with a journal
   (:mod:`pywg.mesh.rotation_journal`). The private key never leaves N.
2. N's device accepts handshakes addressed to the new key too
   (``pywg_secondary_private_key``); it still initiates with the old one. Nothing else
   changes: every session goes on. Its DERP relay connects under the new key too (the
   node key is the WireGuard key): a relayed peer that learns it reaches N there, and N
   answers each peer from the key that peer last sent to (``pywg.device.relay_keys``).
3. N tells the coordinator (``PUT /api/v1/nodes/{id}/key``; retried with backoff while the
   coordinator is unreachable: the state meanwhile is step 2's, consistent and lossless).
   The coordinator logs one node.changed and pushes it to every agent.
4. Each R gets the push and renames its peer N in place (``pywg_rename_to``: the same peer,
   its sessions, endpoint and counters, now answering to N's new key), then starts a
   handshake with N's new key (``pywg_rekey``). N accepts it (step 2): a handshake with R
   completed after step 3 is N's evidence that R has the new key. R's traffic never
   stops: the sessions in place carry it until the new handshake replaces them.
5. N waits until it has seen its own change pushed and such a handshake from every
   online peer (bounded: ``confirm_timeout``; a peer that did not confirm in time is
   logged and still covered by step 6).
6. N promotes the new key (``pywg_promote_secondary``, sessions kept): it initiates with
   the new key, the old one is still accepted; the KeyStore's ``wireguard`` becomes the new
   key (the old one is ``wireguard.previous``). ``pywg agent rotate`` prints the new key.
   A peer N never heard from over DERP is sent to from the new key from now on.
7. After ``overlap`` seconds N drops the old key (and its DERP connection). A handshake initiated to the old key
   by a peer that had not renamed yet is answered until then; a session never depends on
   the key it was made with once it exists, so even that peer's traffic flows until its
   session would expire (REJECT_AFTER_TIME, 180 s), by which time it has the push.

A crash or a restart at any point: see :mod:`pywg.mesh.rotation_journal` (the agent
finishes the rotation). A refusal by the coordinator (400/409, or the node is gone) undoes
steps 1-2: the new key is dropped, nothing else had changed.

Against a device that is not pywg (wireguard-go: no secondary key) the rotation is the
plain one: N announces, waits for the push, then sets the new ``private_key`` (its
sessions end; traffic resumes after one handshake).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp

from pywg.manage.key import Key
from pywg.manage.keymanager import DEFAULT_OVERLAP, RotationSchedule
from pywg.manage.keystore import KeyStoreError
from pywg.mesh import device_keys
from pywg.mesh.control import ControlError, ControlServer
from pywg.mesh.rotation_journal import KEY_ID, PREPARED, PROMOTED, Journal, RotationState

if TYPE_CHECKING:
    from pywg.mesh.agent import Agent

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT = 20.0  # step 5's bound
PUSH_TIMEOUT = 10.0  # how long N waits to see its own change come back on the watch
POLL = 0.1
RETRY_MAX = 5.0  # backoff cap while the coordinator is unreachable
SCHEDULE_RETRY = 60.0  # after a failed scheduled rotation


class RotationError(Exception):
    """A rotation that could not be done; ``field`` names what was at fault (a JSON
    error's field)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class _Refused(Exception):
    """The coordinator refused the new key (4xx): the rotation is undone."""


def _public(key: Key) -> str:
    return key.public_key().to_base64()


class Rotator:
    """One agent's rotations: on request, on a schedule (``every`` seconds of key age), and
    the one a restart finds in the journal."""

    def __init__(self, agent: Agent, *, every: float | None = None, overlap: float = DEFAULT_OVERLAP,
                 confirm_timeout: float = CONFIRM_TIMEOUT, clock: Callable[[], float] = time.time) -> None:
        if every is not None and not (math.isfinite(every) and every > 0):
            raise ValueError(f"every must be a positive number of seconds, got {every!r}")
        self.agent = agent
        self.state = RotationState(agent.state_dir)
        self.every = every
        self.overlap = overlap
        self.confirm_timeout = confirm_timeout
        self.clock = clock
        self.journal: Journal | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._drop: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Rotator({self.agent.config.interface!r}, every={self.every!r})"

    @property
    def _iface(self) -> str:
        return self.agent.config.interface

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For status.json: the key's creation time, the next scheduled rotation, and the
        rotation in progress (public keys and times only)."""
        out: dict[str, Any] = {"rotateEvery": self.every, "keyCreatedAt": None, "nextRotationAt": None,
                               "rotation": None if self.journal is None else
                               {k: self.journal.to_json()[k] for k in ("phase", "newPublicKey", "dropAt")},
                               "lastRotationError": self.last_error}
        with contextlib.suppress(KeyStoreError, OSError):
            created = self.state.keys.key_info(KEY_ID).created
            out["keyCreatedAt"] = created
            if self.every is not None:
                out["nextRotationAt"] = self._due(created)
        return out

    def _due(self, created: float) -> float:
        assert self.every is not None
        return RotationSchedule(self.every, jitter=0.0, alert_lead=0.0).rotate_at(created, u=0.0)

    # --- start-up -------------------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> tuple[ControlServer, asyncio.Task[None]]:
        """Once the interface is up: the control socket (``pywg agent rotate``) and the
        rotation task (the rotation a restart found, then the schedule). The caller cancels
        the task and closes the socket."""
        async def rotate(args: dict[str, Any]) -> dict[str, Any]:
            task = asyncio.create_task(self.rotate(session, overlap=args.get("overlap")))
            try:
                return {"publicKey": await asyncio.shield(task)}  # a client gone: the rotation goes on
            except RotationError as exc:
                raise ControlError(str(exc), exc.field) from None

        async def rotations() -> None:
            try:
                await self.resume(session)
            except (RotationError, device_keys.DeviceKeyError) as exc:
                log.error("finishing the key rotation in progress failed: %s", exc)
            await self.schedule(session)

        control = ControlServer(self.agent.state_dir, {"rotate": rotate})
        await control.start()
        return control, asyncio.create_task(rotations())

    def recover_keys(self) -> None:
        """Before the agent loads its key: the keystore as the journal says."""
        self.journal = self.state.recover_keys()

    async def resume(self, session: aiohttp.ClientSession) -> None:
        """Once the interface is up: finish the rotation a restart found."""
        journal = self.journal
        if journal is None:
            return
        if journal.node_id != self.agent.node.get("id"):
            log.warning("a key rotation of another registration was in progress; abandoning it")
            async with self._lock:
                await self._undo()
            return
        log.info("finishing the key rotation in progress (phase %s)", journal.phase)
        async with self._lock:
            if journal.phase == PREPARED:
                await self._run(session, journal, self.state.next_key(), None)
                return
            new = self.state.current()
            device_key = await device_keys.private_public_key(self.agent.manager, self._iface)
            if device_key != journal.new_public_key:  # the device still initiates with the old key
                pywg = await device_keys.add_secondary(self.agent.manager, self._iface, new)
                await device_keys.promote(self.agent.manager, self._iface, new, pywg=pywg,
                                          rekey=self.agent.peers)
            self._drop = asyncio.create_task(self._drop_later(journal))

    # --- a rotation -------------------------------------------------------------------------------

    async def rotate(self, session: aiohttp.ClientSession, *, overlap: float | None = None,
                     on_in_use: Callable[[str], object] | None = None) -> str:
        """Rotate now (steps 1-6; the overlap then runs in the background); returns the new
        public key, once it is in use. Raises RotationError when it was refused (undone)."""
        overlap = self.overlap if overlap is None else overlap
        if not (math.isfinite(overlap) and 0 <= overlap <= 3600):
            raise RotationError(f"expected 0..3600 seconds, got {overlap!r}", "overlap")
        if self._lock.locked():
            phase = self.journal.phase if self.journal is not None else "starting"
            raise RotationError(f"a key rotation is in progress already (phase {phase}); "
                                "see `pywg agent status`", "rotation")
        async with self._lock:
            if not self.agent.node.get("id") or not self.agent.node.get("token"):
                raise RotationError("the agent is not registered yet", "node")
            await self._end_overlap()
            old = self.agent.identity_key
            new = Key.generate_private()
            journal = Journal(PREPARED, self.agent.node["id"], _public(old), _public(new), overlap, self.clock())
            await asyncio.to_thread(self.state.prepare, new, journal)
            self.journal = journal
            return await self._run(session, journal, new, on_in_use)

    async def _run(self, session: aiohttp.ClientSession, journal: Journal, new: Key,
                   on_in_use: Callable[[str], object] | None) -> str:
        manager, iface = self.agent.manager, self._iface
        try:
            pywg = await device_keys.add_secondary(manager, iface, new)
            if pywg:
                await self.agent.accept_key(new)  # on DERP under it before a peer learns it
            since = await self._announce(session, journal)
        except _Refused as exc:
            await self._undo()
            self.last_error = f"the coordinator refused the new key, the rotation is undone: {exc}"
            log.error("key rotation: %s", self.last_error)
            raise RotationError(self.last_error, "publicKey") from None
        except device_keys.DeviceKeyError as exc:
            await self._undo()
            self.last_error = f"the rotation is undone: {exc}"
            raise RotationError(self.last_error, "interface") from None
        pushed = await self._wait_pushed(journal.new_public_key)
        waiting = await self._wait_peers(since) if pywg else set()
        confirmed_in = self.clock() - since
        if waiting:
            log.warning("key rotation: no handshake with the new key from %d peer(s) within %.0f s; "
                        "promoting (the old key stays accepted for %.0f s)", len(waiting),
                        self.confirm_timeout, journal.overlap)
        promoted = replace(journal, phase=PROMOTED, drop_at=self.clock() + journal.overlap)
        await asyncio.to_thread(self.state.promote, promoted)
        self.journal = promoted
        self.agent.use_key(new)
        try:
            await device_keys.promote(manager, iface, new, pywg=pywg, rekey=waiting)
        except device_keys.DeviceKeyError as exc:  # the journal says promoted: a restart retries it
            self.last_error = str(exc)
            raise RotationError(f"the new key is announced and stored, but {exc}", "interface") from None
        log.info("key rotated: %s in use (%s; push %s; %d peer(s) handshook with it %.2f s after the "
                 "announcement, %d did not)", journal.new_public_key[:8],
                 "sessions kept" if pywg else "plain: the device is not pywg", "seen" if pushed else "not seen",
                 len(self._online_peers() - waiting), confirmed_in, len(waiting))
        if on_in_use is not None:
            on_in_use(journal.new_public_key)
        self._drop = asyncio.create_task(self._drop_later(promoted))
        await self.agent.write_status()
        return journal.new_public_key

    async def _announce(self, session: aiohttp.ClientSession, journal: Journal) -> float:
        """Step 3, retried with backoff until the coordinator answers; _Refused on a 4xx
        (or when the node was registered again meanwhile). Returns when the request that
        succeeded was sent (no peer had the key before)."""
        delay = 0.25
        public_key = journal.new_public_key
        while True:
            node = self.agent.node
            if node.get("id") != journal.node_id:
                raise _Refused("the node was removed (and registered again) meanwhile")
            sent = self.clock()
            url = f"{self.agent.coordinator}/api/v1/nodes/{node['id']}/key"
            try:
                async with session.put(url, json={"publicKey": public_key},
                                       headers={"Authorization": f"Bearer {node['token']}"},
                                       ssl=self.agent._ssl(), timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    data = await resp.json(content_type=None)
                    if resp.status == 200:
                        self.last_error = None
                        return sent
                    if 400 <= resp.status < 500:
                        detail = data.get("error", data) if isinstance(data, dict) else data
                        raise _Refused(f"{resp.status}: {detail}")
                    reason = f"HTTP {resp.status}"
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            log.warning("key rotation: the coordinator %s did not take the new key (%s); retrying",
                        self.agent.coordinator, reason)
            self.last_error = f"waiting for the coordinator: {reason}"
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _wait_pushed(self, public_key: str) -> bool:
        node_id = self.agent.node["id"]
        deadline = self.clock() + PUSH_TIMEOUT
        while self.clock() < deadline:
            if self.agent.view.nodes.get(node_id, {}).get("publicKey") == public_key:
                return True
            await asyncio.sleep(POLL)
        return False

    def _online_peers(self) -> set[str]:
        me = self.agent.node.get("id")
        return {n["publicKey"] for n in self.agent.view.nodes.values()
                if n.get("id") != me and n.get("online", True) and n["publicKey"] in self.agent.peers}

    async def _wait_peers(self, since: float) -> set[str]:
        """Step 5: the online peers with no handshake completed since ``since`` when the
        wait ended (empty: all confirmed)."""
        deadline = self.clock() + self.confirm_timeout
        while True:
            waiting = self._online_peers()
            with contextlib.suppress(Exception):
                stats = await self.agent.manager.get_stats(self._iface)
                for p in stats.peers:
                    if p.last_handshake is not None and p.last_handshake.timestamp() >= since:
                        waiting.discard(p.public_key.to_base64())
            if not waiting or self.clock() >= deadline:
                return waiting
            await asyncio.sleep(POLL)

    async def _drop_later(self, journal: Journal) -> None:
        try:
            await asyncio.sleep(max(0.0, (journal.drop_at or 0.0) - self.clock()))
            await self._finish()
        except device_keys.DeviceKeyError as exc:
            self.last_error = str(exc)
            log.error("key rotation: ending the overlap failed: %s", exc)

    async def _finish(self) -> None:
        await device_keys.drop_secondary(self.agent.manager, self._iface)
        self.agent.drop_accepted_key()
        await asyncio.to_thread(self.state.finish)
        self.journal = None
        self.last_error = None
        log.info("key rotation done: the old key is no longer accepted")
        with contextlib.suppress(Exception):
            await self.agent.write_status()

    async def _end_overlap(self) -> None:
        """A previous rotation's overlap ends now (before a new rotation starts)."""
        task, self._drop = self._drop, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._finish()

    async def _undo(self) -> None:
        with contextlib.suppress(device_keys.DeviceKeyError, OSError):
            await device_keys.drop_secondary(self.agent.manager, self._iface)
        self.agent.drop_accepted_key()
        await asyncio.to_thread(self.state.abandon)
        self.journal = None

    # --- the schedule ---------------------------------------------------------------------------

    async def schedule(self, session: aiohttp.ClientSession) -> None:
        """Rotate whenever the key is ``every`` seconds old (its age from the KeyStore's
        metadata, so a restart keeps the schedule); never during an overlap."""
        if self.every is None:
            return
        while True:
            if self._drop is not None and not self._drop.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._drop)
                continue
            if not (self.agent.connected and self.agent.view.synced):  # peers known, pushes flowing
                await asyncio.sleep(1.0)
                continue
            try:
                created = await asyncio.to_thread(lambda: self.state.keys.key_info(KEY_ID).created)
            except (KeyStoreError, OSError) as exc:
                log.error("key rotation schedule: cannot read the key's age: %s", exc)
                await asyncio.sleep(SCHEDULE_RETRY)
                continue
            wait = self._due(created) - self.clock()
            if wait > 0:
                await asyncio.sleep(min(wait, 60.0))
                continue
            try:
                await self.rotate(session)
            except RotationError as exc:
                self.last_error = str(exc)
                log.error("scheduled key rotation failed (retrying in %.0f s): %s", SCHEDULE_RETRY, exc)
                await asyncio.sleep(min(SCHEDULE_RETRY, self.every))
