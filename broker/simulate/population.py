"""What is on the sky and on the detector: catalogues drawn once from seeds, independent of epoch.

Every draw comes from its own :class:`numpy.random.Generator` keyed by (seed, what, field, ...),
so a frame depends only on (seed, field, filter, epoch) and never on the order frames are made.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS

from broker.errors import ConfigError
from broker.simulate.config import SimConfig


def rng_for(seed: int, *keys: int | str) -> np.random.Generator:
    """Independent generator for (seed, keys...); strings are hashed with CRC-32 (stable)."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed, *ints])


def field_centre(field: str) -> tuple[float, float]:
    """Sky centre (RA, Dec, deg) of a field, derived from its name (distinct names, distinct skies)."""
    h = zlib.crc32(field.encode())
    return (h % 36000) / 100.0, ((h // 36000) % 8000) / 100.0 - 40.0


def make_wcs(config: SimConfig, ra: float, dec: float, dx: float = 0.0, dy: float = 0.0,
             rotation: float = 0.0) -> WCS:
    """TAN WCS centred on (ra, dec) deg, North up East left, pointing offset (dx, dy) px, rotation deg."""
    ny, nx = config.shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx + 1) / 2.0 + dx, (ny + 1) / 2.0 + dy]
    scale = config.pixel_scale / 3600.0
    c, s = np.cos(np.radians(rotation)), np.sin(np.radians(rotation))
    w.wcs.cd = scale * np.array([[-c, s], [s, c]])
    w.wcs.radesys = "ICRS"
    return w


def _power_law_mags(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """Magnitudes with dN/dm ~ 10^(slope m) on [lo, hi] by inverting the CDF."""
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return np.log10(a + rng.uniform(size=n) * (b - a)) / slope


@dataclass(frozen=True)
class StaticSky:
    """The unchanging sky of one field. Arrays have one entry per source.

    Attributes
    ----------
    ra, dec : float
        Field centre, deg.
    star_ra, star_dec : ndarray
        Star positions, deg.
    star_mag, star_colour : ndarray
        r-band magnitude and colour (mag); m_filter = m_r + colour_term(filter) * colour.
    gal_ra, gal_dec, gal_mag, gal_colour : ndarray
        Galaxy centres (deg), total magnitudes and colours.
    gal_reff : ndarray
        Half-light radius along the major axis, arcsec.
    gal_n, gal_ellip, gal_theta : ndarray
        Sersic index, ellipticity 1 - b/a and position angle (rad from +x of the nominal pixel grid).
    var_index : ndarray of int
        Indices of the variable stars in the star arrays.
    var_amp, var_period, var_phase : ndarray
        Fractional semi-amplitude, period (days) and phase (rad) of each variable.
    """

    ra: float
    dec: float
    star_ra: np.ndarray
    star_dec: np.ndarray
    star_mag: np.ndarray
    star_colour: np.ndarray
    gal_ra: np.ndarray
    gal_dec: np.ndarray
    gal_mag: np.ndarray
    gal_colour: np.ndarray
    gal_reff: np.ndarray
    gal_n: np.ndarray
    gal_ellip: np.ndarray
    gal_theta: np.ndarray
    var_index: np.ndarray
    var_amp: np.ndarray
    var_period: np.ndarray
    var_phase: np.ndarray


def _variable_stars(rng: np.random.Generator, star_mag: np.ndarray, config: SimConfig) -> np.ndarray:
    """Sorted indices of the variable stars: well-measured, unsaturated catalogue stars."""
    lo, hi = config.variable_mag_range
    pool = np.flatnonzero((star_mag >= lo) & (star_mag <= hi))
    if config.variable_bright_cap is None:
        if len(pool) < config.n_variables:
            pool = np.arange(len(star_mag))
        nv = min(config.n_variables, len(pool))
        return np.sort(rng.choice(pool, nv, replace=False)) if nv else np.zeros(0, dtype=int)
    mag, fraction = config.variable_bright_cap
    if not (np.isfinite(mag) and 0.0 <= fraction <= 1.0):
        raise ConfigError(f"variable_bright_cap must be (finite mag, fraction in [0, 1]), "
                          f"got {config.variable_bright_cap!r}")
    bright, faint = pool[star_mag[pool] < mag], pool[star_mag[pool] >= mag]
    # the uniform draw's share of bright ones, capped at `fraction` of all stars brighter than mag
    nb = min(round(config.n_variables * len(bright) / max(len(pool), 1)),
             int(fraction * np.sum(star_mag < mag)), len(bright))
    nf = min(config.n_variables - nb, len(faint))
    return np.sort(np.concatenate([rng.choice(bright, nb, replace=False),
                                   rng.choice(faint, nf, replace=False)])).astype(int)


def static_sky(config: SimConfig, seed: int, field: str) -> StaticSky:
    """Draw the stars, galaxies and variable stars of ``field``."""
    rng = rng_for(seed, "static", field)
    ra0, dec0 = field_centre(field)
    nominal = make_wcs(config, ra0, dec0)
    ny, nx = config.shape
    # cover the frame plus the jitter/rotation margin and a stamp half-width, so edges stay filled
    m = config.jitter + config.max_rotation * np.pi / 180 * max(nx, ny) + config.stamp_size // 2 + 1

    def positions(n: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = rng.uniform(-m, nx - 1 + m, n), rng.uniform(-m, ny - 1 + m, n)
        return nominal.wcs_pix2world(x, y, 0)

    star_ra, star_dec = positions(config.n_stars)
    star_mag = _power_law_mags(rng, config.n_stars, *config.star_mag_range, config.star_count_slope)
    star_colour = rng.uniform(*config.colour_range, config.n_stars)
    ng = config.n_galaxies
    gal_ra, gal_dec = positions(ng)
    gal_mag = _power_law_mags(rng, ng, *config.galaxy_mag_range, 0.35)
    gal_colour = rng.uniform(*config.colour_range, ng)
    gal_reff = rng.uniform(*config.galaxy_reff_range, ng)
    gal_n = rng.uniform(*config.galaxy_n_range, ng)
    gal_ellip = rng.uniform(0.0, config.galaxy_max_ellip, ng)
    gal_theta = rng.uniform(0.0, np.pi, ng)
    var_index = _variable_stars(rng, star_mag, config)
    nv = len(var_index)
    return StaticSky(
        ra=ra0, dec=dec0, star_ra=star_ra, star_dec=star_dec, star_mag=star_mag,
        star_colour=star_colour, gal_ra=gal_ra, gal_dec=gal_dec, gal_mag=gal_mag,
        gal_colour=gal_colour, gal_reff=gal_reff, gal_n=gal_n, gal_ellip=gal_ellip,
        gal_theta=gal_theta, var_index=var_index,
        var_amp=rng.uniform(*config.variable_amplitude_range, nv),
        var_period=rng.uniform(*config.variable_period_range, nv),
        var_phase=rng.uniform(0.0, 2 * np.pi, nv),
    )


@dataclass(frozen=True)
class Detector:
    """Fixed defects of the telescope's CCD, in detector pixels (0-based).

    Attributes
    ----------
    hot_x, hot_y : ndarray of int
        Hot pixels; ``hot_rate`` their dark current, ADU/s.
    col_x, col_y0 : ndarray of int
        Hot columns, hot from row ``col_y0`` to the top; ``col_rate`` ADU/s/px.
    """

    hot_x: np.ndarray
    hot_y: np.ndarray
    hot_rate: np.ndarray
    col_x: np.ndarray
    col_y0: np.ndarray
    col_rate: np.ndarray


def detector(config: SimConfig, seed: int) -> Detector:
    """The telescope's defects: the same for every field, filter and epoch."""
    rng = rng_for(seed, "detector", config.telescope)
    ny, nx = config.shape
    return Detector(
        hot_x=rng.integers(0, nx, config.n_hot_pixels), hot_y=rng.integers(0, ny, config.n_hot_pixels),
        hot_rate=rng.uniform(*config.hot_pixel_rate_range, config.n_hot_pixels),
        col_x=rng.integers(0, nx, config.n_hot_columns),
        col_y0=rng.integers(0, ny // 2, config.n_hot_columns),
        col_rate=rng.uniform(*config.hot_column_rate_range, config.n_hot_columns),
    )


def transients_born(config: SimConfig, birth: int) -> int:
    """How many transients are born at epoch ``birth``.

    Any ``transient_lifetime`` consecutive
    births add up to ``n_transients``, so every frame after the references shows that many.
    """
    life = max(config.transient_lifetime, 1)
    return config.n_transients // life + (1 if birth % life < config.n_transients % life else 0)


def transient_light_curve(rng: np.random.Generator, life: int, snr_range: tuple[float, float]
                          ) -> np.ndarray:
    """Nominal S/N at ages 0..life-1 epochs: exponential rise to a random peak age, then decline.

    The values stay in ``snr_range``: lo + (hi - lo) * u * shape, with shape in (0, 1].
    """
    age = np.arange(life)
    peak = rng.uniform(0.0, life - 1) if life > 1 else 0.0
    tau_rise, tau_fall = rng.uniform(0.3, 2.0), rng.uniform(0.5, 4.0)
    shape = np.where(age < peak, np.exp(-(peak - age) / tau_rise), np.exp(-(age - peak) / tau_fall))
    lo, hi = snr_range
    return lo + (hi - lo) * rng.uniform(0.2, 1.0) * shape
