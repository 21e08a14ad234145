"""The coordinator: an aiohttp application over a :class:`~pywg.mesh.store.Store`.

Routes (JSON bodies; errors are ``{"error": "...", "field": "..."}`` with an HTTP status):

- ``POST /api/v1/register``: a pre-auth key (``authKey`` in the body, or
  ``Authorization: Bearer <key>``), ``name``, ``publicKey``, ``discoKey``, ``endpoints``,
  ``region`` -> 201 with the node's ``id``, mesh addresses, its bearer ``token`` (the
  only response that ever shows it) and ``stunServers`` (``serve --stun``: ``["HOST:PORT",
  ...]``, the servers the agent runs STUN against; ``[]`` when none are configured) and, with
  ``serve --derp-map``, ``derpMap`` (Tailscale's DERPMap JSON). Rate limited per source address and per key.
  Over TLS with a client CA (``pywg coordinator serve --client-ca``), a client without a
  pre-auth key registers by its X.509-SVID instead: the node is keyed by the SPIFFE ID
  (``Store.register_spiffe``), so a renewed SVID gets the same node; refusals are 401/403
  with ``field: "svid"`` and the reason from :mod:`pywg.mesh.spiffe`.
- ``GET /api/v1/topology`` (a node token or the admin token): the spec's MeshTopology,
  and ``stunServers`` (and ``derpMap``) beside its fields.
- ``PUT /api/v1/nodes/{id}/key`` (that node's token; a key rotation): ``{"publicKey"}`` ->
  ``{"revision"}``, pushed to every agent as node.changed; 409 if another node has the key.
- ``PUT /api/v1/nodes/{id}/disco-key`` (that node's token): ``{"discoKey"}`` -> ``{"revision"}``,
  pushed as node.changed (a node registered without a disco key, or with a new one, since
  registering again is refused for a known name and public key).
- ``PUT /api/v1/nodes/{id}/endpoints`` (``{"endpoints": [...], "region": "900"}``, the region
  optional: the node's DERP home region, picked by latency), ``POST /api/v1/nodes/{id}/health`` (that node's
  token), ``DELETE /api/v1/nodes/{id}`` (that node's token, or the admin token). A health
  report (:mod:`pywg.mesh.health`) carries per peer the spec's MeshConnection and its
  counters, and the agent's report interval: the node is offline after its own window.
- ``POST /api/v1/nodes/{id}/preshared-keys`` (that node's token): the per-pair preshared
  keys of the node with the peers it names, when ``serve --preshared-keys`` is on (see
  :mod:`pywg.mesh.psk_api`).
- ``GET /api/v1/watch?since=REV`` (WebSocket, a node token or the admin token): the
  change log after revision REV, then live changes, one JSON message each:
  ``{"type": "change", "revision": R, "kind": "node.added", "nodeId": ..., "node": {...}}``
  (kinds: node.added / node.changed / node.removed, connection.changed /
  connection.removed). Without ``since``, or with a revision this store never reached
  (another store's), the first message is ``{"type": "snapshot", "revision": R,
  "nodes": [...], "connections": [...], "stunServers": [...], "derpMap": {...}}`` and changes after R
  follow. A client that reconnects with the last revision it saw gets exactly what it missed,
  after a ``{"type": "settings", "revision": REV, "stunServers": ..., "derpMap": ...,
  "natObserver": ...}`` (a restarted or another coordinator may hand out other settings).

Store calls run in one worker thread, so a slow disk never blocks the event loop;
registrations that arrive together go to the store as one batch (``Store.register_many``:
one transaction, each still refused or answered on its own).
Secrets (pre-auth keys, tokens) are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

from pywg.manage.types import InvalidConfig
from pywg.mesh import credentials, psk_api, spiffe, wire
from pywg.mesh.feed import ChangeFeed
from pywg.mesh.groupcommit import GroupCommit
from pywg.mesh.psk import PskSecret
from pywg.mesh.ratelimit import RateLimiter
from pywg.mesh.store import NodeRecord, RegisterCall, Registration, Store, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY = 64 * 1024
WATCH_BATCH = 500
WS_HEARTBEAT_S = 20.0
OFFLINE_AFTER_S = 90.0  # the window of a node that did not say its report interval
SWEEP_INTERVAL_S = 1.0  # a third of the shortest window (pywg.mesh.health.MIN_WINDOW_S)


@dataclass(frozen=True)
class Limits:
    """Registration rate limits: per source address and per pre-auth key (tokens per
    second, burst), and how many addresses/keys the tables remember."""

    per_address_rate: float = 5.0
    per_address_burst: float = 20.0
    per_key_rate: float = 50.0
    per_key_burst: float = 200.0
    max_entries: int = 10_000


class ApiError(Exception):
    def __init__(self, status: int, reason: str, field: str = "", headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.field = field
        self.headers = headers or {}


def _error(status: int, reason: str, field: str = "", headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason, "field": field}, status=status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.reason, exc.field, exc.headers)
    except InvalidConfig as exc:
        return _error(400, exc.reason, exc.field)
    except StoreError as exc:
        return _error(exc.status, exc.reason, exc.field)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"the body is larger than {request.app[CONFIG].max_body} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason, "", {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, "internal error")


@dataclass(frozen=True)
class Config:
    admin_token_digest: str | None = None
    limits: Limits = Limits()
    max_body: int = MAX_BODY
    poll_interval: float = 0.25
    offline_after: float = OFFLINE_AFTER_S  # no contact for this long: the node is offline
    sweep_interval: float = SWEEP_INTERVAL_S
    trust_domains: tuple[str, ...] = ()  # SPIFFE trust domains whose X.509-SVIDs may register
    preshared_secret: PskSecret | None = None  # per-pair preshared keys on (see pywg.mesh.psk)
    stun_servers: tuple[str, ...] = ()  # "HOST:PORT" each (pywg.nat.stun_servers), handed to agents
    derp_map: dict[str, Any] | None = None  # Tailscale's DERPMap JSON (serve --derp-map), handed to agents
    nat_observer: str | None = None  # "IP:PORT" of the mapping-lifetime observer (pywg.mesh.nat_observer)


CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator")


class Coordinator:
    """The request handlers and the state they share (store, feed, limiters)."""

    def __init__(self, store: Store, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pywg-store")
        # Registrations arriving together share one store transaction (group commit).
        self.registrations: GroupCommit[RegisterCall, Registration] = GroupCommit(
            lambda calls: self.run(self.store.register_many, calls))
        self.feed = ChangeFeed(store, self.run, poll_interval=config.poll_interval)
        lim = config.limits
        self.by_address = RateLimiter(lim.per_address_rate, lim.per_address_burst, lim.max_entries)
        self.by_key = RateLimiter(lim.per_key_rate, lim.per_key_burst, lim.max_entries)
        self._watchers: set[web.WebSocketResponse] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call in the store's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def start(self, app: web.Application) -> None:
        await self.feed.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="pywg-offline-sweep")

    async def _sweep(self) -> None:
        """Mark nodes offline that missed their contact window (every replica may do it:
        the store's transaction logs each node going offline once)."""
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            now = self.clock()
            try:
                revisions = await self.run(self.store.sweep_offline, now - self.config.offline_after, now=now)
            except Exception:  # the store is busy or gone for a moment: next round
                log.exception("the offline sweep failed")
                continue
            if revisions:
                self.feed.wake()

    async def _contact(self, node: NodeRecord | None) -> None:
        if node is not None and await self.run(self.store.touch, node.id, now=self.clock()) is not None:
            self.feed.wake()

    async def shutdown(self, app: web.Application) -> None:
        for ws in list(self._watchers):
            await ws.close(code=1001, message=b"coordinator shutting down")

    async def stop(self, app: web.Application) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.feed.stop()
        self._pool.shutdown(wait=True)

    # --- authentication -----------------------------------------------------------------

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "the Authorization header is 'Bearer <token>'", "Authorization")
        return value.strip()

    async def _caller(self, request: web.Request) -> NodeRecord | None:
        """The node whose token the request carries, None for the admin token; else 401."""
        token = self._bearer(request)
        if token is None:
            raise ApiError(401, "a bearer token is required", "Authorization",
                           {"WWW-Authenticate": 'Bearer realm="pywg"'})
        admin = self.config.admin_token_digest
        if admin is not None and credentials.digests_equal(credentials.digest(token), admin):
            return None
        node = await self.run(self.store.authenticate, token)
        if node is None:
            raise ApiError(401, "unknown token", "Authorization", {"WWW-Authenticate": 'Bearer realm="pywg"'})
        return node

    async def _the_node(self, request: web.Request, *, admin_ok: bool = False) -> NodeRecord:
        """The node in the path, if the caller is that node (or the admin, when allowed)."""
        caller = await self._caller(request)
        node_id = request.match_info["id"]
        if caller is None and admin_ok:
            node = await self.run(self.store.node, node_id)
            if node is None:
                raise ApiError(404, f"no node has id {node_id!r}", "id")
            return node
        if caller is None or caller.id != node_id:
            raise ApiError(403, "a node token acts on its own node only", "id")
        return caller

    async def _body(self, request: web.Request) -> dict[str, Any]:
        return wire.parse_body(await request.read())

    # --- handlers -------------------------------------------------------------------------

    async def register(self, request: web.Request) -> web.Response:
        now = self.clock()
        address = request.remote or "?"
        wait = self.by_address.take(address, now)
        if wait:
            raise ApiError(429, "too many registrations from this address", "",
                           {"Retry-After": str(max(1, round(wait)))})
        body = await self._body(request)
        req = wire.read_register(body)
        header_key = self._bearer(request)
        if req.auth_key is not None and header_key is not None and req.auth_key != header_key:
            raise ApiError(400, "two different pre-auth keys (body and Authorization header)", "authKey")
        auth_key = req.auth_key or header_key
        if auth_key is None and (der := _peer_certificate(request)) is not None:
            return await self._register_svid(request, req.node, der, now)
        if auth_key is None:
            raise ApiError(401, "a pre-auth key (authKey, or Authorization: Bearer) or an X.509-SVID "
                           "is required", "authKey")
        try:
            key_id, presented = credentials.parse_auth_key(auth_key)
        except credentials.BadCredential as exc:
            raise ApiError(401, str(exc), "authKey") from None
        # Keyed by the whole key's digest: guessing secrets for a known key id cannot use up
        # the real key's budget (the guesses are held back by the per-address limit).
        wait = self.by_key.take(presented, now)
        if wait:
            raise ApiError(429, f"too many registrations with pre-auth key {key_id}", "authKey",
                           {"Retry-After": str(max(1, round(wait)))})
        reg = await self.registrations.submit(RegisterCall(req.node, auth_key, now))
        self.feed.wake()
        log.info("registered node %s (%s) with pre-auth key %s", reg.node.id, reg.node.name, key_id)
        return self._registered(reg)

    async def _register_svid(self, request: web.Request, node_req: Any, der: bytes, now: float) -> web.Response:
        """Register by the client certificate's SPIFFE ID (its chain checked by TLS)."""
        try:
            spiffe_id = str(spiffe.validate_svid_der(der, self.config.trust_domains, now))
        except spiffe.SvidError as exc:
            raise ApiError(exc.status, exc.reason, "svid") from None
        wait = self.by_key.take(spiffe_id, now)
        if wait:
            raise ApiError(429, f"too many registrations as {spiffe_id}", "svid",
                           {"Retry-After": str(max(1, round(wait)))})
        reg = await self.run(self.store.register_spiffe, node_req, spiffe_id, now=now)
        self.feed.wake()
        log.info("registered node %s (%s) as %s", reg.node.id, reg.node.name, spiffe_id)
        return self._registered(reg)

    def _registered(self, reg: Any) -> web.Response:
        node = reg.node
        return web.json_response(
            {
                "id": node.id,
                "name": node.name,
                "internalIp": str(node.ipv4),
                "internalIpv6": str(node.ipv6),
                "prefix4": str(self.store.prefix4),
                "prefix6": str(self.store.prefix6),
                "token": reg.token,
                "revision": reg.revision,
                "stunServers": list(self.config.stun_servers),
                **self._derp_map(),
                "natObserver": self.config.nat_observer,
            },
            status=201,
        )

    async def topology(self, request: web.Request) -> web.Response:
        await self._contact(await self._caller(request))
        topo = await self.run(self.store.topology)
        # The MeshTopology's JSON as it is, and the STUN servers after its fields.
        text = topo.to_json(indent=None)
        stun = json.dumps(list(self.config.stun_servers), separators=(",", ":"))
        derp = "" if self.config.derp_map is None else ',"derpMap":' + json.dumps(self.config.derp_map,
                                                                                 separators=(",", ":"))
        return web.Response(text=f'{text[:-1]},"stunServers":{stun}{derp}}}', content_type="application/json")

    def _derp_map(self) -> dict[str, Any]:
        """``{"derpMap": ...}`` when ``serve --derp-map`` gave one, else nothing."""
        return {} if self.config.derp_map is None else {"derpMap": self.config.derp_map}

    async def set_endpoints(self, request: web.Request) -> web.Response:
        node = await self._the_node(request)
        endpoints, region = wire.read_endpoints_update(await self._body(request))
        revision = await self.run(self.store.set_endpoints, node.id, endpoints, now=self.clock(), region=region)
        if revision is not None:
            self.feed.wake()
        return web.json_response({"revision": revision if revision is not None else self.feed.head})

    async def set_disco_key(self, request: web.Request) -> web.Response:
        return await self._node_change(request, wire.read_disco_key_update, self.store.set_disco_key,
                                       "has a new disco key")

    async def set_key(self, request: web.Request) -> web.Response:
        return await self._node_change(request, wire.read_key_update, self.store.set_public_key, "rotated its key")

    async def _node_change(self, request: web.Request, read: Callable[[dict[str, Any]], Any],
                           write: Callable[..., int | None], done: str) -> web.Response:
        """A node's own change (its token): the body ``read`` strictly, ``write`` to the store;
        a new revision is pushed (node.changed) and logged as the node ``done``."""
        node = await self._the_node(request)
        value = read(await self._body(request))
        revision = await self.run(write, node.id, value, now=self.clock())
        if revision is not None:
            self.feed.wake()
            log.info("node %s (%s) %s", node.id, node.name, done)
        return web.json_response({"revision": revision if revision is not None else self.feed.head})

    async def health(self, request: web.Request) -> web.Response:
        node = await self._the_node(request)
        report = wire.read_health(await self._body(request), node.id)
        revisions = await self.run(self.store.report_health, node.id, report, now=self.clock())
        if revisions:
            self.feed.wake()
        return web.json_response({"revision": revisions[-1] if revisions else self.feed.head})

    async def remove(self, request: web.Request) -> web.Response:
        node = await self._the_node(request, admin_ok=True)
        revision = await self.run(self.store.remove_node, node.id, now=self.clock())
        self.feed.wake()
        log.info("removed node %s (%s)", node.id, node.name)
        return web.json_response({"revision": revision})

    async def watch(self, request: web.Request) -> web.StreamResponse:
        caller = await self._caller(request)
        since = wire.read_since(request.query.get("since"))
        ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT_S)
        await ws.prepare(request)
        self._watchers.add(ws)
        await self._contact(caller)
        reader = asyncio.create_task(self._drain(ws))
        try:
            await self._stream(ws, since, reader)
        except ConnectionResetError:  # the client went away mid-send
            pass
        finally:
            reader.cancel()
            self._watchers.discard(ws)
            await ws.close()
        return ws

    @staticmethod
    async def _drain(ws: web.WebSocketResponse) -> None:
        """Read (and ignore) what the client sends, until it closes."""
        async for msg in ws:
            if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                break

    async def _stream(self, ws: web.WebSocketResponse, since: int | None, reader: asyncio.Task[None]) -> None:
        if since is not None and since > self.feed.head:
            await self.feed.poke()  # another process may have written it: look once more
        settings = {"stunServers": list(self.config.stun_servers), **self._derp_map(),
                    "natObserver": self.config.nat_observer}
        if since is None or since > self.feed.head:
            revision, nodes, conns = await self.run(self.store.snapshot)
            await ws.send_str(json.dumps({
                "type": "snapshot",
                "revision": revision,
                "nodes": [n.view() for n in nodes],
                "connections": [c.to_dict() for c in conns],
                **settings,
            }))
            since = revision
        else:  # resumed: no snapshot, but this coordinator's settings may differ from the last one's
            await ws.send_str(json.dumps({"type": "settings", "revision": since, **settings}))
        last = since
        while not reader.done():
            changes = await self.feed.since(last, WATCH_BATCH)
            if changes:
                for change in changes:
                    await ws.send_str(self.feed.text(change))
                last = changes[-1].revision
                continue
            waiter = asyncio.ensure_future(self.feed.wait_beyond(last))
            await asyncio.wait((waiter, reader), return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter


def _peer_certificate(request: web.Request) -> bytes | None:
    """The client certificate (DER) of a TLS connection, if the client presented one."""
    transport = request.transport
    tls = transport.get_extra_info("ssl_object") if transport is not None else None
    return tls.getpeercert(binary_form=True) if tls is not None else None


def create_app(store: Store, config: Config | None = None, *, clock: Callable[[], float] = time.time) -> web.Application:
    """The coordinator as an aiohttp application (the caller opens and closes ``store``)."""
    config = config or Config()
    app = web.Application(client_max_size=config.max_body, middlewares=[_errors])
    coordinator = Coordinator(store, config, clock)
    app[CONFIG] = config
    app[COORDINATOR] = coordinator
    app.on_startup.append(coordinator.start)
    app.on_shutdown.append(coordinator.shutdown)
    app.on_cleanup.append(coordinator.stop)
    app.router.add_post("/api/v1/register", coordinator.register)
    app.router.add_get("/api/v1/topology", coordinator.topology)
    app.router.add_put("/api/v1/nodes/{id}/endpoints", coordinator.set_endpoints)
    app.router.add_put("/api/v1/nodes/{id}/key", coordinator.set_key)
    app.router.add_put("/api/v1/nodes/{id}/disco-key", coordinator.set_disco_key)
    app.router.add_post("/api/v1/nodes/{id}/health", coordinator.health)
    app.router.add_delete("/api/v1/nodes/{id}", coordinator.remove)
    app.router.add_get("/api/v1/watch", coordinator.watch)
    psk_api.add_routes(app, coordinator)
    return app
