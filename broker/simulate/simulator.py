"""The simulated telescope: raw frames plus the truth of everything injected into them."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from typing import Iterator

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from broker.frame import Frame, meta_from_header
from broker.simulate import population as pop
from broker.simulate import render
from broker.simulate.config import SimConfig

KINDS = ("transient", "variable", "moving", "cosmic_ray", "hot_pixel", "hot_column", "satellite")
#: Longest diffraction-spike arm, px (``SimConfig.spike_strength``): bounds the spike stamps
#: (at most 401 px a side) whatever the star.
MAX_SPIKE_PX = 200


@dataclass(frozen=True)
class Injection:
    """One injected signal, as it is on one frame.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    x, y : float
        0-based pixel position on this frame (trails and columns: their midpoint).
    ra, dec : float
        Sky position, deg (for detector artifacts: where the WCS puts that pixel).
    flux : float
        ADU in this frame. Transients and variables: the change relative to the static sky
        (signed; a faded variable is negative). Artifacts: all ADU they deposit.
    snr : float
        Expected optimal S/N of ``flux`` on this frame (signed like ``flux``); see
        :func:`broker.simulate.render.optimal_snr`. Pixels hit by a cosmic ray, a hot pixel or
        column, or saturated carry no information about a source and are left out (every pipeline
        masks or interpolates them), so a transient under a cosmic ray has the S/N that is left.
    on_galaxy : bool
        Placed on a galaxy (offset from its nucleus).
    source_id : str
        Stable id, the same at every epoch for variables and moving objects.
    x0, y0, x1, y1 : float or None
        End points of trails, tracks and columns (px); None for compact sources.
    static_flux : float
        Variables: the star's constant flux in this frame (ADU), on which ``flux`` is the
        change; 0 for other kinds. A broken reference leaves a residual scaling with it.
    """

    kind: str
    x: float
    y: float
    ra: float
    dec: float
    flux: float
    snr: float
    on_galaxy: bool
    source_id: str
    x0: float | None = None
    y0: float | None = None
    x1: float | None = None
    y1: float | None = None
    static_flux: float = 0.0


@dataclass
class Truth:
    """Everything that went into one frame.

    Attributes
    ----------
    frame_id, field, filter : str
    epoch : int
    fwhm : float
        True seeing FWHM, px; ``beta``, ``psf_ellip``, ``psf_theta`` (rad) complete the Moffat PSF
        (:func:`broker.simulate.render.moffat_stamps`).
    injections : list of Injection
    mjd : float
        Exposure start, MJD.
    sky : float
        Mean sky level, ADU/px.
    visit : int
        0 for the scheduled frame of the epoch, v > 0 for a follow-up visit of it
        (:meth:`SkySimulator.frame`).
    """

    frame_id: str
    field: str
    filter: str
    epoch: int
    fwhm: float
    injections: list[Injection] = dc_field(default_factory=list)
    beta: float = 3.0
    psf_ellip: float = 0.0
    psf_theta: float = 0.0
    mjd: float = 0.0
    sky: float = 0.0
    visit: int = 0

    def of_kind(self, *kinds: str) -> list[Injection]:
        """The injections of the given kinds."""
        return [inj for inj in self.injections if inj.kind in kinds]

    def to_dict(self) -> dict:
        """JSON-serialisable dict (plain floats, ints, strings, lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Truth:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["injections"] = [Injection(**i) for i in d.get("injections", [])]
        return cls(**d)


class _Pending:
    """Injections whose S/N waits for the complete noise-free frame."""

    def __init__(self) -> None:
        self.items: list[tuple[dict, np.ndarray, np.ndarray]] = []

    def add(self, flat: np.ndarray, values: np.ndarray, **inj: object) -> None:
        self.items.append((inj, flat, values))

    def resolve(self, model: np.ndarray, lost: np.ndarray, gain: float, read_noise: float
                ) -> list[Injection]:
        flat_model, flat_lost = model.ravel(), lost.ravel()
        out = []
        for inj, flat, values in self.items:
            snr = render.optimal_snr(values, flat_model[flat].astype(np.float64), gain, read_noise,
                                     flat_lost[flat])
            out.append(Injection(snr=float(snr), **inj))
        return out


@dataclass(frozen=True)
class _Conditions:
    """Observing conditions of one frame.

    Attributes
    ----------
    fwhm, beta, ellip, theta : float
        Moffat PSF: FWHM (px), beta, ellipticity, position angle (rad).
    wcs : WCS
        The frame's WCS (jitter and rotation applied).
    mjd : float
        Exposure start (MJD).
    sky_level : float
        Mean sky (ADU/px).
    gradient_angle : float
        Direction of the sky gradient (rad).
    colour_term : float
        Colour coefficient of the filter.
    """

    fwhm: float
    beta: float
    ellip: float
    theta: float
    wcs: WCS
    mjd: float
    sky_level: float
    gradient_angle: float
    colour_term: float


@dataclass(frozen=True)
class _StarPixels:
    """The static stars on a frame: positions (px, shape (n,)) and mean fluxes (ADU)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray


@dataclass
class _Scene:
    header: fits.Header
    truth: Truth
    static: np.ndarray     # sky + stars at mean flux + galaxies, ADU
    changes: np.ndarray    # transients, variable-star changes, moving objects, ADU
    artifacts: np.ndarray  # cosmic rays, hot pixels/columns, satellite trails, ADU

    @property
    def model(self) -> np.ndarray:
        return self.static + self.changes + self.artifacts


class SkySimulator:
    """Seeded simulated telescope.

    ``frame(field, filter, epoch, visit)`` is a pure function of (seed, config, field, filter, epoch,
    visit).

    Parameters
    ----------
    config : SimConfig
    seed : int
    """

    def __init__(self, config: SimConfig = SimConfig(), seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self._fields: dict[str, tuple[pop.StaticSky, WCS]] = {}
        self._detector = pop.detector(config, seed)
        # nominal S/N -> flux table (mid-range seeing and sky), to place transients in snr range
        c = config
        psf = render.moffat_stamps([0.0], [0.0], c.stamp_size, float(np.mean(c.fwhm_range)),
                                   float(np.mean(c.beta_range)))[0].ravel()
        self._flux_grid = np.logspace(0, 8, 800)
        signal = self._flux_grid[:, None] * psf[None]
        self._snr_grid = render.optimal_snr(signal, signal + c.sky_level, c.gain, c.read_noise)

    # --- public API ------------------------------------------------------------------------
    def frame(self, field: str, filter: str, epoch: int, visit: int = 0,
              request_id: str | None = None) -> tuple[Frame, Truth]:
        """Raw frame and truth for (field, filter, epoch, visit); deterministic.

        Parameters
        ----------
        field, filter : str
        epoch : int
        visit : int
            0: the epoch's scheduled frame. v > 0: a follow-up visit of the same epoch, starting
            ``v * followup_gap_days`` after visit 0, with seeing, pointing, sky, noise and
            artifacts of its own; variable stars and moving objects as they are at its time,
            transients at the epoch's brightness. Its frame id ends in ``-v<visit>``.
        request_id : str, optional
            The follow-up request the visit serves: the header card ``FOLLOWUP`` (visits > 0 only).
        """
        if visit < 0:
            raise ValueError(f"visit must be >= 0, not {visit}")
        scene = self._render(field, filter, epoch, visit)
        c = self.config
        rng = pop.rng_for(self.seed, "noise", field, filter, epoch, *_visit_keys(visit))
        data = render.add_noise(scene.model, c.gain, c.read_noise, c.saturation, rng)
        if visit and request_id is not None:
            scene.header["FOLLOWUP"] = (request_id, "follow-up request served by this visit")
        return Frame(meta=meta_from_header(scene.header), data=data, header=scene.header), scene.truth

    def field_at(self, ra: float, dec: float, margin: float = 0.0) -> str | None:
        """The first field of the configuration whose nominal footprint holds (``ra``, ``dec``) (deg).

        ``margin`` (px) keeps that far inside the edges. None: no field covers it.
        """
        ny, nx = self.config.shape
        for name in self.config.fields:
            x, y = self._sky(name)[1].wcs_world2pix([ra], [dec], 0)
            if margin - 0.5 <= x[0] <= nx - 0.5 - margin and margin - 0.5 <= y[0] <= ny - 0.5 - margin:
                return name
        return None

    def frames(self, n: int) -> Iterator[tuple[Frame, Truth]]:
        """The first ``n`` frames, epoch-major: epoch 0 of every (field, filter), then epoch 1..."""
        order = ((f, b, e) for e in itertools.count() for f in self.config.fields
                 for b in self.config.filters)
        for field, filt, epoch in itertools.islice(order, n):
            yield self.frame(field, filt, epoch)

    def static_model(self, field: str, filter: str, epoch: int) -> np.ndarray:
        """Noise-free static scene on this frame's pixels.

        Noise-free static scene on this frame's pixels (ADU, float32, shape (ny, nx)): sky,
        stars at their mean (reference) flux and galaxies; no transients, variability, moving
        objects or artifacts. ``frame - static_model`` is noise plus every injection.
        """
        return self._render(field, filter, epoch).static

    def model(self, field: str, filter: str, epoch: int) -> np.ndarray:
        """Complete noise-free frame (ADU, float32, unclipped): the expectation of ``frame``."""
        return self._render(field, filter, epoch).model

    # --- rendering -------------------------------------------------------------------------
    def _sky(self, field: str) -> tuple[pop.StaticSky, WCS]:
        if field not in self._fields:
            sky = pop.static_sky(self.config, self.seed, field)
            self._fields[field] = (sky, pop.make_wcs(self.config, sky.ra, sky.dec))
        return self._fields[field]

    def _flux_for_snr(self, snr: np.ndarray | float) -> np.ndarray | float:
        return np.interp(snr, self._snr_grid, self._flux_grid)

    def _render(self, field: str, filter: str, epoch: int, visit: int = 0) -> _Scene:
        c = self.config
        sky, nominal = self._sky(field)
        rng = pop.rng_for(self.seed, "frame", field, filter, epoch, *_visit_keys(visit))
        cond = self._conditions(sky, rng, filter, epoch)
        if visit:  # the scheduled frame's start, then the gap: the visit's own draws, one clock
            start = self._conditions(sky, pop.rng_for(self.seed, "frame", field, filter, epoch), filter, epoch).mjd
            cond = dataclasses.replace(cond, mjd=start + visit * c.followup_gap_days)
        static, stars = self._static_scene(sky, cond)
        changes, pending = self._changes(field, epoch, sky, stars, nominal, cond)
        artifacts = np.zeros(c.shape, np.float32)
        lost = np.zeros(c.shape, bool)  # pixels without information: defects, cosmic rays
        self._artifacts(artifacts, lost, pending, rng, cond.wcs, cond.fwhm)
        frame_id = f"{c.telescope}-{field}-{filter}-{epoch:04d}" + (f"-v{visit}" if visit else "")
        header = self._header(cond, frame_id, field, filter, epoch)
        if visit:
            header["VISIT"] = (visit, "follow-up visit of the epoch (0: scheduled)")
        model = static + changes + artifacts
        lost |= model >= c.saturation
        truth = Truth(frame_id=frame_id, field=field, filter=filter, epoch=epoch, fwhm=float(cond.fwhm),
                      injections=pending.resolve(model, lost, c.gain, c.read_noise), beta=float(cond.beta),
                      psf_ellip=float(cond.ellip), psf_theta=float(cond.theta), mjd=float(cond.mjd),
                      sky=float(cond.sky_level), visit=visit)
        return _Scene(header=header, truth=truth, static=static, changes=changes, artifacts=artifacts)

    def _conditions(self, sky: pop.StaticSky, rng: np.random.Generator, filter: str, epoch: int) -> _Conditions:
        """The frame's seeing, pointing, time and sky, drawn from its generator in a fixed order."""
        c = self.config
        fwhm, beta = rng.uniform(*c.fwhm_range), rng.uniform(*c.beta_range)
        pe, pth = rng.uniform(0.0, c.psf_max_ellip), rng.uniform(0.0, np.pi)
        jx, jy = rng.uniform(-c.jitter, c.jitter, 2)
        wcs = pop.make_wcs(c, sky.ra, sky.dec, jx, jy, rng.uniform(-c.max_rotation, c.max_rotation))
        mjd = c.mjd_start + epoch * c.cadence + rng.uniform(0.0, c.mjd_scatter)
        level = c.sky_level * (1.0 + rng.uniform(-c.sky_variation, c.sky_variation))
        phi = rng.uniform(0.0, 2 * np.pi)
        return _Conditions(fwhm, beta, pe, pth, wcs, mjd, level, phi, c.colour_term(filter))

    def _psf_stamps(self, cond: _Conditions, x: np.ndarray, y: np.ndarray, size: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Moffat stamps of the frame's PSF at (x, y), with their indices.

        Moffat stamps of the frame's PSF at (x, y) (px), with their flat indices and in-frame flags
        (:func:`broker.simulate.render.stamp_indices`).
        """
        dx, dy, flat, inside = render.stamp_indices(x, y, size, self.config.shape)
        return render.moffat_stamps(dx, dy, size, cond.fwhm, cond.beta, cond.ellip, cond.theta), flat, inside

    def _static_scene(self, sky: pop.StaticSky, cond: _Conditions) -> tuple[np.ndarray, _StarPixels]:
        """The static scene: sky, stars and galaxies, and where the stars fall.

        Sky with its gradient, stars at their mean flux and PSF-convolved galaxies (ADU, float32),
        and where the stars fall.
        """
        c = self.config
        ny, nx = c.shape
        yy, xx = np.ogrid[0:ny, 0:nx]
        phi = cond.gradient_angle
        static = (cond.sky_level * (1.0 + c.sky_gradient * ((xx / nx - 0.5) * np.cos(phi)
                                                            + (yy / ny - 0.5) * np.sin(phi)))).astype(np.float32)
        # stars at their mean flux; bright ones on bigger stamps for their wings
        sx, sy = cond.wcs.wcs_world2pix(sky.star_ra, sky.star_dec, 0)
        sflux = 10 ** (-0.4 * (sky.star_mag + cond.colour_term * sky.star_colour - c.magzp))
        for bright in (False, True):
            size = c.bright_stamp_size if bright else c.stamp_size
            sel = ((sflux > c.bright_flux) == bright) & _near_frame(sx, sy, c.shape, size // 2)
            stamps, flat, inside = self._psf_stamps(cond, sx[sel], sy[sel], size)
            render.add_stamps(static, stamps * sflux[sel, None, None], flat, inside)
        if c.spike_strength > 0:
            self._add_spikes(static, sx, sy, sflux, cond)
        self._add_galaxies(static, sky, cond)
        return static, _StarPixels(sx, sy, sflux)

    def _add_spikes(self, image: np.ndarray, sx: np.ndarray, sy: np.ndarray, sflux: np.ndarray,
                    cond: _Conditions) -> None:
        """Diffraction spikes of the stars above ``bright_flux``, added to ``image`` (ADU).

        The arms run until they fall under 0.2 sky sigma a pixel (at most :data:`MAX_SPIKE_PX`).
        """
        c = self.config
        sel = (sflux > c.bright_flux) & _near_frame(sx, sy, c.shape, MAX_SPIKE_PX)
        if not sel.any():
            return
        sigma = cond.fwhm / 2.3548
        top = sflux[sel].max() * c.spike_strength / (2 * np.pi * sigma ** 2)
        reach = cond.fwhm * ((top / (0.2 * np.sqrt(cond.sky_level))) ** (2 / 3) - 1.0)
        size = 2 * int(np.clip(reach, 2, MAX_SPIKE_PX)) + 1
        x, y, f = sx[sel], sy[sel], sflux[sel]
        for i in range(0, len(f), 16):  # bounded memory: 16 stamps of up to 401^2 px at a time
            sl = slice(i, i + 16)
            dx, dy, flat, inside = render.stamp_indices(x[sl], y[sl], size, c.shape)
            arms = render.spike_stamps(dx, dy, size, cond.fwhm, c.spike_strength,
                                       np.deg2rad(c.spike_angle))
            render.add_stamps(image, arms * f[sl, None, None].astype(np.float32), flat, inside)

    def _add_galaxies(self, image: np.ndarray, sky: pop.StaticSky, cond: _Conditions) -> None:
        """Sersic stamps convolved with the frame's PSF, added to ``image`` (ADU)."""
        c = self.config
        gx, gy = cond.wcs.wcs_world2pix(sky.gal_ra, sky.gal_dec, 0)
        gs = c.galaxy_stamp_size
        sel = _near_frame(gx, gy, c.shape, gs // 2)
        dx, dy, flat, inside = render.stamp_indices(gx[sel], gy[sel], gs, c.shape)
        gal = render.sersic_stamps(dx, dy, gs, sky.gal_reff[sel] / c.pixel_scale, sky.gal_n[sel],
                                   sky.gal_ellip[sel], sky.gal_theta[sel])
        kernel = render.moffat_stamps([0.0], [0.0], c.stamp_size, cond.fwhm, cond.beta, cond.ellip, cond.theta)[0]
        gflux = 10 ** (-0.4 * (sky.gal_mag[sel] + cond.colour_term * sky.gal_colour[sel] - c.magzp))
        render.add_stamps(image, render.convolve_stamps(gal, kernel) * gflux[:, None, None], flat, inside)

    def _changes(self, field: str, epoch: int, sky: pop.StaticSky, stars: _StarPixels, nominal: WCS,
                 cond: _Conditions) -> tuple[np.ndarray, _Pending]:
        """Transients, variable-star changes and moving objects, and their pending injections.

        Transients, variable-star changes and moving objects (ADU, float32), all point sources
        rendered in one batch of PSF stamps, and their pending injections.
        """
        c = self.config
        ct = cond.colour_term
        changes = np.zeros(c.shape, np.float32)
        pending = _Pending()
        rows = [dict(kind="transient", ra=ra, dec=dec, flux=flux, on_galaxy=on_gal, source_id=sid,
                     static_flux=0.0)
                for ra, dec, flux, sid, on_gal in self._transients(field, epoch, ct, nominal)]
        rows += self._variables(field, sky, stars, cond.mjd)
        rows += [dict(kind="moving", ra=ra, dec=dec, flux=flux, on_galaxy=False, source_id=sid,
                      static_flux=0.0)
                 for ra, dec, flux, sid in self._moving(field, cond.mjd, ct, nominal)]
        if rows:  # all point-source changes in one batch of PSF stamps, then recorded one by one
            x, y = cond.wcs.wcs_world2pix([r["ra"] for r in rows], [r["dec"] for r in rows], 0)
            stamps, flat, inside = self._psf_stamps(cond, x, y, c.stamp_size)
            values = stamps * np.array([r["flux"] for r in rows])[:, None, None]
            render.add_stamps(changes, values, flat, inside)
            for k, r in enumerate(rows):
                pending.add(flat[k][inside[k]], values[k][inside[k]], x=float(x[k]),
                            y=float(y[k]), **r)
        return changes, pending

    def _variables(self, field: str, sky: pop.StaticSky, stars: _StarPixels, mjd: float) -> list[dict]:
        """Injection rows of the variable stars inside the frame: their flux change at ``mjd`` (ADU)."""
        rows = []
        sflux = stars.flux
        for k, i in enumerate(sky.var_index):
            dflux = sflux[i] * sky.var_amp[k] * np.sin(2 * np.pi * mjd / sky.var_period[k]
                                                       + sky.var_phase[k])
            if _near_frame(stars.x[i:i + 1], stars.y[i:i + 1], self.config.shape, -2)[0]:
                rows.append(dict(kind="variable", ra=float(sky.star_ra[i]),
                                 dec=float(sky.star_dec[i]), flux=float(dflux), on_galaxy=False,
                                 source_id=f"{field}-V{k:04d}", static_flux=float(sflux[i])))
        return rows

    def _header(self, cond: _Conditions, frame_id: str, field: str, filter: str, epoch: int) -> fits.Header:
        """The frame's FITS header: its WCS and the cards :func:`broker.frame.meta_from_header` reads."""
        c = self.config
        header = cond.wcs.to_header()
        for key, value, comment in (
            ("TELESCOP", c.telescope, "simulated telescope"), ("FIELD", field, "field name"),
            ("FILTER", filter, "filter"), ("MJD-OBS", cond.mjd, "exposure start (MJD, UTC)"),
            ("EXPTIME", c.exptime, "[s] exposure time"), ("GAIN", c.gain, "[e-/ADU]"),
            ("RDNOISE", c.read_noise, "[e-] read noise"), ("SATURATE", c.saturation, "[ADU]"),
            ("MAGZP", c.magzp, "[mag] source giving 1 ADU in the exposure"),
            ("FRAMEID", frame_id, "unique frame id"), ("SEEING", cond.fwhm, "[px] true FWHM"),
            ("EPOCH", epoch, "simulation epoch"),
        ):
            header[key] = (value, comment)
        return header

    def _transients(self, field: str, epoch: int, ct: float, nominal: WCS
                    ) -> Iterator[tuple[float, float, float, str, bool]]:
        """(ra, dec, flux ADU, id, on_galaxy) of the transients visible at ``epoch``."""
        c = self.config
        if epoch < c.reference_epochs or c.n_transients <= 0:
            return
        sky, _ = self._sky(field)
        ny, nx = c.shape
        m = c.edge_margin
        gx, gy = nominal.wcs_world2pix(sky.gal_ra, sky.gal_dec, 0)
        inside = (gx > m) & (gx < nx - 1 - m) & (gy > m) & (gy < ny - 1 - m)
        hosts = np.flatnonzero(inside & (sky.gal_mag < c.host_max_mag))
        if len(hosts) == 0:  # small test frames may hold no bright galaxy: take any
            hosts = np.flatnonzero(inside)
        # transients alive together have consecutive serial numbers, so taking hosts in the order
        # of a per-field permutation gives each a galaxy of its own (no blended pairs in the truth)
        # as long as the frame has at least n_transients hosts
        hosts = pop.rng_for(self.seed, "hosts", field).permutation(hosts)
        life = max(c.transient_lifetime, 1)
        first = epoch - life + 1
        serial = (sum(pop.transients_born(c, b) for b in range(0, first)) if first >= 0
                  else -sum(pop.transients_born(c, b) for b in range(first, 0)))
        for birth in range(first, epoch + 1):
            rng = pop.rng_for(self.seed, "transient", field, str(birth))
            for j in range(pop.transients_born(c, birth)):
                snr = pop.transient_light_curve(rng, life, c.transient_snr_range)[epoch - birth]
                colour = rng.uniform(*c.colour_range)
                on_gal = len(hosts) > 0 and rng.uniform() < c.transient_on_galaxy
                if on_gal:
                    h = hosts[serial % len(hosts)]
                    r = sky.gal_reff[h] / c.pixel_scale * rng.uniform(0.2, 1.5)
                    ang = rng.uniform(0, 2 * np.pi)
                    x = np.clip(gx[h] + r * np.cos(ang), m, nx - 1 - m)
                    y = np.clip(gy[h] + r * np.sin(ang), m, ny - 1 - m)
                else:
                    x, y = rng.uniform(m, nx - 1 - m), rng.uniform(m, ny - 1 - m)
                serial += 1
                ra, dec = nominal.wcs_pix2world([x], [y], 0)
                flux = float(self._flux_for_snr(snr)) * 10 ** (-0.4 * ct * colour)
                yield float(ra[0]), float(dec[0]), flux, f"{field}-T{birth:04d}-{j:02d}", bool(on_gal)

    def _moving(self, field: str, mjd: float, ct: float, nominal: WCS
                ) -> Iterator[tuple[float, float, float, str]]:
        """The moving objects at ``mjd``.

        (ra, dec, flux ADU, id) of the moving objects at ``mjd``: straight tracks that wrap
        around the field, so each frame holds ``n_moving`` of them.
        """
        c = self.config
        ny, nx = c.shape
        m = c.edge_margin
        for k in range(c.n_moving):
            rng = pop.rng_for(self.seed, "moving", field, k)
            x0, y0 = rng.uniform(0, nx - 2 * m), rng.uniform(0, ny - 2 * m)
            speed, ang = rng.uniform(*c.moving_speed_range) / c.pixel_scale, rng.uniform(0, 2 * np.pi)
            snr, colour = rng.uniform(*c.transient_snr_range), rng.uniform(*c.colour_range)
            t = mjd - c.mjd_start
            x = m + (x0 + speed * t * np.cos(ang)) % (nx - 1 - 2 * m)
            y = m + (y0 + speed * t * np.sin(ang)) % (ny - 1 - 2 * m)
            ra, dec = nominal.wcs_pix2world([x], [y], 0)
            flux = float(self._flux_for_snr(snr)) * 10 ** (-0.4 * ct * colour)
            yield float(ra[0]), float(dec[0]), flux, f"{field}-M{k:04d}"

    def _artifacts(self, image: np.ndarray, lost: np.ndarray, pending: _Pending,
                   rng: np.random.Generator, wcs: WCS, fwhm: float) -> None:
        """Cosmic rays, hot pixels and columns, satellite trail: not PSF-convolved, recorded.

        The pixels of all but the (smooth) trail are marked in ``lost``.
        """
        c = self.config
        ny, nx = c.shape
        flat_img, flat_lost = image.reshape(-1), lost.reshape(-1)

        def record(kind: str, flat: np.ndarray, values: np.ndarray, x: float, y: float, sid: str,
                   ends: tuple[float, float, float, float] | None = None) -> None:
            np.add.at(flat_img, flat, values.astype(np.float32))
            if kind != "satellite":
                flat_lost[flat] = True
            ra, dec = wcs.wcs_pix2world([x], [y], 0)
            x0, y0, x1, y1 = ends if ends else (None,) * 4
            pending.add(flat, values, kind=kind, x=float(x), y=float(y), ra=float(ra[0]),
                        dec=float(dec[0]), flux=float(values.sum()), on_galaxy=False,
                        source_id=sid, x0=x0, y0=y0, x1=x1, y1=y1)

        det = self._detector
        for k, (x, y, rate) in enumerate(zip(det.hot_x, det.hot_y, det.hot_rate, strict=True)):
            record("hot_pixel", np.array([y * nx + x]), np.array([rate * c.exptime]), x, y,
                   f"{c.telescope}-H{k:04d}")
        for k, (x, y0, rate) in enumerate(zip(det.col_x, det.col_y0, det.col_rate, strict=True)):
            rows = np.arange(y0, ny)
            record("hot_column", rows * nx + x, np.full(len(rows), rate * c.exptime), x,
                   (y0 + ny - 1) / 2, f"{c.telescope}-C{k:04d}", (float(x), float(y0), float(x), ny - 1.0))
        neighbours = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if i or j])
        for k in range(rng.poisson(c.n_cosmic_rays)):
            cx, cy = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
            ends = None
            if rng.uniform() < c.cosmic_ray_track_fraction:
                length, ang = rng.uniform(3, 15), rng.uniform(0, np.pi)
                s = np.arange(-length / 2, length / 2 + 0.5, 0.5)
                px, py = cx + s * np.cos(ang), cy + s * np.sin(ang)
                ends = (float(px[0]), float(py[0]), float(px[-1]), float(py[-1]))
            else:
                extra = neighbours[rng.choice(8, rng.integers(0, 4), replace=False)]
                px, py = cx + np.r_[0, extra[:, 0]], cy + np.r_[0, extra[:, 1]]
            ix = np.clip(np.rint(px), 0, nx - 1).astype(int)
            iy = np.clip(np.rint(py), 0, ny - 1).astype(int)
            flat = np.unique(iy * nx + ix)
            record("cosmic_ray", flat, rng.uniform(*c.cosmic_ray_adu_range, len(flat)), cx, cy,
                   f"CR{k:04d}", ends)
        if rng.uniform() < c.satellite_probability:
            # enter through the left edge, leave through the right (or bottom to top)
            a, b = rng.uniform(0, 1, 2)
            if rng.uniform() < 0.5:
                x0, y0, x1, y1 = 0.0, a * (ny - 1), nx - 1.0, b * (ny - 1)
            else:
                x0, y0, x1, y1 = a * (nx - 1), 0.0, b * (nx - 1), ny - 1.0
            flat, values = render.line_profile(c.shape, x0, y0, x1, y1, fwhm / 2.3548,
                                               rng.uniform(*c.satellite_adu_range))
            record("satellite", flat, values, (x0 + x1) / 2, (y0 + y1) / 2, "SAT0000",
                   (x0, y0, x1, y1))


def _visit_keys(visit: int) -> tuple[str | int, ...]:
    """Extra generator keys of a visit: none for visit 0 (its frames stay as they always were)."""
    return ("visit", visit) if visit else ()


def _near_frame(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], pad: int) -> np.ndarray:
    """Whether (x, y) lies within ``pad`` px of the frame (negative pad: that far inside)."""
    return (x > -pad - 0.5) & (x < shape[1] - 0.5 + pad) & (y > -pad - 0.5) & (y < shape[0] - 0.5 + pad)
