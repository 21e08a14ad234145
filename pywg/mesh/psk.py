"""Per-pair preshared keys: the coordinator's secret, the derivation, the request reader.

With ``pywg coordinator serve --preshared-keys FILE`` every pair of nodes gets a
WireGuard preshared key (an extra symmetric secret mixed into the handshake), without a
table: the key of nodes A and B is derived from one 32-byte secret that every replica is
given (the same file)::

    HMAC-SHA256(secret, "pywg psk v1" || for the lower node id, then the higher: len(id) || id)

Both ends get the same key from any replica, nothing is stored, and removing a node needs
no cleanup. Node ids are 64 random bits and never handed out again, so a node removed and
registered again is a new id with new keys. The key belongs to the pair of nodes, not to
their WireGuard keys: a node that rotates its key (``pywg agent rotate``: its peers rename
it in place and handshake with the new key at once) keeps its preshared keys, so the
rename needs nothing from the coordinator and loses no packet; bound to the public keys,
both ends would have to switch keys at that very handshake. What renews every pair's key
is a new secret.

The secret file holds the secret in base64 (one line), mode 0600: a file that others may
read is refused. ``pywg coordinator psk-secret create FILE`` writes one (refusing to
overwrite). Nothing here logs, and :class:`PskSecret` never shows its bytes; its ``id``
(an HMAC of a constant) names it without telling anything about it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Any

from pywg.manage.key import Key
from pywg.manage.types import InvalidConfig
from pywg.mesh.wire import _need, _only, _type, read_key

SECRET_BYTES = 32
LABEL = b"pywg psk v1"
MAX_PEERS = 512  # pairs in one request (an agent asks in batches of this many)
MAX_NODE_ID = 64


class SecretFileError(ValueError):
    """The secret file is missing, unreadable, readable by others, or not a secret."""


@dataclass(frozen=True, repr=False, eq=False)
class PskSecret:
    """The coordinator's preshared-key secret (never shown)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != SECRET_BYTES:
            raise ValueError(f"the secret is {SECRET_BYTES} bytes")

    def __repr__(self) -> str:
        return "PskSecret(<hidden>)"

    __str__ = __repr__

    @property
    def id(self) -> str:
        """A name for this secret that tells nothing about it (16 hex digits): agents see
        from it that the secret changed and their keys with it."""
        return hmac.new(self.raw, b"pywg psk secret id v1", hashlib.sha256).hexdigest()[:16]

    def pair_key(self, a: str, b: str) -> Key:
        """The preshared key of nodes ``a`` and ``b`` (node ids; either order)."""
        if a == b:
            raise ValueError("a node has no preshared key with itself")
        mac = hmac.new(self.raw, LABEL, hashlib.sha256)
        for node_id in sorted((a, b)):
            ident = node_id.encode()
            mac.update(len(ident).to_bytes(2, "big") + ident)
        return Key(mac.digest())


def create_secret_file(path: str) -> None:
    """Write a new random secret to ``path`` (0600); FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # the umask may have taken bits away
        f.write(base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode() + "\n")


def load_secret_file(path: str) -> PskSecret:
    """The secret in ``path``; SecretFileError (never quoting the content) when unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SecretFileError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd) as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SecretFileError(f"{path}: not a regular file")
        if mode & 0o077:
            raise SecretFileError(f"{path}: mode {stat.S_IMODE(mode):04o} lets others read the secret; "
                                  f"chmod 600 it")
        text = f.read(256).strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != SECRET_BYTES:
        raise SecretFileError(f"{path}: expected {SECRET_BYTES} random bytes in base64 "
                              f"(pywg coordinator psk-secret create FILE makes one)")
    return PskSecret(raw)


@dataclass(frozen=True)
class PeerRef:
    """A pair's other end as the asking agent knows it: its node id and public key."""

    node_id: str
    public_key: Key


def read_psk_request(data: dict[str, Any]) -> tuple[PeerRef, ...]:
    """POST /api/v1/nodes/{id}/preshared-keys: ``{"peers": [{"nodeId": ID, "publicKey": KEY}, ...]}``
    (at most MAX_PEERS, no id twice); raises InvalidConfig naming the field."""
    _only(data, ("peers",))
    items = _need(data, "peers")
    if not isinstance(items, list):
        raise InvalidConfig(f"expected an array, got {_type(items)}", "peers")
    if len(items) > MAX_PEERS:
        raise InvalidConfig(f"at most {MAX_PEERS} peers in one request, got {len(items)}", "peers")
    out: list[PeerRef] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"peers[{i}]"
        if not isinstance(item, dict):
            raise InvalidConfig(f"expected an object, got {_type(item)}", where)
        _only(item, ("nodeId", "publicKey"), where)
        node_id = item.get("nodeId")
        if "nodeId" not in item:
            raise InvalidConfig("missing required field", f"{where}.nodeId")
        if not isinstance(node_id, str) or not node_id or len(node_id) > MAX_NODE_ID \
                or not node_id.isascii() or not node_id.isprintable():
            raise InvalidConfig(f"expected a node id (1..{MAX_NODE_ID} printable ASCII characters)",
                                f"{where}.nodeId")
        if node_id in seen:
            raise InvalidConfig(f"duplicate node (same as peers[{seen[node_id]}])", f"{where}.nodeId")
        if "publicKey" not in item:
            raise InvalidConfig("missing required field", f"{where}.publicKey")
        seen[node_id] = i
        out.append(PeerRef(node_id, read_key(item["publicKey"], f"{where}.publicKey")))
    return tuple(out)
