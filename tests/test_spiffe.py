"""X.509-SVID validation (pywg.mesh.spiffe) and the TLS contexts (pywg.mesh.tls), over
certificates minted by a local CA (tests/spiffe_ca.py)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from pywg.mesh import spiffe, tls
from tests.spiffe_ca import LocalCA, hours, write_bundle

NOW = datetime.datetime.now(datetime.UTC)
DOMAINS = ("example.org", "prod.example.net")
GOOD = "spiffe://example.org/agent/a1"


@pytest.fixture(scope="module")
def ca() -> LocalCA:
    return LocalCA()


@pytest.mark.parametrize("text,domain,path", [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/agent/node-1", "example.org", "/agent/node-1"),
    ("spiffe://a_b-c.d/x.y_z", "a_b-c.d", "/x.y_z"),
])
def test_spiffe_ids_parse(text: str, domain: str, path: str) -> None:
    sid = spiffe.parse_spiffe_id(text)
    assert (sid.trust_domain, sid.path, str(sid)) == (domain, path, text)


@pytest.mark.parametrize("text,named", [
    ("https://example.org/agent", "is not a SPIFFE ID"),
    ("urn:uuid:1234", "is not a SPIFFE ID"),
    ("SPIFFE://example.org/a", "lower-case 'spiffe'"),
    ("spiffe:///agent", "has no trust domain"),
    ("spiffe://Example.org/a", "trust domain may hold only"),
    ("spiffe://example.org:8443/a", "no port"),
    ("spiffe://user@example.org/a", "no port, user info"),
    ("spiffe://example.org/a?x=1", "path segments hold only"),
    ("spiffe://example.org/a#f", "path segments hold only"),
    ("spiffe://example.org/a//b", "empty path segment"),
    ("spiffe://example.org/a/", "trailing '/'"),
    ("spiffe://example.org/a/../b", "'..' path segment"),
    ("spiffe://example.org/./b", "'.' path segment"),
    ("spiffe://example.org/" + "a" * 2100, "longer than 2048 bytes"),
])
def test_bad_spiffe_ids_are_refused_by_name(text: str, named: str) -> None:
    with pytest.raises(spiffe.SvidError) as err:
        spiffe.parse_spiffe_id(text)
    assert named in err.value.reason
    assert err.value.status == 401


@given(st.text(max_size=300))
def test_any_text_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        sid = spiffe.parse_spiffe_id(text)
    except spiffe.SvidError as exc:
        assert exc.reason
    else:
        assert str(sid) == text


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=20)
_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_", min_size=1,
                   max_size=20).filter(lambda s: s not in (".", ".."))


@given(_label, st.lists(_segment, max_size=5))
def test_valid_spiffe_ids_round_trip(domain: str, segments: list[str]) -> None:
    text = f"spiffe://{domain}" + "".join(f"/{s}" for s in segments)
    sid = spiffe.parse_spiffe_id(text)
    assert (sid.trust_domain, str(sid)) == (domain, text)


def test_a_good_svid_gives_its_spiffe_id(ca: LocalCA) -> None:
    cert, _ = ca.leaf(uris=["spiffe://example.org/agent/a1"])
    assert str(spiffe.validate_svid(cert, DOMAINS, NOW)) == "spiffe://example.org/agent/a1"
    der = cert.public_bytes(serialization.Encoding.DER)
    assert spiffe.validate_svid_der(der, DOMAINS, NOW.timestamp()).path == "/agent/a1"


def test_a_foreign_trust_domain_is_forbidden(ca: LocalCA) -> None:
    cert, _ = ca.leaf(uris=["spiffe://evil.example/agent/a1"])
    with pytest.raises(spiffe.SvidError) as err:
        spiffe.validate_svid(cert, DOMAINS, NOW)
    assert err.value.status == 403
    assert err.value.reason == ("trust domain 'evil.example' is not allowed here "
                                "(allowed: example.org, prod.example.net)")


@pytest.mark.parametrize("kw,named", [
    ({"uris": [GOOD], "not_before": NOW - hours(3), "not_after": NOW - hours(1)}, "expired at"),
    ({"uris": [GOOD], "not_before": NOW + hours(1), "not_after": NOW + hours(3)}, "is not valid before"),
    ({}, "no subject alternative names"),
    ({"dns": ["agent.example.org"]}, "no SPIFFE ID (no URI SAN)"),
    ({"uris": ["spiffe://example.org/a", "spiffe://example.org/b"]}, "has 2 URI SANs"),
    ({"uris": ["https://example.org/a"]}, "is not a SPIFFE ID"),
    ({"uris": ["spiffe://example.org/a"], "ca": True}, "is a CA certificate"),
])
def test_bad_svids_are_refused_by_name(ca: LocalCA, kw: dict[str, object], named: str) -> None:
    cert, _ = ca.leaf(**kw)  # type: ignore[arg-type]
    with pytest.raises(spiffe.SvidError) as err:
        spiffe.validate_svid(cert, DOMAINS, NOW)
    assert named in err.value.reason
    assert err.value.status == 401


def test_garbage_der_is_refused() -> None:
    with pytest.raises(spiffe.SvidError, match="does not parse"):
        spiffe.validate_svid_der(b"\x30\x03\x02\x01\x00", DOMAINS, NOW.timestamp())


@given(st.binary(max_size=400))
def test_any_der_bytes_are_refused_cleanly(der: bytes) -> None:
    with pytest.raises(spiffe.SvidError):
        spiffe.validate_svid_der(der, DOMAINS, NOW.timestamp())


def test_trust_domain_names() -> None:
    assert spiffe.parse_trust_domain("example.org") == "example.org"
    for bad in ("", "Example.org", "a/b", "a:1"):
        with pytest.raises(spiffe.SvidError, match="is not a trust domain name"):
            spiffe.parse_trust_domain(bad)


# --- TLS contexts ---------------------------------------------------------------------------


def test_server_context_asks_for_but_does_not_require_a_client_certificate(ca: LocalCA, tmp_path: Path) -> None:
    cert, key = ca.write_leaf(tmp_path, "server", ips=["127.0.0.1"], server=True)
    bundle = write_bundle(tmp_path / "bundle.pem", ca)
    ctx = tls.server_context(cert, key, bundle)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.verify_flags & tls.X509_V_FLAG_NO_CHECK_TIME
    assert tls.server_context(cert, key).verify_mode == ssl.CERT_NONE


def test_bad_files_are_named(ca: LocalCA, tmp_path: Path) -> None:
    cert, key = ca.write_leaf(tmp_path, "server", ips=["127.0.0.1"], server=True)
    other_cert, other_key = ca.write_leaf(tmp_path, "other", ips=["127.0.0.1"], server=True)
    with pytest.raises(tls.TlsError, match="no such file: .*missing.pem"):
        tls.server_context(tmp_path / "missing.pem", key)
    with pytest.raises(tls.TlsError, match="the private key .*other.key does not belong to the certificate"):
        tls.server_context(cert, other_key)
    with pytest.raises(tls.TlsError, match="is not a PEM certificate and its private key"):
        tls.server_context(key, key)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(tls.TlsError, match="--client-ca: .*junk.pem is not a PEM certificate bundle"):
        tls.server_context(cert, key, tmp_path / "junk.pem")
    with pytest.raises(tls.TlsError, match="--trust-bundle: no such file"):
        tls.client_context(tmp_path / "nope.pem")
    with pytest.raises(tls.TlsError, match="--svid needs --svid-key"):
        tls.client_context(write_bundle(tmp_path / "b.pem", ca), other_cert)


def test_client_contexts_follow_a_renewed_svid(ca: LocalCA, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle.pem", ca)
    cert, key = ca.write_leaf(tmp_path, "svid", uris=["spiffe://example.org/a"])
    contexts = tls.ClientContexts(bundle, cert, key)
    first = contexts.current()
    assert contexts.current() is first  # unchanged files: the same context
    ca.write_leaf(tmp_path, "svid", uris=["spiffe://example.org/a"], not_after=NOW + hours(2))
    renewed = contexts.current()
    assert renewed is not first
    key.write_text("half-written\n")  # a renewal caught mid-write: keep the last good context
    assert contexts.current() is renewed
    assert "BEGIN" not in repr(contexts)
