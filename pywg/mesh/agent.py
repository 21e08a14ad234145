"""The mesh agent: registers this node with a coordinator, keeps its WireGuard interface
in step with the pushed topology, and reports health.

State lives in ``state_dir`` (0700): ``keys/`` (the KeyStore; the private key never leaves
it), ``node.json`` (node id, addresses and the node token, 0600), ``status.json`` (what
``pywg agent status`` shows; no secrets), ``agent.pid``, ``control.sock`` (``pywg agent
rotate``) and, while a key rotation runs, ``rotation.json`` (see ``pywg.mesh.rotation``).
When the coordinator is away the interface is left exactly as it is; the agent reconnects
with backoff and jitter and resumes the watch from the last revision it saw.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pywg.derp import NodePrivateKey
from pywg.derp.derpmap import DerpMap
from pywg.manage.backends.base import Backend
from pywg.manage.backends.inprocess import InProcessBackend
from pywg.manage.backends.uapi import UapiBackend
from pywg.manage.key import Key
from pywg.manage.keystore import KeyNotFound, KeyStore
from pywg.manage.tunnel import TunnelManager
from pywg.manage.types import Endpoint, InterfaceConfig, WireGuardPeer
from pywg.mesh import agent_health, agent_psk, device_keys, reconcile
from pywg.mesh.agent_traversal import (
    DERP_PREFIX,
    AgentTraversal,
    handshake_path,
    load_disco_key,
    parse_relay_text,
)
from pywg.mesh.failover import Replicas, parse_urls
from pywg.mesh.home_region import REMEASURE_INTERVAL, choose_home, measure, pick_home_region
from pywg.mesh.probe import Prober
from pywg.mesh.reconcile import MeshView, PeerSpec
from pywg.mesh.rotation import Rotator
from pywg.protocol.endpoint import RelayEndpoint

log = logging.getLogger(__name__)
KEY_ID = "wireguard"
ENDPOINTS_RETRY = (0.0, 0.2, 0.5, 1.0, 2.0)  # seconds before each retry of a failed endpoints PUT
ACCEPT_TIMEOUT = 3.0  # a rotation waits this long, at most, for DERP under the new key
ENDPOINTS_TIMEOUT = 5.0  # one endpoints PUT (a roam may leave a connection that never answers)


class TokenRefused(Exception):
    """The coordinator no longer knows this node's token (it was removed): register again."""


class RegistrationFailed(Exception):
    """The coordinator refused the registration (its JSON error is the message)."""


@dataclass(kw_only=True, repr=False)
class AgentConfig:
    coordinator: str  # base URL(s), e.g. http://10.0.0.1:8080[,http://10.0.0.2:8080] (replicas)
    auth_key: str = field(default="", repr=False)  # "" with ``tls`` presenting an X.509-SVID
    tls: Any = None  # a pywg.mesh.tls.ClientContexts for https:// (re-read when the files change)
    interface: str
    state_dir: Path
    name: str
    listen_port: int = 51820
    command: str | None = None  # the UAPI daemon (default pywg-daemon); wireguard-go works too
    # "daemon": the interface is a UAPI daemon's (it outlives the agent: a restart or a crash of
    # the agent keeps the tunnels); "in-process": pywg's engine in the agent process (serving
    # the UAPI socket, so `wg show` works; the interface ends with the agent)
    engine: str = "daemon"
    keepalive: int = 25
    health_interval: float = 10.0
    backoff_max: float = 5.0
    rotate_every: float | None = None  # seconds of key age between scheduled rotations
    # STUN servers ("IP:port") overriding the coordinator's stunServers (None: the coordinator's)
    stun: tuple[str, ...] | None = None
    derp_plain_http: bool = False  # DERP without TLS (labs only: the DERP map's nodes serve plain HTTP)
    derp_remeasure: float = REMEASURE_INTERVAL  # seconds between measurements of the DERP regions
    nat_observer: tuple[str, int] | None = None  # overriding the coordinator's natObserver

    def __repr__(self) -> str:
        return f"AgentConfig(coordinator={self.coordinator!r}, interface={self.interface!r}, name={self.name!r})"


def _write_private(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def local_candidates(port: int, exclude: str) -> list[str]:
    """This host's global addresses (not loopback, not the mesh interface) with ``port``."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=False).stdout
    found: list[str] = []
    for link in json.loads(out or "[]"):
        if link.get("ifname") in ("lo", exclude):
            continue
        for a in link.get("addr_info", []):
            ip = ipaddress.ip_address(a["local"])
            if ip.is_loopback or ip.is_link_local or a.get("scope") != "global":
                continue
            found.append(str(Endpoint(ip, port)))
    return found[:16]


class Agent:
    """One node's agent. ``run()`` until cancelled; the interface stays up if it crashes."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.view = MeshView()
        self.peers: dict[str, PeerSpec] = {}
        self.node: dict[str, Any] = {}
        self.connected = False
        self.dropped_messages = 0
        self.daemons = UapiBackend(config.command)  # also reads the pywg stats socket
        self.backend: Backend = self.daemons
        if config.engine == "in-process":
            self.backend = InProcessBackend()
        self.manager = TunnelManager(self.backend)
        self._private: Key | None = None
        self.replicas = Replicas(parse_urls(config.coordinator), backoff_max=config.backoff_max)
        self.pair_keys = agent_psk.PairKeys()  # per-pair preshared keys (when the coordinator has them on)
        self._applying = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._retry = agent_psk.Retry(self.apply)  # held-back peers: apply again later
        self.liveness = agent_health.Liveness(config.health_interval)
        # ICMP echo to each peer: its sockets open at the first probe, close when run() ends
        self.prober = Prober(stale_after=self.liveness.silence_limit)
        self.rotator = Rotator(self, every=config.rotate_every)
        # NAT traversal on the in-process device's WireGuard port (None with the daemon engine)
        self.nat: AgentTraversal | None = None
        self._endpoints_wanted: list[str] | None = None  # our candidates, not yet acknowledged
        self._endpoints_task: asyncio.Task[None] | None = None
        self._reapply: asyncio.Task[None] | None = None
        self._refresh_wanted = self._apply_wanted = False  # what _reapply still has to do
        self.relay: Any = None  # the in-process device's NodeKeyRelays, with a DERP map
        self._relay_task: asyncio.Task[None] | None = None
        self._accepted: Key | None = None  # a key the device accepts besides ours (rotation), on DERP too
        self._relay_wake = asyncio.Event()  # a new snapshot: the relay loop compares DERP maps

    @property
    def coordinator(self) -> str:
        """The replica this agent talks to now."""
        return self.replicas.current

    # --- identity and registration -----------------------------------------------------------

    def identity(self) -> Key:
        """The node's private key: loaded from the KeyStore, generated there the first time."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        store = KeyStore(self.state_dir / "keys", use_credentials=False)
        try:
            return store.load_private_key(KEY_ID)
        except KeyNotFound:
            key = Key.generate_private()
            store.store_private_key(KEY_ID, key)
            return key

    @property
    def public_key(self) -> str:
        assert self._private is not None
        return self._private.public_key().to_base64()

    @property
    def identity_key(self) -> Key:
        assert self._private is not None
        return self._private

    def use_key(self, key: Key) -> None:
        """A key rotation made ``key`` the node's key (the KeyStore has it already): our disco
        pings carry it, the relay sends through its DERP connection (the old key's stays, for
        the peers still on it, until ``drop_accepted_key``)."""
        previous, self._private = self._private, key
        if self._accepted is not None and bytes(self._accepted) == bytes(key):
            self._accepted = previous  # now the one accepted besides ours, until the overlap ends
        if self.nat is not None:
            self.nat.use_node_key(bytes(key.public_key()))
        if self.relay is not None:
            self.relay.use(NodePrivateKey(bytes(key)))

    async def accept_key(self, key: Key, timeout: float = ACCEPT_TIMEOUT) -> None:
        """Call once the device accepts ``key`` besides the node's key (a rotation's new key,
        before it is announced): be on DERP under it too, so that the peers that learn it can
        reach us there at once; waits (at most ``timeout``) for that connection."""
        self._accepted = key
        if self.relay is None:
            return  # _run_relay adds it
        relay = self.relay.add(NodePrivateKey(bytes(key)))
        try:
            await relay.wait_connected(timeout)
        except (TimeoutError, OSError, RuntimeError) as exc:
            log.warning("DERP: not connected under the new key yet (%s); announcing it anyway", exc or "timeout")

    def drop_accepted_key(self) -> None:
        """Only the node's key is accepted now (the overlap ended, or the rotation was undone):
        the DERP connections of other keys close."""
        self._accepted = None
        if self.relay is not None:
            self.relay.drop_others()

    async def register(self, session: aiohttp.ClientSession) -> None:
        """POST /api/v1/register; keeps the node token in node.json (0600)."""
        body = {"name": self.config.name, "publicKey": self.public_key,
                "endpoints": local_candidates(self.config.listen_port, self.config.interface)}
        if self.nat is not None:
            body["discoKey"] = self.nat.disco_public
        headers = {"Authorization": f"Bearer {self.config.auth_key}"} if self.config.auth_key else {}
        async with session.post(f"{self.coordinator}/api/v1/register", json=body, headers=headers,
                                ssl=self._ssl()) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 201:
                raise RegistrationFailed(f"{resp.status}: {data.get('error', data)}")
        self.node = {k: data[k] for k in ("id", "name", "internalIp", "internalIpv6", "prefix4", "prefix6", "token")}
        if self.nat is not None:
            self.node["discoKey"] = self.nat.disco_public  # registered with it (no secret)
            self.nat.from_coordinator(data)
        _write_private(self.state_dir / "node.json", self.node)
        self.view = MeshView()  # a new node: start from a snapshot
        log.info("registered as node %s (%s)", self.node["id"], self.node["internalIp"])

    def _ssl(self) -> Any:
        """The TLS context for the next request (the SVID files as they are now), or True."""
        return self.config.tls.current() if self.config.tls is not None else True

    def _load_node(self) -> bool:
        try:
            self.node = json.loads((self.state_dir / "node.json").read_text())
        except (OSError, ValueError):
            return False
        return "token" in self.node

    # --- the interface -----------------------------------------------------------------------

    async def ensure_interface(self) -> None:
        """Create the interface with the node's key, port and mesh addresses (if missing)."""
        name = self.config.interface
        prefix4 = ipaddress.ip_network(self.node["prefix4"])
        address = ipaddress.ip_interface(f"{self.node['internalIp']}/{prefix4.prefixlen}")
        if not await self.manager.backend.exists(name):
            await self.manager.create_interface(InterfaceConfig(
                name=name, private_key=self._private, listen_port=self.config.listen_port, address=address))
        prefix6 = ipaddress.ip_network(self.node["prefix6"])
        # The node's addresses only (a node registered again may have new ones). An agent
        # restarted on its interface finds them there: untouched, or the routes would blink.
        address6 = f"{self.node['internalIpv6']}/{prefix6.prefixlen}"
        cmds = [("ip", "addr", "flush", "dev", name, "scope", "global"),
                ("ip", "addr", "replace", str(address), "dev", name),
                ("ip", "-6", "addr", "replace", address6, "dev", name)]
        if await _global_addresses(name) == {str(address), address6}:
            cmds = []
        for cmd in cmds:
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
            await proc.wait()
        self.peers = {}
        self.pair_keys = agent_psk.PairKeys()
        for p in (await self.manager.get_interface(name)).peers:
            self.pair_keys.on_device(p.public_key.to_base64(), p.preshared_key)
            self.peers[p.public_key.to_base64()] = PeerSpec(
                p.public_key.to_base64(), tuple(str(n) for n in p.allowed_ips),
                None if p.endpoint is None else str(p.endpoint), p.persistent_keepalive)

    async def apply(self) -> None:
        """Make the interface's peers those the view asks for (unchanged ones untouched);
        a peer waits for its preshared key (see pywg.mesh.agent_psk), retried later."""
        async with self._applying:
            await self._apply()

    async def _apply(self) -> None:
        endpoints = keepalive = None
        if self.nat is not None:
            endpoints = self.nat.apply(self.view, self.node.get("id", ""), self.public_key)
            keepalive = self.nat.keepalive(self.config.keepalive)
        self._note_roamed()
        desired = reconcile.desired_peers(self.view, self.node.get("id", ""), self.public_key,
                                          keepalive=self.config.keepalive if keepalive is None else keepalive,
                                          endpoints=endpoints)
        node_ids = {n["publicKey"]: node_id for node_id, n in self.view.nodes.items()}
        changes, held = await self.pair_keys.prepare(self._psk_post(), reconcile.plan(self.peers, desired),
                                                     self.peers, desired, node_ids)
        if held:
            log.info("%d peer(s) wait for their preshared key; trying again in %.0f s", len(held), self._retry.delay)
            self._retry.schedule()
        else:
            self._retry.reset()
        for change in changes:
            name = self.config.interface
            if change.op == "remove":
                await self.manager.remove_peer(name, change.public_key)
                self.peers.pop(change.public_key, None)
                self.pair_keys.removed(change.public_key)
                log.info("peer %s removed", change.public_key[:8])
                continue
            spec = change.spec
            assert spec is not None
            region = None if spec.endpoint is None else parse_relay_text(spec.endpoint)
            peer = WireGuardPeer(public_key=Key.parse(spec.public_key),
                                 endpoint=None if spec.endpoint is None or region is not None
                                 else Endpoint.parse(spec.endpoint),
                                 allowed_ips=tuple(ipaddress.ip_network(n) for n in spec.allowed_ips),
                                 persistent_keepalive=spec.persistent_keepalive,
                                 preshared_key=self.pair_keys.key_for(spec.public_key))
            if change.op == "add":
                await self.manager.add_peer(name, peer)
            elif change.op == "rename":  # the node rotated its key: sessions kept
                await device_keys.rename_peer(self.manager, name, change.public_key, peer)
                self.peers.pop(change.public_key, None)
                self.pair_keys.removed(change.public_key)
            else:
                await self.manager.update_peer(name, peer)
            if region is not None and isinstance(self.backend, InProcessBackend):  # its DERP path
                key = bytes(Key.parse(spec.public_key))
                self.backend.device(name).set_endpoint(key, RelayEndpoint(region, key))
            self.peers[spec.public_key] = spec
            self.pair_keys.on_device(spec.public_key, peer.preshared_key)
            log.info("peer %s %sed", spec.public_key[:8], change.op.rstrip("e"))

    def _note_roamed(self) -> None:
        """WireGuard roams a peer to the source of its newest packet (a late one via DERP, or
        one direct): what the device has now is what the reconcile compares with, so the
        traversal's choice is put back where it differs."""
        if self.relay is None or not isinstance(self.backend, InProcessBackend):
            return
        with contextlib.suppress(Exception):
            peers = self.backend.device(self.config.interface).stats()["peers"]
            assert isinstance(peers, list)
            for p in peers:
                key, live = p["public_key"], p.get("endpoint")
                spec = self.peers.get(key)
                if spec is None or not isinstance(live, str):
                    continue
                if live.startswith(DERP_PREFIX):
                    live = live.split("/", 1)[0]
                if live != spec.endpoint:
                    self.peers[key] = dataclasses.replace(spec, endpoint=live)

    def _psk_post(self) -> agent_psk.Post:
        async def unavailable(body: dict[str, Any]) -> tuple[int, Any]:
            raise agent_psk.PskUnavailable("not connected to the coordinator")
        if self._session is None or not self.node.get("token"):
            return unavailable
        return agent_psk.http_post(self._session, f"{self.coordinator}/api/v1/nodes/{self.node['id']}/preshared-keys",
                                   self.node["token"], self._ssl())

    # --- the watch ---------------------------------------------------------------------------

    async def watch(self, session: aiohttp.ClientSession) -> None:
        """One watch connection: resume from the view's revision, apply every message."""
        url = f"{self.coordinator}/api/v1/watch"
        params = {"since": str(self.view.revision)} if self.view.synced else {}
        headers = {"Authorization": f"Bearer {self.node['token']}"}
        try:
            ws = await session.ws_connect(url, params=params, headers=headers, heartbeat=15, ssl=self._ssl())
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403, 404):
                raise TokenRefused() from None
            raise
        async with ws:
            self.connected = True
            self.replicas.succeeded()
            self.pair_keys.forget()  # the feature (or the secret) may have changed meanwhile
            self._push_endpoints()  # candidates that changed while away
            await self._register_disco_key(session)  # if reporting it at the start failed
            await self.write_status()
            if self.view.synced:  # resumed: no message may come for long, so ask about the keys now
                await self.apply()
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                try:
                    data = json.loads(msg.data)
                    if not isinstance(data, dict):
                        raise reconcile.BadMessage("not an object")
                    reconcile.apply_message(self.view, data)
                    if self.nat is not None and data.get("type") in ("snapshot", "settings"):
                        self.nat.from_coordinator(data)
                        self._start_relay()
                except (ValueError, reconcile.BadMessage) as exc:
                    self.dropped_messages += 1
                    log.warning("dropped a watch message: %s", exc)
                    continue
                if self.node.get("id") and self.view.synced and self.node["id"] not in self.view.nodes:
                    raise TokenRefused()  # this node was removed
                await self.apply()
                await self.write_status()

    async def health_loop(self, session: aiohttp.ClientSession) -> None:
        """Every health_interval: echo each peer (pywg.mesh.probe; the replies count from the
        next round on), write status.json and report the connections to the coordinator."""
        while True:
            await asyncio.sleep(self.config.health_interval)
            with contextlib.suppress(Exception):
                self.prober.send((n["publicKey"], (n.get("internalIp"), n.get("internalIpv6")))
                                 for n in self.view.nodes.values() if n.get("publicKey") in self.peers)
                conns = await self.write_status()
                if self.connected and self.node.get("token"):
                    async with session.post(f"{self.coordinator}/api/v1/nodes/{self.node['id']}/health",
                                            json={"interval": self.config.health_interval, "connections": conns},
                                            headers={"Authorization": f"Bearer {self.node['token']}"},
                                            ssl=self._ssl()) as resp:
                        if resp.status != 200:
                            log.warning("the health report was refused: %s %s", resp.status, await resp.text())

    async def write_status(self) -> list[dict[str, Any]]:
        """status.json for ``pywg agent status``; returns the connections for the health report."""
        by_key = {n["publicKey"]: n for n in self.view.nodes.values()}
        stats = None
        with contextlib.suppress(Exception):
            stats = await self.manager.get_stats(self.config.interface)
        now = time.time()
        peers, conns = agent_health.peer_entries(stats.peers if stats else (), by_key, self.liveness,
                                                 self.prober.echoes, now, self.prober.clock())
        keepalive = self.nat.keepalive(self.config.keepalive) if self.nat is not None else self.config.keepalive
        for entry, p in zip(peers, stats.peers if stats else (), strict=True):
            path = self.nat.peer_status(entry["publicKey"]) if self.nat is not None else None
            if path is None:
                age = now - p.last_handshake.timestamp() if p.last_handshake else None
                path = handshake_path(age)
                path["endpoint"] = entry.get("endpoint")
                if self.nat is not None:
                    path["reason"] = "the peer registered no disco key (it runs no NAT traversal)"
            entry["wgEndpoint"] = entry.get("endpoint")
            entry.update(path)
        nat = (self.nat.own_status(keepalive) if self.nat is not None
               else {"candidates": [], "mapping": "unknown", "behindNat": None, "keepalive": keepalive,
                     "reason": "traversal needs --engine in-process"})
        status = {"nodeId": self.node.get("id"), "name": self.node.get("name"),
                  "internalIp": self.node.get("internalIp"), "internalIpv6": self.node.get("internalIpv6"),
                  "interface": self.config.interface, "publicKey": self.public_key,
                  "coordinator": self.coordinator, "coordinatorConnected": self.connected,
                  "revision": self.view.revision, "droppedMessages": self.dropped_messages,
                  "healthInterval": self.config.health_interval, "keepalive": keepalive, "nat": nat,
                  "device": await _device_info(self.daemons, self.config.interface, self.config.engine), "peers": peers,
                  "echoes": self.prober.echoes.stats(), "updatedAt": now, **self.rotator.status()}
        _write_private(self.state_dir / "status.json", status)
        return conns

    # --- the whole ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Register (once), bring the interface up, then watch forever with backoff+jitter."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.rotator.recover_keys()  # a rotation a crash interrupted: the keystore as its journal says
        self._private = self.identity()
        if self.config.engine == "in-process":
            from pywg.nat.stun_servers import parse_server_list

            stun = None if self.config.stun is None else parse_server_list(list(self.config.stun), "stun")
            self.nat = AgentTraversal(load_disco_key(self.state_dir), stun, self.config.nat_observer)
        (self.state_dir / "agent.pid").write_text(str(os.getpid()))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5)) as session:
            self._session = session
            while not self._load_node():
                try:
                    await self.register(session)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("coordinator %s unreachable (%s); retrying", self.coordinator, exc)
                    await asyncio.sleep(self.replicas.failed())
            await self._register_disco_key(session)
            await self.ensure_interface()
            self._start_traversal()
            self._start_relay()
            health = asyncio.create_task(self.health_loop(session))
            control, rotations = await self.rotator.start(session)
            try:
                while True:
                    try:
                        await self.watch(session)
                    except TokenRefused:
                        log.warning("the coordinator refused this node's token: registering again")
                        (self.state_dir / "node.json").unlink(missing_ok=True)
                        self.connected = False
                        while True:
                            try:
                                await self.register(session)
                                break
                            except (aiohttp.ClientError, OSError, TimeoutError, RegistrationFailed) as exc:
                                log.warning("registration at %s failed (%s); retrying", self.coordinator, exc)
                                await asyncio.sleep(self.replicas.failed())
                        await self.ensure_interface()
                        self._push_endpoints()
                        continue
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        log.info("watch on %s lost (%s); tunnels untouched, reconnecting", self.coordinator, exc)
                    self.connected = False
                    pause = self.replicas.failed()
                    await self.write_status()
                    await asyncio.sleep(pause)
            finally:
                health.cancel()
                self._retry.cancel()
                for task in (self._endpoints_task, self._reapply, self._relay_task):
                    if task is not None:
                        task.cancel()
                if self.nat is not None:
                    await self.nat.close()
                if self.relay is not None:
                    await self.relay.close()
                self.prober.close()
                rotations.cancel()
                await control.close()
                self.connected = False
                if self.backend is not self.daemons:
                    await self.backend.aclose()  # the in-process interface ends with the agent


    # --- NAT traversal (in-process engine) ---------------------------------------------------

    async def _register_disco_key(self, session: aiohttp.ClientSession) -> None:
        """The node was registered without our disco key (before it had one, or disco.key was
        made anew): PUT it to the coordinator with the node's token (registering again would be
        refused for a known name and public key); the peers get it as a node change."""
        if self.nat is None or self.node.get("discoKey") == self.nat.disco_public or not self.node.get("token"):
            return
        try:
            async with session.put(f"{self.coordinator}/api/v1/nodes/{self.node['id']}/disco-key",
                                   json={"discoKey": self.nat.disco_public}, ssl=self._ssl(),
                                   timeout=aiohttp.ClientTimeout(total=ENDPOINTS_TIMEOUT),
                                   headers={"Authorization": f"Bearer {self.node['token']}"}) as resp:
                if resp.status != 200:
                    log.warning("the coordinator refused our disco key (%s %s); NAT traversal towards this "
                                "node needs it", resp.status, await resp.text())
                    return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("reporting our disco key failed (%s); again on reconnect", exc)
            return
        self.node["discoKey"] = self.nat.disco_public
        _write_private(self.state_dir / "node.json", self.node)
        log.info("reported our disco key to the coordinator")

    def _start_traversal(self) -> None:
        if self.nat is None or not isinstance(self.backend, InProcessBackend):
            return
        device = self.backend.device(self.config.interface)

        def local() -> list[tuple[str, int]]:
            found = [Endpoint.parse(e) for e in local_candidates(self.config.listen_port, self.config.interface)]
            return [(str(e.host), e.port) for e in found]

        def activity() -> dict[bytes, int]:
            peers = device.stats()["peers"]
            assert isinstance(peers, list)
            return {base64.b64decode(p["public_key"]): int(p["tx_bytes"]) for p in peers}

        self.nat.start(device, bytes(self.identity_key.public_key()), local=local, activity=activity,
                       on_candidates=self._candidates_changed, on_change=self._traversal_changed,
                       on_status=self._path_status_changed,
                       credential=self._observer_credential)

    def _observer_credential(self) -> tuple[str, str] | None:
        """(node id, node token) for the NAT observer's requests, once registered."""
        node_id, token = self.node.get("id"), self.node.get("token")
        return (node_id, token) if isinstance(node_id, str) and isinstance(token, str) else None

    def _start_relay(self) -> None:
        """With the coordinator's DERP map and the in-process engine: run the device's relay
        (``_relay_loop``), once; a later call (a new snapshot) wakes the loop to compare maps."""
        nat = self.nat
        if (nat is None or nat.derp_map is None or nat.traversal is None
                or not isinstance(self.backend, InProcessBackend)):
            return
        if self._relay_task is not None:
            self._relay_wake.set()
            return
        self._relay_task = asyncio.get_running_loop().create_task(self._relay_loop())

    async def _relay_loop(self) -> None:
        """Pick the home region, run the relay, tell the traversal and the coordinator; then
        every --derp-remeasure seconds (or when woken by a snapshot) measure again and move
        home when another region is clearly better (pywg.mesh.home_region), and run a new
        relay when the coordinator's DERP map changed. A turn that fails is tried again."""
        derp_map: DerpMap | None = None
        home: int | None = None
        while True:
            try:
                derp_map, home = await self._follow_derp(derp_map, home)
            except Exception:
                log.exception("running the DERP relay failed; again in %g s", self.config.derp_remeasure)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._relay_wake.wait(), self.config.derp_remeasure)
            self._relay_wake.clear()

    async def _follow_derp(self, derp_map: DerpMap | None, home: int | None) -> tuple[DerpMap | None, int | None]:
        """One turn of the relay loop: the map and home region in use afterwards."""
        nat = self.nat
        assert nat is not None
        if nat.derp_map is None:
            return derp_map, home  # the coordinator sent none: keep the relay we have
        if self.relay is None or home is None or nat.derp_map != derp_map:
            if self.relay is not None:
                log.info("the coordinator's DERP map changed: a new relay")
                await self.relay.close()
                self.relay = None
            derp_map = nat.derp_map
            home, times = await pick_home_region(derp_map, current=home if home in derp_map.regions else None)
            await self._run_relay(derp_map, home, times)
            return derp_map, home
        times = await measure(derp_map)
        nat.region_times = times
        better = choose_home(derp_map, times, home)
        if better is not None and better != home:
            log.info("DERP home region %d -> %d (connect times: %s)", home, better, _times_text(times))
            await self.relay.set_home(better)
            home = nat.home_region = better
            self._announce_region()
        return derp_map, home

    async def _run_relay(self, derp_map: DerpMap, home: int, times: dict[int, float]) -> None:
        nat, backend = self.nat, self.backend
        assert nat is not None and isinstance(backend, InProcessBackend)
        nat.region_times = times
        device = backend.device(self.config.interface)
        self.relay = backend.start_relay(self.config.interface, bytes(self.identity_key), derp_map, home=home,
                                         plain_http=self.config.derp_plain_http)
        if self._accepted is not None:  # a rotation is under way: on DERP under its other key too
            self.relay.add(NodePrivateKey(bytes(self._accepted)))
        log.info("DERP home region %d (connect times: %s)", home, _times_text(times))

        def received() -> dict[bytes, tuple[int, bool]]:
            peers = device.stats()["peers"]
            assert isinstance(peers, list)
            return {base64.b64decode(p["public_key"]): (int(p["rx_bytes"]), str(p.get("endpoint")).startswith(
                DERP_PREFIX)) for p in peers}

        nat.use_relay(home, received)
        self._announce_region()
        self._traversal_changed()

    def _announce_region(self) -> None:
        """Our endpoints again, with the home region: peers reach us there."""
        assert self.nat is not None and self.nat.traversal is not None
        self._endpoints_wanted = self.nat.traversal.published
        self._push_endpoints()

    def _candidates_changed(self, endpoints: list[str]) -> None:
        self._endpoints_wanted = endpoints
        self._push_endpoints()

    def _push_endpoints(self) -> None:
        """PUT our current candidates to the coordinator (once connected; the latest wins)."""
        if self._endpoints_wanted is None or (self._endpoints_task is not None and not self._endpoints_task.done()):
            return
        self._endpoints_task = asyncio.get_running_loop().create_task(self._put_endpoints())

    async def _put_endpoints(self) -> None:
        retries = iter(ENDPOINTS_RETRY)
        while self._endpoints_wanted is not None and self._session is not None and self.node.get("token"):
            wanted = self._endpoints_wanted
            region = None if self.nat is None else self.nat.home_region
            body: dict[str, Any] = {"endpoints": wanted}
            if region is not None:
                body["region"] = str(region)
            try:
                async with self._session.put(f"{self.coordinator}/api/v1/nodes/{self.node['id']}/endpoints",
                                             json=body, ssl=self._ssl(),
                                             timeout=aiohttp.ClientTimeout(total=ENDPOINTS_TIMEOUT),
                                             headers={"Authorization": f"Bearer {self.node['token']}"}) as resp:
                    if resp.status != 200:
                        log.warning("the coordinator refused our endpoints: %s %s", resp.status, await resp.text())
                        return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # A roam resets the pooled connection (our NAT forgot it): a new one works at once.
                delay = next(retries, None)
                if delay is None:
                    log.info("reporting our endpoints failed (%s); again on reconnect", exc)
                    return
                log.info("reporting our endpoints failed (%s); again in %g s", exc, delay)
                await asyncio.sleep(delay)
                continue
            log.info("reported our endpoints: %s", ", ".join(wanted))
            if self._endpoints_wanted == wanted and (self.nat is None or self.nat.home_region == region):
                self._endpoints_wanted = None

    def _traversal_changed(self) -> None:
        """A peer's confirmed path or the keepalive changed: apply, then write the status."""
        self._refresh(apply=True)

    def _path_status_changed(self) -> None:
        """Only a peer's path state changed (found again, lost, none): write the status."""
        self._refresh(apply=False)

    def _refresh(self, *, apply: bool) -> None:
        """Coalesced: one task at a time; a change that arrives while it runs makes it run again
        (the status it was writing may already be stale)."""
        self._refresh_wanted = True
        self._apply_wanted = self._apply_wanted or apply
        if self._reapply is not None and not self._reapply.done():
            return

        async def again() -> None:
            while self._refresh_wanted:
                self._refresh_wanted = False
                try:
                    if self._apply_wanted:
                        self._apply_wanted = False
                        await self.apply()
                    await self.write_status()
                except Exception:
                    log.exception("applying a traversal change failed")

        self._reapply = asyncio.get_running_loop().create_task(again())


def _times_text(times: dict[int, float]) -> str:
    return ", ".join(f"{r}: {t * 1000:.1f} ms" for r, t in sorted(times.items())) or "none answered"


async def _global_addresses(name: str) -> set[str]:
    """The link's global addresses as ADDR/LEN (empty when it cannot be read)."""
    proc = await asyncio.create_subprocess_exec("ip", "-j", "addr", "show", "dev", name,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    try:
        links = json.loads(out or b"[]")
        return {f"{a['local']}/{a['prefixlen']}" for link in links for a in link.get("addr_info", [])
                if a.get("scope") == "global"}
    except (ValueError, KeyError, TypeError):
        return set()


async def _device_info(daemons: UapiBackend, name: str, engine: str) -> dict[str, Any]:
    """The device's engine, crypto backend and data path, from the pywg stats socket when it
    is pywg (the agent's own, in process)."""
    stats = await daemons.device_stats(name)
    if stats is None:
        return {"implementation": "other (UAPI only)", "engine": engine}
    return {"implementation": "pywg", "engine": engine,
            **{k: stats[k] for k in ("crypto", "data_path") if k in stats}}
