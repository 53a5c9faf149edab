"""Forced photometry at any position: the light curve of a place, not of a detected object.

ZTF's forced-photometry service answers "what was the flux here on every image?" for a position
the astronomer chooses (a host galaxy's nucleus, a known variable, a transient found elsewhere).
:func:`forced_light_curve` answers it from the difference images the pipeline keeps
(:class:`broker.diffstore.DifferenceStore`: the ``max_frames`` newest of each telescope, field and
band), with the PSF fit the alerts' own forced photometry uses (:func:`broker.detect.forced_flux`),
so a point here and a ``prv_forced_sources`` entry of an alert at the same place agree. It is
served by ``GET /api/v1/forced`` (the portal) and ``broker forced RA DEC``.

Each point is in its frame's difference flux (science ADU, on the frame's own zero point
``magzp``: telescopes are not cross-calibrated beyond their zero points, ``docs/telescopes.md``),
with a magnitude where the flux is a ``min_snr`` detection and the frame's 5-sigma limiting
magnitude always (when it has a zero point).
"""

from __future__ import annotations

import math

from broker.alert import MAG_PER_LN, limiting_magnitude
from broker.diffstore import DifferenceStore
from broker.errors import InvalidQuery


def check_position(ra: float, dec: float, start_mjd: float = -math.inf, end_mjd: float = math.inf) -> None:
    """InvalidQuery unless RA in [0, 360), Dec in [-90, 90] (deg) and ``start_mjd`` < ``end_mjd`` (NaN refused)."""
    if not (math.isfinite(ra) and 0.0 <= ra < 360.0 and math.isfinite(dec) and -90.0 <= dec <= 90.0):
        raise InvalidQuery(f"position out of range: ra={ra}, dec={dec} (ra in [0, 360), dec in [-90, 90] deg)")
    if math.isnan(start_mjd) or math.isnan(end_mjd) or not start_mjd < end_mjd:
        raise InvalidQuery(f"MJD range [{start_mjd}, {end_mjd}) is empty or not a range")


def with_magnitudes(point: dict, min_snr: float = 3.0) -> dict:
    """``point`` (a forced measurement) with ``snr``, ``mag``, ``mag_err`` and ``mag_limit``.

    ``snr`` is flux / flux_err; ``mag`` = magzp - 2.5 log10(flux) and ``mag_err`` = 1.0857 /
    snr where snr >= ``min_snr`` (else None: an upper limit); ``mag_limit`` the frame's 5-sigma
    limiting magnitude. Without a zero point every magnitude is None.
    """
    flux, err, zp = point["flux"], point["flux_err"], point.get("magzp")
    snr = flux / err if err > 0 and math.isfinite(flux) else None
    mag = mag_err = None
    if snr is not None and snr >= min_snr and zp is not None and math.isfinite(zp):
        mag, mag_err = zp - 2.5 * math.log10(flux), MAG_PER_LN / snr
    return {**point, "snr": snr, "mag": mag, "mag_err": mag_err,
            "mag_limit": limiting_magnitude(point.get("limiting_flux"), zp)}


def forced_light_curve(store: DifferenceStore, ra: float, dec: float, start_mjd: float = -math.inf,
                       end_mjd: float = math.inf, min_snr: float = 3.0) -> list[dict]:
    """Forced photometry at (``ra``, ``dec``) on every kept difference image that covers it, oldest first.

    Parameters
    ----------
    store : DifferenceStore
        The pipeline's kept difference images (``<state_dir>/diffs``).
    ra, dec : float
        The position (deg, ICRS).
    start_mjd, end_mjd : float
        Exposures that started in [``start_mjd``, ``end_mjd``) (MJD, days); default every kept one.
    min_snr : float
        Least S/N for a magnitude (else the point is an upper limit; default 3).

    Returns
    -------
    list of dict
        Per frame: ``telescope``, ``field``, ``frame_id``, ``filter``, ``mjd``, ``exptime`` (s),
        ``flux``, ``flux_err`` and ``limiting_flux`` (science ADU), ``magzp``, ``snr``, ``mag``,
        ``mag_err``, ``mag_limit`` (:func:`with_magnitudes`). Empty where no kept frame covers the
        position (or every one is masked there).

    Raises
    ------
    InvalidQuery
        A position off the sphere or not finite, an empty MJD range, or ``min_snr`` <= 0.
    """
    check_position(ra, dec, start_mjd, end_mjd)
    if not min_snr > 0:
        raise InvalidQuery(f"min_snr={min_snr} must be > 0")
    return [with_magnitudes(p, min_snr) for p in store.forced_at(ra, dec, start_mjd, end_mjd)]
