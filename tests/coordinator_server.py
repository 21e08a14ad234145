"""A coordinator on 127.0.0.1 (a random port) in a thread of the test process, and the
small HTTP and WebSocket clients the coordinator tests use."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

import aiohttp
from aiohttp import web

from pywg.manage.key import Key
from pywg.mesh import credentials
from pywg.mesh.coordinator import Config, Limits, create_app
from pywg.mesh.postgres_store import PostgresStore
from pywg.mesh.sqlite_store import SqliteStore
from pywg.mesh.store import Store

ADMIN_TOKEN = credentials.new_admin_token()


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_target(target: Path | str) -> Store:
    """A store on ``target``: a SQLite file path or a ``postgresql://`` URL."""
    if isinstance(target, str) and target.startswith("postgresql://"):
        return PostgresStore(target)
    return SqliteStore(target)


class Server:
    def __init__(self, path: Path | str, config: Config | None = None, clock: Clock | None = None) -> None:
        self.path = path  # a SQLite file or a PostgreSQL URL
        self.clock = clock or Clock()
        self.config = config or Config(
            admin_token_digest=credentials.digest(ADMIN_TOKEN),
            limits=Limits(per_address_rate=1e6, per_address_burst=1e6, per_key_rate=1e6, per_key_burst=1e6),
            poll_interval=0.05,
        )
        self.store = open_target(path)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.app = create_app(self.store, self.config, clock=self.clock)
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.store.close()

    def authkey(self, *, reusable: bool = True, expires_in: float | None = None) -> str:
        now = self.clock.now
        return self.store.create_auth_key(
            reusable=reusable, expires_at=None if expires_in is None else now + expires_in, now=now
        )[1]

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, text, hdrs = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            status, text, hdrs = err.code, err.read(), dict(err.headers)
        return status, json.loads(text) if text else None, hdrs

    def register(self, name: str, key: str, **extra: Any) -> dict[str, Any]:
        body = {"authKey": key, "name": name, "publicKey": new_public_key(), **extra}
        status, answer, _ = self.call("POST", "/api/v1/register", body)
        assert status == 201, answer
        return answer  # type: ignore[no-any-return]


def new_public_key() -> str:
    return Key.generate_private().public_key().to_base64()


class Watch:
    """A WebSocket client of /api/v1/watch (use inside asyncio.run)."""

    def __init__(self, url: str, token: str, since: int | None) -> None:
        query = "" if since is None else f"?since={since}"
        self.target = f"{url.replace('http', 'ws', 1)}/api/v1/watch{query}"
        self.token = token
        self.since = since

    async def __aenter__(self) -> Self:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.target, headers={"Authorization": f"Bearer {self.token}"})
        self.settings: dict[str, Any] | None = None  # a resumed watch's first message
        self._pending: list[dict[str, Any]] = []
        if self.since is not None:
            first = await self.next()
            if first["type"] == "settings":
                self.settings = first
            else:
                self._pending.append(first)  # a snapshot (a revision this store never reached)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.session.close()

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        if self._pending:
            return self._pending.pop(0)
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)  # type: ignore[no-any-return]

    async def nothing_for(self, seconds: float) -> None:
        try:
            msg = await asyncio.wait_for(self.ws.receive(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message {msg!r}")
