"""The tunnel-management layer of the spec: types, TunnelManager, KeyManager."""
