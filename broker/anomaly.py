"""Anomaly score of a candidate from a fitted density model of ordinary detections.

The score answers "how unusual is this detection, given what ordinary real detections look like?"
A Gaussian mixture is fitted to standardised candidate + light-curve features of simulated ordinary
detections (transients and variables that the pipeline found and that matched the injection truth).
The raw score of a detection is its negative log-likelihood under the mixture; it is mapped to
[0, 1] by the empirical CDF of the training scores, so ``anomaly = 0.99`` means "less likely than
99% of the ordinary training detections".

The model is persisted without pickle: the mixture parameters, the feature scaling and the CDF
knots in a ``.npz`` (loaded with ``allow_pickle=False``) plus a JSON sidecar with the version and
metadata. The likelihood is evaluated here with numpy, so loading does not depend on the
scikit-learn version that fitted it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from broker import MODELS_DIR
from broker.candidate import Candidate
from broker.errors import ModelError

__all__ = [
    "DEFAULT_VERSION",
    "FEATURE_NAMES",
    "N_FEATURES",
    "AnomalyConfig",
    "AnomalyModel",
    "features_from",
    "fit_anomaly",
]

#: Version loaded when none is given (``broker/models/anomaly-v1.npz`` and its card).
DEFAULT_VERSION = "anomaly-v1"

#: Names of the columns of :func:`features_from`, in order.
FEATURE_NAMES: tuple[str, ...] = (
    "log_abs_snr",      # log10 |snr|
    "sign",             # +1 brightened, -1 faded (w.r.t. the reference)
    "log_abs_flux",     # log10(1 + |flux| / ADU)
    "log_fwhm",         # log10 fwhm / px of the difference footprint
    "log_elongation",   # log10 elongation (>= 0)
    "dipole",           # [0, 1]
    "log_ref_dist",     # log10(0.1 + min(ref_dist, 30)) / arcsec; 30" = "no reference source"
    "log_n_prev",       # log10(1 + number of previous detections)
    "log_age",          # log10(1 + days since first detection)
    "rate",             # mag / day since the previous detection, asinh-compressed
    "n_filters",        # distinct filters in the history
)
N_FEATURES = len(FEATURE_NAMES)

#: Cap of ref_dist (arcsec): beyond this "no reference source nearby" is all that matters.
_REF_DIST_CAP = 30.0


def features_from(
    candidate: Candidate, history: Sequence[dict], mjd: float | None = None
) -> np.ndarray:
    """Feature vector of one candidate and the light curve of its object.

    Parameters
    ----------
    candidate : Candidate
        The detection (its ``detection`` measurements are used).
    history : list of dict
        Previous detections of the same object, each with at least ``mjd`` (days), ``flux``
        (ADU), ``flux_err`` (ADU), ``snr`` and ``filter``; any order; may be empty.
    mjd : float, optional
        Time of this detection (MJD); pass it (the training set does). When absent, the latest
        history time stands in, i.e. the age and the rate are those of the history itself.

    Returns
    -------
    ndarray, shape (F,), float64
        Columns as :data:`FEATURE_NAMES`; always finite.
    """
    d = candidate.detection
    snr = float(d.snr) if np.isfinite(d.snr) else 0.0
    flux = float(d.flux) if np.isfinite(d.flux) else 0.0
    hist = sorted((h for h in history if np.isfinite(float(h.get("mjd", np.nan)))),
                  key=lambda h: float(h["mjd"]))
    t_now = mjd if mjd is not None else (float(hist[-1]["mjd"]) if hist else 0.0)
    age = max(t_now - float(hist[0]["mjd"]), 0.0) if hist else 0.0
    rate = 0.0
    # With mjd: this detection against the last one. Without: the last two of the history (the
    # current time is unknown, so the rate is the history's own).
    pair = ((flux, t_now), hist[-1]) if mjd is not None and hist else \
        (((float(hist[-1].get("flux", 0.0)), t_now), hist[-2]) if len(hist) >= 2 else None)
    if pair is not None:
        (f_cur, t_cur), prev = pair
        dt = max(t_cur - float(prev["mjd"]), 1e-3)  # same-night pairs: ~1.4 min floor
        f_prev = abs(float(prev.get("flux", 0.0)))
        if f_prev > 0 and abs(f_cur) > 0:
            rate = -2.5 * math.log10(abs(f_cur) / f_prev) / dt
    n_filters = len({str(h.get("filter", "")) for h in hist})
    ref_dist = float(d.ref_dist) if np.isfinite(d.ref_dist) else _REF_DIST_CAP
    x = np.array(
        [
            math.log10(max(abs(snr), 1e-3)),
            1.0 if flux >= 0 else -1.0,
            math.log10(1.0 + abs(flux)),
            math.log10(max(float(d.fwhm), 0.1)) if np.isfinite(d.fwhm) else 0.0,
            math.log10(max(float(d.elongation), 1.0)) if np.isfinite(d.elongation) else 0.0,
            float(np.clip(d.dipole, 0.0, 1.0)) if np.isfinite(d.dipole) else 0.0,
            math.log10(0.1 + min(max(ref_dist, 0.0), _REF_DIST_CAP)),
            math.log10(1.0 + len(hist)),
            math.log10(1.0 + age),
            math.asinh(rate),
            float(n_filters),
        ],
        dtype=np.float64,
    )
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


@dataclass(frozen=True)
class AnomalyConfig:
    """How the anomaly model is fitted.

    Attributes
    ----------
    n_components : int
        Gaussians in the mixture. Default 6: enough for the modes of the training set
        (brightening/fading x new/known objects x host/no host) without fitting noise.
    covariance_type : str
        Only ``"full"`` (the default) is supported by the numpy evaluator.
    reg_covar : float
        Added to the covariance diagonals (standardised units). Default 1e-3: keeps discrete
        features (sign, n_filters) from collapsing a component to zero variance.
    n_cdf_knots : int
        Quantile knots of the empirical CDF stored with the model. Default 201 (0.5% steps).
    seed : int
        Random state of the mixture fit (its initialisations). Default 0; ``main_train`` passes
        its own seed.
    """

    n_components: int = 6
    covariance_type: str = "full"
    reg_covar: float = 1e-3
    n_cdf_knots: int = 201
    seed: int = 0


class AnomalyModel:
    """A fitted anomaly model; see the module docstring.

    Attributes
    ----------
    version : str
    metadata : dict
    """

    def __init__(
        self,
        weights: np.ndarray,
        means: np.ndarray,
        prec_chol: np.ndarray,
        center: np.ndarray,
        scale: np.ndarray,
        cdf_knots: np.ndarray,
        version: str,
        metadata: dict | None = None,
    ) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)        # (K,)
        self.means = np.asarray(means, dtype=np.float64)            # (K, F)
        self.prec_chol = np.asarray(prec_chol, dtype=np.float64)    # (K, F, F)
        self.center = np.asarray(center, dtype=np.float64)          # (F,)
        self.scale = np.asarray(scale, dtype=np.float64)            # (F,)
        self.cdf_knots = np.asarray(cdf_knots, dtype=np.float64)    # (Q,) increasing raw scores
        self.version = version
        self.metadata = dict(metadata or {})
        k, f = self.means.shape
        if self.prec_chol.shape != (k, f, f) or self.weights.shape != (k,) or \
                self.center.shape != (f,) or self.scale.shape != (f,) or self.cdf_knots.ndim != 1:
            raise ModelError("inconsistent anomaly model arrays")

    @property
    def n_features(self) -> int:
        """F, the number of features expected by :meth:`score`."""
        return self.means.shape[1]

    def raw_score(self, features: np.ndarray) -> np.ndarray:
        """Negative log-likelihood under the mixture, shape (N,) (higher = rarer)."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != self.n_features:
            raise ModelError(f"anomaly model expects {self.n_features} features, got {x.shape[1]}")
        z = (np.nan_to_num(x) - self.center) / self.scale
        f = self.n_features
        logp = np.empty((len(z), len(self.weights)))
        for k in range(len(self.weights)):
            y = (z - self.means[k]) @ self.prec_chol[k]
            logdet = np.sum(np.log(np.diag(self.prec_chol[k])))
            logp[:, k] = (np.log(self.weights[k]) + logdet
                          - 0.5 * (f * np.log(2 * np.pi) + np.sum(y * y, axis=1)))
        m = logp.max(axis=1, keepdims=True)
        return -(m[:, 0] + np.log(np.exp(logp - m).sum(axis=1)))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Anomaly scores in [0, 1].

        Parameters
        ----------
        features : ndarray, shape (N, F) (or (F,))
            Rows of :func:`features_from`.

        Returns
        -------
        ndarray, shape (N,)
            Empirical CDF of the training raw scores at each raw score (0 = most ordinary,
            1 = beyond everything seen in training).
        """
        raw = self.raw_score(features)
        q = np.linspace(0.0, 1.0, len(self.cdf_knots))
        return np.interp(raw, self.cdf_knots, q, left=0.0, right=1.0)

    def score_candidates(
        self, candidates: Sequence[Candidate], mjd: float | None = None
    ) -> np.ndarray:
        """Score candidates from their ``history`` and set ``Candidate.anomaly``."""
        if not candidates:
            return np.zeros(0)
        feats = np.stack([features_from(c, c.history, mjd) for c in candidates])
        s = self.score(feats)
        for c, v in zip(candidates, s, strict=True):
            c.anomaly = float(v)
        return s

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``<path>.npz`` (arrays) and ``<path>.json`` (version + metadata)."""
        p = Path(path).with_suffix(".npz")
        p.parent.mkdir(parents=True, exist_ok=True)
        np.savez(p, weights=self.weights, means=self.means, prec_chol=self.prec_chol,
                 center=self.center, scale=self.scale, cdf_knots=self.cdf_knots)
        meta = {**self.metadata, "version": self.version, "feature_names": list(FEATURE_NAMES)}
        p.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return p

    @classmethod
    def load(cls, path: str | Path | None = None) -> AnomalyModel:
        """Load a model by version name in :data:`MODELS_DIR` or by path (default ``anomaly-v1``).

        Raises
        ------
        ModelError
            Missing or corrupt files.
        """
        p = Path(path) if path is not None else MODELS_DIR / DEFAULT_VERSION
        if p.suffix not in (".npz", ".json") and not p.exists():
            p = (p if p.parent != Path(".") else MODELS_DIR / p.name)
        p = p.with_suffix(".npz")
        if not p.is_file():
            raise ModelError(f"anomaly model not found: {p} (fit it with broker.anomaly.fit_anomaly)")
        try:
            meta = json.loads(p.with_suffix(".json").read_text())
            with np.load(p, allow_pickle=False) as a:
                arrays = {k: a[k] for k in
                          ("weights", "means", "prec_chol", "center", "scale", "cdf_knots")}
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"corrupt anomaly model {p}: {exc}") from exc
        if meta.get("feature_names") not in (None, list(FEATURE_NAMES)):
            raise ModelError(f"anomaly model {p} was fitted on other features: "
                             f"{meta.get('feature_names')}")
        return cls(**arrays, version=str(meta.get("version", p.stem)), metadata=meta)


def fit_anomaly(
    features: np.ndarray,
    config: AnomalyConfig = AnomalyConfig(),
    version: str = DEFAULT_VERSION,
    metadata: dict | None = None,
) -> AnomalyModel:
    """Fit the mixture to features of ordinary detections.

    Parameters
    ----------
    features : ndarray, shape (N, F)
        Rows of :func:`features_from` for ordinary (real, matched) detections; N >> F.
    config : AnomalyConfig
    version : str
    metadata : dict, optional
        Stored in the sidecar (data provenance).

    Returns
    -------
    AnomalyModel
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 5 * config.n_components:
        raise ModelError(f"too few training rows for the anomaly model: {x.shape}")
    center = np.median(x, axis=0)
    scale = np.std(x, axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)  # constant columns pass through unscaled
    z = (x - center) / scale
    gmm = GaussianMixture(n_components=config.n_components, covariance_type="full",
                          reg_covar=config.reg_covar, random_state=config.seed, n_init=2)
    gmm.fit(z)
    model = AnomalyModel(gmm.weights_, gmm.means_, gmm.precisions_cholesky_, center, scale,
                         np.zeros(2), version)
    raw = model.raw_score(x)
    model.cdf_knots = np.quantile(raw, np.linspace(0.0, 1.0, config.n_cdf_knots))
    model.metadata = {**(metadata or {}), "config": asdict(config), "n_train": int(len(x)),
                      "train_raw_score_median": float(np.median(raw))}
    return model
