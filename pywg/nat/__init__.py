"""NAT traversal, sans-I/O: STUN, disco, path selection."""
