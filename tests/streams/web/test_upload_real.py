"""``POST /api/v1/frames?mode=predict`` on real frames of ``../shared/data`` (skipped without it).

Uploaded as a user's browser sends them: a multipart form with the frame and its reference, as the
files are kept (FITS, gzip, tile-compressed), and the answers compared with what the pipeline's own
:func:`broker.pipeline.process_frame` gives on the same pair.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from tests.conftest import shared_data

#: The transient at the centre of SFFT's DECam i-band cut-outs (x, y, px, 0-based): SFFT's own difference
#: (``4check/FinalDifference.fits``) shows it at +8 sigma.
DECAM_TRANSIENT = (128.0, 128.0)


def _decam(name: str) -> Path:
    return shared_data("image_pairs", "sfft_decam_i", name)


def _predict(client, token, science: bytes, reference: bytes | None, **params):
    files = {"frame": ("science.fits", science, "application/fits")}
    if reference is not None:
        files["reference"] = ("reference.fits", reference, "application/fits")
    return client.post("/api/v1/frames", params={"mode": "predict", **params}, files=files, headers=token)


@pytest.mark.parametrize("compress", [False, True], ids=["fits", "gz"])
def test_decam_exposures_give_the_known_transient(client, token, compress):
    """DEC-OBS04a against DEC-OBS18a: their headers carry one MJD-OBS, hence one derived frame id."""
    science = _decam("input_data/DEC-OBS04a.mini.fits").read_bytes()
    reference = _decam("input_data/DEC-OBS18a.mini.fits").read_bytes()
    if compress:
        science, reference = gzip.compress(science), gzip.compress(reference)
    response = _predict(client, token, science, reference, telescope="DECam")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "SUBTRACTED", body["status"]
    near = [c for c in body["candidates"]
            if abs(c["x"] - DECAM_TRANSIENT[0]) < 2 and abs(c["y"] - DECAM_TRANSIENT[1]) < 2]
    assert near and near[0]["snr"] > 8, [(c["x"], c["y"], c["snr"]) for c in body["candidates"]]


def test_a_real_frame_as_its_own_reference_is_refused(client, token):
    science = _decam("input_data/DEC-OBS04a.mini.fits").read_bytes()
    response = _predict(client, token, science, science, telescope="DECam")
    assert response.status_code == 400 and "the frame itself" in response.json()["detail"]



def test_a_small_telescope_frame_against_three_references_answers_as_the_pipeline(client, token):
    """EXOTIC's MicroObservatory frames: the pipeline co-adds 3 frames into its reference ([reference] n_frames).

    With one reference frame the same science frame gave 68 candidates, the pipeline's 3-frame
    reference 20: the upload must be able to give the reference the pipeline would use.
    """
    from broker.calibrate import calibrate
    from broker.config import PipelineConfig
    from broker.frame import decode_fits
    from broker.pipeline import FixedReference, process_frame
    from broker.reference import build_reference

    files = sorted(shared_data("small_telescopes", "EXOTIC_sampledata").glob("*.FITS"))
    science, references = files[5].read_bytes(), [f.read_bytes() for f in files[:3]]
    form = [("frame", ("science.fits", science, "application/fits"))]
    form += [("reference", (f"r{i}.fits", r, "application/fits")) for i, r in enumerate(references)]
    response = client.post("/api/v1/frames", params={"mode": "predict"}, files=form, headers=token)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "SUBTRACTED" and len(body["reference"]["frame_ids"]) == 3
    config = PipelineConfig()

    def frame(payload: bytes):
        return calibrate(decode_fits(payload, require_wcs=False), config.ingest.calibration, ())

    ref = build_reference([frame(r) for r in references], config.reference)
    pipeline = process_frame(frame(science), FixedReference(ref), config.subtract)
    assert len(body["candidates"]) == len(pipeline.candidates)
    assert sorted(round(c["snr"], 3) for c in body["candidates"]) == sorted(
        round(c.detection.snr, 3) for c in pipeline.candidates)


def test_a_real_frame_whose_header_names_no_telescope_is_told_how_to_name_it(client, token):
    science = _decam("input_data/DEC-OBS04a.mini.fits").read_bytes()
    response = _predict(client, token, science, None)
    assert response.status_code == 400 and response.json()["error"] == "missing_metadata"
    assert "?telescope=NAME" in response.json()["detail"]


def test_a_refused_reference_is_named_in_the_refusal(client, token):
    """DECam's frame with TOROS's (no WCS, a field too small to solve) as its reference: the refusal says which."""
    science = _decam("input_data/DEC-OBS04a.mini.fits").read_bytes()
    toros = shared_data("image_pairs", "properimage_toros", "aligned_eso085-030-005.fit").read_bytes()
    response = _predict(client, token, science, toros, telescope="DECam")
    assert response.status_code == 400 and response.json()["error"] == "unsolvable"
    assert response.json()["detail"].startswith("the reference: ")


def _fpacked(path: Path) -> bytes:
    """``path`` tile-compressed as fpack does by default (RICE, floats quantised to 1/16 of the noise)."""
    import io

    from astropy.io import fits

    with fits.open(path) as hdus:
        data, header = hdus[0].data.copy(), hdus[0].header.copy()
    out = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header)]).writeto(out)
    return out.getvalue()


def test_a_real_frame_with_its_own_compressed_copy_as_reference_is_refused(client, token):
    """The same exposure kept twice, once fpacked: lossy, so not the same bytes, yet no pair to subtract."""
    path = _decam("input_data/DEC-OBS04a.mini.fits")
    response = _predict(client, token, path.read_bytes(), _fpacked(path), telescope="DECam")
    assert response.status_code == 400 and "the frame itself" in response.json()["detail"], response.text


def test_an_fpacked_real_pair_still_gives_the_known_transient(client, token):
    science, reference = _decam("input_data/DEC-OBS04a.mini.fits"), _decam("input_data/DEC-OBS18a.mini.fits")
    response = _predict(client, token, _fpacked(science), _fpacked(reference), telescope="DECam")
    assert response.status_code == 200 and response.json()["status"] == "SUBTRACTED", response.text
    assert any(abs(c["x"] - DECAM_TRANSIENT[0]) < 2 and abs(c["y"] - DECAM_TRANSIENT[1]) < 2 and c["snr"] > 8
               for c in response.json()["candidates"])
