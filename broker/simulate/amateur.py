"""The "amateur" mode of the simulator: a smart-telescope frame of the real sky, without a WCS.

Exercises the whole any-telescope chain in CI without real data: header normalisation
(``DATE-OBS``, ``EXPOSURE``, ``OBJECT``, vendor filter ``IRCUT``), Bayer handling (a raw ``GRBG``
mosaic), plate solving (the stars are real Tycho-2 stars from the installed index files, placed
through a hidden WCS; the header only gives an RA/DEC hint and the pixel size and focal length)
and photometric calibration (fluxes follow V_T and a known zero point). Defaults mimic a ZWO
Seestar S50 (250 mm focal length, 2.9 um pixels: 2.39"/px raw, 4.8"/px after 2x2 binning) on a
bright suburban sky. A transient can be added at a known position for end-to-end tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from broker.catalog import cone

#: Relative response of the R, G, B pixels of the mosaic to a star's V_T flux (dimensionless).
_CHANNEL_GAIN = {"R": 0.8, "G": 1.0, "B": 0.6}


@dataclass(frozen=True)
class AmateurConfig:
    """A simulated smart telescope.

    Attributes
    ----------
    ra, dec : float
        True pointing (deg); default near M94, 30 Tycho-2 stars in the field.
    shape : tuple of int
        Raw (ny, nx) of the sensor (px).
    pixel_um, focal_mm : float
        Pixel size (um) and focal length (mm): the header's scale hint.
    rotation_deg : float
        Position angle of the sensor (deg).
    fwhm_px : float
        Seeing FWHM on the raw mosaic (px).
    sky_adu, read_noise, gain : float
        Sky level per raw pixel (ADU), read noise (e-), gain (e-/ADU).
    magzp_luminance : float
        True zero point of the 2x2-binned luminance (mag of 1 ADU in the exposure, on V_T).
    exptime : float
        Exposure (s).
    bayer : str or None
        Mosaic pattern written as ``BAYERPAT``; None: a monochrome sensor.
    hint_error_deg : float
        Offset of the header's RA/DEC hint from the true pointing (deg).
    mjd : float
        Exposure start (MJD, UTC), written as ``DATE-OBS`` in local time with a -07:00 offset.
    """

    ra: float = 193.0
    dec: float = 41.0
    shape: tuple[int, int] = (1920, 1080)
    pixel_um: float = 2.9
    focal_mm: float = 250.0
    rotation_deg: float = 12.0
    fwhm_px: float = 3.5
    sky_adu: float = 400.0
    read_noise: float = 1.5
    gain: float = 1.0
    magzp_luminance: float = 23.0
    exptime: float = 10.0
    bayer: str | None = "GRBG"
    hint_error_deg: float = 0.05
    mjd: float = 60761.05


def true_wcs(config: AmateurConfig) -> WCS:
    """The hidden WCS of the raw frame (TAN, north rotated by ``rotation_deg``)."""
    scale = 206.264806 * config.pixel_um / config.focal_mm / 3600.0
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [config.ra, config.dec]
    wcs.wcs.crpix = [config.shape[1] / 2 + 0.5, config.shape[0] / 2 + 0.5]
    t = math.radians(config.rotation_deg)
    wcs.wcs.cd = scale * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])
    return wcs


def _render(config: AmateurConfig, x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Expected ADU per raw pixel: sky plus Gaussian stars of total ``flux``, integrated over each pixel."""
    from scipy.special import erf

    ny, nx = config.shape
    image = np.full(config.shape, config.sky_adu, np.float64)
    sigma = config.fwhm_px / 2.3548
    half = int(math.ceil(4 * sigma))
    response = _response(config)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        x0, y0 = int(round(xi)), int(round(yi))
        ys, xs = slice(max(0, y0 - half), min(ny, y0 + half + 1)), slice(max(0, x0 - half), min(nx, x0 + half + 1))
        ex = np.arange(xs.start, xs.stop + 1) - 0.5 - xi  # pixel edges (px) relative to the star
        ey = np.arange(ys.start, ys.stop + 1) - 0.5 - yi
        gx, gy = np.diff(erf(ex / (np.sqrt(2) * sigma))) / 2, np.diff(erf(ey / (np.sqrt(2) * sigma))) / 2
        image[ys, xs] += fi * np.outer(gy, gx) * response[ys, xs]
    return image


def _response(config: AmateurConfig) -> np.ndarray:
    """Per-pixel response of the mosaic, normalised so a 2x2 cell sums to 4 x the mean (=1 per pixel on average)."""
    if config.bayer is None:
        return np.ones(config.shape)
    cell = np.array([[_CHANNEL_GAIN[config.bayer[0]], _CHANNEL_GAIN[config.bayer[1]]],
                     [_CHANNEL_GAIN[config.bayer[2]], _CHANNEL_GAIN[config.bayer[3]]]])
    cell = cell / cell.mean()
    reps = (config.shape[0] // 2 + 1, config.shape[1] // 2 + 1)
    return np.tile(cell, reps)[: config.shape[0], : config.shape[1]]


def amateur_frame(config: AmateurConfig = AmateurConfig(), seed: int = 0,
                  transient: tuple[float, float, float] | None = None) -> tuple[np.ndarray, fits.Header]:
    """A raw frame (uint16-valued float32 ADU, shape ``config.shape``) and its vendor-style header (no WCS).

    ``transient`` adds a point source (RA, Dec in deg, V_T-equivalent mag) to the real stars.
    """
    wcs = true_wcs(config)
    radius = math.hypot(*config.shape) / 2 * 206.264806 * config.pixel_um / config.focal_mm / 3600.0
    stars = cone(config.ra, config.dec, radius)
    ra, dec, mag = stars.ra, stars.dec, stars.mag
    if transient is not None:
        ra, dec, mag = np.append(ra, transient[0]), np.append(dec, transient[1]), np.append(mag, transient[2])
    x, y = wcs.world_to_pixel_values(ra, dec)
    inside = (x > -10) & (y > -10) & (x < config.shape[1] + 10) & (y < config.shape[0] + 10)
    x, y, mag = x[inside], y[inside], mag[inside]
    flux = 10 ** (-0.4 * (mag - config.magzp_luminance))  # total ADU of the star (mean response 1 per pixel)
    rng = np.random.default_rng(seed)
    expected = _render(config, x, y, flux)
    electrons = rng.poisson(expected * config.gain) + rng.normal(0, config.read_noise, config.shape)
    data = np.clip(np.round(electrons / config.gain), 0, 65535).astype(np.float32)
    return data, _header(config)


def _header(config: AmateurConfig) -> fits.Header:
    """A Seestar-like header: DATE-OBS in local time, EXPOSURE, OBJECT, IRCUT, GAIN setting, RA/DEC hint."""
    local = Time(config.mjd - 7.0 / 24.0, format="mjd", scale="utc").isot + "-0700"
    header = fits.Header()
    for key, value in (("TELESCOP", "S50_sim"), ("INSTRUME", "Seestar S50 (simulated)"), ("OBJECT", "M 94"),
                       ("FILTER", "IRCUT"), ("DATE-OBS", local), ("EXPOSURE", config.exptime), ("GAIN", 80),
                       ("RA", config.ra + config.hint_error_deg), ("DEC", config.dec), ("XPIXSZ", config.pixel_um),
                       ("FOCALLEN", config.focal_mm), ("IMAGETYP", "Light")):
        header[key] = value
    if config.bayer is not None:
        header["BAYERPAT"] = config.bayer
    return header


def amateur_fits(data: np.ndarray, header: fits.Header) -> bytes:
    """The frame as the camera would save it: unsigned 16-bit FITS (``BZERO = 32768``)."""
    import io

    hdu = fits.PrimaryHDU(data.astype(np.uint16), header=header)
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def amateur_series(n: int, config: AmateurConfig = AmateurConfig(), seed: int = 0, reference_epochs: int = 3,
                   transient: tuple[float, float, float] = (193.05, 41.02, 11.5)) -> list[tuple[str, bytes, dict]]:
    """``n`` nightly frames of one pointing: (file name, camera FITS bytes, truth), a transient from night 3.

    Each night moves the header's pointing hint by a further 0.03 deg (the mount's error) and the
    exposure start by one day; the truth names the transient (RA, Dec in deg, mag) when it is on
    the frame and the zero point of the binned luminance (mag of 1 ADU).
    """
    out = []
    for epoch in range(n):
        night = AmateurConfig(**{**config.__dict__, "mjd": config.mjd + epoch,
                                 "hint_error_deg": config.hint_error_deg + 0.03 * epoch})
        on = epoch >= reference_epochs
        data, header = amateur_frame(night, seed=seed + epoch, transient=transient if on else None)
        truth = {"epoch": epoch, "mjd": night.mjd, "magzp_luminance": night.magzp_luminance,
                 "transient": list(transient) if on else None}
        out.append((f"Light_M_94_{night.exptime:g}s_IRCUT_{epoch:03d}.fit", amateur_fits(data, header), truth))
    return out
