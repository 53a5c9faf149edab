"""Seeded inputs of the sample alerts kept in ``schemas/alert/samples/``, and the command that writes one.

    python -m tests.schemas.alert_samples

writes ``schemas/alert/samples/v<N>.avro`` for the current alert version N when it does not exist
yet: a published sample is never rewritten (``schemas/README.md``). The v1 sample was written by the
v1 builder (``broker/alert.py`` at commit 202a7f0) from the same inputs.
"""

from __future__ import annotations

import io

import fastavro
import numpy as np
from astropy.wcs import WCS

import schemas
from broker.alert import FrameContext, build_alert
from broker.candidate import CUTOUT_SIZE, Candidate, Detection, ObjectSummary
from tests.helpers import header

SAMPLES = schemas.ROOT / "alert" / "samples"
FRAME_ID = "SAMPLE-F1-r-0004"


def _stamp(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A sky-subtracted stamp in whole ADU (it compresses well), a point source at the centre."""
    yy, xx = np.mgrid[:CUTOUT_SIZE, :CUTOUT_SIZE] - CUTOUT_SIZE // 2
    source = amplitude * np.exp(-(xx**2 + yy**2) / (2 * 1.3**2))
    return (rng.poisson(200.0 + source) - 200.0).astype(np.float32)


def sample_inputs() -> tuple[FrameContext, Candidate]:
    """The frame and the scored candidate of the sample alerts (seeded; near a frame edge: NaN columns)."""
    rng = np.random.default_rng(2026)
    h = header((1024, 1024), **{"MJD-OBS": 60004.5})
    det = Detection(x=20.4, y=517.8, ra=0.0, dec=0.0, flux=1520.0, flux_err=61.0, snr=1520.0 / 61.0, scorr=23.1,
                    fwhm=3.1, elongation=1.08, dipole=0.02, n_bad=0, ref_dist=3.2, ref_flux=410.0,
                    x_err=0.04, y_err=0.05, ra_err=0.041, dec_err=0.05)
    det.ra, det.dec = (float(v) for v in WCS(h).pixel_to_world_values(det.x, det.y))
    sci, ref, diff = _stamp(rng, 300.0), _stamp(rng, 60.0), _stamp(rng, 240.0)
    for img in (sci, ref, diff):
        img[:, :11] = np.nan  # columns left of the frame's edge
    cand = Candidate(f"{FRAME_ID}/3", det, sci, ref, diff, rb=0.93, anomaly=0.41,
                     obj=ObjectSummary("OBJ0a1b2c3d4e5f6", det.ra, det.dec, 3, 60001.5))
    cand.history = [
        {"cand_id": "SAMPLE-F1-r-0001/7", "mjd": 60001.5, "filter": "r", "ra": det.ra, "dec": det.dec, "flux": 900.0,
         "flux_err": 60.0, "snr": 15.0, "rb": 0.88, "magzp": 27.0, "limiting_flux": 290.0},
        {"cand_id": "SAMPLE-F1-r-0003/1", "mjd": 60003.5, "filter": "r", "ra": det.ra, "dec": det.dec,
         "flux": 1210.0, "flux_err": 62.0, "snr": 19.5, "rb": 0.9, "magzp": 27.1, "limiting_flux": 300.0}]
    cand.forced = [  # frames 1 and 3 detected the object (history), frame 2 did not: an upper limit
        {"frame_id": f"SAMPLE-F1-r-000{i}", "mjd": 60000.5 + i, "exptime": 30.0, "filter": "r", "flux": flux,
         "flux_err": 60.0, "magzp": zp, "limiting_flux": lim}
        for i, flux, zp, lim in ((1, 905.0, 27.0, 290.0), (2, 75.0, 26.9, 295.0), (3, 1204.0, 27.1, 300.0))]
    _score_records(cand)
    wcs_header = WCS(h).to_header(relax=True).tostring()
    ctx = FrameContext(FRAME_ID, "SAMPLE", "F1", "r", 60004.5, 30.0, 27.05, ("SAMPLE-F1-r-R1", "SAMPLE-F1-r-R2"),
                       wcs_header, 310.0, 0.03)
    return ctx, cand


def _score_records(cand: Candidate) -> None:
    """The score stage's records of the sample (``alert/v3``): a reference host, features, classes, a request."""
    det = cand.detection
    cand.context = {
        "matches": [{"catalog": "OpenNGC", "version": "20191019", "name": "IC0001", "kind": "galaxy",
                     "ra": det.ra + 1e-3, "dec": det.dec, "distance_arcsec": 3.6, "size_arcsec": 24.0, "mag": 15.2}],
        "host": {"catalog": "reference", "name": "ref-host", "ra": det.ra + 5e-4, "dec": det.dec,
                 "offset_arcsec": 1.8, "offset_norm": 0.6, "nuclear": False, "flux": 5200.0},
        "on_star": False, "moving": False, "moving_speed": None, "moving_links": []}
    names = ("ndet", "nulim", "nbands", "duration", "frac_negative", "peak_mag", "amplitude", "rise_rate",
             "decline_rate", "colour", "colour_rate", "beyond_1std", "skew", "kurtosis", "stetson_k", "eta_e",
             "linear_trend", "reduced_chi2", "excess_variance", "period", "period_power")
    cand.features = {n: None for n in names} | {"ndet": 3.0, "nulim": 1.0, "nbands": 1.0, "duration": 3.0,
                                                 "frac_negative": 0.0, "peak_mag": 19.1, "amplitude": 0.55,
                                                 "rise_rate": 0.18}
    probs = {"SN": 0.81, "variable_star": 0.04, "AGN": 0.03, "nuclear_flare": 0.06, "mover": 0.01, "bogus": 0.05}
    cand.classification = {"model": "lcclass-v1", "label": "SN", "probabilities": probs,
                           "explanation": [{"label": "SN", "feature": "rise_rate", "contribution": 0.21},
                                           {"label": "SN", "feature": "host", "contribution": 0.12}]}
    cand.followup = {"request_id": "FU-OBJ0a1b2c3d4e5f6-1", "rule": "young_sn", "requested_mjd": 60003.5,
                     "state": "observed", "n_since": 1}


def sample_alert(builder=build_alert) -> dict:
    """The sample alert made by ``builder`` (the current :func:`broker.alert.build_alert` by default)."""
    ctx, cand = sample_inputs()
    timing = {"exposure_end": 1.8e9, "stages": [{"stage": "ingest", "start": 1.8e9 + 1.0, "end": 1.8e9 + 1.5}]}
    return builder(ctx, cand, {"rb": "realbogus-v11", "anomaly": "anomaly-v2"}, timing, 1.8e9 + 4.0)


def write_sample(record: dict, version: int) -> bytes:
    """An Object Container File of ``record`` written with ``alert/v<version>`` (deflate: the file is kept)."""
    buf = io.BytesIO()
    fastavro.writer(buf, schemas.load("alert", version), [record], codec="deflate")
    return buf.getvalue()


def main() -> None:
    """Write the current version's sample if it is missing."""
    version = schemas.CURRENT["alert"]
    path = SAMPLES / f"v{version}.avro"
    if path.exists():
        print(f"{path} exists: a published sample is never rewritten")
        return
    path.write_bytes(write_sample(sample_alert(), version))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
