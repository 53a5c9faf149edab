"""Anomaly score of an alert from per-class density models of the ordinary light-curve classes.

The score answers "how unlike every ordinary alert is this one?", over the same inputs as the
light-curve classifier: the :data:`~broker.lightcurve.ALL_FEATURE_NAMES` row (light-curve features
up to the alert's time, then the context features). "Ordinary" is every class of
:data:`broker.lcclass.CLASS_NAMES`, bogus included (bogus is a known, ordinary class: the
real/bogus score is separate and is not an input), so fading supernovae, periodic variables,
AGN, flares, movers and recurring artefacts are not anomalous by construction.

Method (chosen by measurement against isolation forests over four independent simulations,
``bench/anomaly_methods.py`` and ``docs/lightcurve-report``): for each ordinary class, a
histogram-based outlier score (HBOS, Goldstein & Dengel 2012): the sum over features of
-log(histogram density of the class), with a penalty growing with the distance beyond the class's
range; from anomaly-v4 plus an attribute-wise conditional term (Paulheim & Meusel 2015, "ALSO"):
each feature that does not sit on one value for most of a class is predicted from the others by
a ridge regression on their quadratic basis (flags are predictors only), and
``w x sum_j log(1 + (residual_j / scale_j)^2)`` is added, so an unusual *combination* of
individually common values (a fast rise at an ordinary peak, a long duration with few
detections) counts, which the per-feature histograms cannot see. It is computed on the
:data:`ANOMALY_FEATURES` (the physical light-curve features and the context; the noisier
statistical moments only diluted the measured recovery of rare events), each robustly scaled and
compressed, ``asinh((x - median) / IQR)``. Each class's score is mapped to the empirical CDF of its
own training alerts; the raw anomaly is the *smallest* of these (an alert is as ordinary as the
class it resembles most); the score in [0, 1] is the empirical CDF of the raw anomaly over all
training alerts, so ``0.99`` means "more unusual than 99% of the ordinary training alerts" and 1
"beyond everything seen in training". ``method="iforest"`` (one isolation forest per class, as
Fink uses, evaluated by :mod:`broker.trees`) is kept for comparison.

Operators' "interesting / not" labels can re-weight the terms of each class's score (one
histogram and one conditional term per feature; :meth:`AnomalyModel.components`,
:mod:`broker.anomaly_feedback`).

From anomaly-v5 the scores do not depend on the CPU: bins and CDFs keep a tolerance
(:data:`EDGE_TOL`, :data:`CDF_TOL`), so inputs that differ in their last bits (vector maths of
other CPUs) fall in the same bin and read tied CDF knots at the middle of their run. Up to
anomaly-v4, values sitting on bin edges (features constant within a class, integer counts) made
a simulation's rare-event recovery differ by 10+ points between an AMD and an Intel CPU.

Undefined (NaN) inputs get a value one unit below the smallest scaled training value of their
feature (a bin of their own); +-inf are clipped to +-1e30 before scaling.

The model is stored without pickle: ``<version>.npz`` (histograms or forest arrays, scaling, CDF
knots, loaded with ``allow_pickle=False``) and ``<version>.json`` (version, feature names,
metadata), with a Markdown card. Loading and scoring need numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from broker import MODELS_DIR
from broker.errors import ModelError
from broker.lightcurve import ALL_FEATURE_NAMES
from broker.trees import BIG, Forest, export_forest, isolation_score, model_path, read_model, write_model

__all__ = ["ANOMALY_FEATURES", "DEFAULT_VERSION", "FEATURE_NAMES", "N_FEATURES", "AnomalyConfig",
           "AnomalyModel", "class_cdf", "fit_anomaly"]

#: Version loaded when none is given (``broker/models/anomaly-v5.*``).
DEFAULT_VERSION = "anomaly-v5"
#: Columns of the rows :meth:`AnomalyModel.score` takes (= ``broker.lightcurve.ALL_FEATURE_NAMES``).
FEATURE_NAMES: tuple[str, ...] = ALL_FEATURE_NAMES
N_FEATURES = len(FEATURE_NAMES)
#: Columns the default model scores on (measured best; see the module docstring).
ANOMALY_FEATURES: tuple[str, ...] = (
    "ndet", "nulim", "duration", "frac_negative", "peak_mag", "amplitude", "rise_rate",
    "decline_rate", "colour", "colour_rate", "host", "host_offset_norm", "nuclear", "on_star",
    "moving",
)


@dataclass(frozen=True)
class AnomalyConfig:
    """How the anomaly model is fitted.

    Attributes
    ----------
    method : str
        ``"hbos"`` (default, measured best) or ``"iforest"``.
    features : tuple of str
        Columns of :data:`FEATURE_NAMES` scored (default :data:`ANOMALY_FEATURES`).
    per_class : bool
        One density per ordinary class (default; the raw anomaly is the smallest per-class CDF)
        or one over all training alerts.
    n_bins : int
        HBOS histogram bins per feature (20: the measured optimum among 15-30).
    n_estimators, max_samples : int
        Isolation forests: trees per class (50) and alerts per tree (256, Liu et al.'s value).
    n_cdf_knots : int
        Quantile knots of each empirical CDF (1001: 0.1% steps).
    seed : int
        Random state (isolation forests).
    conditional_weight : float
        Weight w of the attribute-wise conditional term added to each class's HBOS score
        (:func:`_conditional_fit`; 0 = none, as up to anomaly-v3). 0.5: recovery of rare events
        levels off there while bogus alerts at the top keep growing with w, measured on
        validation streams of seeds 7000 / 10000 (``docs/notes/anomaly-experiments.md``).
    conditional_degree : int
        Degree of the polynomial the conditional term's regressions use (1 linear, 2 with every
        product of two features).
    conditional_ridge : float
        Ridge penalty of those regressions on the standardised basis, in units of the class's row
        count (1e-3: a light shrinkage of collinear columns).
    """

    method: str = "hbos"
    features: tuple[str, ...] = ANOMALY_FEATURES
    per_class: bool = True
    n_bins: int = 20
    n_estimators: int = 50
    max_samples: int = 256
    n_cdf_knots: int = 1001
    seed: int = 0
    conditional_weight: float = 0.5
    conditional_degree: int = 2
    conditional_ridge: float = 1e-3


#: Extra -log probability (nats) of a value just beyond a class's training range, over that of an
#: empty bin inside it; the penalty then grows as log1p(bins beyond).
BEYOND_PENALTY = 2.0


#: Raw-score tolerance of the empirical CDFs (nats). A raw score is read as the mean of the CDF
#: just below and just above it, so a score on a run of tied knots (training alerts with equal
#: scores) gets the middle of the run, whichever side of it last-bit differences put it.
CDF_TOL = 1e-9


def _cdf(raw: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Empirical CDF at ``raw`` from non-decreasing quantile knots (0 below, 1 above; ties: mid-run)."""
    q = np.linspace(0.0, 1.0, len(knots))
    return 0.5 * (np.interp(raw - CDF_TOL, knots, q, left=0.0, right=1.0)
                  + np.interp(raw + CDF_TOL, knots, q, left=0.0, right=1.0))


def class_cdf(raw: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """A class's CDF at raw scores, continued linearly beyond its last knot.

    Rows beyond every training alert of the class so keep their order.
    """
    span = max(float(knots[-1] - knots[0]), 1e-12)
    return _cdf(raw, knots) + np.maximum(raw - knots[-1], 0.0) / span


#: Tolerance of the histograms in scaled units (scaled features are of order 1). Each feature's
#: range is padded by it, and no interior edge lies within it of a training value: a value that
#: differs from a training value only in its last bits (other CPUs' vector maths) stays in that
#: value's bin instead of crossing into an empty one or beyond the range.
EDGE_TOL = 1e-6


def _edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """B+1 histogram edges of one feature's training values (B+1,).

    Equal widths over the range padded by :data:`EDGE_TOL`; an interior edge within the tolerance
    of a training value moves to the nearest admissible place: the middle of a gap of at least
    twice the tolerance between training values, or a range end (an empty bin).
    """
    u = np.unique(values)
    lo, hi = u[0] - EDGE_TOL, u[-1] + EDGE_TOL
    edges = lo + (hi - lo) * np.linspace(0.0, 1.0, n_bins + 1)
    edges[-1] = hi
    wide = np.diff(u) >= 2 * EDGE_TOL
    places = np.concatenate([[lo], 0.5 * (u[:-1] + u[1:])[wide], [hi]])
    p = np.clip(np.searchsorted(u, edges[1:-1]), 1, len(u) - 1)
    near = np.minimum(np.abs(edges[1:-1] - u[p - 1]), np.abs(u[p] - edges[1:-1])) < EDGE_TOL
    k = np.clip(np.searchsorted(places, edges[1:-1]), 1, len(places) - 1)
    nearest = np.where(edges[1:-1] - places[k - 1] <= places[k] - edges[1:-1], places[k - 1], places[k])
    edges[1:-1] = np.sort(np.where(near, nearest, edges[1:-1]))
    return edges


def _bins(z: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each scaled value (N,) per feature (N, J) given edges (J, B+1); ends are open."""
    return np.column_stack([np.searchsorted(edges[j, 1:-1], z[:, j], side="right")
                            for j in range(edges.shape[0])])


def _hbos_fit(z: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Histogram edges (J, B+1), log bin probabilities (J, B) and the out-of-range floor."""
    edges = np.array([_edges(z[:, j], n_bins) for j in range(z.shape[1])])
    n = len(z)
    counts = np.array([np.bincount(b, minlength=n_bins) for b in _bins(z, edges).T])
    logd = np.log((counts + 0.5) / (n + 0.5 * n_bins))  # Laplace-smoothed bin probability
    return edges, logd, float(np.log(0.5 / (n + 0.5 * n_bins)) - BEYOND_PENALTY)


#: Largest share of a class's rows at one value of a feature that the conditional term predicts.
MAX_MODE_SHARE = 0.5


def _mode_count(values: np.ndarray) -> int:
    """Most training values within :data:`EDGE_TOL` above one of them (the size of the largest tie)."""
    v = np.sort(values)
    return int((np.searchsorted(v, v + EDGE_TOL, side="right") - np.arange(len(v))).max())


def _basis(z: np.ndarray, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Polynomial basis of scaled rows and the features each column involves.

    Returns
    -------
    phi : (N, P) ndarray
        ``z`` (degree 1), then every product ``z_i z_k`` with i <= k (degree 2).
    involves : (P, J) bool ndarray
        Whether column p uses feature j.
    """
    nf = z.shape[1]
    eye = np.eye(nf, dtype=bool)
    if degree == 1:
        return z, eye
    i, k = np.triu_indices(nf)
    return np.column_stack([z, z[:, i] * z[:, k]]), np.vstack([eye, eye[i] | eye[k]])


def _conditional_fit(z: np.ndarray, degree: int, ridge: float) -> dict[str, np.ndarray]:
    """Prediction of each scaled feature from the others, within one class.

    The attribute-wise conditional term (Paulheim & Meusel 2015, "ALSO") scores unusual
    *combinations* of individually common values, which the per-feature histograms cannot: each
    feature ``z_j`` is regressed (ridge, penalty ``ridge`` x rows, on the standardised polynomial
    basis of :func:`_basis` without the columns that use j or vary by no more than
    :data:`EDGE_TOL`) on the other features; its residual scale is the normalised median absolute
    residual. Features with one value (to :data:`EDGE_TOL`) in more than :data:`MAX_MODE_SHARE`
    of the rows (flags, undefined values, a dominant count) are predictors only: their residual
    scale degenerates, and the rarity of their values is HBOS's to score.

    Returns
    -------
    dict
        ``mu``, ``sd`` (P,): standardisation of the basis; ``coef`` (J, P+1): each feature's
        coefficients (0 on the columns that use it) and intercept; ``scale`` (J,): robust residual
        scale, 0 for features that are not predicted (no term).
    """
    phi, involves = _basis(z, degree)
    mu, sd = phi.mean(axis=0), phi.std(axis=0)
    varies = sd > EDGE_TOL  # a near-constant column would only scale last-bit noise up
    sd = np.where(varies, sd, 1.0)
    a = (phi - mu) / sd
    n, nf = z.shape
    coef, scale = np.zeros((nf, a.shape[1] + 1)), np.zeros(nf)
    for j in range(nf):
        if _mode_count(z[:, j]) > MAX_MODE_SHARE * n:
            continue
        use = ~involves[:, j] & varies
        y = z[:, j] - z[:, j].mean()
        aj = a[:, use]
        coef[j, :-1][use] = np.linalg.solve(aj.T @ aj + ridge * n * np.eye(use.sum()), aj.T @ y)
        coef[j, -1] = z[:, j].mean()
        resid = z[:, j] - a @ coef[j, :-1] - coef[j, -1]
        scale[j] = 1.4826 * float(np.median(np.abs(resid))) + 1e-3
    return {"mu": mu, "sd": sd, "coef": coef, "scale": scale}


def _conditional_terms(z: np.ndarray, degree: int, cond: dict[str, np.ndarray]) -> np.ndarray:
    """Per feature, log(1 + (residual / scale)^2) (N, J); 0 for features with scale 0 (not predicted)."""
    a = (_basis(z, degree)[0] - cond["mu"]) / cond["sd"]
    resid = z - a @ cond["coef"][:, :-1].T - cond["coef"][:, -1]
    used = cond["scale"] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(used, np.log1p((resid / np.where(used, cond["scale"], 1.0)) ** 2), 0.0)


def _hbos_terms(z: np.ndarray, edges: np.ndarray, logd: np.ndarray, floor: float) -> np.ndarray:
    """Per feature, -log bin probability (N, J); beyond the range: -floor + log1p(mean bin widths away)."""
    lo, hi = edges[:, 0], edges[:, -1]
    width = (hi - lo) / logd.shape[1]
    away = (np.maximum(lo - z, 0.0) + np.maximum(z - hi, 0.0)) / width
    inside = np.take_along_axis(logd.T, _bins(z, edges), axis=0)
    return -np.where(away > 0, floor - np.log1p(away), inside)


class AnomalyModel:
    """A fitted anomaly model; see the module docstring.

    Attributes
    ----------
    method : str
        ``"hbos"`` or ``"iforest"``.
    columns : (J,) int ndarray
        Columns of the input rows that are scored.
    center, scale, fill : (J,) ndarray
        Scaling ``asinh((x - center) / scale)`` and the scaled value of NaN inputs.
    params : dict of ndarray
        HBOS: ``edges`` (K, J, B+1), ``logd`` (K, J, B), ``floor`` (K,) and, from anomaly-v4, the
        conditional term ``cond_mu``, ``cond_sd`` (K, P), ``cond_coef`` (K, J, P+1),
        ``cond_scale`` (K, J), ``cond_weight`` and ``cond_degree`` (); when re-weighted by
        operators' labels, ``fb_weights`` (2J,) (:meth:`weights`);
        iforest: ``f<k>_*`` forest arrays and ``max_samples`` (K,).
    class_knots : (K, Q) ndarray
        CDF knots of each class's raw score over its own training alerts.
    cdf_knots : (Q,) ndarray
        CDF knots of the combined raw anomaly over all training alerts.
    version : str
    metadata : dict
    """

    def __init__(self, method: str, columns: np.ndarray, center: np.ndarray, scale: np.ndarray,
                 fill: np.ndarray, params: dict[str, np.ndarray], class_knots: np.ndarray,
                 cdf_knots: np.ndarray, version: str, metadata: dict | None = None) -> None:
        self.method = method
        self.columns = np.asarray(columns, dtype=np.int64).reshape(-1)
        self.center, self.scale, self.fill = (np.asarray(a, dtype=np.float64).reshape(-1)
                                              for a in (center, scale, fill))
        self.params = dict(params)
        self.class_knots = np.atleast_2d(np.asarray(class_knots, dtype=np.float64))
        self.cdf_knots = np.asarray(cdf_knots, dtype=np.float64).reshape(-1)
        self.version = version
        self.metadata = dict(metadata or {})
        j, k = len(self.columns), len(self.class_knots)
        if method not in ("hbos", "iforest") or j == 0 or self.columns.min() < 0 or \
                self.columns.max() >= N_FEATURES or \
                any(len(a) != j for a in (self.center, self.scale, self.fill)):
            raise ModelError("inconsistent anomaly model arrays")
        if method == "hbos":
            e, lg = self.params["edges"], self.params["logd"]
            if e.shape[:2] != (k, j) or lg.shape != (k, j, e.shape[2] - 1) or \
                    self.params["floor"].shape != (k,):
                raise ModelError("inconsistent anomaly model histograms")
            if "cond_weight" in self.params:
                self._check_conditional(k, j)
            fb = self.params.get("fb_weights")
            if fb is not None and (fb.shape != (2 * j,) or not np.all(np.isfinite(fb)) or fb.min() < 0):
                raise ModelError("inconsistent anomaly model feedback weights")
            self._forests: list[Forest] = []
        else:
            self._forests = [Forest.from_arrays(self.params, f"f{i}_") for i in range(k)]
            if any(f.feature.max() >= j for f in self._forests):
                raise ModelError("anomaly model splits on an unknown feature")

    def _check_conditional(self, k: int, j: int) -> None:
        degree = int(self.params["cond_degree"])
        n_basis = j if degree == 1 else j + j * (j + 1) // 2
        shapes = {"mu": (k, n_basis), "sd": (k, n_basis), "coef": (k, j, n_basis + 1), "scale": (k, j)}
        if degree not in (1, 2) or any(self.params[f"cond_{name}"].shape != shape
                                       for name, shape in shapes.items()):
            raise ModelError("inconsistent anomaly model conditional term")

    @property
    def n_features(self) -> int:
        """F, the number of features expected by :meth:`score`."""
        return N_FEATURES

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        a = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if a.ndim != 2 or a.shape[1] != N_FEATURES:
            raise ModelError(f"anomaly model expects {N_FEATURES} features, got shape {a.shape}")
        with np.errstate(invalid="ignore", over="ignore"):
            z = np.arcsinh(np.clip((a[:, self.columns] - self.center) / self.scale, -BIG, BIG))
        return np.where(np.isnan(z), self.fill, z)

    def weights(self) -> np.ndarray:
        """Weight of each of the (2J,) terms of :meth:`components` in a class's HBOS score.

        1 for the histogram terms and the conditional weight for the conditional ones, unless
        operators' labels re-weighted them (``fb_weights``, :mod:`broker.anomaly_feedback`).
        """
        if "fb_weights" in self.params:
            return np.asarray(self.params["fb_weights"], dtype=np.float64)
        j = len(self.columns)
        return np.concatenate([np.ones(j), np.full(j, float(self.params.get("cond_weight", 0.0)))])

    def components(self, z: np.ndarray, k: int) -> np.ndarray:
        """The terms of class ``k``'s HBOS score of scaled rows ``z`` (N, 2J): histogram, then conditional.

        The conditional terms are 0 for a model without the term (up to anomaly-v3).
        """
        hist = _hbos_terms(z, self.params["edges"][k], self.params["logd"][k], float(self.params["floor"][k]))
        if "cond_degree" not in self.params:
            return np.hstack([hist, np.zeros_like(hist)])
        cond = {name: self.params[f"cond_{name}"][k] for name in ("mu", "sd", "coef", "scale")}
        return np.hstack([hist, _conditional_terms(z, int(self.params["cond_degree"]), cond)])

    def _class_scores(self, z: np.ndarray, k: int) -> np.ndarray:
        """Raw score of class ``k`` (higher = rarer)."""
        if self.method == "hbos":
            return self.components(z, k) @ self.weights()
        return -isolation_score(self._forests[k], z, int(self.params["max_samples"][k]))

    def raw_score(self, x: np.ndarray) -> np.ndarray:
        """Raw anomaly (N,): the smallest per-class CDF (higher = rarer).

        Beyond a class's training range the per-class value continues above 1 linearly in its
        score, so rows beyond everything seen keep their order.
        """
        z = self._prepare(x)
        per = np.empty((len(z), len(self.class_knots)))
        for k, knots in enumerate(self.class_knots):
            per[:, k] = class_cdf(self._class_scores(z, k), knots)
        return per.min(axis=1)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Anomaly scores in [0, 1].

        Parameters
        ----------
        x : (N, len(FEATURE_NAMES)) array (or one row)
            Rows of :func:`broker.lightcurve.model_inputs`; NaN allowed.

        Returns
        -------
        (N,) float64 ndarray
            Empirical CDF of the training alerts' raw anomaly at each row's raw anomaly
            (0 = most ordinary, 1 = beyond everything seen in training).

        Raises
        ------
        ModelError
            Rows of the wrong length.
        """
        return _cdf(self.raw_score(x), self.cdf_knots)

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``<path>.npz`` (arrays) and ``<path>.json`` (version, feature names, metadata)."""
        arrays = {"columns": self.columns, "center": self.center, "scale": self.scale, "fill": self.fill,
                  "class_knots": self.class_knots, "cdf_knots": self.cdf_knots, **self.params}
        return write_model(path, arrays, {**self.metadata, "version": self.version, "kind": "anomaly",
                                          "method": self.method, "feature_names": list(FEATURE_NAMES)})

    @classmethod
    def load(cls, path_or_version: str | Path | None = None) -> AnomalyModel:
        """Load by version name in :data:`broker.MODELS_DIR` or by path (default :data:`DEFAULT_VERSION`).

        Raises
        ------
        ModelError
            Missing or corrupt files, or a model fitted on other features (e.g. ``anomaly-v1``).
        """
        p = model_path(path_or_version, DEFAULT_VERSION, MODELS_DIR)
        arrays, meta = read_model(p, "anomaly model", {"feature_names": list(FEATURE_NAMES)})
        fixed = ("columns", "center", "scale", "fill", "class_knots", "cdf_knots")
        try:
            params = {k: v for k, v in arrays.items() if k not in fixed}
            return cls(str(meta["method"]), arrays["columns"], arrays["center"], arrays["scale"],
                       arrays["fill"], params, arrays["class_knots"], arrays["cdf_knots"],
                       str(meta.get("version", p.stem)), meta)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise ModelError(f"corrupt anomaly model {p}: {exc}") from exc


def _scaling(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, scale (IQR, else std, else 1) and scaled NaN value of each column."""
    a = np.where(np.isfinite(x), x, np.nan)
    center, scale, fill = (np.zeros(a.shape[1]), np.ones(a.shape[1]), np.full(a.shape[1], -1.0))
    for j in range(a.shape[1]):
        col = a[:, j][np.isfinite(a[:, j])]
        if len(col) == 0:
            continue
        q1, center[j], q3 = np.percentile(col, [25, 50, 75])
        sd = float(np.std(col))
        scale[j] = q3 - q1 if q3 - q1 > 1e-6 else (sd if sd > 1e-6 else 1.0)
        fill[j] = float(np.arcsinh((col.min() - center[j]) / scale[j])) - 1.0
    return center, scale, fill


def fit_anomaly(x: np.ndarray, labels: Sequence[str] | np.ndarray | None = None,
                config: AnomalyConfig = AnomalyConfig(), version: str = DEFAULT_VERSION,
                metadata: dict | None = None) -> AnomalyModel:
    """Fit the anomaly model to ordinary alerts (``iforest`` needs scikit-learn).

    Parameters
    ----------
    x : (N, len(FEATURE_NAMES)) array
        Rows of :func:`broker.lightcurve.model_inputs` of ordinary alerts (NaN allowed).
    labels : (N,) str, optional
        Class of each row; required when ``config.per_class``.
    config : AnomalyConfig
    version : str
    metadata : dict, optional
        Stored in the sidecar (data provenance).

    Raises
    ------
    ModelError
        Too few rows, unknown features or method, or per-class fitting without labels.
    """
    xa = np.asarray(x, dtype=np.float64)
    if xa.ndim != 2 or xa.shape[1] != N_FEATURES or len(xa) < 20:
        raise ModelError(f"too few or malformed training rows for the anomaly model: {xa.shape}")
    if config.per_class and (labels is None or len(labels) != len(xa)):
        raise ModelError("per-class anomaly model needs one label per training row")
    if set(config.features) - set(FEATURE_NAMES) or config.method not in ("hbos", "iforest"):
        raise ModelError(f"unknown anomaly features or method in {config}")
    cols = np.array([FEATURE_NAMES.index(f) for f in config.features])
    lab = np.asarray(labels).astype(str) if config.per_class else np.full(len(xa), "all")
    groups = sorted(set(lab.tolist()))
    center, scale, fill = _scaling(xa[:, cols])
    model = AnomalyModel(config.method, cols, center, scale, fill,
                         _fit_params(config, groups, lab, xa, cols, center, scale, fill),
                         np.zeros((len(groups), 2)), np.zeros(2), version)
    z = model._prepare(xa)
    q = np.linspace(0.0, 1.0, config.n_cdf_knots)
    model.class_knots = np.array([np.quantile(model._class_scores(z[lab == g], k), q)
                                  for k, g in enumerate(groups)])
    model.cdf_knots = np.quantile(model.raw_score(xa), q)
    model.metadata = {**(metadata or {}), "config": asdict(config),
                      "n_train": int(len(xa)), "groups": groups}
    return model


def _fit_params(config: AnomalyConfig, groups: list[str], lab: np.ndarray, x: np.ndarray,
                cols: np.ndarray, center: np.ndarray, scale: np.ndarray,
                fill: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class histograms or isolation forests on the scaled training rows."""
    with np.errstate(invalid="ignore", over="ignore"):
        z = np.arcsinh(np.clip((x[:, cols] - center) / scale, -BIG, BIG))
    z = np.where(np.isnan(z), fill, z)
    if config.method == "hbos":
        fits = [_hbos_fit(z[lab == g], config.n_bins) for g in groups]
        cond = [_conditional_fit(z[lab == g], config.conditional_degree, config.conditional_ridge)
                for g in groups]
        return {"edges": np.array([f[0] for f in fits]), "logd": np.array([f[1] for f in fits]),
                "floor": np.array([f[2] for f in fits]),
                **{f"cond_{name}": np.array([c[name] for c in cond]) for name in cond[0]},
                "cond_weight": np.array(config.conditional_weight),
                "cond_degree": np.array(config.conditional_degree)}
    from sklearn.ensemble import IsolationForest

    params: dict[str, np.ndarray] = {}
    sizes = []
    for k, g in enumerate(groups):
        zg = z[lab == g]
        iso = IsolationForest(n_estimators=config.n_estimators,
                              max_samples=min(config.max_samples, len(zg)),
                              random_state=config.seed + k).fit(zg)
        params.update(export_forest(iso).to_arrays(f"f{k}_"))
        sizes.append(int(iso.max_samples_))
    params["max_samples"] = np.array(sizes)
    return params
