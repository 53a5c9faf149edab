"""Light-curve classification of an alert: the ordinary class the object is most like.

A random forest (scikit-learn, exported to arrays, evaluated with numpy by :mod:`broker.trees`)
takes the :data:`~broker.lightcurve.ALL_FEATURE_NAMES` row of an alert (light-curve features up to
the alert's time and the context features) and gives a probability for each of
:data:`CLASS_NAMES`. Every classification is explained: for each class, the three features whose
path contributions (Saabas decomposition) moved its probability most, with their signed size.

Undefined (NaN) inputs are imputed by a rule fixed at training (:func:`broker.trees.missing_fill`):
the training minimum of the feature minus one inter-quartile range, i.e. "undefined" is a value
below every defined one, which one split of a tree can separate; +-inf become +-1e30.

The model is stored without pickle: ``<version>.npz`` (forest arrays, imputation values) and
``<version>.json`` (version, feature and class names, training metadata), with a Markdown card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker import MODELS_DIR
from broker.errors import ModelError
from broker.lightcurve import ALL_FEATURE_NAMES
from broker.trees import (
    Forest,
    contributions,
    export_forest,
    impute,
    missing_fill,
    model_path,
    predict_proba,
    read_model,
    write_model,
)

__all__ = ["CLASS_NAMES", "DEFAULT_VERSION", "Classification", "LCClassConfig",
           "LightCurveClassifier", "fit_lcclass", "object_weights"]

#: Classes of the light-curve classifier, in the order of its outputs (alert schema v3).
CLASS_NAMES: tuple[str, ...] = ("SN", "variable_star", "AGN", "nuclear_flare", "mover", "bogus")
#: Version loaded when none is given (``broker/models/lcclass-v2.*``).
DEFAULT_VERSION = "lcclass-v2"
#: Features named in the explanation of each class.
N_EXPLAIN = 3


@dataclass(frozen=True)
class Classification:
    """The classification of one alert (alert v3 ``classification``).

    Attributes
    ----------
    model : str
        Version of the classifier.
    label : str
        Most probable class.
    probabilities : dict
        Class name -> probability, one per :data:`CLASS_NAMES` entry (sum 1).
    explanation : tuple of (label, feature, contribution)
        For each class, the :data:`N_EXPLAIN` features with the largest |contribution| to its
        probability (signed, probability units), largest first.
    """

    model: str
    label: str
    probabilities: dict[str, float]
    explanation: tuple[tuple[str, str, float], ...]

    def to_record(self) -> dict[str, Any]:
        """The Avro record (alert v3 ``classification``)."""
        return {"model": self.model, "label": self.label,
                "probabilities": {k: float(self.probabilities[k]) for k in CLASS_NAMES},
                "explanation": [{"label": lab, "feature": f, "contribution": float(c)}
                                for lab, f, c in self.explanation]}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Classification:
        """Inverse of :meth:`to_record`."""
        return cls(model=str(record["model"]), label=str(record["label"]),
                   probabilities={k: float(v) for k, v in dict(record["probabilities"]).items()},
                   explanation=tuple((str(e["label"]), str(e["feature"]), float(e["contribution"]))
                                     for e in record["explanation"]))


@dataclass(frozen=True)
class LCClassConfig:
    """How the classifier is fitted.

    Attributes
    ----------
    n_estimators : int
        Trees. 60: probabilities stable to ~0.02 on held-out simulations; file ~1 MB.
    max_depth : int
        Depth limit (12): bounds the model size and the evaluation time (one numpy step per level).
    min_samples_leaf : int
        Alerts per leaf (5): smooths probabilities.
    max_samples : float
        Fraction of the training alerts drawn for each tree (0.5: faster, less correlated trees).
    weighting : str
        ``"object"``: every training object weighs 1 in total, shared by its alerts, and the
        classes are balanced by their objects, so each alert's class prior is that of the objects
        that show such a light curve (default since ``lcclass-v2``). ``"alert"``: classes
        balanced by their alerts (``lcclass-v1``), which gives a one-alert class (movers) the
        weight of a long-lived one's many alerts: every single detection looked like a mover.
    seed : int
        Random state.
    """

    n_estimators: int = 60
    max_depth: int = 12
    min_samples_leaf: int = 5
    max_samples: float = 0.5
    weighting: str = "object"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weighting not in ("object", "alert"):
            raise ModelError(f"LCClassConfig.weighting must be 'object' or 'alert', got {self.weighting!r}")


class LightCurveClassifier:
    """A fitted light-curve classifier; see the module docstring.

    Attributes
    ----------
    forest : Forest
    fill : (F,) ndarray
        Imputation values of NaN inputs.
    version : str
    metadata : dict
    """

    def __init__(self, forest: Forest, fill: np.ndarray, version: str,
                 metadata: dict | None = None) -> None:
        if forest.value.shape[1] != len(CLASS_NAMES) or len(fill) != len(ALL_FEATURE_NAMES):
            raise ModelError("light-curve classifier arrays do not match the classes/features")
        if forest.feature.max() >= len(ALL_FEATURE_NAMES):
            raise ModelError("light-curve classifier splits on an unknown feature")
        self.forest = forest
        self.fill = np.asarray(fill, dtype=np.float64)
        self.version = version
        self.metadata = dict(metadata or {})

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, (N, len(CLASS_NAMES)), of rows ``x`` (N, len(ALL_FEATURE_NAMES))."""
        return predict_proba(self.forest, impute(x, self.fill))

    def classify(self, x: np.ndarray) -> list[Classification]:
        """Classify and explain rows of :func:`broker.lightcurve.model_inputs`.

        Parameters
        ----------
        x : (N, len(ALL_FEATURE_NAMES)) array (or one row)
            NaN allowed (imputed, see the module docstring).

        Returns
        -------
        list of Classification, one per row.

        Raises
        ------
        ValueError
            Rows of the wrong length.
        """
        bias, contrib = contributions(self.forest, impute(x, self.fill))
        proba = bias + contrib.sum(axis=1)
        out = []
        for p, c in zip(proba, contrib, strict=True):
            expl = []
            for k, name in enumerate(CLASS_NAMES):
                top = np.argsort(-np.abs(c[:, k]), kind="stable")[:N_EXPLAIN]
                expl += [(name, ALL_FEATURE_NAMES[j], round(float(c[j, k]), 6)) for j in top]
            out.append(Classification(self.version, CLASS_NAMES[int(np.argmax(p))],
                                      {n: float(v) for n, v in zip(CLASS_NAMES, p, strict=True)},
                                      tuple(expl)))
        return out

    def feature_importance(self, x: np.ndarray) -> np.ndarray:
        """Mean |contribution| of each feature to each class over rows ``x``: (F, C)."""
        _, contrib = contributions(self.forest, impute(x, self.fill))
        return np.abs(contrib).mean(axis=0)

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``<path>.npz`` (arrays) and ``<path>.json`` (version, names, metadata)."""
        return write_model(path, {"fill": self.fill, **self.forest.to_arrays("rf_")},
                           {**self.metadata, "version": self.version, "kind": "lcclass",
                            "feature_names": list(ALL_FEATURE_NAMES), "class_names": list(CLASS_NAMES)})

    @classmethod
    def load(cls, path_or_version: str | Path | None = None) -> LightCurveClassifier:
        """Load by version name in :data:`broker.MODELS_DIR` or by path (default :data:`DEFAULT_VERSION`).

        Raises
        ------
        ModelError
            Missing or corrupt files, or a model of other features or classes.
        """
        p = model_path(path_or_version, DEFAULT_VERSION, MODELS_DIR)
        arrays, meta = read_model(p, "light-curve classifier", {
            "feature_names": list(ALL_FEATURE_NAMES), "class_names": list(CLASS_NAMES)})
        try:
            forest = Forest.from_arrays(arrays, "rf_")
            fill = arrays["fill"]
        except (KeyError, ValueError) as exc:
            raise ModelError(f"corrupt light-curve classifier {p}: {exc}") from exc
        return cls(forest, fill, str(meta.get("version", p.stem)), meta)


def fit_lcclass(x: np.ndarray, labels: Sequence[str] | np.ndarray,
                config: LCClassConfig = LCClassConfig(), version: str = DEFAULT_VERSION,
                metadata: dict | None = None,
                objects: Sequence[str] | np.ndarray | None = None) -> LightCurveClassifier:
    """Fit the classifier (needs scikit-learn, the ``[train]`` extra).

    Parameters
    ----------
    x : (N, len(ALL_FEATURE_NAMES)) array
        Rows of :func:`broker.lightcurve.model_inputs` (NaN allowed).
    labels : (N,) str
        Class names from :data:`CLASS_NAMES`; every class must be present.
    config : LCClassConfig
    version : str
    metadata : dict, optional
        Stored in the sidecar (data provenance).
    objects : (N,) str, optional
        The object of each alert; needed by ``config.weighting == "object"``.

    Raises
    ------
    ModelError
        Too few rows, unknown labels, a class without examples, or object weighting without
        ``objects``.
    """
    from sklearn.ensemble import RandomForestClassifier

    xa = np.asarray(x, dtype=np.float64)
    lab = np.asarray(labels).astype(str)
    if xa.ndim != 2 or xa.shape[1] != len(ALL_FEATURE_NAMES) or len(xa) != len(lab):
        raise ModelError(f"bad training set shapes: x {xa.shape}, labels {lab.shape}")
    missing = set(CLASS_NAMES) - set(lab.tolist())
    if missing or set(lab.tolist()) - set(CLASS_NAMES):
        raise ModelError(f"training labels must cover exactly {CLASS_NAMES}; missing {missing}")
    y = np.array([CLASS_NAMES.index(v) for v in lab])
    fill = missing_fill(xa)
    weights = None
    if config.weighting == "object":
        if objects is None or len(objects) != len(y):
            raise ModelError("object weighting needs the object of every training alert")
        weights = object_weights(np.asarray(objects).astype(str), y)
    rf = RandomForestClassifier(n_estimators=config.n_estimators, max_depth=config.max_depth,
                                min_samples_leaf=config.min_samples_leaf,
                                max_samples=config.max_samples,
                                class_weight="balanced" if weights is None else None,
                                random_state=config.seed, n_jobs=1)
    rf.fit(impute(xa, fill), y, sample_weight=weights)
    meta = {**(metadata or {}), "config": asdict(config), "n_train": int(len(xa)),
            "train_class_counts": {c: int(np.sum(y == i)) for i, c in enumerate(CLASS_NAMES)}}
    return LightCurveClassifier(export_forest(rf), fill, version, meta)


def object_weights(objects: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample weights: each object 1 in total over its alerts, each class the same total.

    Parameters
    ----------
    objects : (N,) str
        The object of each alert.
    y : (N,) int
        The class index of each alert.

    Returns
    -------
    (N,) float64, summing to N: ``1 / (alerts of the object * objects of its class)``, scaled.
    """
    _, inv, per_object = np.unique(objects, return_inverse=True, return_counts=True)
    w = 1.0 / per_object[inv]
    class_objects = np.bincount(y, weights=w)  # objects per class (each object sums to 1)
    w = w / class_objects[y]
    return w * (len(w) / w.sum())
