"""KeyStore: the keystore directory, encryption at rest and systemd credentials.

Runs as root here, and root bypasses the kernel's permission checks: every refusal below is
the keystore's own st_mode/st_uid check. argon2id runs at libsodium's minimum parameters so
the suite stays fast.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.pwhash import argon2id

from pywg.manage import keystore
from pywg.manage.key import Key
from pywg.manage.keystore import (
    ARGON2ID_FILE_LEN,
    KEK_FILE_LEN,
    MAGIC,
    CorruptKeyFile,
    DecryptionFailed,
    EncryptionMismatch,
    InsecurePermissions,
    InvalidKeyId,
    KeyNotFound,
    KeyStore,
    KeyStoreError,
    ReadOnlyKey,
    WrongPassphrase,
)

FAST = {"opslimit": argon2id.OPSLIMIT_MIN, "memlimit": argon2id.MEMLIMIT_MIN}
PASSPHRASE = b"correct horse battery staple"
KEK = bytes(range(32))


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def plain(d: Path, **kw: object) -> KeyStore:
    return KeyStore(d, **kw)  # type: ignore[arg-type]


def with_passphrase(d: Path, passphrase: bytes = PASSPHRASE, **kw: object) -> KeyStore:
    return KeyStore(d, passphrase=passphrase, **FAST, **kw)  # type: ignore[arg-type]


def with_kek(d: Path, kek: bytes = KEK, **kw: object) -> KeyStore:
    return KeyStore(d, kek=kek, **kw)  # type: ignore[arg-type]


STORES: dict[str, Callable[[Path], KeyStore]] = {"plain": plain, "passphrase": with_passphrase, "kek": with_kek}


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def write_file(p: Path, data: bytes, file_mode: int = 0o600) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(p, file_mode)


def secret_free(exc: BaseException, *keys: Key) -> None:
    """The message carries no key material and no passphrase."""
    text = str(exc) + repr(exc)
    for key in keys:
        assert key.to_base64() not in text
        assert key.to_base64()[:20] not in text
        assert key.hex()[:16] not in text
    assert PASSPHRASE.decode() not in text


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STORES)
def test_round_trip(keydir: Path, kind: str) -> None:
    store = STORES[kind](keydir)
    key = Key.generate_private()
    store.store_private_key("wg0", key)
    assert store.load_private_key("wg0") == key
    # a new instance with the same secret reads it back
    assert STORES[kind](keydir).load_private_key("wg0") == key
    assert store.list_ids() == ["wg0"]


def test_plain_file_is_what_wg_genkey_writes(keydir: Path) -> None:
    key = Key.generate_private()
    plain(keydir).store_private_key("wg0", key)
    content = (keydir / "wg0").read_bytes()
    assert content == (key.to_base64() + "\n").encode()
    assert Key.parse(content.decode()) == key


def test_plain_file_readable_by_wg_pubkey(keydir: Path) -> None:
    key = Key.generate_private()
    plain(keydir).store_private_key("wg0", key)
    wg = shutil.which("wg") or ("/usr/bin/wg" if os.path.exists("/usr/bin/wg") else None)
    if wg is None:
        if os.environ.get("CI") == "true":
            pytest.fail("`wg` (wireguard-tools) is required under CI=true")
        pytest.skip("`wg` not installed")
    with open(keydir / "wg0", "rb") as f:
        out = subprocess.run([wg, "pubkey"], stdin=f, capture_output=True, check=True, timeout=10)
    assert out.stdout.decode().strip() == key.public_key().to_base64()


def test_wg_genkey_output_loads(keydir: Path) -> None:
    wg = shutil.which("wg")
    if wg is None:
        if os.environ.get("CI") == "true":
            pytest.fail("`wg` (wireguard-tools) is required under CI=true")
        pytest.skip("`wg` not installed")
    text = subprocess.run([wg, "genkey"], capture_output=True, check=True, timeout=10).stdout
    keydir.mkdir(mode=0o700)
    write_file(keydir / "from-wg", text)
    assert plain(keydir).load_private_key("from-wg") == Key.parse(text.decode())


@pytest.mark.parametrize("kind,length", [("passphrase", ARGON2ID_FILE_LEN), ("kek", KEK_FILE_LEN)])
def test_encrypted_file_layout(keydir: Path, kind: str, length: int) -> None:
    store = STORES[kind](keydir)
    key = Key.generate_private()
    store.store_private_key("k", key)
    first = (keydir / "k").read_bytes()
    assert first.startswith(MAGIC) and len(first) == length
    assert bytes(key) not in first and key.to_base64().encode() not in first
    store.store_private_key("k", key)
    assert (keydir / "k").read_bytes() != first  # fresh salt / nonce every time
    if kind == "passphrase":
        assert first[8] == keystore.KDF_ARGON2ID
        assert int.from_bytes(first[9:13], "big") == argon2id.OPSLIMIT_MIN
        assert int.from_bytes(first[13:21], "big") == argon2id.MEMLIMIT_MIN
    else:
        assert first[8] == keystore.KDF_KEK


def test_replace_existing_key(keydir: Path) -> None:
    store = plain(keydir)
    old, new = Key.generate_private(), Key.generate_private()
    store.store_private_key("wg0", old)
    store.store_private_key("wg0", new)
    assert store.load_private_key("wg0") == new
    assert mode(keydir / "wg0") == 0o600
    assert sorted(os.listdir(keydir)) == ["wg0"]


def test_kek_may_be_a_key(keydir: Path) -> None:
    kek = Key.generate_preshared()
    key = Key.generate_private()
    KeyStore(keydir, kek=kek).store_private_key("a", key)
    assert KeyStore(keydir, kek=bytes(kek)).load_private_key("a") == key


# --- modes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
@pytest.mark.parametrize("kind", STORES)
def test_modes_after_store(tmp_path: Path, kind: str, umask: int) -> None:
    keydir = tmp_path / "a" / "b" / "keys"  # parents are created too
    if umask & 0o200:
        keydir.parent.mkdir(parents=True)  # parents made under such a umask would be read-only
    old = os.umask(umask)
    try:
        STORES[kind](keydir).store_private_key("wg0", Key.generate_private())
    finally:
        os.umask(old)
    assert mode(keydir) == 0o700
    assert mode(keydir / "wg0") == 0o600
    st_ = os.stat(keydir / "wg0")
    assert st_.st_uid == os.geteuid()


# --- permission refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o666])
def test_refuses_file_accessible_by_others(keydir: Path, file_mode: int) -> None:
    store = plain(keydir)
    old = Key.generate_private()
    store.store_private_key("wg0", old)
    path = keydir / "wg0"
    os.chmod(path, file_mode)
    before = path.read_bytes()
    with pytest.raises(InsecurePermissions) as info:
        store.load_private_key("wg0")
    assert str(path) in str(info.value) and f"{file_mode:04o}" in str(info.value)
    assert "group or others" in str(info.value)
    secret_free(info.value, old)
    # nor is it overwritten: the old key may have leaked and must be looked at
    with pytest.raises(InsecurePermissions):
        store.store_private_key("wg0", Key.generate_private())
    assert path.read_bytes() == before and mode(path) == file_mode
    assert sorted(os.listdir(keydir)) == ["wg0"]


@pytest.mark.parametrize("dir_mode", [0o755, 0o750, 0o705, 0o770, 0o701, 0o710, 0o777])
def test_refuses_directory_accessible_by_others(keydir: Path, dir_mode: int) -> None:
    store = plain(keydir)
    store.store_private_key("wg0", Key.generate_private())
    before = (keydir / "wg0").read_bytes()
    os.chmod(keydir, dir_mode)
    with pytest.raises(InsecurePermissions) as info:
        store.load_private_key("wg0")
    assert str(info.value) == (
        f"keystore {keydir} is mode {dir_mode:04o}: must not be accessible by group or others (chmod 700)"
    )
    with pytest.raises(InsecurePermissions):
        store.store_private_key("wg0", Key.generate_private())
    with pytest.raises(InsecurePermissions):
        store.store_private_key("other", Key.generate_private())
    with pytest.raises(InsecurePermissions):
        store.list_ids()
    with pytest.raises(InsecurePermissions):
        store.delete_private_key("wg0")
    assert (keydir / "wg0").read_bytes() == before
    assert sorted(os.listdir(keydir)) == ["wg0"]
    assert mode(keydir) == dir_mode  # not silently "fixed"


def test_existing_directory_with_bad_mode_is_not_used_for_a_first_store(keydir: Path) -> None:
    keydir.mkdir(mode=0o755)
    os.chmod(keydir, 0o755)
    with pytest.raises(InsecurePermissions, match="0755"):
        plain(keydir).store_private_key("wg0", Key.generate_private())
    assert os.listdir(keydir) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_refuses_foreign_owner(keydir: Path) -> None:
    store = plain(keydir)
    store.store_private_key("wg0", Key.generate_private())
    os.chown(keydir / "wg0", 12345, 12345)
    with pytest.raises(InsecurePermissions, match="owned by uid 12345"):
        store.load_private_key("wg0")
    with pytest.raises(InsecurePermissions, match="owned by uid 12345"):
        store.store_private_key("wg0", Key.generate_private())
    os.chown(keydir / "wg0", 0, 0)
    os.chown(keydir, 12345, 12345)
    with pytest.raises(InsecurePermissions, match=f"keystore {keydir} is owned by uid 12345"):
        store.load_private_key("wg0")
    with pytest.raises(InsecurePermissions):
        store.store_private_key("wg0", Key.generate_private())


def test_refuses_symlinked_key_file(keydir: Path, tmp_path: Path) -> None:
    store = plain(keydir)
    store.store_private_key("real", Key.generate_private())
    target = tmp_path / "elsewhere"
    write_file(target, (Key.generate_private().to_base64() + "\n").encode())
    os.symlink(target, keydir / "link")
    with pytest.raises(InsecurePermissions, match="symbolic link"):
        store.load_private_key("link")
    with pytest.raises(InsecurePermissions, match="not a regular file"):
        store.store_private_key("link", Key.generate_private())
    assert os.path.islink(keydir / "link")
    assert store.list_ids() == ["real"]


def test_refuses_fifo_and_directory_without_blocking(keydir: Path) -> None:
    store = plain(keydir)
    store.store_private_key("x", Key.generate_private())
    os.mkfifo(keydir / "fifo", 0o600)
    os.mkdir(keydir / "sub", 0o700)
    with pytest.raises(CorruptKeyFile, match="not a regular file"):
        store.load_private_key("fifo")
    with pytest.raises(CorruptKeyFile, match="not a regular file"):
        store.load_private_key("sub")
    with pytest.raises(KeyStoreError):
        store.delete_private_key("sub")


def test_keystore_path_is_a_file(tmp_path: Path) -> None:
    write_file(tmp_path / "file", b"x")
    with pytest.raises(KeyStoreError, match="not a directory"):
        plain(tmp_path / "file").load_private_key("a")
    with pytest.raises(KeyStoreError):
        plain(tmp_path / "file").store_private_key("a", Key.generate_private())


# --- corrupted and truncated files ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["passphrase", "kek"])
def test_every_byte_flip_is_detected(keydir: Path, kind: str) -> None:
    store = STORES[kind](keydir)
    key = Key.generate_private()
    store.store_private_key("k", key)
    path = keydir / "k"
    good = path.read_bytes()
    for i in range(len(good)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[i] ^= flip
            write_file(path, bytes(bad))
            with pytest.raises((CorruptKeyFile, WrongPassphrase, EncryptionMismatch)) as info:
                store.load_private_key("k")
            secret_free(info.value, key)
    write_file(path, good)
    assert store.load_private_key("k") == key


@pytest.mark.parametrize("kind", STORES)
def test_every_truncation_is_detected(keydir: Path, kind: str) -> None:
    store = STORES[kind](keydir)
    key = Key.generate_private()
    store.store_private_key("k", key)
    path = keydir / "k"
    good = path.read_bytes()
    # a plain key without its newline is still what `wg` accepts
    shortest_valid = len(good) - 1 if kind == "plain" else len(good)
    for n in range(shortest_valid):
        write_file(path, good[:n])
        with pytest.raises(CorruptKeyFile) as info:
            store.load_private_key("k")
        secret_free(info.value, key)
    for extra in (b"\n", b"x", b"\x00" * 10):
        write_file(path, good + extra)
        with pytest.raises(CorruptKeyFile):
            store.load_private_key("k")


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b"not a key\n", "not a key"),
        (b"A" * 43 + b"=\n\n", "bytes is not a key"),
        (b" " + b"A" * 43 + b"\n", "whitespace"),
        (b"\xff" * 44 + b"\n", "not text"),
        (b"!" * 43 + b"=\n", "base64"),
        (b"A" * 44 + b"\n", "44 base64 characters ending in '='"),
        (MAGIC, "truncated"),
        (MAGIC + b"\x07" + bytes(100), "unknown KDF id 0x07"),
        (b"PYWGKEY2" + bytes(100), "format version"),
        (b"x" * 5000, "larger than 4096"),
    ],
)
def test_corrupt_file_messages(keydir: Path, content: bytes, message: str) -> None:
    keydir.mkdir(mode=0o700)
    write_file(keydir / "k", content)
    store = with_kek(keydir) if content.startswith(MAGIC) else plain(keydir)
    with pytest.raises(CorruptKeyFile, match=message) as info:
        store.load_private_key("k")
    assert str(keydir / "k") in str(info.value)


@pytest.mark.parametrize("field,value", [("ops", 0), ("ops", 10_000), ("mem", 1024), ("mem", 1 << 40)])
def test_kdf_parameters_out_of_range_are_refused_before_running(keydir: Path, field: str, value: int) -> None:
    store = with_passphrase(keydir)
    store.store_private_key("k", Key.generate_private())
    data = bytearray((keydir / "k").read_bytes())
    if field == "ops":
        data[9:13] = value.to_bytes(4, "big")
    else:
        data[13:21] = value.to_bytes(8, "big")
    write_file(keydir / "k", bytes(data))
    with pytest.raises(CorruptKeyFile, match="opslimit" if field == "ops" else "memlimit"):
        store.load_private_key("k")


# --- secrets ------------------------------------------------------------------------------------


def test_wrong_passphrase(keydir: Path) -> None:
    key = Key.generate_private()
    with_passphrase(keydir).store_private_key("k", key)
    before = (keydir / "k").read_bytes()
    with pytest.raises(WrongPassphrase, match="wrong passphrase") as info:
        with_passphrase(keydir, b"Tr0ub4dor&3").load_private_key("k")
    secret_free(info.value, key)
    assert "Tr0ub4dor" not in str(info.value)
    assert (keydir / "k").read_bytes() == before


def test_wrong_kek(keydir: Path) -> None:
    key = Key.generate_private()
    with_kek(keydir).store_private_key("k", key)
    with pytest.raises(DecryptionFailed, match="wrong key-encryption key") as info:
        with_kek(keydir, bytes(32)).load_private_key("k")
    assert isinstance(info.value, WrongPassphrase)
    secret_free(info.value, key)


def test_passphrase_from_other_params_still_loads(keydir: Path) -> None:
    key = Key.generate_private()
    KeyStore(keydir, passphrase=PASSPHRASE, opslimit=2, memlimit=16384).store_private_key("k", key)
    assert with_passphrase(keydir).load_private_key("k") == key


@pytest.mark.parametrize(
    "writer,reader,message",
    [
        ("passphrase", "plain", "encrypted with a passphrase, but no passphrase or KEK was given"),
        ("kek", "plain", r"encrypted with a key-encryption key \(KEK\), but no passphrase or KEK"),
        ("plain", "passphrase", "unencrypted key, but this keystore was opened with a passphrase"),
        ("plain", "kek", "unencrypted key, but this keystore was opened with a kek"),
        ("passphrase", "kek", "encrypted with a passphrase, but this keystore was opened with a KEK"),
        ("kek", "passphrase", "encrypted with a key-encryption key .*opened with a passphrase"),
    ],
)
def test_encryption_mismatch(keydir: Path, writer: str, reader: str, message: str) -> None:
    key = Key.generate_private()
    STORES[writer](keydir).store_private_key("k", key)
    with pytest.raises(EncryptionMismatch, match=message) as info:
        STORES[reader](keydir).load_private_key("k")
    secret_free(info.value, key)


def test_repr_hides_secrets(keydir: Path) -> None:
    store = with_passphrase(keydir)
    text = repr(store)
    assert str(keydir) in text and "passphrase" in text
    assert PASSPHRASE.decode() not in text and repr(PASSPHRASE) not in text
    kek_store = with_kek(keydir)
    assert "'kek'" in repr(kek_store) and KEK.hex() not in repr(kek_store) and repr(KEK) not in repr(kek_store)
    assert "encryption=None" in repr(plain(keydir))


def test_constructor_validation(keydir: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        KeyStore(keydir, passphrase=b"x", kek=KEK)
    with pytest.raises(ValueError, match="32 bytes"):
        KeyStore(keydir, kek=b"short")
    with pytest.raises(ValueError, match="empty"):
        KeyStore(keydir, passphrase=b"")
    with pytest.raises(TypeError, match="bytes"):
        KeyStore(keydir, passphrase="text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="opslimit"):
        KeyStore(keydir, passphrase=b"x", opslimit=0)
    with pytest.raises(ValueError, match="memlimit"):
        KeyStore(keydir, passphrase=b"x", memlimit=1 << 40)
    defaults = KeyStore(keydir, passphrase=b"x")
    assert defaults.opslimit >= argon2id.OPSLIMIT_INTERACTIVE
    assert defaults.memlimit >= argon2id.MEMLIMIT_INTERACTIVE
    assert not keydir.exists()  # constructing touches nothing


# --- atomicity --------------------------------------------------------------------------------


def _boom(*args: object, **kwargs: object) -> None:
    raise OSError(5, "Input/output error")


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("failing", ["fsync", "replace", "write", "fchmod"])
def test_failed_write_keeps_old_key(keydir: Path, monkeypatch: pytest.MonkeyPatch, kind: str, failing: str) -> None:
    store = STORES[kind](keydir)
    old = Key.generate_private()
    store.store_private_key("wg0", old)
    before = (keydir / "wg0").read_bytes()
    new = Key.generate_private()
    if failing == "write":
        real_write = os.write

        def half_write(fd: int, data: bytes) -> int:  # writes part of the file, then fails
            if len(data) > 4:
                return real_write(fd, bytes(data)[:4])
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", half_write)
    else:
        monkeypatch.setattr(os, failing, _boom)
    with pytest.raises(KeyStoreError, match="unchanged") as info:
        store.store_private_key("wg0", new)
    secret_free(info.value, old, new)
    monkeypatch.undo()
    assert isinstance(info.value.__cause__, OSError)
    assert (keydir / "wg0").read_bytes() == before
    assert store.load_private_key("wg0") == old
    assert sorted(os.listdir(keydir)) == ["wg0"]  # no temporary file left behind


def test_failed_first_write_leaves_nothing(keydir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = plain(keydir)
    monkeypatch.setattr(os, "replace", _boom)
    with pytest.raises(KeyStoreError):
        store.store_private_key("wg0", Key.generate_private())
    monkeypatch.undo()
    assert os.listdir(keydir) == []
    with pytest.raises(KeyNotFound):
        store.load_private_key("wg0")


def test_interrupt_during_write_cleans_up(keydir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = plain(keydir)
    old = Key.generate_private()
    store.store_private_key("wg0", old)

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.store_private_key("wg0", Key.generate_private())
    monkeypatch.undo()
    assert store.load_private_key("wg0") == old
    assert os.listdir(keydir) == ["wg0"]


def test_temp_files_are_not_ids(keydir: Path) -> None:
    store = plain(keydir)
    store.store_private_key("wg0", Key.generate_private())
    write_file(keydir / ".wg0.abc.tmp", b"junk")
    assert store.list_ids() == ["wg0"]


def test_fsyncs_file_and_directory(keydir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = plain(keydir)
    store.store_private_key("first", Key.generate_private())  # directory exists from now on
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    store.store_private_key("wg0", Key.generate_private())
    assert synced == ["file", "dir"]


# --- ids ----------------------------------------------------------------------------------------


BAD_IDS = ["../x", "a/b", "/etc/passwd", "", "x" * 65, ".hidden", ".", "..", "a\x00b", "a b", "wg0\n", "é", "a:b"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_ids(tmp_path: Path, bad: str) -> None:
    keydir = tmp_path / "keys"
    store = plain(keydir)
    with pytest.raises(InvalidKeyId):
        store.store_private_key(bad, Key.generate_private())
    with pytest.raises(InvalidKeyId):
        store.load_private_key(bad)
    with pytest.raises(InvalidKeyId):
        store.delete_private_key(bad)
    assert os.listdir(tmp_path) == []  # nothing created, inside or outside


def test_invalid_id_message_does_not_echo_the_id() -> None:
    key = Key.generate_private()
    with pytest.raises(InvalidKeyId, match=r"character '[+/=]' at position \d+ is not allowed") as info:
        plain(Path("/nonexistent")).load_private_key(key.to_base64())
    secret_free(info.value, key)


def test_valid_ids(keydir: Path) -> None:
    store = plain(keydir)
    ids = ["a", "x" * 64, "wg0.key", "node_1-b", "A.B.C", "a.."]
    for key_id in ids:
        store.store_private_key(key_id, Key.generate_private())
    assert store.list_ids() == sorted(ids)


def test_non_string_id(keydir: Path) -> None:
    with pytest.raises(InvalidKeyId):
        plain(keydir).load_private_key(b"wg0")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        plain(keydir).store_private_key("wg0", b"\x00" * 32)  # type: ignore[arg-type]


# --- missing and deleted keys -----------------------------------------------------------------


def test_missing_key(keydir: Path) -> None:
    store = plain(keydir)
    with pytest.raises(KeyNotFound, match=f"no key 'wg0' in keystore {keydir}"):
        store.load_private_key("wg0")  # no directory at all
    assert not keydir.exists()
    assert store.list_ids() == []
    store.store_private_key("other", Key.generate_private())
    with pytest.raises(KeyNotFound):
        store.load_private_key("wg0")


def test_delete(keydir: Path) -> None:
    store = plain(keydir)
    store.store_private_key("a", Key.generate_private())
    store.store_private_key("b", Key.generate_private())
    store.delete_private_key("a")
    assert store.list_ids() == ["b"]
    with pytest.raises(KeyNotFound):
        store.load_private_key("a")
    with pytest.raises(KeyNotFound):
        store.delete_private_key("a")


# --- systemd credentials ------------------------------------------------------------------------


@pytest.fixture
def creds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "credentials"
    d.mkdir(mode=0o500)
    os.chmod(d, 0o700)  # filled below, then made read-only like systemd's
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(d))
    yield d
    os.chmod(d, 0o700)


def add_credential(d: Path, name: str, data: bytes, file_mode: int = 0o400) -> None:
    os.chmod(d, 0o700)
    write_file(d / name, data, file_mode)
    os.chmod(d, 0o500)


@pytest.mark.parametrize("newline", [b"\n", b""])
def test_credential_is_a_read_only_fallback(keydir: Path, creds: Path, newline: bytes) -> None:
    provisioned = Key.generate_private()
    add_credential(creds, "wg0", provisioned.to_base64().encode() + newline)
    store = plain(keydir)
    assert store.credentials_directory == creds
    assert store.load_private_key("wg0") == provisioned
    assert store.list_ids() == ["wg0"]
    assert store.list_ids(include_credentials=False) == []
    with pytest.raises(ReadOnlyKey, match="read-only credentials directory"):
        store.delete_private_key("wg0")

    # storing writes to the keystore, which takes precedence; the credential is untouched
    rotated = Key.generate_private()
    store.store_private_key("wg0", rotated)
    assert (keydir / "wg0").exists()
    assert (creds / "wg0").read_bytes() == provisioned.to_base64().encode() + newline
    assert store.load_private_key("wg0") == rotated
    store.delete_private_key("wg0")  # the keystore's copy
    assert store.load_private_key("wg0") == provisioned


def test_credential_directory_explicit_and_disabled(keydir: Path, tmp_path: Path, creds: Path) -> None:
    key = Key.generate_private()
    add_credential(creds, "k", (key.to_base64() + "\n").encode())
    assert KeyStore(keydir, credentials_directory=creds).load_private_key("k") == key
    assert KeyStore(keydir, credentials_directory=str(creds)).load_private_key("k") == key
    with pytest.raises(KeyNotFound, match="credentials directory"):
        KeyStore(keydir, credentials_directory=tmp_path / "nowhere").load_private_key("k")
    with pytest.raises(KeyNotFound):
        KeyStore(keydir, use_credentials=False).load_private_key("k")


def test_plain_credential_accepted_by_encrypting_store(keydir: Path, creds: Path) -> None:
    key = Key.generate_private()
    add_credential(creds, "k", (key.to_base64() + "\n").encode())
    assert with_passphrase(keydir).load_private_key("k") == key


def test_encrypted_credential(keydir: Path, tmp_path: Path, creds: Path) -> None:
    key = Key.generate_private()
    other = tmp_path / "other"
    with_kek(other).store_private_key("k", key)
    add_credential(creds, "k", (other / "k").read_bytes())
    assert with_kek(keydir).load_private_key("k") == key
    with pytest.raises(EncryptionMismatch):
        plain(keydir).load_private_key("k")


@pytest.mark.parametrize("file_mode", [0o404, 0o444, 0o420, 0o600, 0o406])
def test_credential_permissions(keydir: Path, creds: Path, file_mode: int) -> None:
    key = Key.generate_private()
    add_credential(creds, "k", (key.to_base64() + "\n").encode(), file_mode)
    store = plain(keydir)
    if file_mode & 0o027:
        with pytest.raises(InsecurePermissions, match=f"{file_mode:04o}"):
            store.load_private_key("k")
    else:
        assert store.load_private_key("k") == key


def test_credential_group_read_is_allowed(keydir: Path, creds: Path) -> None:
    # systemd grants the service user read access through an ACL, which shows as group r
    key = Key.generate_private()
    add_credential(creds, "k", (key.to_base64() + "\n").encode(), 0o440)
    assert plain(keydir).load_private_key("k") == key


def test_corrupt_credential(keydir: Path, creds: Path) -> None:
    add_credential(creds, "k", b"garbage\n")
    with pytest.raises(CorruptKeyFile, match=f"credential {creds / 'k'}"):
        plain(keydir).load_private_key("k")


def test_insecure_keystore_does_not_fall_back_to_credentials(keydir: Path, creds: Path) -> None:
    add_credential(creds, "k", (Key.generate_private().to_base64() + "\n").encode())
    keydir.mkdir(mode=0o755)
    os.chmod(keydir, 0o755)
    with pytest.raises(InsecurePermissions):
        plain(keydir).load_private_key("k")


# --- hypothesis: arbitrary file content -------------------------------------------------------


def _load_or_keystore_error(store: KeyStore, key_id: str) -> None:
    try:
        key = store.load_private_key(key_id)
    except KeyStoreError:
        return
    assert isinstance(key, Key)


_HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_HYP
@given(data=st.binary(max_size=5000))
def test_arbitrary_bytes_only_raise_keystore_errors(tmp_path: Path, data: bytes) -> None:
    keydir = tmp_path / "hyp-any"
    keydir.mkdir(mode=0o700, exist_ok=True)
    write_file(keydir / "k", data)
    stores = [plain(keydir), with_passphrase(keydir), with_kek(keydir)]
    # the argon2id cost a random header could ask for is capped low for this test
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(keystore, "MAX_MEMLIMIT", 1 << 20)
        mp.setattr(keystore, "MAX_OPSLIMIT", 2)
        for store in stores:
            _load_or_keystore_error(store, "k")


@_HYP
@given(
    kdf=st.sampled_from([0, 1, 2, 3, 255]),
    ops=st.integers(0, 3),
    mem=st.integers(0, 1 << 17),
    tail=st.binary(max_size=150),
)
def test_structured_headers_only_raise_keystore_errors(
    tmp_path: Path, kdf: int, ops: int, mem: int, tail: bytes
) -> None:
    keydir = tmp_path / "hyp-structured"
    keydir.mkdir(mode=0o700, exist_ok=True)
    data = MAGIC + bytes([kdf]) + ops.to_bytes(4, "big") + mem.to_bytes(8, "big") + tail
    write_file(keydir / "k", data)
    for make in (plain, with_passphrase, with_kek):
        _load_or_keystore_error(make(keydir), "k")
    write_file(keydir / "k", MAGIC + bytes([kdf]) + tail)
    for make in (plain, with_passphrase, with_kek):
        _load_or_keystore_error(make(keydir), "k")
