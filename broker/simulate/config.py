"""Configuration of the simulated telescope and sky.

Defaults describe a 1 m-class robotic telescope with a 2k x 2k CCD at 1"/px, observing a
high-latitude field in r for 60 s under ordinary seeing; where a number comes from is noted next
to it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimConfig:
    """Everything the :class:`~broker.simulate.SkySimulator` draws from.

    Ranges are ``(low, high)`` tuples drawn uniformly unless said otherwise.

    Attributes
    ----------
    shape : (int, int)
        Detector size (ny, nx), px. 2k x 2k: a common small-telescope CCD.
    pixel_scale : float
        arcsec/px. 1"/px samples 1.6-3.2" seeing at about Nyquist.
    fields : tuple of str
        Field names; each has its own sky position (:func:`field_centre`) and star catalogue.
    filters : tuple of str
        Filter names; stars get a per-filter colour term from ``colour_terms``.
    telescope : str
        ``TELESCOP`` card; also seeds the detector's hot pixels and columns.
    exptime : float
        Exposure time, s.
    gain : float
        e-/ADU. 1.5 is typical of a modern CCD read at ~16 bit.
    read_noise : float
        Read noise, e- RMS (typical CCD: 3-10 e-).
    saturation : float
        ADU; pixels are clipped here (below the 16-bit ADC limit 65535, as full well usually is).
    magzp : float
        Zero point, mag of a source giving 1 ADU in the exposure. 27.5 puts a 400 ADU/px sky at
        ~21 mag/arcsec^2, dark-time r-band sky.
    sky_level : float
        Mean sky, ADU/px, before the per-frame variation.
    sky_variation : float
        Fractional frame-to-frame sky change (uniform within +-), e.g. moon and airmass.
    sky_gradient : float
        Peak-to-peak fractional sky gradient across the frame (scattered light).
    cadence : float
        Days between epochs; each frame also gets up to ``mjd_scatter`` days of scheduling jitter.
    mjd_start : float
        MJD of epoch 0.
    mjd_scatter : float
        Days, uniform scheduling scatter added to each frame's start.
    followup_gap_days : float
        Days between the visits of one epoch: visit v > 0 (a follow-up visit,
        ``SkySimulator.frame(..., visit=v)``) starts ``v * followup_gap_days`` after visit 0. Default
        0.02 d (~29 min): the next slot of a robotic telescope's queue after a 60 s frame, long
        enough for moving objects to move (20-200 arcsec/day: 0.4-4 arcsec) and short enough that
        a transient keeps the brightness of its epoch.
    n_stars : int
        Stars per field (over the frame footprint). A few thousand: high Galactic latitude to r~22.
    star_mag_range : (float, float)
        Magnitude limits of the star catalogue (in the reference filter, r).
    star_count_slope : float
        Slope a of the luminosity function dN/dm ~ 10^(a m); 0.3 matches Galactic star counts at
        faint magnitudes.
    colour_range : (float, float)
        Per-star colour (g-r like), mag.
    colour_terms : tuple of (str, float)
        Per-filter colour coefficient c: m_filter = m_r + c * colour. Unlisted filters use 0.
    n_galaxies : int
        Galaxies per field, rendered as PSF-convolved Sersic profiles.
    galaxy_mag_range : (float, float)
        Total magnitude of galaxies.
    galaxy_reff_range : (float, float)
        Effective (half-light) radius, arcsec.
    galaxy_n_range : (float, float)
        Sersic index (0.5 Gaussian-like, 1 exponential disc, 4 de Vaucouleurs).
    galaxy_max_ellip : float
        Maximum ellipticity 1 - b/a.
    fwhm_range : (float, float)
        Seeing FWHM, px, drawn per frame.
    beta_range : (float, float)
        Moffat beta, per frame (2.5-4.5 brackets measured atmospheric PSFs; 4.765 is Kolmogorov).
    psf_max_ellip : float
        Maximum PSF ellipticity (tracking/wind shake), per frame.
    jitter : float
        Pointing jitter, px: CRPIX shifts uniformly within +-jitter on each axis.
    max_rotation : float
        Maximum field rotation, deg, per frame.
    reference_epochs : int
        Epochs 0..reference_epochs-1 are reference material: transients only appear at or after
        this epoch (variables and moving objects are present at every epoch).
    n_transients : int
        Transients visible in each frame at epoch >= reference_epochs.
    transient_lifetime : int
        Epochs a transient stays visible (its light curve spans them).
    transient_snr_range : (float, float)
        Target optimal S/N of a transient (and a moving object) under nominal seeing and sky; the
        recorded per-frame S/N differs as seeing and sky change.
    transient_on_galaxy : float
        Fraction of transients placed on a galaxy, offset from its nucleus by 0.2-1.5 r_eff.
    host_max_mag : float
        Only galaxies brighter than this (r, mag) host transients, so that hosts are visible.
    n_variables : int
        Variable stars per field, chosen from the static catalogue.
    variable_mag_range : (float, float)
        Magnitude range the variables are chosen from (well detected, unsaturated).
    variable_bright_cap : (float, float) or None
        (mag, fraction): of the stars brighter than ``mag``, at most ``fraction`` vary; the rest
        of the ``n_variables`` come from the fainter part of ``variable_mag_range`` (no fallback
        to stars outside it). The brightest unsaturated stars are the ones a pipeline measures
        the flux ratio F_r on, and in the real sky few of them vary: with half of them variable
        (many variables packed into a field to make training data cheaply) F_r is up to 3 %
        wrong, leaving every constant star a residual of that size. None (default): variables
        are drawn uniformly from the range.
    variable_amplitude_range : (float, float)
        Fractional semi-amplitude of the sinusoidal flux variation.
    variable_period_range : (float, float)
        Period, days.
    n_moving : int
        Moving objects (asteroids) in each frame.
    moving_speed_range : (float, float)
        Sky speed, arcsec/day (slow, distant objects, so that each stays a point source).
    n_cosmic_rays : float
        Mean number of cosmic-ray hits per frame (Poisson).
    cosmic_ray_adu_range : (float, float)
        ADU deposited per affected pixel.
    cosmic_ray_track_fraction : float
        Fraction of hits that are short tracks (3-15 px) rather than 1-4 px clusters.
    n_hot_pixels : int
        Hot pixels of the detector (fixed in detector coordinates per telescope).
    hot_pixel_rate_range : (float, float)
        Dark current of a hot pixel, ADU/s.
    n_hot_columns : int
        Hot columns of the detector (fixed per telescope), running from a defect to the top.
    hot_column_rate_range : (float, float)
        Dark current along a hot column, ADU/s/px.
    satellite_probability : float
        Probability that a frame holds a satellite trail.
    satellite_adu_range : (float, float)
        Trail brightness, ADU per px of trail length.
    stamp_size : int
        Side of the PSF stamps, px (odd); ``bright_stamp_size`` for stars above ``bright_flux``
        ADU, whose Moffat wings still matter at larger radii.
    bright_stamp_size : int
    bright_flux : float
    spike_strength : float
        Diffraction spikes of the secondary's support vanes on stars above ``bright_flux`` ADU:
        four arms whose brightness where they leave the star is this fraction of the star's
        (unsaturated) central pixel, falling as (FWHM / (r + FWHM))^1.5 along the arm
        (:func:`~broker.simulate.render.spike_stamps`). Default 0: none (a refractor or an
        off-axis telescope).
    spike_angle : float
        Position angle of the first arm on the detector, deg (spikes are fixed to the telescope,
        not to the sky). Default 0: along the columns and rows.
    galaxy_stamp_size : int
        Side of the Sersic stamps, px (odd).
    edge_margin : int
        Transients and moving objects keep this far from the frame edges, px.
    """

    shape: tuple[int, int] = (2048, 2048)
    pixel_scale: float = 1.0
    fields: tuple[str, ...] = ("F001", "F002")
    filters: tuple[str, ...] = ("r",)
    telescope: str = "SIM1"
    exptime: float = 60.0
    gain: float = 1.5
    read_noise: float = 5.0
    saturation: float = 60000.0
    magzp: float = 27.5
    sky_level: float = 400.0
    sky_variation: float = 0.15
    sky_gradient: float = 0.04
    cadence: float = 1.0
    mjd_start: float = 60000.0
    mjd_scatter: float = 0.1
    followup_gap_days: float = 0.02
    n_stars: int = 3000
    star_mag_range: tuple[float, float] = (12.0, 22.5)
    star_count_slope: float = 0.3
    colour_range: tuple[float, float] = (0.0, 1.4)
    colour_terms: tuple[tuple[str, float], ...] = (("u", 2.0), ("g", 1.0), ("r", 0.0),
                                                   ("i", -0.4), ("z", -0.6))
    n_galaxies: int = 300
    galaxy_mag_range: tuple[float, float] = (15.5, 21.0)
    galaxy_reff_range: tuple[float, float] = (1.5, 6.0)
    galaxy_n_range: tuple[float, float] = (0.5, 4.0)
    galaxy_max_ellip: float = 0.6
    fwhm_range: tuple[float, float] = (1.6, 3.2)
    beta_range: tuple[float, float] = (2.5, 4.5)
    psf_max_ellip: float = 0.08
    jitter: float = 1.5
    max_rotation: float = 0.03
    reference_epochs: int = 3
    n_transients: int = 12
    transient_lifetime: int = 3
    transient_snr_range: tuple[float, float] = (5.0, 40.0)
    transient_on_galaxy: float = 0.3
    host_max_mag: float = 19.0
    n_variables: int = 20
    variable_mag_range: tuple[float, float] = (15.0, 19.0)
    variable_bright_cap: tuple[float, float] | None = None
    variable_amplitude_range: tuple[float, float] = (0.05, 0.5)
    variable_period_range: tuple[float, float] = (1.5, 10.0)
    n_moving: int = 3
    moving_speed_range: tuple[float, float] = (20.0, 200.0)
    n_cosmic_rays: float = 150.0
    cosmic_ray_adu_range: tuple[float, float] = (300.0, 8000.0)
    cosmic_ray_track_fraction: float = 0.3
    n_hot_pixels: int = 40
    hot_pixel_rate_range: tuple[float, float] = (5.0, 500.0)
    n_hot_columns: int = 2
    hot_column_rate_range: tuple[float, float] = (1.0, 5.0)
    satellite_probability: float = 0.1
    satellite_adu_range: tuple[float, float] = (150.0, 3000.0)
    stamp_size: int = 31
    bright_stamp_size: int = 81
    bright_flux: float = 2e5
    spike_strength: float = 0.0
    spike_angle: float = 0.0
    galaxy_stamp_size: int = 49
    edge_margin: int = 20

    def colour_term(self, filter: str) -> float:
        """Colour coefficient of ``filter`` (0 for filters not in ``colour_terms``)."""
        return dict(self.colour_terms).get(filter, 0.0)
