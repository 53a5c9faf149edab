"""Training-set generator: the simulated pipeline run per field, labelled and written as shards.

:class:`TrainingSetConfig` (how fields and frames are drawn), :class:`LabelledCandidate` and
:class:`ArtifactInjection`; :func:`label_candidates` (labels from the injection truth by
position); per field, the simulator settings (:func:`field_sim_config`), the deliberately wrong
references (:func:`_reference_variant`) and what they do to labels (:func:`residual_flux`,
:func:`opposite_lobe_snr`), the extra science-frame artifacts
(:func:`add_science_artifacts`) and the pipeline run itself (:func:`field_candidates`), iterated
over fields in one or several processes (:func:`iter_pipeline_candidates`); the balanced
``.npz`` shard writer (:class:`ShardWriter`), the JSON manifest and
:func:`write_training_set` / :func:`generate_training_set`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from broker.anomaly import features_from
from broker.candidate import Candidate
from broker.errors import ConfigError, CutoutError
from broker.realbogus import NormaliseConfig, normalise_triplet

#: Injection kinds that make a candidate real.
REAL_KINDS = ("transient", "variable", "moving")
#: Injection kinds that are artifacts (bogus, with their type recorded).
ARTIFACT_KINDS = ("cosmic_ray", "hot_pixel", "hot_column", "satellite")


#: State of a science frame's reference by :func:`_reference_variant`'s residual kind: as
#: built, deliberately misaligned (dipoles) or blurred (PSF mismatch). Recorded per candidate so
#: that an evaluation can split its error rate by what the stress mix did to the reference.
REFERENCE_STATES = {"residual": "as_built", "dipole": "misaligned", "psf_mismatch": "blurred"}


# --- labelled candidates -------------------------------------------------------------------------
#: Bogus kinds the generator adds itself to the science frame (on top of the simulator's).
SCIENCE_ARTIFACT_KINDS = ("hot_pixel", "bad_column", "bleed", "satellite")
# Satellite trail brightness b (uniform): b * sigma * FWHM ADU per px of length, a peak of ~0.94 b
# sky sigma a pixel. Bright: well detected along their length (realbogus-v6's only kind). Faint:
# at the detection limit, where a trail breaks into many S/N 5-10 candidates (measured: 1.5-4
# gives ~3 such candidates a trail, 2.5-8 almost none; session 14).
TRAIL_BRIGHTNESS = (5.0, 60.0)
FAINT_TRAIL_BRIGHTNESS = (1.5, 4.0)


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
    min_real_snr : float
        A real injection labels a candidate only if the expected optimal S/N of its change
        *relative to the reference* reaches this (sigma). Below it, a >= 5 sigma detection there is
        made mostly by noise or by a residual of the star under it, and it is bogus like them.
        Variable stars also vary in the reference epochs, so their change is taken against the
        inverse-variance mean of those epochs (:func:`relative_to_reference`), not against the
        static sky. Default 0 (off, for every shipped model): 3 (the source
        gives at least 3 of the 5 sigma) relabels ~1 % of the variables, but no model trained
        with it has yet beaten v3 (see BENCHMARKS.md, "Label experiments").
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
    variable_bright_cap : (float, float) or None
        (mag, fraction) given to the simulator (``SimConfig.variable_bright_cap``): at most that
        fraction of the stars brighter than that magnitude vary. With 500 variables in a pool
        of 260-875 stars, 60-100 % of the bright isolated stars that the pipeline measures F_r
        on vary, F_r comes out up to 3 % wrong and every constant star leaves a residual of
        that size, which a small change of a bright star cannot be told from. Default None
        (uniform draw, every shipped model). (17.5, 0.1) covers the F_r stars (13.5-17 mag) and
        cuts the F_r error from 1.05 to 0.23 % rms; tried in session 12 with and without
        smaller amplitudes, neither promoted (BENCHMARKS.md, "few variables among the
        flux-ratio stars"). (17.5, 0.4) puts more reals on bright reference sources, where
        ZTF has 39 % of its real alerts and we 1-11 %, but F_r errors return (0.78 % rms);
        tried in session 13, not promoted ("reals on bright reference sources").
    reference_epochs_range : tuple of int
        Frames co-added into each field's reference, drawn per field (inclusive). Survey
        references are deep co-adds (ZTF: 15-40 frames); 3-10 spans shallow to fairly deep.
        (15, 40) costs +51 % generation time; tried in session 13, not promoted.
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
        Probability that a frame's reference pixels are displaced (``misalign_px``), keeping
        its star catalogue, so that the alignment is wrong by that much: dipoles on stars.
        Default 0.2 (``realbogus-v6``; 0.3 for v3-v5, whose shifts made few dipoles).
    misalign_px : tuple of float
        Range of the largest shift of a misaligned reference, px. Real survey dipoles (e.g. the
        ZTF sample's low-``drb`` alerts) have both lobes far above the noise: shifts of 1-2 px
        on bright stars. Default (1, 2) (``realbogus-v6``; (0.3, 1.2) for v3-v5).
    misalign_wavelength_px : tuple of float
        Range of the wavelength (px) of a plane wave of displacement (amplitude from
        ``misalign_px``, random direction and phase): each star is shifted by its local amount,
        as in a field whose astrometric solution is off in parts (distortion, refraction).
        (0, 0): one shift for the whole frame, which the pipeline cannot see as a dipole: its
        reference PSF is measured on the same stars at their science positions, so a global
        shift moves the PSF with them and ZOGY subtracts the stars cleanly. Default (500, 1500)
        (``realbogus-v6``). ``realbogus-v3`` to ``-v5`` were made with (0, 0): most of their
        "dipoles" are faint residuals, and they pass two-lobed dipoles as real (8 % FNR = FPR
        for v5 on a set that has them, BENCHMARKS.md session 10).
    swamped_ratio : tuple of float
        (lo, hi). On a deliberately misaligned reference every star leaves a dipole whose lobes
        peak like a point source of :func:`residual_flux`; a variable's change below ``lo``
        times it is swamped (the stamp shows a dipole: bogus ``"dipole"``), between ``lo`` and
        ``hi`` ambiguous (left out, counted in the manifest as ``ambiguous_variable``), above
        ``hi`` real. (0.5, 1.65) is the tried setting: e^0.5 ~ 1.65 is where the change's peak
        outweighs the opposite lobe, so that the stamp shows one sign only. Blurred references
        are left alone: their residual is a blob on the star (the ring is faint), which is what
        a variable's change looks like. Default (0, 0): off (variables on misaligned
        references are labelled by their image instead, ``variable_dipole_lobe``).
    variable_dipole_lobe : tuple of float
        (snr, ratio). A variable on a misaligned reference whose stamp shows an opposite lobe
        (:func:`lobe_snrs`) of at least ``snr`` sigma and ``ratio`` times its central lobe is
        a ``"dipole"`` (bogus, or ambiguous by ``min_dipole_lobe_ratio``): what a scanner sees
        is a dipole, whatever the change under it (the image convention, where
        ``swamped_ratio`` is the flux one). Default (4, 0.25)
        (``realbogus-v6``; off, (0, 0), for v3-v5): the lobe of a 1-2 px shift on a star is
        clearly seen from there on.
    dipole_lobe_kinds : tuple of str
        The real kinds ``variable_dipole_lobe`` applies to. Default ("variable",) (every shipped
        model). A transient on a galaxy or beside a star of a misaligned reference shows the
        same dipole; labelled real, 35 of 522 such transients in ``realbogus-v11``'s held-out
        set have an opposite lobe of >= 0.4 times their central one (session 18).
    trail_share : tuple of float
        (lo, hi). A real candidate crossed by a satellite trail is labelled by the trail's share
        of the PSF-fit flux there (:func:`trail_flux`, against the source's |change|): below
        ``lo`` real, from ``hi`` on bogus ``"satellite"`` (the stamp shows a trail), between
        them left out as ``ambiguous_trail``. Default (0.33, 0.67) (``realbogus-v6``; (1, 1),
        always real, for v3-v5).
    min_dipole_lobe_snr : float
        An unmatched candidate on a star of a misaligned reference (kind ``"dipole"``) is
        bogus only if its stamp shows the dipole: an opposite-sign lobe of at least this S/N
        (:func:`opposite_lobe_snr`, sigma). Without one it is a lone blob beside a star, which
        is what a faint change of the star looks like: left out as ``ambiguous_dipole``.
        Default 4 (``realbogus-v6``; 0, every such candidate bogus, for v3-v5). With
        one-shift misalignment (v3-v5) it left out ~90 % of them: they were faint residuals.
    min_dipole_lobe_ratio : float
        Likewise, a ``"dipole"`` (a star's, or a variable's by ``variable_dipole_lobe``) is bogus
        only if its opposite lobe is at least this fraction of its central lobe
        (:func:`lobe_snrs`); below, the stamp is a blob with a weak opposite lobe, which a
        variable star on a misaligned reference also leaves: left out as ``ambiguous_dipole``.
        Default 0, off (v3-v6). Tried in session 11 with ``variable_dipole_lobe=(4, 0.1)``,
        i.e. leaving out the band 0.1-0.4 where ``realbogus-v6`` misclassified 27-50 % of the
        variables and 16-29 % of the dipoles (7 % and 0.5-4 % outside it): the held-out
        figures of every model improve (v6: 2.56 -> 2.09 %), but a network trained so is no
        better (BENCHMARKS.md, "Real/bogus: an ambiguous band of dipole lobe ratios").
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
        Mean (Poisson) extra satellite trails per science frame (``TRAIL_BRIGHTNESS``).
    faint_trails_per_frame : float
        Mean (Poisson) extra faint trails per science frame (``FAINT_TRAIL_BRIGHTNESS``): each
        breaks into S/N 5-10 candidates that look like points to a scanner who misses the
        line. Default 1 (``realbogus-v10``): a held-out set then holds 706 of them among 843
        satellites, and the model trained so passes 0-0.7 %; 0 for v3-v6 (``realbogus-v6``'s
        training set held 15 satellite candidates at S/N < 10 among 102k, and at its
        equal-error threshold it passes 27-67 % of such candidates; BENCHMARKS.md, session 14).
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
    min_real_snr: float = 0.0
    real_kinds: tuple[str, ...] = REAL_KINDS
    n_transients: int = 150
    n_cosmic_rays: float = 220.0
    transient_on_galaxy: float = 0.6
    n_variables: int = 500
    variable_mag_range: tuple[float, float] = (14.0, 20.0)
    variable_amplitude_range: tuple[float, float] = (0.1, 0.8)
    variable_bright_cap: tuple[float, float] | None = None
    reference_epochs_range: tuple[int, int] = (3, 10)
    transient_snr_range: tuple[float, float] = (4.0, 100.0)
    fwhm_range: tuple[float, float] = (1.3, 3.5)
    sky_range: tuple[float, float] = (100.0, 3000.0)
    bright_star_mag_range: tuple[float, float] = (9.0, 12.0)
    saturation_range: tuple[float, float] = (20000.0, 60000.0)
    p_misalign: float = 0.2
    swamped_ratio: tuple[float, float] = (0.0, 0.0)
    variable_dipole_lobe: tuple[float, float] = (4.0, 0.25)
    dipole_lobe_kinds: tuple[str, ...] = ("variable",)
    trail_share: tuple[float, float] = (0.33, 0.67)
    min_dipole_lobe_snr: float = 4.0
    min_dipole_lobe_ratio: float = 0.0
    misalign_px: tuple[float, float] = (1.0, 2.0)
    misalign_wavelength_px: tuple[float, float] = (500.0, 1500.0)
    p_psf_error: float = 0.25
    psf_blur_px: tuple[float, float] = (0.6, 1.5)
    p_uncleaned: float = 0.3
    hot_pixels_per_frame: float = 15.0
    bad_columns_per_frame: float = 1.5
    p_bleed: float = 0.8
    trails_per_frame: float = 0.6
    faint_trails_per_frame: float = 1.0
    edge_px: int = 20
    balance: bool = True
    shard_size: int = 4096
    workers: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hot_pixels_per_frame", "bad_columns_per_frame", "trails_per_frame",
                     "faint_trails_per_frame"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):  # a Poisson mean; < 0 would fail in a worker
                raise ConfigError(f"TrainingSetConfig.{name} must be a finite mean >= 0, got {v!r}")
        unknown = set(self.dipole_lobe_kinds) - set(self.real_kinds)
        if unknown:
            raise ConfigError(f"TrainingSetConfig.dipole_lobe_kinds {sorted(unknown)} are not "
                              f"among real_kinds {list(self.real_kinds)}")


#: Generator settings added after sets were written, with the value that the older code had
#: (a manifest or model card without one was made with that value).
SET_SETTINGS_ADDED: dict = {"min_dipole_lobe_ratio": 0.0, "variable_bright_cap": None,
                             "faint_trails_per_frame": 0.0, "dipole_lobe_kinds": ["variable"]}
#: The settings that decide a candidate's label (not which candidates are drawn): two sets that
#: differ in one of them label the same stamps differently, and a model's error rate on a set
#: labelled otherwise than its training data is not comparable with another model's there.
LABEL_SETTINGS = ("match_radius", "min_real_snr", "real_kinds", "swamped_ratio",
                  "variable_dipole_lobe", "dipole_lobe_kinds", "trail_share",
                  "min_dipole_lobe_snr", "min_dipole_lobe_ratio")


def label_settings_differ(a: dict | None, b: dict | None) -> list[str] | None:
    """The :data:`LABEL_SETTINGS` in which two generator configs (manifest or model-card
    ``config`` dicts) differ; None when either is unknown (absent or not a dict)."""
    if not (isinstance(a, dict) and isinstance(b, dict) and a and b):
        return None
    # a JSON round trip makes tuples lists, as they are in a manifest
    a, b = (json.loads(json.dumps({**SET_SETTINGS_ADDED, **c})) for c in (a, b))
    return [k for k in LABEL_SETTINGS if a.get(k) != b.get(k)]


@dataclass
class LabelledCandidate:
    """One candidate with its label (1 real / 0 bogus), its type and its anomaly features."""

    triplet: np.ndarray          # (3, 63, 63) float16/float32, normalised
    label: int                   # -1: ambiguous, counted but not written
    kind: str                    # injection kind, residual/dipole/psf_mismatch/edge/noise if none
    features: np.ndarray         # (F,) anomaly features
    group: str                   # field: the validation split is made by field
    snr: float
    reference: str = "unknown"   # state of the frame's reference, REFERENCE_STATES


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
    flux : float
        ADU deposited (trails only; 0 for the others).
    """

    kind: str
    x: float
    y: float
    x0: float | None = None
    y0: float | None = None
    x1: float | None = None
    y1: float | None = None
    source_id: str = ""
    flux: float = 0.0


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
        detection (see :class:`TrainingSetConfig`).
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
            kind = residual_kind if np.isfinite(d.ref_dist) and d.ref_dist < residual_radius \
                else "noise"
            out.append((0, kind, None))
    return out


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
        acc = sums.get(i.source_id) if i.kind == "variable" else None
        if acc is None or acc[1] <= 0 or i.flux == 0 or i.snr == 0:
            out.append(i)
            continue
        change = i.flux - acc[0] / acc[1]
        sigma = float(np.hypot(i.flux / i.snr, 1.0 / np.sqrt(acc[1])))
        out.append(dataclasses.replace(i, flux=float(change), snr=float(change / sigma)))
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
        variable_bright_cap=(None if config.variable_bright_cap is None
                             else tuple(config.variable_bright_cap)),
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
    """The reference as used for one frame: as built, misaligned or blurred.

    Returns (reference, residual_kind, shift_at): ``shift_at(x, y)`` is the misalignment (px)
    at a position of a misaligned reference, else None. The star catalogue of the unmodified
    reference is kept on the variant, so the alignment fits the catalogue and misses the
    displacement of the pixels (see ``misalign_wavelength_px`` for its form).
    """
    from scipy import ndimage

    from broker import subtract as sub_mod

    sources = sub_mod.reference_sources(reference)  # cached on the original
    image = np.nan_to_num(reference.image)
    u = rng.uniform()
    shift_at = None
    if u < config.p_misalign:
        r, beta = rng.uniform(*config.misalign_px), rng.uniform(0, 2 * np.pi)
        if config.misalign_wavelength_px[1] > 0:  # a plane wave of displacement along beta
            lam, alpha, phi = rng.uniform(*config.misalign_wavelength_px), \
                rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)

            def shift_at(x, y):
                return r * np.sin(2 * np.pi * (x * np.cos(alpha) + y * np.sin(alpha)) / lam + phi)
            yy, xx = np.indices(image.shape, dtype=np.float32)
            a = shift_at(xx, yy)
            img = ndimage.map_coordinates(image, [yy - a * np.sin(beta), xx - a * np.cos(beta)],
                                          order=3, mode="nearest")
        else:  # one shift for the whole frame (absorbed by the PSF, see misalign_wavelength_px)
            def shift_at(x, y):
                return r
            img = ndimage.shift(image, (r * np.sin(beta), r * np.cos(beta)), order=3,
                                mode="nearest")
        kind = "dipole"
    elif u < config.p_misalign + config.p_psf_error:
        img = ndimage.gaussian_filter(image, rng.uniform(*config.psf_blur_px))
        kind = "psf_mismatch"
    else:
        return reference, "residual", None
    img[~np.isfinite(reference.image)] = np.nan
    return (dataclasses.replace(reference, image=img.astype(np.float32), sources=sources),
            kind, shift_at)


def residual_flux(shift: float, fwhm: float, static_flux: float) -> float:
    """Flux (ADU) of a point source as high in the difference as a misaligned star's dipole.

    For a Gaussian PSF of width sigma, a star of flux F on a reference shifted by r px leaves a
    dipole whose lobes peak at ~F r e^(-1/2) / (2 pi sigma^3) (first order in r), i.e. the peak
    of a point source of F * 0.61 r / sigma (capped at F).

    Parameters
    ----------
    shift : float
        Misalignment, px (:func:`_reference_variant`).
    fwhm : float
        Science-frame FWHM, px.
    static_flux : float
        The star's flux, ADU.
    """
    return abs(static_flux) * min(np.exp(-0.5) * shift / (fwhm / 2.3548), 1.0)


def trail_flux(x: float, y: float, trails: Sequence, fwhm: float) -> float:
    """PSF-fit flux (ADU) that satellite trails add to a point source at (x, y).

    A trail of ``lam`` ADU per px of length with a Gaussian cross-section of the PSF's sigma, at
    distance d, gives a Gaussian PSF fit ``2 sqrt(pi) sigma lam exp(-d^2 / 4 sigma^2)``.

    Parameters
    ----------
    x, y : float
        Position, px.
    trails : list of Injection or ArtifactInjection
        Of kind ``"satellite"``, with end points and ``flux`` (all ADU they deposit).
    fwhm : float
        PSF FWHM, px.
    """
    s = fwhm / 2.3548
    total = 0.0
    for t in trails:
        a, b = np.array([t.x0, t.y0], float), np.array([t.x1, t.y1], float)
        length = float(np.hypot(*(b - a)))
        if not length > 0:
            continue
        u = np.clip(np.dot(np.array([x, y]) - a, b - a) / length ** 2, 0.0, 1.0)
        d = float(np.hypot(*(a + u * (b - a) - (x, y))))
        total += 2 * np.sqrt(np.pi) * s * (abs(t.flux) / length) * np.exp(-d * d / (4 * s * s))
    return total


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
    n_bright = rng.poisson(config.trails_per_frame)
    # drawn after the others only when asked for, so sets without them keep their random stream
    n_faint = rng.poisson(config.faint_trails_per_frame) if config.faint_trails_per_frame > 0 else 0
    for k in range(n_bright + n_faint):
        x0, y0, x1, y1 = 0.0, rng.uniform(0, ny - 1), nx - 1.0, rng.uniform(0, ny - 1)
        if rng.uniform() < 0.5:
            x0, y0, x1, y1 = y0, x0, y1, x1
        b = rng.uniform(*(TRAIL_BRIGHTNESS if k < n_bright else FAINT_TRAIL_BRIGHTNESS))
        flat, vals = render.line_profile((ny, nx), x0, y0, x1, y1, fwhm / 2.3548, sig * b * fwhm)
        img.reshape(-1)[flat] += vals.astype(img.dtype)
        out.append(ArtifactInjection("satellite", (x0 + x1) / 2, (y0 + y1) / 2, x0, y0, x1, y1,
                                     f"ST{k:04d}", float(vals.sum())))
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
    ref_frames = [sim.frame(field_name, filt, e) for e in range(n_ref)]
    ref_injections = [i for _, t in ref_frames for i in t.injections]
    try:
        reference = ref_mod.build_reference([fr for fr, _ in ref_frames],
                                            ref_mod.ReferenceConfig(n_frames=n_ref))
    except Exception as exc:  # a field without a reference is skipped, not fatal
        print(f"[training] {field_name} {filt}: reference failed: {exc!r}")
        return []
    del ref_frames  # the pixels are in the reference now; keep the truth only
    out: list[LabelledCandidate] = []
    histories: dict[object, list[dict]] = {}
    for e in range(n_ref, n_ref + config.epochs_per_field):
        frame, truth = sim.frame(field_name, filt, e)
        ref_e, residual_kind, shift_at = _reference_variant(reference, config, rng)
        extra = add_science_artifacts(frame, truth.fwhm, truth.sky, config, rng)
        try:
            cleaned = rng.uniform() >= config.p_uncleaned
            sub_cfg = sub_mod.SubtractConfig() if cleaned else sub_mod.SubtractConfig(cosmic_ray_sigma=0.0)
            result = sub_mod.subtract_and_detect(frame, ref_e, sub_cfg)
        except Exception as exc:  # a failed subtraction only costs that frame
            print(f"[training] {field_name} {filt} epoch {e}: subtraction failed: {exc!r}")
            continue
        cands = list(result.candidates)
        injections = relative_to_reference(truth.injections, ref_injections) + extra
        trails = [i for i in injections if i.kind == "satellite" and i.x0 is not None]
        # a lobe of a star shifted by r px peaks up to ~r/2 + sigma from it (1"/px simulator)
        residual_radius = 2.0 + (config.misalign_px[1] if shift_at is not None
                                 and config.misalign_wavelength_px[1] > 0 else 0.0)
        labels = label_candidates(cands, injections, config.match_radius, config.real_kinds,
                                  residual_kind, frame.data.shape, config.edge_px,
                                  config.min_real_snr, residual_radius)
        mjd = float(frame.meta.mjd_start)
        for c, (lab, kind, inj) in zip(cands, labels):
            if lab == 1 and inj.kind == "variable" and shift_at is not None:
                lab, kind = _swamped_label(config.swamped_ratio, abs(inj.flux), residual_flux(
                    abs(shift_at(inj.x, inj.y)), truth.fwhm, inj.static_flux))
            if lab == 1 and inj.kind in config.dipole_lobe_kinds and shift_at is not None \
                    and config.variable_dipole_lobe[0] > 0:
                central, opposite = lobe_snrs(c.difference)
                if opposite >= max(config.variable_dipole_lobe[0],
                                   config.variable_dipole_lobe[1] * central):
                    lab, kind = 0, "dipole"
            if lab == 1 and trails:
                lab, kind = _trail_label(config.trail_share, kind, trail_flux(
                    c.detection.x, c.detection.y, trails, truth.fwhm), abs(inj.flux))
            if kind == "dipole" and lab == 0 and _dipole_unseen(c.difference, config):
                lab, kind = -1, "ambiguous_dipole"
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
                                         float(c.detection.snr), REFERENCE_STATES[residual_kind]))
            if sid is not None and lab == 1:
                histories.setdefault(sid, []).append(
                    {"mjd": mjd, "flux": float(c.detection.flux),
                     "flux_err": float(c.detection.flux_err),
                     "snr": float(c.detection.snr), "filter": filt})
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


def _dipole_unseen(difference: np.ndarray, config: TrainingSetConfig) -> bool:
    """Whether a dipole's stamp lacks the opposite lobe that ``min_dipole_lobe_snr`` and
    ``min_dipole_lobe_ratio`` ask for (then it is left out as ambiguous)."""
    central, opposite = lobe_snrs(difference)
    return bool((config.min_dipole_lobe_snr > 0 and opposite < config.min_dipole_lobe_snr)
                or (config.min_dipole_lobe_ratio > 0
                    and opposite < config.min_dipole_lobe_ratio * central))


def opposite_lobe_snr(difference: np.ndarray, radius: float = 6.0) -> float:
    """S/N of the strongest lobe of the other sign than the centre (:func:`lobe_snrs`)."""
    return lobe_snrs(difference, radius)[1]


def _swamped_label(ratio: tuple[float, float], change: float, residual: float
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


def _trail_label(share: tuple[float, float], kind: str, trail: float, change: float
                 ) -> tuple[int, str]:
    """(label, kind) of a real candidate of |change| (ADU) with ``trail`` ADU of trails on it."""
    lo, hi = share
    f = trail / (trail + change) if trail + change > 0 else 0.0
    if f < lo:
        return 1, kind
    if f >= hi:
        return 0, "satellite"
    return -1, "ambiguous_trail"


def _field_job(args: tuple[TrainingSetConfig, int]) -> list[LabelledCandidate]:
    return field_candidates(*args)


#: Peak resident memory of one generator process (bytes): 0.8 GB measured for a field of the
#: default config (``/usr/bin/time -v`` of ``field_candidates``), rounded up.
WORKER_MEMORY = 1 << 30


def default_workers() -> int:
    """Generator processes for this machine: one per CPU core, at most one per GiB of free
    memory (:data:`WORKER_MEMORY`). The set does not depend on it (fields are written in
    field order)."""
    cores = os.cpu_count() or 1
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return cores
    return max(1, min(cores, free // WORKER_MEMORY))


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


# --- shards ---------------------------------------------------------------------------------------
class ShardWriter:
    """Stream labelled candidates into balanced ``shard-XXXX.npz`` files, bounded memory.

    Reals and bogus wait in two buffers; each time both hold half a shard, a shard of half real,
    half bogus is written. Bogus are taken round-robin over their kinds, so that rare kinds
    (trails, bleeds, dipoles) are all used while the common ones (cosmic rays) fill the rest.
    A buffer over ``max_buffer`` drops a random member of its most common kind.

    Shards hold ``x`` (N, 3, 63, 63) float16 normalised triplets (|values| <=
    ``NormaliseConfig.clip``, where float16's spacing is at most 0.03, i.e. 0.6 % of a star's
    brightness above the soft knee), ``y`` (N,) uint8, ``kind`` (N,) str, ``group`` (N,) str,
    ``snr`` (N,) float32, ``reference`` (N,) str (:data:`REFERENCE_STATES`), ``features``
    (N, F) float32.
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
        if item.label < 0:  # ambiguous: counted, not written
            return
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
            reference=np.array([it.reference for it in chunk]),
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
                  "y uint8 (1 real); kind str; group str (field); snr float32; reference str "
                  "(as_built / misaligned / blurred); features float32",
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
