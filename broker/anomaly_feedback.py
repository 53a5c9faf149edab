"""Active learning for the anomaly score: operators' "interesting / not" labels re-weight its terms.

The anomaly model (:mod:`broker.anomaly`) scores an alert, for each ordinary class, by a sum of
terms: one histogram term per feature and one conditional term per predicted feature
(:meth:`~broker.anomaly.AnomalyModel.components`), with fixed weights (1 and ``conditional_weight``).
Labels say which of the alerts shown at the top were worth a look. As in active anomaly
discovery (Das et al. 2016, "Incorporating expert feedback into active anomaly discovery", the
method of Fink's AAD module), the weights are refitted so that the labelled interesting alerts sit
above the top-``quantile`` score of their class and the others below it, and pulled back to the
base weights by a ridge penalty, so a few labels move the score a little and many move it more:

    minimise  mean_i log(1 + exp(-y_i (c_i - c_tau) . w / s))  +  prior / 2 |w - w0|^2,  w >= 0

with ``y_i`` = +1 (interesting) or -1 (not), ``c_i`` the terms of labelled alert i under the class
it resembles most, ``c_tau`` the terms of that class's training alert at the quantile, ``s`` the
spread of the class's training scores, the two labels weighted equally in the mean. The class
assignment and the quantile alert depend on ``w``: they are recomputed for a few rounds. The
re-weighted model is then calibrated again on the training alerts (class and overall CDFs), so a
score keeps its meaning ("more unusual than that fraction of the ordinary training alerts").

Only the weights change: a kind of unusual that nobody labelled keeps its base score terms, so
the score stays an anomaly score and does not become a classifier of the labelled kinds
(``bench/anomaly_feedback.py`` measures both the labelled kinds and a kind held out of the
labels). Pure numpy; ``broker train-anomaly --feedback`` is the command.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from broker.anomaly import N_FEATURES, AnomalyModel, class_cdf
from broker.context import alert_inputs
from broker.errors import ModelError

if TYPE_CHECKING:
    from broker.archive.reader import Archive

__all__ = ["FeedbackConfig", "archived_labels", "fit_feedback"]


@dataclass(frozen=True)
class FeedbackConfig:
    """How operators' labels re-weight the anomaly model.

    Attributes
    ----------
    quantile : float
        The class's score quantile the labelled alerts are pushed across (0.99: the top 1 %
        that the rare-event evaluation and the follow-up rules read).
    prior : float
        Strength of the pull back to the base weights (ridge penalty on the weight change, per
        unit of the label-weighted loss). 0.1, chosen among 0.1, 0.01 and 0.001 on validation
        streams (``bench.anomaly_feedback`` run 2, labelled on run 3's week; not the reported
        runs): the only value that raised the recovery at 50, 100 and 200 labels; smaller ones
        swing with each batch of labels (``docs/notes/anomaly-experiments.md``).
    rounds : int
        Rounds of class assignment and quantile alert recomputed with the current weights (3).
    steps : int
        Projected gradient steps per round (300), each of 1 / (the loss's largest curvature).
    """

    quantile: float = 0.99
    prior: float = 0.1
    rounds: int = 3
    steps: int = 300


def fit_feedback(model: AnomalyModel, x_train: np.ndarray, labels_train: np.ndarray, x_labelled: np.ndarray,
                 interesting: np.ndarray, config: FeedbackConfig = FeedbackConfig(),
                 version: str | None = None) -> AnomalyModel:
    """The model with its term weights refitted to operators' labels, calibrated again.

    Parameters
    ----------
    model : AnomalyModel
        A per-class HBOS model (:func:`broker.anomaly.fit_anomaly`).
    x_train : (N, len(FEATURE_NAMES)) array
        Its training rows, ``labels_train`` (N,) their classes (the groups of ``model``).
    x_labelled : (M, len(FEATURE_NAMES)) array
        Rows of the labelled alerts (:func:`broker.context.alert_inputs` of archived alerts).
    interesting : (M,) bool array
        True where the operator said "interesting".
    config : FeedbackConfig
    version : str, optional
        Version of the new model (default ``<model.version>-feedback``).

    Raises
    ------
    ModelError
        Not a per-class HBOS model, training rows that do not match its classes, or no labels.
    """
    groups = list(model.metadata.get("groups", []))
    lab = np.asarray(labels_train).astype(str)
    y = np.where(np.asarray(interesting, dtype=bool), 1.0, -1.0)
    if model.method != "hbos" or len(groups) != len(model.class_knots) or set(lab.tolist()) != set(groups):
        raise ModelError("operators' labels re-weight a per-class HBOS model fitted on the given training rows")
    if len(y) == 0 or len(y) != len(np.atleast_2d(x_labelled)):
        raise ModelError(f"need one interesting / not label per labelled row, got {len(y)}")
    z_train, z_lab = model._prepare(x_train), model._prepare(x_labelled)
    train = [model.components(z_train[lab == g], k) for k, g in enumerate(groups)]
    labelled = np.stack([model.components(z_lab, k) for k in range(len(groups))])  # (K, M, C)
    w0 = model.weights()
    w = w0.copy()
    for _ in range(config.rounds):
        g = _label_directions(train, labelled, w, config.quantile)
        w = _descend(g, y, w, w0, config)
    out = AnomalyModel(model.method, model.columns, model.center, model.scale, model.fill,
                       {**model.params, "fb_weights": w}, model.class_knots, model.cdf_knots,
                       version or f"{model.version}-feedback", model.metadata)
    _calibrate(out, z_train, lab, groups, np.asarray(x_train, dtype=np.float64))
    out.metadata = {**model.metadata, "feedback": {
        "base_version": model.version, "n_interesting": int((y > 0).sum()), "n_not": int((y < 0).sum()),
        "config": asdict(config)}}
    return out


def _label_directions(train: list[np.ndarray], labelled: np.ndarray, w: np.ndarray, quantile: float) -> np.ndarray:
    """(M, C): each labelled alert's terms minus its class's quantile alert's, over the class's score spread.

    Its class is the one it resembles most under weights ``w`` (the smallest class CDF).
    """
    scores = [t @ w for t in train]
    q = np.linspace(0.0, 1.0, 101)
    cdf = np.stack([class_cdf(labelled[k] @ w, np.quantile(s, q)) for k, s in enumerate(scores)])
    cls = np.argmin(cdf, axis=0)
    out = np.empty(labelled.shape[1:])
    for k, (t, s) in enumerate(zip(train, scores, strict=True)):
        at = np.argsort(s)[min(int(quantile * len(s)), len(s) - 1)]
        spread = max(float(np.subtract(*np.percentile(s, [90, 10]))), 1e-6)
        mine = cls == k
        out[mine] = (labelled[k, mine] - t[at]) / spread
    return out


def _descend(g: np.ndarray, y: np.ndarray, w: np.ndarray, w0: np.ndarray, config: FeedbackConfig) -> np.ndarray:
    """Projected gradient descent of the label-balanced logistic loss plus the ridge pull to ``w0``."""
    weight = np.where(y > 0, 0.5 / max((y > 0).sum(), 1), 0.5 / max((y < 0).sum(), 1))
    if (y > 0).all() or (y < 0).all():
        weight = np.full(len(y), 1.0 / len(y))
    step = 1.0 / (0.25 * float(weight @ (g**2).sum(axis=1)) + config.prior)
    for _ in range(config.steps):
        sigmoid = 0.5 * (1.0 - np.tanh(0.5 * y * (g @ w)))  # of minus the margin
        w = np.maximum(w - step * (-(weight * y * sigmoid) @ g + config.prior * (w - w0)), 0.0)
    return w


def _calibrate(model: AnomalyModel, z: np.ndarray, lab: np.ndarray, groups: list[str], x: np.ndarray) -> None:
    """Class and overall CDF knots of ``model`` on its training rows (as :func:`broker.anomaly.fit_anomaly`)."""
    q = np.linspace(0.0, 1.0, model.class_knots.shape[1])
    model.class_knots = np.array([np.quantile(model._class_scores(z[lab == g], k), q) for k, g in enumerate(groups)])
    model.cdf_knots = np.quantile(model.raw_score(x), np.linspace(0.0, 1.0, len(model.cdf_knots)))


def archived_labels(labels: Sequence[dict[str, Any]],
                    archive: Archive) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Model-input rows of the labelled alerts, read from the archive, and their labels.

    Parameters
    ----------
    labels : list of dict
        :meth:`broker.feedback.FeedbackStore.export` rows; ``alert_id`` is an ``alertId`` (digits)
        or a ``candid``. An alert labelled more than once counts with its latest label.
    archive : Archive
        Where the alerts are (:class:`broker.archive.reader.Archive`).

    Returns
    -------
    rows : (M, len(FEATURE_NAMES)) ndarray
    interesting : (M,) bool ndarray
    skipped : dict
        Labels not used, by reason: ``not_archived``, ``no_features`` (an alert from before the
        score stage or schema v3), ``malformed`` (its context record cannot be read).
    """
    from broker.archive.reader import _sql_str

    latest = {str(r["alert_id"]): r["label"] == "interesting" for r in labels}  # oldest first: the last wins
    ids = [int(a) for a in latest if a.isdigit() and int(a) < 2**63]
    candids = [a for a in latest if not a.isdigit()]
    clauses = ([f"alert_id IN ({', '.join(map(str, ids))})"] if ids else []) + \
        ([f"candid IN ({', '.join(_sql_str(c) for c in candids)})"] if candids else [])
    rows, interesting, found = [], [], set()
    skipped = {"not_archived": 0, "no_features": 0, "malformed": 0}
    if clauses:
        _, records = archive.select(" OR ".join(clauses))
        for _, rec in records:
            key = str(rec["alertId"]) if str(rec["alertId"]) in latest else str(rec["candid"])
            if key in found or key not in latest:
                continue
            found.add(key)
            if rec.get("features") is None:
                skipped["no_features"] += 1
                continue
            try:
                rows.append(alert_inputs(rec["features"], rec.get("context")))
            except (KeyError, TypeError, ValueError):
                skipped["malformed"] += 1
                continue
            interesting.append(latest[key])
    skipped["not_archived"] = len(latest) - len(found)
    return (np.array(rows) if rows else np.empty((0, N_FEATURES))), np.array(interesting, dtype=bool), skipped
