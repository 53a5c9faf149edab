"""Tests of broker.training.main: the reproduce command and the reuse of complete sets."""

from __future__ import annotations

import json
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest

from broker.training.generate import field_sim_config
from broker.training.main import reproduce_command
from broker.training.settings import TrainingSetConfig, config_dict
from broker.training.trainer import TrainConfig


def test_reproduce_command_names_every_setting_that_is_not_the_default():
    cli = reproduce_command(0, 1000, "v", TrainingSetConfig(seed=0), TrainConfig(max_seconds=60))
    assert cli.startswith("broker train-realbogus --seed 0 --target-n 1000 --version v")
    py = reproduce_command(3, 1000, "v", TrainingSetConfig(p_bleed=0.5),
                           TrainConfig(seed=3, member_splits=False))
    assert "set_config=TrainingSetConfig(**{'p_bleed': 0.5})" in py
    assert "train_config=TrainConfig(**{'seed': 3, 'member_splits': False})" in py
    # a training seed other than the generator's is only reproduced by naming it
    assert "TrainConfig(**{'seed': 5})" in reproduce_command(3, 1000, "v", TrainingSetConfig(),
                                                              TrainConfig(seed=5))


def test_old_sets_are_reused_and_the_bright_cap_reaches_the_simulator(tmp_path, monkeypatch):
    from broker.training import main as main_mod

    def regenerate(*args, **kwargs):
        raise AssertionError("a complete set was not reused")
    monkeypatch.setattr(main_mod, "generate_training_set", regenerate)
    # a complete set whose manifest predates the settings added since is the config that has
    # their old values (SET_SETTINGS_ADDED)
    then = TrainingSetConfig(**main_mod.SET_SETTINGS_ADDED)
    old = {k: v for k, v in config_dict(then).items() if k not in main_mod.SET_SETTINGS_ADDED}
    (tmp_path / "manifest.json").write_text(json.dumps({"complete": True, "config": old, "n": 7}))
    assert main_mod._ensure_set(tmp_path, then, progress=False)["n"] == 7
    for changed in ({"min_dipole_lobe_ratio": 0.4}, {"faint_trails_per_frame": 2.0}):
        with pytest.raises(AssertionError, match="not reused"):
            main_mod._ensure_set(tmp_path, dataclasses_replace(then, **changed), progress=False)
    cfg = TrainingSetConfig(variable_bright_cap=(17.5, 0.1))
    sim = field_sim_config(cfg, np.random.default_rng(0))
    assert sim.variable_bright_cap == (17.5, 0.1)
    assert field_sim_config(TrainingSetConfig(), np.random.default_rng(0)).variable_bright_cap is None


def test_the_card_reports_the_dev_set_when_evaluated():
    from broker.training.main import _card_evaluation

    dev = {"dir": "../shared/data/ztf_alerts_dev", "threshold": 0.5, "frac_bogus_passed": 0.53,
           "auc_drb": {"auc": 0.864, "lo": 0.818, "hi": 0.904, "n_neg": 66, "n_pos": 616}}
    lines = "\n".join(_card_evaluation({"dev": dev, "threshold": 0.5}))
    assert "0.864 [0.818, 0.904] (66 at <= 0.5)" in lines and "0.530" in lines
    assert _card_evaluation({"threshold": 0.5}) == []
