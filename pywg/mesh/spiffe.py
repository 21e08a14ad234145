"""SPIFFE identities from X.509-SVIDs (sans-I/O: pure functions over ``cryptography``).

An X.509-SVID (SPIFFE X.509-SVID standard) is a leaf certificate with exactly one URI
SAN, the SPIFFE ID ``spiffe://<trust domain>/<path>``; it is not a CA certificate. The
chain to the trust bundle is verified by the TLS layer (see :mod:`pywg.mesh.tls`); here:
the SPIFFE ID's syntax, the validity window at ``now`` and the allowed trust domains.
Every refusal is an :class:`SvidError` whose ``reason`` names the problem and whose
``status`` is the HTTP status to answer with (401: no usable identity, 403: an identity
this coordinator does not accept).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Collection
from dataclasses import dataclass

from cryptography import x509

MAX_ID_BYTES = 2048  # the SPIFFE ID standard's limit on a URI SAN
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class SvidError(Exception):
    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/seg/seg..."

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_trust_domain(text: str) -> str:
    """A trust domain name (lower-case letters, digits, '.', '-', '_'); SvidError if not."""
    if not _TRUST_DOMAIN.fullmatch(text):
        raise SvidError(f"{text!r} is not a trust domain name (lower-case letters, digits, '.', '-', '_')")
    return text


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse ``spiffe://trust-domain/path`` strictly (no port, user info, query, fragment,
    empty, '.' or '..' segments, trailing '/'); SvidError naming the problem."""
    shown = text if len(text) <= 200 else text[:200] + "..."
    if len(text.encode("utf-8", "replace")) > MAX_ID_BYTES:
        raise SvidError(f"the URI SAN is longer than {MAX_ID_BYTES} bytes: not a SPIFFE ID")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "spiffe":
        raise SvidError(f"the URI SAN {shown!r} is not a SPIFFE ID (spiffe://trust-domain/path)")
    if scheme != "spiffe":
        raise SvidError(f"the URI SAN {shown!r}: the scheme is lower-case 'spiffe'")
    domain, slash, path = rest.partition("/")
    if not domain:
        raise SvidError(f"the SPIFFE ID {shown!r} has no trust domain")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise SvidError(f"the SPIFFE ID {shown!r}: the trust domain may hold only lower-case letters, "
                        "digits, '.', '-' and '_' (no port, user info, query or fragment)")
    if not slash:
        return SpiffeId(domain, "")
    for segment in path.split("/"):
        if not segment:
            raise SvidError(f"the SPIFFE ID {shown!r} has an empty path segment (or a trailing '/')")
        if segment in (".", ".."):
            raise SvidError(f"the SPIFFE ID {shown!r} has a '{segment}' path segment")
        if not _SEGMENT.fullmatch(segment):
            raise SvidError(f"the SPIFFE ID {shown!r}: path segments hold only letters, digits, '.', '-' and '_'")
    return SpiffeId(domain, "/" + path)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The certificate's SPIFFE ID: its one URI SAN; SvidError if it has none, several, or
    one that is not a SPIFFE ID, or if the certificate is a CA."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is not None and basic.ca:
        raise SvidError("the certificate is a CA certificate, not an X.509-SVID")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SvidError("the certificate has no SPIFFE ID (no subject alternative names)") from None
    except ValueError as exc:
        raise SvidError(f"the certificate's subject alternative names do not parse: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise SvidError("the certificate has no SPIFFE ID (no URI SAN)")
    if len(uris) > 1:
        raise SvidError(f"the certificate has {len(uris)} URI SANs; an X.509-SVID has exactly one")
    return parse_spiffe_id(uris[0])


def validate_svid(
    cert: x509.Certificate, trust_domains: Collection[str], now: datetime.datetime
) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID whose chain the TLS layer verified, if it is valid at
    ``now`` (timezone-aware) and in one of ``trust_domains``; else SvidError."""
    spiffe_id = spiffe_id_of(cert)
    if now < cert.not_valid_before_utc:
        raise SvidError(f"the X.509-SVID for {spiffe_id} is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}")
    if now > cert.not_valid_after_utc:
        raise SvidError(f"the X.509-SVID for {spiffe_id} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    if spiffe_id.trust_domain not in trust_domains:
        allowed = ", ".join(sorted(trust_domains)) or "none"
        raise SvidError(f"trust domain {spiffe_id.trust_domain!r} is not allowed here (allowed: {allowed})", 403)
    return spiffe_id


def validate_svid_der(der: bytes, trust_domains: Collection[str], now: float) -> SpiffeId:
    """:func:`validate_svid` over a DER certificate and a Unix time."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise SvidError(f"the client certificate does not parse: {exc}") from None
    return validate_svid(cert, trust_domains, datetime.datetime.fromtimestamp(now, datetime.UTC))
