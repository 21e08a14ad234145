"""What the TunnelManager needs from a backend, and how a backend says what went wrong.

A backend runs WireGuard interfaces and answers UAPI requests for them; the manager
builds every request, validates it, and interprets the answers. Contract of each call:

- ``create(name, mtu, address, listen_port=N)``: make the interface, serving UAPI, with
  the address and MTU set and the link up, but no WireGuard configuration yet (the
  manager sends it next; ``listen_port`` is told ahead so that a backend whose daemon
  cannot report a port in use may check it first). Either it completes, or it raises
  having removed what it made (when cancelled, the removal may finish in the background,
  but before any later call of this backend for that name proceeds). ``NameInUse``
  (nothing made) when the name is taken.
- ``delete(name)``: remove the interface and what serves it; ``NotServed`` if there is none.
- ``exchange(name, request)``: one UAPI request (text, as on the socket) -> the response
  text (``errno=`` trailer included); ``NotServed`` if there is no such interface.
- ``exists(name)``: whether this backend can reach an interface of that name.
- ``link(name)``: the kernel's view of the link (MTU, address).
- ``handshake_counts(name)``: completed handshakes per peer public key, None if unknown.
- ``names()``: the interfaces this backend can reach.
- ``aclose()``: stop what this backend runs in this process (the in-process interfaces);
  interfaces served by other processes stay.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class BackendFailure(Exception):
    """A backend could not do what it was asked; ``errno`` when a UAPI errno or OS errno
    explains it."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno


class NameInUse(BackendFailure):
    """The interface name is taken (a link, or a UAPI socket somebody serves)."""


class NotServed(BackendFailure):
    """No interface of that name is reachable through this backend."""


@dataclass(frozen=True)
class LinkState:
    """The kernel's view of an interface; ``present`` False when this backend's network
    namespace has no such link (then ``mtu`` is 0 and ``address`` None)."""

    present: bool
    mtu: int = 0
    address: IPInterface | None = None
    up: bool = False


@runtime_checkable
class Backend(Protocol):
    kind: str  # "inprocess", "uapi" (for messages)

    async def create(self, name: str, mtu: int, address: IPInterface | None, *,
                     listen_port: int = 0) -> None: ...
    async def delete(self, name: str) -> None: ...
    async def exchange(self, name: str, request: str) -> str: ...
    async def exists(self, name: str) -> bool: ...
    async def link(self, name: str) -> LinkState: ...
    async def handshake_counts(self, name: str) -> dict[bytes, int] | None: ...
    async def names(self) -> list[str]: ...
    async def aclose(self) -> None: ...
