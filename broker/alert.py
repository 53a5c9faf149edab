"""Alert packet assembly: one record of schema ``alert/v1`` per candidate."""

from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from broker import __version__
from broker.candidate import Candidate
from broker.errors import SchemaError

SCHEMA_VERSION = "1.0"
PUBLISHER = f"transient-broker {__version__}"


@dataclass(frozen=True)
class FrameContext:
    """What an alert needs to know about its frame."""

    frame_id: str
    telescope: str
    field: str
    filter: str
    mjd_start: float
    exptime: float
    magzp: float | None
    reference_frames: tuple[str, ...]


def alert_id(cand_id: str) -> int:
    """Stable 63-bit id of the alert for ``cand_id``."""
    return int.from_bytes(hashlib.sha1(cand_id.encode()).digest()[:8], "big") & (2**63 - 1)


def stamp(image: np.ndarray, name: str) -> dict:
    """A cutout as ZTF ships it: ``{fileName, stampData}`` with gzipped FITS bytes."""
    buf = io.BytesIO()
    fits.PrimaryHDU(np.asarray(image, dtype=np.float32)).writeto(buf)
    return {"fileName": name, "stampData": gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)}


def read_stamp(stamp_data: bytes) -> np.ndarray:
    """Inverse of :func:`stamp` (also reads ZTF's gzipped-FITS cutouts)."""
    raw = gzip.decompress(stamp_data) if stamp_data[:2] == b"\x1f\x8b" else stamp_data
    with fits.open(io.BytesIO(raw)) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float32)


def build_alert(ctx: FrameContext, cand: Candidate, model_versions: dict[str, str],
                timing: dict, alert_time: float) -> dict:
    """The ``alert/v1`` record of ``cand``.

    Parameters
    ----------
    timing : dict
        ``{"exposure_end": float, "stages": [{"stage", "start", "end"}, ...]}`` (Unix s).
    """
    det, obj = cand.detection, cand.obj
    if obj is None or cand.anomaly is None:
        raise SchemaError(f"candidate {cand.cand_id} has not been classified and scored")
    mag = sig = None
    if ctx.magzp is not None and det.flux != 0:
        mag = float(ctx.magzp - 2.5 * np.log10(abs(det.flux)))
        sig = float(2.5 / np.log(10) * det.flux_err / abs(det.flux))
    name = cand.cand_id.replace("/", "_")
    return {
        "schemavsn": SCHEMA_VERSION,
        "publisher": PUBLISHER,
        "alertId": alert_id(cand.cand_id),
        "objectId": obj.object_id,
        "candid": cand.cand_id,
        "source": {
            "mjd": ctx.mjd_start, "exptime": ctx.exptime, "filter": ctx.filter, "ra": det.ra, "dec": det.dec,
            "x": det.x, "y": det.y, "flux": det.flux, "flux_err": det.flux_err, "snr": det.snr,
            "scorr": det.scorr, "isdiffpos": bool(det.flux > 0), "magpsf": mag, "sigmapsf": sig,
            "fwhm": det.fwhm, "elongation": det.elongation, "dipole": det.dipole, "n_bad": det.n_bad,
            "ref_dist": det.ref_dist, "ref_flux": det.ref_flux,
        },
        "object": {"objectId": obj.object_id, "ra": obj.ra, "dec": obj.dec, "ndet": obj.ndet,
                   "first_mjd": obj.first_mjd},
        "prv_sources": [{"candid": h["cand_id"], **{k: h[k] for k in
                        ("mjd", "filter", "ra", "dec", "flux", "flux_err", "snr", "rb")}} for h in cand.history],
        "cutoutScience": stamp(cand.science, f"{name}_sci.fits.gz"),
        "cutoutTemplate": stamp(cand.reference, f"{name}_ref.fits.gz"),
        "cutoutDifference": stamp(cand.difference, f"{name}_diff.fits.gz"),
        "scores": {"rb": cand.rb, "rb_model": model_versions["rb"], "anomaly": float(cand.anomaly),
                   "anomaly_model": model_versions["anomaly"]},
        "provenance": {"telescope": ctx.telescope, "field": ctx.field, "frame_id": ctx.frame_id,
                       "reference_frames": list(ctx.reference_frames), "pipeline_version": __version__},
        "timing": {**timing, "alert_time": alert_time},
    }
