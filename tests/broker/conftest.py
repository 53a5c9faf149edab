"""Small seeded synthetic frames and references for the subtraction tests.

Stars live on the sky (RA/Dec); each frame renders them through its own TAN WCS with pixel-integrated
Gaussian PSFs, a flat sky and Gaussian (Poisson-like) noise. ``true_*`` arguments let a frame's
pixels differ from what its header WCS says (a WCS error), to exercise star-matched alignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

from broker.frame import Frame, FrameMeta
from broker.psf import gaussian_psf
from broker.reference import Reference

CRVAL = (150.0, 2.0)
SCALE = 1.0 / 3600.0  # 1"/px


def make_wcs(shape: tuple[int, int], dx: float = 0.0, dy: float = 0.0, rot_deg: float = 0.0) -> WCS:
    """TAN WCS at CRVAL, 1"/px, with the reference pixel moved by (dx, dy) and rotated."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = CRVAL
    w.wcs.crpix = [shape[1] / 2 + 0.5 + dx, shape[0] / 2 + 0.5 + dy]
    c, s = np.cos(np.deg2rad(rot_deg)), np.sin(np.deg2rad(rot_deg))
    w.wcs.cd = SCALE * np.array([[-c, s], [s, c]])
    return w


def render(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm) -> np.ndarray:
    """Pixel-integrated circular Gaussians (ADU) on a zero image.

    ``fwhm`` (px) is a number or a function of the position (x, y) (a PSF that varies across the
    field).
    """
    img = np.zeros(shape, np.float64)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        s = (fwhm(xi, yi) if callable(fwhm) else fwhm) / 2.3548200450309493
        h = int(np.ceil(5 * s)) + 1
        ix, iy = int(np.round(xi)), int(np.round(yi))
        xs = np.arange(ix - h, ix + h + 1)
        ys = np.arange(iy - h, iy + h + 1)
        gx = 0.5 * (erf((xs + 0.5 - xi) / (np.sqrt(2) * s)) - erf((xs - 0.5 - xi) / (np.sqrt(2) * s)))
        gy = 0.5 * (erf((ys + 0.5 - yi) / (np.sqrt(2) * s)) - erf((ys - 0.5 - yi) / (np.sqrt(2) * s)))
        okx = (xs >= 0) & (xs < shape[1])
        oky = (ys >= 0) & (ys < shape[0])
        if okx.any() and oky.any():
            img[np.ix_(ys[oky], xs[okx])] += fi * np.outer(gy[oky], gx[okx])
    return img


@dataclass
class Sky:
    """Static sky: star positions (deg) and fluxes (ADU in a unit-zero-point science frame)."""

    ra: np.ndarray
    dec: np.ndarray
    flux: np.ndarray


def make_sky(seed: int, shape: tuple[int, int], n_stars: int = 60, fmin: float = 2e3, fmax: float = 1e5,
             margin: int = 12) -> Sky:
    rng = np.random.default_rng(seed)
    w = make_wcs(shape)
    x = rng.uniform(margin, shape[1] - margin, n_stars)
    y = rng.uniform(margin, shape[0] - margin, n_stars)
    flux = np.exp(rng.uniform(np.log(fmin), np.log(fmax), n_stars))
    ra, dec = w.pixel_to_world_values(x, y)
    return Sky(np.asarray(ra), np.asarray(dec), flux)


def make_frame(
    seed: int, shape: tuple[int, int], sky: Sky | None, *, fwhm=3.0, sky_level: float = 200.0,
    gain: float = 1.0, read_noise: float = 5.0, scale: float = 1.0, saturation: float = np.inf,
    dx: float = 0.0, dy: float = 0.0, rot_deg: float = 0.0,
    true_dx: float | None = None, true_dy: float | None = None, true_rot: float | None = None,
    extra: list[tuple[float, float, float]] = (), frame_id: str = "f0", mjd: float = 60000.0,
    field: str = "F1",
) -> Frame:
    """One synthetic frame.

    ``dx, dy, rot_deg`` set the header WCS; ``true_*`` (default: the same) set the WCS used to
    render, so that ``true != header`` is a WCS error. ``fwhm``: px, or a function of (x, y).
    ``extra`` = [(x, y, flux)] point sources added at science pixel positions. Noise: Gaussian,
    variance = model / gain + read_noise^2.
    """
    rng = np.random.default_rng(seed)
    w_hdr = make_wcs(shape, dx, dy, rot_deg)
    w_true = make_wcs(shape, dx if true_dx is None else true_dx, dy if true_dy is None else true_dy,
                      rot_deg if true_rot is None else true_rot)
    model = np.full(shape, sky_level, np.float64)
    if sky is not None and len(sky.flux):
        x, y = w_true.world_to_pixel_values(sky.ra, sky.dec)
        model += render(shape, np.asarray(x), np.asarray(y), sky.flux * scale, fwhm)
    if extra:
        ex = np.asarray(extra, float)
        model += render(shape, ex[:, 0], ex[:, 1], ex[:, 2] * scale, fwhm)
    data = model + rng.normal(0, 1, shape) * np.sqrt(model / gain + read_noise ** 2)
    if np.isfinite(saturation):
        data = np.minimum(data, saturation)
    header = w_hdr.to_header()
    meta = FrameMeta(frame_id=frame_id, telescope="T1", field=field, filter="r", mjd_start=mjd, exptime=60.0,
                     gain=gain, read_noise=read_noise, saturation=saturation)
    for k, v in (("TELESCOP", "T1"), ("FIELD", field), ("FILTER", "r"), ("MJD-OBS", mjd), ("EXPTIME", 60.0),
                 ("GAIN", gain), ("RDNOISE", read_noise), ("FRAMEID", frame_id)):
        header[k] = v
    if np.isfinite(saturation):
        header["SATURATE"] = saturation
    return Frame(meta=meta, data=data.astype(np.float32), header=fits.Header(header))


def make_reference(seed: int, shape: tuple[int, int], sky: Sky | None, *, fwhm: float = 2.5,
                   noise: float = 8.0, scale: float = 1.0, field: str = "F1",
                   dx: float = 0.0, dy: float = 0.0, rot_deg: float = 0.0) -> Reference:
    """A deep, background-subtracted reference with a known Gaussian PSF and white noise + source noise."""
    rng = np.random.default_rng(seed)
    w = make_wcs(shape, dx, dy, rot_deg)
    model = np.zeros(shape)
    if sky is not None and len(sky.flux):
        x, y = w.world_to_pixel_values(sky.ra, sky.dec)
        model = render(shape, np.asarray(x), np.asarray(y), sky.flux * scale, fwhm)
    var = noise ** 2 + model / 3.0  # a 3-frame co-add with gain 1: source noise / 3
    img = model + rng.normal(0, 1, shape) * np.sqrt(var)
    hdr = fits.Header(w.to_header())
    for k, v in zip(("TELESCOP", "FIELD", "FILTER"), ("T1", field, "r"), strict=True):
        hdr[k] = v
    return Reference(("T1", field, "r"), img.astype(np.float32), var.astype(np.float32), hdr,
                     gaussian_psf(fwhm, 8), ("r0", "r1", "r2"))


@pytest.fixture
def small_shape() -> tuple[int, int]:
    return (256, 256)
