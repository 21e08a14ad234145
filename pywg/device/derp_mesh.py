"""The relay's mesh links: ``pywg derp serve --mesh-with URL,... --mesh-key FILE``.

For every other server of the region the relay keeps one DERP client connected
(``DerpRelayClient``), keyed with the relay's own server key and carrying the mesh key, that
sends WatchConns: the remote server answers with a PeerPresent for each of its clients and
then one PeerPresent or PeerGone per change. Each announced key is registered in the relay
state as reachable through this link (``DerpServer.add_forwarder``); packets for it leave as
ForwardPacket frames on the link. When the link drops, everything it announced is forgotten
(the client reconnects with backoff and the new flood rebuilds it). A link that finds its own
server at the other end (the URL list may name every server of the region) stops, as derper's.

The mesh key file holds 64 hex characters (32 bytes; whitespace trimmed), as derper's
``--mesh-psk-file``; it must not be readable by group or others.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pywg.derp import Actions, Connected, DerpServer, NodePublicKey
from pywg.derp.client import Event
from pywg.derp.frames import PeerGone, PeerPresent
from pywg.derp.server import MESH_KEY_LEN
from pywg.device.derp_client import DerpRelayClient

log = logging.getLogger("pywg.derp.mesh")

MESH_RETRY_MAX = 5.0  # derper retries a mesh peer every 5 s


class MeshConfigError(ValueError):
    """``--mesh-with`` or ``--mesh-key`` is unusable; ``field`` names the option."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


@dataclass(frozen=True, slots=True)
class MeshTarget:
    """One mesh peer: ``http://HOST:PORT`` or ``https://HOST[:PORT]`` (a bare HOST[:PORT] is https,
    as derper's ``--mesh-with`` hosts are)."""

    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/derp"


def parse_mesh_with(text: str) -> list[MeshTarget]:
    """The comma-separated ``--mesh-with`` list."""
    targets = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise MeshConfigError("--mesh-with", f"an empty entry in {text!r}")
        parts = urlsplit(item if "://" in item else f"https://{item}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MeshConfigError("--mesh-with", f"{item!r} is not http://HOST:PORT or https://HOST[:PORT]")
        if parts.path not in ("", "/", "/derp") or parts.query or parts.fragment or parts.username:
            raise MeshConfigError("--mesh-with", f"{item!r}: only a scheme, host and port are allowed")
        try:
            port = parts.port
        except ValueError:
            raise MeshConfigError("--mesh-with", f"{item!r}: the port is not 1-65535") from None
        tls = parts.scheme == "https"
        targets.append(MeshTarget(parts.hostname, port or (443 if tls else 80), tls))
    return targets


def load_mesh_key(path: Path) -> bytes:
    """The 32-byte mesh key from 64 hex characters in ``path`` (readable by its owner only)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise MeshConfigError("--mesh-key", f"cannot read {path}: {exc}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise MeshConfigError("--mesh-key", f"{path} is readable or writable by others "
                              f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    if len(text) != 2 * MESH_KEY_LEN or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise MeshConfigError("--mesh-key", f"{path} must hold {2 * MESH_KEY_LEN} hex characters "
                              f"(got {len(text)} characters)")
    return bytes.fromhex(text)


class MeshLink:
    """One watched mesh peer, and the Forwarder for the keys it announced."""

    def __init__(self, state: DerpServer, target: MeshTarget, mesh_key: bytes, *,
                 on_change: Callable[[Actions], None], ssl: ssl_module.SSLContext | None = None,
                 backoff_max: float = MESH_RETRY_MAX) -> None:
        self.state = state
        self.target = target
        self.on_change = on_change
        self.self_connect = False
        self.announced = 0  # PeerPresent frames heard
        context = (ssl or ssl_module.create_default_context()) if target.tls else None
        self.client = DerpRelayClient(
            state.private_key, target.host, target.port, ssl=context, mesh_key=mesh_key, watch_conns=True,
            preferred=False, on_packet=self._packet, on_event=self._event, on_disconnect=self._lost,
            backoff_max=backoff_max)

    def __repr__(self) -> str:
        return f"MeshLink({self.target.url}, connected={self.client.connected})"

    def start(self) -> None:
        self.client.start()

    async def close(self) -> None:
        await self.client.close()

    @property
    def connected(self) -> bool:
        return self.client.connected and not self.self_connect

    def forward_packet(self, src: NodePublicKey, dst: NodePublicKey, packet: bytes) -> bool:
        return self.client.forward_packet(src, dst, packet)

    def _packet(self, src: NodePublicKey, packet: bytes) -> None:
        pass  # nobody sends to a server's own key; packets for our clients come as ForwardPacket

    def _event(self, event: Event) -> None:
        if isinstance(event, Connected):
            if event.server_key == self.state.public_key:
                log.info("mesh %s: that is this server; not meshing with it", self.target.url)
                self.self_connect = True
                asyncio.get_running_loop().create_task(self.client.close())
            else:
                log.info("mesh %s: connected to %s", self.target.url, event.server_key.short())
        elif self.self_connect:
            return
        elif isinstance(event, PeerPresent):
            self.announced += 1
            self.state.add_forwarder(event.peer, self)
        elif isinstance(event, PeerGone):
            self.on_change(self.state.remove_forwarder(event.peer, self))

    def _lost(self) -> None:
        self.on_change(self.state.remove_link(self))
