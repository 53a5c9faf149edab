"""Training data, training, evaluation and model card of the real/bogus CNN (and the anomaly data).

Data (:func:`generate_training_set`): the sky simulator makes fields of several epochs with
per-field conditions drawn from the seed (:class:`TrainingSetConfig`); the first epochs are
co-added into a reference, every later frame goes through the project's own subtraction and
detection, with deliberately wrong references (sub-pixel shifts, extra blur) and extra science
artifacts (hot pixels, bad columns, bleeds, trails) on some frames, and each candidate is labelled
from the injection truth by position (:func:`label_candidates`). Candidates are streamed into
balanced, compressed ``.npz`` shards of normalised triplets with a JSON manifest
(:class:`ShardWriter`), so memory stays bounded whatever the size.

Training (:func:`train`): fixed seed, validation split by field, early stopping, flips and 90
degree rotations plus edge-truncation and NaN-mask augmentation, a rich progress bar.

Evaluation (:func:`main_eval`): held-out simulated set (other seed, other fields) and real ZTF
alerts, written as Markdown + PNG. One command does everything: :func:`main_train`
(``broker train-realbogus``); :func:`synth_triplets` is a stamp-level generator for tests only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from broker.anomaly import AnomalyConfig, features_from, fit_anomaly
from broker.candidate import CUTOUT_SIZE, Candidate
from broker.errors import CutoutError, ModelError
from broker.realbogus import (
    MODELS_DIR,
    NormaliseConfig,
    RealBogusClassifier,
    build_net,
    normalise_triplet,
)

#: Injection kinds that make a candidate real.
REAL_KINDS = ("transient", "variable", "moving")
#: Injection kinds that are artifacts (bogus, with their type recorded).
ARTIFACT_KINDS = ("cosmic_ray", "hot_pixel", "hot_column", "satellite")


# --- labelled candidates -------------------------------------------------------------------------
#: Bogus kinds the generator adds itself to the science frame (on top of the simulator's).
SCIENCE_ARTIFACT_KINDS = ("hot_pixel", "bad_column", "bleed", "satellite")


@dataclass(frozen=True)
class TrainingSetConfig:
    """How the training set is generated from simulated frames.

    Each field gets its own simulator settings drawn from the seed (seeing, sky, star density,
    brightest stars and saturation level, trail probability), so that the set spans conditions;
    each science frame may then get a deliberately wrong reference (sub-pixel shift: dipoles;
    extra blur: PSF-mismatch residuals) and extra detector artifacts on the science frame only
    (hot pixels, bad column segments, bleed trails from saturated stars, satellite trails), each
    recorded as an injection so that the candidates it causes are labelled by position.

    Attributes
    ----------
    target_n : int
        Balanced candidates to write; generation stops when reached (or after ``max_frames``).
    max_frames : int
        Upper bound on science frames.
    epochs_per_field : int
        Science epochs per field (each field also costs ``reference_epochs`` = 3 reference frames).
    shape : tuple of int
        Frame shape (ny, nx) in px. Default 1024x1024: one frame subtracts in ~1 s on one core.
    filters : tuple of str
        Filters; field ``f`` is observed in ``filters[f % len(filters)]``.
    match_radius : float
        Max distance (px) between a candidate and an injection to take its label. Default 1.5 px
        (~FWHM/2 for 3 px seeing): a centroid of a >= 5 sigma source is within ~0.5 px.
    real_kinds : tuple of str
        Injection kinds labelled real; "moving" is real (a genuine astrophysical source).
    n_transients : int
        Transients per frame asked of the simulator (its default is 12 per 2k x 2k frame).
        Subtraction costs ~1 s per 1k x 1k frame whatever it holds, so frames are packed with
        transients, variables and cosmic rays (~250 real and ~250 bogus candidates a frame).
    n_cosmic_rays : float
        Mean cosmic-ray hits per frame (simulator knob; its default is 150 per frame).
    transient_on_galaxy : float
        Fraction of transients on a galaxy (simulator default 0.3).
    n_variables, variable_mag_range, variable_amplitude_range
        Variable stars per field, their magnitude range and fractional semi-amplitude range
        (simulator defaults 20, 15-19, 0.05-0.5). Many, bright and strongly varying: real ZTF
        alerts mostly sit on a source of the reference (variables, nuclear transients): in the
        public sample the reference's central 5x5 px average ~17 normalised units against ~0.1
        for hostless transients, and a model that never sees reals on reference sources learns
        "on a reference source = subtraction residual".
    reference_epochs_range : tuple of int
        Frames co-added into each field's reference, drawn per field (inclusive). Survey
        references are deep co-adds (ZTF: 15-40 frames); 3-10 spans shallow to fairly deep.
    transient_snr_range : tuple of float
        Optimal S/N range of injected transients (simulator knob). 4-100: from below the 5 sigma
        threshold (some are lost, as in real data) to bright.
    fwhm_range : tuple of float
        Range (px) of the per-field seeing interval's lower end; the upper end is 1.1-1.8x it.
        1.3-3.5 px covers ZTF (2" seeing / 1"/px ~ 2 px) and worse nights on a 1"/px imager.
    sky_range : tuple of float
        Mean sky level, ADU/px, drawn log-uniformly per field.
    bright_star_mag_range : tuple of float
        Brightest catalogue magnitude per field (uniform); 9 gives several saturated stars per
        1k x 1k frame, 12 (the simulator default) almost none.
    saturation_range : tuple of float
        Saturation level per field, ADU (uniform).
    p_misalign : float
        Probability that a frame's reference is shifted by ``misalign_px`` (sub-pixel), keeping
        its star catalogue, so that the alignment is wrong by that much: dipoles on every star.
    misalign_px : tuple of float
        Shift length range, px.
    p_psf_error : float
        Probability that a frame's reference is blurred by a Gaussian of ``psf_blur_px`` (sigma)
        while its PSF model is kept: PSF-mismatch residuals (rings) on bright stars.
    psf_blur_px : tuple of float
        Blur sigma range, px.
    p_uncleaned : float
        Probability that a frame is subtracted without interpolating its cosmic rays and hot
        pixels (``SubtractConfig(cosmic_ray_sigma=0)``): the cleaning removes nearly all of them
        from simulated frames, but on real ones some always get through, and the classifier must
        have seen them.
    hot_pixels_per_frame : float
        Mean (Poisson) extra science-only hot pixels per frame (the simulator's hot pixels are
        fixed on the detector and land in the reference too, so they rarely make candidates).
    bad_columns_per_frame : float
        Mean (Poisson) bad column segments (30-400 px long) per science frame.
    p_bleed : float
        Probability that a saturated star of the science frame gets a bleed trail (up and down
        its column, 5-60 px each way, at 50-95% of saturation).
    trails_per_frame : float
        Mean (Poisson) extra satellite trails per science frame.
    edge_px : int
        Unmatched candidates closer than this to the frame edge are of kind ``"edge"``
        (cutout cut by the frame edge). Default 20 px.
    balance : bool
        Write as many bogus as real candidates (see :class:`ShardWriter`).
    shard_size : int
        Candidates per ``.npz`` shard.
    workers : int
        Processes generating fields in parallel (1 = in this process).
    seed : int
        Seeds everything: same seed and config, same set.
    """

    target_n: int = 100_000
    max_frames: int = 2000
    epochs_per_field: int = 8
    shape: tuple[int, int] = (1024, 1024)
    filters: tuple[str, ...] = ("g", "r", "i")
    match_radius: float = 1.5
    real_kinds: tuple[str, ...] = REAL_KINDS
    n_transients: int = 150
    n_cosmic_rays: float = 220.0
    transient_on_galaxy: float = 0.6
    n_variables: int = 500
    variable_mag_range: tuple[float, float] = (14.0, 20.0)
    variable_amplitude_range: tuple[float, float] = (0.1, 0.8)
    reference_epochs_range: tuple[int, int] = (3, 10)
    transient_snr_range: tuple[float, float] = (4.0, 100.0)
    fwhm_range: tuple[float, float] = (1.3, 3.5)
    sky_range: tuple[float, float] = (100.0, 3000.0)
    bright_star_mag_range: tuple[float, float] = (9.0, 12.0)
    saturation_range: tuple[float, float] = (20000.0, 60000.0)
    p_misalign: float = 0.3
    misalign_px: tuple[float, float] = (0.3, 1.2)
    p_psf_error: float = 0.25
    psf_blur_px: tuple[float, float] = (0.6, 1.5)
    p_uncleaned: float = 0.3
    hot_pixels_per_frame: float = 15.0
    bad_columns_per_frame: float = 1.5
    p_bleed: float = 0.8
    trails_per_frame: float = 0.6
    edge_px: int = 20
    balance: bool = True
    shard_size: int = 4096
    workers: int = 1
    seed: int = 0


@dataclass
class LabelledCandidate:
    """One candidate with its label (1 real / 0 bogus), its type and its anomaly features."""

    triplet: np.ndarray          # (3, 63, 63) float16/float32, normalised
    label: int
    kind: str                    # injection kind, residual/dipole/psf_mismatch/edge/noise if none
    features: np.ndarray         # (F,) anomaly features
    group: str                   # field: the validation split is made by field
    snr: float


@dataclass(frozen=True)
class ArtifactInjection:
    """An artifact the generator added to a science frame (same fields as the simulator's).

    Attributes
    ----------
    kind : str
        One of :data:`SCIENCE_ARTIFACT_KINDS`.
    x, y : float
        Position (px); for segments their midpoint.
    x0, y0, x1, y1 : float or None
        Segment end points (px) for columns, bleeds and trails.
    source_id : str
    """

    kind: str
    x: float
    y: float
    x0: float | None = None
    y0: float | None = None
    x1: float | None = None
    y1: float | None = None
    source_id: str = ""


def label_candidates(
    candidates: Sequence[Candidate],
    injections: Sequence,
    match_radius: float = 1.5,
    real_kinds: Sequence[str] = REAL_KINDS,
    residual_kind: str = "residual",
    frame_shape: tuple[int, int] | None = None,
    edge_px: int = 20,
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

    Returns
    -------
    list of (label, kind, injection or None)
        label 1 for a real kind, else 0. An unmatched candidate is bogus of kind ``"edge"``,
        ``residual_kind`` (on a reference source) or ``"noise"`` (in that order). Real
        injections win over artifacts within the radius (an artifact on a transient still
        leaves a real source there).
    """
    # Extended artifacts (tracks, columns, trails) are matched by distance to their segment,
    # since a detection can sit anywhere along them; compact ones by distance to (x, y).
    n = len(injections)
    a = np.array([[float(i.x), float(i.y)] for i in injections]).reshape(n, 2)
    b = a.copy()
    for j, i in enumerate(injections):
        ends = [getattr(i, k, None) for k in ("x0", "y0", "x1", "y1")]
        if all(e is not None and np.isfinite(e) for e in ends):
            a[j], b[j] = ends[:2], ends[2:]
    ab = b - a
    ab2 = np.maximum(np.sum(ab * ab, axis=1), 1e-12)
    out = []
    for c in candidates:
        d = c.detection
        if n:
            p = np.array([d.x, d.y])
            t = np.clip(np.sum((p - a) * ab, axis=1) / ab2, 0.0, 1.0)
            q = a + t[:, None] * ab
            dist = np.hypot(q[:, 0] - p[0], q[:, 1] - p[1])
            near = np.flatnonzero(dist <= match_radius)
        else:
            near = np.zeros(0, dtype=int)
        if len(near):
            reals = [j for j in near if injections[j].kind in real_kinds]
            j = min(reals or list(near), key=lambda j: dist[j])
            inj = injections[j]
            out.append((1 if inj.kind in real_kinds else 0, str(inj.kind), inj))
        elif frame_shape is not None and min(d.x, d.y, frame_shape[1] - 1 - d.x,
                                             frame_shape[0] - 1 - d.y) < edge_px:
            out.append((0, "edge", None))
        else:
            kind = residual_kind if np.isfinite(d.ref_dist) and d.ref_dist < 2.0 else "noise"
            out.append((0, kind, None))
    return out


def field_sim_config(sim_mod, config: TrainingSetConfig, rng: np.random.Generator):
    """Simulator settings of one field, drawn from ``rng`` within the ranges of ``config``."""
    lo = rng.uniform(*config.fwhm_range)
    return sim_mod.SimConfig(
        shape=tuple(config.shape),
        filters=tuple(config.filters),
        n_transients=config.n_transients,
        n_cosmic_rays=config.n_cosmic_rays,
        transient_snr_range=tuple(config.transient_snr_range),
        transient_on_galaxy=config.transient_on_galaxy,
        n_variables=config.n_variables,
        variable_mag_range=tuple(config.variable_mag_range),
        variable_amplitude_range=tuple(config.variable_amplitude_range),
        reference_epochs=int(rng.integers(config.reference_epochs_range[0],
                                          config.reference_epochs_range[1] + 1)),
        fwhm_range=(lo, lo * rng.uniform(1.1, 1.8)),
        sky_level=float(np.exp(rng.uniform(*np.log(config.sky_range)))),
        star_mag_range=(float(rng.uniform(*config.bright_star_mag_range)), 22.5),
        n_stars=int(rng.integers(1500, 5000)),
        saturation=float(rng.uniform(*config.saturation_range)),
        satellite_probability=0.3,
    )


def _reference_variant(reference, config: TrainingSetConfig, rng: np.random.Generator):
    """The reference as used for one frame: as built, shifted (misaligned) or blurred.

    Returns (reference, residual_kind). The star catalogue of the unmodified reference is kept
    on the variant, so the alignment fits the catalogue and misses the shift of the pixels.
    """
    from scipy import ndimage

    from broker import subtract as sub_mod

    sources = sub_mod.reference_sources(reference)  # cached on the original
    u = rng.uniform()
    if u < config.p_misalign:
        r, th = rng.uniform(*config.misalign_px), rng.uniform(0, 2 * np.pi)
        img = ndimage.shift(np.nan_to_num(reference.image), (r * np.sin(th), r * np.cos(th)),
                            order=3, mode="nearest")
        img[~np.isfinite(reference.image)] = np.nan
        return dataclasses.replace(reference, image=img.astype(np.float32), sources=sources), "dipole"
    if u < config.p_misalign + config.p_psf_error:
        s = rng.uniform(*config.psf_blur_px)
        img = ndimage.gaussian_filter(np.nan_to_num(reference.image), s)
        img[~np.isfinite(reference.image)] = np.nan
        return (dataclasses.replace(reference, image=img.astype(np.float32), sources=sources),
                "psf_mismatch")
    return reference, "residual"


def add_science_artifacts(frame, fwhm: float, sky: float, config: TrainingSetConfig,
                          rng: np.random.Generator) -> list[ArtifactInjection]:
    """Add hot pixels, bad column segments, bleed trails and satellite trails to ``frame.data``.

    Amplitudes are in units of the sky noise ``sqrt(sky)`` (ADU, gain ~1) so that they straddle
    the 5 sigma threshold whatever the sky. Modifies ``frame.data`` in place.

    Returns
    -------
    list of ArtifactInjection
    """
    from scipy import ndimage

    from broker.simulate import render

    img = frame.data
    ny, nx = img.shape
    sig = float(np.sqrt(max(sky, 1.0)))
    sat = float(frame.meta.saturation) if np.isfinite(frame.meta.saturation) else 6e4
    out: list[ArtifactInjection] = []
    # bleeds first, from the stars saturated before anything else is added
    lab, n = ndimage.label(img >= 0.98 * sat)
    for k, sl in enumerate(ndimage.find_objects(lab)):
        if sl is None or rng.uniform() > config.p_bleed:
            continue
        cy, cx = (sl[0].start + sl[0].stop - 1) / 2, int(round((sl[1].start + sl[1].stop - 1) / 2))
        y0 = max(int(sl[0].start - rng.uniform(5, 60)), 0)
        y1 = min(int(sl[0].stop + rng.uniform(5, 60)), ny - 1)
        # just under saturation: fully saturated columns are masked by the pipeline, the
        # partially filled wells beside and beyond them are what leaks into the difference
        img[y0 : y1 + 1, cx] = np.maximum(img[y0 : y1 + 1, cx], sat * rng.uniform(0.5, 0.95))
        out.append(ArtifactInjection("bleed", float(cx), float(cy), float(cx), float(y0),
                                     float(cx), float(y1), f"B{k:04d}"))
    for k in range(rng.poisson(config.hot_pixels_per_frame)):
        x, y = int(rng.integers(0, nx)), int(rng.integers(0, ny))
        img[y, x] += sig * 10 ** rng.uniform(0.8, 3.0)
        out.append(ArtifactInjection("hot_pixel", float(x), float(y), source_id=f"HP{k:04d}"))
    for k in range(rng.poisson(config.bad_columns_per_frame)):
        x, length = int(rng.integers(0, nx)), int(rng.uniform(30, 400))
        y0 = int(rng.integers(0, max(ny - length, 1)))
        img[y0 : y0 + length, x] += sig * rng.uniform(3, 30)
        out.append(ArtifactInjection("bad_column", float(x), y0 + length / 2, float(x), float(y0),
                                     float(x), float(y0 + length - 1), f"BC{k:04d}"))
    for k in range(rng.poisson(config.trails_per_frame)):
        x0, y0, x1, y1 = 0.0, rng.uniform(0, ny - 1), nx - 1.0, rng.uniform(0, ny - 1)
        if rng.uniform() < 0.5:
            x0, y0, x1, y1 = y0, x0, y1, x1
        flat, vals = render.line_profile((ny, nx), x0, y0, x1, y1, fwhm / 2.3548,
                                         sig * rng.uniform(5, 60) * fwhm)
        img.reshape(-1)[flat] += vals.astype(img.dtype)
        out.append(ArtifactInjection("satellite", (x0 + x1) / 2, (y0 + y1) / 2, x0, y0, x1, y1,
                                     f"ST{k:04d}"))
    np.minimum(img, sat, out=img, where=np.isfinite(img))
    return out


def field_candidates(config: TrainingSetConfig, f: int,
                     norm: NormaliseConfig = NormaliseConfig()) -> list[LabelledCandidate]:
    """Labelled candidates of field ``f``: reference from 3 epochs, then the science epochs.

    Histories for the anomaly features are built from the truth (``source_id``) of previous
    epochs of the same field, i.e. what a perfect association would give.
    """
    from broker import reference as ref_mod
    from broker import simulate as sim_mod
    from broker import subtract as sub_mod

    rng = np.random.default_rng([config.seed, f])
    sim_cfg = field_sim_config(sim_mod, config, rng)
    field_name = f"F{config.seed:03d}-{f:04d}"
    filt = config.filters[f % len(config.filters)]
    sim = sim_mod.SkySimulator(sim_cfg, seed=config.seed * 100_003 + f)
    n_ref = int(sim_cfg.reference_epochs)
    try:
        reference = ref_mod.build_reference([sim.frame(field_name, filt, e)[0]
                                             for e in range(n_ref)],
                                            ref_mod.ReferenceConfig(n_frames=n_ref))
    except Exception as exc:  # a field without a reference is skipped, not fatal
        print(f"[training] {field_name} {filt}: reference failed: {exc!r}")
        return []
    out: list[LabelledCandidate] = []
    histories: dict[object, list[dict]] = {}
    for e in range(n_ref, n_ref + config.epochs_per_field):
        frame, truth = sim.frame(field_name, filt, e)
        ref_e, residual_kind = _reference_variant(reference, config, rng)
        extra = add_science_artifacts(frame, truth.fwhm, truth.sky, config, rng)
        try:
            cleaned = rng.uniform() >= config.p_uncleaned
            sub_cfg = sub_mod.SubtractConfig() if cleaned else sub_mod.SubtractConfig(cosmic_ray_sigma=0.0)
            result = sub_mod.subtract_and_detect(frame, ref_e, sub_cfg)
        except Exception as exc:  # a failed subtraction only costs that frame
            print(f"[training] {field_name} {filt} epoch {e}: subtraction failed: {exc!r}")
            continue
        cands = list(result.candidates)
        labels = label_candidates(cands, list(truth.injections) + extra, config.match_radius,
                                  config.real_kinds, residual_kind, frame.data.shape,
                                  config.edge_px)
        mjd = float(frame.meta.mjd_start)
        for c, (lab, kind, inj) in zip(cands, labels):
            if kind in ("residual", "dipole", "psf_mismatch") and np.nanmax(c.science) >= \
                    0.9 * frame.meta.saturation:
                kind = "saturated_residual"
            sid = getattr(inj, "source_id", None) if inj is not None else None
            hist = histories.get(sid, []) if sid is not None else []
            try:
                x, _ = normalise_triplet(c.science, c.reference, c.difference, norm)
            except CutoutError:
                continue
            out.append(LabelledCandidate(x.astype(np.float16), lab, kind,
                                         features_from(c, hist, mjd), field_name,
                                         float(c.detection.snr)))
            if sid is not None and lab == 1:
                histories.setdefault(sid, []).append(
                    {"mjd": mjd, "flux": float(c.detection.flux),
                     "flux_err": float(c.detection.flux_err),
                     "snr": float(c.detection.snr), "filter": filt})
    return out


def _field_job(args: tuple[TrainingSetConfig, int]) -> list[LabelledCandidate]:
    return field_candidates(*args)


def iter_pipeline_candidates(config: TrainingSetConfig) -> Iterator[LabelledCandidate]:
    """Labelled candidates of fields 0, 1, 2, ... (``config.workers`` processes), in field order.

    Stops after ``max_frames`` science frames; the caller stops earlier once it has enough.
    """
    n_fields = -(-config.max_frames // config.epochs_per_field)
    jobs = ((config, f) for f in range(n_fields))
    if config.workers <= 1:
        for job in jobs:
            yield from _field_job(job)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(config.workers) as pool:
        for items in pool.imap(_field_job, jobs):
            yield from items


# --- stamp-level synthetic triplets ---------------------------------------------------------------
def _gauss(n: int, x0: float, y0: float, fwhm: float, flux: float) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    s = fwhm / 2.3548
    return flux / (2 * np.pi * s * s) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))


def synth_triplets(
    n: int, seed: int = 0, real_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Raw (un-normalised) synthetic cutout triplets, for tests and quick checks.

    Real: a point source (PSF) at the centre, brightening (80%) or fading, on a host galaxy in a
    third of cases. Bogus: cosmic ray (1-3 sharp px), hot pixel, hot column, satellite trail,
    subtraction residual of a star (dipole / PSF mismatch) or a pure noise peak.

    Returns
    -------
    triplets : ndarray, shape (n, 3, 63, 63), float32
        science, reference, difference in ADU with sky removed from the difference only.
    labels : ndarray, shape (n,), int
    kinds : list of str
    """
    rng = np.random.default_rng(seed)
    N = CUTOUT_SIZE
    c = N // 2
    out = np.empty((n, 3, N, N), dtype=np.float32)
    labels = (rng.random(n) < real_fraction).astype(int)
    kinds = []
    bogus_kinds = ("cosmic_ray", "hot_pixel", "hot_column", "satellite", "residual", "noise")
    yy, xx = np.mgrid[:N, :N]
    for i in range(n):
        sky = rng.uniform(100, 2000)
        sig = np.sqrt(sky)
        fw_s, fw_r = rng.uniform(2.0, 4.5), rng.uniform(1.8, 3.5)
        scene_s = np.zeros((N, N))
        scene_r = np.zeros((N, N))
        for _ in range(rng.poisson(3)):  # field stars
            sx, sy, sf = rng.uniform(0, N), rng.uniform(0, N), 10 ** rng.uniform(2.5, 5)
            scene_s += _gauss(N, sx, sy, fw_s, sf)
            scene_r += _gauss(N, sx, sy, fw_r, sf)
        if rng.random() < 0.33:  # host galaxy
            gx, gy = c + rng.normal(0, 3, 2)
            gs = rng.uniform(3, 8)
            g = 10 ** rng.uniform(3, 4.5) / (2 * np.pi * gs * gs) * np.exp(
                -((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * gs * gs))
            scene_s += g
            scene_r += g
        new = np.zeros((N, N))
        art = np.zeros((N, N))
        x0, y0 = c + rng.uniform(-0.7, 0.7), c + rng.uniform(-0.7, 0.7)
        area = 4 * np.pi * (fw_s / 2.3548) ** 2
        if labels[i]:
            kind = "transient" if rng.random() < 0.7 else "variable"
            flux = rng.uniform(5, 80) * sig * np.sqrt(area)
            if kind == "variable" and rng.random() < 0.5:  # fading known star
                scene_r += _gauss(N, x0, y0, fw_r, 2 * flux)
                scene_s += _gauss(N, x0, y0, fw_s, flux)
                new = _gauss(N, x0, y0, fw_s, -flux)
            else:
                if kind == "variable":
                    scene_r += _gauss(N, x0, y0, fw_r, flux)
                    scene_s += _gauss(N, x0, y0, fw_s, flux)
                new = _gauss(N, x0, y0, fw_s, flux)
        else:
            kind = bogus_kinds[rng.integers(len(bogus_kinds))]
            amp = rng.uniform(8, 200) * sig
            if kind == "cosmic_ray":
                for _ in range(rng.integers(1, 4)):
                    art[c + rng.integers(-1, 2), c + rng.integers(-1, 2)] += amp * rng.uniform(.5, 1)
            elif kind == "hot_pixel":
                art[c, c] += amp
            elif kind == "hot_column":
                art[:, c] += rng.uniform(5, 30) * sig
            elif kind == "satellite":
                th = rng.uniform(0, np.pi)
                d = np.abs((xx - x0) * np.sin(th) - (yy - y0) * np.cos(th))
                art += rng.uniform(5, 50) * sig * np.exp(-d ** 2 / (2 * (fw_s / 2.3548) ** 2))
            elif kind == "residual":  # bright star misaligned or with the wrong PSF
                sf = 10 ** rng.uniform(4, 6)
                dx, dy = rng.normal(0, 0.6, 2)
                fw_m = fw_s * rng.uniform(0.85, 1.15)
                art += _gauss(N, x0, y0, fw_s, sf) - _gauss(N, x0 + dx, y0 + dy, fw_m, sf)
                scene_s += _gauss(N, x0, y0, fw_s, sf)
                scene_r += _gauss(N, x0, y0, fw_r, sf)
            else:  # noise peak: a 1-px-wide fluctuation at the threshold
                art[c, c] += rng.uniform(3, 6) * sig
        noise_s = rng.normal(0, sig, (N, N))
        noise_r = rng.normal(0, sig / rng.uniform(2, 5), (N, N))
        sci = sky + scene_s + new + noise_s
        if kind in ("cosmic_ray", "hot_pixel", "hot_column", "satellite", "noise"):
            sci = sci + art
        ref = sky * rng.uniform(0.5, 2) + scene_r + noise_r
        diff = new + art + noise_s + rng.normal(0, sig / 3, (N, N))
        out[i] = np.stack([sci, ref, diff]).astype(np.float32)
        kinds.append(kind)
    return out, labels, kinds


def iter_synthetic_candidates(n: int, seed: int = 0) -> Iterator[LabelledCandidate]:
    """Normalised :func:`synth_triplets` as labelled candidates (group = seed block of 256)."""
    raw, labels, kinds = synth_triplets(n, seed)
    for i in range(n):
        x, _ = normalise_triplet(*raw[i])
        yield LabelledCandidate(x, int(labels[i]), kinds[i], np.zeros(0), f"S{i // 256}", 0.0)


# --- shards ---------------------------------------------------------------------------------------
class ShardWriter:
    """Stream labelled candidates into balanced ``shard-XXXX.npz`` files, bounded memory.

    Reals and bogus wait in two buffers; each time both hold half a shard, a shard of half real,
    half bogus is written. Bogus are taken round-robin over their kinds, so that rare kinds
    (trails, bleeds, dipoles) are all used while the common ones (cosmic rays) fill the rest.
    A buffer over ``max_buffer`` drops a random member of its most common kind.

    Shards hold ``x`` (N, 3, 63, 63) float16 normalised triplets (|values| <= 30, so float16's
    3 significant digits are ample), ``y`` (N,) uint8, ``kind`` (N,) str, ``group`` (N,) str,
    ``snr`` (N,) float32, ``features`` (N, F) float32.
    """

    def __init__(self, out_dir: str | Path, shard_size: int, seed: int, balance: bool = True,
                 max_buffer: int | None = None) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for old in self.out.glob("shard-*.npz"):
            old.unlink()
        self.shard_size, self.balance = shard_size, balance
        self.max_buffer = max_buffer or 2 * shard_size
        self.rng = np.random.default_rng(seed)
        self.buf: dict[int, list[LabelledCandidate]] = {0: [], 1: []}
        self.shards: list[str] = []
        self.seen: Counter = Counter()
        self.written: Counter = Counter()
        self.n_real = self.n_bogus = 0

    @property
    def n(self) -> int:
        """Candidates written so far."""
        return self.n_real + self.n_bogus

    def add(self, item: LabelledCandidate) -> None:
        self.seen[item.kind] += 1
        buf = self.buf[int(item.label)]
        buf.append(item)
        if len(buf) > self.max_buffer:  # drop a random member of the most common kind
            common = Counter(it.kind for it in buf).most_common(1)[0][0]
            idx = [i for i, it in enumerate(buf) if it.kind == common]
            buf.pop(int(self.rng.choice(idx)))
        half = self.shard_size // 2
        if not self.balance and len(self.buf[0]) + len(self.buf[1]) >= self.shard_size:
            self._write(self.buf[1] + self.buf[0])
            self.buf = {0: [], 1: []}
        elif self.balance and min(len(self.buf[0]), len(self.buf[1])) >= half:
            self._write(self._take(1, half) + self._take(0, half))

    def _take(self, label: int, n: int) -> list[LabelledCandidate]:
        """``n`` members of a buffer: random for reals, round-robin over kinds for bogus."""
        buf = self.buf[label]
        if label == 1:
            pick = set(self.rng.choice(len(buf), n, replace=False).tolist())
        else:
            by_kind: dict[str, list[int]] = {}
            for i in self.rng.permutation(len(buf)):
                by_kind.setdefault(buf[i].kind, []).append(int(i))
            pick, lists = set(), list(by_kind.values())
            while len(pick) < n:
                for lst in lists:
                    if lst and len(pick) < n:
                        pick.add(lst.pop())
        self.buf[label] = [it for i, it in enumerate(buf) if i not in pick]
        return [it for i, it in enumerate(buf) if i in pick]

    def _write(self, chunk: list[LabelledCandidate]) -> None:
        chunk = [chunk[i] for i in self.rng.permutation(len(chunk))]
        name = f"shard-{len(self.shards):04d}.npz"
        nf = max((len(it.features) for it in chunk), default=0)
        np.savez_compressed(
            self.out / name,
            x=np.stack([it.triplet for it in chunk]).astype(np.float16),
            y=np.array([it.label for it in chunk], dtype=np.uint8),
            kind=np.array([it.kind for it in chunk]),
            group=np.array([it.group for it in chunk]),
            snr=np.array([it.snr for it in chunk], dtype=np.float32),
            features=np.array([it.features if len(it.features) == nf else np.zeros(nf)
                               for it in chunk], dtype=np.float32),
        )
        self.shards.append(name)
        self.written.update(it.kind for it in chunk)
        self.n_real += sum(it.label for it in chunk)
        self.n_bogus += sum(1 - it.label for it in chunk)

    def close(self, flush_partial: bool = True) -> None:
        """Write what is left as a last (balanced) shard."""
        if not flush_partial:
            return
        if self.balance:
            m = min(len(self.buf[0]), len(self.buf[1]))
            if m:
                self._write(self._take(1, m) + self._take(0, m))
        elif self.buf[0] or self.buf[1]:
            self._write(self.buf[1] + self.buf[0])
        self.buf = {0: [], 1: []}


def _config_dict(config: TrainingSetConfig) -> dict:
    """The config as JSON-comparable plain lists and numbers."""
    return json.loads(json.dumps(asdict(config)))


def write_training_set(
    out_dir: str | Path,
    candidates: Iterator[LabelledCandidate],
    config: TrainingSetConfig = TrainingSetConfig(),
    source: str = "pipeline",
    progress: bool = False,
) -> dict:
    """Balance and write candidates as ``shard-XXXX.npz`` + ``manifest.json`` (streamed).

    Stops reading ``candidates`` once ``config.target_n`` are written.

    Returns
    -------
    dict
        The manifest: source, seed, config, n / n_real / n_bogus, counts by kind written and
        seen (before balancing), shard names, wall time.
    """
    t0 = time.time()
    w = ShardWriter(out_dir, config.shard_size, config.seed, config.balance)
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task("[bold]training set[/] triplets written", total=config.target_n)
    n_shards = 0
    try:
        for item in candidates:
            w.add(item)
            if bar is not None:
                bar.update(task, completed=w.n)
            if len(w.shards) > n_shards:  # a usable manifest after every shard
                n_shards = len(w.shards)
                _write_manifest(out_dir, w, config, source, t0, complete=False)
            if w.n >= config.target_n:
                break
        else:
            w.close()
    finally:
        if bar is not None:
            bar.stop()
    return _write_manifest(out_dir, w, config, source, t0, complete=True)


def _git_commit() -> str:
    """``git describe`` of the code that made the set (labels depend on the detection code)."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).resolve().parent
                              ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_manifest(out_dir: str | Path, w: ShardWriter, config: TrainingSetConfig, source: str,
                    t0: float, complete: bool) -> dict:
    """Write ``manifest.json`` for the shards written so far; ``complete`` False while running."""
    manifest = {
        "source": source,
        "seed": config.seed,
        "config": _config_dict(config),
        "n": w.n,
        "n_real": w.n_real,
        "n_bogus": w.n_bogus,
        "counts_by_kind": dict(sorted(w.written.items())),
        "counts_by_kind_before_balancing": dict(sorted(w.seen.items())),
        "shards": w.shards,
        "format": "npz: x (N,3,63,63) float16 normalised by broker.realbogus.normalise_triplet; "
                  "y uint8 (1 real); kind str; group str (field); snr float32; features float32",
        "seconds": round(time.time() - t0, 1),
        "complete": complete,
        "pipeline_commit": _git_commit(),
    }
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def generate_training_set(
    out_dir: str | Path, config: TrainingSetConfig = TrainingSetConfig(), progress: bool = True
) -> dict:
    """Run the simulated pipeline and write the labelled, balanced training set (see module doc).

    Returns the manifest (also written to ``out_dir/manifest.json``) with the wall time.
    """
    return write_training_set(out_dir, iter_pipeline_candidates(config), config, "pipeline",
                              progress)


def load_training_set(data_dir: str | Path, dtype=np.float32) -> dict[str, np.ndarray]:
    """All shards of a training set: x (N,3,63,63) as ``dtype``, y, kind, group, snr, features.

    ``dtype=np.float16`` halves the memory (100k triplets: 2.4 GB instead of 4.8 GB).
    """
    d = Path(data_dir)
    man = json.loads((d / "manifest.json").read_text())
    parts: dict[str, list] = {}
    for name in man["shards"]:
        with np.load(d / name, allow_pickle=False) as a:
            for k in a.files:
                parts.setdefault(k, []).append(a[k])
    data = {k: np.concatenate(v) for k, v in parts.items()}
    data["x"] = data["x"].astype(dtype, copy=False)
    return data


# --- metrics --------------------------------------------------------------------------------------
def evaluate(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5,
             kinds: Sequence[str] | None = None) -> dict:
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
    m = {
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


# --- training -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Training of the real/bogus CNN (:mod:`broker.realbogus`).

    Attributes
    ----------
    arch : str
        Network class name in :data:`broker.realbogus.ARCHITECTURES`.
    max_epochs : int
        Upper bound on passes over the training split; the learning rate follows a one-cycle
        schedule over this many epochs. 8: validation loss still fell slowly at epoch 8.
    patience : int
        Stop after this many epochs without a lower validation loss; keep the best weights.
    batch_size : int
        Triplets per step. 256: ~25% more triplets/s than 128 on 2 CPU cores.
    lr : float
        Peak AdamW learning rate of the one-cycle schedule. Default 3e-3: batch-normalised net.
    weight_decay : float
        Decoupled weight decay (AdamW).
    val_fraction : float
        Fraction held out for validation (early stopping). Split by ``group`` (field) when there
        are at least 5 groups, so that the same source at several epochs is not on both sides.
    width, dense : int
        Network size (see the network classes).
    threads : int
        torch intra-op threads; 0 = automatic: 2 (the build machine's cores) when the 1-min load
        average leaves a core free, else 1. On an oversubscribed 2-core machine two threads
        spin against the other work: measured 155 vs 419 triplets/s (forward + backward, batch
        256, load average 8). The count used is in the report (results can differ in the last
        bits between thread counts).
    max_seconds : float
        Wall-clock budget of the training loop (s), checked after every batch. Default 1500 s
        (25 min): the issue's ~30 min on 2 CPU cores minus loading and evaluation. The default
        epochs of ~87k triplets fit well inside it on the build machine (time in the model card);
        when the budget stops training the one-cycle schedule is cut short (reported).
    p_truncate : float
        Probability that a training triplet has 1-24 rows at one side set to 0, as the
        normaliser pads a ZTF stamp cut at a CCD edge (domain augmentation).
    p_mask : float
        Probability of a random 2-12 px rectangle set to 0 in all channels, as the normaliser
        fills NaN pixels (domain augmentation).
    kind_weight_power : float
        Loss weight of a candidate ~ (share of its kind within its class) ** -power, normalised
        to mean 1 per class: 0 = plain, 1 = every kind counts equally. Default 0.5: the rare
        bogus kinds that look most like reals (dipoles, PSF-mismatch and saturated-star
        residuals on a reference source, 0.1-0.5% of the set each) weigh ~10x a cosmic ray; with
        0 they caused most errors on the held-out set.
    seed : int
    """

    arch: str = "RealBogusNetV2"
    max_epochs: int = 8
    patience: int = 2
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    width: int = 16
    dense: int = 64
    threads: int = 0
    max_seconds: float = 1500.0
    p_truncate: float = 0.1
    p_mask: float = 0.05
    kind_weight_power: float = 0.5
    seed: int = 0


def kind_weights(labels: np.ndarray, kinds: np.ndarray, power: float) -> np.ndarray:
    """Per-candidate loss weights ``(share of kind in its class) ** -power``, mean 1 per class.

    Returns
    -------
    ndarray, shape (N,), float32
    """
    y = np.asarray(labels).astype(int)
    k = np.asarray(kinds).astype(str)
    w = np.ones(len(y), np.float64)
    if power:
        for cls in (0, 1):
            m = y == cls
            uk, inv, cnt = np.unique(k[m], return_inverse=True, return_counts=True)
            wc = (cnt[inv] / m.sum()) ** -power
            w[m] = wc / wc.mean()
    return w.astype(np.float32)


def auto_threads(max_threads: int = 2) -> int:
    """Intra-op threads for this machine now: up to ``max_threads`` cores not already busy."""
    import os

    cores = os.cpu_count() or 1
    free = cores - os.getloadavg()[0]
    return int(max(1, min(max_threads, cores, np.floor(free + 0.5))))


def split_indices(groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices, by group when there are >= 5 groups, else by row."""
    rng = np.random.default_rng(seed)
    ug = np.unique(groups)
    if len(ug) >= 5:
        rng.shuffle(ug)
        n_val = max(1, int(round(val_fraction * len(ug))))
        val = np.isin(groups, ug[:n_val])
    else:
        val = rng.random(len(groups)) < val_fraction
    return np.flatnonzero(~val), np.flatnonzero(val)


def _augment(x: torch.Tensor, gen: torch.Generator, p_truncate: float = 0.0,
             p_mask: float = 0.0) -> torch.Tensor:
    """Random flips and 90-degree rotations (the sky has no up), edge truncation and masks.

    Parameters
    ----------
    x : Tensor, shape (N, 3, 63, 63)
        Normalised triplets (0 = a channel's median, what padding and NaN filling produce).
    gen : torch.Generator
    p_truncate, p_mask : float
        See :class:`TrainConfig`. Applied before the rotation, so any side can be cut.
    """
    n = x.shape[0]
    x = x.clone()
    if p_truncate:
        for i in torch.nonzero(torch.rand(n, generator=gen) < p_truncate).flatten().tolist():
            x[i, :, : int(torch.randint(1, 25, (1,), generator=gen))] = 0.0
    if p_mask:
        for i in torch.nonzero(torch.rand(n, generator=gen) < p_mask).flatten().tolist():
            h, w, y0, x0 = torch.randint(2, 13, (4,), generator=gen).tolist()
            y0, x0 = y0 * 4, x0 * 4  # anywhere in the stamp
            x[i, :, y0 : y0 + h, x0 : x0 + w] = 0.0
    k = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    out = x.clone()
    for r in (1, 2, 3):
        m = k == r
        if m.any():
            out[m] = torch.rot90(x[m], r, dims=(-2, -1))
    return out


def _scores(net: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Sigmoid scores of (N, 3, 63, 63) triplets (any float dtype), in batches, eval mode."""
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch], dtype=np.float32))
            out.append(torch.sigmoid(net(xb)).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def train(
    data: dict[str, np.ndarray],
    config: TrainConfig = TrainConfig(),
    version: str = "realbogus-v1",
    progress: bool = True,
) -> tuple[RealBogusClassifier, dict]:
    """Train the CNN on a loaded training set (:func:`load_training_set`).

    Returns
    -------
    classifier : RealBogusClassifier
        With the best (lowest validation loss) weights.
    report : dict
        ``val`` metrics (:func:`evaluate`, per kind), ``history`` per epoch, sizes, seconds.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.time()
    torch.manual_seed(config.seed)
    threads = config.threads or auto_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(config.seed)
    x, y = data["x"], data["y"].astype(np.float32)  # x may stay float16: batches are cast
    groups = data.get("group", np.zeros(len(y), dtype=str))
    tr, va = split_indices(groups, config.val_fraction, config.seed)
    if len(tr) == 0 or len(va) == 0 or len(np.unique(y[tr])) < 2:
        raise ModelError(f"training set too small or one-class: {len(tr)} train, {len(va)} val")
    yt = torch.from_numpy(y[tr])
    xv, yv = x[va], y[va]
    net = build_net({"name": config.arch, "width": config.width, "dense": config.dense})
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    nb = (len(tr) + config.batch_size - 1) // config.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr,
                                                total_steps=config.max_epochs * nb)
    pos_weight = torch.tensor(float((1 - yt).sum() / max(yt.sum(), 1)))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")
    kinds_all = data.get("kind")
    w_all = torch.from_numpy(kind_weights(y, kinds_all, config.kind_weight_power)
                             if kinds_all is not None else np.ones(len(y), np.float32))
    best, best_loss, bad, hist, out_of_time = None, float("inf"), 0, [], False
    cols = (TextColumn("[bold]real/bogus[/] epoch {task.fields[epoch]}"), BarColumn(),
            TextColumn("{task.completed}/{task.total} batches  loss {task.fields[loss]:.4f}  "
                       "val {task.fields[val]:.4f}"), TimeElapsedColumn())
    with Progress(*cols, disable=not progress) as bar:
        task = bar.add_task("train", total=nb, epoch=0, loss=float("nan"), val=float("nan"))
        for ep in range(config.max_epochs):
            net.train()
            perm = torch.randperm(len(tr), generator=gen)
            bar.reset(task, total=nb, epoch=ep + 1, loss=float("nan"),
                      val=hist[-1]["val_loss"] if hist else float("nan"))
            tot = 0.0
            seen = 0
            for b in range(nb):
                idx = perm[b * config.batch_size : (b + 1) * config.batch_size]
                rows = tr[np.sort(idx.numpy())]  # sorted: faster gather from the big array
                xb = torch.from_numpy(x[rows].astype(np.float32))
                xb = _augment(xb, gen, config.p_truncate, config.p_mask)
                opt.zero_grad()
                loss = (loss_fn(net(xb), torch.from_numpy(y[rows])) * w_all[rows]).mean()
                loss.backward()
                opt.step()
                sched.step()
                tot += loss.item() * len(idx)
                seen += len(idx)
                bar.update(task, advance=1, loss=tot / seen)
                if time.time() - t0 > config.max_seconds:
                    out_of_time = True
                    break
            sv = np.clip(_scores(net, xv), 1e-7, 1 - 1e-7)
            vloss = float(-np.mean(yv * np.log(sv) + (1 - yv) * np.log(1 - sv)))
            bar.update(task, val=vloss)
            hist.append({"epoch": ep + 1, "train_loss": tot / max(seen, 1), "val_loss": vloss,
                         "val_auc": evaluate(sv, yv)["auc"], "batches": b + 1,
                         "seconds": round(time.time() - t0, 1)})
            if progress:
                bar.console.print(f"epoch {ep + 1}: " + ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in hist[-1].items() if k != "epoch"))
            if vloss < best_loss - 1e-4:
                best_loss, bad = vloss, 0
                best = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
            if bad >= config.patience or out_of_time:
                break
    net.load_state_dict(best)
    sv = _scores(net, xv)
    kinds = data.get("kind")
    val = evaluate(sv, yv, 0.5, kinds[va] if kinds is not None else None)
    val["eer_threshold"], val["eer"] = equal_error(sv, yv)
    report = {
        "val": val,
        "history": hist,
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "epochs_run": len(hist),
        "threads": threads,
        "stopped_by": "time budget" if out_of_time else
                      ("early stopping" if bad >= config.patience else "max_epochs"),
        "seconds": round(time.time() - t0, 1),
        "config": asdict(config),
    }
    clf = RealBogusClassifier(net, version, {"training": {k: v for k, v in report.items()
                                                          if k != "history"}})
    return clf, report


# --- real ZTF alerts ------------------------------------------------------------------------------
def ztf_triplets(folder: str | Path, dedupe: bool = True
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Normalised triplets of the real ZTF alerts in ``folder`` with their ZTF scores.

    Parameters
    ----------
    folder : path
        Searched recursively for ``*.avro`` files.
    dedupe : bool
        Keep the first record of each ``candid`` (the sample repositories repeat some alerts).

    Returns
    -------
    x : ndarray, shape (N, 3, 63, 63), float32
    meta : dict of ndarray, shape (N,)
        ``rb``, ``drb`` (NaN where the packet has none), ``candid``, ``objectId``, ``file``,
        ``n_nan`` (non-finite input pixels, all channels) and ``n_pad`` (pixels padded per channel).
    rejected : list of str
        One reason per record that could not be used (JPEG stamps, unreadable files, ...).
    """
    import fastavro

    from broker.realbogus import decode_stamp

    xs, rows, rejected, seen = [], [], [], set()
    for f in sorted(Path(folder).rglob("*.avro")):
        if not f.is_file():
            continue
        try:
            with open(f, "rb") as fh:
                recs = list(fastavro.reader(fh))
        except Exception as exc:  # e.g. snappy codec without cramjam
            rejected.append(f"{f.name}: {exc}")
            continue
        for r in recs:
            cand = r.get("candidate") or {}
            cid = cand.get("candid", r.get("candid"))
            if dedupe and cid is not None and cid in seen:
                continue
            try:
                trip = [decode_stamp((r.get(k) or {}).get("stampData") or b"")
                        for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference")]
                x, flags = normalise_triplet(*trip)
            except CutoutError as exc:
                rejected.append(f"{f.name}: {exc}")
                continue
            seen.add(cid)
            xs.append(x)
            rows.append({"rb": cand.get("rb"), "drb": cand.get("drb"), "candid": cid or 0,
                         "objectId": str(r.get("objectId", "")), "file": f.name,
                         "n_nan": sum(flags.n_nan), "n_pad": flags.n_pad})
    x = np.stack(xs) if xs else np.zeros((0, 3, CUTOUT_SIZE, CUTOUT_SIZE), np.float32)
    meta = {
        "rb": np.array([np.nan if r["rb"] is None else r["rb"] for r in rows], float),
        "drb": np.array([np.nan if r["drb"] is None else r["drb"] for r in rows], float),
        "candid": np.array([r["candid"] for r in rows], dtype=np.int64),
        "objectId": np.array([r["objectId"] for r in rows], dtype=str),
        "file": np.array([r["file"] for r in rows], dtype=str),
        "n_nan": np.array([r["n_nan"] for r in rows], dtype=int),
        "n_pad": np.array([r["n_pad"] for r in rows], dtype=int),
    }
    return x, meta, rejected


def compare_with_ztf(scores: np.ndarray, meta: dict[str, np.ndarray]) -> dict:
    """Our scores against ZTF's ``drb`` and ``rb`` (a reference, not truth).

    Returns
    -------
    dict
        Per reference (``drb``, ``rb``): ``n`` with a score, ``n_real`` above 0.5, ``auc`` of our
        score against reference > 0.5 (NaN with one class), ``spearman`` rank correlation with
        its p-value, ``agree_at_0.5``; plus ``n``, ``mean_score``, ``frac_above_0.5``.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, float)
    out: dict = {"n": int(len(s)),
                 "mean_score": float(np.mean(s)) if len(s) else float("nan"),
                 "frac_above_0.5": float(np.mean(s >= 0.5)) if len(s) else float("nan")}
    for name in ("drb", "rb"):
        v = meta[name]
        ok = np.isfinite(v)
        lab = v[ok] > 0.5
        two = 0 < lab.sum() < ok.sum()
        rho = spearmanr(s[ok], v[ok]) if ok.sum() > 2 else None
        out[name] = {"n": int(ok.sum()), "n_real": int(lab.sum()),
                     "auc": float(roc_auc_score(lab, s[ok])) if two else float("nan"),
                     "spearman": float(rho.statistic) if rho is not None else float("nan"),
                     "spearman_p": float(rho.pvalue) if rho is not None else float("nan"),
                     "agree_at_0.5": float(np.mean((s[ok] >= 0.5) == lab)) if ok.any()
                     else float("nan")}
    return out


def evaluate_on_ztf(clf: RealBogusClassifier, folder: str | Path) -> dict:
    """:func:`compare_with_ztf` of ``clf`` on the alerts of ``folder`` (+ ``n_rejected``)."""
    x, meta, rejected = ztf_triplets(folder)
    out = compare_with_ztf(clf.score(x) if len(x) else np.zeros(0), meta)
    out["n_rejected"] = len(rejected)
    return out


# --- evaluation report ----------------------------------------------------------------------------
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
                       snr: np.ndarray | None = None, threshold: float = 0.5) -> dict:
    """Held-out metrics: :func:`evaluate` at ``threshold`` and at the equal-error threshold.

    Returns
    -------
    dict
        ``at_threshold`` and ``at_eer`` (:func:`evaluate`, with ``per_kind``), ``eer_threshold``,
        ``eer``, and ``fnr_by_snr`` (real candidates: FNR at ``threshold`` per S/N bin).
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
            for lo, hi in zip(bins[:-1], bins[1:])
            for m in [real & (snr >= lo) & (snr < hi)]
        ]
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
            "centre": float(np.median(c[:, 29:34, 29:34].mean(axis=(1, 2)))),
            "frac_gt3": float(np.mean(c > 3)),
            "frac_zero": float(np.mean(c == 0)),
            "p99": float(np.median(np.percentile(c.reshape(len(c), -1), 99, axis=1))),
        }
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """ROC curves ``{name: (scores, labels)}`` on one plot (log FPR axis)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=80)
    for name, (s, y) in curves.items():
        if 0 < np.sum(y) < len(y):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(np.maximum(fpr, 1e-4), tpr, label=f"{name} (AUC {roc_auc_score(y, s):.4f})")
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_xlabel("false positive rate (bogus kept)")
    ax.set_ylabel("true positive rate (reals kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_histograms(groups: dict[str, np.ndarray], path: Path, title: str,
                    threshold: float | None = None) -> Path:
    """Score histograms, one per group ``{name: scores}`` (log counts)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=80)
    bins = np.linspace(0, 1, 41)
    for name, s in groups.items():
        if len(s):
            ax.hist(s, bins=bins, histtype="step", lw=1.5, label=f"{name} (n={len(s)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("real/bogus score")
    ax.set_ylabel("candidates")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_triplet_grid(x: np.ndarray, captions: Sequence[str], path: Path, title: str,
                      dpi: int = 45) -> Path:
    """Rows of normalised triplets (science | reference | difference) with a caption each.

    ``dpi`` 45 gives ~45 px per stamp: a 20-triplet grid stays under ~150 KB (noise does not
    compress); use more for short grids that must be read closely.
    """
    plt = _plt()
    n = len(x)
    cols = 2  # two triplets per row
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(7.5, 1.35 * rows + 0.4), dpi=dpi,
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i in range(n):
        r, c = divmod(i, cols)
        for ch in range(3):
            ax = axes[r, 3 * c + ch]
            ax.imshow(x[i, ch], origin="lower", cmap="gray", vmin=-5, vmax=20)
        axes[r, 3 * c].set_title(captions[i], fontsize=7, loc="left")
    fig.suptitle(f"{title}  (science | reference | difference, normalised)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _examples(s: np.ndarray, y: np.ndarray, kinds: np.ndarray, threshold: float,
              rng: np.random.Generator, per: int = 1) -> np.ndarray:
    """Indices: ``per`` random examples of each kind, plus the worst misclassified ones."""
    idx = []
    for k in sorted(set(kinds.tolist())):
        m = np.flatnonzero(kinds == k)
        idx += rng.choice(m, min(per, len(m)), replace=False).tolist()
    wrong = np.flatnonzero((s >= threshold) != (y == 1))
    worst = wrong[np.argsort(-np.abs(s[wrong] - threshold))][:4]
    return np.array(idx + [int(i) for i in worst if i not in idx], dtype=int)


def main_eval(
    model: str | Path | None = None,
    out_dir: str | Path = "reports/realbogus",
    sim_dir: str | Path | None = None,
    ztf_dir: str | Path | None = None,
    *,
    threshold: float = 0.5,
    max_sim: int | None = None,
    compare: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Evaluate a real/bogus model and write ``report.md``, ``metrics.json`` and PNG plots.

    Parameters
    ----------
    model : str or path, optional
        Version (``realbogus-v2``) or weights path; default the classifier's default version.
    out_dir : path
        Report folder (created).
    sim_dir : path, optional
        Held-out simulated set (shards + manifest of :func:`generate_training_set`, made with a
        seed the model was not trained on). Default ``build/realbogus-test-1`` when present.
    ztf_dir : path, optional
        Real ZTF alerts; default ``../shared/data/ztf_alerts`` when present.
    threshold : float
        The operating threshold reported (FNR/FPR at it).
    max_sim : int, optional
        Use only the first ``max_sim`` held-out candidates (quick runs, tests).
    compare : str or path, optional
        A second model (e.g. ``realbogus-v1``) evaluated on the same data for the comparison.
    seed : int
        Picks the example triplets.

    Returns
    -------
    dict
        The metrics (also in ``metrics.json``).
    """
    root = Path(__file__).resolve().parent.parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clf = RealBogusClassifier.load(model)
    other = RealBogusClassifier.load(compare) if compare else None
    rng = np.random.default_rng(seed)
    if sim_dir is None:
        cand = root / "build" / "realbogus-test-1"
        sim_dir = cand if (cand / "manifest.json").is_file() else None
    if ztf_dir is None:
        cand = root.parent / "shared" / "data" / "ztf_alerts"
        ztf_dir = cand if cand.is_dir() else None
    res: dict = {"model": clf.version, "threshold": threshold, "files": {}}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if sim_dir is not None:
        d = load_training_set(sim_dir, np.float16)
        n = len(d["y"]) if max_sim is None else min(max_sim, len(d["y"]))
        x, y, kinds, snr = d["x"][:n], d["y"][:n].astype(int), d["kind"][:n], d["snr"][:n]
        s = _scores(clf.net, x)
        man = json.loads((Path(sim_dir) / "manifest.json").read_text())
        res["sim"] = {"dir": str(sim_dir), "seed": man.get("seed"), "n": int(n),
                      **evaluate_simulated(s, y, kinds, snr, threshold)}
        curves[f"{clf.version}, simulated held-out"] = (s, y)
        res["sim"]["domain"] = {"real": domain_stats(x[y == 1]), "bogus": domain_stats(x[y == 0])}
        if other is not None:
            so = _scores(other.net, x)
            res["sim_compare"] = {"model": other.version,
                                  **evaluate_simulated(so, y, kinds, snr, threshold)}
            curves[f"{other.version}, simulated held-out"] = (so, y)
        groups = {"real": s[y == 1], "bogus": s[y == 0]}
        res["files"]["hist_sim"] = plot_histograms(groups, out / "hist_sim.png",
                                                   "held-out simulated candidates", threshold).name
        ex = _examples(s, y, kinds, threshold, rng)
        caps = [f"{kinds[i]} {'R' if y[i] else 'B'} s={s[i]:.2f} snr={snr[i]:.0f}" for i in ex]
        res["files"]["examples_sim"] = plot_triplet_grid(
            x[ex].astype(np.float32), caps, out / "examples_sim.png",
            "simulated held-out: examples per kind, then worst errors").name
    if ztf_dir is not None:
        xz, meta, rejected = ztf_triplets(ztf_dir)
        sz = clf.score(xz) if len(xz) else np.zeros(0)
        reasons = Counter(r.split(": ", 1)[-1].split(" (")[0][:60] for r in rejected)
        res["ztf"] = {"dir": str(ztf_dir), "n_rejected": len(rejected),
                      "rejected_reasons": dict(reasons.most_common()),
                      "n_repaired": int(np.sum((meta["n_nan"] > 0) | (meta["n_pad"] > 0))),
                      "domain": domain_stats(xz) if len(xz) else {},
                      **compare_with_ztf(sz, meta)}
        if other is not None and len(xz):
            res["ztf_compare"] = {"model": other.version, **compare_with_ztf(other.score(xz), meta)}
        ok = np.isfinite(meta["drb"])
        if ok.any():
            curves[f"{clf.version} vs ZTF drb>0.5"] = (sz[ok], (meta["drb"][ok] > 0.5).astype(int))
            gz = {"ZTF drb > 0.5": sz[ok & (meta["drb"] > 0.5)],
                  "ZTF drb <= 0.5": sz[ok & (meta["drb"] <= 0.5)],
                  "no drb (older packets)": sz[~ok]}
        else:
            gz = {"all": sz}
        res["files"]["hist_ztf"] = plot_histograms(gz, out / "hist_ztf.png",
                                                   "real ZTF alerts, by ZTF's drb", threshold).name
        ref = np.where(ok, meta["drb"], meta["rb"])
        gap = np.abs(sz - np.nan_to_num(ref, nan=0.5))
        worst = np.argsort(-gap)[:10]
        res["ztf"]["disagreements"] = [
            {"objectId": str(meta["objectId"][i]), "candid": int(meta["candid"][i]),
             "score": float(sz[i]), "drb": float(meta["drb"][i]), "rb": float(meta["rb"][i])}
            for i in worst]
        caps = [f"{meta['objectId'][i]} ours={sz[i]:.2f} drb={meta['drb'][i]:.2f} "
                f"rb={meta['rb'][i]:.2f}" for i in worst]
        res["files"]["disagree_ztf"] = plot_triplet_grid(
            xz[worst], caps, out / "disagree_ztf.png",
            "ZTF: largest |ours - drb (or rb)|", dpi=70).name
        typical = rng.choice(len(xz), min(6, len(xz)), replace=False)
        caps = [f"{meta['objectId'][i]} ours={sz[i]:.2f} drb={meta['drb'][i]:.2f}"
                for i in typical]
        res["files"]["examples_ztf"] = plot_triplet_grid(
            xz[typical], caps, out / "examples_ztf.png", "ZTF: random examples").name
    if res.get("sim_compare") or res.get("ztf_compare"):
        res["promotion"] = promotion_check(res)
    if curves:
        res["files"]["roc"] = plot_roc(curves, out / "roc.png").name
    (out / "metrics.json").write_text(json.dumps(res, indent=2, sort_keys=True, default=float))
    write_eval_report(out / "report.md", res)
    return res


#: Largest drop of an AUC against ZTF's scores still counted as "not worse" (a fraction of the
#: AUC's standard error with ~10 negatives, which is ~0.05-0.1).
ZTF_AUC_TOLERANCE = 0.01


def promotion_check(res: dict) -> dict:
    """Whether the evaluated model should replace the compared one as the default.

    Rule (issue 4): better on the held-out simulated set (lower FNR = FPR and AUC not lower)
    and not worse on the real ZTF triplets (AUC against drb > 0.5 and rb > 0.5 each at most
    :data:`ZTF_AUC_TOLERANCE` lower).
    """
    out: dict = {"against": (res.get("sim_compare") or res.get("ztf_compare"))["model"]}
    sim, simc = res.get("sim"), res.get("sim_compare")
    if sim and simc:
        out["sim_better"] = bool(sim["eer"] < simc["eer"] and
                                 sim["at_threshold"]["auc"] >= simc["at_threshold"]["auc"])
    z, zc = res.get("ztf"), res.get("ztf_compare")
    if z and zc:
        out["ztf_not_worse"] = bool(all(
            not np.isfinite(zc[k]["auc"]) or z[k]["auc"] >= zc[k]["auc"] - ZTF_AUC_TOLERANCE
            for k in ("drb", "rb")))
    out["promote"] = bool(out.get("sim_better", False) and out.get("ztf_not_worse", False))
    return out


TARGETS = {
    "eer": ("FNR = FPR on the held-out simulated set", 0.01, "<="),
    "ztf_auc_drb": ("AUC against ZTF drb > 0.5 on real ZTF triplets", 0.95, ">="),
}


def write_eval_report(path: Path, res: dict) -> Path:
    """Markdown report of :func:`main_eval`'s results (every number from ``res``)."""
    L = [f"# Real/bogus evaluation: `{res['model']}`", ""]
    sim = res.get("sim")
    if sim:
        a, e = sim["at_threshold"], sim["at_eer"]
        L += ["## Held-out simulated candidates", "",
              f"{sim['n']} candidates ({a['n_real']} real, {a['n_bogus']} bogus) from "
              f"`{sim['dir']}` (generator seed {sim['seed']}, never seen in training).", "",
              "| metric | value | target |", "|---|---|---|",
              f"| ROC AUC | {_fmt(a['auc'], 5)} | |",
              f"| FNR at {res['threshold']} | {_fmt(a['fnr'], 4)} | |",
              f"| FPR at {res['threshold']} | {_fmt(a['fpr'], 4)} | |",
              f"| threshold where FNR = FPR | {_fmt(sim['eer_threshold'], 3)} | |",
              f"| FNR = FPR there | {_fmt(sim['eer'], 4)} | <= {TARGETS['eer'][1]} "
              f"({'met' if sim['eer'] <= TARGETS['eer'][1] else 'NOT met'}) |"]
        if res.get("sim_compare"):
            c = res["sim_compare"]
            L += [f"| {c['model']}: AUC / FNR=FPR | {_fmt(c['at_threshold']['auc'], 5)} / "
                  f"{_fmt(c['eer'], 4)} | |"]
        L += ["", f"Per kind (misclassified fraction at {res['threshold']} and at the "
              f"equal-error threshold {_fmt(sim['eer_threshold'], 3)}):", "",
              "| kind | n | at threshold | at FNR=FPR |", "|---|---|---|---|"]
        for k, d in sorted(a["per_kind"].items()):
            L.append(f"| {k} | {d['n']} | {_fmt(d['misclassified'], 4)} | "
                     f"{_fmt(e['per_kind'][k]['misclassified'], 4)} |")
        if sim.get("fnr_by_snr"):
            L += ["", "FNR of real candidates by measured S/N:", "", "| S/N | n | FNR |",
                  "|---|---|---|"]
            L += [f"| {b['snr_lo']}-{b['snr_hi']} | {b['n']} | {_fmt(b['fnr'], 4)} |"
                  for b in sim["fnr_by_snr"] if b["n"]]
        L += ["", "![score histograms](hist_sim.png)", "", "![examples](examples_sim.png)", ""]
    z = res.get("ztf")
    if z:
        d = z["drb"]
        L += ["## Real ZTF alerts", "",
              f"{z['n']} unique ZTF triplets from `{z['dir']}` ({z['n_rejected']} records "
              f"rejected: {json.dumps(z['rejected_reasons'])}; {z['n_repaired']} had NaNs "
              "filled or were padded). ZTF's scores are a reference, not truth: the public "
              "sample alerts are nearly all real.", "",
              "| reference | n | n > 0.5 | AUC of our score | Spearman | agreement at 0.5 |",
              "|---|---|---|---|---|---|"]
        for name in ("drb", "rb"):
            r = z[name]
            L.append(f"| ZTF {name} | {r['n']} | {r['n_real']} | {_fmt(r['auc'])} | "
                     f"{_fmt(r['spearman'])} (p={r['spearman_p']:.1g}) | "
                     f"{_fmt(r['agree_at_0.5'])} |")
        if res.get("ztf_compare"):
            c = res["ztf_compare"]
            L.append(f"| {c['model']}: ZTF drb | {c['drb']['n']} | {c['drb']['n_real']} | "
                     f"{_fmt(c['drb']['auc'])} | {_fmt(c['drb']['spearman'])} | "
                     f"{_fmt(c['drb']['agree_at_0.5'])} |")
        neg = d["n"] - d["n_real"]
        L += ["", f"Target: AUC >= {TARGETS['ztf_auc_drb'][1]} against drb > 0.5: "
              f"{'met' if d['auc'] >= TARGETS['ztf_auc_drb'][1] else 'NOT met'} "
              f"({_fmt(d['auc'])}, with only {neg} triplets at drb <= 0.5, so the AUC's "
              f"standard error is about {_fmt(_auc_se(d['auc'], d['n_real'], neg), 2)}).",
              f"Fraction of the ZTF triplets we score >= {res['threshold']}: "
              f"{_fmt(z['frac_above_0.5'])}.", "",
              "![score histograms](hist_ztf.png)", "", "Largest disagreements:", "",
              "![disagreements](disagree_ztf.png)", "", "![examples](examples_ztf.png)", ""]
    if sim and z and z.get("domain"):
        L += ["## Our stamps and ZTF's after normalisation", "",
              "Per channel, in normalised units (median over triplets): mean of the central 5x5 "
              "px / fraction of pixels above 3 / fraction exactly 0 (NaN-filled or padded) / "
              "99th percentile.", "",
              "| channel | ours, real | ours, bogus | ZTF |", "|---|---|---|---|"]
        def f(d: dict) -> str:
            return " / ".join(_fmt(d[k], 3) for k in ("centre", "frac_gt3", "frac_zero", "p99"))

        for ch in ("science", "reference", "difference"):
            L.append(f"| {ch} | {f(sim['domain']['real'][ch])} | {f(sim['domain']['bogus'][ch])} "
                     f"| {f(z['domain'][ch])} |")
        L.append("")
    if res.get("promotion"):
        p = res["promotion"]
        L += ["## Against the previous model", "",
              f"Compared with `{p['against']}` on the same data: better on the held-out "
              f"simulated set: {p.get('sim_better')}; not worse on ZTF (AUC against drb and rb "
              f"each within {ZTF_AUC_TOLERANCE}): {p.get('ztf_not_worse')}. "
              f"**Promote to default: {p['promote']}.**", ""]
    if "roc" in res["files"]:
        L += ["## ROC", "", "![ROC](roc.png)", ""]
    path.write_text("\n".join(L))
    return path


def _auc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC with these class sizes."""
    if not (np.isfinite(auc) and n_pos and n_neg):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    v = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc ** 2) + (n_neg - 1) * (q2 - auc ** 2))
    return float(np.sqrt(max(v, 0.0) / (n_pos * n_neg)))


# --- model card + end to end ----------------------------------------------------------------------
def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def write_model_card(path: str | Path, version: str, manifest: dict, report: dict,
                     evaluation: dict, command: str, arch: dict) -> Path:
    """Markdown model card: data, version, training, held-out and ZTF metrics, how to retrain.

    Every number comes from ``manifest`` (:func:`generate_training_set`), ``report``
    (:func:`train`) and ``evaluation`` (:func:`main_eval`).
    """
    cfg = report["config"]
    L = [
        f"# Real/bogus classifier `{version}`", "",
        f"`broker.realbogus.{arch['name']}` (width {arch['width']}, dense {arch['dense']}; "
        f"{arch.get('n_params', '?')} parameters, {arch.get('mflops', '?')} MFLOP per triplet) "
        "on (science, reference, difference) 63x63 triplets scaled by "
        "`broker.realbogus.normalise_triplet` (median / 1.4826 MAD per channel, asinh beyond 5 "
        "sigma, NaN and padding set to 0). Output: P(real) in [0, 1]; the score is always kept "
        "and any cut is configuration. Loaded by version "
        f"(`RealBogusClassifier.load('{version}')`), which the classify stage writes into every "
        "alert.", "",
        "## Training data", "",
        f"- source: **{manifest.get('source')}** (simulate -> reference -> ZOGY subtraction -> "
        f"detection, labelled from the injection truth), generator seed {manifest.get('seed')}; "
        f"{manifest.get('n')} candidates, {manifest.get('n_real')} real / "
        f"{manifest.get('n_bogus')} bogus (balanced), {len(manifest.get('shards', []))} "
        f".npz shards, generated in {manifest.get('seconds')} s",
        f"- written, by kind: `{json.dumps(manifest.get('counts_by_kind'), sort_keys=True)}`",
        f"- seen before balancing: "
        f"`{json.dumps(manifest.get('counts_by_kind_before_balancing'), sort_keys=True)}`",
        f"- generator config: `{json.dumps(manifest.get('config'), sort_keys=True)}`",
        f"- pipeline code: {manifest.get('pipeline_commit', 'not recorded (made before it was)')}"
        , "",
        "## Training", "",
        f"{report['n_train']} training / {report['n_val']} validation candidates (split by "
        f"field); {report['epochs_run']} epochs ({report['stopped_by']}), {report['seconds']} s "
        f"on {report['threads']} CPU thread(s) (2-core machine shared with other work); "
        f"AdamW one-cycle lr {cfg['lr']}, batch "
        f"{cfg['batch_size']}, flips + 90 degree rotations, edge truncation p={cfg['p_truncate']}"
        f", NaN-like masks p={cfg['p_mask']}; loss weight per kind ~ share^-"
        f"{cfg.get('kind_weight_power', 0)}; seed {cfg['seed']}. Validation split (held-out "
        f"fields, same generator run and pipeline code as training): AUC "
        f"{_fmt(report['val']['auc'], 5)}, FNR = FPR {_fmt(report['val'].get('eer'), 4)} at "
        f"threshold {_fmt(report['val'].get('eer_threshold'), 3)}.", "",
    ]
    sim, z = evaluation.get("sim"), evaluation.get("ztf")
    if sim:
        a = sim["at_threshold"]
        L += ["## Held-out simulated set", "",
              f"{sim['n']} candidates from generator seed {sim['seed']} (other fields, never "
              "seen in training):", "",
              "| metric | value |", "|---|---|",
              f"| ROC AUC | {_fmt(a['auc'], 5)} |",
              f"| FNR / FPR at {evaluation['threshold']} | {_fmt(a['fnr'], 4)} / "
              f"{_fmt(a['fpr'], 4)} |",
              f"| FNR = FPR | {_fmt(sim['eer'], 4)} at threshold "
              f"{_fmt(sim['eer_threshold'], 3)} |", ""]
    if z:
        L += ["## Real ZTF alerts (ZTF's scores as a reference, not truth)", "",
              "| reference | n | n > 0.5 | AUC | Spearman |", "|---|---|---|---|---|"]
        for name in ("drb", "rb"):
            r = z[name]
            L.append(f"| {name} | {r['n']} | {r['n_real']} | {_fmt(r['auc'])} | "
                     f"{_fmt(r['spearman'])} |")
        L.append("")
    L += ["Full report with per-kind errors, S/N dependence, plots and example triplets: "
          "`broker eval-realbogus` (the shipped one is in `docs/realbogus-report/`).", "",
          "## Reproduce", "", "```", command, "```", "",
          "## Limits", "",
          "- Trained on simulated frames only; the domain gap to a given telescope is unknown "
          "until labelled real candidates from it are available. ZTF comparisons rest on a few "
          "public sample alerts, almost all real.",
          "- Bogus types the pipeline rarely emits (dipoles, PSF-mismatch residuals, trails) "
          "are few in the data even after round-robin sampling; see the per-kind counts.",
          "- Labels and the bogus mix depend on the subtraction and detection code: a set made "
          "before the detection learnt to reject sharp peaks itself is dominated by cosmic rays, "
          "one made after it by noise peaks and residuals. Regenerate the sets (same command) "
          "after such changes.", ""]
    p = Path(path)
    p.write_text("\n".join(L))
    return p


def model_cost(net: nn.Module) -> dict:
    """Parameters and forward FLOPs per triplet (torch's FlopCounterMode: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    net.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, 3, CUTOUT_SIZE, CUTOUT_SIZE))
    return {"n_params": int(sum(p.numel() for p in net.parameters())),
            "mflops": round(fc.get_total_flops() / 1e6, 2)}


def _ensure_set(path: Path, config: TrainingSetConfig, progress: bool) -> dict:
    """Manifest of the set at ``path``, generating it unless a complete one with ``config`` is there."""
    mp = path / "manifest.json"
    if mp.is_file():
        man = json.loads(mp.read_text())
        if man.get("complete") and man.get("config") == _config_dict(config):
            return man
    return generate_training_set(path, config, progress)


def main_train(
    out_dir: str | Path = MODELS_DIR,
    seed: int = 0,
    *,
    version: str = "realbogus-v2",
    target_n: int = 100_000,
    test_n: int = 10_000,
    data_dir: str | Path | None = None,
    test_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    train_config: TrainConfig | None = None,
    workers: int = 1,
    ztf_dir: str | Path | None = None,
    compare: str | None = "realbogus-v1",
    anomaly_version: str | None = None,
    progress: bool = True,
) -> dict:
    """Generate the data, train the real/bogus CNN, evaluate it and write weights + model card.

    Parameters
    ----------
    out_dir : path
        Where ``<version>.pt``, ``.json`` and ``.md`` are written. Default ``models/``.
    seed : int
        Seeds the training set (generator seed ``seed``), the held-out set (``seed + 1``) and
        training: same seed, same model (on the same torch build).
    version : str
    target_n : int
        Balanced training candidates to generate (>= 100k for the shipped model).
    test_n : int
        Held-out candidates (other seed, other fields).
    data_dir, test_dir : path, optional
        Shard folders; default ``build/realbogus-train-<seed>`` and ``build/realbogus-test-<seed+1>``.
        A complete set with the same config is reused, not regenerated.
    report_dir : path, optional
        Evaluation report folder; default ``reports/<version>``.
    train_config : TrainConfig, optional
    workers : int
        Generator processes (2 on an idle 2-core machine).
    ztf_dir : path, optional
        Real ZTF alerts (default ``../shared/data/ztf_alerts`` when present).
    compare : str, optional
        Model evaluated beside the new one in the report.
    anomaly_version : str, optional
        Also fit and write the anomaly model under this version from the training set.
    progress : bool
        Progress bars.

    Returns
    -------
    dict
        ``manifest``, ``report`` (training), ``evaluation`` (:func:`main_eval`), paths, seconds.
    """
    t0 = time.time()
    root = Path(__file__).resolve().parent.parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir else root / "build" / f"realbogus-train-{seed}"
    test = Path(test_dir) if test_dir else root / "build" / f"realbogus-test-{seed + 1}"
    manifest = _ensure_set(data, TrainingSetConfig(target_n=target_n, seed=seed,
                                                   workers=workers), progress)
    _ensure_set(test, TrainingSetConfig(target_n=test_n, seed=seed + 1, workers=workers),
                progress)
    t_gen = time.time() - t0
    ds = load_training_set(data, np.float16)
    cfg = train_config or TrainConfig(seed=seed)
    clf, report = train(ds, cfg, version, progress)
    arch = {**clf.net.arch, **model_cost(clf.net)}
    cmd = (f"broker train-realbogus --seed {seed} --target-n {target_n} --version {version}  "
           f"# = broker.training.main_train(seed={seed}, target_n={target_n}, "
           f"version='{version}')")
    clf.metadata.update({"data": {k: manifest.get(k) for k in
                                  ("source", "seed", "n", "n_real", "n_bogus", "counts_by_kind",
                                   "config")},
                         "cost": arch, "reproduce": cmd})
    wpath = clf.save(out / version)
    evaluation = main_eval(wpath, report_dir or root / "reports" / version, test, ztf_dir,
                           compare=compare if compare and compare != version else None)
    clf.metadata.update({"evaluation": {k: evaluation.get(k) for k in ("sim", "ztf")}})
    for part in ("sim", "ztf"):  # keep the sidecar small: no per-example lists
        if clf.metadata["evaluation"].get(part):
            clf.metadata["evaluation"][part] = {
                k: v for k, v in clf.metadata["evaluation"][part].items()
                if k not in ("disagreements", "at_eer")}
    clf.save(out / version)
    write_model_card(out / f"{version}.md", version, manifest, report, evaluation, cmd, arch)
    result = {"manifest": manifest, "report": report, "evaluation": evaluation,
              "weights": str(wpath), "seconds_generate": round(t_gen, 1)}
    feats, labels = ds.get("features"), ds["y"]
    if anomaly_version and feats is not None and feats.ndim == 2 and (labels == 1).sum() >= 50:
        amodel = fit_anomaly(feats[labels == 1], AnomalyConfig(seed=seed), anomaly_version,
                             {"data": f"real-labelled pipeline candidates of {data.name}",
                              "reproduce": cmd})
        result["anomaly"] = str(amodel.save(out / anomaly_version))
        write_anomaly_card(out / f"{anomaly_version}.md", amodel, feats, labels, cmd)
    result["seconds_total"] = round(time.time() - t0, 1)
    return result


def write_anomaly_card(path: str | Path, model, feats: np.ndarray, labels: np.ndarray,
                       command: str) -> Path:
    """Markdown card of the anomaly model with score quantiles on its data and on bogus."""
    from broker.anomaly import FEATURE_NAMES

    s_real = model.score(feats[labels == 1])
    s_bog = model.score(feats[labels == 0]) if (labels == 0).any() else np.zeros(0)
    q = lambda s: ", ".join(f"{v:.2f}" for v in np.quantile(s, [0.1, 0.5, 0.9])) if len(s) else "n/a"  # noqa: E731
    lines = [
        f"# Anomaly model `{model.version}`", "",
        f"Gaussian mixture ({len(model.weights)} full-covariance components) over the standardised "
        f"features `{', '.join(FEATURE_NAMES)}` (`broker.anomaly.features_from`). Raw score = "
        "negative log-likelihood; the score in [0, 1] is its empirical CDF over the training "
        "detections (0.99 = rarer than 99% of ordinary detections). Stored without pickle "
        "(`.npz` arrays + JSON).", "",
        "## Data", "",
        f"{int((labels == 1).sum())} real-labelled candidates (transients, variables, movers "
        "matched to the injection truth) from the simulated pipeline, histories from the truth "
        "association of earlier epochs.", "",
        "## Behaviour", "",
        f"- score quantiles (10/50/90%) on the training detections: {q(s_real)}",
        f"- on bogus candidates of the same set (never fitted on): {q(s_bog)}", "",
        "## Reproduce", "", "```", command, "```", "",
        "## Limits", "",
        "- 'Ordinary' means ordinary in the simulator; it knows nothing of real populations.",
        "- Light-curve features are crude (count, age, last rate); no colours or periodicity.", "",
    ]
    p = Path(path)
    p.write_text("\n".join(lines))
    return p
