"""Avro schemas of the broker's topics, one folder per record type, one ``v<N>.avsc`` per version."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import fastavro

ROOT = Path(__file__).parent

#: The version each topic is written with now.
CURRENT = {"frame": 1, "candidates": 3, "alert": 4, "dlq": 2, "progress": 1, "followup": 1}


@lru_cache(maxsize=None)
def load(name: str, version: int | None = None) -> dict:
    """Parsed schema ``schemas/<name>/v<version>.avsc`` (current version by default)."""
    version = CURRENT[name] if version is None else version
    path = ROOT / name / f"v{version}.avsc"
    schema = fastavro.parse_schema(json.loads(path.read_text()))
    if not isinstance(schema, dict):  # a named or union type: no topic is written with one
        raise TypeError(f"{path} is not a record schema")
    return schema


def versions(name: str) -> list[int]:
    """All versions of ``name`` kept in the repository."""
    return sorted(int(p.stem[1:]) for p in (ROOT / name).glob("v*.avsc"))
