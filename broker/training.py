"""Training sets, training loop and evaluation of the real/bogus CNN (and the anomaly model's data).

The training set comes from the project's own chain: the sky simulator makes frames of a few fields
over several epochs, the first epochs are co-added into a reference, every later frame goes
through subtraction and detection, and each candidate is labelled from the injection truth by
position (see :class:`TrainingSetConfig`). Extra transients can be injected (through the
simulator's own configuration) to balance the classes. Candidates are written as compressed
``.npz`` shards of normalised triplets, with a JSON manifest of counts, seed and configuration.

:func:`synth_triplets` is a stamp-level generator (no frames) used by the tests and to check the
training loop quickly; it is not what the shipped model is trained on unless the manifest says so.

One call does everything: :func:`main_train`.
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
        Subtraction costs ~1 s per 1k x 1k frame whatever it holds, so frames are packed:
        ~220 transients and ~220 cosmic rays give ~200 real and ~250 bogus candidates a frame.
    n_cosmic_rays : float
        Mean cosmic-ray hits per frame (simulator knob; its default is 150 per frame).
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
    n_transients: int = 220
    n_cosmic_rays: float = 220.0
    transient_snr_range: tuple[float, float] = (4.0, 100.0)
    fwhm_range: tuple[float, float] = (1.3, 3.5)
    sky_range: tuple[float, float] = (100.0, 3000.0)
    bright_star_mag_range: tuple[float, float] = (9.0, 12.0)
    saturation_range: tuple[float, float] = (20000.0, 60000.0)
    p_misalign: float = 0.3
    misalign_px: tuple[float, float] = (0.3, 1.2)
    p_psf_error: float = 0.25
    psf_blur_px: tuple[float, float] = (0.6, 1.5)
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
        transient_on_galaxy=0.4,
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
                                             for e in range(n_ref)], ref_mod.ReferenceConfig())
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
            result = sub_mod.subtract_and_detect(frame, ref_e, sub_mod.SubtractConfig())
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
        if len(buf) > self.max_buffer:
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
        schedule over this many epochs.
    patience : int
        Stop after this many epochs without a lower validation loss; keep the best weights.
    batch_size : int
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
        torch intra-op threads. Default 2: the 2 cores of the build machine.
    max_seconds : float
        Wall-clock budget of the training loop (s), checked after every batch. Default 1500 s
        (25 min): with data generation the one command stays near 30 min on 2 cores... for data
        already generated.
    p_truncate : float
        Probability that a training triplet has 1-24 rows at one side set to 0, as the
        normaliser pads a ZTF stamp cut at a CCD edge (domain augmentation).
    p_mask : float
        Probability of a random 2-12 px rectangle set to 0 in all channels, as the normaliser
        fills NaN pixels (domain augmentation).
    seed : int
    """

    arch: str = "RealBogusNetV2"
    max_epochs: int = 8
    patience: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    width: int = 16
    dense: int = 64
    threads: int = 2
    max_seconds: float = 1500.0
    p_truncate: float = 0.1
    p_mask: float = 0.05
    seed: int = 0


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
    torch.set_num_threads(config.threads)
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
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
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
                loss = loss_fn(net(xb), torch.from_numpy(y[rows]))
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
    report = {
        "val": evaluate(sv, yv, 0.5, kinds[va] if kinds is not None else None),
        "history": hist,
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "epochs_run": len(hist),
        "stopped_by": "time budget" if out_of_time else
                      ("early stopping" if bad >= config.patience else "max_epochs"),
        "seconds": round(time.time() - t0, 1),
        "config": asdict(config),
    }
    clf = RealBogusClassifier(net, version, {"training": {k: v for k, v in report.items()
                                                          if k != "history"}})
    return clf, report


# --- real ZTF alerts ------------------------------------------------------------------------------
def ztf_triplets(folder: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Normalised triplets of the real ZTF alerts in ``folder`` with their ZTF scores.

    Returns
    -------
    x : ndarray, shape (N, 3, 63, 63), float32
    scores : dict
        ``rb``, ``drb`` (NaN where the packet has none), shape (N,).
    rejected : list of str
        One reason per record that could not be used (JPEG stamps, unreadable files, ...).
    """
    import fastavro

    from broker.realbogus import decode_stamp

    xs, rb, drb, rejected = [], [], [], []
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
            try:
                trip = [decode_stamp((r.get(k) or {}).get("stampData") or b"")
                        for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference")]
                x, _ = normalise_triplet(*trip)
            except CutoutError as exc:
                rejected.append(f"{f.name}: {exc}")
                continue
            cand = r.get("candidate") or {}
            xs.append(x)
            rb.append(cand.get("rb") if cand.get("rb") is not None else np.nan)
            drb.append(cand.get("drb") if cand.get("drb") is not None else np.nan)
    x = np.stack(xs) if xs else np.zeros((0, 3, CUTOUT_SIZE, CUTOUT_SIZE), np.float32)
    return x, {"rb": np.array(rb, float), "drb": np.array(drb, float)}, rejected


def evaluate_on_ztf(clf: RealBogusClassifier, folder: str | Path) -> dict:
    """AUC of our score against ZTF's ``drb > 0.5`` and ``rb > 0.5`` (a reference, not truth)."""
    from sklearn.metrics import roc_auc_score

    x, z, rejected = ztf_triplets(folder)
    s = clf.score(x) if len(x) else np.zeros(0)
    out: dict = {"n": int(len(x)), "n_rejected": len(rejected),
                 "mean_score": float(np.mean(s)) if len(s) else float("nan"),
                 "frac_above_0.5": float(np.mean(s >= 0.5)) if len(s) else float("nan")}
    for name, v in z.items():
        ok = np.isfinite(v)
        lab = v[ok] > 0.5
        out[name] = {"n": int(ok.sum()), "n_real": int(lab.sum()),
                     "auc": float(roc_auc_score(lab, s[ok])) if 0 < lab.sum() < ok.sum()
                     else float("nan"),
                     "agree_at_0.5": float(np.mean((s[ok] >= 0.5) == lab)) if ok.any()
                     else float("nan")}
    return out


# --- model card + end to end ----------------------------------------------------------------------
def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def write_model_card(path: str | Path, version: str, manifest: dict, report: dict,
                     ztf: dict | None, command: str) -> Path:
    """Markdown model card: data, version, held-out metrics, ZTF comparison, how to retrain."""
    v = report["val"]
    lines = [
        f"# Real/bogus classifier `{version}`", "",
        "A braai-class CNN (`broker.realbogus.RealBogusNet`: 3 conv blocks of 2 convs + max-pool, "
        f"widths {report['config']['width']}/{2 * report['config']['width']}/"
        f"{4 * report['config']['width']}, dense {report['config']['dense']}) on "
        "(science, reference, difference) 63x63 triplets scaled by "
        "`broker.realbogus.normalise_triplet` (median / 1.4826 MAD per channel, asinh beyond 5 "
        "sigma, NaN and padding set to 0). Output: P(real) in [0, 1]; the score is always kept and "
        "any cut is configuration.", "",
        "## Training data", "",
        f"- source: **{manifest.get('source')}** (seed {manifest.get('seed')}); "
        f"{manifest.get('n')} candidates, {manifest.get('n_real')} real / "
        f"{manifest.get('n_bogus')} bogus after balancing",
        f"- counts by kind: `{json.dumps(manifest.get('counts_by_kind'), sort_keys=True)}`",
        f"- before balancing: `{json.dumps(manifest.get('counts_by_kind_before_balancing'), sort_keys=True)}`",
        f"- generator config: `{json.dumps(manifest.get('config'), sort_keys=True)}`",
        f"- generation wall time: {manifest.get('seconds')} s", "",
        "## Held-out metrics", "",
        f"Validation split ({report['n_val']} candidates, split by field when >= 5 fields; "
        f"{report['n_train']} used for training; {report['epochs_run']} epochs, "
        f"{report['seconds']} s on {report['config']['threads']} CPU thread(s)):", "",
        "| metric | value |", "|---|---|",
        f"| ROC AUC | {_fmt(v['auc'], 4)} |",
        f"| FNR at 0.5 (reals scored < 0.5) | {_fmt(v['fnr'])} |",
        f"| FPR at 0.5 (bogus scored >= 0.5) | {_fmt(v['fpr'])} |",
        f"| accuracy at 0.5 | {_fmt(v['accuracy'])} |", "",
        "Misclassified fraction per kind (held out):", "",
        "| kind | n | misclassified |", "|---|---|---|",
    ]
    for k, d in sorted(v.get("per_kind", {}).items()):
        lines.append(f"| {k} | {d['n']} | {_fmt(d['misclassified'])} |")
    lines += ["", "## Real ZTF alerts", ""]
    if ztf:
        lines += [
            f"{ztf['n']} real ZTF triplets from `../shared/data/ztf_alerts` "
            f"({ztf['n_rejected']} rejected), scored with this model; ZTF's own scores are a "
            "reference, not ground truth (almost all public sample alerts are real):", "",
            "| reference | n | n with ZTF score > 0.5 | AUC of our score | agreement at 0.5 |", "|---|---|---|---|---|",
        ]
        for name in ("drb", "rb"):
            d = ztf[name]
            lines.append(f"| ZTF {name} > 0.5 | {d['n']} | {d['n_real']} | {_fmt(d['auc'])} | "
                         f"{_fmt(d['agree_at_0.5'])} |")
        lines += ["", f"Fraction of all ZTF triplets we score >= 0.5: {_fmt(ztf['frac_above_0.5'])}."]
        few = [n for n in ("drb", "rb") if 0 < ztf[n]["n"] - ztf[n]["n_real"] < 30]
        if few:
            lines += ["", f"Few negatives for {', '.join(few)}: those AUCs are uncertain by "
                      "about +-0.1."]
    else:
        lines.append("Not measured (data folder absent).")
    lines += ["", "## Reproduce", "", "```", command, "```", "",
              "## Limits", "",
              "- Trained on simulated frames only; the domain gap to a given telescope is unknown "
              "until labelled real candidates from it are available.",
              "- Small network sized for CPU training in minutes; scale the data (>= 1e5 "
              "triplets) before widening it.", ""]
    p = Path(path)
    p.write_text("\n".join(lines))
    return p


def main_train(
    out_dir: str | Path = MODELS_DIR,
    n_frames: int = 24,
    seed: int = 0,
    *,
    data_dir: str | Path | None = None,
    version: str = "realbogus-v1",
    anomaly_version: str = "anomaly-v1",
    frame_shape: tuple[int, int] = (1024, 1024),
    n_fields: int = 4,
    extra_transients: int = 40,
    source: str = "pipeline",
    n_synthetic: int = 6000,
    train_config: TrainConfig | None = None,
    ztf_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Generate a training set, train the real/bogus CNN and fit the anomaly model, end to end.

    Parameters
    ----------
    out_dir : path
        Where ``<version>.pt``, ``<version>.json``, ``<version>.md`` and the anomaly model
        (``<anomaly_version>.npz/.json/.md``) are written. Default ``models/``.
    n_frames : int
        Science frames to simulate (spread over ``n_fields`` fields).
    seed : int
        Seeds generation and training: same seed, same model (on the same torch build).
    data_dir : path, optional
        Where the shards go; default ``<out_dir>/../build/training-<seed>``. If it already holds
        a manifest with the same config, generation is skipped.
    source : {"pipeline", "synthetic"}
        "pipeline" runs simulate -> reference -> subtract (the real thing); "synthetic" uses
        :func:`synth_triplets` stamps (no frames; quick check only, no anomaly model).
    train_config : TrainConfig, optional
    ztf_dir : path, optional
        Real ZTF alerts to compare with (default ``../shared/data/ztf_alerts`` when present).

    Returns
    -------
    dict
        ``manifest``, ``report`` (held-out metrics), ``ztf``, paths, and wall times.
    """
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    data = Path(data_dir) if data_dir else root / "build" / f"training-{source}-{seed}"
    ts_cfg = TrainingSetConfig(n_fields=n_fields,
                               epochs_per_field=max(1, -(-n_frames // n_fields)),
                               shape=tuple(frame_shape), extra_transients=extra_transients,
                               seed=seed)
    man_path = data / "manifest.json"
    manifest = json.loads(man_path.read_text()) if man_path.is_file() else None
    want = asdict(ts_cfg)
    want["shape"] = list(want["shape"])
    want["filters"] = list(want["filters"])
    want["real_kinds"] = list(want["real_kinds"])
    if manifest is None or manifest.get("config") != want or manifest.get("source") != source:
        if source == "pipeline":
            manifest = generate_training_set(data, ts_cfg)
        else:
            manifest = write_training_set(data, iter_synthetic_candidates(n_synthetic, seed),
                                          ts_cfg, "synthetic")
    t_gen = time.time() - t0
    ds = load_training_set(data)
    cfg = train_config or TrainConfig(seed=seed)
    clf, report = train(ds, cfg, version, progress)
    if ztf_dir is None:
        cand = root.parent / "shared" / "data" / "ztf_alerts"
        ztf_dir = cand if cand.is_dir() else None
    ztf = evaluate_on_ztf(clf, ztf_dir) if ztf_dir else None
    cmd = (f"python -c \"from broker.training import main_train; main_train('{out_dir}', "
           f"n_frames={n_frames}, seed={seed}, n_fields={n_fields}, "
           f"extra_transients={extra_transients}, source='{source}')\"  "
           "# or: broker train-realbogus")
    clf.metadata.update({"data": {k: manifest.get(k) for k in
                                  ("source", "seed", "n", "n_real", "n_bogus", "counts_by_kind",
                                   "config")},
                         "ztf": ztf, "reproduce": cmd})
    wpath = clf.save(out / version)
    write_model_card(out / f"{version}.md", version, manifest, report, ztf, cmd)
    result = {"manifest": manifest, "report": report, "ztf": ztf, "weights": str(wpath),
              "seconds_generate": round(t_gen, 1), "seconds_total": round(time.time() - t0, 1)}
    feats, labels = ds.get("features"), ds["y"]
    if feats is not None and feats.ndim == 2 and feats.shape[1] and (labels == 1).sum() >= 50:
        amodel = fit_anomaly(feats[labels == 1], AnomalyConfig(seed=seed), anomaly_version,
                             {"data": f"real-labelled pipeline candidates of {data.name}",
                              "reproduce": cmd})
        apath = amodel.save(out / anomaly_version)
        write_anomaly_card(out / f"{anomaly_version}.md", amodel, feats, labels, cmd)
        result["anomaly"] = str(apath)
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
