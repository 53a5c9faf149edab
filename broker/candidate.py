"""A candidate: one >= 5 sigma source on a difference image, with everything later stages add.

Positions are 0-based pixel coordinates of the science frame (x = column, y = row). Fluxes are in
ADU of the science frame (the reference is scaled to it); magnitudes exist only when the frame has
a zero point (``MAGZP``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Side of the square cutouts (px); 63 like ZTF and braai.
CUTOUT_SIZE = 63


@dataclass
class Detection:
    """Measurements of one candidate made by subtract+detect.

    Attributes
    ----------
    x, y : float
        Centroid on the science frame (px, 0-based).
    ra, dec : float
        Sky position (deg, ICRS) from the science WCS.
    flux, flux_err : float
        PSF-fit flux on the difference image and its 1-sigma error (ADU, science scale);
        negative for sources that faded.
    snr : float
        flux / flux_err (signed).
    scorr : float
        Peak of the corrected ZOGY score image S_corr (sigma, signed).
    fwhm : float
        FWHM of the difference-image footprint (px).
    elongation : float
        Major/minor axis ratio (>= 1).
    dipole : float
        Fraction of |flux| in the footprint of the opposite sign, in [0, 1]
        (0 = clean point source, ~1 = dipole from misalignment or PSF mismatch).
    n_bad : int
        Masked/saturated/NaN pixels within the 5x5 px footprint.
    ref_dist : float
        Distance to the nearest source in the reference image (arcsec); +inf when none.
    ref_flux : float
        Flux of that reference source (ADU, science scale); 0 when none.
    x_err, y_err : float
        1-sigma errors of x and y (px) from the PSF fit on D and its noise (the inverse Fisher
        matrix of the fit); NaN when not measured (batches written as ``candidates/v1``).
    ra_err, dec_err : float
        1-sigma errors along RA (of ``ra cos(dec)``) and Dec (arcsec), x_err and y_err taken through
        the WCS's local pixel scale matrix; statistical only. NaN when not measured.
    ref_extended : float
        Whether the nearest reference source within 1 FWHM of the candidate is extended: 1.0 (its
        light is less concentrated than the PSF's), 0.0 (point-like: a star under the candidate),
        NaN when no reference source lies within 1 FWHM or it was not measured
        (:func:`broker.detect.reference_context`).
    host_ra, host_dec : float
        Centre of the host galaxy on the reference (deg, ICRS): the extended reference source whose
        light the candidate sits on, else the nearest one within ``DetectConfig.host_radius_arcsec``;
        NaN when none (or not measured).
    host_dist : float
        Candidate-to-host-centre distance (arcsec); NaN without host.
    host_size : float
        Host size: PSF-deconvolved rms radius of its light along its major axis (arcsec; about the
        half-light radius of an exponential disc); NaN without host.
    host_flux : float
        Host flux above the detection isophote on the reference (ADU, science scale); NaN without host.
    """

    x: float
    y: float
    ra: float
    dec: float
    flux: float
    flux_err: float
    snr: float
    scorr: float
    fwhm: float
    elongation: float
    dipole: float
    n_bad: int
    ref_dist: float
    ref_flux: float
    x_err: float = float("nan")
    y_err: float = float("nan")
    ra_err: float = float("nan")
    dec_err: float = float("nan")
    ref_extended: float = float("nan")
    host_ra: float = float("nan")
    host_dec: float = float("nan")
    host_dist: float = float("nan")
    host_size: float = float("nan")
    host_flux: float = float("nan")


@dataclass(frozen=True)
class ObjectSummary:
    """An object as seen by one detection (for the alert's ``object`` record).

    Attributes
    ----------
    object_id : str
    ra, dec : float
        Mean position of its detections (deg).
    ndet : int
        Detections up to and including this one.
    first_mjd : float
        First detection, MJD (days).
    """

    object_id: str
    ra: float
    dec: float
    ndet: int
    first_mjd: float


@dataclass
class Candidate:
    """A detection with its cutouts and the scores later stages add.

    Attributes
    ----------
    cand_id : str
        ``<frame_id>/<index>``: unique and stable across re-processing.
    detection : Detection
    science, reference, difference : ndarray, shape (63, 63), float32
        Cutouts centred on the candidate; NaN where outside the frame.
    rb : float or None
        Real/bogus score in [0, 1] (classify stage).
    anomaly : float or None
        Anomaly score in [0, 1] (score stage).
    obj : ObjectSummary or None
        Object this detection was associated with (score stage).
    history : list of dict
        Previous detections of that object (score stage): ``cand_id``, ``mjd``, ``filter``, ``ra``,
        ``dec``, ``flux``, ``flux_err``, ``snr``, ``rb``, ``magzp`` and ``limiting_flux`` (ADU of
        that frame; None when unknown).
    forced : list of dict
        Forced photometry at this candidate's position on the difference images of earlier frames
        of its key (subtract stage, :mod:`broker.diffstore`), oldest first: ``frame_id``, ``mjd``,
        ``exptime``, ``filter``, ``flux``, ``flux_err`` (ADU of that frame), ``magzp`` (or None)
        and ``limiting_flux`` (that frame's, ADU).
    context, features, classification, followup : dict or None
        What the score stage adds, each as its record of the ``candidates/v3`` and ``alert/v3``
        schemas (None until then): where the candidate sits (:class:`broker.context.Context`), the
        light-curve features of its object (:mod:`broker.lightcurve`, null where undefined), its
        class probabilities with their explanation (:class:`broker.lcclass.Classification`) and its
        follow-up request (:class:`broker.followup.FollowupStatus`).
    """

    cand_id: str
    detection: Detection
    science: np.ndarray
    reference: np.ndarray
    difference: np.ndarray
    rb: float | None = None
    anomaly: float | None = None
    obj: ObjectSummary | None = None
    history: list[dict] = field(default_factory=list)
    forced: list[dict] = field(default_factory=list)
    context: dict | None = None
    features: dict | None = None
    classification: dict | None = None
    followup: dict | None = None

    def triplet(self) -> np.ndarray:
        """Cutouts stacked as (3, 63, 63) float32: science, reference, difference."""
        return np.stack([self.science, self.reference, self.difference]).astype(np.float32)
