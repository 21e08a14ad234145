"""The real thing for issue 10 item 7: in one network namespace, a `pywg daemon` interface
and an in-process interface (InProcessBackend) report the same data path in `pywg stats`:
the same threads, hop, GSO/GRO and TUN offloads (before, in-process TUNs never had them).
Root, a namespace (prefix h10m)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from needs import require_bed

from pywg.device import offload
from pywg.manage.backends.inprocess import InProcessBackend
from pywg.testing.netns import delete_namespaces, run, stop_process

pytestmark = pytest.mark.netns

NS = "h10m-asm"
DAEMON, INPROC = "h10md0", "h10mi0"
PYWG = str(Path(sys.executable).parent / "pywg")


def test_an_in_process_interface_gets_the_daemons_data_path_and_tun_offloads(tmp_path: Path) -> None:
    require_bed()
    delete_namespaces([NS])
    run("ip", "netns", "add", NS)
    env = dict(os.environ, LOG_LEVEL="error")
    daemon = subprocess.Popen(["ip", "netns", "exec", NS, PYWG, "daemon", "-f", DAEMON], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def main() -> None:
        deadline = time.monotonic() + 20
        while True:  # `pywg stats`, as a user would ask
            done = await asyncio.to_thread(subprocess.run, [PYWG, "stats", DAEMON], capture_output=True)
            if done.returncode == 0:
                daemon_stats = json.loads(done.stdout)
                break
            assert daemon.poll() is None, daemon.stderr.read().decode() if daemon.stderr else ""
            assert time.monotonic() < deadline, "the daemon's stats socket never answered"
            await asyncio.sleep(0.1)
        backend = InProcessBackend(netns=NS, socket_dir=tmp_path, stats_dir=None)
        try:
            await backend.create(INPROC, 1420, None)
            device = backend.device(INPROC)
            in_process = device.stats()["data_path"]
            assert in_process == daemon_stats["data_path"]
            assert in_process["tun_offload"] is offload.AVAILABLE  # type: ignore[index]
            assert device.tun.vnet_hdr is offload.AVAILABLE
            assert in_process["threads"] is True  # type: ignore[index]
        finally:
            await backend.aclose()

    try:
        asyncio.run(main())
    finally:
        stop_process(daemon)
        delete_namespaces([NS])
