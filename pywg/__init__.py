"""pywg: a userspace WireGuard implementation in Python."""

__version__ = "0.1.0"
