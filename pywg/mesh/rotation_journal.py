"""The agent's key-rotation journal: what a rotation in progress has done, on disk, so an
agent that crashed (or whose coordinator went away) in the middle finishes it on restart.

Files in the agent's state dir (0700):

- ``keys/wireguard``: the key the node uses (its identity, see ``pywg.mesh.agent``);
- ``keys/wireguard.next``: a new key not in use yet (phase ``prepared``);
- ``keys/wireguard.previous``: the old key, still accepted during the overlap (phase
  ``promoted``);
- ``rotation.json`` (0600, written atomically; public keys and times only, never a
  private key): ``{"phase", "nodeId", "oldPublicKey", "newPublicKey", "overlap",
  "startedAt", "dropAt"}``.

Order of writes, and what a restart finds:

1. ``wireguard.next`` stored, then the journal written with phase ``prepared``: a crash
   between the two leaves a ``.next`` without a journal, which :func:`recover_keys`
   deletes (nothing else had changed).
2. phase ``prepared``: the device may hold the new key as its secondary and the
   coordinator may have it; the node still uses (and the keystore's ``wireguard`` still is)
   the old key. The agent resumes the rotation: the secondary key again (idempotent), the
   announcement again (the same key twice is no change), the wait, the promotion.
3. the journal is rewritten with phase ``promoted`` before the keystore swap
   (``wireguard`` -> ``wireguard.previous``, ``.next`` -> ``wireguard``): a crash in the
   swap is completed by :func:`recover_keys`, so the agent comes back with the new key;
   it promotes the device's key if the device still initiates with the old one.
4. after the overlap the old key is dropped from the device, ``wireguard.previous`` and
   the journal deleted.

Nothing here does network I/O; the keystore and file system only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pywg.manage.key import InvalidKey, Key
from pywg.manage.keymanager import KeyManager
from pywg.manage.keystore import KeyNotFound, KeyStore

KEY_ID = "wireguard"
NEXT_ID = f"{KEY_ID}.next"
PREVIOUS_ID = f"{KEY_ID}.previous"
JOURNAL = "rotation.json"
PREPARED = "prepared"
PROMOTED = "promoted"


class BadJournal(ValueError):
    """rotation.json cannot be read as a journal (it is then set aside, see load)."""


@dataclass(frozen=True)
class Journal:
    """A rotation in progress (public keys and times only)."""

    phase: str  # PREPARED or PROMOTED
    node_id: str
    old_public_key: str
    new_public_key: str
    overlap: float
    started_at: float
    drop_at: float | None = None  # PROMOTED: when the old key is dropped

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {"phase": d["phase"], "nodeId": d["node_id"], "oldPublicKey": d["old_public_key"],
                "newPublicKey": d["new_public_key"], "overlap": d["overlap"], "startedAt": d["started_at"],
                "dropAt": d["drop_at"]}

    @classmethod
    def from_json(cls, data: object) -> Journal:
        if not isinstance(data, dict):
            raise BadJournal("not an object")
        try:
            journal = cls(phase=data["phase"], node_id=data["nodeId"], old_public_key=data["oldPublicKey"],
                          new_public_key=data["newPublicKey"], overlap=float(data["overlap"]),
                          started_at=float(data["startedAt"]),
                          drop_at=None if data.get("dropAt") is None else float(data["dropAt"]))
            Key.parse(journal.old_public_key)
            Key.parse(journal.new_public_key)
        except (KeyError, TypeError, ValueError, InvalidKey) as exc:
            raise BadJournal(f"{type(exc).__name__}: {exc}") from None
        if journal.phase not in (PREPARED, PROMOTED) or not isinstance(journal.node_id, str):
            raise BadJournal(f"unknown phase {journal.phase!r}")
        if not all(math.isfinite(v) for v in (journal.overlap, journal.started_at, journal.drop_at or 0.0)):
            raise BadJournal("a time that is not a finite number")
        return journal


class RotationState:
    """The journal and the three keystore entries of one agent's state dir."""

    def __init__(self, state_dir: Path, keys: KeyManager | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.keys = keys or KeyManager(KeyStore(self.state_dir / "keys", use_credentials=False))
        self.path = self.state_dir / JOURNAL

    def __repr__(self) -> str:
        return f"RotationState({str(self.state_dir)!r})"

    @property
    def store(self) -> KeyStore:
        return self.keys.keystore

    # --- the journal --------------------------------------------------------------------------

    def load(self) -> Journal | None:
        """The journal, None when no rotation is in progress. An unreadable one is renamed
        to rotation.json.bad and reported as BadJournal (once)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return Journal.from_json(json.loads(text))
        except (ValueError, BadJournal) as exc:
            os.replace(self.path, self.path.with_suffix(".json.bad"))
            raise BadJournal(f"{self.path}: {exc}") from None

    def save(self, journal: Journal) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(journal.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    # --- keys ---------------------------------------------------------------------------------

    def current(self) -> Key:
        return self.store.load_private_key(KEY_ID)

    def prepare(self, new: Key, journal: Journal) -> None:
        """Step 1: the new key stored as ``.next``, then the journal (phase prepared)."""
        self.store.store_private_key(NEXT_ID, new)
        self.save(journal)

    def next_key(self) -> Key:
        return self.store.load_private_key(NEXT_ID)

    def promote(self, journal: Journal) -> None:
        """Step 3: journal first (phase promoted), then the keystore swap."""
        self.save(journal)
        self._swap(journal)

    def _swap(self, journal: Journal) -> None:
        try:
            new = self.next_key()
        except KeyNotFound:
            return  # swapped already
        current = self.current()
        if current.public_key().to_base64() == journal.old_public_key:
            self.store.store_private_key(PREVIOUS_ID, current)
        self.keys.store_private_key(KEY_ID, new)  # its creation time (the key's age) is now
        self.store.delete_private_key(NEXT_ID)

    def finish(self) -> None:
        """Step 4: the old key and the journal go."""
        with contextlib.suppress(KeyNotFound):
            self.store.delete_private_key(PREVIOUS_ID)
        self.clear()

    def abandon(self) -> None:
        """Undo a rotation that never got past phase prepared: the new key and the journal go."""
        with contextlib.suppress(KeyNotFound):
            self.store.delete_private_key(NEXT_ID)
        self.clear()

    def recover_keys(self) -> Journal | None:
        """Before the agent loads its identity: make the keystore match the journal (a
        ``.next`` without a journal is deleted; a promotion's swap is completed). Returns
        the journal of the rotation still in progress."""
        try:
            journal = self.load()
        except BadJournal:
            journal = None
        if journal is None:
            for stale in (NEXT_ID, PREVIOUS_ID):
                with contextlib.suppress(KeyNotFound):
                    self.store.delete_private_key(stale)
            return None
        if journal.phase == PREPARED:
            try:
                self.next_key()
            except KeyNotFound:  # the new key is gone: nothing can be finished
                self.clear()
                return None
        else:
            self._swap(journal)
        return journal
