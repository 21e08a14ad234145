"""`pywg key rotate` and `pywg peer update --new-public-key` as a user runs them, in two
network namespaces, on two interfaces made with the pywg CLI (issue 16).

The original bug: `pywg key rotate IFNAME --keystore DIR` gave the interface a new key,
but never told the peer, which kept the old one; the sessions in place carried traffic
until they expired (about 3 minutes), then the tunnel was dead (the peer's initiations,
addressed to the old key, dropped as ``bad_mac1``). The tests make a peer initiate a
fresh handshake right after the overlap (``pywg_rekey`` on the peer's UAPI socket) rather
than wait for the sessions to expire: a peer still on the old key fails at once, exactly
as it would 3 minutes later.
"""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pywg.manage.backends import UapiBackend
from pywg.manage.key import Key
from pywg.manage.uapi_client import exchange as uapi_exchange
from pywg.manage.uapi_client import socket_path
from pywg.testing.netns import Bed, ping, run

pytestmark = pytest.mark.netns

PORT_A, PORT_B = 51831, 51832


def cli(ns: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "pywg.cli", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


@dataclass
class Node:
    ns: str
    ifname: str
    public: str
    address: str


def make_node(bed: Bed, ns: str, index: int, port: int) -> Node:
    """`pywg key generate` + `pywg interface create`, as README shows them."""
    ifname = bed.unique_ifname("kr")
    key_file = bed.workdir / f"{ifname}.key"
    public = ok(cli(ns, "key", "generate", "--private-key-file", str(key_file))).strip()
    ok(cli(ns, "interface", "create", ifname, "--private-key-file", str(key_file), "--listen-port", str(port),
           "--address", f"10.203.0.{index}/24"))
    return Node(ns, ifname, public, f"10.203.0.{index}")


def pair(bed: Bed) -> tuple[Node, Node]:
    a = make_node(bed, bed.ns_a, 1, PORT_A)
    b = make_node(bed, bed.ns_b, 2, PORT_B)
    ok(cli(a.ns, "peer", "add", a.ifname, "--public-key", b.public, "--allowed-ips", f"{b.address}/32",
           "--endpoint", f"{bed.outer_b}:{PORT_B}"))
    ok(cli(b.ns, "peer", "add", b.ifname, "--public-key", a.public, "--allowed-ips", f"{a.address}/32",
           "--endpoint", f"{bed.outer_a}:{PORT_A}"))
    ping(a.ns, b.address, count=2, interval=0.1)
    return a, b


def public_key(node: Node) -> str:
    return run("wg", "show", node.ifname, "public-key", ns=node.ns).strip()


def peers(node: Node) -> dict[str, list[str]]:
    """``wg show IF dump`` peer lines by public key (then preshared key, endpoint, allowed
    IPs, latest handshake, rx, tx, keepalive)."""
    lines = run("wg", "show", node.ifname, "dump", ns=node.ns).splitlines()[1:]
    return {line.split("\t")[0]: line.split("\t")[1:] for line in lines}


def stats(node: Node) -> dict:
    import json

    return json.loads(ok(cli(node.ns, "stats", node.ifname)))


def handshakes(node: Node, peer: str) -> int:
    counts = asyncio.run(UapiBackend().handshake_counts(node.ifname))
    assert counts is not None
    return counts.get(base64.b64decode(peer), 0)


def rekey(node: Node, peer: str) -> None:
    """Make ``node`` initiate a handshake with ``peer`` now (as it would when its session expires)."""
    request = f"set=1\npublic_key={Key.parse(peer).hex()}\nupdate_only=true\npywg_rekey=true\n\n"
    assert asyncio.run(uapi_exchange(socket_path(node.ifname), request)) == "errno=0\n\n"


def wait_for(condition, seconds: float = 12.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def fresh_handshake_works(initiator: Node, responder_key: str, seconds: float = 6.0) -> bool:
    """A new handshake, initiated now, completes (a refused initiation is retried only after
    REKEY_TIMEOUT, 5 s, so a failure shows within ``seconds``)."""
    before = handshakes(initiator, responder_key)
    rekey(initiator, responder_key)
    return wait_for(lambda: handshakes(initiator, responder_key) > before, seconds)


class Pings:
    """``ping -i 0.01`` from ``ns`` in the background."""

    def __init__(self, ns: str, destination: str, count: int) -> None:
        self.process = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-i", "0.01", "-c",
                                         str(count), "-W", "2", destination], stdout=subprocess.PIPE, text=True)

    def result(self) -> tuple[int, int]:
        """(transmitted, received)."""
        out, _ = self.process.communicate(timeout=60)
        found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert found, out
        return int(found[1]), int(found[2])


def test_rotate_refuses_while_a_peer_would_be_left_on_the_old_key(bed: Bed, tmp_path: Path) -> None:
    a, b = pair(bed)
    done = cli(a.ns, "key", "rotate", a.ifname, "--keystore", str(tmp_path / "keys"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    for expected in (b.public, "--peer", "--tell-peers", "Nothing was changed"):
        assert expected in done.stderr, done.stderr
    assert public_key(a) == a.public and set(peers(b)) == {a.public}
    assert not (tmp_path / "keys" / a.ifname).exists()
    # A --peer that is not a peer of the interface is refused too, naming the option.
    stranger = make_node(bed, bed.ns_b, 3, 51833)
    done = cli(a.ns, "key", "rotate", a.ifname, "--keystore", str(tmp_path / "keys"), "--peer", stranger.ifname)
    assert done.returncode == 1 and f"--peer {stranger.ifname}" in done.stderr, done.stderr
    assert public_key(a) == a.public


def test_rotate_with_peer_renames_it_in_place_and_the_tunnel_outlives_the_old_key(
        bed: Bed, tmp_path: Path) -> None:
    a, b = pair(bed)
    store = tmp_path / "keys"
    pings = Pings(a.ns, b.address, 400)
    time.sleep(0.5)
    started = time.monotonic()
    rotation = subprocess.Popen(["ip", "netns", "exec", a.ns, sys.executable, "-m", "pywg.cli", "key", "rotate",
                                 a.ifname, "--keystore", str(store), "--peer", b.ifname, "--overlap", "3"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert rotation.stdout is not None
    new = rotation.stdout.readline().strip()  # printed at once, before the overlap is over
    printed_after = time.monotonic() - started
    _, err = rotation.communicate(timeout=60)
    total = time.monotonic() - started
    sent, received = pings.result()
    print(f"\nkey printed after {printed_after:.2f} s, command done after {total:.2f} s; "
          f"{received} of {sent} pings answered")
    assert rotation.returncode == 0 and "Traceback" not in err, err
    assert len(new) == 44 and new != a.public
    assert total - printed_after > 2.5  # the key came out before the 3 s overlap, not after it
    assert "renamed" in err and "overlap" in err and "no longer accepted" in err, err
    assert sent == received == 400
    # The peer knows A by its new key only, A uses it, the keystore has it.
    assert public_key(a) == new and set(peers(b)) == {new}
    assert Key.parse((store / a.ifname).read_text()).public_key().to_base64() == new
    # The old key is gone (the overlap is over): fresh handshakes both ways still work.
    bad_mac1 = stats(a)["engine_drops"].get("bad_mac1", 0)
    assert fresh_handshake_works(b, new), "B cannot make a handshake with A's new key"
    assert fresh_handshake_works(a, b.public)
    assert stats(a)["engine_drops"].get("bad_mac1", 0) == bad_mac1
    ping(b.ns, a.address, count=3, interval=0.1)
    ping(a.ns, b.address, count=3, interval=0.1)


def test_tell_peers_prints_what_the_peer_needs_and_peer_update_fixes_it(bed: Bed, tmp_path: Path) -> None:
    """The original bug, made visible at once: a peer left on the old key cannot make a
    handshake once the overlap is over. The command said so and printed what to run; that
    command (`pywg peer update --new-public-key`) renames the peer in place."""
    a, b = pair(bed)
    done = cli(a.ns, "key", "rotate", a.ifname, "--keystore", str(tmp_path / "keys"), "--tell-peers",
               "--overlap", "1")
    new = ok(done).strip()
    assert public_key(a) == new != a.public
    wanted = f"pywg peer update PEER_IFNAME --public-key {a.public} --new-public-key {new}"
    assert wanted in done.stderr, done.stderr
    # B was not updated: its handshakes with A's old key fail (A drops them: bad_mac1).
    bad_mac1 = stats(a)["engine_drops"].get("bad_mac1", 0)
    assert not fresh_handshake_works(b, a.public, 3.0)
    assert stats(a)["engine_drops"].get("bad_mac1", 0) > bad_mac1
    # The printed command, run on B's side.
    rx_before = int(peers(b)[a.public][4])
    ok(cli(b.ns, *wanted.replace("PEER_IFNAME", b.ifname).split()[1:]))
    assert set(peers(b)) == {new}
    assert int(peers(b)[new][4]) >= rx_before  # the same peer: its counters went on
    assert fresh_handshake_works(b, new)
    ping(b.ns, a.address, count=3, interval=0.1)


def test_interrupt_during_the_overlap_is_reported(bed: Bed, tmp_path: Path) -> None:
    a, b = pair(bed)
    rotation = subprocess.Popen([sys.executable, "-m", "pywg.cli", "key", "rotate", a.ifname, "--keystore",
                                 str(tmp_path / "keys"), "--peer", b.ifname, "--overlap", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert rotation.stdout is not None
    new = rotation.stdout.readline().strip()
    rotation.send_signal(signal.SIGINT)
    _, err = rotation.communicate(timeout=20)
    assert rotation.returncode == 130 and "Traceback" not in err, err
    assert "interrupted during the overlap" in err and new in err and "no longer accepted" in err, err
    assert public_key(a) == new and set(peers(b)) == {new}
    # It did end the overlap: a peer that initiates to the old key is refused now.
    ok(cli(b.ns, "peer", "update", b.ifname, "--public-key", new, "--new-public-key", a.public))
    assert not fresh_handshake_works(b, a.public, 3.0)
    ok(cli(b.ns, "peer", "update", b.ifname, "--public-key", a.public, "--new-public-key", new))
    assert fresh_handshake_works(b, new)


def test_peer_update_new_key_on_wireguard_go_replaces_the_peer(bed: Bed) -> None:
    name = bed.unique_ifname("kg")
    key_file = bed.workdir / "g.key"
    ok(cli(bed.ns_a, "key", "generate", "--private-key-file", str(key_file)))
    ok(cli(bed.ns_a, "interface", "create", name, "--private-key-file", str(key_file), "--implementation",
           "wireguard-go"))
    old, new = (Key.generate_private().public_key().to_base64() for _ in range(2))
    ok(cli(bed.ns_a, "peer", "add", name, "--public-key", old, "--allowed-ips", "10.9.0.2/32",
           "--endpoint", f"{bed.outer_b}:51999"))
    done = cli(bed.ns_a, "peer", "update", name, "--public-key", old, "--new-public-key", new,
               "--persistent-keepalive", "7")
    ok(done)
    assert "replaced" in done.stderr and "sessions ended" in done.stderr
    node = Node(bed.ns_a, name, "", "")
    (entry,) = peers(node).items()
    assert entry[0] == new and entry[1][1] == f"{bed.outer_b}:51999" and entry[1][2] == "10.9.0.2/32"
    assert entry[1][6] == "7"


def test_interrupt_at_any_moment_leaves_the_state_it_reports(bed: Bed, tmp_path: Path) -> None:
    """Ctrl-C at several moments (while the command starts, checks, rotates, waits): each time
    the interface and its peer agree on one key, and it is the one the message names."""
    a, b = pair(bed)
    current = a.public
    outcomes = set()
    for delay in (0.0, 0.1, 0.2, 0.35, 0.5, 0.8, 1.5):
        rotation = subprocess.Popen([sys.executable, "-m", "pywg.cli", "key", "rotate", a.ifname, "--keystore",
                                     str(tmp_path / "keys"), "--peer", b.ifname, "--overlap", "30"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # From when the command's own code runs (a signal while the interpreter itself starts
        # is Python's business): pywg.cli imports asyncio first thing, which maps _asyncio.
        if "_asyncio" in sys.builtin_module_names:  # nothing to see in the maps: give it time
            time.sleep(1.0)
        else:
            maps = Path(f"/proc/{rotation.pid}/maps")
            assert wait_for(lambda maps=maps: "_asyncio" in maps.read_text(), 10.0)
        time.sleep(delay)
        rotation.send_signal(signal.SIGINT)
        out, err = rotation.communicate(timeout=30)
        assert rotation.returncode == 130 and "Traceback" not in err, (delay, err)
        if "interrupted during the overlap" in err:
            new = out.strip()
            assert new in err and public_key(a) == new and set(peers(b)) == {new}, (delay, err)
            current = new
            outcomes.add("rotated")
        else:
            assert "nothing changed" in err or "undone" in err or err.strip() == "pywg: interrupted", (delay, err)
            assert public_key(a) == current and set(peers(b)) == {current}, (delay, err)
            outcomes.add("unchanged")
    print(f"\noutcomes: {sorted(outcomes)}")
    assert "rotated" in outcomes  # the later interrupts came during the overlap
    ping(a.ns, b.address, count=2, interval=0.1)
