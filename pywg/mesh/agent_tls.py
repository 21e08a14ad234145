"""The agent's TLS options (``--trust-bundle``, ``--svid``, ``--svid-key``) checked together."""

from __future__ import annotations

from collections.abc import Sequence

from pywg.mesh.tls import ClientContexts, TlsError


def agent_tls(coordinators: Sequence[str], trust_bundle: str | None, svid: str | None, svid_key: str | None,
              error: type[Exception]) -> ClientContexts | None:
    """The agent's ClientContexts (None: plain http, or https verified by the system's CAs);
    ``error`` (the CLI's error type) names the option at fault."""
    plain = [url for url in coordinators if not url.startswith("https://")]
    https = not plain
    coordinator = plain[0] if plain else coordinators[0]
    if (svid is None) != (svid_key is None):
        raise error("--svid and --svid-key go together")
    if svid is not None and not https:
        raise error(f"--svid: an X.509-SVID is presented over TLS: use an https:// coordinator, not {coordinator!r}")
    if svid is not None and trust_bundle is None:
        raise error("--svid: give --trust-bundle (the CA bundle that verifies the coordinator)")
    if trust_bundle is not None and not https:
        raise error(f"--trust-bundle: the coordinator {coordinator!r} is not https://")
    if trust_bundle is None:
        return None
    try:
        return ClientContexts(trust_bundle, svid, svid_key)
    except TlsError as exc:
        raise error(str(exc)) from None
