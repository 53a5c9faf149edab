"""Seeded synthetic science/reference pair with injected point sources and their theoretical S/N.

The pair follows the benchmark of issue 3: Moffat PSFs of different FWHM, a sky gradient, Poisson +
read noise, a reference ``depth`` times deeper (longer exposure: flux ratio F_r = depth), a
sub-pixel shift (known to the WCS), thousands of stars (the brightest saturate), Sersic galaxies,
and hundreds of point sources injected into the science frame only at nominal S/N 3-20, a fraction
on galaxies.

``snr`` of an injection is its optimal (PSF-weighted) S/N on the science frame alone, source noise
included (:func:`broker.simulate.render.optimal_snr`). ``snr_eff`` is what ZOGY can reach when the
reference noise is accounted for (ZOGY eq. 18 with the *true* PSFs and the local background variance
of both images at the source, then scaled by the science-frame source-noise factor)::

    SNR_eff^2 = f^2 sum_k |P_n|^2 |P_r|^2 F_r^2 / (s_n^2 F_r^2 |P_r|^2 + s_r^2 |P_n|^2) / N_pix

so that the theoretical 5 sigma completeness of a matched filter is Phi(snr_eff - 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy.signal import fftconvolve

from broker.frame import Frame, meta_from_header
from broker.simulate.render import add_noise, add_stamps, moffat_stamps, sersic_stamps, stamp_indices


@dataclass(frozen=True)
class PairConfig:
    """Parameters of the synthetic pair (units in brackets).

    Defaults: a 2k x 2k CCD at 1"/px, 60 s science exposure in 3.2 px seeing, a 4x deeper
    reference (240 s) in 2.4 px seeing; sky 400 ADU/px in the science frame with a 4 % gradient.
    """

    shape: tuple[int, int] = (2048, 2048)
    fwhm_sci: float = 3.2          # px
    beta_sci: float = 3.0
    fwhm_ref: float = 2.4          # px
    beta_ref: float = 3.5
    depth: float = 4.0             # reference exposure / science exposure (= flux ratio F_r)
    sky: float = 400.0             # ADU/px in the science frame
    gradient: float = 0.04         # peak-to-peak fractional sky gradient
    gain: float = 1.5              # e-/ADU
    read_noise: float = 5.0        # e-
    saturation: float = 60000.0    # ADU
    shift: tuple[float, float] = (0.37, -0.23)  # science - reference pointing (px, x and y)
    n_stars: int = 4000
    star_flux: tuple[float, float] = (300.0, 3e6)   # ADU in the science frame, power law
    star_slope: float = 0.3        # dN/dm ~ 10^(slope m)
    n_galaxies: int = 300
    galaxy_flux: tuple[float, float] = (2e3, 1e5)   # ADU in the science frame
    n_inject: int = 1000
    snr_range: tuple[float, float] = (3.0, 20.0)
    on_galaxy: float = 0.3
    margin: int = 40               # px from the edges for injections
    stamp: int = 41                # px, PSF stamp side
    bright_stamp: int = 121        # px, stamp side of stars above 1e5 ADU (Moffat wings)


@dataclass
class Pair:
    """A synthetic science/reference pair with its truth: injections, stars, noise-free models and PSFs."""

    science: Frame
    reference: Frame
    inj_x: np.ndarray         # science px
    inj_y: np.ndarray
    inj_flux: np.ndarray      # ADU, science frame
    inj_snr: np.ndarray       # nominal optimal S/N, science frame alone
    inj_snr_eff: np.ndarray   # ZOGY S/N with reference noise (theory)
    inj_on_galaxy: np.ndarray
    star_x: np.ndarray        # science px
    star_y: np.ndarray
    star_flux: np.ndarray     # ADU, science frame
    sci_model: np.ndarray     # noise-free science frame (ADU) without the injections
    ref_model: np.ndarray
    psf_sci: np.ndarray       # true PSFs, centred stamps (stamp x stamp), sum 1
    psf_ref: np.ndarray


def _header(cfg: PairConfig, dx: float, dy: float, exptime: float, frame_id: str, mjd: float) -> fits.Header:
    ny, nx = cfg.shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [(nx + 1) / 2.0 + dx, (ny + 1) / 2.0 + dy]
    w.wcs.cd = np.array([[-1.0, 0.0], [0.0, 1.0]]) / 3600.0
    h = w.to_header()
    h.update({"TELESCOP": "BENCH", "FIELD": "SYN", "FILTER": "r", "MJD-OBS": mjd, "EXPTIME": exptime,
              "GAIN": cfg.gain, "RDNOISE": cfg.read_noise, "SATURATE": cfg.saturation, "FRAMEID": frame_id})
    return h


def _power_law(rng, n, lo, hi, slope):
    # dN/dm ~ 10^(a m)  <=>  dN/dF ~ F^(-1 - 2.5 a)
    a = -2.5 * slope
    u = rng.uniform(size=n)
    lo_a, hi_a = lo ** a, hi ** a
    return (lo_a + u * (hi_a - lo_a)) ** (1.0 / a)


def _render_points(img, x, y, flux, size, fwhm, beta):
    for lo, hi in ((0, len(x)),):
        for s in range(lo, hi, 2000):
            sl = slice(s, min(s + 2000, hi))
            dx, dy, flat, inside = stamp_indices(x[sl], y[sl], size, img.shape)
            st = moffat_stamps(dx, dy, size, fwhm, beta) * flux[sl, None, None]
            add_stamps(img, st, flat, inside)


def _scene(cfg, x, y, flux, gx, gy, gflux, gpar, fwhm, beta, scale):
    img = np.zeros(cfg.shape, np.float64)
    bright = flux > 1e5
    _render_points(img, x[~bright], y[~bright], flux[~bright] * scale, cfg.stamp, fwhm, beta)
    _render_points(img, x[bright], y[bright], flux[bright] * scale, cfg.bright_stamp, fwhm, beta)
    if len(gx):
        dx, dy, flat, inside = stamp_indices(gx, gy, 61, cfg.shape)
        st = _sersic_integrated(dx, dy, 61, gpar)
        kern = moffat_stamps(np.zeros(1), np.zeros(1), 21, fwhm, beta)[0]
        st = np.clip(fftconvolve(st, kern[None], mode="same", axes=(1, 2)), 0, None)
        st /= st.sum(axis=(1, 2), keepdims=True)
        add_stamps(img, st * (gflux * scale)[:, None, None], flat, inside)
    return img


def _sersic_integrated(dx, dy, size, gpar, over=5):
    """Pixel-integrated Sersic stamps: evaluated on an ``over``x finer grid and binned.

    Point-sampling a cuspy (n ~ 4, r_eff ~ 2 px) profile at pixel centres makes the galaxy depend on
    its sub-pixel phase, so the same galaxy would differ between two frames shifted by a fraction of
    a pixel -- a simulation artefact that looks like a PSF mismatch to any subtraction.
    """
    out = np.empty((len(dx), size, size))
    offs = (np.arange(over) + 0.5) / over - 0.5
    for s in range(0, len(dx), 50):
        sl = slice(s, s + 50)
        acc = 0.0
        for oy in offs:
            for ox in offs:
                acc = acc + sersic_stamps(dx[sl] - ox, dy[sl] - oy, size, *(g[sl] for g in gpar))
        out[sl] = acc
    return out / out.sum(axis=(1, 2), keepdims=True)


def _sky(cfg, scale):
    ny, nx = cfg.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    g = 1.0 + cfg.gradient * ((xx / nx + 0.5 * yy / ny) / 1.5 - 0.5)
    return cfg.sky * scale * g


def _snr_for_flux(flux, psf, bkg, gain, rn):
    """Optimal S/N of fluxes ``flux`` (n,) with PSF stamps (n, m) on backgrounds (n, m) ADU."""
    sig = flux[:, None] * psf
    var = gain * (bkg + sig) + rn * rn
    return np.sqrt(np.sum((gain * sig) ** 2 / var, axis=1))


def _zogy_snr(psf_n, psf_r, var_n, var_r, F_r):
    """S/N per unit flux of ZOGY for background variances var_n, var_r (n,) ADU^2."""
    pn = np.abs(np.fft.fft2(np.fft.ifftshift(psf_n))) ** 2
    pr = np.abs(np.fft.fft2(np.fft.ifftshift(psf_r))) ** 2
    npx = pn.size
    out = np.empty(len(var_n))
    for i, (vn, vr) in enumerate(zip(var_n, var_r, strict=True)):
        out[i] = np.sqrt(np.sum(pn * pr * F_r ** 2 / (vn * F_r ** 2 * pr + vr * pn)) / npx)
    return out


def make_pair(seed: int = 42, cfg: PairConfig = PairConfig()) -> Pair:
    """Build the pair (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    ny, nx = cfg.shape
    # static sky on the reference grid; science grid = reference grid + shift
    sx, sy = cfg.shift
    x = rng.uniform(-20, nx + 20, cfg.n_stars)
    y = rng.uniform(-20, ny + 20, cfg.n_stars)
    flux = _power_law(rng, cfg.n_stars, *cfg.star_flux, cfg.star_slope)
    gx = rng.uniform(20, nx - 20, cfg.n_galaxies)
    gy = rng.uniform(20, ny - 20, cfg.n_galaxies)
    gflux = _power_law(rng, cfg.n_galaxies, *cfg.galaxy_flux, cfg.star_slope)
    reff = rng.uniform(1.5, 6.0, cfg.n_galaxies)
    gpar = (reff, rng.uniform(0.5, 4.0, cfg.n_galaxies), rng.uniform(0, 0.6, cfg.n_galaxies),
            rng.uniform(0, np.pi, cfg.n_galaxies))
    psf_n = moffat_stamps(np.zeros(1), np.zeros(1), cfg.stamp, cfg.fwhm_sci, cfg.beta_sci)[0]
    psf_r = moffat_stamps(np.zeros(1), np.zeros(1), cfg.stamp, cfg.fwhm_ref, cfg.beta_ref)[0]
    ref_model = (_scene(cfg, x, y, flux, gx, gy, gflux, gpar, cfg.fwhm_ref, cfg.beta_ref, cfg.depth)
                 + _sky(cfg, cfg.depth))
    # science pixel p sees the reference pixel p - shift... the WCS of the science frame has its
    # CRPIX moved by +shift, i.e. a sky position at reference pixel q lies at science pixel q + shift
    xs_, ys_ = x + sx, y + sy
    sci_model = (_scene(cfg, xs_, ys_, flux, gx + sx, gy + sy, gflux, gpar, cfg.fwhm_sci, cfg.beta_sci, 1.0)
                 + _sky(cfg, 1.0))

    # injections: away from the edges, from each other, and from stars brighter than 2e4 ADU
    from scipy.spatial import cKDTree

    bright = cKDTree(np.column_stack([xs_[flux > 2e4], ys_[flux > 2e4]]))
    n_gal = int(round(cfg.on_galaxy * cfg.n_inject))
    px, py, ong = [], [], []
    hosts = list(rng.permutation(np.flatnonzero(gflux > 3e3)))
    n_gal = min(n_gal, len(hosts))
    while len(px) < cfg.n_inject:
        if len(px) < n_gal and hosts:
            j = hosts.pop()
            r = rng.uniform(0.2, 1.5) * reff[j]
            t = rng.uniform(0, 2 * np.pi)
            cx, cy, g = gx[j] + sx + r * np.cos(t), gy[j] + sy + r * np.sin(t), True
        else:
            cx, cy, g = rng.uniform(cfg.margin, nx - cfg.margin), rng.uniform(cfg.margin, ny - cfg.margin), False
        if not (cfg.margin < cx < nx - cfg.margin and cfg.margin < cy < ny - cfg.margin):
            n_gal -= g
            continue
        if bright.query_ball_point([cx, cy], 15.0) or (
                px and np.min(np.hypot(np.array(px) - cx, np.array(py) - cy)) < 20.0):
            n_gal -= g  # a host is tried once
            continue
        px.append(cx)
        py.append(cy)
        ong.append(g)
    px, py, ong = np.array(px), np.array(py), np.array(ong)
    snr = rng.uniform(*cfg.snr_range, cfg.n_inject)
    # flux for the target S/N (science frame alone, source noise included): bisection in log flux
    m = 15
    dx, dy, flat, inside = stamp_indices(px, py, 2 * m + 1, cfg.shape)
    ps = moffat_stamps(dx, dy, 2 * m + 1, cfg.fwhm_sci, cfg.beta_sci).reshape(len(px), -1)
    bkg = sci_model.reshape(-1)[flat].reshape(len(px), -1)
    lo, hi = np.full(len(px), 1.0), np.full(len(px), 1e6)
    for _ in range(60):
        mid = np.sqrt(lo * hi)
        s = _snr_for_flux(mid, ps, bkg, cfg.gain, cfg.read_noise)
        lo, hi = np.where(s < snr, mid, lo), np.where(s < snr, hi, mid)
    fl = np.sqrt(lo * hi)
    # theoretical ZOGY S/N: local background variances of both images at the source
    w = ps ** 2 / (ps ** 2).sum(axis=1, keepdims=True)
    var_n = (w * bkg).sum(axis=1) / cfg.gain + (cfg.read_noise / cfg.gain) ** 2
    dxr, dyr, flatr, _ = stamp_indices(px - sx, py - sy, 2 * m + 1, cfg.shape)
    bkg_r = ref_model.reshape(-1)[flatr].reshape(len(px), -1)
    var_r = (w * bkg_r).sum(axis=1) / cfg.gain + (cfg.read_noise / cfg.gain) ** 2
    bg_only_n = fl * np.sqrt((ps ** 2).sum(axis=1) / var_n)         # science alone, no source noise
    source_factor = snr / bg_only_n
    per_flux = _zogy_snr(psf_n, psf_r, var_n, var_r, cfg.depth)
    snr_eff = fl * per_flux * source_factor

    sci_true = sci_model.copy()
    add_stamps(sci_true, moffat_stamps(dx, dy, 2 * m + 1, cfg.fwhm_sci, cfg.beta_sci) * fl[:, None, None], flat, inside)
    sci = add_noise(sci_true, cfg.gain, cfg.read_noise, cfg.saturation, rng)
    ref = add_noise(ref_model, cfg.gain, cfg.read_noise, cfg.saturation, rng)
    hs = _header(cfg, sx, sy, 60.0, "SYN-sci", 60010.0)
    hr = _header(cfg, 0.0, 0.0, 60.0 * cfg.depth, "SYN-ref", 60000.0)
    science = Frame(meta_from_header(hs), sci, hs)
    reference = Frame(meta_from_header(hr), ref, hr)
    return Pair(science, reference, px, py, fl, snr, snr_eff, ong, xs_, ys_, flux, sci_model, ref_model,
                psf_n.astype(np.float32), psf_r.astype(np.float32))
