"""Loader for the conformance vectors in ``vectors/`` (see vectors/README.md for the schemas)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

VECTOR_DIR = Path(__file__).resolve().parent.parent / "vectors"


@cache
def load(name: str) -> dict:
    """Return the parsed ``vectors/<name>.json``; every file must name its upstream ``source``."""
    path = VECTOR_DIR / f"{name}.json"
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    assert data.get("source"), f"{path} has no 'source' field"
    return data


def h(value: str) -> bytes:
    """Decode a hex string from a vector file."""
    return bytes.fromhex(value)
