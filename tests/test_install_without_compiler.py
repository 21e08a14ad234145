"""Installing on a machine without a C compiler (issue 16): ``CC=false pip install .`` in a
fresh virtualenv succeeds with one warning, leaves the C extensions out, and that install
runs a real tunnel (two pywg daemons from it, in two namespaces) that carries a ping, on
the pure-Python path, which it says once.

The source is copied first (without the built extensions, caches and build directories),
so the install cannot pick up what ``make venv`` built here, and the build cannot write
into the working tree. pip fetches the build requirements (setuptools, wheel, cffi) and
the dependencies from PyPI or its cache: that is the only network it uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pywg.manage.key import Key
from pywg.testing.netns import Bed, ping, run

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "native", "pywg")
NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "build", "*.egg-info")


@pytest.fixture(scope="module")
def compilerless_install(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(the venv's bin directory, pip's output)."""
    work = tmp_path_factory.mktemp("nocc")
    source = work / "src"
    source.mkdir()
    for name in COPIED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=NOT_COPIED)
        else:
            shutil.copy2(path, source / name)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYWG_", "PIP_REQUIRE", "VIRTUAL_ENV"))}
    env["CC"] = "false"  # every compile fails, as on a machine without gcc
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-v",
                           "--disable-pip-version-check", str(source)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return venv / "bin", output


def test_install_without_a_compiler_warns_once_and_leaves_the_extensions_out(
        compilerless_install: tuple[Path, str]) -> None:
    bin_dir, output = compilerless_install
    assert output.count("WARNING: pywg: the C extensions could not be built") == 1, output[-4000:]
    python = bin_dir / "python"
    probe = subprocess.run([str(python), "-W", "default", "-c",
                            ("import pywg, pywg.fastpath as f, pywg.device.offload as o, pathlib; "
                            "print(f.BACKEND, f.NATIVE_AVAILABLE, o.AVAILABLE, "
                            "sorted(p.name for p in pathlib.Path(pywg.__file__).parent.glob('_*.so')))")],
                           capture_output=True, text=True, timeout=60, check=True, cwd="/")
    assert probe.stdout.split() == ["python", "False", "False", "[]"], probe.stdout
    assert probe.stderr.count("Warning") == 1 and "not built" in probe.stderr, probe.stderr
    assert (bin_dir / "pywg").exists() and (bin_dir / "pywg-daemon").exists()


def test_the_compilerless_install_carries_a_ping(bed: Bed, compilerless_install: tuple[Path, str]) -> None:
    bin_dir, _ = compilerless_install
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYWG_")}
    keys = [Key.generate_private() for _ in range(2)]
    names = [bed.unique_ifname("nc"), bed.unique_ifname("nc")]
    for ns, name, key, index in ((bed.ns_a, names[0], keys[0], 1), (bed.ns_b, names[1], keys[1], 2)):
        key_file = bed.secret_file(f"{name}.key", key.to_base64())
        done = subprocess.run(["ip", "netns", "exec", ns, str(bin_dir / "pywg"), "interface", "create", name,
                               "--private-key-file", str(key_file), "--listen-port", str(51840 + index),
                               "--address", f"10.204.0.{index}/24"],
                              capture_output=True, text=True, timeout=60, env=env, check=False, cwd="/")
        assert done.returncode == 0, done.stderr
    for ns, name, other, index, endpoint in ((bed.ns_a, names[0], keys[1], 2, f"{bed.outer_b}:51842"),
                                             (bed.ns_b, names[1], keys[0], 1, f"{bed.outer_a}:51841")):
        run("wg", "set", name, "peer", other.public_key().to_base64(), "allowed-ips", f"10.204.0.{index}/32",
            "endpoint", endpoint, ns=ns)
    ping(bed.ns_a, "10.204.0.2", count=3, interval=0.2)
    # The daemons are the compilerless install's, on the pure-Python path.
    for ns, name in ((bed.ns_a, names[0]), (bed.ns_b, names[1])):
        pids = run("ip", "netns", "pids", ns).split()
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in pids]
        assert any(str(bin_dir / "pywg-daemon").encode() in line for line in cmdlines), cmdlines
        stats = json.loads(subprocess.run([str(bin_dir / "pywg"), "stats", name], capture_output=True, text=True,
                                          timeout=30, check=True, env=env, cwd="/").stdout)
        assert stats["crypto"]["backend"] == "python" and stats["crypto"]["native_extensions"] is False
