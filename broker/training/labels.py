"""Labelling rules: a candidate's label from the injection truth and the frame's stress.

:func:`label_candidates` labels candidates by the nearest injection within a radius (real kinds
win over artifacts; an unmatched one is ``edge``, a residual of a reference source or ``noise``);
:func:`relative_to_reference` makes a variable's change relative to the reference epochs first.
:func:`stress_label` then applies the conventions of :class:`TrainingSetConfig` for what the
stress mix did to the frame (:class:`FrameStress`): a variable swamped by its star's dipole
(:func:`swamped_label`), a real source whose stamp shows a dipole (:func:`lobe_snrs`), one
under a satellite trail (:func:`trail_label`), a dipole whose stamp lacks its second lobe
(:func:`dipole_unseen`) and residuals of saturated stars. Label -1 marks a candidate that is
counted but not written (ambiguous by a convention). :class:`LabelledCandidate` is what the
generator yields and the shard writer stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker.candidate import Candidate
from broker.training.settings import REAL_KINDS, TrainingSetConfig
from broker.training.stress import ShiftAt, residual_flux, trail_flux


@dataclass
class LabelledCandidate:
    """One candidate with its label (1 real / 0 bogus) and its type."""

    triplet: np.ndarray          # (3, 63, 63) float16/float32, normalised
    label: int                   # -1: ambiguous, counted but not written
    kind: str                    # injection kind, residual/dipole/psf_mismatch/edge/noise if none
    group: str                   # field: the validation split is made by field
    snr: float
    reference: str = "unknown"   # state of the frame's reference, REFERENCE_STATES


def label_candidates(
    candidates: Sequence[Candidate],
    injections: Sequence,
    match_radius: float = 1.5,
    real_kinds: Sequence[str] = REAL_KINDS,
    residual_kind: str = "residual",
    frame_shape: tuple[int, int] | None = None,
    edge_px: int = 20,
    min_real_snr: float = 0.0,
    residual_radius: float = 2.0,
) -> list[tuple[int, str, object | None]]:
    """Label candidates by the nearest injection within ``match_radius``.

    Parameters
    ----------
    candidates : list of Candidate
    injections : list of Injection
        With ``kind``, ``x``, ``y`` (px) and, for tracks, columns and trails, the end points
        ``x0, y0, x1, y1`` (px; None for compact sources).
    match_radius : float
        px.
    real_kinds : list of str
    residual_kind : str
        Kind given to an unmatched candidate on a reference source (``ref_dist`` < 2"): what
        the frame's reference was made to do wrong (``"dipole"``, ``"psf_mismatch"``), else
        ``"residual"``.
    frame_shape : (ny, nx), optional
        With it, an unmatched candidate within ``edge_px`` of the frame edge is ``"edge"``.
    edge_px : int
    min_real_snr : float
        Real injections with ``|snr|`` below this (sigma) are ignored: too faint to have made the
        detection (see :class:`~broker.training.settings.TrainingSetConfig`).
    residual_radius : float
        An unmatched candidate is on a reference source within this ``ref_dist`` (arcsec).

    Returns
    -------
    list of (label, kind, injection or None)
        label 1 for a real kind, else 0. An unmatched candidate is bogus of kind ``"edge"``,
        ``residual_kind`` (on a reference source) or ``"noise"`` (in that order). Real
        injections win over artifacts within the radius (an artifact on a transient still
        leaves a real source there).
    """
    injections = [i for i in injections if i.kind not in real_kinds
                  or abs(getattr(i, "snr", np.inf)) >= min_real_snr]
    segments = _segments(injections)
    out: list[tuple[int, str, object | None]] = []
    for c in candidates:
        d = c.detection
        dist = _distances(d.x, d.y, *segments)
        near = np.flatnonzero(dist <= match_radius)
        if len(near):
            reals = [j for j in near if injections[j].kind in real_kinds]
            inj = injections[min(reals or list(near), key=dist.__getitem__)]
            out.append((1 if inj.kind in real_kinds else 0, str(inj.kind), inj))
        elif frame_shape is not None and min(d.x, d.y, frame_shape[1] - 1 - d.x,
                                             frame_shape[0] - 1 - d.y) < edge_px:
            out.append((0, "edge", None))
        else:
            kind = residual_kind if np.isfinite(d.ref_dist) and d.ref_dist < residual_radius \
                else "noise"
            out.append((0, kind, None))
    return out


def _segments(injections: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Injections as segments ``a + t ab`` (t in [0, 1]).

    Start points (N, 2), directions (N, 2) and squared lengths (N,), px.

    Extended artifacts (tracks, columns, trails) are matched by distance to their segment,
    since a detection can sit anywhere along them; compact ones by distance to (x, y), a
    segment of length 0.
    """
    n = len(injections)
    a = np.array([[float(i.x), float(i.y)] for i in injections]).reshape(n, 2)
    b = a.copy()
    for j, i in enumerate(injections):
        ends = [getattr(i, k, None) for k in ("x0", "y0", "x1", "y1")]
        if all(e is not None and np.isfinite(e) for e in ends):
            a[j], b[j] = ends[:2], ends[2:]
    ab = b - a
    return a, ab, np.maximum(np.sum(ab * ab, axis=1), 1e-12)


def _distances(x: float, y: float, a: np.ndarray, ab: np.ndarray, ab2: np.ndarray) -> np.ndarray:
    """Distance (px) of (x, y) to each segment of :func:`_segments`."""
    if not len(a):
        return np.zeros(0)
    p = np.array([x, y])
    t = np.clip(np.sum((p - a) * ab, axis=1) / ab2, 0.0, 1.0)
    q = a + t[:, None] * ab
    return np.hypot(q[:, 0] - p[0], q[:, 1] - p[1])


def relative_to_reference(injections: Sequence, reference_injections: Sequence) -> list:
    """Variable-star injections of a science frame made relative to the reference.

    The simulator gives a variable's ``flux`` and ``snr`` against the static sky, but the star
    also varied in the reference epochs. The change the subtraction sees is ``flux`` minus the
    inverse-variance mean of its reference-epoch fluxes (weights ``(snr / flux)^2``, as a
    point-source co-add weighs them), with that mean's variance added to the noise.

    Parameters
    ----------
    injections : list of Injection
        Of the science frame.
    reference_injections : list of Injection
        Of all reference frames together.

    Returns
    -------
    list of Injection
        ``injections`` with each variable's ``flux`` (ADU) and ``snr`` replaced; others as given.
    """
    sums: dict[str, list[float]] = {}
    for i in reference_injections:
        if i.kind == "variable" and i.flux != 0 and i.snr != 0:
            w = (i.snr / i.flux) ** 2
            acc = sums.setdefault(i.source_id, [0.0, 0.0])
            acc[0] += w * i.flux
            acc[1] += w
    out = []
    for i in injections:
        ref = sums.get(i.source_id) if i.kind == "variable" else None  # (sum w flux, sum w)
        if ref is None or ref[1] <= 0 or i.flux == 0 or i.snr == 0:
            out.append(i)
            continue
        change = i.flux - ref[0] / ref[1]
        sigma = float(np.hypot(i.flux / i.snr, 1.0 / np.sqrt(ref[1])))
        out.append(dataclasses.replace(i, flux=float(change), snr=float(change / sigma)))
    return out


def lobe_snrs(difference: np.ndarray, radius: float = 6.0) -> tuple[float, float]:
    """S/N of the central lobe and of the strongest lobe of the other sign within ``radius`` px.

    The stamp is smoothed by a Gaussian of 1 px (a matched filter for the narrowest PSFs);
    the noise is the MAD of the smoothed stamp beyond 10 px from the centre.

    Parameters
    ----------
    difference : ndarray, shape (H, W)
        Difference cutout centred on the candidate (ADU); NaNs are ignored.
    radius : float
        px; covers the lobes of a shift of up to ~2 px at a FWHM of up to ~6 px.

    Returns
    -------
    (central, opposite) : float
        sigma, both >= 0 for a dipole; (0, 0) when the noise cannot be measured.
    """
    from scipy import ndimage

    d = np.nan_to_num(np.asarray(difference, np.float64))
    sm = ndimage.gaussian_filter(d, 1.0)
    yy, xx = np.indices(d.shape)
    cy, cx = (d.shape[0] - 1) / 2, (d.shape[1] - 1) / 2
    r = np.hypot(yy - cy, xx - cx)
    outer = sm[(r > 10) & np.isfinite(difference)]
    sigma = 1.4826 * np.median(np.abs(outer - np.median(outer))) if outer.size > 20 else 0.0
    if not sigma > 0:
        return 0.0, 0.0
    sign = np.sign(sm[r <= 1.5].sum()) or 1.0
    return (float(np.max(sign * sm[r <= 1.5]) / sigma),
            float(np.max(-sign * sm[r <= radius]) / sigma))


def dipole_unseen(difference: np.ndarray, config: TrainingSetConfig) -> bool:
    """Whether a dipole's stamp lacks the opposite lobe that the config asks for.

    The lobe is asked for by ``min_dipole_lobe_snr`` and ``min_dipole_lobe_ratio``; a dipole without
    it is left out as ambiguous.
    """
    central, opposite = lobe_snrs(difference)
    return bool((config.min_dipole_lobe_snr > 0 and opposite < config.min_dipole_lobe_snr)
                or (config.min_dipole_lobe_ratio > 0
                    and opposite < config.min_dipole_lobe_ratio * central))


def opposite_lobe_snr(difference: np.ndarray, radius: float = 6.0) -> float:
    """S/N of the strongest lobe of the other sign than the centre (:func:`lobe_snrs`)."""
    return lobe_snrs(difference, radius)[1]


def swamped_label(ratio: tuple[float, float], change: float, residual: float
                  ) -> tuple[int, str]:
    """(label, kind) of a variable whose |change| (ADU) sits on its star's dipole (ADU).

    Label -1 (``"ambiguous_variable"``) is counted by the writer but not written.
    """
    lo, hi = ratio
    if residual <= 0 or change >= hi * residual:
        return 1, "variable"
    if change < lo * residual:
        return 0, "dipole"
    return -1, "ambiguous_variable"


def trail_label(share: tuple[float, float], kind: str, trail: float, change: float
                ) -> tuple[int, str]:
    """(label, kind) of a real candidate of |change| (ADU) with ``trail`` ADU of trails on it."""
    lo, hi = share
    f = trail / (trail + change) if trail + change > 0 else 0.0
    if f < lo:
        return 1, kind
    if f >= hi:
        return 0, "satellite"
    return -1, "ambiguous_trail"


@dataclass(frozen=True)
class FrameStress:
    """What the stress mix did to one science frame, as far as the labelling rules need it.

    Attributes
    ----------
    shift_at : callable or None
        Misalignment (px) at a position of a misaligned reference
        (:func:`~broker.training.stress.reference_variant`); None when the reference is not
        misaligned.
    trails : list of Injection or ArtifactInjection
        Satellite trails on the frame (with end points and ``flux``, ADU).
    fwhm : float
        Science-frame FWHM, px.
    saturation : float
        Science-frame saturation level, ADU.
    """

    shift_at: ShiftAt | None
    trails: Sequence
    fwhm: float
    saturation: float


def stress_label(candidate: Candidate, label: int, kind: str, injection: Any,
                 stress: FrameStress, config: TrainingSetConfig) -> tuple[int, str]:
    """(label, kind) of a candidate once the frame's stress and the conventions of ``config`` are applied.

    The candidate comes labelled by position (:func:`label_candidates`); the rules apply in this order:

    1. a variable on a misaligned reference swamped by its star's dipole
       (``swamped_ratio``, :func:`swamped_label`);
    2. a real source of ``dipole_lobe_kinds`` on a misaligned reference whose stamp shows a
       dipole (``variable_dipole_lobe``): bogus ``"dipole"``;
    3. a real source under satellite trails (``trail_share``, :func:`trail_label`);
    4. a bogus dipole whose stamp lacks the opposite lobe (:func:`dipole_unseen`):
       ``"ambiguous_dipole"``, label -1;
    5. a residual or dipole on a star at >= 90 % of saturation: ``"saturated_residual"``.
    """
    lab, inj, shift_at = label, injection, stress.shift_at
    if lab == 1 and inj.kind == "variable" and shift_at is not None:
        lab, kind = swamped_label(config.swamped_ratio, abs(inj.flux), residual_flux(
            abs(shift_at(inj.x, inj.y)), stress.fwhm, inj.static_flux))
    if lab == 1 and inj.kind in config.dipole_lobe_kinds and shift_at is not None \
            and config.variable_dipole_lobe[0] > 0:
        central, opposite = lobe_snrs(candidate.difference)
        if opposite >= max(config.variable_dipole_lobe[0],
                           config.variable_dipole_lobe[1] * central):
            lab, kind = 0, "dipole"
    if lab == 1 and stress.trails:
        lab, kind = trail_label(config.trail_share, kind, trail_flux(
            candidate.detection.x, candidate.detection.y, stress.trails, stress.fwhm),
            abs(inj.flux))
    if kind == "dipole" and lab == 0 and dipole_unseen(candidate.difference, config):
        lab, kind = -1, "ambiguous_dipole"
    if kind in ("residual", "dipole", "psf_mismatch") and np.nanmax(candidate.science) >= \
            0.9 * stress.saturation:
        kind = "saturated_residual"
    return lab, kind
