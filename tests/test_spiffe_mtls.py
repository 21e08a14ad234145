"""SPIFFE registration for real: ``pywg coordinator serve`` over HTTPS in a namespace, with
X.509-SVIDs minted by a local CA, and ``pywg agent up --svid`` agents in two more."""

from __future__ import annotations

import datetime
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import needs
from tests.coordinator_server import new_public_key
from tests.spiffe_ca import LocalCA, hours, write_bundle

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent
PREFIX = "sp"  # every namespace and link of this test starts with it
BRIDGE = f"{PREFIX}br"
NET = "10.231.0"
COORD_IP = f"{NET}.1"
PORT = 18231
URL = f"https://{COORD_IP}:{PORT}"
DOMAIN = "example.org"
NOW = datetime.datetime.now(datetime.UTC)


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def wait_for(what: str, fn, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Bed:
    """A bridge, the host on it at .254, namespaces spn0 (the coordinator) .. spn2."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ca = LocalCA("pywg test CA example.org")
        self.foreign = LocalCA("pywg test CA other.example")  # federated: in the bundle, not allowed
        self.server_cert, self.server_key = self.ca.write_leaf(tmp, "server", ips=[COORD_IP], server=True)
        self.bundle = write_bundle(tmp / "bundle.pem", self.ca)
        self.client_ca = write_bundle(tmp / "client-ca.pem", self.ca, self.foreign)
        self.store = f"sqlite:{tmp / 'coord.db'}"
        self.remove_links()  # a previous run's, if it was killed
        try:
            self.setup()
        except BaseException:
            self.close()
            raise

    def setup(self) -> None:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{NET}.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i in range(3):
            ns, veth = f"{PREFIX}n{i}", f"{PREFIX}v{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{NET}.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.start("coordinator", 0, [
            "coordinator", "serve", "--listen", f"{COORD_IP}:{PORT}", "--store", self.store,
            "--prefix4", "100.111.0.0/16", "--prefix6", "fd31:a::/48",
            "--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key),
            "--client-ca", str(self.client_ca), "--trust-domain", f"{DOMAIN},prod.{DOMAIN}"])
        wait_for("the coordinator listening", lambda: "listening on https://" in self.log("coordinator"), 15)

    def start(self, name: str, ns: int, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}n{ns}", str(BIN / "pywg"), *args],
                                            stdout=log, stderr=log, env=self.env)

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        p.terminate()
        p.wait(10)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def svid(self, stem: str, *uris: str, ca: LocalCA | None = None, **kw: Any) -> ssl.SSLContext:
        """A client context presenting a new certificate with ``uris`` (files ``stem``.pem/.key)."""
        cert, key = (ca or self.ca).write_leaf(self.tmp, stem, uris=list(uris), **kw)
        ctx = ssl.create_default_context(cafile=str(self.bundle))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def register(self, ctx: ssl.SSLContext, name: str, public_key: str | None = None) -> tuple[int, dict[str, Any]]:
        body = json.dumps({"name": name, "publicKey": public_key or new_public_key()}).encode()
        req = urllib.request.Request(f"{URL}/api/v1/register", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def agent_up(self, i: int) -> None:
        self.start(f"agent{i}", i, [
            "agent", "up", "--coordinator", URL, "--svid", str(self.tmp / f"agent{i}.pem"),
            "--svid-key", str(self.tmp / f"agent{i}.key"), "--trust-bundle", str(self.bundle),
            "--interface", f"{PREFIX}w{i}", "--state-dir", str(self.tmp / f"state{i}"),
            "--name", f"agent{i}", "--health-interval", "1"])

    def status(self, i: int) -> dict[str, Any]:
        out = sh(str(BIN / "pywg"), "agent", "status", "--json", "--state-dir", str(self.tmp / f"state{i}"),
                 check=False)
        return json.loads(out) if out else {}

    def close(self) -> None:
        for name in list(self.procs):
            try:
                self.stop(name)
            except subprocess.TimeoutExpired:
                self.procs.pop(name, None)
        self.remove_links()

    @staticmethod
    def remove_links() -> None:
        for i in range(3):
            sh("ip", "-n", f"{PREFIX}n{i}", "link", "del", f"{PREFIX}w{i}", check=False)
            sh("ip", "link", "del", f"{PREFIX}v{i}", check=False)  # at once: netns teardown is deferred
            sh("ip", "netns", "del", f"{PREFIX}n{i}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    needs.require_bed()
    b = Bed(tmp_path)
    try:
        yield b
    except BaseException:
        for f in sorted(tmp_path.glob("*.log")):
            print(f"--- {f.name}\n{f.read_text()[-3000:]}")
        raise
    finally:
        b.close()


def test_svids_register_by_spiffe_id_and_bad_ones_are_refused_by_name(bed: Bed) -> None:
    # A good SVID registers, as a node whose identity is its SPIFFE ID.
    status, first = bed.register(bed.svid("a1", "spiffe://example.org/agent/a1"), "a1")
    assert status == 201, first
    nodes = json.loads(sh(str(BIN / "pywg"), "coordinator", "nodes", "--store", bed.store, "--json"))
    assert [n["identity"] for n in nodes] == ["spiffe:spiffe://example.org/agent/a1"]

    # Renewed (a new certificate and key, same SPIFFE ID): the same node, not a new one.
    renewed = bed.svid("a1", "spiffe://example.org/agent/a1", not_after=NOW + hours(24))
    status, again = bed.register(renewed, "a1")
    assert status == 201, again
    assert (again["id"], again["internalIp"], again["internalIpv6"]) == \
        (first["id"], first["internalIp"], first["internalIpv6"])
    assert again["token"] != first["token"]
    nodes = json.loads(sh(str(BIN / "pywg"), "coordinator", "nodes", "--store", bed.store, "--json"))
    assert len(nodes) == 1

    # A second allowed trust domain, another workload: another node.
    status, other = bed.register(bed.svid("b1", "spiffe://prod.example.org/agent/b1"), "b1")
    assert status == 201 and other["id"] != first["id"], other

    # Refusals: the HTTP status and the JSON error name the problem; nothing is added.
    cases = [
        (bed.svid("f", "spiffe://other.example/agent/x", ca=bed.foreign), 403,
         "trust domain 'other.example' is not allowed here (allowed: example.org, prod.example.org)"),
        (bed.svid("e", "spiffe://example.org/agent/old", not_before=NOW - hours(3), not_after=NOW - hours(1)),
         401, "the X.509-SVID for spiffe://example.org/agent/old expired at"),
        (bed.svid("n", dns=["agent.example.org"]), 401, "the certificate has no SPIFFE ID (no URI SAN)"),
        (bed.svid("two", "spiffe://example.org/a", "spiffe://example.org/b"), 401,
         "the certificate has 2 URI SANs; an X.509-SVID has exactly one"),
        (bed.svid("u", "https://example.org/a"), 401, "the URI SAN 'https://example.org/a' is not a SPIFFE ID"),
    ]
    for ctx, want_status, want_error in cases:
        status, answer = bed.register(ctx, "bad")
        assert status == want_status, answer
        assert answer["error"].startswith(want_error), answer
        assert answer["field"] == "svid"

    # No certificate and no pre-auth key.
    plain = ssl.create_default_context(cafile=str(bed.bundle))
    status, answer = bed.register(plain, "none")
    assert status == 401 and "a pre-auth key" in answer["error"] and "X.509-SVID" in answer["error"], answer

    # A chain to no CA in the bundle does not get through TLS at all (with TLS 1.3 the
    # client learns it as an alert or as the connection closing, whichever it reads first).
    stranger = LocalCA("a stranger")
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        bed.register(bed.svid("s", "spiffe://example.org/agent/s", ca=stranger), "s")

    nodes = json.loads(sh(str(BIN / "pywg"), "coordinator", "nodes", "--store", bed.store, "--json"))
    assert sorted(n["name"] for n in nodes) == ["a1", "b1"]

    # Pre-auth keys keep working alongside, over the same HTTPS listener.
    key = sh(str(BIN / "pywg"), "coordinator", "authkey", "create", "--store", bed.store).strip()
    body = json.dumps({"name": "k1", "publicKey": new_public_key()}).encode()
    req = urllib.request.Request(f"{URL}/api/v1/register", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10, context=plain) as resp:
        assert resp.status == 201
        by_key = json.loads(resp.read())

    # The topology over HTTPS, verified by the private CA, with the SVID node's token.
    token_file = bed.tmp / "a1.token"
    token_file.write_text(again["token"] + "\n")
    out = subprocess.run([str(BIN / "pywg"), "coordinator", "topology", "--coordinator", URL, "--token-file",
                          str(token_file), "--trust-bundle", str(bed.bundle), "--json"],
                         capture_output=True, text=True, check=False, timeout=30)
    assert out.returncode == 0, out.stderr
    assert sorted(n["id"] for n in json.loads(out.stdout)["nodes"]) == sorted([first["id"], other["id"], by_key["id"]])
    out = subprocess.run([str(BIN / "pywg"), "coordinator", "topology", "--coordinator", URL, "--token-file",
                          str(token_file)], capture_output=True, text=True, check=False, timeout=30)
    assert out.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in out.stderr, out.stderr  # not the system's CAs

    # The coordinator served on after every refusal; no key material reached it.
    assert bed.procs["coordinator"].poll() is None
    secret = (bed.tmp / "a1.key").read_text()
    assert "PRIVATE KEY" not in bed.log("coordinator") and secret not in bed.log("coordinator")


def test_agents_with_svids_reach_the_mesh_and_keep_their_node_across_renewal(bed: Bed) -> None:
    for i in (1, 2):
        bed.ca.write_leaf(bed.tmp, f"agent{i}", uris=[f"spiffe://example.org/agent/{i}"])
        bed.agent_up(i)
    st1 = wait_for("agent1 registered", lambda: bed.status(1).get("internalIp") and bed.status(1))
    st2 = wait_for("agent2 registered", lambda: bed.status(2).get("internalIp") and bed.status(2))
    wait_for("agent1 sees agent2", lambda: {p.get("name") for p in bed.status(1).get("peers", [])} == {"agent2"})

    def pings(ns: int, addr: str) -> bool:
        return subprocess.run(["ip", "netns", "exec", f"{PREFIX}n{ns}", "ping", "-n", "-q", "-c", "1", "-W", "1",
                               addr], check=False, capture_output=True).returncode == 0

    wait_for("agent1 pings agent2 over the mesh", lambda: pings(1, str(st2["internalIp"])), 20)

    # Renewal: a new SVID for the same ID on disk, the node token lost (the agent must
    # register again, now presenting the new SVID): the same node and addresses.
    node = json.loads((bed.tmp / "state1" / "node.json").read_text())
    bed.stop("agent1")
    bed.ca.write_leaf(bed.tmp, "agent1", uris=["spiffe://example.org/agent/1"], not_after=NOW + hours(48))
    (bed.tmp / "state1" / "node.json").unlink()
    bed.agent_up(1)
    again = wait_for("agent1 registered again",
                     lambda: (bed.tmp / "state1" / "node.json").exists()
                     and json.loads((bed.tmp / "state1" / "node.json").read_text()))
    assert (again["id"], again["internalIp"], again["internalIpv6"]) == \
        (node["id"], st1["internalIp"], st1["internalIpv6"])
    assert again["token"] != node["token"]
    wait_for("agent2 pings agent1 after the renewal", lambda: pings(2, str(st1["internalIp"])), 20)
    nodes = json.loads(sh(str(BIN / "pywg"), "coordinator", "nodes", "--store", bed.store, "--json"))
    assert sorted(n["identity"] for n in nodes) == ["spiffe:spiffe://example.org/agent/1",
                                                    "spiffe:spiffe://example.org/agent/2"]
