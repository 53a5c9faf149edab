"""``POST /api/v1/frames``: predictions through the stages' functions, publishing, and hostile uploads."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from astropy.io import fits
from fastapi.testclient import TestClient
from PIL import Image

from broker.astrometry import AstrometryConfig
from broker.calibrate import CalibrationConfig
from broker.errors import InvalidFrame
from broker.frame import Frame, decode_fits, encode_fits
from broker.reference import ReferenceStore, build_reference
from streams.framestore import FrameStore
from streams.producer import FrameProducer, Published
from streams.settings import KafkaSettings
from streams.web.app import create_app
from tests.broker.test_frame_fuzz import MUTATORS, SEED, Base
from tests.helpers import star_frame


def exposure(noise_seed: int, frame_id: str, mjd: float, transient: tuple[float, float, float] | None = None) -> Frame:
    """The same 40 stars with fresh Poisson noise, and optionally a new point source (x, y, flux ADU)."""
    base = star_frame(shape=(256, 256), seed=0, FRAMEID=frame_id, **{"MJD-OBS": mjd})
    data = base.data.astype(float)
    if transient is not None:
        yy, xx = np.mgrid[:256, :256]
        x, y, flux = transient
        s = 3.0 / 2.3548
        data += flux / (2 * np.pi * s * s) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
    noisy = np.random.default_rng(noise_seed).poisson(np.clip(data, 0, None)).astype(np.float32)
    return Frame(base.meta, noisy, base.header)


@pytest.fixture(scope="module")
def pair() -> tuple[bytes, bytes]:
    """(science with a transient at x=100.3, y=150.7; reference) as tile-compressed FITS."""
    science = exposure(2, "TEST-F1-r-0001", 60000.5, transient=(100.3, 150.7, 30000.0))
    return encode_fits(science), encode_fits(exposure(1, "TEST-F1-r-0000", 60000.4))


def post(client, body=None, headers=None, token=None, mode="predict", files=None, **kw):
    headers = dict(headers or {})
    if token is not None:
        headers.update(token)
    if body is not None and "content-type" not in {k.lower() for k in headers}:
        headers["Content-Type"] = "application/fits"
    return client.post("/api/v1/frames", params={"mode": mode}, content=body, headers=headers, files=files, **kw)


def healthy(client) -> bool:
    return client.get("/api/v1/health").json()["status"] == "ok"


def test_predict_finds_the_transient_with_its_scores_and_cutouts(client, token, pair):
    science, reference = pair
    response = post(client, token=token, files={"frame": ("s.fits", science, "application/fits"),
                                                "reference": ("r.fits", reference, "application/fits")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "SUBTRACTED" and body["reference"] == {"source": "upload", "frame_ids": ["TEST-F1-r-0000"],
                                                                "omitted": []}
    best = body["candidates"][0]
    assert abs(best["x"] - 100.3) < 0.5 and abs(best["y"] - 150.7) < 0.5 and best["snr"] > 20
    assert 0 <= best["anomaly"] <= 1 and best["classification"]["label"]
    assert body["models"]["anomaly"] and body["models"]["lcclass"]
    if body["models"]["rb"] is not None:  # torch installed: the classify stage's model scored it
        assert best["rb"] > 0.5
    png = base64.b64decode(best["cutouts"]["difference"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (63, 63)


def test_predict_uses_the_stored_reference_of_the_field(client, token, pair, portal_config):
    science, reference = pair
    refs = portal_config.references_dir
    assert post(client, science, token=token).json()["error"] == "reference"  # none stored yet
    ReferenceStore(refs).put(build_reference([decode_fits(reference)]))
    body = post(client, science, token=token).json()
    assert body["reference"]["source"] == "stored" and body["candidates"]
    import shutil

    shutil.rmtree(refs)


def test_a_frame_of_the_stored_reference_is_answered_with_why_nothing_was_looked_for(client, token, pair,
                                                                                    portal_config):
    """The pipeline's IN_REFERENCE: no candidate because none was looked for, which the answer must say."""
    science, reference = pair
    ReferenceStore(portal_config.references_dir).put(build_reference([decode_fits(reference)]))
    try:
        body = post(client, reference, token=token).json()
        assert body["status"] == "IN_REFERENCE" and body["candidates"] == []
        assert "not subtracted" in body["note"] and "TEST-F1-r-0000" in body["note"]
        assert post(client, science, token=token).json()["note"] is None
    finally:
        import shutil

        shutil.rmtree(portal_config.references_dir)


def test_a_reference_of_another_field_is_refused(client, token, pair):
    other = encode_fits(star_frame(seed=0, FIELD="F9", FRAMEID="TEST-F9-r-0000"))
    response = post(client, token=token, files={"frame": ("s.fits", pair[0], "application/fits"),
                                                "reference": ("r.fits", other, "application/fits")})
    assert response.status_code == 400 and response.json()["error"] == "reference"


def test_a_reference_sharing_the_frames_id_but_not_its_pixels_is_subtracted(client, token):
    """Headers without FRAMEID that claim the same MJD (SFFT's DECam cut-outs) give two exposures one id.

    The prediction must still subtract them, not answer IN_REFERENCE with no candidate.
    """
    science = exposure(2, "TEST-F1-r-0001", 60000.5, transient=(100.3, 150.7, 30000.0))
    reference = exposure(1, "TEST-F1-r-0001", 60000.5)
    response = post(client, token=token, files={"frame": ("s.fits", encode_fits(science), "application/fits"),
                                                "reference": ("r.fits", encode_fits(reference), "application/fits")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "SUBTRACTED" and body["reference"]["frame_ids"] == ["TEST-F1-r-0001/reference"]
    best = body["candidates"][0]
    assert abs(best["x"] - 100.3) < 0.5 and abs(best["y"] - 150.7) < 0.5


def test_the_frame_itself_as_its_reference_is_refused_with_the_reason(client, token, pair):
    response = post(client, token=token, files={"frame": ("s.fits", pair[0], "application/fits"),
                                                "reference": ("r.fits", pair[0], "application/fits")})
    assert response.status_code == 400 and response.json()["error"] == "reference"
    assert "the frame itself" in response.json()["detail"]


def test_several_reference_frames_are_co_added_as_the_pipeline_co_adds_them(client, token, pair):
    references = [encode_fits(exposure(seed, f"TEST-F1-r-000{seed}", 60000.0 + seed / 10)) for seed in (3, 4, 5)]
    files = [("frame", ("s.fits", pair[0], "application/fits"))]
    files += [("reference", (f"r{i}.fits", r, "application/fits")) for i, r in enumerate(references)]
    response = post(client, token=token, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reference"]["frame_ids"] == ["TEST-F1-r-0003", "TEST-F1-r-0004", "TEST-F1-r-0005"]
    assert body["reference"]["omitted"] == []
    best = body["candidates"][0]
    assert abs(best["x"] - 100.3) < 0.5 and abs(best["y"] - 150.7) < 0.5


def test_more_reference_frames_than_the_most_are_400(client, token, pair):
    files = [("frame", ("s.fits", pair[0], "application/fits"))]
    files += [("reference", (f"r{i}.fits", pair[1], "application/fits")) for i in range(6)]
    response = post(client, token=token, files=files)
    assert response.status_code == 400 and "at most 5 frames" in response.json()["detail"]


def test_publish_sends_the_validated_frame_and_returns_its_id(client, token, pair):
    sent = []
    client.app.state.portal.extras["publisher"] = lambda frame: sent.append(frame) or Published(
        frame.meta.frame_id, 1234, True)
    response = post(client, pair[0], token=token, mode="publish")
    assert response.status_code == 202
    body = response.json()
    assert body["frame_id"] == "TEST-F1-r-0001" and body["poll"] == "/api/v1/frames/TEST-F1-r-0001"
    assert sent[0].meta.frame_id == "TEST-F1-r-0001"


def test_publish_answers_a_poll_url_that_reaches_a_frame_id_with_url_characters(client, token):
    """The poll URL held the FRAMEID as it was: '/', '?' or '#' in it pointed elsewhere."""
    frame_id = "2025/03/14 #7?x=1"
    client.app.state.portal.extras["publisher"] = lambda frame: Published(frame.meta.frame_id, 1, True)
    body = post(client, encode_fits(star_frame(seed=0, FRAMEID=frame_id)), token=token, mode="publish").json()
    assert body["frame_id"] == frame_id and body["poll"] == "/api/v1/frames/2025%2F03%2F14%20%237%3Fx%3D1"
    polled = client.get(body["poll"], headers=token)  # not archived yet: the frame route answers, naming it
    assert polled.status_code == 404 and repr(frame_id) in polled.json()["detail"]


def test_publish_refuses_a_telescope_the_pipeline_refuses_from_this_server(portal_config, pair, tmp_path):
    """A frame ingest dead-letters ``unauthorised`` was answered 202 with a frame id that never appears."""
    import dataclasses

    from fastapi.testclient import TestClient

    from streams.web.app import create_app

    (tmp_path / "frame-key").write_text("portal-frame-key\n")
    for telescopes, status in (({"OTHER": ["portal"], "TEST": ["observatory"]}, 403), ({"TEST": ["portal"]}, 202)):
        kafka = {"frame_auth": {"telescopes": telescopes, "signer": "portal", "key_file": str(tmp_path / "frame-key")}}
        config = dataclasses.replace(portal_config, pipeline=dataclasses.replace(portal_config.pipeline, kafka=kafka))
        with TestClient(create_app(config)) as client:
            portal, sent = client.app.state.portal, []
            portal.extras["publisher"] = lambda frame, sent=sent: sent.append(frame) or Published(
                frame.meta.frame_id, 1234, True)
            token = {"Authorization": f"Bearer {portal.tokens.add('amateur', ['upload'], ['TEST'])}"}
            response = post(client, pair[0], token=token, mode="publish")
        assert response.status_code == status, response.text
        if status == 403:
            assert "as 'portal'" in response.json()["detail"] and "'TEST'" in response.json()["detail"]
        assert len(sent) == (status == 202)


def test_publish_without_kafka_is_503(client, token, pair):
    response = post(client, pair[0], token=token, mode="publish")
    assert response.status_code == 503 and "bootstrap" in response.json()["detail"]


def test_uploads_need_a_token_with_scope_upload(client, pair):
    assert post(client, pair[0]).status_code == 401
    assert post(client, pair[0], headers={"Authorization": "Bearer 00000000.wrong"}).status_code == 401
    reader = client.app.state.portal.tokens.add("reader", ["read"])
    response = post(client, pair[0], headers={"Authorization": f"Bearer {reader}"})
    assert response.status_code == 403 and response.json()["error"] == "forbidden"


def test_uploads_over_the_rate_limit_are_429(client, token):
    limit = client.app.state.portal.config.uploads_per_minute
    codes = [post(client, b"garbage", token=token).status_code for _ in range(limit + 2)]
    assert codes[:limit] == [400] * limit and codes[limit:] == [429, 429]
    other = client.app.state.portal.tokens.add("other", ["upload"])
    assert post(client, b"garbage", headers={"Authorization": f"Bearer {other}"}).status_code == 400


def _bomb(side: int) -> bytes:
    """A tile-compressed image of ``side``^2 zeros: a few kB that decompress to side^2 * 4 bytes."""
    hdu = fits.CompImageHDU(np.zeros((side, side), dtype=np.float32), compression_type="RICE_1")
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    return buf.getvalue()


def _declared(nx: int, ny: int) -> bytes:
    """A small tile-compressed image whose header announces nx x ny pixels (the table itself is intact)."""
    data = _bomb(64)
    for card, value in ((b"ZNAXIS1 = ", nx), (b"ZNAXIS2 = ", ny)):
        at = data.index(card) + len(card)
        data = data[:at] + str(value).rjust(20).encode() + data[at + 20:]
    return data


def _gzip_bomb() -> bytes:
    """A gzipped FITS file of 256 MiB of zeros: 260 kB on the wire."""
    header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": 8192, "NAXIS2": 8192})
    return gzip.compress(header.tostring().encode() + bytes(8192 * 8192 * 4), compresslevel=1)


def _no_metadata() -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(np.random.default_rng(0).normal(100, 5, (128, 128)).astype(np.float32)).writeto(buf)
    return buf.getvalue()


def _dark() -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(np.full((128, 128), 300, np.float32), header=fits.Header({"IMAGETYP": "Dark Frame"})).writeto(buf)
    return buf.getvalue()


@pytest.mark.parametrize(("name", "payload", "status", "reason"), [
    ("zero bytes", b"", 400, "corrupt"),
    ("a dark frame", _dark(), 400, "not_science"),
    ("not FITS", b"GIF89a" + bytes(5000), 400, "corrupt"),
    ("zip bomb", _bomb(2048), 400, "implausible_compression"),
    ("gzip bomb", _gzip_bomb(), 400, "implausible_compression"),  # inflated 16 MB of 256, not all
    ("huge declared image", _declared(200_000, 200_000), 413, "too_many_pixels"),
    ("no metadata", _no_metadata(), 400, "missing_metadata"),
])
def test_hostile_frames_get_the_errors_of_broker_produce(client, token, portal_config, tmp_path, name, payload,
                                                         status, reason):
    response = post(client, payload, token=token)
    assert response.status_code == status, (name, response.text)
    assert response.json()["error"] == reason and "Traceback" not in response.text
    producer = FrameProducer(KafkaSettings("127.0.0.1:9"), FrameStore(str(tmp_path / "store")), 8 << 20, 1 << 30,
                             portal_config.ingest())  # `broker produce` on the same bytes (nothing is sent)
    (tmp_path / "frame.fits").write_bytes(payload)
    with pytest.raises(InvalidFrame) as produced:
        producer.publish_file(tmp_path / "frame.fits")
    assert produced.value.reason == reason
    assert healthy(client)


#: Mutated uploads sent to ``mode=predict`` by the test below (half science, half reference).
PREDICT_MUTANTS = 24


@pytest.mark.filterwarnings("ignore")  # as in production, where numpy's and astropy's warnings are not errors
def test_mutated_science_and_reference_uploads_are_predicted_or_refused_with_a_reason(portal_config, pair):
    """The frame fuzzer's mutations of either part of a predict upload: a 200 or a 4xx with a reason, never 5xx.

    The portal solves as the pipeline does, with a 5 s CPU limit and no blind retry here (the
    default's two 20 s searches make an unsolvable upload take ~40 s).
    """
    solving = CalibrationConfig(astrometry=AstrometryConfig(blind_retry=False, cpulimit_s=5))
    pipeline = replace(portal_config.pipeline, ingest=replace(portal_config.pipeline.ingest, calibration=solving))
    parts = dict(zip(("frame", "reference"), pair, strict=True))
    bases = {name: Base(name, *_pixels_and_header(payload), payload) for name, payload in parts.items()}
    rng, answers, failures = np.random.default_rng(SEED), Counter(), []
    with TestClient(create_app(replace(portal_config, pipeline=pipeline, uploads_per_minute=10**6)),
                    raise_server_exceptions=False) as client:
        clear = client.app.state.portal.tokens.add("fuzz", ["upload"], telescopes=["TEST"])
        for i in range(PREDICT_MUTANTS):
            side = ("frame", "reference")[i % 2]
            what, mutant = MUTATORS[(i // 2) % len(MUTATORS)](bases[side], rng)
            if mutant is None:
                continue
            files = {name: (f"{name}.fits", mutant if name == side else payload, "application/fits")
                     for name, payload in parts.items()}
            response = post(client, token={"Authorization": f"Bearer {clear}"}, files=files)
            body = response.json()
            answers[f"{response.status_code} {body.get('error', body.get('status'))}"] += 1
            if response.status_code >= 500 or (response.status_code != 200 and not body.get("detail")):
                failures.append(f"{side}: {what} -> {response.status_code} {response.text[:300]}")
        assert healthy(client)
    assert not failures, "\n".join(failures)
    assert any(a.startswith("200") for a in answers) and len(answers) >= 4, answers


def _pixels_and_header(payload: bytes) -> tuple[np.ndarray, fits.Header]:
    frame = decode_fits(payload)
    return frame.data, frame.header


def test_a_declared_size_over_the_limit_is_refused_before_the_body(client, token):
    limit = client.app.state.portal.config.max_upload_bytes
    body = (b"x" * 1024 for _ in range(1))  # a declared 640 MiB; the server answers from the header alone
    response = post(client, body, token=token, headers={"Content-Length": str(10 * limit)})
    assert response.status_code == 413 and response.json()["error"] == "too_large"
    assert healthy(client)


def test_a_streamed_body_is_cut_off_at_the_limit(client, token, portal_config):
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from streams.web.app import create_app

    small = replace(portal_config, max_upload_bytes=100_000)
    with TestClient(create_app(small)) as c:
        clear = c.app.state.portal.tokens.add("streamer", ["upload"])
        chunks = (b"\0" * 65536 for _ in range(64))  # 4 MiB, chunked: no Content-Length
        response = c.post("/api/v1/frames", content=chunks, headers={
            "Authorization": f"Bearer {clear}", "Content-Type": "application/fits"})
        assert response.status_code == 413 and response.json()["error"] == "too_large"
        assert c.get("/api/v1/health").status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", ""])
def test_content_types_other_than_fits_are_415(client, token, pair, content_type):
    response = post(client, pair[0], token=token, headers={"Content-Type": content_type})
    assert response.status_code == 415 and response.json()["error"] == "unsupported_media_type"


def test_a_form_without_a_frame_part_is_400(client, token, pair):
    response = post(client, token=token, files={"picture": ("s.fits", pair[0], "application/fits")})
    assert response.status_code == 400 and "'frame'" in response.json()["detail"]


def test_a_form_with_two_frame_parts_is_400(client, token, pair):
    """Two ``frame`` parts in one form: one was used and the other dropped without a word."""
    files = [("frame", ("a.fits", pair[0], "application/fits")), ("frame", ("b.fits", pair[1], "application/fits"))]
    response = post(client, token=token, files=files)
    assert response.status_code == 400 and "2 times" in response.json()["detail"]


@pytest.mark.kafka
def test_publish_sends_the_frame_to_the_frames_topic(settings, portal_config, pair, tmp_path):
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from streams import serde, topics
    from streams.monitor import read_all
    from streams.web.app import create_app

    topics.create_topics(settings.bootstrap, [topics.TopicSpec(topics.FRAMES)])
    frame_id = decode_fits(pair[0]).meta.frame_id  # the broker is shared: other tests send this frame too

    def sent() -> list[dict]:
        records = [serde.decode("frame", m.value(), dict(m.headers())) for m in read_all(settings, [topics.FRAMES])]
        return [r for r in records if r["frame_id"] == frame_id]

    before = len(sent())
    pipeline = replace(portal_config.pipeline, frame_store=str(tmp_path / "store"))
    with TestClient(create_app(replace(portal_config, bootstrap=settings.bootstrap, pipeline=pipeline))) as c:
        clear = c.app.state.portal.tokens.add("telescope", ["upload"], ["TEST"])
        response = post(c, pair[0], headers={"Authorization": f"Bearer {clear}"}, mode="publish")
    assert response.status_code == 202, response.text
    mine = sent()
    assert response.json()["frame_id"] == frame_id and len(mine) == before + 1 and mine[-1]["telescope"] == "TEST"
    assert any(_same_pixels(r["fits"], pair[0]) for r in mine if r["fits"])


def _same_pixels(sent: bytes, uploaded: bytes) -> bool:
    """Whether two FITS payloads carry the same image (without the WCS checks of decode_fits)."""
    import io

    from astropy.io import fits

    def pixels(payload: bytes) -> np.ndarray:
        with fits.open(io.BytesIO(payload)) as hdul:
            return next(np.asarray(h.data) for h in hdul if h.data is not None)

    return np.array_equal(pixels(sent), pixels(uploaded))


def test_predict_sees_the_servers_objects_and_writes_nothing_to_its_history(pair, tmp_path):
    from fastapi.testclient import TestClient

    from broker.history import ObjectHistory
    from streams.web.app import create_app
    from streams.web.config import WebConfig
    from tests.helpers import candidate

    science, reference = pair
    files = {"frame": ("s.fits", science, "application/fits"), "reference": ("r.fits", reference, "application/fits")}
    state = tmp_path / "state"
    with TestClient(create_app(WebConfig.for_state_dir(state, tokens_path=tmp_path / "t.sqlite"))) as c:
        auth = {"Authorization": f"Bearer {c.app.state.portal.tokens.add('t', ['upload'])}"}
        alone = post(c, token=auth, files=files).json()
        assert alone["known_objects"] == 0 and alone["candidates"][0]["object"]["ndet"] == 1
        best = alone["candidates"][0]
        server = ObjectHistory(state / "history.sqlite")  # the pipeline saw the transient the night before
        server.associate("TEST-F1-r-0000", 59999.5, "r", [candidate("TEST-F1-r-0000/0", best["ra"], best["dec"])],
                         magzp=25.0)
        server.close()
        body = post(c, token=auth, files=files).json()
    again = body["candidates"][0]
    assert body["known_objects"] >= 1 and again["object"]["ndet"] == 2
    assert [d["cand_id"] for d in again["history"]] == ["TEST-F1-r-0000/0"]
    assert again["features"]["ndet"] == 2
    server = ObjectHistory(state / "history.sqlite")
    assert server.db.execute("SELECT count(*) FROM detections").fetchone()[0] == 1  # only read
    server.close()


def test_a_frame_whose_header_names_no_telescope_is_predicted_under_the_name_given(client, token, pair):
    """``?telescope=``: as ``broker produce --telescope``, for a camera that writes neither TELESCOP nor INSTRUME."""
    anonymous = []
    for payload in pair:
        frame = decode_fits(payload)
        for card in ("TELESCOP", "INSTRUME"):
            frame.header.remove(card, ignore_missing=True)
        anonymous.append(encode_fits(frame))
    files = {"frame": ("s.fits", anonymous[0], "application/fits"),
             "reference": ("r.fits", anonymous[1], "application/fits")}
    refused = client.post("/api/v1/frames", params={"mode": "predict"}, files=files, headers=token)
    assert refused.status_code == 400 and "TELESCOP" in refused.json()["detail"]
    named = client.post("/api/v1/frames", params={"mode": "predict", "telescope": "backyard-20cm"}, files=files,
                        headers=token)
    assert named.status_code == 200, named.text
    assert named.json()["telescope"] == "backyard-20cm" and named.json()["candidates"]
    bad = client.post("/api/v1/frames", params={"mode": "predict", "telescope": "??"}, files=files, headers=token)
    assert bad.status_code == 400 and "names no telescope" in bad.json()["detail"]


# --- telescope bindings of upload tokens: who may publish which telescope's frames -----------------------------

@pytest.fixture
def observatory(portal_config, tmp_path):
    """A portal whose pipeline knows telescope LSST by a profile; published frames are collected, not sent.

    Yields (client, sent frames, ``add(name, telescopes) -> auth header``).
    """
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from broker.telescopes import TelescopeProfile, write_profile
    from streams.web.app import create_app

    write_profile(tmp_path / "telescopes", TelescopeProfile("LSST"))
    pipeline = portal_config.pipeline
    pipeline = replace(pipeline, ingest=replace(pipeline.ingest, telescopes_dir=str(tmp_path / "telescopes")))
    with TestClient(create_app(replace(portal_config, pipeline=pipeline))) as client:
        portal, sent = client.app.state.portal, []
        portal.extras["publisher"] = lambda frame: sent.append(frame) or Published(frame.meta.frame_id, 1, True)

        def add(name: str, telescopes: list[str]) -> dict[str, str]:
            return {"Authorization": f"Bearer {portal.tokens.add(name, ['upload'], telescopes)}"}

        yield client, sent, add


def _frame(telescope: str, normalised: bool = False, **cards) -> bytes:
    """A frame whose header says ``TELESCOP = telescope``; ``normalised``: without FIELD, so ingest normalises it."""
    frame = star_frame(seed=0, TELESCOP=telescope, FRAMEID=f"{telescope.strip()}-0001", **cards)
    if normalised:
        frame.header.remove("FIELD")
    return encode_fits(frame)


def test_an_upload_token_bound_to_no_telescope_may_predict_but_not_publish(observatory, pair):
    client, sent, add = observatory
    amateur = add("amateur", [])
    response = post(client, pair[0], token=amateur, mode="publish")
    assert response.status_code == 403 and response.json()["error"] == "forbidden"
    assert "'amateur' is bound to no telescope" in response.json()["detail"] and "--telescope" in response.json()[
        "detail"]
    assert post(client, b"garbage", token=amateur, mode="publish").status_code == 403  # refused before reading it
    files = {"frame": ("s.fits", pair[0], "application/fits"), "reference": ("r.fits", pair[1], "application/fits")}
    assert post(client, token=amateur, files=files).status_code == 200
    assert sent == []


def test_a_token_bound_to_another_telescope_may_not_publish(observatory, pair):
    client, sent, add = observatory
    response = post(client, pair[0], token=add("amateur", ["backyard"]), mode="publish")
    assert response.status_code == 403 and response.json()["error"] == "forbidden"
    detail = response.json()["detail"]
    assert "telescope 'TEST'" in detail and "'backyard'" in detail and "'amateur'" in detail
    assert sent == []


def test_a_token_bound_to_the_frames_telescope_publishes(observatory, pair):
    client, sent, add = observatory
    for telescopes in (["TEST"], ["ESO/VLT", "TEST"]):
        response = post(client, pair[0], token=add("observatory", telescopes), mode="publish")
        assert response.status_code == 202, response.text
    assert [f.meta.telescope for f in sent] == ["TEST", "TEST"]


@pytest.mark.parametrize(("header", "normalised", "recorded"), [
    ("lsst", False, "lsst"),  # a header with every canonical card keeps its name: lsst is not LSST to the pipeline
    ("L S S T", False, "L S S T"),
    ("LSST   ", False, "LSST"),  # trailing blanks are no part of a FITS string
    ("  lsst ", True, "LSST"),  # normalised: the profile matches it case-insensitively
    ("Lsst", True, "LSST"),
])
def test_the_telescope_compared_is_the_one_the_pipeline_records(observatory, header, normalised, recorded):
    """Case and blanks of ``TELESCOP`` change nothing: the binding is checked against ``frame.meta.telescope``."""
    client, sent, add = observatory
    payload = _frame(header, normalised)
    refused = post(client, payload, token=add("amateur", ["backyard", "TEST"]), mode="publish")
    assert refused.status_code == 403 and f"telescope {recorded!r}" in refused.json()["detail"]
    allowed = post(client, payload, token=add("observatory", ["LSST"]), mode="publish")
    assert allowed.status_code == (202 if recorded == "LSST" else 403), allowed.text
    assert [f.meta.telescope for f in sent] == (["LSST"] if recorded == "LSST" else [])


def test_a_header_naming_the_token_s_telescope_but_selecting_another_s_profile_is_refused(observatory):
    """``TELESCOP = 'backyard'`` with ``INSTRUME = 'LSST'``: ingest records LSST (the profile INSTRUME selects)."""
    client, sent, add = observatory
    payload = _frame("backyard", normalised=True, INSTRUME="LSST")
    refused = post(client, payload, token=add("amateur", ["backyard"]), mode="publish")
    assert refused.status_code == 403 and "telescope 'LSST'" in refused.json()["detail"]
    assert post(client, payload, token=add("observatory", ["LSST"]), mode="publish").status_code == 202
    assert [f.meta.telescope for f in sent] == ["LSST"]


def test_a_query_telescope_cannot_name_a_frame_it_is_not_bound_to(observatory):
    """``?telescope=`` names the telescope of a header naming none: bound like any other name."""
    client, sent, add = observatory
    frame = star_frame(seed=0, FRAMEID="anon-0001")
    for card in ("TELESCOP", "INSTRUME"):
        frame.header.remove(card, ignore_missing=True)
    payload, amateur = encode_fits(frame), add("amateur", ["backyard"])
    response = client.post("/api/v1/frames", params={"mode": "publish", "telescope": "lsst"}, content=payload,
                           headers={**amateur, "Content-Type": "application/fits"})
    assert response.status_code == 403 and "telescope 'lsst'" in response.json()["detail"]  # the header is whole
    response = client.post("/api/v1/frames", params={"mode": "publish", "telescope": "backyard"}, content=payload,
                           headers={**amateur, "Content-Type": "application/fits"})
    assert response.status_code == 202 and [f.meta.telescope for f in sent] == ["backyard"]


def test_telescope_names_with_a_slash_are_bound_whole(observatory):
    """``ESO/VLT`` as the Kafka path reads it: the whole name, not its part before '/'; normalised it is ESO_VLT."""
    client, sent, add = observatory
    assert post(client, _frame("ESO/VLT"), token=add("eso", ["ESO"]), mode="publish").status_code == 403
    vlt = add("vlt", ["ESO/VLT"])
    for normalised in (False, True):
        assert post(client, _frame("ESO/VLT", normalised), token=vlt, mode="publish").status_code == 202
    assert [f.meta.telescope for f in sent] == ["ESO/VLT", "ESO_VLT"]


def test_a_revoked_bound_token_publishes_nothing(observatory, pair):
    client, sent, add = observatory
    auth = add("observatory", ["TEST"])
    assert client.app.state.portal.tokens.revoke("observatory") == 1
    response = post(client, pair[0], token=auth, mode="publish")
    assert response.status_code == 401 and "revoked" in response.json()["detail"]
    assert sent == []


def test_tokens_of_a_token_file_of_the_old_schema_still_predict_but_do_not_publish(portal_config, pair, tmp_path):
    """A token file written before bindings: it opens, gains the column, and its tokens are bound to none."""
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from streams.web.app import create_app
    from tests.streams.web.test_tokens import old_token_file

    path, clear = old_token_file(tmp_path / "old.sqlite", "legacy", ["read", "upload"])
    with TestClient(create_app(replace(portal_config, tokens_path=path))) as client:
        client.app.state.portal.extras["publisher"] = lambda frame: pytest.fail("an old token published")
        auth = {"Authorization": f"Bearer {clear}"}
        files = {"frame": ("s.fits", pair[0], "application/fits"), "reference": ("r.fits", pair[1], "application/fits")}
        predicted = post(client, token=auth, files=files)
        assert predicted.status_code == 200 and predicted.json()["candidates"]
        refused = post(client, pair[0], token=auth, mode="publish")
        assert refused.status_code == 403 and "bound to no telescope" in refused.json()["detail"]


def _slow_upload(app, headers: dict, chunks: list[bytes], pause_s: float, gate: asyncio.Event | None = None):
    """POST a FITS body sent as ``chunks`` with ``pause_s`` between them (after ``gate``, when given); the answer."""
    import httpx

    async def body():
        for i, chunk in enumerate(chunks):
            if i:
                await asyncio.sleep(pause_s)
            if gate is not None and i == 1:
                await gate.wait()
            yield chunk

    async def post():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://portal") as client:
            return await client.post("/api/v1/frames", content=body(),
                                     headers={**headers, "Content-Type": "application/fits"})

    return post()


def test_a_body_that_does_not_arrive_in_time_is_408_and_frees_its_place(portal_config, tmp_path):
    """A stalled or deliberately slow upload held its connection and its memory for as long as it liked."""
    from dataclasses import replace

    from streams.web.app import create_app

    app = create_app(replace(portal_config, upload_timeout_s=0.3, uploads_in_flight=1))
    token = {"Authorization": f"Bearer {app.state.portal.tokens.add('slow', ['upload'])}"}

    async def scenario():
        slow = await _slow_upload(app, token, [b"SIMPLE  =", b"T" * 80], pause_s=1.0)
        assert slow.status_code == 408 and slow.json()["error"] == "request_timeout"
        fast = await _slow_upload(app, token, [b"garbage"], pause_s=0.0)
        assert fast.status_code == 400  # its place was given back: read, and refused as not FITS

    asyncio.run(scenario())


def test_one_token_has_at_most_uploads_in_flight_bodies_in_hand(portal_config):
    from dataclasses import replace

    from streams.web.app import create_app

    app = create_app(replace(portal_config, uploads_in_flight=1))
    token = {"Authorization": f"Bearer {app.state.portal.tokens.add('two', ['upload'])}"}
    other = {"Authorization": f"Bearer {app.state.portal.tokens.add('other', ['upload'])}"}

    async def scenario():
        gate = asyncio.Event()
        first = asyncio.create_task(_slow_upload(app, token, [b"garbage", b"more"], 0.0, gate))
        await asyncio.sleep(0.2)  # the first body is being read
        second = await _slow_upload(app, token, [b"garbage"], 0.0)
        assert second.status_code == 429 and "uploads in hand" in second.json()["detail"]
        assert second.headers["Retry-After"]
        assert (await _slow_upload(app, other, [b"garbage"], 0.0)).status_code == 400  # another token: its own
        gate.set()
        assert (await first).status_code == 400
        assert (await _slow_upload(app, token, [b"garbage"], 0.0)).status_code == 400  # free again

    asyncio.run(scenario())


@pytest.mark.parametrize("content_type", ["application/fits", "multipart/form-data; boundary=x"])
def test_an_upload_its_client_abandons_is_no_server_error(portal_config, caplog, content_type):
    """A client gone mid-body (a closed tab, a killed curl) was 'unexpected error' and a 500, with two tracebacks."""
    import logging

    app = create_app(portal_config)
    clear = app.state.portal.tokens.add("leaver", ["upload"])
    part = b'--x\r\nContent-Disposition: form-data; name="frame"; filename="a.fits"\r\n\r\nSIMPLE  ='
    messages = [{"type": "http.request", "body": part, "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"portal"), (b"authorization", f"Bearer {clear}".encode()),
               (b"content-type", content_type.encode()), (b"content-length", b"100000")]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/api/v1/frames", "raw_path": b"/api/v1/frames",
             "query_string": b"mode=predict", "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000), "state": {}}
    with caplog.at_level(logging.INFO):
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400 and b"client_disconnected" in sent[1]["body"]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    app.state.portal.close()


def test_a_reference_that_cannot_serve_is_refused_naming_it(client, token, pair):
    """An uploaded reference two thirds of one value is refused (400 reference), naming it and why.

    It passed plausibility's 95 % mode bound and was subtracted (200, the frame's stars there
    candidates). One 95 % NaN or wholly constant stays refused by the frame checks it already met.
    """
    science = decode_fits(pair[0])
    lost = science.data.copy()
    lost[:171] = 300.0
    nan = np.where(np.random.default_rng(0).random((256, 256)) < 0.95, np.nan, science.data)
    for data, reason, share in ((lost, "reference", "constant 67%"), (nan, "nan_fraction", "NaN"),
                                (np.full((256, 256), 300.0), "implausible_pixels", "a constant image")):
        ref = Frame(replace(science.meta, frame_id="TEST-F1-r-0000"), data.astype(np.float32), science.header)
        response = post(client, token=token, files={"frame": ("s.fits", pair[0], "application/fits"),
                                                    "reference": ("r.fits", encode_fits(ref), "application/fits")})
        assert response.status_code == 400 and response.json()["error"] == reason, response.text
        detail = response.json()["detail"]
        assert detail.startswith("the reference: ") and share in detail, detail


def test_the_frame_with_a_pedestal_as_its_reference_is_refused(client, token, pair):
    """The frame's pixels plus a constant (another bias level) are still the frame itself."""
    science = decode_fits(pair[0])
    ref = Frame(replace(science.meta, frame_id="TEST-F1-r-0000"), science.data + np.float32(100.0), science.header)
    response = post(client, token=token, files={"frame": ("s.fits", pair[0], "application/fits"),
                                                "reference": ("r.fits", encode_fits(ref), "application/fits")})
    assert response.status_code == 400 and "the frame itself" in response.json()["detail"], response.text


def test_an_uploaded_reference_without_stars_is_refused_with_the_reason(client, token, pair):
    """A reference of sky noise alone is refused as such (400 reference), naming it.

    It was co-added (its PSF a Gaussian guess, its flux scale 1) and the subtraction refused it as
    ``alignment``, blaming the science frame's WCS ("only 2 of 40 stars matched").
    """
    science = decode_fits(pair[0])
    noise = np.random.default_rng(5).poisson(np.full((256, 256), float(np.median(science.data)))).astype(np.float32)
    ref = Frame(replace(science.meta, frame_id="TEST-F1-r-0000"), noise, science.header)
    response = post(client, token=token, files={"frame": ("s.fits", pair[0], "application/fits"),
                                                "reference": ("r.fits", encode_fits(ref), "application/fits")})
    assert response.status_code == 400 and response.json()["error"] == "reference", response.text
    assert "frame TEST-F1-r-0000 has 0 stars" in response.json()["detail"], response.text
