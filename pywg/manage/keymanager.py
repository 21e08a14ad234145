"""``KeyManager``: the spec's KeyManager: key pairs, secure storage, rotation without loss,
rotation scheduling and key-expiration alerts.

Operations (the spec's, in snake_case):

- ``generate_key_pair()`` -> (private Key, public Key);
- ``load_private_key(id)``, ``store_private_key(id, key)``: through a ``KeyStore``; storing
  also records the key's creation time (see *Metadata*);
- ``await rotate_keys(iface, peers=[(manager, iface), ...], overlap=...)`` -> the new
  public Key.

Rotation without loss
---------------------
Between pywg nodes (pywg's UAPI extension keys, ``pywg.uapi.protocol``), rotating the key
of node N drops no packet:

1. a new key is generated and stored (as ``iface``; the old one is kept as
   ``iface.previous``);
2. N: ``pywg_secondary_private_key=NEW``: N accepts handshakes addressed to the old or
   the new key, and still initiates with the old one;
3. each remote R in ``peers``: ``pywg_rename_to=NEW`` in N's peer section: the same peer
   (sessions, endpoint, allowed IPs, counters) answers to the new key;
4. N: ``pywg_promote_secondary=true``: N initiates with the new key, the old one is still
   accepted; with ``handshake=True`` N also starts a handshake with each remote
   (``pywg_rekey=true``), so the new key is in use at once;
5. after ``overlap`` seconds (waited for, or in the background with ``wait=False``) N
   drops the old key (``pywg_secondary_private_key`` all zeros).

No step ends a session: packets keep flowing on the sessions in place until handshakes
with the new key replace them. Between steps 3 and 4 a handshake that N initiates with
the old key is refused by a remote already renamed (it is retried after REKEY_TIMEOUT,
with the new key); the session in place carries the traffic meanwhile.

Against a non-pywg remote (wireguard-go, the kernel: they answer -22 to the extension
keys), the remote's peer is replaced instead: removed, and added with the new key and the
same preshared key, endpoint, keepalive and allowed IPs. Its sessions with N end, so
traffic stops until N's handshake with the new key (step 4) completes: the interruption
is bounded by one handshake (measured in tests/test_rotation.py). When N itself is not
pywg, the rotation is the plain one: the remotes learn the new key, then N gets it as its
``private_key`` (which ends N's sessions; its next packet makes a handshake).

A failure before step 4 undoes what was done (remotes renamed back or restored, N's
secondary key dropped, the keystore entry put back) and raises ``RotationFailed``.

The steps go over each interface's UAPI socket through the TunnelManager's backend (any
backend: in-process, a pywg daemon, wireguard-go), one request each.

Scheduling and alerts
---------------------
``RotationSchedule(max_age, jitter, alert_lead)``: a key expires ``max_age`` seconds after
its creation. It is due for rotation before the alert window opens, at a point spread
over the last ``jitter`` fraction of that time, derived from its public key (so different
nodes rotate at different times, and a node restarted computes the same time):

    expires_at = created + max_age
    rotate_at  = expires_at - alert_lead - jitter * max_age * u,  u in [0, 1)

``schedule_rotation(iface, schedule, peers=...)`` registers an interface; ``start()`` runs
the scheduler task (``run()``), which rotates keys when due and sends key-expiration
alerts: a ``KeyExpiring`` event, once, when ``alert_lead`` seconds are left (and once
more, ``expired=True``, at expiry), to the subscribers (``subscribe(callback)`` or
``alerts()``, an asyncio queue) plus a WARNING log line (without key material). While
rotation works, a key is replaced before its alert would fire; an alert means rotation is
off (``auto_rotate=False``) or failing. ``check()`` is one pass of the scheduler. The clock
(``clock``, UNIX seconds) and ``sleep`` are injectable for tests.

Metadata
--------
The creation time of a key is kept beside it in the keystore directory, in
``.<id>.meta`` (mode 0600, written atomically; a dot file, so never taken for a key):
``{"created": UNIX seconds, "publicKey": base64}``. The public key tells whether the
metadata still describes the key stored under that id; when it does not (or there is
none), the key file's modification time is taken (or, for a key that exists only as a
systemd credential, the time it was first seen) and recorded.

Secrets never appear in reprs, events, exceptions or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, Self

from pywg.manage.backends.base import BackendFailure, NotServed
from pywg.manage.key import Key
from pywg.manage.keystore import KeyNotFound, KeyStore, KeyStoreError, validate_key_id
from pywg.manage.uapi_client import errno_name, response_errno
from pywg.protocol.constants import REKEY_TIMEOUT
from pywg.uapi.protocol import (
    GET_REQUEST,
    IPC_ERROR_INVALID,
    UNCHANGED,
    AllowedIPChange,
    DeviceChanges,
    DeviceSnapshot,
    PeerChanges,
    PeerSnapshot,
    SetRequest,
    UapiError,
    format_set,
    parse_get,
    parse_prefix,
)

__all__ = [
    "DEFAULT_OVERLAP",
    "KeyExpiring",
    "KeyInfo",
    "KeyManager",
    "KeyManagerError",
    "RotationFailed",
    "RotationSchedule",
]

log = logging.getLogger(__name__)

#: How long the old key stays accepted after the new one is in use: long enough for a
#: handshake initiation sent to the old key just before a remote learnt the new one, and
#: its retransmissions (REKEY_TIMEOUT apart), to be answered.
DEFAULT_OVERLAP = 3 * REKEY_TIMEOUT
PREVIOUS_SUFFIX = ".previous"
META_SUFFIX = ".meta"
#: The scheduler re-reads the clock at least this often (the wall clock may jump).
MAX_SLEEP = 3600.0
#: After a failed scheduled rotation, try again this much later.
RETRY_AFTER = 300.0
DEFAULT_TIMEOUT = 30.0


# --- errors -----------------------------------------------------------------------------


class KeyManagerError(Exception):
    """Base of the KeyManager's errors (keystore errors are raised as they are)."""


class RotationFailed(KeyManagerError):
    """A rotation could not be carried out. ``undone``: whether everything it had changed
    was put back (else the message says what is left)."""

    def __init__(self, message: str, *, undone: bool = True) -> None:
        super().__init__(message)
        self.undone = undone


# --- schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationSchedule:
    """Maximum key age (seconds), the jitter fraction of it over which rotations are
    spread, and how long before expiry the alert fires (default: 5% of ``max_age``)."""

    max_age: float
    jitter: float = 0.1
    alert_lead: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_age) and self.max_age > 0):
            raise ValueError(f"max_age must be a positive number of seconds, got {self.max_age!r}")
        if not (0.0 <= self.jitter < 1.0):
            raise ValueError(f"jitter is a fraction in [0, 1), got {self.jitter!r}")
        if self.alert_lead is not None and not (0.0 <= self.alert_lead < self.max_age):
            raise ValueError(f"alert_lead must be in [0, max_age), got {self.alert_lead!r}")
        if self.max_age * (1.0 - self.jitter) - self.lead <= 0:
            raise ValueError("max_age * (1 - jitter) - alert_lead must be positive: "
                             "a key would be due for rotation as soon as it is made")

    @property
    def lead(self) -> float:
        """The alert lead time in seconds."""
        return self.max_age * 0.05 if self.alert_lead is None else self.alert_lead

    def expires_at(self, created: float) -> float:
        return created + self.max_age

    def alert_at(self, created: float) -> float:
        return created + self.max_age - self.lead

    def rotate_at(self, created: float, public_key: Key | bytes | None = None, *,
                  u: float | None = None) -> float:
        """When a key made at ``created`` is due: ``u`` in [0, 1) picks the point in the
        jitter window; by default it is derived from ``public_key`` (0 without one)."""
        if u is None:
            u = _unit(bytes(public_key)) if public_key is not None else 0.0
        if not 0.0 <= u < 1.0:
            raise ValueError(f"u must be in [0, 1), got {u!r}")
        return self.alert_at(created) - self.jitter * self.max_age * u


def _unit(data: bytes) -> float:
    """A number in [0, 1) derived from ``data`` (stable, evenly spread)."""
    digest = hashlib.blake2s(data, person=b"pywgrot1").digest()
    return int.from_bytes(digest[:7], "big") / float(1 << 56)


# --- events and metadata ----------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """What the manager knows of a stored key (no secret): its id, public key, creation
    time (UNIX seconds)."""

    key_id: str
    public_key: Key
    created: float


@dataclass(frozen=True)
class KeyExpiring:
    """A key-expiration alert: interface ``iface``'s key (stored as ``key_id``) expires
    at ``expires_at`` (UNIX seconds), ``seconds_left`` from the alert (negative: past);
    ``expired`` for the alert sent at expiry."""

    iface: str
    key_id: str
    public_key: Key
    created: float
    expires_at: float
    seconds_left: float
    expired: bool = False


AlertCallback = Callable[[KeyExpiring], object]
_Entry = tuple[Key | None, KeyInfo | None]  # a keystore entry as it was: (key, info) or (None, None)
_Saved = tuple[_Entry, _Entry]


class _Handle(Protocol):
    """What rotate_keys needs of a node: a TunnelManager (its exchange holds the interface's
    lock) or a backend itself."""

    async def exchange(self, name: str, request: str) -> str: ...


@dataclass
class _Plan:
    iface: str
    schedule: RotationSchedule
    peers: list[tuple[Any, str]]
    overlap: float
    auto_rotate: bool
    alerted: set[tuple[bytes, bool]] = field(default_factory=set)
    retry_at: float | None = None
    missing_logged: bool = False


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# --- UAPI nodes -------------------------------------------------------------------------


class _Node:
    """One interface reached through a manager's backend (or a backend): get and set."""

    def __init__(self, handle: Any, iface: str, timeout: float | None) -> None:
        # A TunnelManager's own exchange holds the interface's lock (serialized with its
        # calls); a bare backend is used as it is.
        if not callable(getattr(handle, "exchange", None)):
            raise TypeError(f"expected a TunnelManager or a backend, got {type(handle).__name__}")
        self.backend: _Handle = handle
        self.iface = iface
        self.timeout = timeout if timeout is not None else getattr(handle, "default_timeout", DEFAULT_TIMEOUT)

    def __repr__(self) -> str:
        return f"_Node({self.iface!r})"

    async def _exchange(self, text: str) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.backend.exchange(self.iface, text)
        except NotServed as exc:
            raise KeyManagerError(f"no interface {self.iface}: {exc.message}") from None
        except BackendFailure as exc:
            raise KeyManagerError(f"interface {self.iface}: {exc.message}") from None
        except UapiError as exc:
            raise KeyManagerError(f"interface {self.iface}: {exc.message}") from None
        except TimeoutError:
            raise KeyManagerError(f"interface {self.iface}: no answer within {self.timeout} s") from None

    async def get(self) -> DeviceSnapshot:
        text = await self._exchange(GET_REQUEST)
        try:
            return parse_get(text)
        except UapiError as exc:
            raise KeyManagerError(f"interface {self.iface}: bad get response: {exc.message}") from None

    async def set(self, request: SetRequest) -> int:
        """The request's errno (0: done; negative: refused)."""
        try:
            return response_errno(await self._exchange(format_set(request)))
        except UapiError as exc:
            raise KeyManagerError(f"interface {self.iface}: {exc.message}") from None

    async def must_set(self, request: SetRequest, what: str) -> None:
        code = await self.set(request)
        if code:
            raise KeyManagerError(f"interface {self.iface} refused to {what}: errno={code} ({errno_name(code)})")


def _public(private: bytes) -> bytes:
    return bytes(Key(private).public_key())


def _readd_section(peer: PeerSnapshot, public_key: bytes) -> PeerChanges:
    """A section adding ``public_key`` with ``peer``'s configuration."""
    return PeerChanges(
        public_key=public_key,
        preshared_key=peer.preshared_key if peer.preshared_key is not None else UNCHANGED,
        endpoint=peer.endpoint,
        persistent_keepalive=peer.persistent_keepalive or None,
        replace_allowed_ips=True,
        allowed_ips=tuple(AllowedIPChange(parse_prefix(net)) for net in peer.allowed_ips),
    )


# --- the manager ------------------------------------------------------------------------


class KeyManager:
    """Keys in ``keystore``; rotation through ``manager`` (a TunnelManager; None: storage
    only). ``clock``: UNIX seconds; ``sleep``: awaited for the overlap and by the scheduler."""

    def __init__(self, keystore: KeyStore, manager: Any | None = None, *,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 timeout: float | None = None) -> None:
        self.keystore = keystore
        self.manager = manager
        self.clock = clock
        self.sleep = sleep
        self.timeout = timeout
        self._plans: dict[str, _Plan] = {}
        self._subscribers: list[AlertCallback] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._drops: dict[str, asyncio.Task[None]] = {}
        self._scheduler: asyncio.Task[None] | None = None
        self._info_cache: dict[str, tuple[tuple[int, int, int] | None, KeyInfo]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return (f"KeyManager({self.keystore!r}, manager={self.manager!r}, "
                f"scheduled={sorted(self._plans)!r})")

    # --- keys and storage -------------------------------------------------------------

    @staticmethod
    def generate_key_pair() -> tuple[Key, Key]:
        """A new (private, public) key pair."""
        private = Key.generate_private()
        return private, private.public_key()

    def load_private_key(self, key_id: str) -> Key:
        return self.keystore.load_private_key(key_id)

    def store_private_key(self, key_id: str, key: Key, *, created: float | None = None) -> None:
        """Store ``key`` as ``key_id`` with its creation time (default: now)."""
        self.keystore.store_private_key(key_id, key)
        self._write_meta(key_id, key.public_key(), self.clock() if created is None else created)

    def key_info(self, key_id: str) -> KeyInfo:
        """The stored key's public key and creation time (recorded now if unknown).
        KeyNotFound when there is no such key."""
        validate_key_id(key_id)
        signature = self._signature(key_id)
        cached = self._info_cache.get(key_id)
        if cached is not None and signature is not None and cached[0] == signature:
            return cached[1]
        public = self.keystore.load_private_key(key_id).public_key()
        meta = self._read_meta(key_id)
        if meta is not None and meta[1] == public:
            created = meta[0]
        else:
            path = self.keystore.directory / key_id
            try:
                created = os.stat(path, follow_symlinks=False).st_mtime if signature is not None else self.clock()
            except OSError:
                created = self.clock()
            log.info("key %s: no creation time recorded; counting its age from %s", key_id, _iso(created))
            self._write_meta(key_id, public, created)
        info = KeyInfo(key_id, public, created)
        self._info_cache[key_id] = (self._signature(key_id), info)
        return info

    def _signature(self, key_id: str) -> tuple[int, int, int] | None:
        """What identifies the key file's current content (None: not in the keystore)."""
        try:
            st = os.stat(self.keystore.directory / key_id, follow_symlinks=False)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _meta_path(self, key_id: str) -> os.PathLike[str]:
        return self.keystore.directory / f".{key_id}{META_SUFFIX}"

    def _read_meta(self, key_id: str) -> tuple[float, Key] | None:
        path = self._meta_path(key_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
                return None
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            meta = json.loads(data)
            created = float(meta["created"])
            public = Key.parse(meta["publicKey"])
        except (ValueError, KeyError, TypeError):
            log.warning("key %s: ignoring unreadable metadata file %s", key_id, path)
            return None
        if not math.isfinite(created):
            return None
        return created, public

    def _write_meta(self, key_id: str, public: Key, created: float) -> None:
        """Write ``.<id>.meta`` atomically (0600, fsynced) beside the key."""
        directory = self.keystore.directory
        if not directory.exists():  # a key only in the credentials directory
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps({"created": created, "publicKey": public.to_base64()}).encode() + b"\n"
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            tmp = f".{key_id}.{secrets.token_hex(6)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
            try:
                try:
                    os.fchmod(fd, 0o600)
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, f".{key_id}{META_SUFFIX}", src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._info_cache.pop(key_id, None)

    def _restore_entry(self, key_id: str, key: Key | None, info: KeyInfo | None) -> None:
        """Put a keystore entry back as it was (None: there was none)."""
        if key is None:
            with contextlib.suppress(KeyNotFound):
                self.keystore.delete_private_key(key_id)
            with contextlib.suppress(OSError):
                os.unlink(self._meta_path(key_id))
            self._info_cache.pop(key_id, None)
            return
        self.keystore.store_private_key(key_id, key)
        self._write_meta(key_id, key.public_key(), info.created if info is not None else self.clock())

    # --- rotation -----------------------------------------------------------------------

    def _lock(self, iface: str) -> asyncio.Lock:
        return self._locks.setdefault(iface, asyncio.Lock())

    async def rotate_keys(self, iface: str, *, peers: Iterable[tuple[Any, str]] = (),
                          overlap: float = DEFAULT_OVERLAP, wait: bool = True,
                          handshake: bool = True, on_new_key: Callable[[Key], object] | None = None) -> Key:
        """Give interface ``iface`` a new key without loss (see the module docstring) and
        return its public key. ``peers``: (TunnelManager or backend, interface name) of
        each remote node that has ``iface``'s node as a peer. ``overlap``: seconds the
        old key is still accepted once the new one is in use (``wait=False``: the old key
        is dropped in the background). ``handshake``: start a handshake with each remote
        once the new key is in use. ``on_new_key(public)`` is called as soon as the new key
        is in use, before the overlap (a command prints it then)."""
        if self.manager is None:
            raise KeyManagerError("rotate_keys needs a TunnelManager (KeyManager(keystore, manager))")
        validate_key_id(iface)
        if not (math.isfinite(overlap) and overlap >= 0):
            raise ValueError(f"overlap must be a number of seconds >= 0, got {overlap!r}")
        remotes = [_Node(handle, name, self.timeout) for handle, name in peers]
        async with self._lock(iface):
            pending = self._drops.pop(iface, None)
            node = _Node(self.manager, iface, self.timeout)
            if pending is not None:  # a previous rotation's overlap: end it first
                pending.cancel()
                await asyncio.wait([pending])
                await self._drop_secondary(node)
            new_public, extended = await self._rotate(node, remotes, handshake)
            if on_new_key is not None:
                on_new_key(new_public)
            if not extended:
                pass  # plain rotation: the old key is gone already
            elif overlap == 0:
                await self._drop_secondary(node)
            elif wait:
                try:
                    await self.sleep(overlap)
                except asyncio.CancelledError:  # the caller gave up: end the overlap now, in the background
                    self._drops[iface] = asyncio.get_running_loop().create_task(self._drop_later(iface, node, 0))
                    raise
                await self._drop_secondary(node)
            else:
                self._drops[iface] = asyncio.get_running_loop().create_task(
                    self._drop_later(iface, node, overlap))
        return new_public

    async def _drop_later(self, iface: str, node: _Node, overlap: float) -> None:
        try:
            if overlap:
                await self.sleep(overlap)
            await self._drop_secondary(node)
        except KeyManagerError as exc:
            log.error("interface %s: ending the key rotation's overlap failed: %s", iface, exc)
        finally:
            if self._drops.get(iface) is asyncio.current_task():
                del self._drops[iface]

    async def _drop_secondary(self, node: _Node) -> None:
        code = await node.set(SetRequest(DeviceChanges(secondary_private_key=None)))
        if code and code != IPC_ERROR_INVALID:  # -22: not pywg, it never had one
            raise KeyManagerError(f"interface {node.iface} refused to drop its old key: errno={code} "
                                  f"({errno_name(code)})")
        log.info("interface %s: the old key is no longer accepted", node.iface)

    async def _rotate(self, node: _Node, remotes: Sequence[_Node], handshake: bool) -> tuple[Key, bool]:
        """Steps 1-4; returns the new public key and whether N is pywg (an overlap runs)."""
        iface = node.iface
        before = await node.get()
        if before.private_key is None:
            raise KeyManagerError(f"interface {iface} has no private key: nothing to rotate")
        old_private = before.private_key
        old_public = _public(old_private)
        # The remotes, checked before anything changes.
        remote_state: list[tuple[_Node, PeerSnapshot, bytes | None]] = []
        for remote in remotes:
            snap = await remote.get()
            entry = next((p for p in snap.peers if p.public_key == old_public), None)
            if entry is None:
                raise KeyManagerError(f"interface {remote.iface} has no peer with {iface}'s public key "
                                      f"{Key(old_public).to_base64()}: nothing to rename there")
            own = _public(snap.private_key) if snap.private_key is not None else None
            remote_state.append((remote, entry, own))

        new_private = Key.generate_private()
        new_public = bytes(new_private.public_key())
        previous_id = f"{iface}{PREVIOUS_SUFFIX}"
        saved = await asyncio.to_thread(self._save_keys, iface, previous_id, Key(old_private), new_private)

        # Each undo step is registered before its request goes out (a request that timed out
        # may still have been carried out) and is harmless if the request was not.
        undo: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        promoting = False
        extended = False
        plain: list[tuple[_Node, PeerSnapshot]] = []
        try:
            # 2. N accepts both keys (pywg), or N is not pywg: plain rotation.
            undo.append((f"drop the new key from {iface}", partial(self._drop_secondary, node)))
            code = await node.set(SetRequest(DeviceChanges(secondary_private_key=bytes(new_private))))
            extended = code == 0
            if code and code != IPC_ERROR_INVALID:
                raise KeyManagerError(f"interface {iface} refused the new key: errno={code} ({errno_name(code)})")
            # 3. the remotes learn the new key: renamed (pywg) or replaced (others, last:
            # their sessions with N end, so the sooner N's handshake follows, the better).
            for remote, entry, _ in remote_state:
                undo.append((f"rename the peer back on {remote.iface}",
                             partial(self._rename, remote, new_public, old_public)))
                renamed = await remote.set(SetRequest(peers=(PeerChanges(
                    old_public, update_only=True, rename_to=new_public),)))
                if renamed == 0:
                    log.info("interface %s: peer %s renamed to the new key", remote.iface, iface)
                elif renamed == IPC_ERROR_INVALID:
                    undo.pop()
                    plain.append((remote, entry))
                else:
                    raise KeyManagerError(f"interface {remote.iface} refused to rename the peer: "
                                          f"errno={renamed} ({errno_name(renamed)})")
            for remote, entry in plain:
                undo.append((f"restore the peer on {remote.iface}",
                             partial(self._replace, remote, entry, new_public, old_public)))
                await self._replace(remote, entry, old_public, new_public)
                log.info("interface %s (not pywg): peer %s replaced with the new key", remote.iface, iface)
            # 4. N uses the new key.
            promoting = True
            if extended:
                known = {p.public_key for p in before.peers}
                rekey = tuple(PeerChanges(own, update_only=True, rekey=True)
                              for _, _, own in remote_state if handshake and own is not None and own in known)
                await node.must_set(SetRequest(DeviceChanges(promote_secondary=True), rekey),
                                    "promote the new key")
            else:
                await node.must_set(SetRequest(DeviceChanges(private_key=bytes(new_private))),
                                    "take the new private key")
        except BaseException as exc:
            if promoting and await self._took_key(node, new_public):
                pass  # the last step was carried out though its answer was lost: done
            else:
                await self._undo(iface, previous_id, saved, undo, exc)
                raise  # _undo raised for an Exception; this is a cancellation
        log.info("interface %s: key rotated (%s); %d remote(s) renamed, %d replaced", iface,
                 "with overlap" if extended else "plain", len(remote_state) - len(plain), len(plain))
        return Key(new_public), extended

    async def _took_key(self, node: _Node, public: bytes) -> bool:
        """Whether ``node`` uses the key ``public`` now (False when it cannot be told)."""
        try:
            snapshot = await asyncio.shield(node.get())
        except KeyManagerError:
            return False
        return snapshot.private_key is not None and _public(snapshot.private_key) == public

    async def _undo(self, iface: str, previous_id: str, saved: _Saved,
                    undo: list[tuple[str, Callable[[], Awaitable[None]]]], exc: BaseException) -> None:
        """Undo a failed rotation's steps, newest first; raise RotationFailed for an error."""
        problems = []
        for what, step in reversed(undo):
            try:
                await asyncio.shield(step())
            except (KeyManagerError, OSError) as failure:
                problems.append(f"could not {what}: {failure}")
        try:
            await asyncio.to_thread(self._restore_keys, iface, previous_id, saved)
        except (KeyStoreError, OSError) as failure:
            problems.append(f"could not restore keystore entry {iface}: {type(failure).__name__}: {failure}")
        for problem in problems:
            log.error("interface %s: undoing a failed key rotation: %s", iface, problem)
        if not isinstance(exc, Exception):
            return
        if problems:
            raise RotationFailed(f"rotating the key of {iface} failed ({exc}); undoing it failed too: "
                                 + "; ".join(problems), undone=False) from None
        raise RotationFailed(f"rotating the key of {iface} failed, nothing changed: {exc}") from None

    @staticmethod
    async def _rename(remote: _Node, current: bytes, wanted: bytes) -> None:
        code = await remote.set(SetRequest(peers=(PeerChanges(current, update_only=True, rename_to=wanted),)))
        if code:
            raise KeyManagerError(f"interface {remote.iface} refused to rename the peer: errno={code} "
                                  f"({errno_name(code)})")

    @staticmethod
    async def _replace(remote: _Node, entry: PeerSnapshot, current: bytes, wanted: bytes) -> None:
        """On a non-pywg remote: the peer ``current`` becomes ``wanted``, configured as
        ``entry`` (its sessions end)."""
        await remote.must_set(SetRequest(peers=(PeerChanges(current, remove=True), _readd_section(entry, wanted))),
                              "replace the peer's key")

    def _save_keys(self, iface: str, previous_id: str, old: Key, new: Key) -> _Saved:
        """Keep the old key as ``iface.previous``, store the new as ``iface``; return what
        both entries held (for the undo)."""
        saved: list[_Entry] = []
        for key_id in (iface, previous_id):
            try:
                saved.append((self.keystore.load_private_key(key_id), self._stored_info(key_id)))
            except KeyNotFound:
                saved.append((None, None))
        current_key, current_info = saved[0]
        if current_key is not None and current_key != old:
            log.warning("keystore entry %s did not hold interface %s's key; it is replaced by the new key "
                        "(the interface's old key is kept as %s)", iface, iface, previous_id)
        old_created = (current_info.created if current_info is not None and current_key == old
                       else self.clock())
        self.keystore.store_private_key(previous_id, old)
        self._write_meta(previous_id, old.public_key(), old_created)
        self.keystore.store_private_key(iface, new)
        self._write_meta(iface, new.public_key(), self.clock())
        return saved[0], saved[1]

    def _stored_info(self, key_id: str) -> KeyInfo | None:
        try:
            return self.key_info(key_id)
        except KeyStoreError:
            return None

    def _restore_keys(self, iface: str, previous_id: str, saved: _Saved) -> None:
        self._restore_entry(iface, *saved[0])
        self._restore_entry(previous_id, *saved[1])

    # --- scheduling and alerts ------------------------------------------------------------

    def schedule_rotation(self, iface: str, schedule: RotationSchedule, *,
                          peers: Iterable[tuple[Any, str]] = (), overlap: float = DEFAULT_OVERLAP,
                          auto_rotate: bool = True) -> None:
        """Watch ``iface``'s key (stored under the id ``iface``): alerts ahead of expiry,
        and (``auto_rotate``) rotation when due, with ``peers`` as in rotate_keys."""
        validate_key_id(iface)
        if auto_rotate and self.manager is None:
            raise KeyManagerError("automatic rotation needs a TunnelManager (KeyManager(keystore, manager))")
        self._plans[iface] = _Plan(iface, schedule, list(peers), overlap, auto_rotate)

    def unschedule(self, iface: str) -> None:
        self._plans.pop(iface, None)

    def subscribe(self, callback: AlertCallback) -> Callable[[], None]:
        """Call ``callback(event)`` for each KeyExpiring alert (a coroutine function's
        result is run as a task). Returns the function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)
        return unsubscribe

    def alerts(self, maxsize: int = 0) -> asyncio.Queue[KeyExpiring]:
        """A queue that receives every alert from now on (a full queue loses the newest)."""
        queue: asyncio.Queue[KeyExpiring] = asyncio.Queue(maxsize)

        def put(event: KeyExpiring) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)
        self.subscribe(put)
        return queue

    def _emit(self, event: KeyExpiring) -> None:
        if event.expired:
            log.warning("key %s of interface %s expired %s ago (at %s): it is older than its maximum age; "
                        "rotate it", event.key_id, event.iface, _duration(event.seconds_left),
                        _iso(event.expires_at))
        else:
            log.warning("key %s of interface %s expires in %s (at %s); rotate it before then",
                        event.key_id, event.iface, _duration(event.seconds_left), _iso(event.expires_at))
        for callback in list(self._subscribers):
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
            except Exception:
                log.exception("a key alert subscriber failed")

    async def check(self) -> float | None:
        """One pass of the scheduler: rotate the keys that are due, send the alerts that
        are due. Returns when the next thing is due (UNIX seconds), None if never."""
        next_due: list[float] = []
        for plan in list(self._plans.values()):
            due = await self._check_plan(plan)
            if due is not None:
                next_due.append(due)
        return min(next_due, default=None)

    async def _check_plan(self, plan: _Plan) -> float | None:
        iface, schedule = plan.iface, plan.schedule
        try:
            info = await asyncio.to_thread(self.key_info, iface)
        except KeyStoreError as exc:
            if not plan.missing_logged:
                log.warning("interface %s: cannot read its key from the keystore (%s); not watching it",
                            iface, type(exc).__name__)
                plan.missing_logged = True
            return self.clock() + MAX_SLEEP
        plan.missing_logged = False
        now = self.clock()
        rotate_at = schedule.rotate_at(info.created, info.public_key)
        if plan.auto_rotate and now >= rotate_at and (plan.retry_at is None or now >= plan.retry_at):
            try:
                await self.rotate_keys(iface, peers=plan.peers, overlap=plan.overlap, wait=False)
            except (KeyManagerError, KeyStoreError, OSError) as exc:
                plan.retry_at = now + RETRY_AFTER
                log.error("interface %s: scheduled key rotation failed (retrying in %s): %s",
                          iface, _duration(RETRY_AFTER), exc)
            else:
                plan.retry_at = None
                info = await asyncio.to_thread(self.key_info, iface)
                now = self.clock()
                rotate_at = schedule.rotate_at(info.created, info.public_key)
        public = bytes(info.public_key)
        expires_at = schedule.expires_at(info.created)
        for expired, at in ((False, schedule.alert_at(info.created)), (True, expires_at)):
            if now >= at and (public, expired) not in plan.alerted:
                plan.alerted.add((public, expired))
                self._emit(KeyExpiring(iface, iface, info.public_key, info.created, expires_at,
                                       expires_at - now, expired))
        plan.alerted = {entry for entry in plan.alerted if entry[0] == public}  # forget replaced keys
        candidates = [at for expired, at in ((False, schedule.alert_at(info.created)), (True, expires_at))
                      if (public, expired) not in plan.alerted]
        if plan.auto_rotate:
            candidates.append(max(rotate_at, plan.retry_at or rotate_at))
        return min(candidates, default=None)

    async def run(self) -> None:
        """The scheduler: check, sleep until the next thing is due (at most MAX_SLEEP), repeat."""
        while True:
            try:
                due = await self.check()
            except Exception:
                log.exception("key scheduler pass failed")
                due = None
            now = self.clock()
            delay = MAX_SLEEP if due is None else min(max(due - now, 0.0), MAX_SLEEP)
            await self.sleep(delay)

    def start(self) -> asyncio.Task[None]:
        """Run the scheduler as a task (once)."""
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = asyncio.get_running_loop().create_task(self.run(), name="pywg-key-scheduler")
        return self._scheduler

    async def wait_idle(self) -> None:
        """Wait for the overlaps running in the background to end."""
        while self._drops:
            await asyncio.gather(*self._drops.values(), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop the scheduler; end the overlaps still running now (drop the old keys)."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        for iface, task in list(self._drops.items()):
            task.cancel()
            await asyncio.wait([task])
            if self.manager is not None:
                try:
                    await self._drop_secondary(_Node(self.manager, iface, self.timeout))
                except KeyManagerError as exc:
                    log.error("interface %s: ending the key rotation's overlap failed: %s", iface, exc)
        self._drops.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
