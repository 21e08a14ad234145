"""Where the TunnelManager's interfaces run.

- ``InProcessBackend`` (the default): pywg's engine in this process, several interfaces
  per process, optionally inside a network namespace; also serves each UAPI socket.
- ``UapiBackend``: any implementation serving the UAPI socket (a pywg daemon,
  wireguard-go, boringtun), started as ``CMD NAME``.

``base`` holds the ``Backend`` protocol the manager drives; ``link`` the ``ip`` helpers both
use for address, MTU and link state.
"""

from .base import Backend, BackendFailure, LinkState, NameInUse, NotServed
from .inprocess import InProcessBackend
from .uapi import UapiBackend, default_command

__all__ = [
    "Backend",
    "BackendFailure",
    "InProcessBackend",
    "LinkState",
    "NameInUse",
    "NotServed",
    "UapiBackend",
    "default_command",
]
