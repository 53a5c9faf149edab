"""Reference images: co-adding the first good frames of a field, FITS persistence, a crash-safe store.

A :class:`Reference` is **background-subtracted** (each input frame's ``Background2D`` map is removed
before co-adding, so frames with different sky levels combine cleanly) and in the flux scale of its
first frame (the grid frame). Pixels saturated in any input are NaN. The co-add is Zackay & Ofek's
proper co-add by default (:mod:`broker.coadd`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

import numpy as np
from astropy.io import fits

from broker.align import AlignConfig, Resampleable, align_reference, map_mask
from broker.background import BackgroundConfig, estimate_background
from broker.coadd import proper_coadd
from broker.defects import FILL_MAX_SPREAD, bad_columns, inpaint, sharp_fwhm, sharp_outliers
from broker.errors import AlignmentError, BrokerError, ConfigError, Outage, ReferenceUnavailable
from broker.exposure import Fingerprint
from broker.fluxratio import FluxRatio, aperture_flux_ratio, measure_flux_ratio, zero_point_ratio
from broker.frame import Frame, celestial_wcs, decode_fits, encode_fits
from broker.psf import (
    PSFConfig,
    PSFModel,
    build_psf,
    gaussian_psf,
    half_size_for,
    measure_fwhm,
    select_psf_stars,
    stack_psf,
)
from broker.stars import StarConfig, StarList, find_stars

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceConfig:
    """Settings of reference building.

    Attributes
    ----------
    n_frames : int
        Frames co-added into a new reference (count, 1 or more). 3 is the smallest number that lets a median
        reject a cosmic ray and gives sqrt(3) more depth than one frame, while a new field gets
        alerts after only three visits.
    saturation_fraction : float
        Input pixels at or above this fraction of SATURATE are dropped from the co-add
        (dimensionless); 0.9, as ``SubtractConfig.saturation_fraction`` (non-linearity).
    sat_grow_px : float
        Dropped saturated regions are grown by this many pixels (bleed / non-linear wings); 3,
        about one FWHM at the expected seeing (``StarConfig.fwhm_guess_px``).
    source_threshold_sigma : float
        Threshold of the stored reference source catalogue (sigma); 5 like the detection threshold.
    source_max_stars : int
        Cap on that catalogue (count, 1 or more): every 5 sigma source of a crowded 2k x 2k field.
    clip_sigma, clip_fraction : float
        With >= 3 frames, a pixel is dropped from the co-add when it deviates from the per-pixel
        median by more than ``clip_sigma`` of its own noise (sigma) plus ``clip_fraction`` x |median|
        (cosmic rays, hot pixels that move with the pointing); 5 sigma. The |median| allowance
        (3.0 = 300 %) keeps source cores, whose peak scales as 1/FWHM^2: seeing 2x apart (1.6-3.2
        px, the simulator's and a typical site's range) changes it 4x (1.0 clipped the star cores
        of the sharpest frame but not broader galaxy cores, leaving -5 to -16 sigma at bright
        galaxy cores in S_corr).
    clip_grow_px : int
        Clipped pixels are grown by this many pixels in their frame (px): the wings of a moving
        object or a cosmic ray's halo lie below the clip but would leave a negative ghost in every
        difference (1 px: 43 false candidates on the demo instead of 54 with 0).
    coadd : str
        ``"proper"``: Zackay & Ofek's proper co-addition (:mod:`broker.coadd`) of the weighted
        co-add's inputs: point-source S/N^2 the sum of the inputs', whatever their seeing (on
        a test field with seeing 1.8/2.8/4.5 px: +0.3 % S/N over the weighted mean, +1.1 % while
        the flux ratios took neighbours' light, which mis-scaled the 4.5 px input by 1.9 % and cost
        the weighted mean 1.9 % S/N and the proper co-add 1.3 %; 2.6-3.2 px: +0.2 %; Gaussian PSFs
        of those FWHMs would give +6 % and +0.7 %). ``"weighted"``: the weighted mean alone (see
        :func:`build_reference`). Proper co-addition needs a PSF of every input; without one the
        weighted mean is used. The method used is in the header (``COADD``).
    min_psf_stars : int
        Stars (count) each of a reference's frames and its co-add must hold: unsaturated sources
        of the star finder's catalogue, from which the PSF and the flux scale are measured
        (:func:`check_psf_stars`); fewer refuse the reference. 3, as ``PSFConfig.min_stars``: the
        fewest whose median rejects one bad star. A frame of noise, or of sky and a few hot
        pixels, has none, and was a reference whose PSF (a 3 px Gaussian) and flux ratio (1) came
        from nothing. A crowded frame whose stars give no clean PSF stack keeps the Gaussian
        fallback (``PSFFALLB``), as before: its stars still scale it. 0: no check.
    flux_min_stars : int
        Stars (count, 1 or more) whose flux ratios a frame's flux ratio F to the grid frame must
        rest on, by PSF fits of isolated stars or else by apertures on every matched star
        (:func:`measure_flux_ratio`): the median of 3 rejects one bad star (a blend the finder saw
        as one). With 1-2 isolated stars, each blended with a partner the grid's finder missed, F
        came out 0.63-1.93 of the truth on 192^2 fields of 30 pairs 6 px apart (seeds 5-9), where the
        apertures give 0.998-1.006.
    """

    n_frames: int = 3
    saturation_fraction: float = 0.9
    sat_grow_px: float = 3.0
    source_threshold_sigma: float = 5.0
    source_max_stars: int = 20000
    clip_sigma: float = 5.0
    clip_fraction: float = 3.0
    clip_grow_px: int = 1
    coadd: str = "proper"
    min_psf_stars: int = 3
    flux_min_stars: int = 3
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    stars: StarConfig = field(default_factory=StarConfig)
    psf: PSFConfig = field(default_factory=PSFConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    def __post_init__(self) -> None:
        if self.coadd not in ("proper", "weighted"):
            raise ValueError(f"coadd must be 'proper' or 'weighted', not {self.coadd!r}")
        if self.n_frames < 1:  # 0 dead-lettered every frame: "no frames to build a reference from"
            raise ConfigError(f"n_frames must be 1 or more, not {self.n_frames}")
        if self.min_psf_stars < 0:
            raise ConfigError(f"min_psf_stars must be 0 or more, not {self.min_psf_stars}")
        if self.flux_min_stars < 1:
            raise ConfigError(f"flux_min_stars must be 1 or more, not {self.flux_min_stars}")
        if self.source_max_stars < 1:
            raise ConfigError(f"source_max_stars must be 1 or more, not {self.source_max_stars}")


@dataclass
class Reference:
    """A co-added reference image of one (telescope, field, filter).

    Attributes
    ----------
    key : (str, str, str)
        (telescope, field, filter).
    image : ndarray, shape (ny, nx), float32
        Background-subtracted co-add (ADU, flux scale of the first frame), NaN where invalid.
    variance : ndarray, shape (ny, nx), float32
        Its variance (ADU^2), sources included.
    header : fits.Header
        WCS of the reference grid plus TELESCOP, FIELD, FILTER, NCOMBINE.
    psf : ndarray, shape (k, k), k odd
        PSF of the co-add, sum 1.
    frame_ids : tuple of str
        Frames co-added into it.
    sources : StarList or None
        Stored source catalogue on the reference grid (:func:`build_reference` makes one; a file
        may lack it). When None, :meth:`catalogue` finds one on the image.
    defects : ndarray of bool, shape (ny, nx), or None
        Pixels invalid in every input and filled from their neighbours: detector defects that
        stay put while the pointing jitters by less than a pixel (a bad-pixel map for free; the
        science frame's own copies of them are filled the same way).
    exposures : tuple of Fingerprint
        One per frame of ``frame_ids``, in their order (:mod:`broker.exposure`): a frame re-sent
        under another id is known as one of them (:meth:`exposure_of`). Empty for a reference
        built before they were kept, or imported without them.
    """

    key: tuple[str, str, str]
    image: np.ndarray
    variance: np.ndarray
    header: fits.Header
    psf: np.ndarray
    frame_ids: tuple[str, ...]
    sources: StarList | None = field(default=None, repr=False, compare=False)
    defects: np.ndarray | None = field(default=None, repr=False, compare=False)
    exposures: tuple[Fingerprint, ...] = field(default=(), repr=False, compare=False)
    _resampleable: Resampleable | None = field(default=None, init=False, repr=False, compare=False)
    _found_sources: dict[tuple[StarConfig, float], StarList] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @property
    def omitted(self) -> tuple[tuple[str, str], ...]:
        """(frame id, reason) of each frame offered to the co-add and left out of it (header ``OMITn``, ``OMITRn``).

        Left out: nothing measured its flux ratio to the grid frame (:func:`measure_flux_ratio`).
        Empty for a reference built before frames were left out, or imported without the cards.
        """
        n = int(self.header.get("NOMIT", 0))
        return tuple((str(self.header.get(f"OMIT{i}", "")), str(self.header.get(f"OMITR{i}", "")))
                     for i in range(1, n + 1))

    @property
    def magzp(self) -> float | None:
        """Zero point of the image (mag of a source giving 1 ADU; header ``MAGZP``), None when it has none.

        :func:`build_reference` writes its grid frame's measured one (``MAGZP`` with ``MAGZPERR``): the
        co-add is on that frame's flux scale.
        """
        return _header_float(self.header, "MAGZP")

    @property
    def magzp_err(self) -> float | None:
        """1-sigma uncertainty of :attr:`magzp` (mag; header ``MAGZPERR``), None when it has none."""
        return _header_float(self.header, "MAGZPERR")

    def resampleable(self) -> Resampleable:
        """The image and variance prepared for resampling (computed on first use, then kept)."""
        if self._resampleable is None:
            self._resampleable = Resampleable.from_arrays(self.image, self.variance)
        return self._resampleable

    def exposure_of(self, data: np.ndarray) -> str | None:
        """The id of the reference frame whose exposure ``data`` (a frame's pixels) is, or None.

        The same pixels, re-compressed (fpack), offset or scaled (:meth:`Fingerprint.matches`).
        """
        for frame_id, print_ in zip(self.frame_ids, self.exposures, strict=False):
            if print_.matches(data):
                return frame_id
        return None

    def catalogue(self, stars: StarConfig, threshold_sigma: float) -> StarList:
        """Source catalogue on the reference grid, stored or found once per setting.

        Source catalogue on the reference grid: the stored :attr:`sources`, else the sources found
        on the image above ``threshold_sigma`` (sigma) with ``stars`` and the PSF's FWHM as kernel
        (computed on first use for these settings, then kept; :attr:`sources` is left as it is).
        """
        if self.sources is not None:
            return self.sources
        key = (stars, threshold_sigma)
        if key not in self._found_sources:
            rms = float(np.sqrt(np.nanmedian(self.variance)))
            self._found_sources[key] = find_stars(self.image, rms, stars, fwhm=measure_fwhm(self.psf),
                                                  threshold_sigma=threshold_sigma)
        return self._found_sources[key]

    def save(self, path: str | os.PathLike) -> None:
        """Write one multi-extension FITS file atomically (temporary file + ``os.replace``).

        Extensions: PRIMARY (image), VARIANCE, PSF, FRAMES (table of frame ids), SOURCES (table),
        DEFECTS (uint8 image), EXPOSURES (the frames' fingerprints, one row each).
        """
        path = Path(path)
        hdr = self.header.copy()
        hdr["TELESCOP"], hdr["FIELD"], hdr["FILTER"] = self.key
        hdr["NCOMBINE"] = (len(self.frame_ids), "frames co-added")
        hdr["BUNIT"] = "adu"
        hdr["BKGSUB"] = (True, "background subtracted")
        hdus = [
            fits.PrimaryHDU(self.image.astype(np.float32), header=hdr),
            fits.ImageHDU(self.variance.astype(np.float32), name="VARIANCE"),
            fits.ImageHDU(self.psf.astype(np.float32), name="PSF"),
            fits.BinTableHDU.from_columns(
                [fits.Column("FRAME_ID", format=f"{max(1, max((len(f) for f in self.frame_ids), default=1))}A",
                             array=np.array(self.frame_ids, dtype=object).astype(str))], name="FRAMES"),
        ]
        if self.sources is not None:
            arr = self.sources.as_array()
            src = fits.BinTableHDU.from_columns(
                [fits.Column(n, format="D", array=arr[:, i]) for i, n in enumerate(("X", "Y", "FLUX", "PEAK"))],
                name="SOURCES")
            src.header["FWHM"] = self.sources.fwhm
            hdus.append(src)
        if self.defects is not None:
            hdus.append(fits.CompImageHDU(self.defects.astype(np.uint8), name="DEFECTS"))
        if self.exposures:
            hdus.append(_exposures_hdu(self.exposures))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Reference":
        """Read a file written by :meth:`save` (or imported from elsewhere with the same layout).

        Raises
        ------
        ReferenceUnavailable
            Missing, unreadable or incomplete file.
        """
        try:
            # from bytes: astropy leaves the file open when it fails on a truncated one
            with fits.open(io.BytesIO(Path(path).read_bytes())) as hdul:
                hdr = hdul[0].header.copy()
                image = np.asarray(hdul[0].data, dtype=np.float32)
                variance = np.asarray(hdul["VARIANCE"].data, dtype=np.float32)
                psf = np.asarray(hdul["PSF"].data, dtype=np.float32)
                frame_ids = tuple(str(f).strip() for f in hdul["FRAMES"].data["FRAME_ID"])
                sources = None
                if "SOURCES" in hdul:
                    d = hdul["SOURCES"].data
                    sources = StarList(np.asarray(d["X"], float), np.asarray(d["Y"], float),
                                       np.asarray(d["FLUX"], float), np.asarray(d["PEAK"], float),
                                       float(hdul["SOURCES"].header.get("FWHM", np.nan)))
                defects = np.asarray(hdul["DEFECTS"].data, bool) if "DEFECTS" in hdul else None
                exposures = _read_exposures(hdul["EXPOSURES"]) if "EXPOSURES" in hdul else ()
            key = (str(hdr["TELESCOP"]), str(hdr["FIELD"]), str(hdr["FILTER"]))
            celestial_wcs(hdr)
        except FileNotFoundError as exc:
            raise ReferenceUnavailable(f"no reference file {path}") from exc
        except BrokerError as exc:
            raise ReferenceUnavailable(f"reference {path} has no usable WCS: {exc}") from exc
        except Exception as exc:  # astropy raises many types on truncated / foreign files
            raise ReferenceUnavailable(f"unreadable reference {path}: {type(exc).__name__}: {exc}") from exc
        if (image.ndim != 2 or image.shape != variance.shape or psf.ndim != 2 or psf.shape[0] % 2 == 0
                or (defects is not None and defects.shape != image.shape)
                or (exposures and len(exposures) != len(frame_ids))):
            raise ReferenceUnavailable(f"reference {path} has inconsistent extensions")
        return cls(key, image, variance, hdr, psf, frame_ids, sources, defects, exposures)


def _exposures_hdu(exposures: tuple[Fingerprint, ...]) -> fits.ImageHDU:
    """The fingerprints as one float32 image, a row each (NaN-padded), shape, step and noise in the header."""
    rows = np.full((len(exposures), max(e.pixels.size for e in exposures)), np.nan, np.float32)
    hdu = fits.ImageHDU(rows, name="EXPOSURES")
    for i, e in enumerate(exposures):
        rows[i, :e.pixels.size] = e.pixels
        n = i + 1
        hdu.header[f"FRAMEY{n}"], hdu.header[f"FRAMEX{n}"] = e.shape
        hdu.header[f"STEP{n}"], hdu.header[f"NOISE{n}"] = e.step, e.noise
    hdu.data = rows
    return hdu


def _read_exposures(hdu: fits.ImageHDU) -> tuple[Fingerprint, ...]:
    """The fingerprints of :func:`_exposures_hdu`."""
    rows, hdr, out = np.atleast_2d(np.asarray(hdu.data, np.float32)), hdu.header, []
    for i, row in enumerate(rows):
        n = i + 1
        shape, step = (int(hdr[f"FRAMEY{n}"]), int(hdr[f"FRAMEX{n}"])), int(hdr[f"STEP{n}"])
        size = -(-shape[0] // step) * -(-shape[1] // step)
        out.append(Fingerprint(shape, step, row[:size].copy(), float(hdr[f"NOISE{n}"])))
    return tuple(out)


#: A frame builds a reference only when at least this fraction of its pixels is usable: finite,
#: below saturation and outside constant regions (dimensionless); 0.5, as ingest's
#: ``max_nan_fraction``. A reference of a frame 95 % saturated was refused only by its sky map
#: ("only 0.0% usable pixels for the background"), a constant one not at all: subtracted, every
#: star of the frame was a candidate (75 on a 384 x 384 simulated field).
MIN_USABLE_FRACTION = 0.5

#: Side (px) of a square of one pixel value that marks a constant region of a frame (a readout that
#: lost its data, a zero-filled border, a clipped area without SATURATE): such pixels carry no
#: measurement and are left out of a reference (NaN). 15: 225 equal pixels; integer pixels with
#: 0.3 ADU of noise put 90 % at one value, and 0.9^225 = 5e-11.
CONSTANT_BOX_PX = 15


def saturated_pixels(frame: Frame, config: ReferenceConfig) -> np.ndarray:
    """Pixels at or above ``saturation_fraction`` of SATURATE, grown by ``sat_grow_px`` (bool, the frame's shape)."""
    from scipy import ndimage

    data = np.asarray(frame.data, dtype=np.float32)
    sat = np.zeros(data.shape, bool)
    if np.isfinite(frame.meta.saturation):
        with np.errstate(invalid="ignore"):
            sat = data >= config.saturation_fraction * frame.meta.saturation
        if sat.any() and config.sat_grow_px > 0:
            sat = ndimage.distance_transform_edt(~sat) <= config.sat_grow_px
    return sat


def constant_pixels(data: np.ndarray, box: int = CONSTANT_BOX_PX) -> np.ndarray:
    """Pixels of a ``box`` x ``box`` square (any that holds them) of one finite value (bool, ``data``'s shape)."""
    from scipy import ndimage

    x = np.asarray(data, np.float32)
    # a constant square holds a row of ``box`` equal pixels: a noisy frame has none, and is done here
    # (a cheap pass: the filters below take 0.34 s on a 2048 x 2048 frame)
    same = x[:, 1:] == x[:, :-1]
    if box > 1 and not (ndimage.uniform_filter1d(same.astype(np.float32), box - 1, axis=1) > 1 - 0.5 / box).any():
        return np.zeros(x.shape, bool)
    finite = np.isfinite(x)
    hi = ndimage.maximum_filter(np.where(finite, x, np.inf), box, mode="nearest")
    lo = ndimage.minimum_filter(np.where(finite, x, -np.inf), box, mode="nearest")
    flat = (hi == lo) & np.isfinite(hi)
    return ndimage.maximum_filter(flat, box, mode="constant") if flat.any() else flat


def check_usable(frame: Frame, config: ReferenceConfig) -> tuple[np.ndarray, np.ndarray]:
    """Refuse a frame of which too little can go into a reference (:data:`MIN_USABLE_FRACTION`).

    Returns
    -------
    (ndarray, ndarray)
        Its saturated (:func:`saturated_pixels`) and constant (:func:`constant_pixels`) pixels
        (bool, the frame's shape), which :func:`_prepare` leaves out of the co-add.

    Raises
    ------
    ReferenceUnavailable
        Naming the frame and its shares of NaN, saturated and constant pixels.
    """
    finite = np.isfinite(frame.data)
    saturated, constant = saturated_pixels(frame, config), constant_pixels(frame.data)
    sat = saturated & finite
    flat = constant & finite & ~sat
    usable = float(np.mean(finite & ~sat & ~flat))
    if usable < MIN_USABLE_FRACTION:
        raise ReferenceUnavailable(
            f"frame {frame.meta.frame_id} cannot serve in a reference: {usable:.0%} of its pixels are usable "
            f"(NaN {1 - finite.mean():.0%}, saturated {sat.mean():.0%}, constant {flat.mean():.0%}), under "
            f"{MIN_USABLE_FRACTION:.0%}", frames=(frame.meta.frame_id,))
    return saturated, constant


def check_distinct(frames: list[Frame]) -> tuple[Fingerprint, ...]:
    """The frames' fingerprints, when no two are one exposure (:mod:`broker.exposure`).

    Raises
    ------
    ReferenceUnavailable
        Two frames are one exposure (the same pixels under two ids, re-compressed, offset or scaled):
        co-added, its noise would count twice and cancel in the difference of a later copy.
    """
    prints = tuple(Fingerprint.of(np.asarray(f.data)) for f in frames)
    for i, p in enumerate(prints):
        for other in frames[i + 1:]:
            if p.matches(np.asarray(other.data)):
                raise ReferenceUnavailable(
                    f"frames {frames[i].meta.frame_id} and {other.meta.frame_id} are one exposure (the same pixels, "
                    "up to a gain and a pedestal): a reference needs distinct exposures", frames=(other.meta.frame_id,))
    return prints


def check_psf_stars(n_stars: int, what: str, config: ReferenceConfig, frames: tuple[str, ...] = ()) -> None:
    """Refuse a reference frame, or co-add, holding fewer than ``config.min_psf_stars`` stars.

    Parameters
    ----------
    n_stars : int
        Stars of its catalogue (:func:`~broker.stars.find_stars`, saturated ones left out).
    what : str
        What they were counted on ("frame X", "the co-add of X, Y"), for the message.
    frames : tuple of str
        The frame they were counted on (its id), given to the error (empty for a co-add).

    Raises
    ------
    ReferenceUnavailable
        Naming ``what``, its count and the least.
    """
    if n_stars < config.min_psf_stars:
        raise ReferenceUnavailable(
            f"{what} has {n_stars} star{'' if n_stars == 1 else 's'} (unsaturated, found by the star finder), "
            f"under [reference] min_psf_stars = {config.min_psf_stars}: a reference's PSF and flux scale come from "
            "its stars (a frame of noise, clouds or hot pixels has none)", frames=frames)


def _prepare(frame: Frame, config: ReferenceConfig, masks: tuple[np.ndarray, np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray, float, StarList, np.ndarray]:
    """One input frame made ready for co-adding.

    Background-subtracted image (NaN at saturation and in constant regions), variance, sky RMS,
    stars and (grown) saturation mask of one frame; ``masks``: its saturated and constant pixels
    (:func:`check_usable`).
    """
    data = np.asarray(frame.data, dtype=np.float32)
    sat, flat = masks
    bkg, rms = estimate_background(data, sat | flat, config.background)
    img = data - bkg
    var = rms ** 2 + np.clip(np.nan_to_num(img), 0, None) / max(frame.meta.gain, 1e-6)
    sigma = float(np.median(rms))
    if not sigma > 0:
        # a noise-free (model / simulated) template: a tiny floor keeps the weights finite
        sigma = max(1e-6 * float(np.nanmax(np.abs(img))) if np.isfinite(img).any() else 1.0, 1e-12)
    unsaturated = np.where(sat, 0.0, np.nan_to_num(img))
    stars = find_stars(unsaturated, sigma, config.stars, frame.meta.saturation, bkg)
    # cosmic rays and hot pixels: after resampling they smear over several pixels and, hot pixels
    # moving by only the pointing jitter, survive the per-pixel clipping; drop them here
    fwhm = sharp_fwhm(unsaturated, stars)
    img[sat | flat | sharp_outliers(img, sigma, fwhm) | bad_columns(np.where(sat, np.nan, img), sigma)] = np.nan
    var[~np.isfinite(img)] = np.nan
    return img, var.astype(np.float32), sigma, stars, sat


@dataclass(frozen=True)
class _CoaddInput:
    """One frame on the grid of the first, in its flux scale.

    Attributes
    ----------
    image, variance : ndarray, shape (ny, nx), float32
        Flux-scaled pixels (ADU) and variance (ADU^2), NaN where invalid.
    weight : float
        ``F^2 / (sigma^2 FWHM^2)`` of the flux-scaled image.
    psf : ndarray or None
        Its stacked PSF stamp (None: the Gaussian fallback, or too few stars).
    sigma : float
        Flux-scaled sky RMS (ADU).
    """

    image: np.ndarray
    variance: np.ndarray
    weight: float
    psf: np.ndarray | None
    sigma: float


def _scaled_input(img: np.ndarray, var: np.ndarray, sig: float, F: float, fwhm: float,
                  psf: np.ndarray | None) -> _CoaddInput:
    """A frame divided by its flux ratio ``F`` to the grid frame, with its co-add weight."""
    return _CoaddInput((img / F).astype(np.float32), (var / (F * F)).astype(np.float32),
                       F * F / (sig * sig * fwhm * fwhm), psf, sig / F)


def _grid_input(grid: Frame, img: np.ndarray, var: np.ndarray, sig: float, stars: StarList, h: int,
                config: ReferenceConfig) -> _CoaddInput:
    """The grid frame itself (flux ratio 1), with its own PSF (:func:`check_psf_stars`)."""
    check_psf_stars(len(stars), f"frame {grid.meta.frame_id}", config, (grid.meta.frame_id,))
    g_psf = build_psf(img, stars, config.psf, half_size=h)
    return _scaled_input(img, var, sig, 1.0, g_psf.fwhm, None if g_psf.fallback else g_psf.stamp)


def _flux_ratio_and_psf(g_img: np.ndarray, img: np.ndarray, matched: StarList, g_stars: StarList, h: int,
                        fwhm: float, config: ReferenceConfig) -> tuple[FluxRatio, np.ndarray | None, float]:
    """Flux ratio of a registered frame to the grid frame by its isolated stars' PSF fits, and its PSF.

    Flux ratio F of a registered frame to the grid frame (median over matched stars; NaN when fewer
    than ``config.flux_min_stars`` measure it), its PSF stacked from them and that PSF's FWHM (px;
    ``fwhm``, its catalogue's, when too few stars give one). The stars are isolated among all of
    ``g_stars``, the grid's catalogue, every other star of which is masked out of the stamps to
    ``neighbour_mask_fwhm`` of each image's FWHM (:func:`broker.psf.star_stamps`).
    """
    idx = select_psf_stars(matched, img.shape, h, config.psf, (g_stars.x, g_stars.y))
    F, n, pf = float("nan"), 0, None
    if len(idx):
        x, y, near, k = matched.x[idx], matched.y[idx], (g_stars.x, g_stars.y), config.psf.neighbour_mask_fwhm
        _, fg, ug = stack_psf(g_img, x, y, h, near, k * g_stars.fwhm)
        pf, ff, uf = stack_psf(img, x, y, h, near, k * fwhm)
        both = ug & uf
        measured = both & (ff > 0) & (fg > 0)  # a fit may be degenerate (NaN): one made F = 1
        n = int(measured.sum())
        if n >= config.flux_min_stars:
            F = float(np.median(ff[measured] / fg[measured]))
        if pf is not None and both.sum() >= config.psf.min_stars:
            fwhm = measure_fwhm(pf)
        else:
            pf = None
    return FluxRatio(F, "psf_stars", n), pf, fwhm


def _registered_input(frame: Frame, masks: tuple[np.ndarray, np.ndarray], grid: Frame, g_img: np.ndarray,
                      g_sig: float, g_stars: StarList, h: int, config: ReferenceConfig
                      ) -> tuple[_CoaddInput | None, np.ndarray, FluxRatio]:
    """A frame registered and flux-scaled onto the grid frame, where it was saturated (on the grid, bool), its F.

    It must hold stars (:func:`check_psf_stars`) before it is registered. The input is None when
    nothing measures its flux ratio (:func:`measure_flux_ratio`).
    """
    shape = grid.shape
    img0, var0, sig, stars, sat = _prepare(frame, config, masks)
    check_psf_stars(len(stars), f"frame {frame.meta.frame_id}", config, (frame.meta.frame_id,))
    try:
        ali = align_reference(img0, var0, frame.header, stars, grid.header, shape, g_stars, config.align)
    except AlignmentError as exc:  # either frame may be at fault: both named
        raise AlignmentError(f"frame {frame.meta.frame_id} does not register onto the grid frame {grid.meta.frame_id}: "
                             f"{exc}", frames=(grid.meta.frame_id, frame.meta.frame_id)) from exc
    sat_on_grid = map_mask(sat, ali.matrix, ali.offset, shape, radius=1)
    matched = g_stars.subset(ali.sci_index)
    by_psf, pf, fwhm = _flux_ratio_and_psf(g_img, ali.image, matched, g_stars, h, stars.fwhm, config)
    wide = max([f for f in (g_stars.fwhm, stars.fwhm) if np.isfinite(f) and f > 0] or [config.psf.fallback_fwhm_px])
    ratio = measure_flux_ratio(
        by_psf, lambda: aperture_flux_ratio(g_img, ali.image, matched.x, matched.y, (g_sig, sig), wide,
                                            config.flux_min_stars, config.background, (g_stars.fwhm, stars.fwhm)),
        zero_point_ratio(grid.meta, frame.meta), f"frame {frame.meta.frame_id} to the grid frame {grid.meta.frame_id}",
        f"[reference] flux_min_stars = {config.flux_min_stars}")
    if not ratio.measured:
        return None, sat_on_grid, ratio
    return _scaled_input(ali.image, ali.variance, sig, ratio.value, fwhm, pf), sat_on_grid, ratio


def _good_pixels(stack: np.ndarray, vstack: np.ndarray, config: ReferenceConfig) -> np.ndarray:
    """Pixels of the stack that enter the co-add.

    Pixels of the (n, ny, nx) stack that enter the co-add: finite, and with >= 3 frames not
    far from the per-pixel median (cosmic rays, moving hot pixels), their wings with them.
    """
    ok = np.isfinite(stack) & np.isfinite(vstack)
    if len(stack) >= 3:
        # the margin grows with |median| because better seeing legitimately raises star cores (up to ~2x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(np.where(ok, stack, np.nan), axis=0)
        dev = np.abs(stack - med)
        out = dev > config.clip_sigma * np.sqrt(np.where(ok, vstack, 0.0)) + config.clip_fraction * np.abs(med)
        # an outlier's core is clipped, its fainter wings (a moving object's PSF) with it
        ok &= ~np.stack([_grow_mask(o, config.clip_grow_px) for o in out])
    return ok


def _weighted_mean(stack: np.ndarray, vstack: np.ndarray, ok: np.ndarray, weights: list[float]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of the good pixels of the stack, and its variance.

    Weighted mean of the good pixels of the (n, ny, nx) stack and its variance
    ``sum(w_i^2 v_i) / (sum w_i)^2``, (ny, nx) float32, NaN where no input is good.
    """
    w = np.asarray(weights, np.float64)[:, None, None] * ok
    den = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        image = np.where(den > 0, (w * np.where(ok, stack, 0.0)).sum(axis=0) / den, np.nan).astype(np.float32)
        variance = np.where(den > 0, (w * w * np.where(ok, vstack, 0.0)).sum(axis=0) / den ** 2,
                            np.nan).astype(np.float32)
    return image, variance


def _reference_header(grid_header: fits.Header, key: tuple[str, str, str], method: str, psf: PSFModel,
                      co: _CoaddInputs) -> fits.Header:
    """The grid's WCS plus TELESCOP, FIELD, FILTER, NCOMBINE, COADD, PSFFWHM, PSFFALLB and the flux ratios.

    ``FSCALEn`` and ``FSRCn`` give the flux ratio of the n-th co-added frame (1-based, in
    ``frame_ids`` order) and its source (:class:`FluxRatio`); ``NOMIT`` counts the frames left out,
    ``OMITn`` and ``OMITRn`` give each one's id and reason (:attr:`Reference.omitted`). ``MAGZP`` and
    ``MAGZPERR`` are the grid frame's when it has both (:attr:`Reference.magzp`).
    """
    header = fits.Header()
    header.update(grid_header)
    header["TELESCOP"], header["FIELD"], header["FILTER"] = key
    header["NCOMBINE"] = len(co.frames)
    header["COADD"] = (method, "proper (Zackay & Ofek 2017) or weighted mean")
    header["PSFFWHM"] = (psf.fwhm, "px, co-add PSF FWHM")
    header["PSFFALLB"] = (psf.fallback, "PSF is the Gaussian fallback")
    for n, ratio in enumerate(co.ratios, start=1):
        header[f"FSCALE{n}"] = (round(ratio.value, 6), f"flux ratio of frame {n} to frame 1")
        header[f"FSRC{n}"] = (ratio.source, f"what measured FSCALE{n} ({ratio.n_stars} stars)")
    header["NOMIT"] = (len(co.omitted), "frames left out: flux ratio unmeasured")
    for n, (frame_id, reason) in enumerate(co.omitted, start=1):
        header[f"OMIT{n}"] = frame_id
        header[f"OMITR{n}"] = reason
    grid = co.frames[0].meta
    if grid.magzp is not None and grid.magzp_err is not None and np.isfinite([grid.magzp, grid.magzp_err]).all():
        header["MAGZP"] = (grid.magzp, "[mag] grid frame's (the co-add's flux scale)")
        header["MAGZPERR"] = (grid.magzp_err, "[mag] 1-sigma uncertainty of MAGZP")
    return header


def _header_float(header: fits.Header, key: str) -> float | None:
    """The card ``key`` as a finite float, None when absent or not one."""
    try:
        value = float(header[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def build_reference(frames: list[Frame], config: ReferenceConfig = ReferenceConfig()) -> Reference:
    """Co-add frames of one field into a reference.

    Scheme: every frame is background-subtracted, registered onto the grid of the first frame (in
    (MJD, frame_id) order) with :func:`broker.align.align_reference`, scaled to its flux (its flux
    ratio F_i to the grid frame, :func:`measure_flux_ratio`: isolated stars' PSF fits, else every
    matched star's apertures, else measured zero points) and averaged with weights
    ``w_i = F_i^2 / (sigma_i^2 FWHM_i^2)``: inverse variance after scaling, times 1/FWHM^2 because
    the S/N of a point source scales as 1 / (sigma FWHM). This is the optimal *linear* weighting
    for point-source S/N without PSF homogenisation; per pixel, missing (NaN) inputs and (with
    >= 3 frames) outliers from the per-pixel median (cosmic rays) get zero weight;
    ``variance = sum(w_i^2 v_i) / (sum w_i)^2``.
    With ``config.coadd == "proper"`` (the default) the same inputs are then co-added properly
    (:func:`_proper`), which is optimal also when the seeing differs between them. Either way
    the co-add PSF is measured on the co-add itself (registration blur included).

    A frame whose flux ratio nothing measures is left out, never scaled by a guess (F = 1 put a
    frame twice as deep at twice the grid's flux scale): ``frame_ids`` and ``NCOMBINE`` name the
    frames co-added, :attr:`Reference.omitted` (header ``NOMIT``, ``OMITn``, ``OMITRn``) those left out
    and why. When every frame but the grid is left out the reference is the grid frame alone, as
    with ``n_frames = 1``. ``FSCALEn`` and ``FSRCn`` record each co-added frame's F and its source.

    Raises
    ------
    ReferenceUnavailable
        No frames, frames of different (telescope, field, filter), a frame of which less than
        :data:`MIN_USABLE_FRACTION` is usable (:func:`check_usable`: NaN, saturated, constant),
        two frames of one exposure (:func:`check_distinct`), or a frame or the co-add with fewer
        than ``min_psf_stars`` stars (:func:`check_psf_stars`).
    AlignmentError
        A frame cannot be registered onto the first.
    """
    if not frames:
        raise ReferenceUnavailable("no frames to build a reference from")
    keys = {f.meta.reference_key for f in frames}
    if len(keys) != 1:
        raise ReferenceUnavailable(f"frames of different fields/filters: {sorted(keys)}")
    frames = sorted(frames, key=lambda f: (f.meta.mjd_start, f.meta.frame_id))
    masks = [check_usable(f, config) for f in frames]
    exposures = check_distinct(frames)
    grid = frames[0]
    grid_header = celestial_wcs(grid.header).to_header(relax=True)
    co = _coadd_inputs(frames, masks, config)
    inputs, sat_any, h = co.inputs, co.saturated, co.half_size
    stack = np.asarray([i.image for i in inputs])
    vstack = np.asarray([i.variance for i in inputs])
    ok = _good_pixels(stack, vstack, config)
    image, variance = _weighted_mean(stack, vstack, ok, [i.weight for i in inputs])
    # where any input was saturated the others alone give the core, with another PSF: invalid
    image[sat_any], variance[sat_any] = np.nan, np.nan
    image, variance, defects = _fill_narrow_gaps(image, variance, sat_any)
    psfs = [i.psf for i in inputs if i.psf is not None]
    method = "proper" if config.coadd == "proper" and len(psfs) == len(inputs) else "weighted"
    if method == "proper":
        image, variance = _proper(stack, vstack, ok, image, variance, psfs, [i.sigma for i in inputs], defects)
    rms = float(np.sqrt(np.nanmedian(variance)))
    filled = np.nan_to_num(image)
    coadd_stars = find_stars(filled, rms, config.stars)
    frame_ids = tuple(f.meta.frame_id for f in co.frames)
    check_psf_stars(len(coadd_stars), f"the co-add of {', '.join(frame_ids)}", config)
    psf = build_psf(image, coadd_stars, config.psf, half_size=h)
    sources = find_stars(filled, rms, replace(config.stars, max_stars=config.source_max_stars),
                         fwhm=psf.fwhm, threshold_sigma=config.source_threshold_sigma)
    key = grid.meta.reference_key
    header = _reference_header(grid_header, key, method, psf, co)
    kept = tuple(p for f, p in zip(frames, exposures, strict=True) if any(f is c for c in co.frames))
    return Reference(key, image, variance, header, psf.stamp, frame_ids, sources, defects, kept)


@dataclass(frozen=True)
class _CoaddInputs:
    """The inputs of a co-add on the grid of its first frame (:func:`_coadd_inputs`).

    Attributes
    ----------
    inputs : list of _CoaddInput
        One per frame of ``frames``, flux-scaled to the grid frame.
    frames : list of Frame
        The frames co-added, the grid first.
    ratios : list of FluxRatio
        Their flux ratios to the grid frame.
    omitted : list of (str, str)
        (frame id, reason) of each frame left out: nothing measured its flux ratio.
    saturated : ndarray of bool, shape (ny, nx)
        Pixels saturated in any co-added frame, on the grid.
    half_size : int
        PSF stamp half-size (px) from the grid frame's FWHM.
    """

    inputs: list[_CoaddInput]
    frames: list[Frame]
    ratios: list[FluxRatio]
    omitted: list[tuple[str, str]]
    saturated: np.ndarray
    half_size: int


def _coadd_inputs(frames: list[Frame], masks: list[tuple[np.ndarray, np.ndarray]],
                  config: ReferenceConfig) -> _CoaddInputs:
    """The frames (sorted, the grid first) registered and flux-scaled onto the grid, those without a measured F out."""
    grid = frames[0]
    g_img, g_var, g_sig, g_stars, sat_any = _prepare(grid, config, masks[0])
    h = half_size_for(g_stars.fwhm, config.psf)
    co = _CoaddInputs([_grid_input(grid, g_img, g_var, g_sig, g_stars, h, config)], [grid],
                      [FluxRatio(1.0, "grid")], [], sat_any, h)
    for f, f_masks in zip(frames[1:], masks[1:], strict=True):
        inp, sat, ratio = _registered_input(f, f_masks, grid, g_img, g_sig, g_stars, h, config)
        if inp is None:
            co.omitted.append((f.meta.frame_id, ratio.reason))
            continue
        co.saturated[...] |= sat
        co.inputs.append(inp)
        co.frames.append(f)
        co.ratios.append(ratio)
    return co


def _proper(stack: np.ndarray, vstack: np.ndarray, ok: np.ndarray, weighted: np.ndarray,
            weighted_var: np.ndarray, psfs: list[np.ndarray], sigmas: list[float],
            defects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Proper co-add of the flux-scaled inputs (n, ny, nx) whose good pixels are ``ok``.

    The inputs' PSFs enter as Gaussians of their measured FWHM: with the stacked stamps
    themselves (10-50 stars each) the co-add lost 6-8 % S/N against the weighted mean on a
    test field, with the Gaussians it gains (true Gaussian PSFs gave the same as these). The
    kernels only weight the inputs; the co-add's PSF is measured on it afterwards.
    An input's lost pixels take the weighted co-add's value and variance (its noise is lower and
    its PSF a mixture, but a cosmic ray's hole is a few pixels). Within 1.5 FWHM of a detector
    defect filled from its neighbours (``defects``) the weighted co-add is kept as it is: the
    kernels would spread the fill's error over that radius (on the demo's frames: 46 false
    candidates along two hot columns and elsewhere, against 32 for the weighted mean; 33 with
    this). Pixels no input has (NaN in ``weighted``) are NaN, grown by 1.5 FWHM of the broadest
    PSF: the kernels spread the filler over that radius (beyond it a Gaussian keeps < 0.4 % of
    its flux).
    """
    from scipy import ndimage

    missing = ~np.isfinite(weighted)
    fill = np.where(missing, 0.0, weighted).astype(np.float32)
    inputs = [np.where(ok[j], stack[j], fill) for j in range(len(stack))]
    fill_var = np.where(missing, 0.0, weighted_var).astype(np.float32)
    variances = [np.where(ok[j], vstack[j], fill_var) for j in range(len(stack))]
    fwhms = [measure_fwhm(p) for p in psfs]
    models = [gaussian_psf(f, psfs[0].shape[0] // 2) for f in fwhms]
    image, variance, _ = proper_coadd(inputs, variances, models, sigmas)
    r = 1.5 * max(fwhms)
    if defects.any():
        near = ndimage.distance_transform_edt(~defects) <= r
        image[near], variance[near] = weighted[near], weighted_var[near]
    if missing.any():
        lost = ndimage.distance_transform_edt(~missing) <= r
        image[lost], variance[lost] = np.nan, np.nan
    return image, variance


def _grow_mask(mask: np.ndarray, px: int) -> np.ndarray:
    """``mask`` dilated ``px`` times by the 4-connected cross (scipy's default structure)."""
    from scipy import ndimage

    px = min(px, sum(mask.shape))  # more steps add nothing (2**62 overflowed scipy's C int)
    return ndimage.binary_dilation(mask, iterations=px) if px > 0 and mask.any() else mask


def _fill_narrow_gaps(image: np.ndarray, variance: np.ndarray, saturated: np.ndarray, half: int = 2,
                      min_valid: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill holes that every input had: detector defects that stay put while the pointing jitters by less than a pixel.

    A pixel is filled from its 5 x 5 box (:func:`broker.defects.inpaint`) when >= ``min_valid`` of the 25 are valid (a
    column up to 3 px wide; 10 of 25), and its variance gains the fit's residual squared. Pixels where that residual
    exceeds :data:`FILL_MAX_SPREAD` sigma (a star's core on the column) and larger holes (saturated cores) stay NaN and
    are masked by the subtraction. Returns the image, the variance and the defects (the narrow holes, filled or not).
    """
    gap = ~(np.isfinite(image) & np.isfinite(variance)) & ~saturated
    if not gap.any():
        return image, variance, gap
    filled, spread = inpaint(image, gap, half, min_valid)
    var_fill, _ = inpaint(variance, gap, half, min_valid)
    # where the surface cannot follow the image (a star's core on the column): leave NaN
    with np.errstate(invalid="ignore"):
        done = gap & np.isfinite(filled) & (spread ** 2 <= FILL_MAX_SPREAD ** 2 * var_fill)
    filled = np.where(gap & ~done, np.nan, filled).astype(np.float32)
    variance = np.where(done, var_fill + spread ** 2, variance).astype(np.float32)
    return filled, variance, gap & np.isfinite(var_fill)


#: The longest path component :func:`path_component` gives (characters, all ASCII). File systems
#: allow 255 bytes; the stores add up to ~40 (``.<name>.fits.<pid>.<thread>.tmp``).
MAX_COMPONENT_CHARS = 200


def path_component(name: str) -> str:
    """A path component for any string: percent-encoded, never '.' or '..', at most :data:`MAX_COMPONENT_CHARS`.

    An encoding over the limit (a ``FRAMEID`` continued over several cards, or a short one of
    escaped characters, each 3 or 9 of them) keeps its first characters and ends in ``~`` and 16
    hex digits of the name's SHA-256, so distinct names stay distinct files. Shorter names are
    encoded as before (the stores' existing files keep their paths).
    """
    raw = name.encode(errors="surrogatepass")  # a lone surrogate (no FITS header holds one) is still a name
    encoded = quote(raw, safe="-_").replace(".", "%2E") or "%00"
    if len(encoded) <= MAX_COMPONENT_CHARS:
        return encoded
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f"{encoded[:MAX_COMPONENT_CHARS - 17]}~{digest}"


def refused_frames(exc: BrokerError, frames: list[Frame]) -> tuple[str, ...]:
    """The ids of the frames a refused build of a reference from ``frames`` sets aside.

    Those the error names (``ReferenceUnavailable.frames``, ``AlignmentError.frames``: a frame that
    cannot serve in any reference, the later copy of one exposure, the two frames of a failed
    registration, neither of which can be told at fault), else every one of ``frames`` (the co-add's
    own stars, say): each try so sets one frame aside at least, and the next try has other frames.
    """
    ids = tuple(f.meta.frame_id for f in frames)
    named = tuple(i for i in getattr(exc, "frames", ()) if i in ids)
    return named or ids


class ReferenceStore:
    """References on local disk, built automatically from the first ``n_frames`` frames of a field.

    Layout: ``root/<telescope>/<field>/<filter>/reference.fits`` and ``.../pending/<frame_id>.fits``
    (each a frame as tile-compressed FITS). The pending frames a build refused (:meth:`offer`, each
    with its reason in ``<frame id>.txt``) and those the co-add left out (:attr:`Reference.omitted`;
    the frame whose offer built it aside, which its caller subtracts) wait in ``.../omitted/`` until
    they are searched against the reference (:meth:`left_out`, :meth:`drop_left_out`). Every file
    is written to a temporary name and renamed
    (``os.replace``), so a crash leaves either the old state or the new one, never a partial file;
    pending frames are keyed by frame id, so a re-delivered frame is stored once. Meant for one
    writer per key (the Kafka stage partitions by telescope/field).

    Parameters
    ----------
    root : path
    config : ReferenceConfig
    on_set_aside : callable, optional
        Called as ``on_set_aside(key, frame_id, reason)`` after each frame a refused build moved to
        ``.../omitted/`` (:meth:`_set_aside`; ``reason`` the refusal's ``BrokerError.reason``, one of
        a fixed set), once per move: the subtract stage counts them
        (``broker_reference_frames_set_aside_total``). None: nothing is called.
    """

    def __init__(self, root: Path | str, config: ReferenceConfig = ReferenceConfig(),
                 on_set_aside: Callable[[tuple[str, str, str], str, str], None] | None = None):
        self.root = Path(root)
        self.config = config
        self.on_set_aside = on_set_aside
        self._cache: dict[tuple[str, str, str], Reference] = {}
        self._lock = threading.Lock()

    def _dir(self, key: tuple[str, str, str]) -> Path:
        return self.root.joinpath(*(path_component(k) for k in key))

    def path(self, key: tuple[str, str, str]) -> Path:
        """Where the reference of ``key`` lives (it may not exist)."""
        return self._dir(key) / "reference.fits"

    def get(self, key: tuple[str, str, str]) -> Reference | None:
        """The reference of ``key``, or None when there is none yet.

        Raises
        ------
        ReferenceUnavailable
            The file exists but cannot be read.
        """
        key = tuple(key)  # type: ignore[assignment]
        if key in self._cache:
            return self._cache[key]
        p = self.path(key)
        if not p.exists():
            return None
        ref = Reference.load(p)
        self._cache[key] = ref
        return ref

    def put(self, reference: Reference) -> None:
        """Import a reference (e.g. from an external FITS file)."""
        d = self._dir(reference.key)
        d.mkdir(parents=True, exist_ok=True)
        reference.save(d / "reference.fits")
        self._cache[tuple(reference.key)] = reference  # type: ignore[index]

    def pending(self, key: tuple[str, str, str]) -> list[str]:
        """Frame ids waiting for a reference of ``key`` (sorted)."""
        d = self._dir(key) / "pending"
        if not d.exists():
            return []
        return sorted(p.stem for p in d.glob("*.fits"))

    def waiting(self) -> tuple[int, float | None]:
        """Frames set aside in ``.../omitted/`` of keys with no reference yet, and the modification time of the oldest.

        The time is Unix s (None: no frame). A frame keeps the time its pending file was written
        (the moves keep it): when it arrived. Frames of a key with a reference are left out: they
        are searched in the transaction that built it and dropped at the key's next message.
        One directory listing per key: the stage reads it at most every ``ReferenceWaiting.interval``
        s, not per scrape. A file removed while it is read is left out.
        """
        count, oldest = 0, None
        for folder in self.root.glob("*/*/*/omitted"):
            if (folder.parent / "reference.fits").exists():
                continue
            for path in folder.glob("*.fits"):
                try:
                    mtime = path.stat().st_mtime
                except OSError:
                    continue
                count += 1
                oldest = mtime if oldest is None else min(oldest, mtime)
        return count, oldest

    def left_out(self, key: tuple[str, str, str]) -> list[Frame]:
        """The frames of ``key`` that wait to be searched against its reference, in (MJD, frame id) order.

        Those its co-add left out (``.../omitted/``), and pending frames outside it still there once
        it exists (a crash between the build and the clean-up of :meth:`offer`; those it holds are
        removed). None without a reference. An unreadable file is dropped with a warning, as in
        :meth:`offer`.
        """
        reference = self.get(key)
        if reference is None:
            return []
        d = self._dir(key)
        frames: list[Frame] = []
        for p in sorted((d / "omitted").glob("*.fits")) + sorted((d / "pending").glob("*.fits")):
            try:
                frame = decode_fits(p.read_bytes())
            except BrokerError:
                warnings.warn(f"dropping unreadable left-out frame {p}", stacklevel=2)
                p.unlink(missing_ok=True)
                continue
            if frame.meta.frame_id not in reference.frame_ids:
                frames.append(frame)
            else:
                self.drop_left_out(key, frame.meta.frame_id)  # co-added: the reference holds it
        return sorted(frames, key=lambda f: (f.meta.mjd_start, f.meta.frame_id))

    def drop_left_out(self, key: tuple[str, str, str], frame_id: str) -> None:
        """Forget a left-out frame of ``key`` (:meth:`left_out`) once its search is done."""
        name = path_component(frame_id)
        for path in (f"omitted/{name}.fits", f"omitted/{name}.txt", f"pending/{name}.fits"):
            (self._dir(key) / path).unlink(missing_ok=True)

    def _set_aside(self, key: tuple[str, str, str], paths: dict[str, Path], frame_ids: tuple[str, ...],
                   exc: BrokerError) -> None:
        """Move the pending files (``paths``: frame id -> file) of ``frame_ids`` to ``.../omitted/`` with the refusal.

        Each waits there, its reason in ``<frame id>.txt``, to be searched once the key has a
        reference (:meth:`left_out`); a warning is logged for each, and ``on_set_aside`` called.
        """
        out = self._dir(key) / "omitted"
        out.mkdir(parents=True, exist_ok=True)
        why = f"{type(exc).__name__}: {exc}"
        for frame_id in frame_ids:
            name = path_component(frame_id)
            tmp = out / f".{name}.txt.{os.getpid()}.tmp"
            tmp.write_text(f"left out of the build of a reference: {why}\n")
            os.replace(tmp, out / f"{name}.txt")
            os.replace(paths.pop(frame_id), out / f"{name}.fits")
            log.warning("reference of %s: frame %s set aside to be searched once a reference exists; the build "
                        "goes on without it: %.1000s", key, frame_id, why)
            if self.on_set_aside is not None:
                self.on_set_aside(key, frame_id, exc.reason)

    def _read_pending(self, pend: Path) -> tuple[list[Frame], dict[str, Path]]:
        """The readable pending frames in (MJD, frame id) order and their files (an unreadable one dropped, warned)."""
        frames: list[Frame] = []
        paths: dict[str, Path] = {}  # frame id -> its pending file
        for p in sorted(pend.glob("*.fits")):
            try:
                frames.append(decode_fits(p.read_bytes()))
                paths[frames[-1].meta.frame_id] = p
            except BrokerError:
                warnings.warn(f"dropping unreadable pending frame {p}", stacklevel=3)
                p.unlink(missing_ok=True)
        return sorted(frames, key=lambda f: (f.meta.mjd_start, f.meta.frame_id)), paths

    def offer(self, frame: Frame) -> Reference | None:
        """Keep a frame of a field without reference; build the reference once enough usable frames are kept.

        The reference is built from the first ``n_frames`` pending frames in (MJD, frame id) order.
        When the build refuses them, the frames it names (:func:`refused_frames`: one that cannot
        serve in a reference, the later copy of one exposure, both frames of a failed registration;
        all of them when it names none) move to ``.../omitted/`` with their reason
        (:meth:`_set_aside`), and the build is tried again from the pending frames left, later ones
        taking their places; with fewer than ``n_frames`` left the key waits for more. A frame so
        set aside is never lost: once the key has a reference it is searched against it as a frame
        its co-add left out is (:meth:`left_out`; a failed search is dead-lettered with its reason).
        They were moved to ``.../rejected/`` and never searched, and the frame in hand dead-lettered.

        Returns
        -------
        Reference or None
            The reference (new, or already existing for this key), or None while fewer than
            ``n_frames`` usable frames are pending.
        """
        key = frame.meta.reference_key
        n = self.config.n_frames
        with self._lock:
            existing = self.get(key)
            if existing is not None:
                return existing
            pend = self._dir(key) / "pending"
            pend.mkdir(parents=True, exist_ok=True)
            target = pend / f"{path_component(frame.meta.frame_id)}.fits"
            if not target.exists():
                tmp = pend / f".{target.name}.{os.getpid()}.tmp"
                tmp.write_bytes(encode_fits(frame, compress=True))
                os.replace(tmp, target)
            frames, paths = self._read_pending(pend)
            while len(frames) >= n:
                try:
                    ref = build_reference(frames[:n], self.config)
                except Outage:
                    raise
                except BrokerError as exc:
                    refused = refused_frames(exc, frames[:n])
                    self._set_aside(key, paths, refused, exc)
                    frames = [f for f in frames if f.meta.frame_id not in refused]
                    continue
                self._keep(key, ref, paths, frame.meta.frame_id, pend)
                return ref
            return None

    def _keep(self, key: tuple[str, str, str], ref: Reference, paths: dict[str, Path], offered: str,
              pend: Path) -> None:
        """Store a reference built from pending frames; move the pending frames outside it aside; clean up."""
        self.put(ref)
        # only after the reference is safely in place; a crash here leaves pending files, which
        # left_out still finds (those outside the reference) and an offer no longer reads
        self._keep_left_out(key, paths, ref, offered)
        name = path_component(offered)
        for leftover in (self._dir(key) / "omitted" / f"{name}.fits", self._dir(key) / "omitted" / f"{name}.txt"):
            leftover.unlink(missing_ok=True)  # the frame in hand, set aside by an earlier try: its caller subtracts it
        for p in pend.glob("*.fits"):
            p.unlink(missing_ok=True)
        for p in pend.glob(".*.tmp"):
            p.unlink(missing_ok=True)

    def _keep_left_out(self, key: tuple[str, str, str], paths: dict[str, Path], ref: Reference, offered: str) -> None:
        """Move the pending files (``paths``: frame id -> file) of the frames ``ref`` does not hold to ``.../omitted/``.

        All but the frame just ``offered``, which its caller subtracts.
        """
        out = self._dir(key) / "omitted"
        for frame_id, p in paths.items():
            if frame_id not in ref.frame_ids and frame_id != offered:
                out.mkdir(parents=True, exist_ok=True)
                os.replace(p, out / f"{path_component(frame_id)}.fits")
