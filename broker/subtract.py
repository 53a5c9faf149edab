"""The subtract+detect step: a science frame minus its reference, and the candidates on the difference.

:func:`subtract_and_detect` runs named steps, each returning a small frozen dataclass:

1. **sky** (:func:`_science_sky` -> :class:`ScienceSky`): background map, sky-subtracted science;
2. **stars** (:func:`_clean_science` -> :class:`PreparedScience`): the science star catalogue, and
   cosmic rays and detector defects interpolated over (:mod:`broker.defects`);
3. **align**: the reference resampled onto the science grid (:func:`broker.align.align_reference`);
4. **psf** (:func:`_match_psfs` -> :class:`PSFMatch`): science and reference PSFs from the same
   matched stars (:mod:`broker.psf_match`), and the reference / science flux ratio F_r
   (:func:`_measured_flux_ratio`: those stars' PSF fits, else apertures, else zero points);
5. **masks** (:func:`_masks` -> :class:`Masks`, :func:`_zogy_inputs` -> :class:`ZogyInputs`): bad
   pixels, variances, the zero-padded inputs of ZOGY and the registration noise;
6. **zogy** (:func:`_zogy_images` -> :class:`ZogyImages`): ZOGY (:mod:`broker.zogy`) per PSF tile
   (:func:`broker.psf_match.tile_psfs`), then the blank-sky offset and scale of S_corr taken out;
7. **detect** (:func:`_find_peaks` -> :class:`Peaks`, :func:`_measure`): peaks of S_corr measured on D;
   **context** (:func:`_context`): the star or host galaxy under each on the aligned reference;
8. **cutouts** (:func:`_cutouts`): science, reference and difference stamps of each candidate;
9. **diagnostics** (:func:`_diagnostics`), with the time of each step (:class:`StepTimer`).

Bad pixels (NaN in either image, saturated and their dilated surroundings, outside the reference)
are set to 0 (= background, both images being background-subtracted) in *both* images before any
FFT, so nothing rings, and receive a huge variance, so S_corr is suppressed wherever the matched
filter reaches them. The frames are zero-padded by two PSF stamps (marked bad) against wrap-around.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
from astropy.wcs import WCS
from scipy import fft, ndimage

from broker.align import AlignConfig, Alignment, align_reference
from broker.background import BackgroundConfig, estimate_background
from broker.candidate import Candidate, Detection
from broker.cutouts import triplet
from broker.defects import FILL_MAX_SPREAD, bad_columns, inpaint, sharp_fwhm, sharp_outliers
from broker.detect import (
    DetectConfig,
    find_scorr_peaks,
    measure_candidates,
    reference_context,
    sharp_peaks,
    wrap_ra,
)
from broker.diffstore import DifferenceImage
from broker.errors import BadPixelFraction, PoorQuality, ReferenceUnavailable
from broker.fluxratio import FluxRatio, aperture_flux_ratio, measure_flux_ratio, zero_point_ratio
from broker.frame import Frame, FrameMeta
from broker.masks import grow_square, saturated_mask
from broker.psf import PSFConfig, build_psf, half_size_for, measure_fwhm, resize_stamp, select_psf_stars
from broker.psf_match import (
    StackPlan,
    Tile,
    common_psfs,
    relative_span,
    tile_boxes,
    tile_fwhm_span,
    tile_psfs,
)
from broker.reference import Reference
from broker.stars import StarConfig, StarList, find_stars
from broker.zogy import interpolation_kernel, zogy

#: Largest reference source catalogue (count): every 5 sigma source of a crowded 2k x 2k field.
SOURCE_MAX_STARS = 20000

#: Significance of the limiting flux (sigma): ZTF's ``diffmaglim`` and Rubin's limits are 5 sigma.
LIMIT_SIGMA = 5.0

#: Finite pixels (of 25) a NaN pixel's 5 x 5 box needs for it to be interpolated
#: (:func:`scattered_blanks`): 20, so a cluster of up to ~5 NaN pixels is filled and the rim of a
#: wide NaN region (at most 15 finite) is not.
MIN_BLANK_DONORS = 20

#: What measured F_r, as the diagnostic ``flux_ratio_source`` gives it: the index of the
#: :class:`~broker.fluxratio.FluxRatio` source in this tuple (0: nothing, F_r = 1 taken).
FLUX_RATIO_SOURCES = ("none", "psf_stars", "aperture", "zero_point")

#: Blank-sky std of S_corr (sigma) below which the reference shares the frame's noise and is refused
#: (:func:`check_independent_noise`): two independent exposures give 1 (0.95-1.03 on the simulator,
#: 1.5 with correlated noise); a reference of the frame's own pixels 0.007, of its copy quantised to
#: 1/16 of the noise (fpack) 0.03; a 3-frame reference holding the frame once 0.54.
SHARED_NOISE_STD = 0.5

#: Saturated science pixels hidden from the sky map and the star finder, before any PSF is
#: measured: at or above this fraction of SATURATE (dimensionless; the default of
#: ``SubtractConfig.saturation_fraction``, whatever the configuration says) ...
RAW_SATURATION_FRACTION = 0.9
#: ... grown by this fixed margin (px): one FWHM of a sharp (2 px) PSF, as no PSF is known yet.
#: The mask of the subtraction itself is grown by the measured FWHM (:func:`saturation_mask`).
RAW_SATURATION_GROW_PX = 2.0


@dataclass(frozen=True)
class SubtractConfig:
    """Settings of subtract+detect.

    Attributes
    ----------
    threshold_sigma : float
        Detection threshold on |S_corr| (sigma); 5 as in ZTF. Overrides ``detect.threshold_sigma``.
    saturation_fraction : float
        Pixels at or above this fraction of SATURATE are masked (dimensionless); 0.9: most CCDs
        turn non-linear ~10 % below full well.
    sat_grow_fwhm : float
        Saturated regions are dilated by this many PSF FWHM (default 2) ...
    sat_grow_size : float
        ... plus this many times their own equivalent radius sqrt(area / pi) (default 1.5):
        brighter stars have bigger wings.
    ref_bad_grow_fwhm : float
        Invalid reference pixels (saturated cores co-added as NaN, edges) and untrusted fills are
        dilated by this many FWHM (default 1).
    bad_variance_factor : float
        Variance given to bad pixels, in units of the median science variance (dimensionless).
        1e4 suppresses S_corr within ~2 FWHM of a mask (where the matched filter still sees it)
        and nowhere else.
    astrometric_floor_px : float
        Lower bound on the registration noise sigma_x, sigma_y of the astrometric term (px). The
        registration error itself is the fit RMS / sqrt(n matched); 0.03: star-matched
        registrations are good to a few 0.01 px, and the floor keeps bright-star residuals below
        threshold.
    astrometric_max_px : float
        Upper bound on sigma_x, sigma_y (px); 0.5: a bad fit must not blind the whole frame.
    flux_error : float
        Fractional flux-scaling / PSF-model error (dimensionless) entering S_corr's variance as
        ``flux_error^2 (S_N^2 + S_R^2)`` (an extension of ZOGY, like its astrometric term). 0
        (off): it is not ZOGY, and 0.02 hid S/N 8-17 transients on bright galaxies.
    cosmic_ray_sigma : float
        Science pixels that exceed their 3x3 median by this many sigma and by twice what the PSF
        allows (cosmic rays, hot pixels; :func:`broker.defects.sharp_outliers`, a stand-in for
        L.A.Cosmic) are interpolated over before the subtraction, and positive peaks still
        sitting on such a pixel are dropped (:func:`broker.detect.sharp_peaks`). 8 sigma keeps the
        brightest pixel of any PSF-blurred source. 0 disables both.
    bad_column_sigma : float
        Column segments whose 128-row median stands this many sigma from their neighbours' (hot,
        cold and bleeding columns; :func:`broker.defects.bad_columns`) are interpolated like cosmic
        rays. 6: ~1e-4 false segments per 2k x 2k frame for Gaussian noise. 0 disables.
    reference_noise_kernel : bool
        Model the reference noise as coloured by its resampling
        (:func:`broker.zogy.interpolation_kernel`) instead of white (True; matters for
        undersampled PSFs, see :func:`broker.zogy.zogy`).
    min_flux_ratio_stars : int
        Matched stars needed for the flux ratio F_r (count), by the isolated stars' PSF fits or
        else by apertures on every matched star (:func:`_measured_flux_ratio`). 3: the fewest whose
        median rejects one outlier.
    renormalise_scorr : bool
        Always divide S_corr by its robust (MAD) standard deviation over blank sky when that is
        above 1. Off: the ZOGY variance terms give unit variance already (checked by the tests
        and reported in the diagnostics as ``scorr_std``).
    renormalise_tolerance : float
        When the blank-sky std of S_corr exceeds 1 by more than this (dimensionless), S_corr
        is divided by it anyway (flagged ``scorr_renormalised``). The noise model assumes white
        pixel noise; inputs that are themselves resampled stacks have correlated noise that the
        per-pixel RMS under-counts (DECam pair: std 1.5), and the 5 sigma threshold would flood
        the stream. 0.1 leaves the normal case (1.00-1.03) untouched. S_corr is never divided by
        less than 1 (ZOGY's expected noise is the floor): a std below 1 is a difference quieter
        than two independent exposures can give, and dividing by it (0.007 for a reference made
        of the frame's own pixels) turned float round-off into 41-500 candidates
        (:data:`SHARED_NOISE_STD`).
    max_candidates : int
        Cap on candidates per frame (count), the most significant kept; 500 as ``detect``.
    psf_tile_px : int
        Frames of 1.5x this side (px) or more are split into tiles of about this size, each with
        its own science and reference PSFs (from the stars of the tile and a quarter tile around
        it) and its own ZOGY solution, so that a PSF varying across the field (optics, tracking,
        focus) is followed. 1024 px: 2 x 2 tiles of ~15-50 isolated stars each on a 2k x 2k
        high-latitude frame (seeing 2.6 -> 3.2 px across 1024 px: 182 false candidates with one
        PSF, 1 with 256 px tiles). 0: one PSF for the frame.
    psf_tile_min_change : float
        The tiles are used only when their science or reference FWHMs span more than this
        fraction of the median (dimensionless): PSFs from a quarter of the stars are noisier.
        0.05 (a 0.15 px change of a 3 px PSF, which leaves 5-10 sigma rings on stars of 10^5 ADU):
        tiles doubled the false candidates on constant-PSF frames (span ~1 %).
    sky_offset_box_px : int
        Mesh (px) of the blank-sky level of S_corr subtracted from S_corr and D: the differential
        background (SFFT fits it as a polynomial, HOTPANTS as a kernel term) that faint sources
        leave by biasing the science and reference sky maps differently. 64, the sky meshes'
        scale: false detections per 2k x 2k bench frame 2.3 -> 1.0 over 6 pairs (256 px left half
        the offset); the level is good to ~0.06 sigma, < 0.5 % more variance in S_corr. 0 disables.
    background, stars, psf, align, detect
        Settings of the steps (:mod:`broker.background`, :mod:`broker.stars`, :mod:`broker.psf`,
        :mod:`broker.align`, :mod:`broker.detect`).
    """

    threshold_sigma: float = 5.0
    saturation_fraction: float = 0.9
    sat_grow_fwhm: float = 2.0
    sat_grow_size: float = 1.5
    ref_bad_grow_fwhm: float = 1.0
    bad_variance_factor: float = 1e4
    astrometric_floor_px: float = 0.03
    astrometric_max_px: float = 0.5
    flux_error: float = 0.0
    cosmic_ray_sigma: float = 8.0
    bad_column_sigma: float = 6.0
    reference_noise_kernel: bool = True
    min_flux_ratio_stars: int = 3
    renormalise_scorr: bool = False
    renormalise_tolerance: float = 0.1
    max_candidates: int = 500
    psf_tile_px: int = 1024
    psf_tile_min_change: float = 0.05
    sky_offset_box_px: int = 64
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    stars: StarConfig = field(default_factory=StarConfig)
    psf: PSFConfig = field(default_factory=PSFConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)


@dataclass
class SubtractionResult:
    """Output of :func:`subtract_and_detect`.

    Attributes
    ----------
    candidates : list of Candidate
        ``cand_id = f"{frame_id}/{i}"`` in order of decreasing |S_corr| (ties by y, x).
    diagnostics : dict of str -> float
        ``astrometric_residual_px``, ``n_matched_stars``, ``fwhm_science_px``,
        ``fwhm_reference_px``, ``flux_ratio`` (F_r), ``flux_ratio_source`` (what measured it: the
        index in :data:`FLUX_RATIO_SOURCES`), ``flux_ratio_n_stars`` (stars it rests on),
        ``scorr_std`` (robust std of S_corr on blank sky),
        ``psf_fallback`` (1: science PSF is the Gaussian fallback), ``psf_common_stars`` (1: both
        PSFs stacked from the same matched stars; 0: science PSF from its own stars and the
        reference PSF from its stored stamp),
        ``flux_ratio_fallback`` (1: nothing measured F_r and 1 was taken; :attr:`flux_ratio` says
        why, and :func:`broker.pipeline.process_frame` refuses the frame), ``n_psf_stars``,
        ``overlap``, ``bad_fraction``,
        ``n_candidates``, ``n_cosmic_rays`` (peaks vetoed as sharper than the PSF),
        ``limiting_flux`` (5 sigma point-source limit on blank sky, science ADU; :func:`limiting_flux`),
        ``t_<step>_s`` per step and ``t_total_s`` (s); see :func:`_diagnostics` for all.
    flux_ratio : FluxRatio
        F_r and what measured it (:func:`_measured_flux_ratio`); its ``reason`` says why nothing
        did (source ``"none"``; the subtraction then took F_r = 1).
    images : dict of str -> ndarray, optional
        The full D (science ADU), S_corr and bad mask when ``keep_images`` was asked.
    difference : DifferenceImage or None
        What the difference store keeps of the frame (:mod:`broker.diffstore`), when
        ``keep_difference`` was asked.
    """

    candidates: list[Candidate]
    diagnostics: dict[str, float]
    flux_ratio: FluxRatio
    images: dict[str, np.ndarray] = field(default_factory=dict)
    difference: DifferenceImage | None = None


# --- building blocks ------------------------------------------------------------------------------
def saturation_mask(data: np.ndarray, saturation: float, fwhm: float,
                    config: SubtractConfig = SubtractConfig()) -> np.ndarray:
    """Saturated pixels grown by ``sat_grow_fwhm`` FWHM + ``sat_grow_size`` x their own radius.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Raw science frame (ADU).
    saturation : float
        SATURATE (ADU).
    fwhm : float
        PSF FWHM (px).

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    return saturated_mask(data, saturation, config.saturation_fraction, config.sat_grow_fwhm * fwhm,
                          config.sat_grow_size)


def raw_saturation_mask(data: np.ndarray, saturation: float) -> np.ndarray:
    """Saturated pixels before any PSF is known.

    :data:`RAW_SATURATION_FRACTION` of SATURATE,
    grown by :data:`RAW_SATURATION_GROW_PX`; bool, shape of ``data``.
    """
    return saturated_mask(data, saturation, RAW_SATURATION_FRACTION, RAW_SATURATION_GROW_PX, 0.0)


def source_variance(N: np.ndarray, rms: np.ndarray, gain: float) -> np.ndarray:
    """Poisson variance of the sources (ADU^2): the 3x3-mean image / gain where it is > 2 sigma.

    The mean (noise sigma/3) is both a less noisy estimate of the source flux than the pixel itself
    and a cleaner cut: thresholding the raw pixel at 2 sigma lets every positive noise excursion
    add variance (S_corr then drops ~1.5 % at a faint transient).

    Parameters
    ----------
    N : ndarray, shape (ny, nx)
        Background-subtracted science (ADU), NaN where invalid.
    rms : ndarray, shape (ny, nx)
        Sky noise (ADU).
    gain : float
        e-/ADU.

    Returns
    -------
    ndarray, shape (ny, nx), float32
    """
    Ns = ndimage.uniform_filter(np.where(np.isfinite(N), N, 0.0).astype(np.float32), 3, mode="nearest")
    return np.where(Ns > (2.0 / 3.0) * rms, Ns, 0.0).astype(np.float32) / max(gain, 1e-6)


def _pixel_scale_arcsec(wcs: WCS) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)


def reference_sources(reference: Reference, config: SubtractConfig = SubtractConfig()) -> StarList:
    """Star catalogue of a reference on its own grid.

    The stored one, else found with ``config``'s
    star settings (up to :data:`SOURCE_MAX_STARS`) at its detection threshold, once per reference
    (:meth:`broker.reference.Reference.catalogue`).
    """
    return reference.catalogue(replace(config.stars, max_stars=SOURCE_MAX_STARS), config.threshold_sigma)


def sky_offset(S_corr: np.ndarray, sky: np.ndarray, box_px: int) -> np.ndarray | None:
    """Smooth blank-sky level of S_corr (sigma), or None (disabled, or too little blank sky).

    Parameters
    ----------
    S_corr : ndarray, shape (ny, nx)
    sky : ndarray of bool, shape (ny, nx)
        Blank-sky pixels (no source, no mask).
    box_px : int
        Mesh size (px); 0 disables.

    Returns
    -------
    ndarray, shape (ny, nx), float32, or None
    """
    if box_px <= 0:
        return None
    try:
        level, _ = estimate_background(np.where(sky, S_corr, np.nan), None,
                                       BackgroundConfig(box_size=box_px))
    except BadPixelFraction:
        return None
    return level


# --- the steps ------------------------------------------------------------------------------------
class StepTimer:
    """Wall-clock time of named steps: ``with timer.step("align"): ...`` records ``t_align_s`` (s)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as ``t_<name>_s``."""
        t = time.perf_counter()
        yield
        self.times[f"t_{name}_s"] = time.perf_counter() - t

    def total(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self.start


@dataclass(frozen=True)
class ScienceSky:
    """The science frame's sky (step 1); all arrays (ny, nx), float32 unless said.

    Attributes
    ----------
    sci : raw frame (ADU), NaN where invalid.
    raw_saturated : bool, saturated pixels before any PSF is known (:func:`raw_saturation_mask`).
    background, rms : sky level and sky noise (ADU).
    N : ``sci - background`` (ADU).
    sigma_n : float, median sky noise (ADU).
    """

    sci: np.ndarray
    raw_saturated: np.ndarray
    background: np.ndarray
    rms: np.ndarray
    N: np.ndarray
    sigma_n: float


@dataclass(frozen=True)
class PreparedScience:
    """The science frame ready for subtraction (step 2); arrays (ny, nx).

    Attributes
    ----------
    sky : ScienceSky
    stars : StarList, the science star catalogue.
    N : background-subtracted science with defects interpolated over (ADU), float32, NaN where
        a NaN pixel could not be filled (masked later).
    fixed : bool, pixels interpolated over (cosmic rays, hot pixels, bad columns, reference defects,
        scattered NaN pixels).
    unfilled : bool, defect pixels whose fill is not trusted (masked later, grown).
    fill_spread : error of each fill (ADU), 0 elsewhere, float32.
    sharp_fwhm : FWHM (px) the cosmic-ray tests take for the stars (:func:`broker.defects.sharp_fwhm`).
    """

    sky: ScienceSky
    stars: StarList
    N: np.ndarray
    fixed: np.ndarray
    unfilled: np.ndarray
    fill_spread: np.ndarray
    sharp_fwhm: float


@dataclass(frozen=True)
class PSFMatch:
    """Science and reference PSFs and the flux ratio (step 4).

    Attributes
    ----------
    P_n, P_r : ndarray, shape (2h+1, 2h+1), float32, sum 1.
    half_size : int, h (px).
    fwhm_n, fwhm_r : float, their FWHMs (px).
    n_stars : int, stars stacked.
    matched : StarList, the science stars matched to reference stars.
    ratio : FluxRatio, reference / science flux ratio F_r and what measured it (NaN, source
        ``"none"``, when nothing did; :func:`_measured_flux_ratio`).
    fallback : bool, the science PSF is the Gaussian fallback.
    common : bool, both PSFs stacked from the same matched stars.
    plan : StackPlan, the stacks' half-sizes and neighbour masks (per-tile PSFs use it too).
    """

    P_n: np.ndarray
    P_r: np.ndarray
    half_size: int
    fwhm_n: float
    fwhm_r: float
    n_stars: int
    matched: StarList
    ratio: FluxRatio
    fallback: bool
    common: bool
    plan: StackPlan | None = None

    @property
    def flux_ratio(self) -> float:
        """F_r the subtraction uses: the measured one, 1 when nothing measured it (:attr:`flux_ratio_fallback`)."""
        return self.ratio.value if self.ratio.measured else 1.0

    @property
    def flux_ratio_fallback(self) -> bool:
        """Nothing measured F_r: 1 is taken (every star of a frame of another flux scale leaves a residual)."""
        return not self.ratio.measured


@dataclass(frozen=True)
class Masks:
    """Bad pixels and variances (step 5); arrays (ny, nx).

    Attributes
    ----------
    bad : bool, pixels masked in both images.
    var_n, var_r : float32, science and reference variance (ADU^2, reference scale for var_r).
    sigma_r : float, reference background noise (ADU).
    bad_variance : float, science variance given to bad pixels (ADU^2).
    """

    bad: np.ndarray
    var_n: np.ndarray
    var_r: np.ndarray
    sigma_r: float
    bad_variance: float


@dataclass(frozen=True)
class ZogyInputs:
    """The inputs of ZOGY zero-padded by ``pad`` px, (py, px) float32, bad pixels at 0 / huge variance.

    Attributes
    ----------
    N, R : science and aligned reference (ADU).
    V_N, V_R : their variances (ADU^2).
    fill_n, fill_r : float, the variance of padding and bad pixels in V_N and V_R (ADU^2).
    pad : int, padding (px) on the low side of each axis.
    sigma_ast : (float, float), registration noise in x and y (px).
    """

    N: np.ndarray
    R: np.ndarray
    V_N: np.ndarray
    V_R: np.ndarray
    fill_n: float
    fill_r: float
    pad: int
    sigma_ast: tuple[float, float]


@dataclass(frozen=True)
class ZogyImages:
    """ZOGY images on the science grid (step 6); arrays (ny, nx) float32.

    Attributes
    ----------
    D : difference image, unit background variance.
    D_adu : D in science ADU.
    S_corr : S_corr (sigma), 0 at bad pixels, sky offset and scale taken out.
    V_S : variance of S from source + background noise.
    tiles : list of Tile, with their P_D.
    fwhm_tiles : list of float, the science PSF FWHM of each tile (px).
    v0 : float, blank-sky value of V_S.
    offset : ndarray or None, the blank-sky level taken out of S_corr (sigma).
    scorr_std : float, robust blank-sky std of S_corr before renormalisation.
    renormalised : bool, S_corr was divided by ``scorr_std``.
    """

    D: np.ndarray
    D_adu: np.ndarray
    S_corr: np.ndarray
    V_S: np.ndarray
    tiles: list[Tile]
    fwhm_tiles: list[float]
    v0: float
    offset: np.ndarray | None
    scorr_std: float
    renormalised: bool


@dataclass(frozen=True)
class Peaks:
    """Detected peaks of S_corr (step 7), most significant first.

    Attributes
    ----------
    x, y : ndarray of int, peak pixels.
    value : ndarray, S_corr there (sigma).
    n_cosmic_rays : int, peaks vetoed as sharper than the PSF.
    capped : bool, more peaks than the cap.
    """

    x: np.ndarray
    y: np.ndarray
    value: np.ndarray
    n_cosmic_rays: int
    capped: bool


def _check_reference(frame: Frame, reference: Reference) -> None:
    """Raise :class:`ReferenceUnavailable` when ``reference`` is for another key or is malformed."""
    if tuple(reference.key) != tuple(frame.meta.reference_key):
        raise ReferenceUnavailable(f"reference {reference.key} does not match frame key {frame.meta.reference_key}")
    if reference.image.ndim != 2 or reference.image.shape != reference.variance.shape:
        raise ReferenceUnavailable("reference image and variance shapes differ")
    if reference.psf.ndim != 2 or reference.psf.shape[0] % 2 == 0 or reference.psf.shape[0] != reference.psf.shape[1]:
        raise ReferenceUnavailable(f"reference PSF has a bad shape {reference.psf.shape}")


def _science_sky(frame: Frame, config: SubtractConfig) -> ScienceSky:
    """Step 1: the sky map of the science frame (saturated pixels excluded) and its subtraction."""
    sci = np.asarray(frame.data, dtype=np.float32)
    raw_sat = raw_saturation_mask(sci, frame.meta.saturation)
    bkg, rms = estimate_background(sci, raw_sat, config.background)
    return ScienceSky(sci, raw_sat, bkg, rms, sci - bkg, float(np.median(rms[::4, ::4])))


def _clean_science(sky: ScienceSky, saturation: float, defects: np.ndarray | None,
                   config: SubtractConfig) -> PreparedScience:
    """Step 2: science stars, then cosmic rays, hot pixels and the reference's detector defects interpolated over.

    The defects are found on the reference grid, i.e. on the detector pixels of its first frame:
    the same pixels of every frame of the camera. Survey pipelines interpolate such pixels:
    masking them would blind S_corr for 2 FWHM around each, and a transient beside or beneath one
    keeps its other pixels. Scattered NaN pixels (bad pixels a producer blanked) are interpolated
    the same way: left NaN, 0.5 % of them spoiled the stamp of nearly every PSF star, and the
    Gaussian fallback PSF and a flux ratio of 1 then left a residual at every bright star (15
    candidates instead of 1 on a 256 x 256 test field). Wide NaN regions (borders of a resampled
    frame, masked strips) stay NaN (:func:`scattered_blanks`), and so does a NaN pixel whose fill
    is not trusted (a star's core): masked alone, not grown like an untrusted defect fill, so that a
    transient beside one keeps its other pixels.
    """
    unsaturated = np.where(sky.raw_saturated, 0.0, sky.N)
    stars = find_stars(unsaturated, sky.sigma_n, config.stars, saturation, sky.background)
    blank = scattered_blanks(sky.N)
    fix = blank.copy()
    fwhm = sharp_fwhm(unsaturated, stars)
    if config.cosmic_ray_sigma > 0:
        fix |= sharp_outliers(sky.N, sky.rms, fwhm, config.cosmic_ray_sigma)
    if config.bad_column_sigma > 0:
        fix |= bad_columns(np.where(sky.raw_saturated, np.nan, sky.N), sky.rms, nsigma=config.bad_column_sigma)
    if defects is not None and defects.shape == sky.N.shape:
        fix |= defects
    N, fill_spread = inpaint(sky.N, fix)
    # a fill is trusted where the surface follows the image; elsewhere (a star's core) masked
    untrusted = fix & ~(fill_spread <= FILL_MAX_SPREAD * sky.rms)
    N[untrusted & blank] = np.nan
    fill_spread[untrusted & blank] = 0.0
    return PreparedScience(sky, stars, N, fix & ~(untrusted & blank), untrusted & ~blank,
                           np.nan_to_num(fill_spread), fwhm)


def scattered_blanks(image: np.ndarray) -> np.ndarray:
    """NaN pixels with at least :data:`MIN_BLANK_DONORS` finite pixels in their 5 x 5 box.

    Those are the scattered bad pixels worth interpolating; the inside and the rim of a wide NaN
    region (a resampled frame's border, a masked strip) are not: extrapolated from one side and
    costing a 5 x 5 fit each (a 2048 x 2048 frame with 45 % NaN border took 3 GB and 4 s more).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    blank = ~np.isfinite(image)
    if not blank.any():
        return blank
    donors = ndimage.uniform_filter((~blank).astype(np.float32), 5, mode="constant") * 25
    return blank & (donors > MIN_BLANK_DONORS - 0.5)


def _psf_flux_ratio(ratio: np.ndarray, min_stars: int) -> FluxRatio:
    """Flux ratio F_r of the reference to the science frame, from the isolated stars' PSF-fit ratios.

    The sigma-clipped median of the stars' reference / science flux ratios; NaN (not measured)
    with fewer than ``min_stars`` ratios (:func:`_measured_flux_ratio` then tries the others).
    """
    if len(ratio) < min_stars:
        return FluxRatio(float("nan"), "psf_stars", len(ratio))
    med = np.median(ratio)
    mad = 1.4826 * np.median(np.abs(ratio - med)) + 1e-12
    return FluxRatio(float(np.median(ratio[np.abs(ratio - med) < 3 * mad])), "psf_stars", len(ratio))


def _measured_flux_ratio(science: PreparedScience, ali: Alignment, psfs: PSFMatch, reference: Reference,
                         meta: FrameMeta, config: SubtractConfig) -> FluxRatio:
    """Step 4b: F_r by the isolated stars' PSF fits, else apertures on every matched star, else zero points.

    :func:`broker.fluxratio.measure_flux_ratio`, as the reference co-add measures each frame's flux
    ratio, with the science frame as the grid: apertures of 1.5 and 3 FWHM of the broader PSF on
    the background-subtracted science (NaN where saturated) and the aligned reference, each less
    its residual sky, the sharper blurred to the broader seeing (the science's and the reference's
    measured FWHMs; :func:`broker.fluxratio.aperture_flux_ratio`), from ``min_flux_ratio_stars``
    stars of S/N >= 20 in both; else the frame's and the reference's
    measured zero points (:attr:`broker.reference.Reference.magzp`). With the Gaussian fallback
    PSFs of a field without isolated stars, F_r = 1 was taken: a science frame twice as deep as
    the reference left every star in the difference (see ``tests/broker/test_subtract.py``).
    Source ``"none"`` when nothing measures it.
    """
    N = np.where(science.sky.raw_saturated, np.nan, science.N)
    var = ali.variance[::4, ::4]
    var = var[np.isfinite(var) & (var > 0)]
    sigma_r = float(np.sqrt(np.median(var))) if var.size else float("nan")
    fwhms = [f for f in (science.stars.fwhm, psfs.fwhm_r) if np.isfinite(f) and f > 0]
    wide = max(fwhms or [config.psf.fallback_fwhm_px])
    m, n = psfs.matched, config.min_flux_ratio_stars
    return measure_flux_ratio(
        psfs.ratio, lambda: aperture_flux_ratio(N, ali.image, m.x, m.y, (science.sky.sigma_n, sigma_r), wide, n,
                                                 config.background, (science.stars.fwhm, psfs.fwhm_r)),
        zero_point_ratio(meta, reference), f"the reference to frame {meta.frame_id}",
        f"[subtract] min_flux_ratio_stars = {n}")


def _own_psfs(N: np.ndarray, stars: StarList, reference_psf: np.ndarray, matrix: np.ndarray, h: int,
              config: PSFConfig) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """PSFs from each image's own stars, when too few stars are common.

    Science PSF from its own stars (or the Gaussian fallback), reference PSF from its stored stamp
    resampled with the linear part of the registration (``matrix``).

    Returns
    -------
    P_n, P_r : ndarray, shape (2h+1, 2h+1), float32
    n_stars : int
    fallback : bool
        The science PSF is the Gaussian fallback.
    """
    sci_psf = build_psf(N, stars, config, half_size=h)
    lin = matrix[::-1, ::-1]
    centre = np.array(reference_psf.shape) // 2
    pr_ = ndimage.affine_transform(reference_psf.astype(np.float64), lin, offset=centre - lin @ centre, order=3)
    P_r = resize_stamp(np.clip(pr_, 0, None).astype(np.float32), h)
    return sci_psf.stamp, P_r, sci_psf.n_stars, bool(sci_psf.fallback)


def _stack_plan(stars: StarList, fwhm_r: float, config: PSFConfig) -> StackPlan:
    """Each PSF stacked on a stamp of its own FWHM, every other star masked out to ``neighbour_mask_fwhm``.

    The science FWHM is its star catalogue's, the reference's that of its stored PSF (px).
    """
    fwhm_n = stars.fwhm if np.isfinite(stars.fwhm) and stars.fwhm > 0 else config.fallback_fwhm_px
    fwhm_r = fwhm_r if np.isfinite(fwhm_r) and fwhm_r > 0 else config.fallback_fwhm_px
    return StackPlan((half_size_for(fwhm_n, config), half_size_for(fwhm_r, config)), (stars.x, stars.y),
                     (config.neighbour_mask_fwhm * fwhm_n, config.neighbour_mask_fwhm * fwhm_r))


def _match_psfs(science: PreparedScience, R: np.ndarray, ali: Alignment, reference_psf: np.ndarray,
                config: SubtractConfig) -> PSFMatch:
    """Step 4: PSFs and flux ratio from the same stars.

    The stars are matched and isolated, stacked at the same science positions in both images;
    the PSFs come from each image's own stars when too few are common.
    """
    N, shape = science.N, science.N.shape
    plan = _stack_plan(science.stars, measure_fwhm(reference_psf), config.psf)
    h = max(plan.half_sizes)
    matched = science.stars.subset(ali.sci_index)
    idx = select_psf_stars(matched, shape, h, config.psf, (science.stars.x, science.stars.y))
    P_n = P_r = None
    n_psf = 0
    by_psf = FluxRatio(float("nan"), "psf_stars", len(idx))
    if len(idx) >= config.min_flux_ratio_stars:
        P_n, P_r, n_psf, ratio = common_psfs(N, R, matched.x[idx], matched.y[idx], h, config.psf.min_stars, plan)
        by_psf = _psf_flux_ratio(ratio, config.min_flux_ratio_stars)
    fallback, common = False, True
    if P_n is None or P_r is None:
        common = False
        P_n, P_r, n_psf, fallback = _own_psfs(N, science.stars, reference_psf, ali.matrix, h, config.psf)
    return PSFMatch(P_n, P_r, h, measure_fwhm(P_n), measure_fwhm(P_r), n_psf, matched, by_psf, fallback, common,
                    plan)


def _masks(science: PreparedScience, ali: Alignment, psfs: PSFMatch, saturation: float, gain: float,
           reference_variance: np.ndarray, config: SubtractConfig) -> Masks:
    """Step 5a: science invalid + saturated (grown) + reference invalid (grown), and the variances."""
    sci, rms = science.sky.sci, science.sky.rms
    fwhm = max(psfs.fwhm_n, psfs.fwhm_r)
    bad = ~np.isfinite(science.N) | saturation_mask(sci, saturation, fwhm, config)
    bad |= grow_square(~np.isfinite(ali.image) | ~np.isfinite(ali.variance) | science.unfilled,
                       config.ref_bad_grow_fwhm * fwhm)
    var_n = rms ** 2 + source_variance(science.N, rms, gain) + science.fill_spread ** 2
    var_r = np.where(np.isfinite(ali.variance), ali.variance, 0.0).astype(np.float32)
    # frame statistics on every 4th pixel of every 4th row: 260k samples of a 2k x 2k frame
    sub_good = ~bad[::4, ::4]
    if sub_good.any():
        sigma_r = float(np.sqrt(np.median(var_r[::4, ::4][sub_good])))
        big = config.bad_variance_factor * float(np.median(var_n[::4, ::4][sub_good]))
    else:
        sigma_r, big = float(np.sqrt(np.nanmedian(reference_variance))), 1e30
    # a noise-free (model) template would make k_r a deconvolution kernel with unbounded wings:
    # no real reference is better than 1 % of the science noise
    sigma_r = max(sigma_r, 0.01 * science.sky.sigma_n * psfs.flux_ratio)
    var_r = np.maximum(var_r, np.float32(sigma_r ** 2))
    return Masks(bad, var_n, var_r, sigma_r, big)


def _astrometric_noise(ali: Alignment, config: SubtractConfig) -> tuple[float, float]:
    """Registration noise sigma_x, sigma_y (px): the fit residual / sqrt(n matched), bounded."""
    if ali.n_matched >= 2 and np.isfinite(ali.residual_px):
        nm = np.sqrt(max(ali.n_matched, 1))
        sx, sy = (float(np.clip(r / nm, config.astrometric_floor_px, config.astrometric_max_px))
                  for r in ali.residual_xy)
        return sx, sy
    # no star to register (nor to leave a residual): the term would only add gradient noise
    return config.astrometric_floor_px, config.astrometric_floor_px


def _padded(img: np.ndarray, fill: float, pad: int, shape: tuple[int, int]) -> np.ndarray:
    """``img`` at offset (pad, pad) of a float32 array of ``shape`` filled with ``fill``."""
    out = np.full(shape, fill, np.float32)
    out[pad:pad + img.shape[0], pad:pad + img.shape[1]] = img
    return out


def _zogy_inputs(science: PreparedScience, R: np.ndarray, masks: Masks, psfs: PSFMatch,
                 sigma_ast: tuple[float, float]) -> ZogyInputs:
    """Step 5b: ZOGY's inputs, padded against wrap-around.

    Bad pixels at 0 with a huge variance, padded by two stamps so the circular convolutions do not
    wrap (to a fast FFT size).
    """
    shape, bad = science.N.shape, masks.bad
    pad = 2 * psfs.half_size
    full = (fft.next_fast_len(shape[0] + 2 * pad, real=True), fft.next_fast_len(shape[1] + 2 * pad, real=True))
    big, big_r = masks.bad_variance, masks.bad_variance * psfs.flux_ratio ** 2
    return ZogyInputs(_padded(np.where(bad, 0.0, science.N), 0.0, pad, full),
                      _padded(np.where(bad, 0.0, R), 0.0, pad, full),
                      _padded(np.where(bad, big, masks.var_n), big, pad, full),
                      _padded(np.where(bad, big_r, masks.var_r), big_r, pad, full),
                      big, big_r, pad, sigma_ast)


def _psf_tiles(N: np.ndarray, R: np.ndarray, psfs: PSFMatch, config: SubtractConfig
               ) -> tuple[list[Tile], list[float]]:
    """The frame's PSF tiles and their science FWHMs (px).

    One tile unless the PSF varies by more than ``psf_tile_min_change`` across tiles of
    ``psf_tile_px``.
    """
    shape = N.shape
    whole = Tile(0, shape[0], 0, shape[1], psfs.P_n, psfs.P_r, psfs.n_stars)
    if not (config.psf_tile_px > 0 and max(shape) >= 1.5 * config.psf_tile_px and psfs.common):
        return [whole], [psfs.fwhm_n]
    matched, h = psfs.matched, psfs.half_size
    pool = select_psf_stars(matched, shape, h, replace(config.psf, max_stars=len(matched)),
                            None if psfs.plan is None else psfs.plan.neighbours)
    px_, py_ = matched.x[pool], matched.y[pool]
    span = tile_fwhm_span(N, R, px_, py_, tile_boxes(shape, config.psf_tile_px))
    if span <= config.psf_tile_min_change:  # NaN (a tile short of stars): measure them
        return [whole], [psfs.fwhm_n]
    split = tile_psfs(N, R, px_, py_, h, whole, config.psf_tile_px, config.psf.max_stars, config.psf.min_stars,
                      psfs.plan)
    fw_n = [measure_fwhm(t.P_n) for t in split]
    if max(relative_span(fw_n), relative_span([measure_fwhm(t.P_r) for t in split])) > config.psf_tile_min_change:
        return split, fw_n
    return [whole], [psfs.fwhm_n]


def _window(a: np.ndarray, tile: Tile, fy: int, fx: int, fill: float) -> np.ndarray:
    """The (fy, fx) window of a padded array starting at the tile's corner, padded with ``fill``."""
    w = a[tile.y0:tile.y0 + fy, tile.x0:tile.x0 + fx]
    if w.shape == (fy, fx):
        return w
    out = np.full((fy, fx), fill, np.float32)
    out[:w.shape[0], :w.shape[1]] = w
    return out


def _zogy_per_tile(inputs: ZogyInputs, tiles: list[Tile], shape: tuple[int, int], sigma_n: float,
                   sigma_r: float, flux_ratio: float, h_ref: np.ndarray | None, config: SubtractConfig
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[Tile]]:
    """ZOGY on each tile and a margin of one pad (the padded frame holds them), to a fast FFT size.

    Returns
    -------
    D, D_adu, S_corr, V_S : ndarray, shape ``shape``, float32
    tiles : list of Tile
        With their P_D, F_D and fwhm_D.
    """
    pad = inputs.pad
    D, S_corr, V_S, D_adu = (np.empty(shape, np.float32) for _ in range(4))
    done = []
    for tile in tiles:
        fy = fft.next_fast_len(tile.y1 - tile.y0 + 2 * pad, real=True)
        fx = fft.next_fast_len(tile.x1 - tile.x0 + 2 * pad, real=True)
        z = zogy(_window(inputs.N, tile, fy, fx, 0.0), _window(inputs.R, tile, fy, fx, 0.0), tile.P_n, tile.P_r,
                 _window(inputs.V_N, tile, fy, fx, inputs.fill_n), _window(inputs.V_R, tile, fy, fx, inputs.fill_r),
                 sigma_n, sigma_r, flux_ratio, 1.0, inputs.sigma_ast, config.flux_error, ref_noise_kernel=h_ref)
        core, inner = tile.core, (slice(pad, pad + tile.y1 - tile.y0), slice(pad, pad + tile.x1 - tile.x0))
        D[core], S_corr[core], V_S[core] = z.D[inner], z.S_corr[inner], z.V_S[inner]
        D_adu[core] = z.D[inner] / z.F_D
        done.append(replace(tile, P_D=z.P_D, F_D=z.F_D, fwhm_D=measure_fwhm(z.P_D)))
    return D, D_adu, S_corr, V_S, done


def _remove_sky_offset(D: np.ndarray, D_adu: np.ndarray, S_corr: np.ndarray, V_S: np.ndarray, v0: float,
                       sky: np.ndarray, tiles: list[Tile], box_px: int) -> np.ndarray | None:
    """Subtract the blank-sky level of S_corr (:func:`sky_offset`) from S_corr, D and D_adu, in place.

    Returns the level (sigma), or None when none was taken out.
    """
    offset = sky_offset(S_corr, sky, box_px)
    if offset is not None:
        # a constant c in D is F_D c in S, i.e. F_D c / sqrt(V) in S_corr: V_S stands in for V
        S_corr -= offset * np.sqrt(v0 / V_S)
        for tile in tiles:
            D[tile.core] -= offset[tile.core] * (np.sqrt(v0) / tile.F_D)
            D_adu[tile.core] = D[tile.core] / tile.F_D
    return offset


def _zogy_images(science: PreparedScience, R: np.ndarray, ali: Alignment, psfs: PSFMatch, masks: Masks,
                 inputs: ZogyInputs, config: SubtractConfig) -> ZogyImages:
    """Step 6: ZOGY per PSF tile, then S_corr's blank-sky offset and (when off) scale taken out."""
    shape = science.N.shape
    h_ref = interpolation_kernel(ali.matrix, ali.offset, shape) if config.reference_noise_kernel else None
    tiles, fwhm_tiles = _psf_tiles(science.N, R, psfs, config)
    D, D_adu, S_corr, V_S, tiles = _zogy_per_tile(inputs, tiles, shape, science.sky.sigma_n, masks.sigma_r,
                                                  psfs.flux_ratio, h_ref, config)
    good = ~masks.bad
    v0 = float(np.median(V_S[::4, ::4][good[::4, ::4]])) if good[::4, ::4].any() else 1.0
    # blank sky: neither sources nor the masks' huge variance reach these pixels
    sky = good & (V_S < 1.2 * v0)
    offset = _remove_sky_offset(D, D_adu, S_corr, V_S, v0, sky, tiles, config.sky_offset_box_px)
    S_corr = np.where(masks.bad, 0.0, S_corr).astype(np.float32)
    sky_s = S_corr[::2, ::2][sky[::2, ::2]]
    med = float(np.median(sky_s)) if sky_s.size else 0.0
    scorr_std = float(1.4826 * np.median(np.abs(sky_s - med))) if sky_s.size else float("nan")
    # only ever divided by more than 1: ZOGY's expected variance is the noise floor of S_corr
    renorm = bool((config.renormalise_scorr and scorr_std > 1.0) or scorr_std - 1.0 > config.renormalise_tolerance)
    if renorm:
        S_corr = S_corr / scorr_std
    return ZogyImages(D, D_adu, S_corr, V_S, tiles, fwhm_tiles, v0, offset, scorr_std, renorm)


def check_flux_ratio(ratio: FluxRatio, frame_id: str) -> None:
    """Raise :class:`PoorQuality` when nothing measured F_r (``ratio``, :func:`_measured_flux_ratio`).

    A difference at an unknown flux scale (F_r = 1 taken) leaves part of every star and mis-scales
    the reference cut-outs; the transient's own flux is right (ZOGY's F_D carries F_r). Called
    right after F_r is measured (step 4), so a refused frame costs no ZOGY and no detection.
    """
    if not ratio.measured:
        raise PoorQuality(f"frame {frame_id} not subtracted: {ratio.reason}; a difference at an unknown flux scale "
                          "leaves part of every star and mis-scales the reference cut-outs")


def check_independent_noise(scorr_std: float, frame_id: str, threshold: float = SHARED_NOISE_STD) -> None:
    """Refuse a reference whose difference with the frame is quieter than independent noise allows.

    Parameters
    ----------
    scorr_std : float
        Robust blank-sky std of S_corr before any renormalisation (sigma); 1 for independent
        exposures, whatever their depth or seeing (ZOGY's variance holds both images' noise).
    frame_id : str
        The frame, for the message.
    threshold : float
        :data:`SHARED_NOISE_STD` (sigma).

    Raises
    ------
    ReferenceUnavailable
        ``scorr_std < threshold``: the reference holds this exposure (a copy under another id,
        re-compressed, offset or scaled), so their noise cancels and the difference measures nothing.
        NaN (no blank sky) passes.
    """
    if scorr_std < threshold:
        raise ReferenceUnavailable(
            f"the reference holds frame {frame_id}'s own exposure: their difference has {scorr_std:.3g} of "
            f"the noise of two independent exposures on blank sky (under {threshold:g}); a reference of "
            "other exposures of the field is needed")


def _find_peaks(images: ZogyImages, science: PreparedScience, fwhm_n: float, config: SubtractConfig) -> Peaks:
    """Step 7a: peaks of |S_corr| above threshold, less cosmic rays, capped."""
    xs, ys, vs = find_scorr_peaks(images.S_corr, config.threshold_sigma, refine=config.detect.subpixel_peak)
    n_cr = 0
    if config.cosmic_ray_sigma > 0 and len(xs):
        # positive peaks on a pixel sharper than the PSF: cosmic rays / hot pixels of the science frame
        cr = (vs > 0) & sharp_peaks(science.N, science.sky.rms, xs, ys, min(fwhm_n, science.sharp_fwhm),
                                    config.cosmic_ray_sigma)
        n_cr = int(cr.sum())
        xs, ys, vs = xs[~cr], ys[~cr], vs[~cr]
    cap = min(config.max_candidates, config.detect.max_candidates)
    return Peaks(xs[:cap], ys[:cap], vs[:cap], n_cr, len(xs) > cap)


def _measure(peaks: Peaks, images: ZogyImages, bad: np.ndarray, ali: Alignment, ref_stars: StarList,
             flux_ratio: float, wcs: WCS, config: SubtractConfig) -> list[Detection]:
    """Step 7b: the peaks measured on D with the P_D of their tile, in the order of the peaks."""
    xs, ys, vs = peaks.x, peaks.y, peaks.value
    # blank-sky variance of S: median over good pixels; the ratio inflates errors on sources
    noise_ratio = images.V_S / images.v0
    ref_x, ref_y = ali.to_science(ref_stars.x, ref_stars.y)
    ref_xy = np.column_stack([ref_x, ref_y])
    scale = _pixel_scale_arcsec(wcs)
    dets: list[Detection | None] = [None] * len(xs)
    for tile in images.tiles:
        assert tile.P_D is not None, "ZOGY has run on every tile"
        inside = np.flatnonzero((ys >= tile.y0) & (ys < tile.y1) & (xs >= tile.x0) & (xs < tile.x1))
        found, kept = measure_candidates(
            xs[inside], ys[inside], vs[inside], D=images.D, scorr=images.S_corr, P_D=tile.P_D, F_D=tile.F_D,
            noise_ratio=noise_ratio, bad=bad, wcs=wcs, pixel_scale_arcsec=scale,
            ref_xy=ref_xy, ref_flux=ref_stars.flux / flux_ratio, fwhm_D=tile.fwhm_D, config=config.detect)
        for i, det in zip(inside[kept], found, strict=True):
            dets[i] = det
    return [d for d in dets if d is not None]  # most significant first


def _context(detections: list[Detection], ali: Alignment, psfs: PSFMatch, ref_stars: StarList, wcs: WCS,
             config: SubtractConfig) -> list[Detection]:
    """Step 7c: star and host galaxy under each detection, on the aligned reference (``ref_extended``, ``host_*``).

    See :func:`broker.detect.reference_context`; the host centre goes through the science WCS.
    """
    if not detections:
        return detections
    ratio = psfs.flux_ratio
    var = ali.variance[::8, ::8]
    var = var[np.isfinite(var)]
    ref_sigma = float(np.sqrt(np.median(var))) / ratio if var.size else float("nan")  # NaN: nothing measured
    ref_x, ref_y = ali.to_science(ref_stars.x, ref_stars.y)
    x = np.array([d.x for d in detections])
    y = np.array([d.y for d in detections])
    scale = _pixel_scale_arcsec(wcs)
    ctx = reference_context(ali.image, ref_sigma, psfs.P_r, psfs.fwhm_r, x, y, np.column_stack([ref_x, ref_y]),
                            scale, config.detect, ref_scale=1.0 / ratio)
    host_ra, host_dec = wcs.pixel_to_world_values(ctx[:, 1], ctx[:, 2])
    host_ra = wrap_ra(host_ra)
    return [replace(d, ref_extended=float(c[0]), host_ra=float(hr), host_dec=float(hd),
                    host_dist=float(c[3] * scale), host_size=float(c[4] * scale), host_flux=float(c[5]))
            for d, c, hr, hd in zip(detections, ctx, host_ra, host_dec, strict=True)]


def _cutouts(detections: list[Detection], science: PreparedScience, R: np.ndarray, diff_cut: np.ndarray,
             flux_ratio: float, frame_id: str) -> list[Candidate]:
    """Step 8: science and reference (background-subtracted, science ADU) and D (``diff_cut``, science ADU) stamps."""
    sci_cut = np.where(np.isfinite(science.sky.sci), science.N, np.nan).astype(np.float32)
    ref_cut = (R / flux_ratio).astype(np.float32)
    cands = []
    for i, det in enumerate(detections):
        s, r, d = triplet(sci_cut, ref_cut, diff_cut, det.x, det.y)
        cands.append(Candidate(f"{frame_id}/{i}", det, s, r, d))
    return cands


def _diagnostics(science: PreparedScience, ali: Alignment, psfs: PSFMatch, masks: Masks, inputs: ZogyInputs,
                 images: ZogyImages, peaks: Peaks, n_candidates: int) -> dict[str, float]:
    """Step 9: the per-frame diagnostics (see :class:`SubtractionResult`), timings aside."""
    offset = images.offset
    return {
        "astrometric_residual_px": float(ali.residual_px),
        "n_matched_stars": float(ali.n_matched),
        "fwhm_science_px": float(psfs.fwhm_n),
        "fwhm_reference_px": float(psfs.fwhm_r),
        "fwhm_difference_px": float(np.median([tile.fwhm_D for tile in images.tiles])),
        "n_psf_tiles": float(len(images.tiles)),
        "fwhm_science_tile_range_px": float(np.ptp(images.fwhm_tiles)),
        "flux_ratio": float(psfs.flux_ratio),
        "flux_ratio_fallback": float(psfs.flux_ratio_fallback),
        "flux_ratio_source": float(FLUX_RATIO_SOURCES.index(psfs.ratio.source) if psfs.ratio.measured else 0),
        "flux_ratio_n_stars": float(psfs.ratio.n_stars),
        "psf_fallback": float(psfs.fallback),
        "psf_common_stars": float(psfs.common),
        "n_psf_stars": float(psfs.n_stars),
        "sigma_ast_x_px": inputs.sigma_ast[0],
        "sigma_ast_y_px": inputs.sigma_ast[1],
        "scorr_std": images.scorr_std,
        "scorr_sky_offset": float(np.median(offset[::16, ::16])) if offset is not None else 0.0,
        "scorr_renormalised": float(images.renormalised),
        "overlap": float(ali.overlap),
        "bad_fraction": float(masks.bad.mean()),
        "n_peaks": float(len(peaks.x)),
        "n_cosmic_rays": float(peaks.n_cosmic_rays),
        "n_interpolated_px": float(science.fixed.sum()),
        "n_unfilled_px": float(science.unfilled.sum()),
        "n_candidates": float(n_candidates),
        "candidates_capped": float(peaks.capped),
        "limiting_flux": limiting_flux(images, masks.bad),
    }


def limiting_flux(images: ZogyImages, bad: np.ndarray, nsigma: float = LIMIT_SIGMA) -> float:
    """The ``nsigma`` point-source flux limit of the difference image on blank sky (science ADU).

    Per PSF tile, ZOGY's flux is ``S / F_S`` with ``F_S = F_D^2 sum(P_D^2)``, so its blank-sky error
    is ``sqrt(V_S) / F_S``, V_S the median variance of S over the tile's unmasked pixels within 1.2x
    its median (no source); the limit is the median over tiles of ``nsigma`` times that, times the
    blank-sky std of S_corr when S_corr was divided by it (the noise the model missed). A source
    of that flux peaks at ``nsigma`` on S_corr: the detection threshold's flux.

    Returns
    -------
    float
        ADU; NaN when no tile has blank sky.
    """
    limits = []
    for tile in images.tiles:
        v = images.V_S[tile.core][::4, ::4][~bad[tile.core][::4, ::4]]
        if not v.size or tile.P_D is None:
            continue
        v_sky = float(np.median(v[v <= 1.2 * np.median(v)]))
        f_s = tile.F_D ** 2 * float((tile.P_D.astype(np.float64) ** 2).sum())
        limits.append(nsigma * np.sqrt(v_sky) / f_s)
    scale = images.scorr_std if images.renormalised else 1.0
    return float(np.median(limits) * scale) if limits else float("nan")


def _difference_image(images: ZogyImages, diff_cut: np.ndarray, limit: float) -> DifferenceImage:
    """What the difference store keeps: D (science ADU, NaN where masked), its noise, P_D per tile."""
    noise_scale = np.sqrt(np.maximum(images.V_S / np.float32(images.v0), np.float32(1.0)))
    tiles = images.tiles
    psfs = np.stack([np.asarray(t.P_D, np.float32) for t in tiles])
    return DifferenceImage(diff_cut, noise_scale, psfs, np.array([[t.y0, t.y1, t.x0, t.x1] for t in tiles]),
                           np.array([t.F_D for t in tiles]), np.array([t.fwhm_D for t in tiles]), limit)


def subtract_and_detect(frame: Frame, reference: Reference, config: SubtractConfig = SubtractConfig(),
                        keep_images: bool = False, keep_difference: bool = False,
                        require_flux_ratio: bool = False) -> SubtractionResult:
    """Align the reference onto the frame, ZOGY-subtract, detect >= 5 sigma peaks, cut out.

    Parameters
    ----------
    frame : Frame
        Science exposure (ADU, NaN where invalid), shape (ny, nx).
    reference : broker.reference.Reference
        Background-subtracted co-add of the same (telescope, field, filter).
    keep_images : bool
        Return D (science ADU), S_corr (sigma) and the bad mask, each (ny, nx), in ``result.images``
        (debugging, benchmarks).
    keep_difference : bool
        Return what the difference store keeps in ``result.difference`` (its time:
        ``t_difference_s``).
    require_flux_ratio : bool
        Refuse the frame (:class:`PoorQuality`) as soon as step 4 finds that nothing measured F_r,
        before the masks, ZOGY and detection (the pipeline's choice,
        :func:`broker.pipeline.process_frame`); False (default): subtract at F_r = 1 and say so
        (``flux_ratio_fallback``).

    Raises
    ------
    PoorQuality
        ``require_flux_ratio`` and nothing measured F_r (:func:`check_flux_ratio`).
    ReferenceUnavailable
        The reference is for another key or is malformed, or holds the frame's own exposure
        (:func:`check_independent_noise`).
    AlignmentError
        The reference cannot be registered onto the frame.
    PSFError, BadPixelFraction
        No PSF / no sky can be measured on the frame.
    """
    timer = StepTimer()
    _check_reference(frame, reference)
    meta = frame.meta
    with timer.step("background"):
        sky = _science_sky(frame, config)
    with timer.step("stars"):
        science = _clean_science(sky, meta.saturation, reference.defects, config)
        ref_stars = reference_sources(reference, config)
    with timer.step("align"):
        ali = align_reference(reference.image, reference.variance, reference.header, ref_stars, frame.header,
                              sky.sci.shape, science.stars, config.align, prepared=reference.resampleable())
    with timer.step("psf"):
        psfs = _match_psfs(science, ali.image, ali, reference.psf, config)
        psfs = replace(psfs, ratio=_measured_flux_ratio(science, ali, psfs, reference, meta, config))
    if require_flux_ratio:
        check_flux_ratio(psfs.ratio, meta.frame_id)
    with timer.step("masks"):
        masks = _masks(science, ali, psfs, meta.saturation, meta.gain, reference.variance, config)
        inputs = _zogy_inputs(science, ali.image, masks, psfs, _astrometric_noise(ali, config))
    with timer.step("zogy"):
        images = _zogy_images(science, ali.image, ali, psfs, masks, inputs, config)
    check_independent_noise(images.scorr_std, meta.frame_id)
    with timer.step("detect"):
        peaks = _find_peaks(images, science, psfs.fwhm_n, config)
        detections = _measure(peaks, images, masks.bad, ali, ref_stars, psfs.flux_ratio, frame.wcs, config)
    with timer.step("context"):
        detections = _context(detections, ali, psfs, ref_stars, frame.wcs, config)
    with timer.step("cutouts"):
        diff_cut = np.where(masks.bad, np.nan, images.D_adu).astype(np.float32)
        cands = _cutouts(detections, science, ali.image, diff_cut, psfs.flux_ratio, meta.frame_id)
    diag = _diagnostics(science, ali, psfs, masks, inputs, images, peaks, len(cands))
    difference = None
    if keep_difference:
        with timer.step("difference"):
            difference = _difference_image(images, diff_cut, diag["limiting_flux"])
    diag.update(timer.times)
    diag["t_total_s"] = timer.total()
    kept = {"D": images.D_adu, "S_corr": images.S_corr, "bad": masks.bad} if keep_images else {}
    return SubtractionResult(cands, diag, psfs.ratio, kept, difference)
