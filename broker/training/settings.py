"""Settings of a training set: :class:`TrainingSetConfig` and which of them decide labels.

The generator's configuration (how fields, frames and the stress mix are drawn, and the labelling
conventions), the candidate kinds it knows (:data:`REAL_KINDS`, :data:`ARTIFACT_KINDS`), the
reference states it records (:data:`REFERENCE_STATES`), and the bookkeeping that lets a set or a
model card be compared with another: :func:`config_dict` (the config as JSON values),
:data:`SET_SETTINGS_ADDED` (settings that older sets predate) and :data:`LABEL_SETTINGS` /
:func:`label_settings_differ` (settings that change labels). Why each default is what it is, and
what was tried instead, is in ``docs/notes/training-settings.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from broker.errors import ConfigError

#: Injection kinds that make a candidate real.
REAL_KINDS = ("transient", "variable", "moving")
#: Injection kinds that are artifacts (bogus, with their type recorded).
ARTIFACT_KINDS = ("cosmic_ray", "hot_pixel", "hot_column", "satellite")
#: State of a science frame's reference by the residual kind of
#: :func:`~broker.training.stress.reference_variant`: as built, deliberately misaligned
#: (dipoles) or blurred (PSF mismatch). Recorded per candidate so that an evaluation can split
#: its error rate by what the stress mix did to the reference.
REFERENCE_STATES = {"residual": "as_built", "dipole": "misaligned", "psf_mismatch": "blurred"}


@dataclass(frozen=True)
class TrainingSetConfig:
    """How the training set is generated from simulated frames.

    Each field gets its own simulator settings drawn from the seed (seeing, sky, star density,
    brightest stars and saturation level, trail probability), so that the set spans conditions;
    each science frame may then get a deliberately wrong reference (sub-pixel shift: dipoles;
    extra blur: PSF-mismatch residuals) and extra detector artifacts on the science frame only
    (hot pixels, bad column segments, bleed trails from saturated stars, satellite trails), each
    recorded as an injection so that the candidates it causes are labelled by position.

    Every default below is the setting both shipped models were trained with (``realbogus-v10``
    and ``-v11``; their sidecars record the whole config). What other values did, and which
    versions were made with them, is in ``docs/notes/training-settings.md``.

    Attributes
    ----------
    target_n : int
        Balanced candidates to write; generation stops when reached (or after ``max_frames``).
        Default 100,000.
    max_frames : int
        Upper bound on science frames. Default 2000.
    epochs_per_field : int
        Science epochs per field (each field also costs its reference epochs,
        ``reference_epochs_range``). Default 8.
    shape : tuple of int
        Frame shape (ny, nx), px. Default 1024x1024: one frame subtracts in ~1 s on one core.
    filters : tuple of str
        Filters; field ``f`` is observed in ``filters[f % len(filters)]``. Default g, r, i.
    match_radius : float
        Max distance (px) between a candidate and an injection to take its label. Default 1.5 px
        (~FWHM/2 for 3 px seeing): a centroid of a >= 5 sigma source is within ~0.5 px.
    min_real_snr : float
        A real injection labels a candidate only if the expected optimal S/N (sigma) of its
        change *relative to the reference* reaches this. Below it, a >= 5 sigma detection there
        is made mostly by noise or by a residual of the star under it, and it is bogus like
        them. Variable stars also vary in the reference epochs, so their change is taken against
        the inverse-variance mean of those epochs
        (:func:`~broker.training.labels.relative_to_reference`), not against the static sky.
        Default 0: off.
    real_kinds : tuple of str
        Injection kinds labelled real; "moving" is real (a genuine astrophysical source).
        Default :data:`REAL_KINDS`.
    n_transients : int
        Transients per frame asked of the simulator (its own default is 12 per 2k x 2k frame).
        Default 150: subtraction costs ~1 s per 1k x 1k frame whatever it holds, so frames are
        packed with transients, variables and cosmic rays (~250 real and ~250 bogus candidates
        a frame).
    n_cosmic_rays : float
        Mean cosmic-ray hits per frame (simulator knob; its own default is 150). Default 220.
    transient_on_galaxy : float
        Fraction of transients on a galaxy (simulator default 0.3). Default 0.6.
    n_variables, variable_mag_range, variable_amplitude_range
        Variable stars per field, their magnitude range and fractional semi-amplitude range
        (simulator defaults 20, 15-19, 0.05-0.5). Default 500, 14-20 mag, 0.1-0.8: many, bright
        and strongly varying, because real ZTF alerts mostly sit on a source of the reference
        (variables, nuclear transients): in the public sample the reference's central 5x5 px
        average ~17 normalised units against ~0.1 for hostless transients, and a model that
        never sees reals on reference sources learns "on a reference source = subtraction
        residual".
    variable_bright_cap : (float, float) or None
        (mag, fraction) given to the simulator (``SimConfig.variable_bright_cap``): at most that
        fraction of the stars brighter than that magnitude vary, so that fewer of the bright
        isolated stars the pipeline measures the flux ratio F_r on are variable. Default None:
        uniform draw.
    reference_epochs_range : tuple of int
        Frames co-added into each field's reference, drawn per field (inclusive). Default
        (3, 10): shallow to fairly deep (survey references are deep co-adds, ZTF's 15-40
        frames; (3, 40) took ~1.5x the generation time and scored worse on real ZTF alerts and
        on every survey's own pixels: ``docs/notes/realbogus-experiments.md``).
    transient_snr_range : tuple of float
        Optimal S/N range of injected transients (simulator knob). Default 4-100: from below the
        5 sigma threshold (some are lost, as in real data) to bright.
    fwhm_range : tuple of float
        Range (px) of the per-field seeing interval's lower end; the upper end is 1.1-1.8x it.
        Default 1.3-3.5 px: ZTF (2" seeing / 1"/px ~ 2 px) and worse nights on a 1"/px imager.
    sky_range : tuple of float
        Mean sky level, ADU/px, drawn log-uniformly per field. Default 100-3000.
    bright_star_mag_range : tuple of float
        Brightest catalogue magnitude per field (uniform). Default 9-12: 9 gives several
        saturated stars per 1k x 1k frame, 12 (the simulator default) almost none.
    saturation_range : tuple of float
        Saturation level per field, ADU (uniform). Default 20,000-60,000.
    p_misalign : float
        Probability that a frame's reference pixels are displaced (``misalign_px``), keeping
        its star catalogue, so that the alignment is wrong by that much: dipoles on stars.
        Default 0.2.
    misalign_px : tuple of float
        Range of the largest shift of a misaligned reference, px. Default (1, 2): real survey
        dipoles (e.g. the ZTF sample's low-``drb`` alerts) have both lobes far above the noise,
        i.e. shifts of 1-2 px on bright stars.
    misalign_wavelength_px : tuple of float
        Range of the wavelength (px) of a plane wave of displacement (amplitude from
        ``misalign_px``, random direction and phase): each star is shifted by its local amount,
        as in a field whose astrometric solution is off in parts (distortion, refraction).
        (0, 0): one shift for the whole frame, which the pipeline cannot see as a dipole: its
        reference PSF is measured on the same stars at their science positions, so a global
        shift moves the PSF with them and ZOGY subtracts the stars cleanly. Default
        (500, 1500).
    swamped_ratio : tuple of float
        (lo, hi), the flux rule for variables on a misaligned reference. Every star there leaves
        a dipole whose lobes peak like a point source of
        :func:`~broker.training.stress.residual_flux`; a variable's change below ``lo`` times it
        is swamped (the stamp shows a dipole: bogus ``"dipole"``), between ``lo`` and ``hi``
        ambiguous (left out, counted in the manifest as ``ambiguous_variable``), above ``hi``
        real. With ``hi`` = e^0.5 ~ 1.65 the change's peak outweighs the opposite lobe, so that
        the stamp shows one sign only. Blurred references are left alone: their residual is a
        blob on the star (the ring is faint), which is what a variable's change looks like.
        Default (0, 0): off; variables on misaligned references are labelled by their image
        instead (``variable_dipole_lobe``).
    variable_dipole_lobe : tuple of float
        (snr, ratio), the image rule. A variable on a misaligned reference whose stamp shows an
        opposite lobe (:func:`~broker.training.labels.lobe_snrs`) of at least ``snr`` sigma and
        ``ratio`` times its central lobe is a ``"dipole"`` (bogus, or ambiguous by
        ``min_dipole_lobe_ratio``): what a scanner sees is a dipole, whatever the change under
        it. Default (4, 0.25): the lobe of a 1-2 px shift on a star is clearly seen from there
        on. (0, 0): off.
    dipole_lobe_kinds : tuple of str
        The real kinds ``variable_dipole_lobe`` applies to; must be among ``real_kinds``.
        Default ("variable",). A transient on a galaxy or beside a star of a misaligned
        reference shows the same dipole but stays real: 35 of 522 such transients in
        ``realbogus-v11``'s held-out set have an opposite lobe of >= 0.4 times their central one.
    trail_share : tuple of float
        (lo, hi). A real candidate crossed by a satellite trail is labelled by the trail's share
        of the PSF-fit flux there (:func:`~broker.training.stress.trail_flux`, against the
        source's |change|): below ``lo`` real, from ``hi`` on bogus ``"satellite"`` (the stamp
        shows a trail), between them left out as ``ambiguous_trail``. Default (0.33, 0.67);
        (1, 1) keeps such candidates real whatever the trail.
    min_dipole_lobe_snr : float
        An unmatched candidate on a star of a misaligned reference (kind ``"dipole"``) is
        bogus only if its stamp shows the dipole: an opposite-sign lobe of at least this S/N
        (:func:`~broker.training.labels.opposite_lobe_snr`, sigma). Without one it is a lone
        blob beside a star, which is what a faint change of the star looks like: left out as
        ``ambiguous_dipole``. Default 4; 0 makes every such candidate bogus.
    min_dipole_lobe_ratio : float
        Likewise, a ``"dipole"`` (a star's, or a variable's by ``variable_dipole_lobe``) is bogus
        only if its opposite lobe is at least this fraction of its central lobe
        (:func:`~broker.training.labels.lobe_snrs`); below, the stamp is a blob with a weak
        opposite lobe, which a variable star on a misaligned reference also leaves: left out as
        ``ambiguous_dipole``. Default 0: off.
    p_psf_error : float
        Probability that a frame's reference is blurred by a Gaussian of ``psf_blur_px`` (sigma)
        while its PSF model is kept: PSF-mismatch residuals (rings) on bright stars. Default
        0.25.
    psf_blur_px : tuple of float
        Blur sigma range, px. Default 0.6-1.5.
    p_uncleaned : float
        Probability that a frame is subtracted without interpolating its cosmic rays and hot
        pixels (``SubtractConfig(cosmic_ray_sigma=0)``): the cleaning removes nearly all of them
        from simulated frames, but on real ones some always get through, and the classifier must
        have seen them. Default 0.3.
    hot_pixels_per_frame : float
        Mean (Poisson) extra science-only hot pixels per frame (the simulator's hot pixels are
        fixed on the detector and land in the reference too, so they rarely make candidates).
        Default 15.
    bad_columns_per_frame : float
        Mean (Poisson) bad column segments (30-400 px long) per science frame. Default 1.5.
    p_bleed : float
        Probability that a saturated star of the science frame gets a bleed trail (up and down
        its column, 5-60 px each way, at 50-95% of saturation). Default 0.8.
    trails_per_frame : float
        Mean (Poisson) extra satellite trails per science frame
        (:data:`~broker.training.stress.TRAIL_BRIGHTNESS`). Default 0.6.
    faint_trails_per_frame : float
        Mean (Poisson) extra faint trails per science frame
        (:data:`~broker.training.stress.FAINT_TRAIL_BRIGHTNESS`): each breaks into S/N 5-10
        candidates that look like points to a scanner who misses the line. Default 1: a held-out
        set then holds 706 of them among 843 satellites, and a model trained so passes
        0-0.7 %. 0 draws none (and no random numbers for them).
    glints_per_frame : float
        Mean (Poisson) glinting satellites per science frame: dotted trails of flashes
        (:data:`~broker.training.stress.GLINT_BRIGHTNESS`), each knot a point source to the
        eye, labelled ``"satellite"``. Default 0: none (and no random numbers for them). 0.3
        made ZTF's dotted streaks bogus to the model but cost real point sources on other
        surveys' backgrounds (docs/notes/training-settings.md).
    p_reference_gap : float
        Probability that a frame's reference lacks coverage in a block (NaN; a strip along an
        edge or a square, :func:`~broker.training.stress.reference_gap`): real sources beside it
        keep their label with a blank reference beside them. Default 0: off (0.2 moved nothing
        on real data; docs/notes/training-settings.md).
    spike_strength_range : tuple of float
        Diffraction spikes on the field's stars above the simulator's ``bright_flux``, drawn per
        field log-uniformly in this range (``SimConfig.spike_strength``: an arm's brightness where
        it leaves the star over the star's peak) at a uniform position angle; in every epoch of the field, the
        reference's too. Default (0, 0): none ((0.001, 0.02) moved nothing on real data;
        docs/notes/training-settings.md).
    edge_px : int
        Unmatched candidates closer than this to the frame edge are of kind ``"edge"``
        (cutout cut by the frame edge). Default 20 px.
    balance : bool
        Write as many bogus as real candidates (see :class:`~broker.training.shards.ShardWriter`).
        Default True.
    shard_size : int
        Candidates per ``.npz`` shard. Default 4096.
    workers : int
        Processes generating fields in parallel (1 = in this process). Default 1; the set does
        not depend on it.
    seed : int
        Seeds everything: same seed and config, same set. Default 0.
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
    glints_per_frame: float = 0.0
    p_reference_gap: float = 0.0
    spike_strength_range: tuple[float, float] = (0.0, 0.0)
    edge_px: int = 20
    balance: bool = True
    shard_size: int = 4096
    workers: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hot_pixels_per_frame", "bad_columns_per_frame", "trails_per_frame",
                     "faint_trails_per_frame", "glints_per_frame"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):  # a Poisson mean; < 0 would fail in a worker
                raise ConfigError(f"TrainingSetConfig.{name} must be a finite mean >= 0, got {v!r}")
        lo, hi = self.spike_strength_range
        if not (lo == hi == 0 or 0 < lo <= hi < 1):
            raise ConfigError("TrainingSetConfig.spike_strength_range must be (0, 0) or fractions "
                              f"0 < lo <= hi < 1, got {self.spike_strength_range!r}")
        if not 0 <= self.p_reference_gap <= 1:
            raise ConfigError(f"TrainingSetConfig.p_reference_gap must be a probability, got "
                              f"{self.p_reference_gap!r}")
        unknown = set(self.dipole_lobe_kinds) - set(self.real_kinds)
        if unknown:
            raise ConfigError(f"TrainingSetConfig.dipole_lobe_kinds {sorted(unknown)} are not "
                              f"among real_kinds {list(self.real_kinds)}")


#: Generator settings added after sets were written, with the value that the older code had
#: (a manifest or model card without one was made with that value).
SET_SETTINGS_ADDED: dict = {"min_dipole_lobe_ratio": 0.0, "variable_bright_cap": None,
                            "faint_trails_per_frame": 0.0, "dipole_lobe_kinds": ["variable"],
                            "glints_per_frame": 0.0, "p_reference_gap": 0.0,
                            "spike_strength_range": [0.0, 0.0]}
#: The settings that decide a candidate's label (not which candidates are drawn): two sets that
#: differ in one of them label the same stamps differently, and a model's error rate on a set
#: labelled otherwise than its training data is not comparable with another model's there.
LABEL_SETTINGS = ("match_radius", "min_real_snr", "real_kinds", "swamped_ratio",
                  "variable_dipole_lobe", "dipole_lobe_kinds", "trail_share",
                  "min_dipole_lobe_snr", "min_dipole_lobe_ratio")


def config_dict(config: TrainingSetConfig) -> dict:
    """The config as JSON-comparable plain lists and numbers (as a manifest records it)."""
    return json.loads(json.dumps(asdict(config)))


def label_settings_differ(a: dict | None, b: dict | None) -> list[str] | None:
    """The :data:`LABEL_SETTINGS` in which two generator configs differ.

    The configs are manifest or model-card ``config`` dicts; None when either is unknown (absent or
    not a dict).
    """
    if not (isinstance(a, dict) and isinstance(b, dict) and a and b):
        return None
    # a JSON round trip makes tuples lists, as they are in a manifest
    a, b = (json.loads(json.dumps({**SET_SETTINGS_ADDED, **c})) for c in (a, b))
    return [k for k in LABEL_SETTINGS if a.get(k) != b.get(k)]
