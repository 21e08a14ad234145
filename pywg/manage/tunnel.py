"""``TunnelManager``: the spec's TunnelManager for asyncio.

Operations (the spec's, in snake_case; each takes a keyword ``timeout``):

- ``create_interface(config)`` -> the created WireGuardInterface (the spec returns only
  an error; the interface tells e.g. the port picked for ``listen_port`` 0);
- ``delete_interface(name)``; ``get_interface(name)`` -> WireGuardInterface;
- ``add_peer(iface, peer)``, ``remove_peer(iface, public_key)``, ``update_peer(iface, peer)``;
- ``get_stats(iface)`` -> InterfaceStats; and ``list_interfaces()`` -> names.

Where the interfaces run is the backend's business (``pywg.manage.backends``): pywg's
engine in this process (the default) or any daemon serving the UAPI socket. The manager
builds each change as one whole UAPI set request, validated with ``parse_set`` before
anything is sent, and reads state with a get request.

Errors are ``ManagerError`` subclasses: ``InterfaceExists``, ``InterfaceNotFound``,
``PeerExists``, ``PeerNotFound``, ``InvalidConfig`` (also a ``types.InvalidConfig``, so
``.field`` names the culprit, e.g. ``"peers[0].allowedIps[1]"``) and ``BackendError``
(``.errno``: the UAPI errno, negative as on the wire, e.g. -98 for a port in use).

Nothing half-applied. Input is checked completely before anything is changed. Operations
on one interface are serialized (an asyncio.Lock per name). A change that fails, times out
or is cancelled is undone before the next operation on that interface runs:

- ``create_interface`` removes everything it made (link, daemon, socket);
- a peer change re-reads the interface and, for each peer the change touched (the peer
  and any peer whose allowed IPs it took over), restores what the get before the change
  showed: public key, preshared key, endpoint, keepalive and allowed IPs. (A peer that had
  no endpoint before, and has one now, is removed and re-added: UAPI cannot forget an
  endpoint.) For pywg, which applies a set request whole or not at all, this finds nothing
  to do; wireguard-go applies a request line by line, so an error there may need it.
- A request already written to a socket may still be carried out by the server after the
  caller has given up; the manager waits for its answer (up to ``settle_timeout``) and
  only then checks and restores.

When a call fails with an error, the undo is done before the error is raised. When it
times out or is cancelled, the undo runs in the background, so the call raises
TimeoutError (or CancelledError) as soon as its time is up; the interface's lock is held
until the undo is done, so the next call on that interface sees the interface as it was.
``wait_idle()`` waits for all undo work; ``aclose()`` too, then closes the backend. A
``delete_interface`` that has started removing the interface finishes doing so even when
its caller gives up. What is restored is configuration: a peer removed and put back
starts without a session (its next packet makes a handshake).

Input: the types (InterfaceConfig, WireGuardPeer, Key) or their JSON objects as dicts
(read strictly by the types' ``from_dict``); a public key may also be base64 text.

``timeout``: seconds for the whole call, lock wait included; None uses the manager's
``default_timeout`` (30 s; None there: no limit).

Cryptokey routing is WireGuard's: an allowed IP given to one peer is taken from any other
peer that had it (as ``wg set`` does). ``update_peer`` replaces the peer's allowed IPs and
sets preshared key (None clears it), keepalive (0: off) and endpoint (None: keep the one it
has) on an existing peer only (``update_only``); ``add_peer`` refuses a key that exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Self, TypeVar

from pywg.manage import types
from pywg.manage.backends.base import Backend, BackendFailure, LinkState, NameInUse, NotServed
from pywg.manage.key import InvalidKey, Key
from pywg.manage.types import (
    MTU_MIN,
    Endpoint,
    InterfaceConfig,
    InterfaceStats,
    PeerStats,
    WireGuardInterface,
    WireGuardPeer,
    validate_interface_name,
)
from pywg.manage.uapi_client import errno_name, response_errno
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
    format_prefix,
    format_set,
    parse_get,
    parse_set,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "BackendError",
    "InterfaceExists",
    "InterfaceNotFound",
    "InvalidConfig",
    "ManagerError",
    "PeerExists",
    "PeerNotFound",
    "TunnelManager",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
SETTLE_TIMEOUT = 10.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

T = TypeVar("T")


# --- errors -----------------------------------------------------------------------------


class ManagerError(Exception):
    """Base of the TunnelManager's errors."""


class InterfaceExists(ManagerError):
    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"interface {name} already exists" + (f": {detail}" if detail else ""))
        self.name = name


class InterfaceNotFound(ManagerError):
    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"no interface {name}" + (f" ({detail})" if detail else ""))
        self.name = name


class PeerExists(ManagerError):
    def __init__(self, iface: str, public_key: Key) -> None:
        super().__init__(f"interface {iface} already has peer {public_key.to_base64()}")
        self.iface = iface
        self.public_key = public_key


class PeerNotFound(ManagerError):
    def __init__(self, iface: str, public_key: Key) -> None:
        super().__init__(f"interface {iface} has no peer {public_key.to_base64()}")
        self.iface = iface
        self.public_key = public_key


class InvalidConfig(ManagerError, types.InvalidConfig):
    """Bad input; a ``types.InvalidConfig`` too: ``field`` is the JSON path at fault."""

    def __init__(self, reason: str, field: str = "") -> None:
        types.InvalidConfig.__init__(self, reason, field)


class BackendError(ManagerError):
    """The backend failed or refused; ``errno`` is the UAPI errno (negative, as on the
    wire) or OS errno when one explains it, else None."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno


@contextlib.contextmanager
def _user_input() -> Iterator[None]:
    """Turn the types' validation errors into the manager's InvalidConfig."""
    try:
        yield
    except InvalidConfig:
        raise
    except types.InvalidConfig as exc:
        raise InvalidConfig(exc.reason, exc.field) from None
    except InvalidKey as exc:
        raise InvalidConfig(str(exc), "publicKey") from None


# --- input ------------------------------------------------------------------------------


def _check_name(name: object) -> str:
    with _user_input():
        return validate_interface_name(name, "name")


def _as_config(config: object) -> InterfaceConfig:
    if isinstance(config, InterfaceConfig):
        return config
    if isinstance(config, Mapping):
        with _user_input():
            return InterfaceConfig.from_dict(dict(config))
    raise InvalidConfig(f"expected an InterfaceConfig or its JSON object, got {type(config).__name__}")


def _as_peer(peer: object) -> WireGuardPeer:
    if isinstance(peer, WireGuardPeer):
        return peer
    if isinstance(peer, Mapping):
        with _user_input():
            return WireGuardPeer.from_dict(dict(peer))
    raise InvalidConfig(f"expected a WireGuardPeer or its JSON object, got {type(peer).__name__}")


def _as_public_key(key: object) -> Key:
    if isinstance(key, str):
        with _user_input():
            key = Key.parse(key)
    if not isinstance(key, Key):
        raise InvalidConfig(f"expected a Key or its base64 text, got {type(key).__name__}", "publicKey")
    if key.is_zero():
        raise InvalidConfig("a peer's public key must not be all zeros", "publicKey")
    return key


def _endpoint_tuple(endpoint: Endpoint | None) -> tuple[str, int] | None:
    return None if endpoint is None else (str(endpoint.host), endpoint.port)


def _peer_section(peer: WireGuardPeer, *, update: bool) -> PeerChanges:
    """The set request section for a peer: everything it says. For an update, a missing
    preshared key clears the one the peer has and keepalive 0 turns it off; a missing
    endpoint leaves the known one."""
    psk = peer.preshared_key
    return PeerChanges(
        public_key=bytes(peer.public_key),
        update_only=update,
        preshared_key=bytes(psk) if psk is not None else (None if update else UNCHANGED),
        endpoint=_endpoint_tuple(peer.endpoint),
        persistent_keepalive=peer.persistent_keepalive if (update or peer.persistent_keepalive) else None,
        replace_allowed_ips=True,
        allowed_ips=tuple(AllowedIPChange(net) for net in peer.allowed_ips),
    )


def _restore_section(peer: PeerSnapshot) -> PeerChanges:
    """A section that puts a peer back as a get showed it."""
    return PeerChanges(
        public_key=peer.public_key,
        preshared_key=peer.preshared_key,
        endpoint=peer.endpoint,
        persistent_keepalive=peer.persistent_keepalive,
        replace_allowed_ips=True,
        allowed_ips=tuple(AllowedIPChange(ipaddress.ip_network(net)) for net in peer.allowed_ips),
    )


# UAPI key -> the JSON field it comes from (for errors found by parse_set).
_FIELD_OF_KEY = {
    "private_key": "privateKey", "listen_port": "listenPort", "fwmark": "fwMark", "public_key": "publicKey",
    "preshared_key": "presharedKey", "endpoint": "endpoint", "allowed_ip": "allowedIps",
    "persistent_keepalive_interval": "persistentKeepalive",
}


def _validated(request: SetRequest) -> str:
    """The request's text, after ``parse_set`` accepted it (what a server will read)."""
    text = format_set(request)
    try:
        parse_set(text.split("\n")[1:-2])
    except UapiError as exc:
        key, _, reason = exc.message.partition(": ")
        if key in _FIELD_OF_KEY and reason:
            raise InvalidConfig(reason, _FIELD_OF_KEY[key]) from None
        raise InvalidConfig(exc.message) from None
    return text


# --- output -----------------------------------------------------------------------------


def _time(ns: int | None) -> datetime | None:
    return None if not ns else _EPOCH + timedelta(microseconds=ns // 1000)


def _endpoint(endpoint: tuple[str, int] | None) -> Endpoint | None:
    if endpoint is None:
        return None
    try:
        return Endpoint(ipaddress.ip_address(endpoint[0]), endpoint[1])
    except (ValueError, types.InvalidConfig):
        return None


def _peer(snapshot: PeerSnapshot) -> WireGuardPeer:
    return WireGuardPeer(
        public_key=Key(snapshot.public_key),
        preshared_key=None if snapshot.preshared_key is None else Key(snapshot.preshared_key),
        endpoint=_endpoint(snapshot.endpoint),
        allowed_ips=tuple(ipaddress.ip_network(net) for net in snapshot.allowed_ips),
        persistent_keepalive=min(snapshot.persistent_keepalive, 0xFFFF),
        last_handshake=_time(snapshot.last_handshake_ns),
    )


def _interface(name: str, snapshot: DeviceSnapshot, link: LinkState) -> WireGuardInterface:
    return WireGuardInterface(
        name=name,
        private_key=None if snapshot.private_key is None else Key(snapshot.private_key),
        listen_port=snapshot.listen_port,
        fw_mark=snapshot.fwmark,
        peers=tuple(_peer(p) for p in snapshot.peers),
        address=link.address,
        mtu=link.mtu if MTU_MIN <= link.mtu <= 0xFFFF else 0,
    )


def _own_public(snapshot: DeviceSnapshot) -> Key | None:
    return None if snapshot.private_key is None else Key(snapshot.private_key).public_key()


def _peer_config(peer: PeerSnapshot | None) -> tuple[object, ...] | None:
    if peer is None:
        return None
    return (peer.preshared_key, peer.endpoint, peer.persistent_keepalive, sorted(peer.allowed_ips))


# --- the manager ------------------------------------------------------------------------


@dataclass(eq=False)
class _Txn:
    """One operation's loose ends: undo steps (run, newest first, if it fails) and the
    request in flight (awaited before undoing)."""

    undo: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    in_flight: asyncio.Task[Any] | None = None


class TunnelManager:
    """The spec's TunnelManager. ``backend``: where interfaces run (default: an
    ``InProcessBackend`` in this process's namespace)."""

    def __init__(self, backend: Backend | None = None, *, default_timeout: float | None = DEFAULT_TIMEOUT,
                 settle_timeout: float = SETTLE_TIMEOUT) -> None:
        if backend is None:
            from pywg.manage.backends.inprocess import InProcessBackend

            backend = InProcessBackend()
        self.backend: Backend = backend
        self.default_timeout = default_timeout
        self.settle_timeout = settle_timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._settling: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"TunnelManager({self.backend!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def wait_idle(self) -> None:
        """Wait until no undo work is pending."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def aclose(self) -> None:
        """Wait for undo work, then close the backend (in-process interfaces go away)."""
        await self.wait_idle()
        await self.backend.aclose()

    # --- interface management -------------------------------------------------------------

    async def create_interface(self, config: InterfaceConfig | Mapping[str, Any], *,
                               timeout: float | None = None) -> WireGuardInterface:
        """Create ``config.name`` with its key, port, fwmark, peers, address and MTU, up.
        All or nothing."""
        config = _as_config(config)
        own = config.public_key
        for i, peer in enumerate(config.peers):
            if own is not None and peer.public_key == own:
                raise InvalidConfig("a peer cannot have the interface's own public key", f"peers[{i}].publicKey")
        device = DeviceChanges(
            private_key=UNCHANGED if config.private_key is None else bytes(config.private_key),
            listen_port=config.listen_port or None,
            fwmark=config.fw_mark or None,
        )
        peers = tuple(_peer_section(p, update=False) for p in config.peers)
        text = _validated(SetRequest(device, peers))
        name = config.name

        async def body(txn: _Txn) -> WireGuardInterface:
            await self.backend.create(name, config.mtu, config.address, listen_port=config.listen_port)
            txn.undo.append(partial(self.backend.delete, name))
            await self._set(txn, name, text)
            created = await self._describe(name)
            log.info("created interface %s (%s backend)", name, self.backend.kind)
            return created

        return await self._call(name, timeout, body)

    async def delete_interface(self, name: str, *, timeout: float | None = None) -> None:
        """Remove the interface and what serves it. Once started, the removal finishes
        even if the caller gives up."""
        name = _check_name(name)

        async def body(txn: _Txn) -> None:
            if not await self.backend.exists(name):
                raise NotServed(f"not reachable through the {self.backend.kind} backend")
            txn.in_flight = asyncio.get_running_loop().create_task(self.backend.delete(name))
            await asyncio.shield(txn.in_flight)
            txn.in_flight = None
            log.info("deleted interface %s", name)

        await self._call(name, timeout, body)

    async def get_interface(self, name: str, *, timeout: float | None = None) -> WireGuardInterface:
        """The interface as it is now (secrets included in the object; its JSON leaves them
        out unless asked). ``address``/``mtu`` are read from the kernel."""
        name = _check_name(name)

        async def body(txn: _Txn) -> WireGuardInterface:
            return await self._describe(name)

        return await self._call(name, timeout, body)

    async def list_interfaces(self, *, timeout: float | None = None) -> list[str]:
        """Names of the interfaces the backend reaches."""
        try:
            async with asyncio.timeout(self._delay(timeout)):
                return await self.backend.names()
        except BackendFailure as exc:
            raise BackendError(exc.message, exc.errno) from None

    # --- peer management ----------------------------------------------------------------

    async def add_peer(self, iface: str, peer: WireGuardPeer | Mapping[str, Any], *,
                       timeout: float | None = None) -> None:
        """Add a new peer; PeerExists (nothing changed) if its key is already there."""
        name = _check_name(iface)
        peer = _as_peer(peer)
        key = peer.public_key
        text = _validated(SetRequest(peers=(_peer_section(peer, update=False),)))

        async def body(txn: _Txn) -> None:
            before = await self._snapshot(name)
            if any(p.public_key == bytes(key) for p in before.peers):
                raise PeerExists(name, key)
            if _own_public(before) == key:
                raise InvalidConfig(f"{key.to_base64()} is interface {name}'s own public key", "publicKey")
            await self._change(txn, name, text, before, _touched(before, peer))

        await self._call(name, timeout, body)

    async def remove_peer(self, iface: str, public_key: Key | str, *, timeout: float | None = None) -> None:
        """Remove a peer; PeerNotFound if there is none with that key."""
        name = _check_name(iface)
        key = _as_public_key(public_key)
        text = _validated(SetRequest(peers=(PeerChanges(bytes(key), remove=True),)))

        async def body(txn: _Txn) -> None:
            before = await self._snapshot(name)
            if not any(p.public_key == bytes(key) for p in before.peers):
                raise PeerNotFound(name, key)
            await self._change(txn, name, text, before, {bytes(key)})

        await self._call(name, timeout, body)

    async def update_peer(self, iface: str, peer: WireGuardPeer | Mapping[str, Any], *,
                          new_public_key: Key | str | None = None, timeout: float | None = None) -> bool:
        """Make an existing peer as given: allowed IPs replaced, preshared key and keepalive
        set (None/0 clear them), endpoint set when given. PeerNotFound if it is not there.

        ``new_public_key``: the peer rotated its key; it answers to the new one from now on.
        A pywg daemon renames it in place (``pywg_rename_to``: sessions, endpoint and
        counters kept), in the same request as the other changes. Other implementations
        refuse that key (-22): the peer is then replaced (removed, added with the new key and
        the given configuration), which ends its sessions. Returns False in that case, True
        when the peer kept its sessions. PeerExists when the new key is another peer's."""
        name = _check_name(iface)
        peer = _as_peer(peer)
        key = peer.public_key
        new_key: Key | None = None
        if new_public_key is not None:
            try:
                new_key = _as_public_key(new_public_key)
            except InvalidConfig as exc:
                raise InvalidConfig(exc.reason, "newPublicKey") from None
            if new_key == key:
                new_key = None
        section = _peer_section(peer, update=True)
        if new_key is not None:
            section = replace(section, rename_to=bytes(new_key))
        text = _validated(SetRequest(peers=(section,)))

        async def body(txn: _Txn) -> bool:
            before = await self._snapshot(name)
            if not any(p.public_key == bytes(key) for p in before.peers):
                raise PeerNotFound(name, key)
            touched = _touched(before, peer)
            if new_key is None:
                await self._change(txn, name, text, before, touched)
                return True
            if any(p.public_key == bytes(new_key) for p in before.peers):
                raise PeerExists(name, new_key)
            if _own_public(before) == new_key:
                raise InvalidConfig(f"{new_key.to_base64()} is interface {name}'s own public key", "newPublicKey")
            touched.add(bytes(new_key))
            try:
                await self._change(txn, name, text, before, touched)
                return True
            except BackendError as exc:
                if exc.errno != IPC_ERROR_INVALID:
                    raise
            # Not pywg: put back what a line-by-line server applied, then replace the peer.
            txn.undo.clear()
            await self._restore(name, before, touched)
            was = next(p for p in before.peers if p.public_key == bytes(key))
            endpoint = peer.endpoint if peer.endpoint is not None else _endpoint(was.endpoint)
            readd = _peer_section(replace(peer, public_key=new_key, endpoint=endpoint), update=False)
            await self._change(txn, name, _validated(SetRequest(peers=(PeerChanges(bytes(key), remove=True), readd))),
                               before, touched)
            log.info("%s: peer replaced with its new key (the backend cannot rename a peer)", name)
            return False

        return await self._call(name, timeout, body)

    # --- status ---------------------------------------------------------------------------

    async def get_stats(self, iface: str, *, timeout: float | None = None) -> InterfaceStats:
        """Per-peer bytes, latest handshake and endpoint (as ``wg show``), and completed
        handshakes where the backend counts them (pywg does; UAPI alone does not)."""
        name = _check_name(iface)

        async def body(txn: _Txn) -> InterfaceStats:
            snapshot = await self._snapshot(name)
            collected = datetime.now(UTC)
            counts = await self.backend.handshake_counts(name)
            peers = tuple(PeerStats(
                public_key=Key(p.public_key),
                endpoint=_endpoint(p.endpoint),
                last_handshake=_time(p.last_handshake_ns),
                rx_bytes=p.rx_bytes,
                tx_bytes=p.tx_bytes,
                handshakes=None if counts is None else counts.get(p.public_key),
            ) for p in snapshot.peers)
            return InterfaceStats(name=name, public_key=_own_public(snapshot),
                                  listen_port=snapshot.listen_port, collected_at=collected, peers=peers)

        return await self._call(name, timeout, body)

    # --- machinery ----------------------------------------------------------------------

    def _delay(self, timeout: float | None) -> float | None:
        delay = self.default_timeout if timeout is None else timeout
        return None if delay is None or math.isinf(delay) else delay

    async def exchange(self, iface: str, request: str, *, timeout: float | None = None) -> str:
        """Send a raw UAPI request (``get=1`` or ``set=1`` text) to ``iface`` holding its
        lock, so that it is serialized with this manager's own calls: for callers that
        compose their own requests (KeyManager's rotation). Backend errors are raised as
        the backend raises them; nothing is undone."""

        async def body(_: _Txn) -> str:
            return await self.backend.exchange(iface, request)

        return await self._locked(iface, timeout, body)

    async def _call(self, name: str, timeout: float | None, body: Callable[[_Txn], Awaitable[T]]) -> T:
        """Run ``body`` holding ``name``'s lock, within the timeout; backend errors become
        the manager's; on failure, hand the loose ends to a background undo."""
        try:
            return await self._locked(name, timeout, body)
        except NotServed as exc:
            raise InterfaceNotFound(name, exc.message) from None
        except NameInUse as exc:
            raise InterfaceExists(name, exc.message) from None
        except BackendFailure as exc:
            raise BackendError(exc.message, exc.errno) from None
        except UapiError as exc:
            raise BackendError(f"{self.backend.kind} backend, interface {name}: {exc.message}",
                               exc.errno) from None

    async def _locked(self, name: str, timeout: float | None, body: Callable[[_Txn], Awaitable[T]]) -> T:
        lock = self._locks.setdefault(name, asyncio.Lock())
        txn = _Txn()
        async with asyncio.timeout(self._delay(timeout)):
            await lock.acquire()
            try:
                result = await body(txn)
            except BaseException as exc:
                if not (txn.undo or txn.in_flight is not None):
                    lock.release()
                    raise
                task = asyncio.get_running_loop().create_task(self._settle(name, lock, txn))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)
                if not isinstance(exc, asyncio.CancelledError):
                    # An error: undo before reporting it (if the caller gives up meanwhile,
                    # the undo goes on in the background).
                    await asyncio.shield(task)
                raise
            lock.release()
            return result

    async def _settle(self, name: str, lock: asyncio.Lock, txn: _Txn) -> None:
        """Wait for the request in flight, then undo; the lock is released at the end."""
        try:
            if txn.in_flight is not None:
                try:
                    async with asyncio.timeout(self.settle_timeout):
                        with contextlib.suppress(Exception):
                            await txn.in_flight
                except TimeoutError:  # the request was cancelled (connection closed): check anyway
                    log.warning("%s: no answer to a request within %g s; checking the interface",
                                name, self.settle_timeout)
            async with asyncio.timeout(self.settle_timeout):
                for step in reversed(txn.undo):
                    try:
                        await step()
                    except (BackendFailure, UapiError, OSError) as exc:
                        log.error("%s: undoing a failed operation: %s", name, exc)
        except TimeoutError:
            log.error("%s: a failed operation could not be confirmed undone within %g s; "
                      "check the interface", name, self.settle_timeout)
        except Exception:
            log.exception("%s: undoing a failed operation", name)
        finally:
            lock.release()

    async def _snapshot(self, name: str) -> DeviceSnapshot:
        return parse_get(await self.backend.exchange(name, GET_REQUEST))

    async def _describe(self, name: str) -> WireGuardInterface:
        snapshot = await self._snapshot(name)
        return _interface(name, snapshot, await self.backend.link(name))

    async def _set(self, txn: _Txn, name: str, text: str) -> None:
        """Send a validated set request; the exchange is shielded so that a caller giving
        up does not cut a request in half (the undo waits for its answer)."""
        txn.in_flight = asyncio.get_running_loop().create_task(self.backend.exchange(name, text))
        response = await asyncio.shield(txn.in_flight)
        txn.in_flight = None
        code = response_errno(response)
        if code:
            raise BackendError(f"the {self.backend.kind} backend refused the change to {name}: "
                               f"errno={code} ({errno_name(code)})", code)

    async def _change(self, txn: _Txn, name: str, text: str, before: DeviceSnapshot,
                      touched: set[bytes]) -> None:
        """A peer change with its undo: restore the touched peers as ``before`` has them."""
        txn.undo.append(partial(self._restore, name, before, touched))
        await self._set(txn, name, text)
        txn.undo.clear()

    async def _restore(self, name: str, before: DeviceSnapshot, touched: set[bytes]) -> None:
        now = await self._snapshot(name)
        old = {p.public_key: p for p in before.peers}
        new = {p.public_key: p for p in now.peers}
        sections: list[PeerChanges] = []
        for key in sorted(touched):
            was, is_ = old.get(key), new.get(key)
            if _peer_config(was) == _peer_config(is_):
                continue
            if was is None:
                sections.append(PeerChanges(key, remove=True))
                continue
            if is_ is not None and was.endpoint is None and is_.endpoint is not None:
                sections.append(PeerChanges(key, remove=True))  # the only way to forget an endpoint
            sections.append(_restore_section(was))
        if not sections:
            return
        log.warning("%s: restoring %d peer(s) after a failed change", name, len(sections))
        code = response_errno(await self.backend.exchange(name, _validated(SetRequest(peers=tuple(sections)))))
        if code:
            log.error("%s: restoring peers failed: errno=%d (%s)", name, code, errno_name(code))


def _touched(before: DeviceSnapshot, peer: WireGuardPeer) -> set[bytes]:
    """The peer, and the peers that hold one of its allowed IPs (WireGuard moves them)."""
    wanted = {format_prefix(net) for net in peer.allowed_ips}
    touched = {bytes(peer.public_key)}
    for other in before.peers:
        if wanted.intersection(other.allowed_ips):
            touched.add(other.public_key)
    return touched
