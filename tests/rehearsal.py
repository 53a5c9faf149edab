"""Deployment files run without their platform: each workload started as a process, as its container would be.

Shared by ``tests/test_compose.py`` (docker-compose.yml) and ``tests/test_k8s.py`` (``k8s/``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest


def base_env() -> dict[str, str]:
    """The environment of the tests with the project's ``broker`` command first on PATH (the image's entrypoint)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def start(name: str, argv: list[str], env: dict[str, str], cwd: Path, logs: Path) -> subprocess.Popen:
    """Start one workload, its output appended to ``logs/<name>.out`` and ``.err``."""
    with open(logs / f"{name}.out", "a") as out, open(logs / f"{name}.err", "a") as err:  # a restart appends
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a workload as its platform does: ``sig``, then a kill after 30 s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for(check: Callable[[], Any], timeout: float, what: str, procs: dict[str, subprocess.Popen],
             logs: Path) -> Any:
    """Poll ``check()`` until it returns something true; fail with the logs of workloads that exited otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running(procs, logs, what)
        if result := check():
            return result
        time.sleep(1.0)
    pytest.fail(f"{what}: not within {timeout} s")


def running(procs: dict[str, subprocess.Popen], logs: Path, what: str) -> None:
    """Fail with the logs of the workloads that exited with an error, if any."""
    dead = {n: p.returncode for n, p in procs.items() if p.poll() not in (None, 0)}
    if dead:
        tails = {n: (logs / f"{n}.err").read_text()[-1500:] for n in dead}
        pytest.fail(f"{what}: workloads exited {dead}:\n" + "\n".join(f"--- {n}\n{t}" for n, t in tails.items()))


def answers(url: str) -> bool:
    """Whether ``GET url`` answers 200."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def listed(url: str) -> list[dict]:
    """The ``items`` of a portal listing (none while it does not answer)."""
    try:
        response = httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return []
    return response.json().get("items", []) if response.status_code == 200 else []
