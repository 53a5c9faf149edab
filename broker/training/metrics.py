"""Metrics of real/bogus scores against labels, and statistics of normalised triplets.

:func:`evaluate` (AUC, FNR / FPR at a threshold, per-kind errors), :func:`equal_error` (the
threshold where FNR = FPR), :func:`evaluate_simulated` (both, plus FNR by S/N and
:func:`by_sign` and, per reference state, :func:`by_subset`, for a held-out set),
:func:`by_lobe_ratio` (errors by a stamp's dipole lobes), :func:`by_reference_brightness`
(scores by the brightness of the reference source), :func:`domain_stats` (per-channel
statistics to compare our stamps with a survey's), :func:`_auc_se` (standard error of an AUC)
and :func:`paired_auc_difference` (two models' AUC difference on the same items, with a
bootstrap interval).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from broker.training.labels import lobe_snrs


# --- metrics --------------------------------------------------------------------------------------
def evaluate(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5,
             kinds: Sequence[str] | np.ndarray | None = None) -> dict:
    """Binary metrics of scores against labels (1 = real).

    Returns
    -------
    dict
        ``auc``; ``fnr``/``fpr`` at ``threshold`` (fraction of reals scored below / bogus scored
        at or above); ``accuracy``; ``n_real``, ``n_bogus``; and, with ``kinds``, the fraction
        misclassified per kind (``per_kind``).
    """
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    pred = s >= threshold
    n1, n0 = int(y.sum()), int((1 - y).sum())
    m: dict[str, Any] = {
        "auc": float(roc_auc_score(y, s)) if n1 and n0 else float("nan"),
        "fnr": float(np.mean(~pred[y == 1])) if n1 else float("nan"),
        "fpr": float(np.mean(pred[y == 0])) if n0 else float("nan"),
        "accuracy": float(np.mean(pred == (y == 1))),
        "threshold": threshold,
        "n_real": n1,
        "n_bogus": n0,
    }
    if kinds is not None:
        k = np.asarray(kinds)
        m["per_kind"] = {
            str(kk): {"n": int(np.sum(k == kk)),
                      "misclassified": float(np.mean(pred[k == kk] != (y[k == kk] == 1)))}
            for kk in sorted(set(k.tolist()))
        }
    return m


def equal_error(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold where FNR = FPR on these scores, and that rate.

    Returns
    -------
    threshold : float
        In [0, 1]; the midpoint of the ROC segment where FPR - FNR changes sign.
    rate : float
        (FNR + FPR) / 2 at that threshold.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(int)
    fpr, tpr, thr = roc_curve(y, scores)
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fnr - fpr)))
    t = float(np.clip(thr[i], 0.0, 1.0))
    s = np.asarray(scores)
    return t, float((np.mean(s[y == 1] < t) + np.mean(s[y == 0] >= t)) / 2)


def evaluate_simulated(scores: np.ndarray, labels: np.ndarray, kinds: np.ndarray,
                       snr: np.ndarray | None = None, threshold: float = 0.5,
                       reference: np.ndarray | None = None) -> dict:
    """Held-out metrics: :func:`evaluate` at ``threshold`` and at the equal-error threshold.

    Returns
    -------
    dict
        ``at_threshold`` and ``at_eer`` (:func:`evaluate`, with ``per_kind``), ``eer_threshold``,
        ``eer``; with ``snr``, ``fnr_by_snr`` (real candidates: FNR at ``threshold`` per S/N
        bin) and ``by_sign`` (:func:`by_sign`); with ``reference`` (each candidate's
        reference state, :data:`broker.training.settings.REFERENCE_STATES`),
        ``by_reference_state``: :func:`by_subset` per state, FNR / FPR at the overall
        equal-error threshold.
    """
    t_eer, eer = equal_error(scores, labels)
    out = {"at_threshold": evaluate(scores, labels, threshold, kinds),
           "eer_threshold": t_eer, "eer": eer,
           "at_eer": evaluate(scores, labels, t_eer, kinds)}
    if snr is not None:
        bins = [0, 6, 8, 10, 15, 25, 50, np.inf]
        real = np.asarray(labels) == 1
        out["fnr_by_snr"] = [
            {"snr_lo": lo, "snr_hi": hi, "n": int(m.sum()),
             "fnr": float(np.mean(scores[m] < threshold)) if m.any() else float("nan")}
            for lo, hi in zip(bins[:-1], bins[1:], strict=True)
            for m in [real & (snr >= lo) & (snr < hi)]
        ]
        out["by_sign"] = by_sign(scores, labels, snr)
    if reference is not None:
        ref = np.asarray(reference)
        out["by_reference_state"] = by_subset(
            scores, labels, {str(r): ref == r for r in sorted(set(ref.tolist()))}, t_eer)
    return out


def by_subset(scores: np.ndarray, labels: np.ndarray, masks: dict[str, np.ndarray],
              threshold: float | None = None) -> dict[str, dict]:
    """AUC and equal error rate within each subset, and its FNR / FPR at a common threshold.

    Returns
    -------
    dict
        Per name of ``masks``: ``n``, ``n_real``, ``n_bogus``, ``auc``, ``eer`` (NaN where a
        subset lacks one class) and, with ``threshold``, ``fnr`` / ``fpr`` at it.
    """
    from sklearn.metrics import roc_auc_score

    s, y = np.asarray(scores), np.asarray(labels).astype(int)
    out = {}
    for name, m in masks.items():
        n1, n0 = int(y[m].sum()), int((1 - y[m]).sum())
        both = n1 > 0 and n0 > 0
        out[name] = {"n": int(m.sum()), "n_real": n1, "n_bogus": n0,
                     "auc": float(roc_auc_score(y[m], s[m])) if both else float("nan"),
                     "eer": equal_error(s[m], y[m])[1] if both else float("nan")}
        if threshold is not None:
            out[name]["fnr"] = float(np.mean(s[m & (y == 1)] < threshold)) if n1 else float("nan")
            out[name]["fpr"] = float(np.mean(s[m & (y == 0)] >= threshold)) if n0 else float("nan")
    return out


def by_sign(scores: np.ndarray, labels: np.ndarray, snr: np.ndarray) -> dict[str, dict]:
    """:func:`by_subset` of brightenings (S/N > 0) and fadings (S/N < 0).

    A fading star and a badly subtracted one both leave a negative blob on a star, and the
    generator labels them by the truth (real / bogus) whatever the stamp shows; the split says
    how much of the overall error rate comes from that.
    """
    snr = np.asarray(snr)
    return by_subset(scores, labels, {"brightening": snr > 0, "fading": snr < 0})


#: Bin edges of a stamp's opposite / central lobe ratio for :func:`by_lobe_ratio`: the generator
#: calls a variable on a misaligned reference a dipole from 0.25 on (``variable_dipole_lobe``).
LOBE_RATIO_EDGES = (0.1, 0.25, 0.4)


def by_lobe_ratio(scores: np.ndarray, labels: np.ndarray, x: np.ndarray, threshold: float,
                  soft_knee: float = 5.0, edges: Sequence[float] = LOBE_RATIO_EDGES) -> list[dict]:
    """Errors at ``threshold`` by the opposite / central lobe ratio of the difference stamp.

    On a misaligned reference the generator labels by the image: a star's residual with an
    opposite lobe is a dipole (bogus), a variable's change is real unless its opposite lobe
    reaches 0.25 of its central one (and 4 sigma). Near that boundary the same stamp carries
    either label; this table says how many of the errors sit there.

    Parameters
    ----------
    scores, labels : ndarray, shape (N,)
    x : ndarray, shape (N, 3, 63, 63)
        Normalised triplets; the difference channel is turned back into robust sigmas
        (``k sinh(v / k)``, exact below the clip) for
        :func:`broker.training.labels.lobe_snrs`, whose S/N is scale-free.
    threshold : float
    soft_knee : float
        The normaliser's ``k`` (:class:`broker.normalise.NormaliseConfig`).
    edges : sequence of float
        Inner bin edges of the ratio.

    Returns
    -------
    list of dict
        Per bin: ``lo``, ``hi``, ``n_real``, ``n_bogus``, ``err_real`` (reals scored below the
        threshold), ``err_bogus`` (bogus at or above).
    """
    s, y = np.asarray(scores), np.asarray(labels).astype(int)
    z = soft_knee * np.sinh(np.asarray(x[:, 2], np.float64) / soft_knee)
    lobes = np.array([lobe_snrs(d) for d in z]).reshape(-1, 2)
    ratio = lobes[:, 1] / np.maximum(lobes[:, 0], 1e-12)
    bounds = [0.0, *edges, np.inf]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        m = (ratio >= lo) & (ratio < hi)
        r, b = m & (y == 1), m & (y == 0)
        out.append({"lo": float(lo), "hi": float(hi), "n_real": int(r.sum()),
                    "n_bogus": int(b.sum()), "err_real": int(np.sum(s[r] < threshold)),
                    "err_bogus": int(np.sum(s[b] >= threshold))})
    return out


#: Bin edges (normalised units) of the reference channel's central 5x5 px mean, for
#: :func:`by_reference_brightness`. Below 2: hostless; 20 is ~150 robust sigmas per pixel
#: (``5 asinh(z / 5)``), where 39 % of ZTF's drb > 0.5 alerts sat and 1-11 % of our simulated
#: variables (``docs/notes/realbogus-experiments.md``, reals on bright reference sources).
REFERENCE_BRIGHTNESS_EDGES = (2.0, 14.0, 20.0, 25.0)


def _centre_mean(channel: np.ndarray) -> np.ndarray:
    """Mean of the central 5x5 px of each stamp: (N, 63, 63) -> (N,) float32."""
    return np.asarray(channel[:, 29:34, 29:34], dtype=np.float32).mean(axis=(1, 2))


def by_reference_brightness(scores: np.ndarray, labels: np.ndarray, x: np.ndarray,
                            threshold: float = 0.5,
                            edges: Sequence[float] = REFERENCE_BRIGHTNESS_EDGES) -> list[dict]:
    """Scores by the brightness of the reference source under the candidate.

    Real alerts of a survey mostly sit on a reference source (variable stars, nuclear
    transients), and so do subtraction residuals: a training set whose reals and bogus are
    spread differently over this axis than the survey's teaches the wrong prior there.

    Parameters
    ----------
    scores : ndarray, shape (N,)
    labels : ndarray, shape (N,)
        1 real, 0 bogus (for ZTF: its score > 0.5).
    x : ndarray, shape (N, 3, 63, 63)
        Normalised triplets (:func:`broker.normalise.normalise_triplet`).
    threshold : float
    edges : sequence of float
        Inner bin edges of the reference channel's central 5x5 px mean, normalised units.

    Returns
    -------
    list of dict
        Per bin: ``lo``, ``hi``, ``n_real``, ``n_bogus``, ``pass_real`` and ``pass_bogus`` (the
        fraction scored >= ``threshold``; NaN when empty) and ``auc`` (NaN with one class).
    """
    from sklearn.metrics import roc_auc_score

    s, y = np.asarray(scores), np.asarray(labels).astype(int)
    ref = _centre_mean(x[:, 1])
    bounds = [-np.inf, *edges, np.inf]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        m = (ref >= lo) & (ref < hi)
        r, b = m & (y == 1), m & (y == 0)
        out.append({"lo": float(lo), "hi": float(hi),
                    "n_real": int(r.sum()), "n_bogus": int(b.sum()),
                    "pass_real": float(np.mean(s[r] >= threshold)) if r.any() else float("nan"),
                    "pass_bogus": float(np.mean(s[b] >= threshold)) if b.any() else float("nan"),
                    "auc": float(roc_auc_score(y[m], s[m])) if r.any() and b.any()
                    else float("nan")})
    return out


def domain_stats(x: np.ndarray) -> dict[str, dict[str, float]]:
    """Per-channel statistics of normalised triplets, to compare our stamps with a survey's.

    Parameters
    ----------
    x : ndarray, shape (N, 3, 63, 63)

    Returns
    -------
    dict
        Per channel: ``centre`` (median over triplets of the mean of the central 5x5 px),
        ``frac_gt3`` (mean fraction of pixels above 3, i.e. covered by sources),
        ``frac_zero`` (mean fraction exactly 0: NaN-filled or padded), ``p99`` (median 99th
        percentile), all in normalised units (robust sigmas, asinh-compressed).
    """
    out = {}
    for i, name in enumerate(("science", "reference", "difference")):
        c = np.asarray(x[:, i], dtype=np.float32)
        out[name] = {
            "centre": float(np.median(_centre_mean(c))),
            "frac_gt3": float(np.mean(c > 3)),
            "frac_zero": float(np.mean(c == 0)),
            "p99": float(np.median(np.percentile(c.reshape(len(c), -1), 99, axis=1))),
        }
    return out


def _auc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC with these class sizes."""
    if not (np.isfinite(auc) and n_pos and n_neg):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    v = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc ** 2) + (n_neg - 1) * (q2 - auc ** 2))
    return float(np.sqrt(max(v, 0.0) / (n_pos * n_neg)))


def paired_auc_difference(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                          n_boot: int = 2000, seed: int = 0, level: float = 0.95
                          ) -> dict[str, float]:
    """AUC of ``scores_a`` minus AUC of ``scores_b`` on the same items, with a paired bootstrap interval.

    Both models are scored on each resample of the items, so what they share (the same hard
    items) cancels: the interval is much narrower than one from the two AUCs' own standard
    errors. Positives and negatives are resampled separately (stratified), so that every
    resample has the observed class sizes.

    Parameters
    ----------
    labels : ndarray, shape (N,)
        1 / True = positive.
    scores_a, scores_b : ndarray, shape (N,)
    n_boot : int
        Resamples (2000: ~0.7 s for 759 items; the usual count for a 95 % percentile interval).
    seed : int
    level : float
        Central coverage of the interval.

    Returns
    -------
    dict
        ``delta`` (on the data as given), ``lo``, ``hi`` (percentile interval); NaN without both
        classes.
    """
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if not len(pos) or not len(neg):
        return {"delta": float("nan"), "lo": float("nan"), "hi": float("nan")}
    sa, sb = np.asarray(scores_a, float), np.asarray(scores_b, float)

    def auc_diff(idx_pos: np.ndarray, idx_neg: np.ndarray) -> float:
        idx = np.concatenate([idx_pos, idx_neg])
        n1, n0 = len(idx_pos), len(idx_neg)
        # Mann-Whitney: AUC = (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0)
        return float(sum(sign * (rankdata(s[idx])[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
                         for sign, s in ((1, sa), (-1, sb))))

    rng = np.random.default_rng(seed)
    boot = [auc_diff(rng.choice(pos, len(pos)), rng.choice(neg, len(neg)))
            for _ in range(n_boot)]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"delta": auc_diff(pos, neg), "lo": float(lo), "hi": float(hi)}
