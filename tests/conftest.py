"""Shared fixtures: the embedded Kafka broker (for tests marked ``kafka``), PostgreSQL and the real-data folder."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

#: Real public data beside the repository (see ../shared/data/README.md); absent on users' machines.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    """Register the ``prometheus`` marker (``--strict-markers``; pyproject.toml lists the others)."""
    config.addinivalue_line("markers", "prometheus: runs Debian's prometheus server (skipped when it is absent)")


@pytest.fixture(scope="session")
def kafka():
    """An embedded tansu broker on a free 127.0.0.1 port for the whole session."""
    from streams.embedded import EmbeddedKafka

    with EmbeddedKafka() as broker:
        yield broker


@pytest.fixture
def settings(kafka):
    """Kafka settings with an app id of its own, so tests never share consumer groups."""
    from streams.settings import KafkaSettings

    return KafkaSettings(kafka.bootstrap, app_id=f"test-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL 15 server of the session (tests/pg.py): ``create_database()`` gives a test its own database."""
    from tests.pg import LocalPostgres, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    with LocalPostgres() as server:
        yield server


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs mounted for the test (root only, as CI runs): a real disk to fill (``helpers.fill_disk``)."""
    import os
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it sits beside the repository in CI)")
    return path
