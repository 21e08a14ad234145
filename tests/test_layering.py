"""The layering of DESIGN.md ("Layers"), checked over every module's imports (ast).

Each layer imports only itself and the layers below it; the sans-I/O packages import no
I/O module; product code never imports pywg.testing (the demos excepted: they run the test
bed by design). Imports inside functions and ``TYPE_CHECKING`` blocks count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import pywg

ROOT = Path(pywg.__file__).parent

# Lowest first. A module belongs to the layer of its longest matching prefix in OWNERS.
LAYERS = ("leaf", "crypto", "protocol", "nat/derp", "device", "manage", "mesh", "cli", "testing")
OWNERS = {
    # Constants only, importing nothing of pywg: anyone may import them (issue 10, item 7).
    "pywg.protocol.constants": "leaf",
    "pywg.protocol.crypto": "crypto",  # the primitives (cryptography, pynacl)
    "pywg.fastpath": "crypto",  # batch seal/open and its native backends
    "pywg._fastpath": "crypto",  # the compiled fast path (native/build_fastpath.py)
    "pywg.protocol": "protocol",
    "pywg.uapi": "protocol",  # the UAPI text protocol, sans-I/O like the engine
    "pywg.nat": "nat/derp",
    "pywg.derp": "nat/derp",
    "pywg.device": "device",
    "pywg._offload": "device",  # the compiled TUN offload helpers (native/build_offload.py)
    "pywg.manage": "manage",
    "pywg.mesh": "mesh",
    "pywg.cli": "cli",
    "pywg.demo": "cli",
    "pywg.demo_mesh": "cli",
    "pywg.demo_nat": "cli",
    "pywg.testing": "testing",
    "pywg": "leaf",  # pywg/__init__.py: the version string
}
SANS_IO = ("pywg.protocol", "pywg.nat", "pywg.derp", "pywg.uapi")
IO_MODULES = frozenset({"asyncio", "socket", "os", "select", "time", "subprocess", "threading"})
# The demos run the namespace bed by design (`make demo`); nothing else in the product may.
MAY_IMPORT_TESTING = frozenset({"pywg.demo", "pywg.demo_mesh", "pywg.demo_nat"})
# (importer, imported, reason). Today's tree has none; entries may only be removed.
KNOWN_VIOLATIONS: frozenset[tuple[str, str, str]] = frozenset()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


MODULES = product_modules()


def imports(name: str, path: Path) -> Iterator[str]:
    """Every module ``name`` imports, absolute: ``from pywg import fastpath`` is pywg.fastpath,
    ``from .base import X`` is resolved against the package."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            for alias in node.names:  # names that are modules themselves (from pywg import cli)
                if f"{module}.{alias.name}" in MODULES or module == "pywg":
                    yield f"{module}.{alias.name}"


def layer_of(module: str) -> str:
    for prefix in sorted(OWNERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return OWNERS[prefix]
    raise AssertionError(f"{module} belongs to no layer: add it to OWNERS (DESIGN.md, 'Layers')")


def pywg_imports(name: str) -> set[str]:
    return {m for m in imports(name, MODULES[name]) if m == "pywg" or m.startswith("pywg.")}


def test_every_module_belongs_to_a_layer_of_design_md() -> None:
    assert len(MODULES) > 100
    assert set(OWNERS.values()) == set(LAYERS)
    for name in MODULES:
        assert layer_of(name) in LAYERS


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_upward_imports(name: str) -> None:
    rank = LAYERS.index(layer_of(name))
    upward = sorted(m for m in pywg_imports(name) if LAYERS.index(layer_of(m)) > rank
                    and not (m.startswith("pywg.testing") and name in MAY_IMPORT_TESTING)
                    and not any(v[:2] == (name, m) for v in KNOWN_VIOLATIONS))
    assert not upward, f"{name} ({layer_of(name)}) imports upward: " + ", ".join(
        f"{m} ({layer_of(m)})" for m in upward)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(SANS_IO)))
def test_sans_io_layers_import_no_io_module(name: str) -> None:
    io = sorted(m for m in imports(name, MODULES[name]) if m.split(".")[0] in IO_MODULES)
    assert not io, f"{name} is sans-I/O (DESIGN.md) but imports {io}"


def test_product_code_never_imports_testing() -> None:
    offenders = {name: sorted(m for m in pywg_imports(name) if m.startswith("pywg.testing"))
                 for name in MODULES if layer_of(name) != "testing" and name not in MAY_IMPORT_TESTING}
    assert not {name: found for name, found in offenders.items() if found}
    # The exception is real: the demos do use the bed (or the exception should go).
    assert all(any(m.startswith("pywg.testing") for m in pywg_imports(name)) for name in MAY_IMPORT_TESTING)


def test_the_mesh_drives_manage_never_the_device() -> None:
    """DESIGN.md: ``mesh/`` drives ``manage/`` (stricter than the ranks: no skipping to device)."""
    mesh = [name for name in MODULES if layer_of(name) == "mesh"]
    assert len(mesh) >= 5
    for name in mesh:
        bad = sorted(m for m in pywg_imports(name) if layer_of(m) == "device")
        assert not bad, f"{name} imports the device layer: {bad}"


def test_leaf_modules_import_nothing_of_pywg() -> None:
    for name in (n for n in MODULES if layer_of(n) == "leaf"):
        assert not pywg_imports(name), f"{name} is a leaf but imports {sorted(pywg_imports(name))}"


def test_known_violations_are_still_violations() -> None:
    """The list only shrinks: an entry whose import is gone must be removed."""
    for importer, imported, reason in KNOWN_VIOLATIONS:
        assert reason
        assert imported in pywg_imports(importer), f"{importer} no longer imports {imported}: drop the entry"


def test_the_checker_sees_relative_lazy_and_from_package_imports(tmp_path: Path) -> None:
    """The checker would catch the ways an upward import can hide (a test that can fail)."""
    package = tmp_path / "pywg" / "protocol"
    package.mkdir(parents=True)
    hidden = package / "hidden.py"
    hidden.write_text("import typing\nif typing.TYPE_CHECKING:\n    from ..device import tun\n"
                      "def later():\n    from pywg import cli\n    import socket\n"
                      "from . import peer\n")
    found = set(imports("pywg.protocol.hidden", hidden))
    assert {"pywg.device", "pywg.device.tun", "pywg.cli", "socket", "pywg.protocol.peer"} <= found
    assert LAYERS.index(layer_of("pywg.device.tun")) > LAYERS.index(layer_of("pywg.protocol.hidden"))
