"""The agent's key operations on its own WireGuard device, one UAPI set request each,
through the TunnelManager (so they are serialised with the agent's other calls):
secondary key in and out, promotion, rekeys, and a peer renamed in place.

pywg's extension keys (``pywg.uapi.protocol``) keep every session; a device that is not
pywg (wireguard-go, the kernel) answers -22 to them, and the callers fall back to the
plain operations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

from pywg.manage.backends.base import BackendFailure
from pywg.manage.key import Key
from pywg.manage.tunnel import ManagerError, TunnelManager
from pywg.manage.types import WireGuardPeer
from pywg.manage.uapi_client import errno_name, response_errno
from pywg.uapi.protocol import (
    GET_REQUEST,
    IPC_ERROR_INVALID,
    DeviceChanges,
    PeerChanges,
    SetRequest,
    UapiError,
    format_set,
    parse_get,
)

log = logging.getLogger(__name__)


class DeviceKeyError(Exception):
    """The device refused a key operation (its errno in the message)."""


async def _exchange(manager: TunnelManager, iface: str, text: str) -> str:
    try:
        return await manager.exchange(iface, text)
    except (BackendFailure, ManagerError, UapiError, OSError, TimeoutError) as exc:
        raise DeviceKeyError(f"interface {iface}: {exc}") from None


async def _set(manager: TunnelManager, iface: str, request: SetRequest) -> int:
    try:
        return response_errno(await _exchange(manager, iface, format_set(request)))
    except UapiError as exc:
        raise DeviceKeyError(f"interface {iface}: {exc}") from None


async def _must(manager: TunnelManager, iface: str, request: SetRequest, what: str) -> None:
    code = await _set(manager, iface, request)
    if code:
        raise DeviceKeyError(f"interface {iface} refused to {what}: errno={code} ({errno_name(code)})")


async def private_public_key(manager: TunnelManager, iface: str) -> str | None:
    """The public key of the key the device initiates with (None: it has none)."""
    try:
        snapshot = parse_get(await _exchange(manager, iface, GET_REQUEST))
    except UapiError as exc:
        raise DeviceKeyError(f"interface {iface}: {exc}") from None
    return None if snapshot.private_key is None else Key(snapshot.private_key).public_key().to_base64()


async def add_secondary(manager: TunnelManager, iface: str, key: Key) -> bool:
    """Accept handshakes addressed to ``key`` too; False when the device is not pywg."""
    code = await _set(manager, iface, SetRequest(DeviceChanges(secondary_private_key=bytes(key))))
    if code == IPC_ERROR_INVALID:
        return False
    if code:
        raise DeviceKeyError(f"interface {iface} refused the new key: errno={code} ({errno_name(code)})")
    return True


async def drop_secondary(manager: TunnelManager, iface: str) -> None:
    """End the overlap: the old key is no longer accepted (no-op on a device without one)."""
    code = await _set(manager, iface, SetRequest(DeviceChanges(secondary_private_key=None)))
    if code and code != IPC_ERROR_INVALID:
        raise DeviceKeyError(f"interface {iface} refused to drop its old key: errno={code} ({errno_name(code)})")


def _rekeys(peers: Iterable[str]) -> tuple[PeerChanges, ...]:
    return tuple(PeerChanges(bytes(Key.parse(k)), update_only=True, rekey=True) for k in sorted(peers))


async def promote(manager: TunnelManager, iface: str, key: Key, *, pywg: bool, rekey: Iterable[str] = ()) -> None:
    """Initiate with ``key`` from now on. pywg: the secondary is promoted (sessions kept,
    the old key still accepted) and a handshake started with each of ``rekey``; else the
    key is set as ``private_key`` (the device's sessions end)."""
    if pywg:
        await _must(manager, iface, SetRequest(DeviceChanges(promote_secondary=True), _rekeys(rekey)),
                    "promote the new key")
    else:
        await _must(manager, iface, SetRequest(DeviceChanges(private_key=bytes(key))), "take the new key")


async def rename_peer(manager: TunnelManager, iface: str, old_key: str, peer: WireGuardPeer) -> bool:
    """The peer ``old_key`` rotated: it becomes ``peer`` (its new key and configuration),
    sessions kept on pywg, then a handshake with its new key is started at once, so the
    rotating node sees that this node has its new key. False: replaced (not pywg)."""
    kept = await manager.update_peer(iface, replace(peer, public_key=Key.parse(old_key)),
                                     new_public_key=peer.public_key)
    if kept:
        code = await _set(manager, iface, SetRequest(peers=_rekeys([peer.public_key.to_base64()])))
        if code:
            log.info("interface %s: no handshake started with the renamed peer (errno=%d)", iface, code)
    return kept
