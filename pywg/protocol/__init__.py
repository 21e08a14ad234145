"""Sans-I/O WireGuard protocol core.

Nothing in this package touches sockets, files, clocks or event loops: time comes
in as ``now`` (seconds, float, any monotonic origin), randomness through an
injectable source, bytes in and actions out.
"""
