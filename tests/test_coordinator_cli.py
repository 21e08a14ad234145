"""`pywg coordinator ...` as a user runs it: the real `serve` process started by
subprocess, pre-auth keys and node listings from the shell, errors naming the option."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pywg.manage.key import Key
from pywg.manage.types import MeshTopology

PYWG = [sys.executable, "-m", "pywg.cli"]


def pywg(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYWG, *args], check=False, capture_output=True, text=True, timeout=timeout)


def post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Serve:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.store = f"sqlite:{tmp / 'c.db'}"
        self.admin = tmp / "admin.token"
        self.proc = subprocess.Popen(
            [*PYWG, "coordinator", "serve", "--listen", "127.0.0.1:0", "--store", self.store,
             "--admin-token-file", str(self.admin), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
        self.url = line.split("listening on ")[1].split()[0]

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, err


def test_serve_registers_lists_and_removes_nodes_from_the_shell(tmp_path):
    serve = Serve(tmp_path, "--prefix4", "10.77.0.0/16", "--prefix6", "fd77:77::/64")
    try:
        assert oct(os.stat(serve.admin).st_mode & 0o777) == "0o600"
        made = pywg("coordinator", "authkey", "create", "--store", serve.store, "--reusable", "--expires", "1h")
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        assert key.startswith("pywg-authkey-") and "reusable" in made.stderr and key not in made.stderr
        ids = []
        for name in ("alpha", "bravo"):
            pub = Key.generate_private().public_key().to_base64()
            status, answer = post(serve.url + "/api/v1/register",
                                  {"authKey": key, "name": name, "publicKey": pub, "endpoints": ["192.0.2.9:51820"]})
            assert status == 201, answer
            ids.append(answer["id"])
        assert answer["internalIp"] == "10.77.0.2" and answer["internalIpv6"] == "fd77:77::2"

        topo = pywg("coordinator", "topology", "--coordinator", serve.url, "--token-file", str(serve.admin), "--json")
        assert topo.returncode == 0, topo.stderr
        parsed = MeshTopology.from_json(topo.stdout)
        assert [n.id for n in parsed.nodes] == ids and str(parsed.nodes[0].internal_ip) == "10.77.0.1"

        nodes = pywg("coordinator", "nodes", "--store", serve.store, "--json")
        listed = json.loads(nodes.stdout)
        assert [n["name"] for n in listed] == ["alpha", "bravo"]
        assert all("token" not in json.dumps(n) for n in listed)

        removed = pywg("coordinator", "node", "remove", ids[0], "--store", serve.store)
        assert removed.returncode == 0 and "alpha" in removed.stdout
        # The running server serves the removal made beside it.
        topo = pywg("coordinator", "topology", "--coordinator", serve.url, "--token-file", str(serve.admin), "--json")
        assert [n["id"] for n in json.loads(topo.stdout)["nodes"]] == [ids[1]]

        keys = json.loads(pywg("coordinator", "authkey", "list", "--store", serve.store, "--json").stdout)
        assert [(k["state"], k["uses"]) for k in keys] == [("valid", 2)]
        assert pywg("coordinator", "authkey", "revoke", keys[0]["id"], "--store", serve.store).returncode == 0
        status, err = post(serve.url + "/api/v1/register",
                           {"authKey": key, "name": "charlie", "publicKey": Key.generate_private().public_key().to_base64()})
        assert status == 401 and "revoked" in err["error"]
    finally:
        code, err = serve.stop()
    assert code == 0 and "Traceback" not in err
    assert key.split("-", 3)[3] not in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["serve", "--listen", "127.0.0.1", "--store", "sqlite:{tmp}/c.db"], "--listen"),
        (["serve", "--listen", "localhost:80", "--store", "sqlite:{tmp}/c.db"], "--listen"),
        (["serve", "--listen", "127.0.0.1:0", "--store", "sqlite:{tmp}/c.db", "--prefix4", "10.0.0.1/8"],
         "--prefix4"),
        (["serve", "--listen", "127.0.0.1:0", "--store", "sqlite:{tmp}/c.db", "--prefix6", "nope"], "--prefix6"),
        (["serve", "--listen", "127.0.0.1:0", "--store", "sqlite:{tmp}/c.db", "--limit-per-key", "x"],
         "--limit-per-key"),
        (["serve", "--listen", "127.0.0.1:0", "--store", "nosuch:x"], "--store"),
        (["authkey", "create", "--store", "sqlite:{tmp}/c.db", "--expires", "soon"], "--expires"),
        (["authkey", "create", "--store", "sqlite:{tmp}/nodir/c.db"], "--store"),
        (["authkey", "revoke", "abc", "--store", "sqlite:{tmp}/c.db"], "ID"),
        (["node", "remove", "abc", "--store", "sqlite:{tmp}/c.db"], "ID"),
        (["topology", "--coordinator", "127.0.0.1:1", "--token-file", "{tmp}/t"], "--token-file"),
        (["topology", "--coordinator", "ftp://x", "--token-file", "{tmp}/c.db"], "--coordinator"),
        (["topology", "--coordinator", "http://127.0.0.1:1", "--token-file", "{tmp}/c.db"], "--coordinator"),
    ],
)
def test_bad_options_get_a_message_naming_them_and_no_traceback(tmp_path, args, words):
    (tmp_path / "c.db").touch()
    result = pywg("coordinator", *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert result.returncode in (1, 2)
    assert words in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_serve_refuses_to_change_the_prefix_of_a_store_in_use(tmp_path):
    serve = Serve(tmp_path, "--prefix4", "10.5.0.0/16")
    try:
        key = pywg("coordinator", "authkey", "create", "--store", serve.store).stdout.strip()
        status, _ = post(serve.url + "/api/v1/register",
                         {"authKey": key, "name": "a", "publicKey": Key.generate_private().public_key().to_base64()})
        assert status == 201
    finally:
        serve.stop()
    again = pywg("coordinator", "serve", "--listen", "127.0.0.1:0", "--store", serve.store, "--prefix4", "10.6.0.0/16")
    assert again.returncode == 2 and "--prefix4" in again.stderr and "10.5.0.0/16" in again.stderr
