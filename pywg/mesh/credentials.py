"""Pre-auth keys and bearer tokens: generation, parsing and hashing.

A pre-auth key reads ``pywg-authkey-<id>-<secret>``: ``id`` (12 hex digits) names the key
in listings, logs and the node's identity; ``secret`` is 32 random bytes (base64url). The
store keeps only SHA-256 of the secret and compares digests in constant time. A node
token (``pywg-node-<secret>``) and the admin token (``pywg-admin-<secret>``) are 32
random bytes too; the store looks a node token up by its SHA-256. Being high-entropy,
the secrets need no slow password hash: SHA-256 cannot be inverted or guessed.

Nothing here logs, and ``AuthKeyId`` is the only part of a key that may be shown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

AUTH_KEY_PREFIX = "pywg-authkey-"
NODE_TOKEN_PREFIX = "pywg-node-"
ADMIN_TOKEN_PREFIX = "pywg-admin-"
SECRET_BYTES = 32

_SECRET = r"[A-Za-z0-9_-]{43}"
_AUTH_KEY = re.compile(re.escape(AUTH_KEY_PREFIX) + r"([0-9a-f]{12})-(" + _SECRET + ")")


class BadCredential(ValueError):
    """A key or token that is not of the expected form (the message never echoes it)."""


def _secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")


def digest(secret: str) -> str:
    """SHA-256 of a secret, hex: what the store keeps."""
    return hashlib.sha256(secret.encode()).hexdigest()


def digests_equal(a: str, b: str) -> bool:
    """Compare two digests in constant time."""
    return hmac.compare_digest(a.encode(), b.encode())


def new_auth_key() -> tuple[str, str, str]:
    """A new pre-auth key: (key id, the full key text to hand out, the digest to store)."""
    key_id = secrets.token_hex(6)
    secret = _secret()
    return key_id, f"{AUTH_KEY_PREFIX}{key_id}-{secret}", digest(secret)


def parse_auth_key(text: str) -> tuple[str, str]:
    """(key id, digest of the secret) of a presented pre-auth key; raises BadCredential."""
    m = _AUTH_KEY.fullmatch(text)
    if not m:
        raise BadCredential(f"not a pre-auth key (expected {AUTH_KEY_PREFIX}<12 hex>-<43 base64url>)")
    return m.group(1), digest(m.group(2))


def new_node_token() -> tuple[str, str]:
    """A new node token: (the token text, the digest to store)."""
    token = NODE_TOKEN_PREFIX + _secret()
    return token, digest(token)


def new_admin_token() -> str:
    """A new admin token (the coordinator keeps its digest only)."""
    return ADMIN_TOKEN_PREFIX + _secret()
