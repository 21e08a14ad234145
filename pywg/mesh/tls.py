"""TLS contexts for the coordinator (HTTPS, optional client X.509-SVIDs) and the agent.

The server asks for a client certificate but does not require one (``CERT_OPTIONAL``):
pre-auth keys keep working, and a client with a bad SVID gets the coordinator's JSON
error rather than a failed handshake. A presented chain must still lead to the client CA
bundle; only its time check is left to :mod:`pywg.mesh.spiffe` (OpenSSL's
X509_V_FLAG_NO_CHECK_TIME), so an expired SVID is refused by name. That flag covers the
whole chain: the validator sees only the leaf (Python 3.11 has no verified-chain API), so
an expired CA in the bundle is not noticed; keep the bundle current.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's flag; Python's ssl module has no name for it


class TlsError(Exception):
    """A certificate, key or bundle file that cannot be used (the message names it)."""


def _load_chain(ctx: ssl.SSLContext, cert: str | Path, key: str | Path, what: str) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise TlsError(f"{what}: no such file: {exc.filename or cert}") from None
    except OSError as exc:  # ssl.SSLError is an OSError
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise TlsError(f"{what}: the private key {key} does not belong to the certificate {cert}") from None
        raise TlsError(f"{what}: {cert} / {key} is not a PEM certificate and its private key "
                       f"({getattr(exc, 'reason', None) or exc})") from None


def _load_bundle(ctx: ssl.SSLContext, bundle: str | Path, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(bundle))
    except FileNotFoundError:
        raise TlsError(f"{what}: no such file: {bundle}") from None
    except OSError as exc:
        raise TlsError(f"{what}: {bundle} is not a PEM certificate bundle "
                       f"({getattr(exc, 'reason', None) or exc})") from None


def server_context(cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> ssl.SSLContext:
    """The coordinator's context; with ``client_ca``, clients may present an X.509-SVID."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key, "--tls-cert/--tls-key")
    if client_ca is not None:
        _load_bundle(ctx, client_ca, "--client-ca")
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    return ctx


def client_context(trust_bundle: str | Path, svid_cert: str | Path | None = None,
                   svid_key: str | Path | None = None) -> ssl.SSLContext:
    """The agent's context: the coordinator verified against ``trust_bundle``, and the
    SVID presented when given (the private key stays here; only the chain is sent)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_bundle(ctx, trust_bundle, "--trust-bundle")
    if svid_cert is not None:
        if svid_key is None:
            raise TlsError("--svid needs --svid-key")
        _load_chain(ctx, svid_cert, svid_key, "--svid/--svid-key")
    return ctx


class ClientContexts:
    """The agent's context, built again when a file changed (an SVID renewed on disk is
    presented from the next connection on)."""

    def __init__(self, trust_bundle: str | Path, svid_cert: str | Path | None = None,
                 svid_key: str | Path | None = None) -> None:
        self.files = tuple(Path(p) for p in (trust_bundle, svid_cert, svid_key) if p is not None)
        self.trust_bundle, self.svid_cert, self.svid_key = trust_bundle, svid_cert, svid_key
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._ctx: ssl.SSLContext | None = None
        self.current()  # bad files fail now, with the option's name

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        out = []
        for p in self.files:
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    def current(self) -> ssl.SSLContext:
        stamp = self._stamps()
        if self._ctx is None or stamp != self._stamp:
            try:
                self._ctx = client_context(self.trust_bundle, self.svid_cert, self.svid_key)
                self._stamp = stamp
            except TlsError:
                if self._ctx is None:
                    raise  # at start: the caller reports it; later: keep the last good one
        return self._ctx

    def __repr__(self) -> str:
        return f"ClientContexts(trust_bundle={str(self.trust_bundle)!r}, svid={str(self.svid_cert)!r})"
