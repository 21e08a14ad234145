"""The mesh layer imports pywg.manage and below, never the device, the CLI or test beds
(DESIGN.md, "Layers"); nothing below the mesh imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pywg

ROOT = Path(pywg.__file__).parent
FORBIDDEN_IN_MESH = ("pywg.device", "pywg.cli", "pywg.lab", "pywg.testing", "pywg.demo")
BELOW_MESH = ("manage", "device", "protocol", "uapi")


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_mesh_imports_no_device_cli_or_test_bed():
    files = sorted((ROOT / "mesh").glob("*.py"))
    assert len(files) >= 5
    for path in files:
        bad = {m for m in imports(path) if m.startswith(FORBIDDEN_IN_MESH)}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_nothing_below_the_mesh_imports_it():
    for layer in BELOW_MESH:
        for path in (ROOT / layer).rglob("*.py"):
            bad = {m for m in imports(path) if m.startswith("pywg.mesh")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
