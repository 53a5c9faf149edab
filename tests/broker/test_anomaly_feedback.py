"""Tests of broker.anomaly_feedback: operators' labels re-weight the anomaly terms; labels read from the archive."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from broker.anomaly import FEATURE_NAMES, AnomalyConfig, AnomalyModel, fit_anomaly
from broker.anomaly_feedback import FeedbackConfig, archived_labels, fit_feedback
from broker.errors import ModelError
from broker.simulate.lightcurves import LCSimConfig, simulate_objects
from broker.training.lightcurves import alert_table, training_alerts
from tests.broker.test_archive import archived, commit, sample

TINY = AnomalyConfig(n_bins=12, n_cdf_knots=51, seed=2)


@pytest.fixture(scope="module")
def data():
    table = alert_table(training_alerts(simulate_objects(90, seed=31, cfg=LCSimConfig(surveys=(("season", 1.0),))),
                                        seed=31, max_alerts=8))
    return table.x, table.kind


@pytest.fixture(scope="module")
def base(data):
    return fit_anomaly(*data, config=TINY, version="anomaly-t")


def _unusual(x: np.ndarray, feature: str, value: float, n: int, seed: int) -> np.ndarray:
    """``n`` training rows with ``feature`` set to ``value``."""
    rows = x[np.random.default_rng(seed).choice(len(x), n, replace=False)].copy()
    rows[:, FEATURE_NAMES.index(feature)] = value
    return rows


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))


def test_labels_raise_the_interesting_kind_above_the_uninteresting_one(data, base):
    """Two kinds of unusual alert, a long duration (interesting) and a bright peak (not): new alerts of each."""
    x, kind = data
    wanted, unwanted = (_unusual(x, "duration", 3000.0, 40, 1), _unusual(x, "peak_mag", 6.0, 40, 2))
    labelled = np.vstack([wanted[:20], unwanted[:20]])
    model = fit_feedback(base, x, kind, labelled, np.repeat([True, False], 20))
    before = _auc(base.raw_score(wanted[20:]), base.raw_score(unwanted[20:]))
    after = _auc(model.raw_score(wanted[20:]), model.raw_score(unwanted[20:]))
    assert after > before + 0.2 and after > 0.8
    assert model.version == "anomaly-t-feedback" and model.metadata["feedback"]["n_interesting"] == 20
    assert (model.weights() >= 0).all() and not np.allclose(model.weights(), base.weights())
    s = model.score(x)  # calibrated again on the training alerts: the score keeps its meaning
    assert 0.4 < np.median(s) < 0.6 and np.mean(s > 0.9) < 0.15


def test_a_strong_prior_keeps_the_base_weights_and_few_labels_move_them_little(data, base):
    x, kind = data
    rows = _unusual(x, "duration", 3000.0, 4, 3)
    strong = fit_feedback(base, x, kind, rows, np.ones(4, bool), FeedbackConfig(prior=1e6))
    assert np.allclose(strong.weights(), base.weights(), atol=1e-4)
    assert np.allclose(strong.score(x), base.score(x), atol=0.03)


def test_feedback_weights_persist_and_hostile_ones_are_refused(data, base, tmp_path):
    x, kind = data
    model = fit_feedback(base, x, kind, _unusual(x, "duration", 3000.0, 6, 4), np.array([1, 1, 1, 0, 0, 0], bool))
    loaded = AnomalyModel.load(model.save(tmp_path / "fb"))
    assert np.array_equal(loaded.score(x), model.score(x))
    for bad in (np.ones(3), -model.weights(), np.full_like(model.weights(), np.nan)):
        with pytest.raises(ModelError, match="feedback weights"):
            AnomalyModel(model.method, model.columns, model.center, model.scale, model.fill,
                         {**model.params, "fb_weights": bad}, model.class_knots, model.cdf_knots, "bad")


def test_unusable_labels_or_models_are_refused(data, base):
    x, kind = data
    with pytest.raises(ModelError, match="one interesting / not label"):
        fit_feedback(base, x, kind, x[:0], np.zeros(0, bool))
    with pytest.raises(ModelError, match="one interesting / not label"):
        fit_feedback(base, x, kind, x[:3], np.ones(2, bool))
    with pytest.raises(ModelError, match="per-class HBOS"):
        fit_feedback(base, x, np.full(len(x), "SN"), x[:3], np.ones(3, bool))  # not its training classes
    single = fit_anomaly(x, kind, AnomalyConfig(n_bins=12, n_cdf_knots=51, per_class=False))
    with pytest.raises(ModelError, match="per-class HBOS"):
        fit_feedback(single, x, kind, x[:3], np.ones(3, bool))


def test_all_labels_of_one_kind_and_hostile_rows_still_fit(data, base):
    x, kind = data
    rows = np.full((3, len(FEATURE_NAMES)), np.nan)
    rows[1], rows[2] = np.inf, -1e300
    for interesting in (np.ones(3, bool), np.zeros(3, bool)):
        model = fit_feedback(base, x, kind, rows, interesting)
        assert np.isfinite(model.weights()).all() and np.isfinite(model.score(x)).all()


def test_labels_are_read_from_the_archive_latest_label_first(tmp_path):
    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter

    records = []
    for i in range(4):
        rec = copy.deepcopy(sample(4))
        rec["alertId"], rec["candid"] = 100 + i, f"TEL-F1-r-0001/{i}"
        records.append(rec)
    records[3]["features"] = None  # scored before the features existed
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    commit(writer, archived(records))
    labels = [{"alert_id": "100", "label": "not"}, {"alert_id": "TEL-F1-r-0001/1", "label": "interesting"},
              {"alert_id": "100", "label": "interesting"},  # relabelled later: this one counts
              {"alert_id": "103", "label": "not"}, {"alert_id": "999", "label": "not"},
              {"alert_id": "x'); DROP TABLE alerts; --", "label": "not"}]
    rows, interesting, skipped = archived_labels(labels, Archive(tmp_path / "archive"))
    assert rows.shape == (2, len(FEATURE_NAMES)) and interesting.tolist() == [True, True]
    assert skipped == {"not_archived": 2, "no_features": 1, "malformed": 0}
    assert archived_labels([], Archive(tmp_path / "archive"))[0].shape == (0, len(FEATURE_NAMES))
