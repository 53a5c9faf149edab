"""Tests of broker.training.settings: the config's checks and the label settings."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from broker.training.settings import TrainingSetConfig, config_dict, label_settings_differ


def test_label_settings_differ_reads_old_cards_by_the_settings_they_predate():
    now = config_dict(TrainingSetConfig())
    old_card = {k: v for k, v in now.items() if k != "dipole_lobe_kinds"}
    assert label_settings_differ(now, old_card) == []  # the added setting's old value is today's
    assert label_settings_differ(now, None) is None and label_settings_differ({}, now) is None
    assert label_settings_differ(now, ["not", "a", "config"]) is None  # a hostile card
    moved = config_dict(TrainingSetConfig(dipole_lobe_kinds=("variable", "transient"),
                                          faint_trails_per_frame=3.0))  # not a label setting
    assert label_settings_differ(moved, now) == ["dipole_lobe_kinds"]
    assert label_settings_differ(now, {**now, "variable_dipole_lobe": (4, 0.25)}) == []


def test_training_set_config_rejects_negative_artifact_rates():
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="faint_trails_per_frame"):
            TrainingSetConfig(faint_trails_per_frame=bad)
    with pytest.raises(ConfigError, match="trails_per_frame"):
        TrainingSetConfig(trails_per_frame=-0.5)
    with pytest.raises(ConfigError, match="dipole_lobe_kinds"):
        TrainingSetConfig(dipole_lobe_kinds=("variable", "cosmic_ray"))


def test_training_set_config_rejects_spike_and_gap_settings_out_of_range():
    for bad in ((0.0, 0.01), (0.02, 0.01), (0.01, 1.5), (-0.1, 0.1)):
        with pytest.raises(ConfigError, match="spike_strength_range"):
            TrainingSetConfig(spike_strength_range=bad)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="p_reference_gap"):
            TrainingSetConfig(p_reference_gap=bad)
    with pytest.raises(ConfigError, match="glints_per_frame"):
        TrainingSetConfig(glints_per_frame=-1.0)
    TrainingSetConfig(spike_strength_range=(0.0, 0.0), p_reference_gap=0.0)  # off is fine
