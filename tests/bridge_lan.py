"""A LAN for namespace tests: a bridge in the root namespace and namespaces hanging off
it by veth pairs (``eth0`` inside), every name starting with the test's prefix."""

from __future__ import annotations

import subprocess


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class BridgeLan:
    def __init__(self, prefix: str, host_address: str | None = None) -> None:
        """``host_address`` (CIDR): the root namespace's own address on the bridge."""
        self.prefix = prefix
        self.bridge = f"{prefix}br"
        self.namespaces: list[str] = []
        ip("link", "add", self.bridge, "type", "bridge")
        if host_address:
            ip("addr", "add", host_address, "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add(self, i: int, address: str) -> str:
        """Namespace ``<prefix>n<i>`` with ``address`` (CIDR) on its eth0; its name."""
        ns, veth = f"{self.prefix}n{i}", f"{self.prefix}v{i}"
        ip("link", "del", veth, check=False)  # an earlier run's, if its namespace outlived it
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", veth, "master", self.bridge, "up")
        for cmd in (("addr", "add", address, "dev", "eth0"), ("link", "set", "eth0", "up"), ("link", "set", "lo", "up")):
            ip("-n", ns, *cmd)
        return ns

    def close(self) -> None:
        """Remove the namespaces, their veths and the bridge. A process left in a namespace
        (a daemon still shutting down) would keep it, and its veth, alive after ``netns del``:
        such processes are killed first, and each veth is deleted by name."""
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                  check=False).stdout.split()
            if pids:
                subprocess.run(["kill", "-9", *pids], capture_output=True, check=False)
            ip("netns", "del", ns, check=False)
            ip("link", "del", f"{self.prefix}v{ns.removeprefix(self.prefix + 'n')}", check=False)
        ip("link", "del", self.bridge, check=False)
