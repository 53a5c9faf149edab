"""Tests of the shipped models (``broker/models/``, :data:`broker.MODELS_DIR`): one folder, inside the package."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import broker
from broker import MODELS_DIR

#: The models that ship: the default real/bogus model (v11), the previous one, v12 (BN statistics adapted to
#: unlabelled ZTF pixels; not the default), the anomaly model, the light-curve classifier.
SHIPPED = {"realbogus-v12": ".pt", "realbogus-v11": ".pt", "realbogus-v10": ".pt",
           "anomaly-v5": ".npz", "lcclass-v2": ".npz"}


def test_one_models_dir_inside_the_package():
    from broker import anomaly, lcclass, realbogus

    assert MODELS_DIR == Path(broker.__file__).resolve().parent / "models"
    assert realbogus.MODELS_DIR is MODELS_DIR and anomaly.MODELS_DIR is MODELS_DIR  # one definition
    assert lcclass.MODELS_DIR is MODELS_DIR
    assert {realbogus.DEFAULT_VERSION, anomaly.DEFAULT_VERSION, lcclass.DEFAULT_VERSION} <= set(SHIPPED)


def test_the_shipped_files_are_package_data():
    files = sorted(p.name for p in MODELS_DIR.iterdir())
    want = sorted(f"{v}{ext}" for v, weights in SHIPPED.items() for ext in (weights, ".json", ".md"))
    assert files == want  # weights, sidecar and card of each, nothing else
    pyproject = tomllib.loads((Path(broker.__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["broker"]
    assert all(any(fnmatch.fnmatch(f"models/{f}", p) for p in patterns) for f in files)
