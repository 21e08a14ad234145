"""The options of ``pywg derp serve`` (kept free of heavy imports: the CLI builds its parser
from here on every run)."""

from __future__ import annotations

import argparse


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    """Every option of ``pywg derp serve``; the defaults are ``pywg.derp.limits``'."""
    from pywg.derp import limits

    serve.add_argument("--listen", required=True, metavar="ADDR:PORT", help="TCP address of /derp")
    serve.add_argument("--stun-port", type=int, metavar="N", help="UDP port of the STUN responder")
    serve.add_argument("--config", required=True, metavar="FILE",
                       help="derper-style JSON holding the server key (created 0600 if missing)")
    serve.add_argument("--verify-clients", metavar="FILE", help="allowlist: node public keys, one a line")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain")
    serve.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")
    mesh = serve.add_argument_group("mesh (several servers of one region)")
    mesh.add_argument("--mesh-with", metavar="URL,...",
                      help="the region's other servers: http://HOST:PORT or https://HOST[:PORT], comma-separated")
    mesh.add_argument("--mesh-key", metavar="FILE",
                      help="the region's shared mesh key: 64 hex characters, mode 0600 (derper's --mesh-psk-file)")
    bounds = serve.add_argument_group("limits (0 for a rate: unlimited)")
    bounds.add_argument("--client-rate", type=int, default=limits.DEFAULT_CLIENT_RATE, metavar="BYTES",
                        help="bytes per second one client may send; reads beyond it are delayed "
                             "(default %(default)s; mesh peers exempt)")
    bounds.add_argument("--client-burst", type=int, default=limits.DEFAULT_CLIENT_BURST, metavar="BYTES",
                        help="the burst of --client-rate (default %(default)s, at least 64 KiB + 32)")
    bounds.add_argument("--queue-bytes", type=int, default=limits.DEFAULT_QUEUE_BYTES, metavar="BYTES",
                        help="packet bytes held for a client that is not reading; older ones are "
                             "dropped (default %(default)s)")
    bounds.add_argument("--max-clients", type=int, default=limits.DEFAULT_MAX_CLIENTS, metavar="N",
                        help="connected clients at once (default %(default)s)")
    bounds.add_argument("--max-connections", type=int, default=limits.DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help="TCP connections at once, of any kind (default %(default)s)")
    bounds.add_argument("--accept-rate", type=float, default=limits.DEFAULT_ACCEPT_RATE, metavar="N",
                        help="new connections per second; excess ones are closed (default %(default)s)")
    bounds.add_argument("--accept-burst", type=int, default=limits.DEFAULT_ACCEPT_BURST, metavar="N",
                        help="the burst of --accept-rate (default %(default)s)")
    bounds.add_argument("--write-timeout", type=float, default=limits.DEFAULT_WRITE_TIMEOUT, metavar="SECONDS",
                        help="a client whose socket takes nothing this long is closed; 0: never "
                             "(default %(default)s)")
