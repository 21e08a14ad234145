"""The device's DERP path across a key rotation: one DeviceRelay per node key it accepts.

The device's WireGuard static key is its DERP node key (see :mod:`pywg.device.relay`), so
a rotated key needs a new DERP connection, as in Tailscale. During a rotation the device
accepts two keys (the new one as its secondary, then the old one until the overlap ends),
and the peers are split: those that got the coordinator's push address the new key, the
others still the old one, and each drops a datagram whose source node key is not the key
it knows us by (``relay_unknown_source``). So ``NodeKeyRelays`` keeps one DeviceRelay for
each accepted key, all on the same home region, and sends a datagram to a peer through the
relay that peer last reached us on (its idea of our key), through the primary one when it
never did. ``add`` (a secondary key accepted), ``use`` (the node's key from now on: the
primary), ``drop_others`` (only the primary's connection stays).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pywg.derp import NodePrivateKey
from pywg.protocol.endpoint import RelayEndpoint

from .relay import DeviceRelay, ReceiveCallback

log = logging.getLogger(__name__)

MAX_KEYS = 2  # the node's key and the one a rotation overlaps with
MAX_SOURCES = 4096  # peers whose last datagram came by a non-primary relay, remembered at most

RelayFactory = Callable[[NodePrivateKey, int], DeviceRelay]  # (node key, home region) -> a relay


class NodeKeyRelays:
    """The RelayPath a Device sends RelayEndpoint datagrams to, over one DeviceRelay per
    accepted node key (event-loop thread, but ``send`` from any thread)."""

    def __init__(self, make: RelayFactory, node_key: NodePrivateKey, *, home: int) -> None:
        self._make = make
        self.home = home
        self.on_receive: ReceiveCallback | None = None
        self._relays: dict[bytes, DeviceRelay] = {}  # by our node public key; replaced, never mutated
        self._primary = bytes(node_key.public)
        self._via: dict[bytes, bytes] = {}  # peer node key -> our node key it last sent to
        self._started = False
        self._closing: set[asyncio.Task[None]] = set()  # relays of dropped keys, closing
        self._add(node_key)

    def __repr__(self) -> str:
        return f"NodeKeyRelays(primary={self.primary!r}, keys={len(self._relays)})"

    @property
    def primary(self) -> DeviceRelay:
        """The relay of the node's key (what a peer never heard from is sent through)."""
        return self._relays[self._primary]

    @property
    def node_keys(self) -> list[bytes]:
        """Our node public keys with a relay, the primary's first."""
        return [self._primary, *(k for k in self._relays if k != self._primary)]

    # --- life ---------------------------------------------------------------------------

    def attach(self, device: Any) -> None:
        """Become ``device``'s relay path (its RelayEndpoint datagrams come here, what
        arrives goes to its ``relay_received``)."""
        device.set_relay(self)
        self.on_receive = device.relay_received

    def start(self) -> None:
        """Connect each relay to its home region (event-loop thread)."""
        self._started = True
        for relay in self._relays.values():
            relay.start()

    async def close(self) -> None:
        self._started = False
        self._close_later([k for k in self._relays if k != self._primary])
        for relay in self._relays.values():  # kept: what is sent now is counted as "closed"
            await relay.close()
        for task in list(self._closing):
            await task

    async def set_home(self, home: int) -> None:
        """Move every key's relay home to region ``home`` (see DeviceRelay.set_home); a key
        added later starts there."""
        for relay in list(self._relays.values()):
            await relay.set_home(home)
        self.home = home

    @property
    def connected(self) -> bool:
        """The primary relay's home region is connected."""
        return self.primary.connected

    async def wait_connected(self, timeout: float) -> None:
        await self.primary.wait_connected(timeout)

    # --- the keys -------------------------------------------------------------------------

    def add(self, node_key: NodePrivateKey) -> DeviceRelay:
        """The device accepts ``node_key`` too: be on the DERP server under it as well (its
        relay connects now; the primary does not change; like the device's secondary key, it
        replaces the one accepted before). Returns that key's relay."""
        public = bytes(node_key.public)
        relay = self._relays.get(public)
        if relay is not None:
            return relay
        if len(self._relays) >= MAX_KEYS:
            self.drop_others()
        relay = self._add(node_key)
        if self._started:
            relay.start()
        log.info("DERP: also connected as %s", relay.public_key.short())
        return relay

    def _add(self, node_key: NodePrivateKey) -> DeviceRelay:
        relay = self._make(node_key, self.home)
        public = bytes(node_key.public)
        relay.on_receive = lambda data, source: self._received(public, data, source)
        self._relays = {**self._relays, public: relay}
        return relay

    def use(self, node_key: NodePrivateKey) -> None:
        """``node_key`` is the node's key from now on: the primary relay (added if missing;
        the former primary stays until ``drop_others``)."""
        self.add(node_key)
        self._primary = bytes(node_key.public)

    def drop_others(self) -> None:
        """Only the node's key is accepted now: close every other key's relay."""
        self._close_later([k for k in self._relays if k != self._primary])

    def _close_later(self, keys: list[bytes]) -> None:
        """Stop sending through these keys' relays now; close them in the background."""
        closing = [r for k, r in self._relays.items() if k in keys]
        if not closing:
            return
        self._relays = {k: r for k, r in self._relays.items() if k not in keys}
        self._via = {} if len(self._relays) < 2 else {p: o for p, o in self._via.items() if o not in keys}
        for relay in closing:
            log.info("DERP: no longer connected as %s", relay.public_key.short())
            task = asyncio.get_running_loop().create_task(relay.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # --- datagrams ------------------------------------------------------------------------

    def send(self, region: int, node_key: bytes, data: bytes) -> bool:
        """Queue ``data`` for ``node_key`` in ``region`` (any thread, never blocks) through
        the relay of the key that peer last sent to; False (counted there) when dropped."""
        relays = self._relays
        relay = relays.get(self._via.get(node_key, self._primary)) or relays[self._primary]
        return relay.send(region, node_key, data)

    def _received(self, ours: bytes, data: bytes, source: RelayEndpoint) -> None:
        if len(self._relays) > 1:  # which of our keys this peer knows
            via = self._via
            if via.get(source.node_key) != ours:
                if len(via) >= MAX_SOURCES:
                    via.pop(next(iter(via)))
                via[source.node_key] = ours
        if self.on_receive is not None:
            self.on_receive(data, source)

    # --- monitoring -----------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """The primary relay's counters, and each other key's under ``other_keys`` (no secrets)."""
        relays = self._relays
        stats = relays[self._primary].stats()
        stats["other_keys"] = [r.stats() for k, r in relays.items() if k != self._primary]
        return stats
