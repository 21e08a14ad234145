"""The TunnelManager for real, in two network namespaces (the ``bed`` fixture).

Interface A is made by the manager in namespace A through each backend: pywg's engine in
this process (``InProcessBackend(netns=A)``), a pywg daemon and wireguard-go (both through
``UapiBackend``). Its peer B runs in namespace B (wireguard-go or a pywg daemon, set up
with the stock ``wg``). The story: create, add a peer, ping through the tunnel, stats
against ``wg show dump``, JSON round trip, update (a prefix taken away stops carrying
traffic), remove (ping fails), delete (link and socket gone). Then bad input (typed errors,
interface unchanged), failures half-way (a port in use, a request wireguard-go applies
only in part), timeouts against sockets that answer late or never, an interrupted create,
and the ``pywg`` command.

The in-process devices run on the test's event loop: blocking tools (ping, wg) run in a
thread (``asyncio.to_thread``) so the loop keeps forwarding packets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import pytest

from pywg.manage import types
from pywg.manage.backends import Backend, InProcessBackend, UapiBackend
from pywg.manage.key import Key
from pywg.manage.tunnel import (
    BackendError,
    InterfaceExists,
    InterfaceNotFound,
    InvalidConfig,
    ManagerError,
    PeerExists,
    PeerNotFound,
    TunnelManager,
)
from pywg.manage.types import Endpoint, InterfaceConfig, InterfaceStats, WireGuardInterface, WireGuardPeer
from pywg.manage.uapi_client import exchange as uapi_exchange
from pywg.manage.uapi_client import socket_path
from pywg.testing.netns import Bed, Daemon, ping, run

pytestmark = pytest.mark.netns

PORT_A, PORT_B = 51821, 51822
SLACK = 0.35  # scheduling allowance on top of a timeout (below the slow socket's 0.6 s)

# (backend of interface A, implementation of peer B)
BACKENDS = [
    pytest.param("inprocess", "wireguard-go", id="inprocess"),
    pytest.param("pywg-daemon", "wireguard-go", id="uapi-pywg"),
    pytest.param("wireguard-go", "pywg", id="uapi-wireguard_go"),
]
KINDS = [pytest.param("inprocess", id="inprocess"), pytest.param("pywg-daemon", id="uapi-pywg"),
         pytest.param("wireguard-go", id="uapi-wireguard_go")]


def net(text: str) -> types.IPNetwork:
    return ipaddress.ip_network(text)


def make_backend(kind: str, bed: Bed) -> Backend:
    if kind == "inprocess":
        return InProcessBackend(netns=bed.ns_a)
    return UapiBackend(kind, netns=bed.ns_a)


async def sh(*args: str, ns: str | None = None) -> str:
    return await asyncio.to_thread(run, *args, ns=ns)


async def pings(ns: str, address: str) -> None:
    await asyncio.to_thread(ping, ns, address)


async def no_reply(ns: str, address: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "1", address,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return await proc.wait() != 0


async def link_present(ns: str, name: str) -> bool:
    proc = await asyncio.create_subprocess_exec("ip", "-n", ns, "link", "show", "dev", name,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return await proc.wait() == 0


async def wg_dump(ns: str, name: str) -> tuple[list[str], dict[str, list[str]]]:
    """``wg show NAME dump``: the interface line, and the peer lines by public key."""
    lines = (await sh("wg", "show", name, "dump", ns=ns)).splitlines()
    return lines[0].split("\t"), {line.split("\t")[0]: line.split("\t") for line in lines[1:]}


def start_peer(bed: Bed, impl: str, key: Key, addresses: list[str]) -> Daemon:
    return bed.start_interface(bed.ns_b, bed.unique_ifname("pb"), impl=impl, addresses=addresses,
                               private_key=key.to_base64(), listen_port=PORT_B)


async def gone(bed: Bed, manager: TunnelManager, name: str) -> None:
    """The interface is gone everywhere: manager, link, UAPI socket."""
    with pytest.raises(InterfaceNotFound):
        await manager.get_interface(name)
    assert not await link_present(bed.ns_a, name)
    assert not socket_path(name).exists()


# --- the story, through each backend ------------------------------------------------------


@pytest.mark.parametrize(("kind", "peer_impl"), BACKENDS)
def test_create_peer_ping_update_remove_delete(bed: Bed, kind: str, peer_impl: str) -> None:
    asyncio.run(_story(bed, kind, peer_impl))


async def _story(bed: Bed, kind: str, peer_impl: str) -> None:
    ka, kb, psk = Key.generate_private(), Key.generate_private(), Key.generate_preshared()
    b = start_peer(bed, peer_impl, kb, ["10.202.0.2/24", "10.203.0.2/24"])
    bed.set_wg_peer(b, ka.public_key().to_base64(), allowed_ips="10.202.0.1/32", preshared_key=psk.to_base64())
    name, second = bed.unique_ifname("ma"), bed.unique_ifname("mb")
    b_pub = kb.public_key().to_base64()

    async with TunnelManager(make_backend(kind, bed), default_timeout=20) as m:
        iface = await m.create_interface(InterfaceConfig(
            name=name, private_key=ka, listen_port=PORT_A, address=ipaddress.ip_interface("10.202.0.1/24"),
            mtu=1380))
        assert (iface.name, iface.public_key, iface.listen_port, str(iface.address), iface.mtu, iface.peers) == (
            name, ka.public_key(), PORT_A, "10.202.0.1/24", 1380, ())
        own, peers = await wg_dump(bed.ns_a, name)  # `wg` reaches it, whichever backend serves it
        assert own[1:3] == [ka.public_key().to_base64(), str(PORT_A)] and peers == {}
        # several interfaces through one manager (and, in-process, one process)
        await m.create_interface(InterfaceConfig(name=second))
        assert {name, second} <= set(await m.list_interfaces())

        peer_b = WireGuardPeer(public_key=kb.public_key(), preshared_key=psk,
                               endpoint=Endpoint.parse(f"{bed.outer_b}:{PORT_B}"),
                               allowed_ips=(net("10.202.0.2/32"), net("10.203.0.0/24")))
        await m.add_peer(name, peer_b)
        await sh("ip", "route", "add", "10.203.0.0/24", "dev", name, ns=bed.ns_a)
        await pings(bed.ns_a, "10.202.0.2")
        await pings(bed.ns_a, "10.203.0.2")

        # stats agree with `wg show dump` (read around them: counters only grow)
        _, dump_before = await wg_dump(bed.ns_a, name)
        stats = await m.get_stats(name)
        _, dump_after = await wg_dump(bed.ns_a, name)
        (ps,) = stats.peers
        assert ps.public_key == kb.public_key() and ps.endpoint == peer_b.endpoint
        lo, hi = dump_before[b_pub], dump_after[b_pub]
        assert 0 < int(lo[5]) <= ps.rx_bytes <= int(hi[5])
        assert 0 < int(lo[6]) <= ps.tx_bytes <= int(hi[6])
        assert ps.last_handshake is not None and int(ps.last_handshake.timestamp()) == int(hi[4])
        assert stats.public_key == ka.public_key() and stats.listen_port == PORT_A
        if kind == "wireguard-go":
            assert ps.handshakes is None  # UAPI reports only the latest handshake time
        else:
            assert ps.handshakes is not None and ps.handshakes >= 1
        assert InterfaceStats.from_json(stats.to_json()) == stats

        # get_interface, and its JSON
        got = await m.get_interface(name)
        assert got.private_key == ka and got.public_key == ka.public_key()
        assert dataclasses.replace(got.peers[0], last_handshake=None) == peer_b
        assert got.peers[0].last_handshake == ps.last_handshake
        text = got.to_json()
        assert "privateKey" not in text and "presharedKey" not in text and psk.to_base64() not in text
        assert WireGuardInterface.from_json(got.to_json(include_secrets=True)) == got
        public = WireGuardInterface.from_json(text)
        assert public.public_key == got.public_key and public.private_key is None and public.mtu == 1380

        # update: 10.203.0.0/24 is no longer B's, so traffic there stops
        await m.update_peer(name, dataclasses.replace(peer_b, allowed_ips=(net("10.202.0.2/32"),),
                                                      persistent_keepalive=25))
        (updated,) = (await m.get_interface(name)).peers
        assert updated.allowed_ips == (net("10.202.0.2/32"),)
        assert (updated.persistent_keepalive, updated.preshared_key, updated.endpoint) == (25, psk, peer_b.endpoint)
        await pings(bed.ns_a, "10.202.0.2")
        assert await no_reply(bed.ns_a, "10.203.0.2")

        # remove: no peer, no traffic
        await m.remove_peer(name, kb.public_key())
        assert (await m.get_interface(name)).peers == ()
        assert (await wg_dump(bed.ns_a, name))[1] == {}
        assert await no_reply(bed.ns_a, "10.202.0.2")

        # delete: link, socket and process gone
        await m.delete_interface(name)
        await m.delete_interface(second)
        for gone_name in (name, second):
            await gone(bed, m, gone_name)
            assert gone_name not in await m.list_interfaces()


def test_in_process_interface_deleted_from_outside(bed: Bed) -> None:
    async def main() -> None:
        name = bed.unique_ifname("mx")
        async with TunnelManager(InProcessBackend(netns=bed.ns_a)) as m:
            await m.create_interface(InterfaceConfig(name=name, private_key=Key.generate_private()))
            await sh("ip", "link", "del", name, ns=bed.ns_a)
            for _ in range(100):
                if name not in await m.list_interfaces() and not socket_path(name).exists():
                    break
                await asyncio.sleep(0.05)
            await gone(bed, m, name)

    asyncio.run(main())


# --- bad input, failures half-way ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_refused_and_changes_nothing(bed: Bed, kind: str) -> None:
    asyncio.run(_bad_input(bed, kind))


async def _bad_input(bed: Bed, kind: str) -> None:
    ka = Key.generate_private()
    name, new, missing = bed.unique_ifname("ma"), bed.unique_ifname("mn"), bed.unique_ifname("mz")
    known = WireGuardPeer(public_key=Key.generate_private().public_key(), preshared_key=Key.generate_preshared(),
                          endpoint=Endpoint.parse(f"{bed.outer_b}:{PORT_B}"), allowed_ips=(net("10.202.0.2/32"),))
    other = Key.generate_private().public_key()
    other64 = other.to_base64()
    known_json = known.to_dict()

    async with TunnelManager(make_backend(kind, bed), default_timeout=20) as m:
        await m.create_interface(InterfaceConfig(name=name, private_key=ka, listen_port=PORT_A,
                                                 address=ipaddress.ip_interface("10.202.0.1/24"), peers=(known,)))
        before = await m.get_interface(name)
        cases: list[tuple[Callable[[], Awaitable[Any]], type[Exception], str]] = [
            (lambda: m.add_peer(name, {"publicKey": "not a key"}), InvalidConfig, "publicKey"),
            (lambda: m.add_peer(name, {"publicKey": other64[:-2] + "=="}), InvalidConfig, "publicKey"),
            (lambda: m.add_peer(name, {"publicKey": other64, "allowedIps": ["10.0.0.0/33"]}), InvalidConfig,
             "allowedIps[0]"),
            (lambda: m.add_peer(name, {"publicKey": other64, "allowedIps": ["10.0.0.0/8", "10.0.0.300/32"]}),
             InvalidConfig, "allowedIps[1]"),
            (lambda: m.add_peer(name, {"publicKey": other64, "endpoint": "10.0.0.1:65536"}), InvalidConfig,
             "endpoint"),
            (lambda: m.add_peer(name, {"publicKey": other64, "persistentKeepalive": 65536}), InvalidConfig,
             "persistentKeepalive"),
            (lambda: m.add_peer(name, WireGuardPeer(public_key=other, endpoint=Endpoint(
                ipaddress.IPv6Address("fe80::1%zone-name-too-long"), 51820))), InvalidConfig, "endpoint"),
            (lambda: m.add_peer(name, {"publicKey": other64, "bogus": 1}), InvalidConfig, "bogus"),
            (lambda: m.add_peer(name, known), PeerExists, "already has peer"),
            (lambda: m.add_peer(name, WireGuardPeer(public_key=ka.public_key())), InvalidConfig, "publicKey"),
            (lambda: m.add_peer("a" * 16, known), InvalidConfig, "name"),
            (lambda: m.add_peer(missing, known), InterfaceNotFound, missing),
            (lambda: m.remove_peer(name, other), PeerNotFound, "has no peer"),
            (lambda: m.remove_peer(name, "AAAA"), InvalidConfig, "publicKey"),
            (lambda: m.update_peer(name, WireGuardPeer(public_key=other)), PeerNotFound, "has no peer"),
            (lambda: m.update_peer(missing, known), InterfaceNotFound, missing),
            (lambda: m.create_interface(InterfaceConfig(name=name)), InterfaceExists, "already exists"),
            (lambda: m.create_interface({"name": "é" * 8}), InvalidConfig, "name"),  # 16 bytes
            (lambda: m.create_interface({"name": new, "listenPort": 65536}), InvalidConfig, "listenPort"),
            (lambda: m.create_interface({"name": new, "address": "10.0.0.1/33"}), InvalidConfig, "address"),
            (lambda: m.create_interface({"name": new, "mtu": 100}), InvalidConfig, "mtu"),
            (lambda: m.create_interface({"name": new, "privateKey": "short"}), InvalidConfig, "privateKey"),
            (lambda: m.create_interface({"name": new, "peers": [known_json, known_json]}), InvalidConfig,
             "peers[1].publicKey"),
            (lambda: m.create_interface({"name": new, "privateKey": ka.to_base64(),
                                         "peers": [{"publicKey": ka.public_key().to_base64()}]}),
             InvalidConfig, "peers[0].publicKey"),
            (lambda: m.delete_interface(missing), InterfaceNotFound, missing),
            (lambda: m.get_stats(missing), InterfaceNotFound, missing),
            (lambda: m.get_interface("bad/name"), InvalidConfig, "name"),
        ]
        for call, error, detail in cases:
            with pytest.raises(error) as caught:
                await call()
            exc = caught.value
            assert isinstance(exc, ManagerError)
            if isinstance(exc, InvalidConfig):
                assert isinstance(exc, types.InvalidConfig) and exc.field == detail and exc.reason, exc
            else:
                assert detail in str(exc), exc

        # Failing half-way: a port in use; the new interface is taken down again.
        with pytest.raises(BackendError) as caught:
            await m.create_interface(InterfaceConfig(name=new, private_key=Key.generate_private(),
                                                     listen_port=PORT_A, peers=(known,)))
        assert caught.value.errno == -98, caught.value  # EADDRINUSE
        await gone(bed, m, new)

        # A request the daemon refuses after its first lines (an IPv6 zone naming no
        # interface): wireguard-go has by then created the peer, or cleared the preshared
        # key; the manager puts things back.
        bad_zone = Endpoint.parse("[fe80::1%nosuchif0]:51820")
        with pytest.raises(BackendError) as caught:
            await m.add_peer(name, WireGuardPeer(public_key=other, endpoint=bad_zone))
        assert caught.value.errno == -22, caught.value
        with pytest.raises(BackendError):
            await m.update_peer(name, dataclasses.replace(known, preshared_key=None, endpoint=bad_zone))
        assert await m.get_interface(name) == before
        assert await link_present(bed.ns_a, name)
        await m.delete_interface(name)
        await gone(bed, m, name)


# --- concurrency, timeouts and cancellation ---------------------------------------------


@pytest.mark.parametrize("kind", KINDS[:2])
def test_concurrent_calls_on_one_interface_are_serialized(bed: Bed, kind: str) -> None:
    async def main() -> None:
        name = bed.unique_ifname("ms")
        peers = [WireGuardPeer(public_key=Key.generate_private().public_key(), allowed_ips=(net(f"10.9.{i}.0/24"),))
                 for i in range(12)]
        async with TunnelManager(make_backend(kind, bed)) as m:
            await m.create_interface(InterfaceConfig(name=name, private_key=Key.generate_private()))
            await asyncio.gather(*(m.add_peer(name, p) for p in peers))
            got = await m.get_interface(name)
            assert sorted(p.public_key.to_base64() for p in got.peers) == sorted(
                p.public_key.to_base64() for p in peers)
            # each check-then-change runs alone: one of two identical calls wins
            newcomer = WireGuardPeer(public_key=Key.generate_private().public_key())
            added = await asyncio.gather(m.add_peer(name, newcomer), m.add_peer(name, newcomer),
                                         return_exceptions=True)
            removed = await asyncio.gather(m.remove_peer(name, peers[0].public_key),
                                           m.remove_peer(name, peers[0].public_key), return_exceptions=True)
            for results, error in ((added, PeerExists), (removed, PeerNotFound)):
                assert sorted(type(r).__name__ for r in results) == sorted(["NoneType", error.__name__])
            assert len((await m.get_interface(name)).peers) == len(peers)
            await m.delete_interface(name)

    asyncio.run(main())


class SlowSocket:
    """A UAPI socket in front of a real one, as a slow or stuck daemon would serve it: a
    get is passed on at once; a set waits ``set_delay`` seconds (None: forever), then is
    passed on even if our client has hung up, as a daemon reads what was written. With
    ``silent``, nothing is ever answered."""

    def __init__(self, target: Path, path: Path, *, set_delay: float | None = 0.0, silent: bool = False) -> None:
        self.target, self.path, self.set_delay, self.silent = target, path, set_delay, silent
        self.received: list[str] = []
        self.passed_on: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._closing = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._closing.set()  # the stuck requests end unanswered
        await asyncio.sleep(0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            request = (await reader.readuntil(b"\n\n")).decode()
            self.received.append(request)
            if self.silent or (request.startswith("set=1") and self.set_delay is None):
                await self._closing.wait()
                writer.close()
                return
            if request.startswith("set=1"):
                await asyncio.sleep(self.set_delay or 0)
            response = await uapi_exchange(self.target, request)
            self.passed_on.append(request)
            writer.write(response.encode())
            await writer.drain()
        writer.close()


def test_timeouts_leave_nothing_half_applied(bed: Bed) -> None:
    asyncio.run(_timeouts(bed))


async def _timeouts(bed: Bed) -> None:
    name = bed.unique_ifname("mt")
    known = WireGuardPeer(public_key=Key.generate_private().public_key(), preshared_key=Key.generate_preshared(),
                          endpoint=Endpoint.parse(f"{bed.outer_b}:{PORT_B}"), allowed_ips=(net("10.202.0.2/32"),))
    newcomer = WireGuardPeer(public_key=Key.generate_private().public_key(), allowed_ips=(net("10.202.0.3/32"),))
    loop = asyncio.get_running_loop()
    async with TunnelManager(UapiBackend(netns=bed.ns_a)) as direct:
        await direct.create_interface(InterfaceConfig(name=name, private_key=Key.generate_private(),
                                                      listen_port=PORT_A, peers=(known,)))
        before = await direct.get_interface(name)
        with tempfile.TemporaryDirectory() as slow_dir, tempfile.TemporaryDirectory() as silent_dir:
            # 1. A daemon that takes 0.6 s over each set: the caller gives up after 0.2 s,
            # the set is carried out later anyway, and the manager undoes it.
            async with SlowSocket(socket_path(name), Path(slow_dir) / f"{name}.sock", set_delay=0.6) as slow:
                m = TunnelManager(UapiBackend(netns=bed.ns_a, socket_dir=Path(slow_dir)), settle_timeout=5)
                changes = [
                    lambda: m.add_peer(name, newcomer, timeout=0.2),
                    lambda: m.remove_peer(name, known.public_key, timeout=0.2),
                    lambda: m.update_peer(name, dataclasses.replace(known, preshared_key=None, allowed_ips=()),
                                          timeout=0.2),
                ]
                for change in changes:
                    started = loop.time()
                    with pytest.raises(TimeoutError):
                        await change()
                    assert loop.time() - started < 0.2 + SLACK
                    assert await m.get_interface(name) == before  # waits for the undo
                    assert await direct.get_interface(name) == before
                # the same when the caller cancels instead
                task = asyncio.create_task(m.add_peer(name, newcomer))
                await asyncio.sleep(0.2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert await m.get_interface(name) == before
                sets = [r for r in slow.passed_on if r.startswith("set=1")]
                assert len(sets) == 8, sets  # each change reached the daemon, then its undo
                await m.aclose()

            # 2. A daemon that never answers a set: the set is never carried out, the check
            # after the settle timeout finds the interface as it was.
            async with SlowSocket(socket_path(name), Path(slow_dir) / f"{name}.sock", set_delay=None) as stuck:
                m = TunnelManager(UapiBackend(netns=bed.ns_a, socket_dir=Path(slow_dir)), settle_timeout=0.5)
                with pytest.raises(TimeoutError):
                    await m.add_peer(name, newcomer, timeout=0.2)
                assert await m.get_interface(name) == before
                assert [r.split("\n")[0] for r in stuck.received].count("set=1") == 1
                await m.aclose()

            # 3. A socket that accepts and never answers anything.
            async with SlowSocket(socket_path(name), Path(silent_dir) / f"{name}.sock", silent=True) as silent:
                m = TunnelManager(UapiBackend(netns=bed.ns_a, socket_dir=Path(silent_dir)), settle_timeout=0.5)
                for call in (lambda: m.get_interface(name, timeout=0.3), lambda: m.get_stats(name, timeout=0.3),
                             lambda: m.add_peer(name, newcomer, timeout=0.3)):
                    started = loop.time()
                    with pytest.raises(TimeoutError):
                        await call()
                    assert loop.time() - started < 0.3 + SLACK
                assert not any(r.startswith("set=1") for r in silent.received)  # it stopped at the get
                await m.aclose()
        assert await direct.get_interface(name) == before
        await direct.delete_interface(name)


@pytest.mark.parametrize("kind", [pytest.param("inprocess", id="inprocess"),
                                  pytest.param("pywg-daemon", id="uapi-pywg")])
def test_interrupted_create_leaves_nothing(bed: Bed, kind: str) -> None:
    async def main() -> None:
        interrupted = 0
        async with TunnelManager(make_backend(kind, bed)) as m:
            for timeout in (0.001, 0.005, 0.02, 0.1, 5):
                name = bed.unique_ifname("mc")
                try:
                    await m.create_interface(InterfaceConfig(
                        name=name, private_key=Key.generate_private(), listen_port=PORT_A,
                        address=ipaddress.ip_interface("10.202.0.1/24")), timeout=timeout)
                except TimeoutError:
                    interrupted += 1
                else:
                    assert await link_present(bed.ns_a, name)
                    await m.delete_interface(name)
                await gone(bed, m, name)
        assert interrupted >= 1

    asyncio.run(main())


# --- the pywg command ---------------------------------------------------------------------


def cli(bed: Bed, *args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns or bed.ns_a, sys.executable, "-m", "pywg.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("implementation", ["pywg-daemon", "wireguard-go"])
def test_cli(bed: Bed, implementation: str) -> None:
    key_file = bed.workdir / "a.key"
    generated = json.loads(ok(cli(bed, "key", "generate", "--private-key-file", str(key_file), "--json")))
    assert key_file.stat().st_mode & 0o777 == 0o600 and set(generated) == {"publicKey"}
    private_a = Key.parse(key_file.read_text())
    assert generated["publicKey"] == private_a.public_key().to_base64()
    again = cli(bed, "key", "generate", "--private-key-file", str(key_file))
    assert again.returncode == 2 and "exists" in again.stderr and Key.parse(key_file.read_text()) == private_a

    kb = Key.generate_private()
    b = start_peer(bed, "wireguard-go" if implementation == "pywg-daemon" else "pywg", kb, ["10.202.0.2/24"])
    bed.set_wg_peer(b, generated["publicKey"], allowed_ips="10.202.0.1/32")
    name = bed.unique_ifname("mc")
    created = WireGuardInterface.from_json(ok(cli(
        bed, "interface", "create", name, "--private-key-file", str(key_file), "--listen-port", str(PORT_A),
        "--address", "10.202.0.1/24", "--mtu", "1400", "--implementation", implementation, "--json")))
    assert (created.name, created.public_key, created.listen_port, str(created.address), created.mtu) == (
        name, private_a.public_key(), PORT_A, "10.202.0.1/24", 1400)
    try:
        b_pub = kb.public_key().to_base64()
        ok(cli(bed, "peer", "add", name, "--public-key", b_pub, "--allowed-ips", "10.202.0.2/32",
               "--endpoint", f"{bed.outer_b}:{PORT_B}"))
        ping(bed.ns_a, "10.202.0.2")
        shown_text = ok(cli(bed, "interface", "show", name, "--json"))
        assert "privateKey" not in shown_text
        shown = WireGuardInterface.from_json(shown_text)
        assert [str(p.public_key.to_base64()) for p in shown.peers] == [b_pub]
        assert shown.peers[0].last_handshake is not None

        ok(cli(bed, "peer", "update", name, "--public-key", b_pub, "--persistent-keepalive", "25"))
        (peer,) = WireGuardInterface.from_json(ok(cli(bed, "interface", "show", name, "--json"))).peers
        assert peer.persistent_keepalive == 25 and peer.allowed_ips == (net("10.202.0.2/32"),)  # kept

        for args, status, message in [
            (("peer", "add", name, "--public-key", "bogus"), 2, "--public-key"),
            (("peer", "add", name, "--public-key", b_pub, "--allowed-ips", "10.0.0.300/32"), 2, "--allowed-ips"),
            (("peer", "add", name, "--public-key", b_pub), 1, "already has peer"),
            (("peer", "add", name, "--public-key", b_pub), 1, f"pywg peer update {name} --public-key {b_pub}"),
            (("peer", "remove", name, "--public-key", Key.generate_private().public_key().to_base64()), 1,
             "has no peer"),
            (("interface", "create", "x" * 16), 2, "at most 15 bytes"),
            (("interface", "create", name + "x", "--listen-port", "65536"), 2, "--listen-port"),
            (("interface", "create", name), 1, "already exists"),
            (("interface", "show", name + "x"), 1, "no interface"),
        ]:
            done = cli(bed, *args)
            assert done.returncode == status and message in done.stderr, (args, done.stderr)
            assert "Traceback" not in done.stderr and "update_peer" not in done.stderr, done.stderr
        assert WireGuardInterface.from_json(ok(cli(bed, "interface", "show", name, "--json"))).peers == (peer,)

        ok(cli(bed, "peer", "remove", name, "--public-key", b_pub))
        assert WireGuardInterface.from_json(ok(cli(bed, "interface", "show", name, "--json"))).peers == ()
        assert name in ok(cli(bed, "interface", "list")).split()
    finally:
        deleted = cli(bed, "interface", "delete", name)
    assert deleted.returncode == 0, deleted.stderr
    assert name not in run("ip", "link", ns=bed.ns_a) and not socket_path(name).exists()
    assert cli(bed, "interface", "delete", name).returncode == 1
