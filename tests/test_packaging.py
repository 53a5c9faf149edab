"""An installed wheel (not only an editable checkout) carries the models and schemas it loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_a_wheel_installs_the_models_and_schemas(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("broker", "streams", "schemas"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("transient_broker-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("realbogus-v11.pt", "realbogus-v11.json", "realbogus-v10.pt", "anomaly-v5.npz", "anomaly-v5.json",
                  "lcclass-v2.npz", "lcclass-v2.json"):
        assert f"broker/models/{model}" in names
    assert "schemas/alert/v1.avsc" in names
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    code = ("import broker, schemas\n"
            "from broker.realbogus import RealBogusClassifier\n"
            "from broker.pipeline import ScoreModels\n"
            f"assert broker.__file__.startswith({str(site)!r}), broker.__file__\n"
            "m = ScoreModels.load()\n"
            "print(RealBogusClassifier.load().version, m.anomaly.version, m.lcclass.version, m.catalog.version,\n"
            "      schemas.load('alert')['name'])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:3] == ["realbogus-v11", "anomaly-v5", "lcclass-v2"]
    assert res.stdout.split()[4] == "broker.alert.v4.Alert" and res.stdout.split()[3].isdigit()  # OpenNGC's date
