"""The light curve of an object at the time of one of its detections, and its features.

:func:`light_curve` builds a :class:`LightCurve` from what the score stage has for a detection (the
detection itself, the object's earlier detections and the forced photometry of earlier frames at
its position); :func:`lc_features` reduces it to the :data:`FEATURE_NAMES` vector that the alert
carries and the light-curve models (:mod:`broker.lcclass`, :mod:`broker.anomaly`) take, through
:func:`model_inputs`, together with the context features of :mod:`broker.context`.

Photometry convention
---------------------
Difference fluxes arrive in ADU of their own frame. Every point with a finite zero point ``magzp``
(mag of 1 ADU) is put on one common scale,

    f_uJy = flux_ADU * 10**(-0.4 * (magzp - 23.9)),

i.e. microjansky when the zero points are AB (23.9 = the AB magnitude of 1 uJy), so that points of
different frames, exposure times and telescopes combine. The light curve is *calibrated* when the
current detection has a zero point: then points without one are left out. When the current
detection has no zero point, the light curve stays in ADU and keeps only the points of the current
detection's telescope (rows with ``telescope`` None, which predate multi-telescope support, and
forced photometry, which has no telescope key, count as the same telescope); magnitudes are then
instrumental (zero point 0) and only differences of magnitudes (amplitude, rates) are defined:
``peak_mag`` and ``colour`` are NaN. Upper limits are the forced-photometry frames that are not
frames of a detection (as :func:`broker.alert.upper_limits`); their ``limiting_flux`` is the
5-sigma limit.

Hostile input never raises: points whose time or flux is not finite (inf, NaN, or a flux that
overflows on the common scale) are left out; an error that is not finite and positive is replaced
by the median valid error of the light curve (or 10% of |flux| when none is valid). Every feature
that is undefined for what is left (too few points, no second band, no zero point) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import light_curve as lcf  # type: ignore[import-untyped, unused-ignore]
import numpy as np

__all__ = [
    "ALL_FEATURE_NAMES",
    "CONTEXT_FEATURE_NAMES",
    "FEATURE_NAMES",
    "LightCurve",
    "band_order",
    "lc_features",
    "light_curve",
    "model_inputs",
]

#: Light-curve features of an alert, in order (alert schema v3; see docs in the issue-28 contract).
FEATURE_NAMES: tuple[str, ...] = (
    "ndet", "nulim", "nbands", "duration", "frac_negative", "peak_mag", "amplitude", "rise_rate",
    "decline_rate", "colour", "colour_rate", "beyond_1std", "skew", "kurtosis", "stetson_k",
    "eta_e", "linear_trend", "reduced_chi2", "excess_variance", "period", "period_power",
)
#: Context features (from :meth:`broker.context.Context.features`), in order.
CONTEXT_FEATURE_NAMES: tuple[str, ...] = ("host", "host_offset_norm", "nuclear", "on_star", "moving")
#: Columns of :func:`model_inputs`: what the light-curve models take.
ALL_FEATURE_NAMES: tuple[str, ...] = FEATURE_NAMES + CONTEXT_FEATURE_NAMES

#: AB magnitude of 1 uJy.
_UJY_ZP = 23.9
#: Detections of two bands closer than this (days) make a colour.
_COLOUR_PAIR_DAYS = 1.0
#: Upper limits older than this (days) before the first detection do not bound the rise rate.
_RISE_LIMIT_DAYS = 10.0
#: Shortest baseline of a rate (days): shorter pairs are dominated by noise (0.2 mag at 5 sigma).
_RATE_MIN_DAYS = 0.5
#: Strict time ordering for the light-curve package (days added to equal times).
_TIME_EPS = 1e-6
_KNOWN_BANDS = ("u", "g", "r", "i", "z", "y", "U", "B", "V", "R", "I", "J", "H", "K")

# The statistical features, computed by the `light-curve` package (as Fink does) on the main band.
_EXTRACTOR = lcf.Extractor(
    lcf.BeyondNStd(1), lcf.Skew(), lcf.Kurtosis(), lcf.StetsonK(), lcf.EtaE(),
    lcf.LinearTrend(), lcf.ReducedChi2(), lcf.ExcessVariance(),
    lcf.Periodogram(peaks=1, resolution=10.0, max_freq_factor=2.0),
)
# Positions of our features in the extractor output (it also returns trend errors we do not use).
_EXTRACTOR_COLUMNS = {
    "beyond_1std": "beyond_1_std", "skew": "skew", "kurtosis": "kurtosis", "stetson_k": "stetson_K",
    "eta_e": "eta_e", "linear_trend": "linear_trend", "reduced_chi2": "chi2",
    "excess_variance": "excess_variance", "period": "periodogram_period_0",
    "period_power": "periodogram_period_s_to_n_0",
}
_EXTRACTOR_INDEX = {k: list(_EXTRACTOR.names).index(v) for k, v in _EXTRACTOR_COLUMNS.items()}


@dataclass(frozen=True)
class LightCurve:
    """Photometry of one object up to one detection, time-ordered, on one flux scale.

    Attributes
    ----------
    mjd : (N,) float64 ndarray [MJD, days]
    band : (N,) str ndarray
        Filter names as given.
    flux : (N,) float64 ndarray [uJy when ``calibrated``, else ADU]
        Difference flux (detections) or forced difference flux (upper limits; NaN when unknown).
    flux_err : (N,) float64 ndarray [same unit]
        1-sigma error, finite and positive (see the module notes for the replacement rule).
    limit : (N,) float64 ndarray [same unit]
        5-sigma limiting flux of the frame (NaN when unknown).
    detected : (N,) bool ndarray
        True for detections, False for upper limits (frames that covered the position without
        a detection of the object).
    telescope : (N,) str ndarray
        Telescope name ("" when unknown).
    calibrated : bool
        True when the fluxes are on the common uJy-like scale (see the module notes).
    """

    mjd: np.ndarray
    band: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    limit: np.ndarray
    detected: np.ndarray
    telescope: np.ndarray
    calibrated: bool

    def __len__(self) -> int:
        return len(self.mjd)


def band_order(band: str) -> tuple[int, str]:
    """Sort key of a band name: by wavelength for known names, unknown names after, by name."""
    for i, b in enumerate(_KNOWN_BANDS):
        if band == b:
            return (i, band)
    low = band.lower()
    if low in _KNOWN_BANDS:  # case variants: "G" after "g" but in wavelength order
        return (_KNOWN_BANDS.index(low), band)
    return (len(_KNOWN_BANDS), band)


def _num(value: Any) -> float:
    """``value`` as a float, NaN when missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


#: Zero points (mag of 1 ADU) a light-curve point may have; others make it NaN (:func:`_scale`).
ZP_RANGE = (-100.0, 100.0)


def _scale(magzp: float, calibrated: bool) -> float:
    """Factor from ADU to the light curve's scale (NaN when the point cannot be put on it).

    A zero point outside what any detector gives (:data:`ZP_RANGE`; one written before the score
    stage checked them) is NaN too: below about -746 mag the factor overflowed a float.
    """
    if not calibrated:
        return 1.0
    if not (math.isfinite(magzp) and ZP_RANGE[0] <= magzp <= ZP_RANGE[1]):
        return math.nan
    return 10.0 ** (-0.4 * (magzp - _UJY_ZP))


def _frame_of(cand_id: Any) -> str:
    """Frame id of a candidate id ``<frame_id>/<index>`` (as :func:`broker.alert._frame_of`)."""
    s = str(cand_id)
    return s.rpartition("/")[0] or s


def _rows(current: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
          forced: Sequence[Mapping[str, Any]]) -> list[tuple[float, str, float, float, float, bool, str]]:
    """(mjd, band, flux, err, limit, detected, telescope) on the common scale, unfiltered."""
    calibrated = math.isfinite(_num(current.get("magzp")))
    tel_now = str(current.get("telescope") or "")
    rows = []
    detections = [*history, current]
    seen = {_frame_of(d.get("cand_id", "")) for d in detections}
    upper = [f for f in forced if str(f.get("frame_id", "")) not in seen]
    for d, det in [(d, True) for d in detections] + [(f, False) for f in upper]:
        tel = str(d.get("telescope") or tel_now)  # forced frames and old rows: this telescope
        if not calibrated and tel != tel_now:
            continue
        k = _scale(_num(d.get("magzp")), calibrated)
        with np.errstate(over="ignore", invalid="ignore"):
            vals = [_num(d.get(key)) * k for key in ("flux", "flux_err", "limiting_flux")]
        rows.append((_num(d.get("mjd")), str(d.get("filter", "")), vals[0], vals[1], vals[2],
                     det, tel))
    return rows


def light_curve(current: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = (),
                forced: Sequence[Mapping[str, Any]] = ()) -> LightCurve:
    """The light curve of an object at the time of ``current``.

    Parameters
    ----------
    current : dict
        This detection: ``cand_id, mjd, filter, flux, flux_err, magzp, limiting_flux, telescope``
        (fluxes in ADU of its frame; other keys ignored).
    history : list of dict
        The object's earlier detections, same keys (``telescope`` may be None); any order.
    forced : list of dict
        Forced photometry of earlier frames at the position (``frame_id, mjd, filter, flux,
        flux_err, magzp, limiting_flux``); frames that are not detection frames become upper
        limits.

    Returns
    -------
    LightCurve
        Time-ordered; may be empty when every point is unusable. See the module notes for the
        flux scale and the points left out.
    """
    rows = _rows(current, history, forced)
    calibrated = math.isfinite(_num(current.get("magzp")))
    ok = [r for r in rows if math.isfinite(r[0]) and (math.isfinite(r[2]) or not r[5])]
    ok.sort(key=lambda r: (r[0], not r[5]))
    mjd = np.array([r[0] for r in ok], dtype=np.float64)
    flux = np.array([r[2] for r in ok], dtype=np.float64)
    err = np.array([r[3] for r in ok], dtype=np.float64)
    det = np.array([r[5] for r in ok], dtype=bool)
    err = _repair_errors(err, flux)
    lim = np.array([r[4] for r in ok], dtype=np.float64)
    lim[~(np.isfinite(lim) & (lim > 0))] = np.nan
    return LightCurve(mjd=mjd, band=np.array([r[1] for r in ok], dtype=str), flux=flux,
                      flux_err=err, limit=lim, detected=det,
                      telescope=np.array([r[6] for r in ok], dtype=str), calibrated=calibrated)


def _repair_errors(err: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Errors with every non-finite or non-positive value replaced (see the module notes)."""
    good = np.isfinite(err) & (err > 0)
    if good.all():
        return err
    fill = float(np.median(err[good])) if good.any() else math.nan
    out = err.copy()
    bad = ~good
    if math.isfinite(fill):
        out[bad] = fill
    else:
        with np.errstate(invalid="ignore"):
            out[bad] = np.where(np.isfinite(flux[bad]) & (flux[bad] != 0), 0.1 * np.abs(flux[bad]), 1.0)
    return out


def _mag(flux: np.ndarray, zp: float) -> np.ndarray:
    """Magnitude of |flux| (NaN for zero flux)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.abs(flux)
        return np.where(a > 0, zp - 2.5 * np.log10(np.where(a > 0, a, 1.0)), np.nan)


def lc_features(lc: LightCurve) -> np.ndarray:
    """Features of a light curve, in the order of :data:`FEATURE_NAMES`.

    Parameters
    ----------
    lc : LightCurve

    Returns
    -------
    (len(FEATURE_NAMES),) float64 ndarray
        NaN where undefined: every feature but ``ndet``/``nulim`` without a detection; ``peak_mag``
        and ``colour*`` on an uncalibrated light curve; ``amplitude``, the rates and the statistics
        with fewer than 2 main-band detections (``period*``: fewer than 6); ``colour`` without two
        bands detected within 1 day, ``colour_rate`` without two such pairs of the same bands more
        than 0.5 day apart.

    Notes
    -----
    ``rise_rate`` is measured from the earliest main-band detection to the peak (brightest
    |flux|), ``decline_rate`` from the peak to the latest main-band detection, each over at least
    0.5 day (shorter baselines are noise-dominated near threshold). When no detection precedes the
    peak by 0.5 day and the peak is the first detection, ``rise_rate`` comes from the latest
    main-band upper limit fainter than the peak, 0.5-10 days before it (a lower bound).
    """
    out = dict.fromkeys(FEATURE_NAMES, math.nan)
    det = lc.detected
    out["ndet"], out["nulim"] = float(det.sum()), float((~det).sum())
    if not det.any():
        return np.array([out[k] for k in FEATURE_NAMES])
    t, b, f, e = lc.mjd[det], lc.band[det], lc.flux[det], lc.flux_err[det]
    zp = _UJY_ZP if lc.calibrated else 0.0
    m = _mag(f, zp)
    bands = sorted(set(b.tolist()), key=band_order)
    out["nbands"] = float(len(bands))
    out["duration"] = float(t.max() - t.min())
    out["frac_negative"] = float(np.mean(f < 0))
    if lc.calibrated and np.isfinite(m).any():
        out["peak_mag"] = float(np.nanmin(m))
    counts = {x: int(np.sum(b == x)) for x in bands}
    main = max(bands, key=lambda x: (counts[x], -band_order(x)[0]))
    sel = (b == main) & np.isfinite(m)
    ul = ~det & (lc.band == main) & np.isfinite(lc.limit)
    out.update(_shape_features(t[sel], m[sel], lc.mjd[ul], _mag(lc.limit[ul], zp)))
    if lc.calibrated:
        out.update(_colour_features(t, b, m))
    out.update(_stat_features(t[b == main], f[b == main], e[b == main]))
    return np.array([out[k] for k in FEATURE_NAMES], dtype=np.float64)


def _shape_features(t: np.ndarray, m: np.ndarray, t_lim: np.ndarray,
                    m_lim: np.ndarray) -> dict[str, float]:
    """Amplitude, rise_rate and decline_rate of the main band (mag, mag/day)."""
    out: dict[str, float] = {}
    if len(t) == 0:
        return out
    ip = int(np.argmin(m))
    tp, mp = t[ip], m[ip]
    if len(t) >= 2:
        out["amplitude"] = float(m.max() - mp)
    early = np.flatnonzero(t <= tp - _RATE_MIN_DAYS)
    if len(early):
        out["rise_rate"] = float((m[early[0]] - mp) / (tp - t[early[0]]))
    elif ip == 0:
        before = ((t_lim <= tp - _RATE_MIN_DAYS) & (t_lim >= t[0] - _RISE_LIMIT_DAYS)
                  & (m_lim > mp))
        if before.any():
            j = int(np.flatnonzero(before)[np.argmax(t_lim[before])])
            out["rise_rate"] = float((m_lim[j] - mp) / (tp - t_lim[j]))
    late = np.flatnonzero(t >= tp + _RATE_MIN_DAYS)
    if len(late):
        out["decline_rate"] = float((m[late[-1]] - mp) / (t[late[-1]] - tp))
    return out


def _colour_features(t: np.ndarray, b: np.ndarray, m: np.ndarray) -> dict[str, float]:
    """Colour (bluer - redder, mag) of the latest close pair and its rate (mag/day)."""
    ok = np.isfinite(m)
    t, b, m = t[ok], b[ok], m[ok]
    if len(t) < 2 or len(set(b.tolist())) < 2:
        return {}
    i, j = np.triu_indices(len(t), k=1)
    keep = (b[i] != b[j]) & (np.abs(t[i] - t[j]) <= _COLOUR_PAIR_DAYS)
    i, j = i[keep], j[keep]
    if len(i) == 0:
        return {}
    swap = np.array([band_order(x) > band_order(y) for x, y in zip(b[i], b[j], strict=True)])
    blue, red = np.where(swap, j, i), np.where(swap, i, j)
    tmid = 0.5 * (t[blue] + t[red])
    colour = m[blue] - m[red]
    last = int(np.argmax(tmid))
    out = {"colour": float(colour[last])}
    same = (b[blue] == b[blue[last]]) & (b[red] == b[red[last]])
    first = int(np.flatnonzero(same)[np.argmin(tmid[same])])
    dt = tmid[last] - tmid[first]
    if dt > 0.5:
        out["colour_rate"] = float((colour[last] - colour[first]) / dt)
    return out


def _stat_features(t: np.ndarray, f: np.ndarray, e: np.ndarray) -> dict[str, float]:
    """The `light-curve` statistics of the main band's flux normalised by its max |flux|."""
    if len(t) < 2:
        return {}
    norm = float(np.max(np.abs(f)))
    if not (math.isfinite(norm) and norm > 0):
        return {}
    i = np.arange(len(t)) * _TIME_EPS
    ts = np.maximum.accumulate(t - i) + i  # strictly increasing, as the package requires
    try:
        v = _EXTRACTOR(np.ascontiguousarray(ts), np.ascontiguousarray(f / norm),
                       np.ascontiguousarray(e / norm), fill_value=np.nan, sorted=True)
    except (ValueError, RuntimeError):  # the package refuses degenerate series
        return {}
    out = {k: float(v[idx]) for k, idx in _EXTRACTOR_INDEX.items()}
    if len(t) < 6:
        out["period"] = out["period_power"] = math.nan
    return {k: (x if math.isfinite(x) else math.nan) for k, x in out.items()}


def model_inputs(lc_feats: np.ndarray, context_features: Mapping[str, Any]) -> np.ndarray:
    """The row the light-curve models take: light-curve then context features.

    Parameters
    ----------
    lc_feats : (len(FEATURE_NAMES),) array
        Output of :func:`lc_features`.
    context_features : dict
        :data:`CONTEXT_FEATURE_NAMES` -> float (``Context.features()``); missing or non-numeric
        values become NaN, extra keys are ignored.

    Returns
    -------
    (len(ALL_FEATURE_NAMES),) float64 ndarray
    """
    x = np.asarray(lc_feats, dtype=np.float64).reshape(-1)
    if len(x) != len(FEATURE_NAMES):
        raise ValueError(f"expected {len(FEATURE_NAMES)} light-curve features, got {len(x)}")
    ctx = np.array([_num(context_features.get(k)) for k in CONTEXT_FEATURE_NAMES])
    return np.concatenate([x, ctx])
