"""SPIFFE registration for real: ``pywg coordinator serve`` over HTTPS in a namespace, with
X.509-SVIDs minted by a local CA, and ``pywg agent up --svid`` agents in two more."""

from __future__ import annotations

import datetime
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshbed import PYWG, MeshBed, mesh_bed, sh, wait_for

from tests.coordinator_server import new_public_key
from tests.spiffe_ca import LocalCA, hours, write_bundle

pytestmark = pytest.mark.netns

PREFIX = "sp"  # every namespace and link of this test starts with it
NET = "10.231.0"
COORD_IP = f"{NET}.1"
PORT = 18231
URL = f"https://{COORD_IP}:{PORT}"
DOMAIN = "example.org"
NOW = datetime.datetime.now(datetime.UTC)


class Pki:
    """A local CA (and a foreign one, federated: in the client CA bundle, its domain not
    allowed), the coordinator's server certificate and the bundles, in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = LocalCA("pywg test CA example.org")
        self.foreign = LocalCA("pywg test CA other.example")
        self.server_cert, self.server_key = self.ca.write_leaf(tmp, "server", ips=[COORD_IP], server=True)
        self.bundle = write_bundle(tmp / "bundle.pem", self.ca)
        self.client_ca = write_bundle(tmp / "client-ca.pem", self.ca, self.foreign)

    def coordinator_options(self) -> list[str]:
        """``pywg coordinator serve`` over HTTPS, asking for client certificates."""
        return ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key),
                "--client-ca", str(self.client_ca), "--trust-domain", f"{DOMAIN},prod.{DOMAIN}"]

    def svid(self, stem: str, *uris: str, ca: LocalCA | None = None, **kw: Any) -> ssl.SSLContext:
        """A client context presenting a new certificate with ``uris`` (files ``stem``.pem/.key)."""
        cert, key = (ca or self.ca).write_leaf(self.tmp, stem, uris=list(uris), **kw)
        ctx = ssl.create_default_context(cafile=str(self.bundle))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def bed(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki) -> Iterator[MeshBed]:
    """The coordinator over HTTPS in spn0, agents' namespaces spn1 and spn2, the host at .254."""
    with mesh_bed(request, tmp_path, prefix=PREFIX, subnet=f"{NET}.0/24", port=PORT, prefix4="100.111.0.0/16",
                  prefix6="fd31:a::/48", count=2, coordinator_options=pki.coordinator_options(), scheme="https",
                  host_address=f"{NET}.254/24") as b:
        wait_for("the coordinator listening", lambda: "listening on https://" in coordinator_log(b), 15)
        yield b


def coordinator_log(bed: MeshBed) -> str:
    return (bed.tmp / "coord.log").read_text()


def register(ctx: ssl.SSLContext, name: str, public_key: str | None = None) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"name": name, "publicKey": public_key or new_public_key()}).encode()
    req = urllib.request.Request(f"{URL}/api/v1/register", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def agent_up(bed: MeshBed, pki: Pki, i: int) -> None:
    """Agent ``i`` registering with its X.509-SVID (``agent<i>.pem``/``.key``, written beforehand)."""
    bed.up(i, auth=["--svid", str(bed.tmp / f"agent{i}.pem"), "--svid-key", str(bed.tmp / f"agent{i}.key"),
                    "--trust-bundle", str(pki.bundle)])


def test_svids_register_by_spiffe_id_and_bad_ones_are_refused_by_name(bed: MeshBed, pki: Pki) -> None:
    # A good SVID registers, as a node whose identity is its SPIFFE ID.
    status, first = register(pki.svid("a1", "spiffe://example.org/agent/a1"), "a1")
    assert status == 201, first
    nodes = bed.node_list()
    assert [n["identity"] for n in nodes] == ["spiffe:spiffe://example.org/agent/a1"]

    # Renewed (a new certificate and key, same SPIFFE ID): the same node, not a new one.
    renewed = pki.svid("a1", "spiffe://example.org/agent/a1", not_after=NOW + hours(24))
    status, again = register(renewed, "a1")
    assert status == 201, again
    assert (again["id"], again["internalIp"], again["internalIpv6"]) == \
        (first["id"], first["internalIp"], first["internalIpv6"])
    assert again["token"] != first["token"]
    nodes = bed.node_list()
    assert len(nodes) == 1

    # A second allowed trust domain, another workload: another node.
    status, other = register(pki.svid("b1", "spiffe://prod.example.org/agent/b1"), "b1")
    assert status == 201 and other["id"] != first["id"], other

    # Refusals: the HTTP status and the JSON error name the problem; nothing is added.
    cases = [
        (pki.svid("f", "spiffe://other.example/agent/x", ca=pki.foreign), 403,
         "trust domain 'other.example' is not allowed here (allowed: example.org, prod.example.org)"),
        (pki.svid("e", "spiffe://example.org/agent/old", not_before=NOW - hours(3), not_after=NOW - hours(1)),
         401, "the X.509-SVID for spiffe://example.org/agent/old expired at"),
        (pki.svid("n", dns=["agent.example.org"]), 401, "the certificate has no SPIFFE ID (no URI SAN)"),
        (pki.svid("two", "spiffe://example.org/a", "spiffe://example.org/b"), 401,
         "the certificate has 2 URI SANs; an X.509-SVID has exactly one"),
        (pki.svid("u", "https://example.org/a"), 401, "the URI SAN 'https://example.org/a' is not a SPIFFE ID"),
    ]
    for ctx, want_status, want_error in cases:
        status, answer = register(ctx, "bad")
        assert status == want_status, answer
        assert answer["error"].startswith(want_error), answer
        assert answer["field"] == "svid"

    # No certificate and no pre-auth key.
    plain = ssl.create_default_context(cafile=str(pki.bundle))
    status, answer = register(plain, "none")
    assert status == 401 and "a pre-auth key" in answer["error"] and "X.509-SVID" in answer["error"], answer

    # A chain to no CA in the bundle does not get through TLS at all (with TLS 1.3 the
    # client learns it as an alert or as the connection closing, whichever it reads first).
    stranger = LocalCA("a stranger")
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        register(pki.svid("s", "spiffe://example.org/agent/s", ca=stranger), "s")

    nodes = bed.node_list()
    assert sorted(n["name"] for n in nodes) == ["a1", "b1"]

    # Pre-auth keys keep working alongside, over the same HTTPS listener.
    key = sh(PYWG, "coordinator", "authkey", "create", "--store", bed.store).strip()
    body = json.dumps({"name": "k1", "publicKey": new_public_key()}).encode()
    req = urllib.request.Request(f"{URL}/api/v1/register", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10, context=plain) as resp:
        assert resp.status == 201
        by_key = json.loads(resp.read())

    # The topology over HTTPS, verified by the private CA, with the SVID node's token.
    token_file = bed.tmp / "a1.token"
    token_file.write_text(again["token"] + "\n")
    out = subprocess.run([PYWG, "coordinator", "topology", "--coordinator", URL, "--token-file",
                          str(token_file), "--trust-bundle", str(pki.bundle), "--json"],
                         capture_output=True, text=True, check=False, timeout=30)
    assert out.returncode == 0, out.stderr
    assert sorted(n["id"] for n in json.loads(out.stdout)["nodes"]) == sorted([first["id"], other["id"], by_key["id"]])
    out = subprocess.run([PYWG, "coordinator", "topology", "--coordinator", URL, "--token-file",
                          str(token_file)], capture_output=True, text=True, check=False, timeout=30)
    assert out.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in out.stderr, out.stderr  # not the system's CAs

    # The coordinator served on after every refusal; no key material reached it.
    assert bed.coord is not None and bed.coord.poll() is None
    secret = (bed.tmp / "a1.key").read_text()
    assert "PRIVATE KEY" not in coordinator_log(bed) and secret not in coordinator_log(bed)


def test_agents_with_svids_reach_the_mesh_and_keep_their_node_across_renewal(bed: MeshBed, pki: Pki) -> None:
    for i in (1, 2):
        pki.ca.write_leaf(bed.tmp, f"agent{i}", uris=[f"spiffe://example.org/agent/{i}"])
        agent_up(bed, pki, i)
    addr1, addr2 = bed.addresses(1), bed.addresses(2)
    wait_for("agent1 sees agent2", lambda: bed.peer_names(1) == {"agent2"})
    wait_for("agent1 pings agent2 over the mesh", lambda: bed.ping(1, addr2[0]), 20)

    # Renewal: a new SVID for the same ID on disk, the node token lost (the agent must
    # register again, now presenting the new SVID): the same node and addresses.
    node = json.loads((bed.state(1) / "node.json").read_text())
    bed.stop(1)
    pki.ca.write_leaf(bed.tmp, "agent1", uris=["spiffe://example.org/agent/1"], not_after=NOW + hours(48))
    (bed.state(1) / "node.json").unlink()
    agent_up(bed, pki, 1)
    node_file = bed.state(1) / "node.json"
    again = wait_for("agent1 registered again", lambda: json.loads(node_file.read_text()) if node_file.exists() else {})
    assert (again["id"], again["internalIp"], again["internalIpv6"]) == (node["id"], *addr1)
    assert again["token"] != node["token"]
    wait_for("agent2 pings agent1 after the renewal", lambda: bed.ping(2, addr1[0]), 20)
    nodes = bed.node_list()
    assert sorted(n["identity"] for n in nodes) == ["spiffe:spiffe://example.org/agent/1",
                                                    "spiffe:spiffe://example.org/agent/2"]
