"""The stress mix: what the generator does wrong on purpose to a field's frames.

Per science frame, a deliberately wrong reference (:func:`reference_variant`: misaligned, which
leaves dipoles on stars, or blurred, which leaves PSF-mismatch residuals) and extra detector
artifacts on the science frame only (:func:`add_science_artifacts`: hot pixels, bad column
segments, bleed trails, satellite trails), each recorded as an :class:`ArtifactInjection` so
that the candidates it causes are labelled by position. :func:`residual_flux` and
:func:`trail_flux` say how much flux such a stress puts under a real source, which the
labelling rules (:mod:`broker.training.labels`) weigh against the source's own change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from broker.frame import Frame
from broker.reference import Reference
from broker.simulate import render
from broker.subtract import reference_sources
from broker.training.settings import TrainingSetConfig

#: Bogus kinds the generator adds itself to the science frame (on top of the simulator's).
SCIENCE_ARTIFACT_KINDS = ("hot_pixel", "bad_column", "bleed", "satellite")
#: Satellite trail brightness b (uniform): b * sigma * FWHM ADU per px of length, a peak of
#: ~0.94 b sky sigma a pixel. Bright trails are well detected along their length.
TRAIL_BRIGHTNESS = (5.0, 60.0)
#: Faint trails: at the detection limit, where a trail breaks into many S/N 5-10 candidates
#: (measured: 1.5-4 gives ~3 such candidates a trail, 2.5-8 almost none).
FAINT_TRAIL_BRIGHTNESS = (1.5, 4.0)
#: Glinting satellite (a tumbling or flashing one): knots spaced 4-40 px along a line, each
#: peaking at b sky sigma with b uniform in this range. ZTF's dotted streaks break into knots
#: that each look like a point source (dev-failures.md).
GLINT_BRIGHTNESS = (4.0, 40.0)
#: Misalignment (px) at a position (x, y) of a misaligned reference; takes and gives floats or
#: arrays of positions alike.
ShiftAt = Callable[[Any, Any], Any]


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


def reference_variant(reference: Reference, config: TrainingSetConfig, rng: np.random.Generator
                      ) -> tuple[Reference, str, ShiftAt | None]:
    """The reference as used for one frame: as built, misaligned or blurred.

    Draws from ``rng``: which variant (``p_misalign``, ``p_psf_error``), then its parameters.

    Returns
    -------
    reference : Reference
        The variant. The star catalogue of the unmodified reference is kept on it, so the
        alignment fits the catalogue and misses the displacement of the pixels (see
        ``misalign_wavelength_px`` for its form).
    residual_kind : str
        ``"residual"`` (as built), ``"dipole"`` (misaligned) or ``"psf_mismatch"`` (blurred): the
        keys of :data:`~broker.training.settings.REFERENCE_STATES`.
    shift_at : callable or None
        ``shift_at(x, y)``, the misalignment (px) at a position of a misaligned reference, else
        None.
    """
    sources = reference_sources(reference)  # found once, kept by the reference
    image = np.nan_to_num(reference.image)
    u = rng.uniform()
    shift_at: ShiftAt | None = None
    if u < config.p_misalign:
        img, shift_at = _misaligned(image, config, rng)
        kind = "dipole"
    elif u < config.p_misalign + config.p_psf_error:
        img = ndimage.gaussian_filter(image, rng.uniform(*config.psf_blur_px))
        kind = "psf_mismatch"
    else:
        return reference, "residual", None
    img[~np.isfinite(reference.image)] = np.nan
    return (dataclasses.replace(reference, image=img.astype(np.float32), sources=sources),
            kind, shift_at)


def _misaligned(image: np.ndarray, config: TrainingSetConfig, rng: np.random.Generator
                ) -> tuple[np.ndarray, ShiftAt]:
    """The reference pixels displaced by ``misalign_px``, and the shift's form.

    The displacement is a plane wave, or one shift for the whole frame when
    ``misalign_wavelength_px`` is (0, 0).
    """
    r, beta = rng.uniform(*config.misalign_px), rng.uniform(0, 2 * np.pi)
    if config.misalign_wavelength_px[1] > 0:  # a plane wave of displacement along beta
        lam, alpha, phi = rng.uniform(*config.misalign_wavelength_px), \
            rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
        shift_at = _wave_shift(r, lam, alpha, phi)
        yy, xx = np.indices(image.shape, dtype=np.float32)
        a = shift_at(xx, yy)
        img = ndimage.map_coordinates(image, [yy - a * np.sin(beta), xx - a * np.cos(beta)],
                                      order=3, mode="nearest")
    else:  # one shift for the whole frame (absorbed by the PSF, see misalign_wavelength_px)
        shift_at = _constant_shift(r)
        img = ndimage.shift(image, (r * np.sin(beta), r * np.cos(beta)), order=3, mode="nearest")
    return img, shift_at


def _wave_shift(r: float, lam: float, alpha: float, phi: float) -> ShiftAt:
    """Displacement (px) of a plane wave as a function of the position; works on arrays too.

    The wave has amplitude ``r`` px, wavelength ``lam`` px, direction ``alpha`` and phase ``phi``
    (rad).
    """
    def shift_at(x: Any, y: Any) -> Any:
        return r * np.sin(2 * np.pi * (x * np.cos(alpha) + y * np.sin(alpha)) / lam + phi)
    return shift_at


def _constant_shift(r: float) -> ShiftAt:
    """One displacement of ``r`` px everywhere."""
    def shift_at(x: Any, y: Any) -> float:
        return r
    return shift_at


def residual_flux(shift: float, fwhm: float, static_flux: float) -> float:
    """Flux (ADU) of a point source as high in the difference as a misaligned star's dipole.

    For a Gaussian PSF of width sigma, a star of flux F on a reference shifted by r px leaves a
    dipole whose lobes peak at ~F r e^(-1/2) / (2 pi sigma^3) (first order in r), i.e. the peak
    of a point source of F * 0.61 r / sigma (capped at F).

    Parameters
    ----------
    shift : float
        Misalignment, px (:func:`reference_variant`).
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


def add_science_artifacts(frame: Frame, fwhm: float, sky: float, config: TrainingSetConfig,
                          rng: np.random.Generator) -> list[ArtifactInjection]:
    """Add hot pixels, bad column segments, bleeds, satellite trails and glints to ``frame.data``.

    Amplitudes are in units of the sky noise ``sqrt(sky)`` (ADU, gain ~1) so that they straddle
    the 5 sigma threshold whatever the sky. Modifies ``frame.data`` in place; draws from ``rng``
    in that order: bleeds, hot pixels, bad columns, trails, glints.

    Parameters
    ----------
    frame : Frame
        Science frame (its ``data`` and ``meta.saturation``, ADU).
    fwhm : float
        Its seeing, px (trail cross-section).
    sky : float
        Its sky level, ADU/px.
    config : TrainingSetConfig
    rng : numpy.random.Generator

    Returns
    -------
    list of ArtifactInjection
    """
    img = frame.data
    sig = float(np.sqrt(max(sky, 1.0)))
    sat = float(frame.meta.saturation) if np.isfinite(frame.meta.saturation) else 6e4
    # bleeds first, from the stars saturated before anything else is added
    out = _add_bleeds(img, sat, config.p_bleed, rng)
    out += _add_hot_pixels(img, sig, config.hot_pixels_per_frame, rng)
    out += _add_bad_columns(img, sig, config.bad_columns_per_frame, rng)
    out += _add_trails(img, sig, fwhm, config, rng)
    if config.glints_per_frame > 0:  # drawn only when asked for: older sets keep their stream
        out += _add_glints(img, sig, fwhm, rng.poisson(config.glints_per_frame), rng)
    np.minimum(img, sat, out=img, where=np.isfinite(img))
    return out


def _add_bleeds(img: np.ndarray, sat: float, p_bleed: float, rng: np.random.Generator
                ) -> list[ArtifactInjection]:
    """Bleed trails up and down the column of saturated stars, in place.

    Each star bleeds with probability ``p_bleed``; ``sat`` is the saturation level, ADU.
    """
    ny = img.shape[0]
    out: list[ArtifactInjection] = []
    lab, _ = ndimage.label(img >= 0.98 * sat)
    for k, sl in enumerate(ndimage.find_objects(lab)):
        if sl is None or rng.uniform() > p_bleed:
            continue
        cy, cx = (sl[0].start + sl[0].stop - 1) / 2, int(round((sl[1].start + sl[1].stop - 1) / 2))
        y0 = max(int(sl[0].start - rng.uniform(5, 60)), 0)
        y1 = min(int(sl[0].stop + rng.uniform(5, 60)), ny - 1)
        # just under saturation: fully saturated columns are masked by the pipeline, the
        # partially filled wells beside and beyond them are what leaks into the difference
        img[y0 : y1 + 1, cx] = np.maximum(img[y0 : y1 + 1, cx], sat * rng.uniform(0.5, 0.95))
        out.append(ArtifactInjection("bleed", float(cx), float(cy), float(cx), float(y0),
                                     float(cx), float(y1), f"B{k:04d}"))
    return out


def _add_hot_pixels(img: np.ndarray, sig: float, mean: float, rng: np.random.Generator
                    ) -> list[ArtifactInjection]:
    """Poisson(``mean``) hot pixels of 10^0.8-10^3 sky sigma ``sig`` (ADU), in place."""
    ny, nx = img.shape
    out: list[ArtifactInjection] = []
    for k in range(rng.poisson(mean)):
        x, y = int(rng.integers(0, nx)), int(rng.integers(0, ny))
        img[y, x] += sig * 10 ** rng.uniform(0.8, 3.0)
        out.append(ArtifactInjection("hot_pixel", float(x), float(y), source_id=f"HP{k:04d}"))
    return out


def _add_bad_columns(img: np.ndarray, sig: float, mean: float, rng: np.random.Generator
                     ) -> list[ArtifactInjection]:
    """Poisson(``mean``) bad column segments, 30-400 px long, 3-30 sky sigma ``sig``, in place."""
    ny, nx = img.shape
    out: list[ArtifactInjection] = []
    for k in range(rng.poisson(mean)):
        x, length = int(rng.integers(0, nx)), int(rng.uniform(30, 400))
        y0 = int(rng.integers(0, max(ny - length, 1)))
        img[y0 : y0 + length, x] += sig * rng.uniform(3, 30)
        out.append(ArtifactInjection("bad_column", float(x), y0 + length / 2, float(x), float(y0),
                                     float(x), float(y0 + length - 1), f"BC{k:04d}"))
    return out


def _line_across(shape: tuple[int, int], rng: np.random.Generator) -> tuple[float, float, float, float]:
    """End points (x0, y0, x1, y1), px, of a random line from one side of the frame to the other."""
    ny, nx = shape
    x0, y0, x1, y1 = 0.0, rng.uniform(0, ny - 1), nx - 1.0, rng.uniform(0, ny - 1)
    if rng.uniform() < 0.5:
        x0, y0, x1, y1 = y0, x0, y1, x1
    return x0, y0, x1, y1


def _add_trails(img: np.ndarray, sig: float, fwhm: float, config: TrainingSetConfig,
                rng: np.random.Generator) -> list[ArtifactInjection]:
    """Satellite trails across the frame, bright then faint, in place.

    Bright ones (:data:`TRAIL_BRIGHTNESS`), then faint ones (:data:`FAINT_TRAIL_BRIGHTNESS`), with a
    Gaussian cross-section of ``fwhm`` px.
    """
    ny, nx = img.shape
    out: list[ArtifactInjection] = []
    n_bright = rng.poisson(config.trails_per_frame)
    # drawn after the others only when asked for, so sets without them keep their random stream
    n_faint = rng.poisson(config.faint_trails_per_frame) if config.faint_trails_per_frame > 0 else 0
    for k in range(n_bright + n_faint):
        x0, y0, x1, y1 = _line_across((ny, nx), rng)
        b = rng.uniform(*(TRAIL_BRIGHTNESS if k < n_bright else FAINT_TRAIL_BRIGHTNESS))
        flat, vals = render.line_profile((ny, nx), x0, y0, x1, y1, fwhm / 2.3548, sig * b * fwhm)
        img.reshape(-1)[flat] += vals.astype(img.dtype)
        out.append(ArtifactInjection("satellite", (x0 + x1) / 2, (y0 + y1) / 2, x0, y0, x1, y1,
                                     f"ST{k:04d}", float(vals.sum())))
    return out


def _add_glints(img: np.ndarray, sig: float, fwhm: float, n: int, rng: np.random.Generator
                ) -> list[ArtifactInjection]:
    """``n`` glinting satellite trails across the frame, in place.

    Each is a line of flashes: its brightness along the line is a periodic train of pulses
    (period 4-40 px, duty shaped by a power 2-12 of a cosine), with the seeing's Gaussian
    cross-section; its peak is :data:`GLINT_BRIGHTNESS` sky sigma ``sig`` (ADU). Recorded as
    kind ``"satellite"`` (source id ``GL...``) with the ADU it deposits, as trails are.
    """
    ny, nx = img.shape
    out: list[ArtifactInjection] = []
    s = fwhm / 2.3548
    yy, xx = np.indices((ny, nx), dtype=np.float32)
    for k in range(n):
        x0, y0, x1, y1 = _line_across((ny, nx), rng)
        period, power, phase = rng.uniform(4, 40), rng.uniform(2, 12), rng.uniform(0, 2 * np.pi)
        peak = sig * rng.uniform(*GLINT_BRIGHTNESS)
        length = float(np.hypot(x1 - x0, y1 - y0))
        ux, uy = (x1 - x0) / length, (y1 - y0) / length
        across = np.abs((xx - x0) * uy - (yy - y0) * ux)
        near = across < 5 * s
        along = (xx[near] - x0) * ux + (yy[near] - y0) * uy
        pulse = (0.5 * (1 + np.cos(2 * np.pi * along / period + phase))) ** power
        vals = peak * pulse * np.exp(-0.5 * (across[near] / s) ** 2)
        img[near] += vals.astype(img.dtype)
        out.append(ArtifactInjection("satellite", (x0 + x1) / 2, (y0 + y1) / 2, x0, y0, x1, y1,
                                     f"GL{k:04d}", float(vals.sum())))
    return out


def reference_gap(reference: Reference, config: TrainingSetConfig, rng: np.random.Generator
                  ) -> Reference:
    """The reference with a block of missing coverage (NaN), with probability ``p_reference_gap``.

    Survey references are mosaics of co-adds: a corner, a strip along an edge or a square inside
    the frame can lack coverage, and the reference stamps of sources beside it are blank there
    (zero-filled in ZTF's alerts). The block is a strip along a frame edge (half of the gaps) or
    a square inside the frame, 30-300 px across (at most half the frame). Draws from ``rng`` only when
    ``p_reference_gap`` > 0.
    """
    if not config.p_reference_gap > 0 or rng.uniform() >= config.p_reference_gap:
        return reference
    ny, nx = reference.image.shape
    w = int(rng.uniform(30, max(min(300, ny // 2, nx // 2), 31)))
    if rng.uniform() < 0.5:  # a strip along one edge
        side = int(rng.integers(4))
        ys, xs = slice(None), slice(None)
        if side < 2:
            ys = slice(0, w) if side == 0 else slice(ny - w, ny)
        else:
            xs = slice(0, w) if side == 2 else slice(nx - w, nx)
    else:  # a square inside the frame
        y0, x0 = int(rng.integers(0, max(ny - w, 1))), int(rng.integers(0, max(nx - w, 1)))
        ys, xs = slice(y0, y0 + w), slice(x0, x0 + w)
    img = np.array(reference.image, dtype=np.float32, copy=True)
    img[ys, xs] = np.nan
    sources = reference_sources(reference)
    return dataclasses.replace(reference, image=img, sources=sources)
