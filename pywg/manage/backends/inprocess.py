"""``InProcessBackend``: pywg's engine in this process, any number of interfaces.

Each interface is a TUN + ``Device`` on the running event loop, configured by calling the
device directly (no socket in between). Each also serves its UAPI socket
(``/var/run/wireguard/NAME.sock``) and the pywg stats socket, so ``wg show NAME``,
``wg set`` and ``pywg stats NAME`` work on it as on a daemon. The interfaces live as long
as this process (or until ``delete``/``aclose``, or until somebody deletes the link, which
closes the device).

``netns`` puts the interfaces in a named network namespace (``ip netns``): the TUN and the
UDP sockets are created with this thread inside it (``pywg.device.netns.entered``), and every
device call that may open sockets or resolve interface names (``apply``, ``start``, the MTU
re-read) enters it again, including requests arriving on the UAPI socket. Everything runs
on the event loop's thread: do not block the loop (run ``ping`` and the like with
``asyncio.to_thread`` or a subprocess).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pywg.derp import DerpMap, NodePrivateKey
from pywg.device.assembly import assemble_device
from pywg.device.device import Device
from pywg.device.relay import DeviceRelay
from pywg.device.relay_keys import NodeKeyRelays
from pywg.device.stats_server import STATS_DIR, StatsServer
from pywg.device.tun import DEFAULT_MTU, Tun, TunError
from pywg.device.uapi_server import UapiServer, answer
from pywg.manage.uapi_client import SOCKET_DIR, answers, socket_path
from pywg.uapi.protocol import DeviceSnapshot, RequestReader, SetRequest, UapiError

from .base import BackendFailure, IPInterface, LinkState, NameInUse, NotServed
from .link import configure_link, inside, link_exists, link_names, link_state

log = logging.getLogger(__name__)


class _NamespacedTun(Tun):
    """A TUN made inside ``netns`` (Tun reads its MTU through a socket made there too)."""

    def __init__(self, name: str, mtu: int, netns: str | None, *, vnet_hdr: bool = False) -> None:
        with inside(netns):
            super().__init__(name, mtu, vnet_hdr=vnet_hdr)


class _InNamespace:
    """The device as the UAPI server and ``exchange`` see it: changes applied inside the
    namespace (a new listen port binds there, an IPv6 zone names an interface there)."""

    def __init__(self, device: Device, netns: str | None) -> None:
        self.device = device
        self.netns = netns

    def snapshot(self) -> DeviceSnapshot:
        return self.device.snapshot()

    def apply(self, request: SetRequest) -> None:
        with inside(self.netns):
            self.device.apply(request)


@dataclass
class _Hosted:
    device: Device
    configurable: _InNamespace
    uapi: UapiServer | None = None
    stats: StatsServer | None = None
    closing: asyncio.Task[None] | None = field(default=None, repr=False)


class InProcessBackend:
    """pywg's engine in this process (the default backend). ``socket_dir`` is where the
    UAPI sockets go (``serve_uapi=False``: none); ``stats_dir`` where the stats sockets go
    (None: none)."""

    kind = "inprocess"

    def __init__(self, *, netns: str | None = None, socket_dir: Path = SOCKET_DIR, serve_uapi: bool = True,
                 stats_dir: Path | None = STATS_DIR) -> None:
        self.netns = netns
        self.socket_dir = socket_dir
        self.serve_uapi = serve_uapi
        self.stats_dir = stats_dir
        self._hosted: dict[str, _Hosted] = {}
        self._creating: set[str] = set()

    def __repr__(self) -> str:
        return f"InProcessBackend(netns={self.netns!r}, interfaces={sorted(self._hosted)})"

    def _where(self) -> str:
        return f"network namespace {self.netns}" if self.netns else "this network namespace"

    # --- life of an interface -----------------------------------------------------------

    async def create(self, name: str, mtu: int, address: IPInterface | None, *, listen_port: int = 0) -> None:
        # listen_port: nothing to check ahead; the device binds it atomically with the config
        if name in self._hosted or name in self._creating:
            raise NameInUse("this process already runs it")
        self._creating.add(name)
        try:
            path = socket_path(name, self.socket_dir)
            if self.serve_uapi and await answers(path):
                raise NameInUse(f"{path} is served (by an interface of that name in some network "
                                "namespace)")
            if await link_exists(name, self.netns):
                raise NameInUse(f"a network interface of that name exists in {self._where()}")
            def open_tun(tun_name: str, *, vnet_hdr: bool) -> Tun:
                return _NamespacedTun(tun_name, mtu or DEFAULT_MTU, self.netns, vnet_hdr=vnet_hdr)

            try:
                with inside(self.netns):  # the daemon's assembly: the same options and TUN offloads
                    device = assemble_device(name, open_tun=open_tun)
            except TunError as exc:
                raise BackendFailure(str(exc)) from None
            hosted = _Hosted(device, _InNamespace(device, self.netns))
            self._hosted[name] = hosted
            try:
                await self._serve(name, hosted)
                with inside(self.netns):
                    device.start()
                device.on_gone = lambda: self._gone(name)
                await configure_link(name, self.netns, mtu, address)
            except BaseException:
                await self._close(name)
                raise
        finally:
            self._creating.discard(name)

    async def _serve(self, name: str, hosted: _Hosted) -> None:
        if self.serve_uapi:
            try:
                hosted.uapi = await UapiServer.start(name, hosted.configurable, self.socket_dir)
            except OSError as exc:
                if "served by another process" in str(exc):
                    raise NameInUse(str(exc)) from None
                raise BackendFailure(f"cannot serve the UAPI socket of {name}: {exc}", exc.errno) from None
        if self.stats_dir is not None:
            try:
                hosted.stats = await StatsServer.start(name, hosted.device.stats, self.stats_dir)
            except OSError as exc:
                raise BackendFailure(f"cannot serve the stats socket of {name}: {exc}", exc.errno) from None

    async def delete(self, name: str) -> None:
        if name not in self._hosted:
            raise NotServed("this process does not run it")
        await self._close(name)

    def _gone(self, name: str) -> None:
        """The device found its TUN gone (``ip link del``): close the rest."""
        hosted = self._hosted.get(name)
        if hosted is not None and hosted.closing is None:
            log.info("interface %s was deleted from outside; closing it", name)
            hosted.closing = asyncio.get_running_loop().create_task(self._close(name))

    async def _close(self, name: str) -> None:
        hosted = self._hosted.pop(name, None)
        if hosted is None:
            return
        hosted.device.on_gone = None
        for server in (hosted.uapi, hosted.stats):
            if server is not None:
                try:
                    await server.close()
                except Exception:
                    log.exception("closing a socket of %s failed", name)
        hosted.device.close()  # closing the TUN removes the link

    async def aclose(self) -> None:
        for name in list(self._hosted):
            await self._close(name)

    # --- talking to it --------------------------------------------------------------------

    def _get(self, name: str) -> _Hosted:
        hosted = self._hosted.get(name)
        if hosted is None:
            raise NotServed("this process does not run it")
        return hosted

    async def exchange(self, name: str, request: str) -> str:
        configurable = self._get(name).configurable
        try:
            requests = list(RequestReader().feed(request.encode()))
        except UapiError as exc:
            return exc.response()
        return "".join(answer(configurable, r.op, r.pairs) for r in requests)

    def device(self, name: str) -> Device:
        """The running device of interface ``name`` (its demux handlers and datagram sending,
        for what shares the WireGuard port: STUN and disco); NotServed if this process has none."""
        return self._get(name).device

    def start_relay(self, name: str, private_key: bytes, derp_map: DerpMap, *, home: int,
                    plain_http: bool = False) -> NodeKeyRelays:
        """The relay path over ``derp_map``'s regions for interface ``name``'s device, its
        WireGuard private key as the DERP node key, connected to ``home`` (event-loop thread;
        the caller closes it). A key rotation adds (``add``) and switches to (``use``) the new
        key's relay. ``plain_http``: DERP without TLS (labs only)."""
        def make(node_key: NodePrivateKey, home: int) -> DeviceRelay:
            return DeviceRelay.from_derp_map(node_key, derp_map, home=home, plain_http=plain_http)

        relay = NodeKeyRelays(make, NodePrivateKey(private_key), home=home)
        relay.attach(self.device(name))
        relay.start()
        return relay

    async def exists(self, name: str) -> bool:
        return name in self._hosted

    async def link(self, name: str) -> LinkState:
        self._get(name)
        return await link_state(name, self.netns)

    async def handshake_counts(self, name: str) -> dict[bytes, int] | None:
        peers = self._get(name).device.stats()["peers"]
        assert isinstance(peers, list)
        return {base64.b64decode(p["public_key"]): int(p["handshakes"]) for p in peers}

    async def names(self) -> list[str]:
        if not self._hosted:
            return []
        present = await link_names(self.netns)
        return sorted(name for name in self._hosted if name in present)
