"""NAT traversal, sans-I/O: the STUN codec (``stun``) and STUN transactions (``stun_client``).

Nothing in this package does I/O or reads a clock: datagrams go in and out as bytes, time
comes in as ``now`` (seconds, any monotonic origin) and randomness as a ``random(n)``
callable, so every module here runs the same on the daemon's socket, in a DERP server and
on a test's fake clock. It must never import asyncio, socket, os, select, time or threading.
"""
