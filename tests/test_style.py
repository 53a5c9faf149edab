"""The checks that keep the code as docs/architecture.md ("Checks") describes it."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Longest function allowed in the science and the runtime (lines from ``def`` to its last line,
#: docstring included): a function longer than a screen does several steps that want names.
MAX_FUNCTION_LINES = 80


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is not installed beside {sys.executable}: install the project's [test] extra")
    return path


def test_ruff_is_clean():
    res = subprocess.run([_tool("ruff"), "check", "--no-cache", "broker", "streams", "schemas", "bench", "tests"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_is_clean():
    res = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted([*(ROOT / "broker").rglob("*.py"), *(ROOT / "streams").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(long)
