"""The NAT mapping-lifetime observer the coordinator serves (``coordinator serve --nat-observer``).

An agent behind a NAT learns how long its mapping survives idle (pywg.nat.keepalive): it sends
one request from a side UDP socket, stays silent, and the observer answers after the idle
time the request asks for. The answer arrives only if the NAT still holds the mapping.

Wire format (UDP, big-endian; no other implementation speaks it):

- request, 54 bytes: ``b"pywgNOq1"`` (8) | node id (8: the 16 hex digits of the coordinator's
  id, raw) | time (uint32, Unix seconds when sent) | idle (uint16 seconds, 1..300) | nonce (16)
  | MAC (16: HMAC-SHA256 of all before, truncated).
- reply, 42 bytes, smaller than the request (no amplification), sent ONCE, ``idle`` seconds
  after the request came, to the request's source address only: ``b"pywgNOr1"`` (8) | nonce
  (16) | idle (uint16) | MAC (16: HMAC-SHA256 of all before with the same key).

The key: the coordinator keeps only SHA-256 of a node's bearer token (pywg.mesh.credentials);
both sides derive the node's observer key from that digest,
``HMAC-SHA256(digest, "pywg nat-observer v1")``: the agent from its token, the coordinator
from what it stores. MACs are compared in constant time.

Bounds: a request whose time is more than ``FRESHNESS`` seconds off, or whose nonce was seen
within that window (kept for ``FRESHNESS`` + the idle), is a replay or stale: dropped. The
pending table holds at most ``MAX_PENDING`` replies, ``MAX_PER_NODE`` per node: new requests
beyond are refused. At most ``MAX_LOOKUPS`` key lookups run at once. Everything dropped is
counted in ``drops``; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import logging
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

REQUEST_MAGIC = b"pywgNOq1"
REPLY_MAGIC = b"pywgNOr1"
MAC_LENGTH = 16
NONCE_LENGTH = 16
_REQUEST = struct.Struct("!8s8sIH16s")
_REPLY = struct.Struct("!8s16sH")
REQUEST_LENGTH = _REQUEST.size + MAC_LENGTH  # 54
REPLY_LENGTH = _REPLY.size + MAC_LENGTH  # 42
MIN_IDLE, MAX_IDLE = 1, 300
FRESHNESS = 120.0  # seconds a request's time may be off the observer's clock
MAX_PENDING = 4096
MAX_PER_NODE = 32
MAX_NONCES = 2 * MAX_PENDING
MAX_LOOKUPS = 64
KEY_LABEL = b"pywg nat-observer v1"


class BadRequest(ValueError):
    """A datagram that is not an observer request (the reason, never the bytes)."""


def observer_key(token_digest_hex: str) -> bytes:
    """The node's observer key from the stored digest of its token (hex SHA-256)."""
    return hmac.new(bytes.fromhex(token_digest_hex), KEY_LABEL, hashlib.sha256).digest()


def key_from_token(token: str) -> bytes:
    """The agent's side: the same key from the token it holds."""
    return observer_key(hashlib.sha256(token.encode()).hexdigest())


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:MAC_LENGTH]


@dataclass(frozen=True)
class Request:
    node_id: str
    sent_at: int
    idle: int
    nonce: bytes
    signed: bytes = field(repr=False)  # the bytes the MAC covers
    mac: bytes = field(repr=False)

    def authentic(self, key: bytes) -> bool:
        return hmac.compare_digest(_mac(key, self.signed), self.mac)


def encode_request(key: bytes, node_id: str, idle: int, nonce: bytes, sent_at: int) -> bytes:
    if not MIN_IDLE <= idle <= MAX_IDLE:
        raise ValueError(f"idle must be {MIN_IDLE}..{MAX_IDLE} seconds, got {idle}")
    if len(nonce) != NONCE_LENGTH:
        raise ValueError(f"the nonce must be {NONCE_LENGTH} bytes")
    raw_id = bytes.fromhex(node_id)
    if len(raw_id) != 8:
        raise ValueError("a node id is 16 hex digits")
    body = _REQUEST.pack(REQUEST_MAGIC, raw_id, sent_at & 0xFFFFFFFF, idle, nonce)
    return body + _mac(key, body)


def parse_request(data: bytes) -> Request:
    """A request's fields (not yet authenticated); BadRequest for any other datagram."""
    if len(data) != REQUEST_LENGTH:
        raise BadRequest(f"a request is {REQUEST_LENGTH} bytes, got {len(data)}")
    magic, raw_id, sent_at, idle, nonce = _REQUEST.unpack_from(data)
    if magic != REQUEST_MAGIC:
        raise BadRequest("not an observer request (magic)")
    if not MIN_IDLE <= idle <= MAX_IDLE:
        raise BadRequest(f"idle must be {MIN_IDLE}..{MAX_IDLE} seconds, got {idle}")
    return Request(raw_id.hex(), sent_at, idle, nonce, data[:_REQUEST.size], data[_REQUEST.size:])


def encode_reply(key: bytes, nonce: bytes, idle: int) -> bytes:
    body = _REPLY.pack(REPLY_MAGIC, nonce, idle)
    return body + _mac(key, body)


def parse_reply(key: bytes, data: bytes) -> tuple[bytes, int] | None:
    """(nonce, idle) of an authentic reply, None for anything else."""
    if len(data) != REPLY_LENGTH or not data.startswith(REPLY_MAGIC):
        return None
    if not hmac.compare_digest(_mac(key, data[:_REPLY.size]), data[_REPLY.size:]):
        return None
    _, nonce, idle = _REPLY.unpack_from(data)
    return nonce, idle


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    node_id: str = field(compare=False)
    reply: bytes = field(compare=False, repr=False)
    to: tuple[str, int] = field(compare=False)


class ObserverCore:
    """The observer's state, sans-I/O: ``admit`` authenticated requests, ``due`` the replies.
    ``now`` is a monotonic time; ``wall`` (Unix seconds) checks a request's freshness."""

    def __init__(self, *, max_pending: int = MAX_PENDING, max_per_node: int = MAX_PER_NODE,
                 max_nonces: int = MAX_NONCES, freshness: float = FRESHNESS) -> None:
        self.max_pending, self.max_per_node, self.max_nonces = max_pending, max_per_node, max_nonces
        self.freshness = freshness
        self._pending: list[_Pending] = []
        self._per_node: Counter[str] = Counter()
        self._nonces: dict[bytes, float] = {}  # nonce -> forget at (monotonic)
        self._seq = 0
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._pending)

    def check(self, data: bytes) -> Request | None:
        """Parse; a malformed datagram is dropped and counted (None)."""
        try:
            return parse_request(data)
        except BadRequest:
            self.drops["malformed"] += 1
            return None

    def admit(self, request: Request, key: bytes | None, source: tuple[str, int], now: float,
              wall: float) -> bool:
        """Queue the reply of an authentic, fresh, new request within the caps; else drop it."""
        if key is None:
            self.drops["unknown-node"] += 1
            return False
        if not request.authentic(key):
            self.drops["unauthentic"] += 1
            return False
        if abs(wall - request.sent_at) > self.freshness:
            self.drops["stale"] += 1
            return False
        self._expire(now)
        if request.nonce in self._nonces:
            self.drops["replayed"] += 1
            return False
        if len(self._pending) >= self.max_pending or len(self._nonces) >= self.max_nonces:
            self.drops["pending-full"] += 1
            return False
        if self._per_node[request.node_id] >= self.max_per_node:
            self.drops["node-pending-full"] += 1
            return False
        self._nonces[request.nonce] = now + self.freshness * 2 + request.idle
        self._seq += 1
        heapq.heappush(self._pending, _Pending(now + request.idle, self._seq, request.node_id,
                                               encode_reply(key, request.nonce, request.idle), source))
        self._per_node[request.node_id] += 1
        self.counters["admitted"] += 1
        return True

    def _expire(self, now: float) -> None:
        if self._nonces and len(self._nonces) >= self.max_nonces // 2:
            for nonce in [n for n, until in self._nonces.items() if until <= now]:
                del self._nonces[nonce]

    def next_deadline(self) -> float | None:
        return self._pending[0].due if self._pending else None

    def due(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        """The replies due at ``now`` (each sent once, then forgotten)."""
        out: list[tuple[bytes, tuple[str, int]]] = []
        while self._pending and self._pending[0].due <= now:
            item = heapq.heappop(self._pending)
            self._per_node[item.node_id] -= 1
            if not self._per_node[item.node_id]:
                del self._per_node[item.node_id]
            out.append((item.reply, item.to))
        self.counters["replied"] += len(out)
        return out


KeyLookup = Callable[[str], Awaitable[bytes | None]]


class NatObserver(asyncio.DatagramProtocol):
    """The observer on a UDP socket; ``lookup(node_id)`` gives a node's key (None: no such node)."""

    def __init__(self, lookup: KeyLookup, core: ObserverCore | None = None,
                 wall: Callable[[], float] | None = None) -> None:
        import time

        self.lookup = lookup
        self.core = core if core is not None else ObserverCore()
        self.wall = wall or time.time
        self.transport: asyncio.DatagramTransport | None = None
        self._lookups = 0
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def serve(cls, host: str, port: int, lookup: KeyLookup) -> NatObserver:
        loop = asyncio.get_running_loop()
        _, observer = await loop.create_datagram_endpoint(lambda: cls(lookup), local_addr=(host, port))
        return observer

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        sockname = self.transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's
        self._timer = asyncio.get_running_loop().create_task(self._run())

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = self.core.check(data)
        if request is None:
            return
        if self._lookups >= MAX_LOOKUPS:
            self.core.drops["busy"] += 1
            return
        self._lookups += 1
        task = asyncio.get_running_loop().create_task(self._admit(request, (addr[0], addr[1])))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _admit(self, request: Request, source: tuple[str, int]) -> None:
        try:
            key = await self.lookup(request.node_id)
        except Exception:
            log.exception("the NAT observer's key lookup failed")
            self.core.drops["lookup-failed"] += 1
            return
        finally:
            self._lookups -= 1
        loop = asyncio.get_running_loop()
        if self.core.admit(request, key, source, loop.time(), self.wall()):
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for reply, to in self.core.due(loop.time()):
                if self.transport is not None:
                    try:
                        self.transport.sendto(reply, to)
                    except OSError:
                        self.core.drops["send-failed"] += 1
            deadline = self.core.next_deadline()
            self._wake.clear()
            wait = 60.0 if deadline is None else max(0.0, deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        for task in [self._timer, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._timer = None


def store_lookup(run: Callable[..., Awaitable[str | None]], token_digest: Callable[[str], str | None]) -> KeyLookup:
    """A key lookup reading the store's token digest in the coordinator's store thread."""

    async def lookup(node_id: str) -> bytes | None:
        digest = await run(token_digest, node_id)
        return None if digest is None else observer_key(digest)

    return lookup
