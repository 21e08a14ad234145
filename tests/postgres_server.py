"""A private PostgreSQL server for tests: Debian's binaries, initdb into a temporary
directory as an unprivileged user, postgres on a loopback port (password auth over TCP,
trust on its own unix socket), stopped and removed afterwards. Missing binaries fail
the test under CI=true (see needs.py) and skip it elsewhere.

Parallel runs on one machine keep apart by environment: ``PYWG_PG_PORTS=25460-25469`` (the
server takes the first free port of the range; default: any free port) and
``PYWG_PG_DIR=/tmp/NAME-`` (the data directory's prefix; default: the system's temp dir,
``pywg-pg-``)."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from needs import unavailable

USER = "pywg"


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _free_port() -> int:
    """A free loopback port: the first free one of ``PYWG_PG_PORTS`` (``LOW-HIGH``), if set."""
    wanted = os.environ.get("PYWG_PG_PORTS", "").strip()
    low, _, high = wanted.partition("-")
    candidates = range(int(low), int(high or low) + 1) if wanted else [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port in PYWG_PG_PORTS={wanted}")


def _data_dir() -> str:
    """A new directory for the server: under the ``PYWG_PG_DIR`` prefix, if set."""
    prefix = os.environ.get("PYWG_PG_DIR", "").strip()
    if not prefix:
        return tempfile.mkdtemp(prefix="pywg-pg-")
    return tempfile.mkdtemp(prefix=os.path.basename(prefix) or "pywg-pg-", dir=os.path.dirname(prefix) or None)


class PostgresServer:
    """One running server; :meth:`database` makes a fresh database and returns its URL."""

    def __init__(self) -> None:
        bindir = _bindir()
        if bindir is None:
            unavailable("PostgreSQL server binaries (Debian package postgresql; make debs)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            unavailable("psycopg 3 (pip install 'psycopg[binary]')")
        assert bindir is not None
        self.bindir = bindir
        self.password = secrets.token_urlsafe(12)
        self.port = _free_port()
        self.dir = _data_dir()
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("a postgres system user (Debian's postgresql package creates it)")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.data = os.path.join(self.dir, "data")
        pwfile = os.path.join(self.dir, "pw")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        if self._run_as:
            os.chown(pwfile, self._run_as["user"], self._run_as["group"])
        self._sh("initdb", "-D", self.data, "-U", USER, f"--pwfile={pwfile}", "--auth-local=trust",
                 "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions")
        os.unlink(pwfile)
        with open(os.path.join(self.dir, "log"), "w") as log:
            self.proc = subprocess.Popen(
                [os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port),
                 "-h", "127.0.0.1", "-k", self.dir, "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=subprocess.DEVNULL, stderr=log, **self._run_as,
            )
        self._wait_ready()
        self._n = 0

    def _sh(self, tool: str, *args: str) -> None:
        subprocess.run([os.path.join(self.bindir, tool), *args], check=True, capture_output=True,
                       **self._run_as)

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql://{USER}:{pw}@127.0.0.1:{self.port}/{dbname}"

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    with open(os.path.join(self.dir, "log")) as f:
                        raise RuntimeError(f"postgres did not start: {f.read()[-2000:]}") from None
                time.sleep(0.1)

    def database(self) -> str:
        """A new empty database; its URL (with the password)."""
        import psycopg

        self._n += 1
        name = f"t{self._n}_{secrets.token_hex(3)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # our own name
        return self.url(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown (SIGTERM's smart one waits for clients)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()
