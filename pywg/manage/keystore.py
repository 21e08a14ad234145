"""``KeyStore``: private keys on disk, optionally encrypted at rest, with systemd credentials
as a read-only source.

Storage
-------
A keystore is one directory holding one file per key id. The directory is mode 0700 and
each key file mode 0600, both owned by the current user. ``KeyStore`` creates the directory
0700 when it is missing and refuses to use one that is not (or whose owner is someone
else); it refuses to load a key file that group or others can access, that another user
owns, or that is a symbolic link. These checks look at ``st_mode``/``st_uid`` explicitly,
so they hold for root too (the kernel lets root read anything).

A write is atomic: the new content goes to a temporary file ``.<id>.<random>.tmp`` in the
same directory (``O_CREAT|O_EXCL``, mode 0600), is fsynced, renamed over ``<id>``, and the
directory is fsynced. A failure at any step removes the temporary file and leaves the old
key as it was. ``store_private_key`` also refuses to replace an existing key file whose
mode or owner is wrong (the old key may have leaked: look at it before removing it).

Key ids are safe file names: 1 to 64 characters from ``[A-Za-z0-9._-]``, not starting with
``.`` (so ``..``, ``a/b`` and the temporary files are never ids).

systemd credentials
-------------------
When ``$CREDENTIALS_DIRECTORY`` is set (``LoadCredential=``/``SetCredential=``/
``LoadCredentialEncrypted=``; or ``credentials_directory=`` is given), a key that is not in
the keystore is looked up as the credential of the same name. A credential is the base64
key as ``wg genkey`` writes it (a trailing newline is optional), or a PYWGKEY1 file the
keystore can decrypt; a plain credential is accepted even when the keystore encrypts,
since systemd protects credentials itself. The credentials directory is read-only:
``store_private_key`` for an id that exists only there writes a new file into the keystore,
which from then on takes precedence over the credential (this is how a rotated key
replaces a provisioned one); ``delete_private_key`` refuses (``ReadOnlyKey``) an id that
exists only as a credential. A credential must be a regular file that others cannot
access and no one but its owner can write, owned by the current user or root (systemd
gives the service's user access through an ACL on a root-owned file, which shows as group
read).

File format
-----------
Unencrypted (no passphrase and no KEK): the base64 key and a newline, 45 bytes, exactly as
``wg genkey`` writes it, so ``wg set IF private-key FILE`` reads a keystore file directly.

Encrypted (binary; integers big-endian)::

    offset  size  field
    0       8     magic "PYWGKEY1" (format version 1)
    8       1     KDF id: 0x01 = argon2id v1.3 from a passphrase, 0x02 = raw 32-byte KEK
    --- KDF 0x01 only:
    9       4     argon2id opslimit (uint32)
    13      8     argon2id memlimit in bytes (uint64)
    21      16    salt (random)
    ---
    h       24    nonce (random; h = 37 for KDF 0x01, 9 for KDF 0x02)
    h+24    48    XChaCha20-Poly1305 (IETF) ciphertext of the 32 raw key bytes + 16-byte tag

The AEAD key is argon2id(passphrase, salt, opslimit, memlimit) (32 bytes) or the KEK
itself; the associated data is every byte before the ciphertext (magic, KDF id and
parameters, salt, nonce), so changing any byte of the file makes decryption fail. A
passphrase file is 109 bytes, a KEK file 81. The key id is not bound into the file, so a
file may be renamed or copied to another id. On reading, argon2id parameters must lie
within [OPSLIMIT_MIN, MAX_OPSLIMIT] and [MEMLIMIT_MIN, MAX_MEMLIMIT] so that a damaged file
cannot make the KDF run for hours or exhaust memory.

Errors
------
Every failure is a ``KeyStoreError``: ``InvalidKeyId``, ``KeyNotFound``,
``InsecurePermissions``, ``CorruptKeyFile`` (what is wrong: truncated, bad magic, bad
base64, ...), ``WrongPassphrase`` (also named ``DecryptionFailed``: the AEAD cannot tell a
wrong passphrase/KEK from a modified file), ``EncryptionMismatch`` (an encrypted file
without a passphrase or KEK, a plain file where encryption is configured, a passphrase
file opened with a KEK or the other way round) and ``ReadOnlyKey``. Messages name the id,
the path and the problem, never key material, passphrases or file contents; neither does
``repr(KeyStore)``.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import struct
from pathlib import Path

import nacl.bindings
import nacl.exceptions
from nacl.pwhash import argon2id

from pywg.manage.key import KEY_LEN, InvalidKey, Key

__all__ = [
    "DEFAULT_MEMLIMIT",
    "DEFAULT_OPSLIMIT",
    "KDF_ARGON2ID",
    "KDF_KEK",
    "MAGIC",
    "MAX_MEMLIMIT",
    "MAX_OPSLIMIT",
    "CorruptKeyFile",
    "DecryptionFailed",
    "EncryptionMismatch",
    "InsecurePermissions",
    "InvalidKeyId",
    "KeyNotFound",
    "KeyStore",
    "KeyStoreError",
    "ReadOnlyKey",
    "WrongPassphrase",
    "validate_key_id",
]

MAGIC = b"PYWGKEY1"
KDF_ARGON2ID = 0x01
KDF_KEK = 0x02

_ARGON2_PARAMS = struct.Struct(">IQ16s")  # opslimit, memlimit, salt
SALT_LEN = argon2id.SALTBYTES  # 16
NONCE_LEN = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_LEN = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
CIPHERTEXT_LEN = KEY_LEN + TAG_LEN
ARGON2ID_FILE_LEN = len(MAGIC) + 1 + _ARGON2_PARAMS.size + NONCE_LEN + CIPHERTEXT_LEN  # 109
KEK_FILE_LEN = len(MAGIC) + 1 + NONCE_LEN + CIPHERTEXT_LEN  # 81
PLAIN_KEY_LEN = 44  # base64 of 32 bytes

#: Defaults for new passphrase-encrypted files: libsodium's MODERATE (3 passes, 256 MiB).
DEFAULT_OPSLIMIT = argon2id.OPSLIMIT_MODERATE
DEFAULT_MEMLIMIT = argon2id.MEMLIMIT_MODERATE
#: The most expensive argon2id parameters accepted, when writing and when reading a file.
MAX_OPSLIMIT = 32
MAX_MEMLIMIT = argon2id.MEMLIMIT_SENSITIVE  # 1 GiB

#: Key files are tiny; anything bigger than this is not one (and is not read whole).
MAX_FILE_SIZE = 4096

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PRIVATE_MODE_MASK = 0o077  # no access at all for group and others


# --- errors -----------------------------------------------------------------------------------


class KeyStoreError(Exception):
    """Base of every keystore failure. ``key_id`` and ``path`` say where, when known."""

    def __init__(self, message: str, *, key_id: str | None = None, path: Path | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id
        self.path = path


class InvalidKeyId(KeyStoreError, ValueError):
    """An id that is not a safe file name."""


class KeyNotFound(KeyStoreError):
    """No key of that id in the keystore nor in the credentials directory."""


class InsecurePermissions(KeyStoreError):
    """A keystore directory or key file that others can access, or that someone else owns."""


class CorruptKeyFile(KeyStoreError):
    """A key file that is neither a base64 key nor a well-formed PYWGKEY1 file."""


class WrongPassphrase(KeyStoreError):
    """Authentication failed: a wrong passphrase or KEK, or a modified file (the AEAD cannot
    tell them apart)."""


DecryptionFailed = WrongPassphrase


class EncryptionMismatch(KeyStoreError):
    """The file's encryption does not match the keystore's (encrypted vs plain, or
    passphrase vs KEK)."""


class ReadOnlyKey(KeyStoreError):
    """A key that exists only in the read-only systemd credentials directory."""


def validate_key_id(key_id: object) -> str:
    """``key_id`` if it is a safe file name, else ``InvalidKeyId``."""
    if not isinstance(key_id, str):
        raise InvalidKeyId(f"a key id is a string, got {type(key_id).__name__}")
    if not _ID_RE.fullmatch(key_id):
        if not key_id:
            raise InvalidKeyId("a key id must not be empty")
        if len(key_id) > 64:
            raise InvalidKeyId(f"a key id is at most 64 characters, got {len(key_id)}")
        # name the offending character, not the id: a mistaken id may be a base64 key
        pos, char = next((i, c) for i, c in enumerate(key_id) if not _ID_RE.fullmatch(c))
        raise InvalidKeyId(
            f"invalid key id: character {char!r} at position {pos} is not allowed "
            "(only letters, digits, '.', '_' and '-')"
        )
    if key_id.startswith("."):
        raise InvalidKeyId("invalid key id: must not start with '.'")
    return key_id


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _strerror(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# --- the store --------------------------------------------------------------------------------


class KeyStore:
    """Private keys in ``directory``, optionally encrypted with ``passphrase`` (argon2id +
    XChaCha20-Poly1305) or ``kek`` (a 32-byte key-encryption key), with the systemd
    credentials directory as a read-only fallback. See the module docstring."""

    def __init__(
        self,
        directory: Path | str,
        *,
        passphrase: bytes | None = None,
        kek: bytes | Key | None = None,
        credentials_directory: Path | str | None = None,
        use_credentials: bool = True,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> None:
        if passphrase is not None and kek is not None:
            raise ValueError("give a passphrase or a kek, not both")
        if passphrase is not None:
            if not isinstance(passphrase, bytes | bytearray):
                raise TypeError(f"the passphrase is bytes (encode it), got {type(passphrase).__name__}")
            if not passphrase:
                raise ValueError("the passphrase must not be empty")
            passphrase = bytes(passphrase)
        if kek is not None:
            if isinstance(kek, Key):
                kek = bytes(kek)
            if not isinstance(kek, bytes | bytearray):
                raise TypeError(f"the kek is 32 bytes, got {type(kek).__name__}")
            if len(kek) != KEY_LEN:
                raise ValueError(f"the kek is {KEY_LEN} bytes, got {len(kek)}")
            kek = bytes(kek)
        if not argon2id.OPSLIMIT_MIN <= opslimit <= MAX_OPSLIMIT:
            raise ValueError(f"opslimit must be in [{argon2id.OPSLIMIT_MIN}, {MAX_OPSLIMIT}], got {opslimit}")
        if not argon2id.MEMLIMIT_MIN <= memlimit <= MAX_MEMLIMIT:
            raise ValueError(f"memlimit must be in [{argon2id.MEMLIMIT_MIN}, {MAX_MEMLIMIT}], got {memlimit}")
        self._directory = Path(directory)
        self._passphrase: bytes | None = passphrase
        self._kek: bytes | None = kek
        self.opslimit = opslimit
        self.memlimit = memlimit
        creds: Path | None = None
        if use_credentials:
            if credentials_directory is not None:
                creds = Path(credentials_directory)
            elif os.environ.get("CREDENTIALS_DIRECTORY"):
                creds = Path(os.environ["CREDENTIALS_DIRECTORY"])
        self._credentials_directory = creds

    # --- public surface ---------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def credentials_directory(self) -> Path | None:
        return self._credentials_directory

    @property
    def encryption(self) -> str | None:
        """``"passphrase"``, ``"kek"`` or ``None`` (keys stored as ``wg genkey`` writes them)."""
        if self._passphrase is not None:
            return "passphrase"
        if self._kek is not None:
            return "kek"
        return None

    def __repr__(self) -> str:
        creds = str(self._credentials_directory) if self._credentials_directory else None
        return (
            f"KeyStore({str(self._directory)!r}, encryption={self.encryption!r}, "
            f"credentials_directory={creds!r})"
        )

    def store_private_key(self, key_id: str, key: Key) -> None:
        """Write ``key`` as ``key_id``, atomically and durably, replacing any older key."""
        validate_key_id(key_id)
        if not isinstance(key, Key):
            raise TypeError(f"store_private_key takes a Key, got {type(key).__name__}")
        path = self._directory / key_id
        dfd = self._open_directory(create=True)
        assert dfd is not None
        try:
            self._check_replaceable(dfd, key_id, path)
            data = self._encode(key)
            tmp = f".{key_id}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(
                    tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                    dir_fd=dfd,
                )
            except OSError as exc:
                raise KeyStoreError(
                    f"cannot store key {key_id!r}: cannot create a file in {self._directory}: "
                    f"{_strerror(exc)}", key_id=key_id, path=path,
                ) from exc
            try:
                try:
                    os.fchmod(fd, 0o600)  # the umask may have taken bits away
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, key_id, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException as exc:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
                if isinstance(exc, OSError):
                    raise KeyStoreError(
                        f"cannot store key {key_id!r} in {self._directory}: {_strerror(exc)}; "
                        "the previous key, if any, is unchanged", key_id=key_id, path=path,
                    ) from exc
                raise
            try:
                os.fsync(dfd)
            except OSError as exc:
                raise KeyStoreError(
                    f"key {key_id!r} was written to {path} but the directory could not be "
                    f"synced: {_strerror(exc)}", key_id=key_id, path=path,
                ) from exc
        finally:
            os.close(dfd)

    def load_private_key(self, key_id: str) -> Key:
        """The key ``key_id`` from the keystore, else from the credentials directory."""
        validate_key_id(key_id)
        path = self._directory / key_id
        dfd = self._open_directory(create=False)
        if dfd is not None:
            try:
                data = self._read_keystore_file(dfd, key_id, path)
            finally:
                os.close(dfd)
            if data is not None:
                return self._decode(data, key_id, path, credential=False)
        cred_path = self._credential_path(key_id)
        if cred_path is not None:
            data = self._read_credential(key_id, cred_path)
            if data is not None:
                return self._decode(data, key_id, cred_path, credential=True)
        where = f"keystore {self._directory}"
        if self._credentials_directory is not None:
            where += f" or credentials directory {self._credentials_directory}"
        raise KeyNotFound(f"no key {key_id!r} in {where}", key_id=key_id, path=path)

    def delete_private_key(self, key_id: str) -> None:
        """Remove ``key_id`` from the keystore (a credential of the same name stays)."""
        validate_key_id(key_id)
        path = self._directory / key_id
        dfd = self._open_directory(create=False)
        if dfd is not None:
            try:
                try:
                    st = os.stat(key_id, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    if stat.S_ISDIR(st.st_mode):
                        raise KeyStoreError(f"{path} is a directory, not a key file", key_id=key_id, path=path)
                    try:
                        os.unlink(key_id, dir_fd=dfd)
                        os.fsync(dfd)
                    except OSError as exc:
                        raise KeyStoreError(
                            f"cannot delete key {key_id!r} ({path}): {_strerror(exc)}", key_id=key_id, path=path
                        ) from exc
                    return
            finally:
                os.close(dfd)
        cred_path = self._credential_path(key_id)
        if cred_path is not None and os.path.lexists(cred_path):
            raise ReadOnlyKey(
                f"key {key_id!r} exists only in the read-only credentials directory "
                f"{self._credentials_directory}; it cannot be deleted from there",
                key_id=key_id, path=cred_path,
            )
        raise KeyNotFound(f"no key {key_id!r} in keystore {self._directory}", key_id=key_id, path=path)

    def list_ids(self, *, include_credentials: bool = True) -> list[str]:
        """Sorted ids of the keystore's key files, and of the credentials whose names are
        valid ids (every such credential is listed, whatever it holds)."""
        ids: set[str] = set()
        dfd = self._open_directory(create=False)
        if dfd is not None:
            try:
                ids.update(self._list_fd(dfd, self._directory))
            finally:
                os.close(dfd)
        if include_credentials and self._credentials_directory is not None:
            try:
                cfd = os.open(self._credentials_directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                cfd = -1
            except OSError as exc:
                raise KeyStoreError(
                    f"cannot open credentials directory {self._credentials_directory}: {_strerror(exc)}"
                ) from exc
            if cfd >= 0:
                try:
                    ids.update(self._list_fd(cfd, self._credentials_directory))
                finally:
                    os.close(cfd)
        return sorted(ids)

    # --- directory ----------------------------------------------------------------------

    def _open_directory(self, *, create: bool) -> int | None:
        """An fd of the checked keystore directory; None when it is missing and not created."""
        created = False
        if create:
            try:
                self._directory.parent.mkdir(parents=True, exist_ok=True)
                os.mkdir(self._directory, 0o700)
                created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise KeyStoreError(
                    f"cannot create keystore {self._directory}: {_strerror(exc)}", path=self._directory
                ) from exc
        try:
            dfd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if create:
                raise KeyStoreError(f"keystore {self._directory} vanished", path=self._directory) from None
            return None
        except NotADirectoryError:
            raise KeyStoreError(f"keystore {self._directory} is not a directory", path=self._directory) from None
        except OSError as exc:
            raise KeyStoreError(
                f"cannot open keystore {self._directory}: {_strerror(exc)}", path=self._directory
            ) from exc
        try:
            if created:
                os.fchmod(dfd, 0o700)  # the umask may have taken bits away
            self._check_directory(os.fstat(dfd))
        except BaseException:
            os.close(dfd)
            raise
        return dfd

    def _check_directory(self, st: os.stat_result) -> None:
        d = self._directory
        uid = os.geteuid()
        if st.st_uid != uid:
            raise InsecurePermissions(
                f"keystore {d} is owned by uid {st.st_uid}, not by the current user (uid {uid})", path=d
            )
        if st.st_mode & _PRIVATE_MODE_MASK:
            raise InsecurePermissions(
                f"keystore {d} is mode {_mode(st)}: must not be accessible by group or others (chmod 700)",
                path=d,
            )

    def _list_fd(self, dfd: int, where: Path) -> set[str]:
        try:
            names = os.listdir(dfd)
        except OSError as exc:
            raise KeyStoreError(f"cannot list {where}: {_strerror(exc)}", path=where) from exc
        ids = set()
        for name in names:
            if not _ID_RE.fullmatch(name) or name.startswith("."):
                continue
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                ids.add(name)
        return ids

    # --- files ----------------------------------------------------------------------------

    def _check_replaceable(self, dfd: int, key_id: str, path: Path) -> None:
        """Refuse to overwrite something that is not a private key file of ours."""
        try:
            st = os.stat(key_id, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise KeyStoreError(f"cannot examine {path}: {_strerror(exc)}", key_id=key_id, path=path) from exc
        if not stat.S_ISREG(st.st_mode):
            raise InsecurePermissions(
                f"{path} is not a regular file (a symbolic link, directory or device?): "
                "refusing to replace it", key_id=key_id, path=path,
            )
        self._check_key_file(st, key_id, path, action="refusing to overwrite it")

    def _check_key_file(self, st: os.stat_result, key_id: str, path: Path, *, action: str) -> None:
        uid = os.geteuid()
        if st.st_uid != uid:
            raise InsecurePermissions(
                f"key file {path} is owned by uid {st.st_uid}, not by the current user (uid {uid}): {action}",
                key_id=key_id, path=path,
            )
        if st.st_mode & _PRIVATE_MODE_MASK:
            raise InsecurePermissions(
                f"key file {path} is mode {_mode(st)}: must not be accessible by group or others "
                f"(chmod 600, and consider the key exposed): {action}",
                key_id=key_id, path=path,
            )

    def _read_keystore_file(self, dfd: int, key_id: str, path: Path) -> bytes | None:
        try:
            fd = os.open(key_id, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InsecurePermissions(
                    f"key file {path} is a symbolic link: refusing to follow it", key_id=key_id, path=path
                ) from None
            raise KeyStoreError(f"cannot open key file {path}: {_strerror(exc)}", key_id=key_id, path=path) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptKeyFile(f"{path} is not a regular file", key_id=key_id, path=path)
            self._check_key_file(st, key_id, path, action="refusing to load it")
            return _read_limited(fd, key_id, path)
        finally:
            os.close(fd)

    def _credential_path(self, key_id: str) -> Path | None:
        if self._credentials_directory is None:
            return None
        return self._credentials_directory / key_id

    def _read_credential(self, key_id: str, path: Path) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise KeyStoreError(f"cannot open credential {path}: {_strerror(exc)}", key_id=key_id, path=path) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptKeyFile(f"credential {path} is not a regular file", key_id=key_id, path=path)
            uid = os.geteuid()
            if st.st_uid not in (uid, 0):
                raise InsecurePermissions(
                    f"credential {path} is owned by uid {st.st_uid}, neither the current user "
                    f"(uid {uid}) nor root: refusing to load it", key_id=key_id, path=path,
                )
            if st.st_mode & 0o027:
                raise InsecurePermissions(
                    f"credential {path} is mode {_mode(st)}: others must have no access and only "
                    "the owner may write (chmod 400): refusing to load it", key_id=key_id, path=path,
                )
            return _read_limited(fd, key_id, path)
        finally:
            os.close(fd)

    # --- format ---------------------------------------------------------------------------

    def _encode(self, key: Key) -> bytes:
        if self._passphrase is None and self._kek is None:
            return (key.to_base64() + "\n").encode("ascii")
        if self._passphrase is not None:
            salt = secrets.token_bytes(SALT_LEN)
            header = MAGIC + bytes([KDF_ARGON2ID]) + _ARGON2_PARAMS.pack(self.opslimit, self.memlimit, salt)
            aead_key = argon2id.kdf(KEY_LEN, self._passphrase, salt, opslimit=self.opslimit, memlimit=self.memlimit)
        else:
            assert self._kek is not None
            header = MAGIC + bytes([KDF_KEK])
            aead_key = self._kek
        nonce = secrets.token_bytes(NONCE_LEN)
        ad = header + nonce
        ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(key), ad, nonce, aead_key)
        return ad + ciphertext

    def _decode(self, data: bytes, key_id: str, path: Path, *, credential: bool) -> Key:
        what = f"credential {path}" if credential else f"key file {path}"
        if data.startswith(MAGIC):
            return self._decrypt(data, key_id, path, what)
        if data.startswith(MAGIC[:-1]):
            raise CorruptKeyFile(
                f"{what}: unsupported encrypted-key format version (this pywg reads PYWGKEY1)",
                key_id=key_id, path=path,
            )
        key = _parse_plain(data, key_id, path, what)
        if not credential and self.encryption is not None:
            raise EncryptionMismatch(
                f"{what} holds an unencrypted key, but this keystore was opened with a "
                f"{self.encryption}: refusing it (store the key again to encrypt it, or open the "
                "keystore without encryption)", key_id=key_id, path=path,
            )
        return key

    def _decrypt(self, data: bytes, key_id: str, path: Path, what: str) -> Key:
        if len(data) <= len(MAGIC):
            raise CorruptKeyFile(f"{what}: truncated after the PYWGKEY1 magic", key_id=key_id, path=path)
        kdf = data[len(MAGIC)]
        if kdf == KDF_ARGON2ID:
            expected, kind = ARGON2ID_FILE_LEN, "a passphrase-encrypted key file"
        elif kdf == KDF_KEK:
            expected, kind = KEK_FILE_LEN, "a KEK-encrypted key file"
        else:
            raise CorruptKeyFile(f"{what}: unknown KDF id 0x{kdf:02x}", key_id=key_id, path=path)
        if len(data) < expected:
            raise CorruptKeyFile(
                f"{what}: truncated: {len(data)} bytes, {kind} is {expected}", key_id=key_id, path=path
            )
        if len(data) > expected:
            raise CorruptKeyFile(
                f"{what}: {len(data) - expected} bytes of trailing data ({kind} is {expected} bytes)",
                key_id=key_id, path=path,
            )
        ad, ciphertext = data[: expected - CIPHERTEXT_LEN], data[expected - CIPHERTEXT_LEN:]
        nonce = ad[-NONCE_LEN:]
        if kdf == KDF_ARGON2ID:
            opslimit, memlimit, salt = _ARGON2_PARAMS.unpack_from(data, len(MAGIC) + 1)
            if not argon2id.OPSLIMIT_MIN <= opslimit <= MAX_OPSLIMIT:
                raise CorruptKeyFile(
                    f"{what}: argon2id opslimit {opslimit} outside [{argon2id.OPSLIMIT_MIN}, {MAX_OPSLIMIT}]",
                    key_id=key_id, path=path,
                )
            if not argon2id.MEMLIMIT_MIN <= memlimit <= MAX_MEMLIMIT:
                raise CorruptKeyFile(
                    f"{what}: argon2id memlimit {memlimit} outside [{argon2id.MEMLIMIT_MIN}, {MAX_MEMLIMIT}]",
                    key_id=key_id, path=path,
                )
            if self._passphrase is None:
                raise self._mismatch(what, "a passphrase", key_id, path)
            aead_key = argon2id.kdf(KEY_LEN, self._passphrase, salt, opslimit=opslimit, memlimit=memlimit)
            secret_name = "passphrase"
        else:
            if self._kek is None:
                raise self._mismatch(what, "a key-encryption key (KEK)", key_id, path)
            aead_key = self._kek
            secret_name = "key-encryption key"
        try:
            raw = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, aead_key)
        except nacl.exceptions.CryptoError:
            raise WrongPassphrase(
                f"cannot decrypt {what}: wrong {secret_name}, or the file was modified (authentication failed)",
                key_id=key_id, path=path,
            ) from None
        return Key(raw)

    def _mismatch(self, what: str, needs: str, key_id: str, path: Path) -> EncryptionMismatch:
        if self.encryption is None:
            have = "no passphrase or KEK was given"
        elif self.encryption == "kek":
            have = "this keystore was opened with a KEK"
        else:
            have = "this keystore was opened with a passphrase"
        return EncryptionMismatch(f"{what} is encrypted with {needs}, but {have}", key_id=key_id, path=path)


def _read_limited(fd: int, key_id: str, path: Path) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = os.read(fd, MAX_FILE_SIZE + 1 - size)
        except OSError as exc:
            raise KeyStoreError(f"cannot read {path}: {_strerror(exc)}", key_id=key_id, path=path) from exc
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_FILE_SIZE:
            raise CorruptKeyFile(
                f"{path} is larger than {MAX_FILE_SIZE} bytes: not a key file", key_id=key_id, path=path
            )
    return b"".join(chunks)


def _parse_plain(data: bytes, key_id: str, path: Path, what: str) -> Key:
    """The base64 key and an optional newline, as `wg genkey` writes it."""
    expected = "44 base64 characters and a newline, as `wg genkey` writes, or a PYWGKEY1 file"
    if not data:
        raise CorruptKeyFile(f"{what} is empty (expected {expected})", key_id=key_id, path=path)
    body = data[:-1] if data.endswith(b"\n") else data
    if len(body) != PLAIN_KEY_LEN:
        raise CorruptKeyFile(
            f"{what}: {len(data)} bytes is not a key (expected {expected})", key_id=key_id, path=path
        )
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptKeyFile(f"{what}: not text (expected {expected})", key_id=key_id, path=path) from None
    if text != text.strip():
        raise CorruptKeyFile(f"{what}: unexpected whitespace (expected {expected})", key_id=key_id, path=path)
    try:
        return Key.parse(text)
    except InvalidKey as exc:
        raise CorruptKeyFile(f"{what}: {exc}", key_id=key_id, path=path) from None
