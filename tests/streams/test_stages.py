"""Stage handlers called directly (no broker): frames by reference, rejects, metrics endpoint."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import urllib.request
from dataclasses import replace

import numpy as np
import pytest

from broker.astrometry import AstrometryConfig
from broker.calibrate import CalibrationConfig
from broker.catalog import index_files
from broker.config import load_config
from broker.errors import (
    BadShape,
    ChecksumMismatch,
    ConfigError,
    FrameStoreError,
    FrameStoreUnavailable,
    ImplausibleHeader,
    InvalidFrame,
    NoSolution,
    PoorQuality,
    SolverBackingOff,
)
from broker.frame import decode_fits, encode_fits
from broker.ingest import IngestConfig
from streams import serde, topics
from streams.framestore import FrameStore
from streams.metrics import StageMetrics
from streams.producer import frame_headers, frame_record
from streams.runner import InMessage
from streams.stages import ingest_handler
from tests.helpers import fill_disk, star_frame


def _msg(record: dict) -> InMessage:
    return InMessage(topics.FRAMES, 0, 0, b"k", serde.encode("frame", record), frame_headers(1.7e9), 0)


@pytest.fixture
def config(tmp_path):
    return load_config(state_dir=str(tmp_path / "state"), frame_store=str(tmp_path / "frames"))


def test_frame_by_reference_is_fetched_and_checked(config):
    frame = star_frame()
    payload = encode_fits(frame)
    uri, _ = FrameStore(config.frame_store).put(payload)
    (out,) = ingest_handler(config)(_msg(frame_record(frame, payload, inline=False, uri=uri)))
    rec = serde.decode("frame", out.value, out.headers)
    assert rec["fits"] is None and rec["quality"]["n_stars"] > 10
    calibrated = FrameStore(config.frame_store).get(rec["uri"], rec["sha256"], config.max_frame_bytes)
    assert "WCSSTAT" in decode_fits(calibrated).header  # the calibrated frame, by reference like its input
    bad = frame_record(frame, payload, inline=False, uri=uri) | {"sha256": "0" * 64}
    with pytest.raises(ChecksumMismatch):
        ingest_handler(config)(_msg(bad))
    with pytest.raises(FrameStoreError):
        ingest_handler(config)(_msg(frame_record(frame, payload, inline=False, uri="/etc/passwd")))


def test_a_frame_store_that_does_not_answer_keeps_the_frame_for_a_retry(config, tmp_path):
    """Not dead-lettered: the handler raises an Outage, which the runner retries (test_runner's outage test)."""
    frame = star_frame()
    payload = encode_fits(frame)
    uri, _ = FrameStore(config.frame_store).put(payload)
    (tmp_path / "frames").rename(tmp_path / "kept")
    (tmp_path / "frames").write_bytes(b"")  # the store's path runs through a file, as a broken mount
    broken = replace(config, frame_store=str(tmp_path / "frames" / "store"))
    rec = frame_record(frame, payload, inline=False, uri=uri.replace(config.frame_store, broken.frame_store))
    with pytest.raises(FrameStoreUnavailable):
        ingest_handler(broken)(_msg(rec))


def test_inline_bytes_must_match_their_checksum(config):
    frame = star_frame()
    rec = frame_record(frame, encode_fits(frame))
    rec["fits"] = rec["fits"][:-2880]  # truncated in transit
    with pytest.raises(InvalidFrame, match="SHA-256"):
        ingest_handler(config)(_msg(rec))


def test_quality_cut_rejects_with_reason(config):
    strict = replace(config, ingest=IngestConfig(fwhm_range=(0.8, 2.0)))
    frame = star_frame(fwhm=3.0)
    with pytest.raises(PoorQuality, match="seeing"):
        ingest_handler(strict)(_msg(frame_record(frame, encode_fits(frame))))


def test_a_frame_too_small_or_implausible_is_refused_before_calibration(config):
    """Before, both went to calibration first: refused `unsolvable` here; with stars and a solver, seconds."""
    solverless = replace(config, ingest=replace(config.ingest, calibration=CalibrationConfig(
        astrometry=AstrometryConfig(solver="no-such-solve-field"))))
    for cards, error in (({"shape": (32, 32)}, BadShape), ({"GAIN": 1e-300}, ImplausibleHeader)):
        frame = star_frame(n_stars=12, RA=150.0, DEC=2.0, PIXSCALE=1.0, **cards)  # a pointing: solvable
        for key in [k for k in frame.header if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_"))]:
            del frame.header[key]
        with pytest.raises(error):
            ingest_handler(solverless)(_msg(frame_record(frame, encode_fits(frame))))


@pytest.mark.skipif(shutil.which("solve-field") is None or not index_files("/usr/share/astrometry"),
                    reason="solve-field or the Tycho-2 index files not installed (Debian astrometry.net, "
                    "astrometry-data-tycho2)")
def test_a_telescope_whose_frames_find_no_solution_is_backed_off_without_holding_up_the_others(config):
    """Frames of a fake sky with a pointing hint: solve-field runs to its CPU limit on each, finding nothing.

    After ``backoff_after`` of them the telescope's next frame is refused ``solver_backoff`` at once, while
    another telescope's frame is still solved.
    """
    fast = AstrometryConfig(blind_retry=False, cpulimit_s=3, backoff_after=2, backoff_s=600)
    ingest = ingest_handler(replace(config, ingest=replace(config.ingest, calibration=CalibrationConfig(
        astrometry=fast))))

    def frame_of(telescope: str) -> InMessage:
        frame = star_frame(n_stars=60, seed=len(telescope), RA=193.0, DEC=41.0, TELESCOP=telescope)
        for key in [k for k in frame.header if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_"))]:
            del frame.header[key]
        return _msg(frame_record(frame, encode_fits(frame)))

    for _ in range(2):
        with pytest.raises(NoSolution):
            ingest(frame_of("Backyard-1"))
    t0 = time.monotonic()
    with pytest.raises(SolverBackingOff, match="last 2 frames of telescope 'Backyard-1'") as err:
        ingest(frame_of("Backyard-1"))
    assert err.value.reason == "solver_backoff" and time.monotonic() - t0 < 2.0
    with pytest.raises(NoSolution):  # another telescope's frames are still solved
        ingest(frame_of("Backyard-22"))


def test_metrics_endpoint_serves_the_stage_metrics():
    m = StageMetrics("ingest")
    port = m.serve(0)
    m.messages_in.labels("ingest").inc()
    m.errors.labels("ingest", "corrupt").inc()
    m.duration.labels("ingest").observe(0.3)
    m.latency.labels("ingest").observe(2.0)
    m.candidates.labels("ingest").observe(12)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in ('broker_messages_in_total{stage="ingest"} 1.0',
                 'broker_errors_total{reason="corrupt",stage="ingest"} 1.0',
                 "broker_stage_duration_seconds_bucket", "broker_latency_from_exposure_seconds_bucket",
                 "broker_candidates_per_frame_bucket"):
        assert line in body


def test_only_the_classify_stage_loads_torch(tmp_path):
    """Ingest, subtract, score and alert (and the subscriber) run without torch installed."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from broker.config import load_config\n"
        "import streams.subscriber, streams.producer, streams.archiver, streams.replay\n"
        "from streams.stages import STAGES, stage\n"
        "cfg = load_config(state_dir=sys.argv[1] + '/state', frame_store=sys.argv[1] + '/frames')\n"
        "for s in STAGES:\n"
        "    if s.name != 'classify' and s.make_handler is not None:\n"
        "        s.make_handler(cfg)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "stage('classify').make_handler(cfg)\n"
        "assert 'torch' in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_topics_are_derived_from_the_stage_table():
    from streams.stages import STAGES, pipeline_topics, stage

    names = [t.name for t in pipeline_topics(("g", "r"))]
    assert names == ["frames", "ingested", "candidates", "classified", "scored", "alerts", "followup", "alerts.g",
                     "alerts.r", "dlq.ingest", "dlq.subtract", "dlq.classify", "dlq.score", "dlq.alert", "dlq.archive",
                     "dlq.followup", "progress.ingest", "progress.subtract", "progress.classify", "progress.score",
                     "progress.alert"]
    chain = [s for s in STAGES if s.kind == "transform"]
    assert [s.name for s in chain] == ["ingest", "subtract", "classify", "score", "alert"]
    for before, after in zip(chain, chain[1:], strict=False):  # consecutive pairs
        assert after.input == before.output  # a chain: each stage reads the previous one's output
    sinks = [s for s in STAGES if s.kind != "transform"]  # after the chain; they read a topic of it, write none
    assert [s.name for s in sinks] == ["archive"] and STAGES[-1] is sinks[-1]
    assert all(s.input in {t for c in chain for t in c.outputs()} and s.output is None and s.outputs() == ()
               and s.make_handler is None for s in sinks)
    assert stage("archive").writes_for() == ("dlq.archive",)
    assert stage("subtract").writes_for() == ("candidates", "dlq.subtract")
    with pytest.raises(ConfigError, match="unknown stage"):
        stage("nonsense")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_the_alert_handler_makes_v3_alerts_from_every_batch_version(config, version):
    import gzip
    import io

    import fastavro
    from astropy.io import fits
    from astropy.wcs import WCS

    import schemas
    from broker.candidate import ObjectSummary
    from streams.framing import decode_alert
    from streams.stages import alert_handler
    from tests.helpers import candidate, header

    cand = candidate()
    cand.rb, cand.anomaly = 0.9, 0.1
    cand.obj = ObjectSummary("OBJ00000000000ff", 150.0, 2.0, 1, 60000.5)
    batch = {"frame_id": "TEST-F1-r-0001", "telescope": "TEST", "field": "F1", "filter": "r", "mjd_start": 60000.5,
             "exptime": 30.0, "magzp": 27.0, "status": "SUBTRACTED", "reference_frames": ["a"], "diagnostics": {},
             "model_versions": {"rb": "rb-1", "anomaly": "an-1"}, "candidates": [serde.candidate_to_record(cand)],
             "nx": 256, "ny": 256, "wcs_header": WCS(header()).to_header(relax=True).tostring(), "limiting_flux": 100.0}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schemas.load("candidates", version), batch)  # v1 drops the v2 fields
    tag = {serde.SCHEMA_HEADER: f"candidates/{version}".encode()}
    msg = InMessage(topics.SCORED, 0, 0, b"k", buf.getvalue(), tag, 0)
    out = alert_handler(config)(msg)[0]
    (alert,) = decode_alert(out.key, out.value, out.headers)
    assert alert["schemavsn"] == "4.0" and alert["source"]["magpsf"] == pytest.approx(27.0 - 7.5)
    assert alert["source"]["diffmaglim"] == (pytest.approx(22.0) if version >= 2 else None)
    assert alert["context"] is None and alert["classification"] is None  # not scored by a v3 score stage
    with fits.open(io.BytesIO(gzip.decompress(alert["cutoutScience"]["stampData"]))) as hdul:
        assert hdul[0].header["BUNIT"] == "adu" and ("CTYPE1" in hdul[0].header) == (version >= 2)


def test_the_alert_handler_publishes_the_request_its_candidate_opened(config):
    """A follow-up request goes out with the alert of the candidate that opened it, and only with that one."""
    from astropy.wcs import WCS

    from broker.candidate import ObjectSummary
    from broker.followup import FollowupStatus, request_id
    from streams.followup import decode_request
    from streams.stages import alert_handler
    from tests.helpers import candidate, header

    cands = [candidate(f"TEST-F1-r-0001/{i}", seed=i) for i in range(2)]
    for c in cands:
        c.rb, c.anomaly = 0.95, 0.999
        c.obj = ObjectSummary("OBJ00000000000ff", 150.0, 2.0, 1, 60000.5)
    opened = request_id("OBJ00000000000ff", cands[0].cand_id, "anomalous")
    for c in cands:  # the second candidate's alert only carries the status of the request the first opened
        c.followup = FollowupStatus(opened, "anomalous", 60000.5, "requested", 0).to_record()
    batch = {"frame_id": "TEST-F1-r-0001", "telescope": "TEST", "field": "F1", "filter": "r", "mjd_start": 60000.5,
             "exptime": 30.0, "magzp": 27.0, "status": "SUBTRACTED", "reference_frames": ["a"], "diagnostics": {},
             "model_versions": {"rb": "rb-1", "anomaly": "an-1"}, "candidates": [serde.candidate_to_record(c)
                                                                              for c in cands],
             "nx": 256, "ny": 256, "wcs_header": WCS(header()).to_header(relax=True).tostring(), "limiting_flux": 100.0}
    msg = InMessage(topics.SCORED, 0, 0, b"k", serde.encode("candidates", batch), {}, 0)
    outs = alert_handler(config)(msg)
    requests = [o for o in outs if o.topic == topics.FOLLOWUP]
    assert len(requests) == 1 and requests[0].key == b"OBJ00000000000ff"
    record = decode_request(requests[0].value, requests[0].headers)
    assert (record["request_id"], record["candid"], record["reason"]["rule"]) == (opened, cands[0].cand_id,
                                                                                   "anomalous")
    assert record["reason"]["anomaly"] == pytest.approx(0.999) and record["filter"] == "r"


def test_the_alert_handler_publishes_no_request_a_telescope_would_refuse(config):
    """A ``scored`` record (anyone may write one) made the alert stage publish requests every listener refused.

    A band of no characters, an object at Dec 1e6 or a NaN request time went out on ``followup``
    (each telescope's listener dead-lettered it, ``invalid_request``). Such a request is now not
    published; the alerts are.
    """
    from broker.candidate import ObjectSummary
    from broker.followup import FollowupStatus, request_id
    from streams.stages import alert_handler
    from tests.helpers import candidate

    handle = alert_handler(config)

    def outputs(band: str = "r", dec: float = 2.0, requested_mjd: float = 60000.5) -> list:
        cand = candidate("TEST-F1-r-0001/0")
        cand.rb, cand.anomaly = 0.95, 0.999
        cand.obj = ObjectSummary("OBJ00000000000ff", 150.0, dec, 1, 60000.5)
        opened = request_id("OBJ00000000000ff", cand.cand_id, "anomalous")
        cand.followup = FollowupStatus(opened, "anomalous", requested_mjd, "requested", 0).to_record()
        batch = {"frame_id": "TEST-F1-r-0001", "telescope": "TEST", "field": "F1", "filter": band,
                 "mjd_start": 60000.5, "exptime": 30.0, "magzp": 27.0, "status": "SUBTRACTED",
                 "reference_frames": ["a"], "diagnostics": {}, "model_versions": {"rb": "rb-1", "anomaly": "an-1"},
                 "candidates": [serde.candidate_to_record(cand)], "nx": 256, "ny": 256, "wcs_header": "",
                 "limiting_flux": 100.0}
        return handle(InMessage(topics.SCORED, 0, 0, b"k", serde.encode("candidates", batch), {}, 0))

    assert sorted(o.topic for o in outputs()) == sorted([topics.ALERTS, topics.filter_topic(topics.ALERTS, "r"),
                                                         topics.FOLLOWUP])
    for bad in (dict(band=""), dict(dec=1e6), dict(requested_mjd=float("nan"))):
        topics_out = [o.topic for o in outputs(**bad)]
        assert topics.FOLLOWUP not in topics_out and topics.ALERTS in topics_out, bad


def test_subtract_and_score_handlers_fill_the_frame_level_fields(config):
    """Batches carry the frame size, WCS and limiting flux; forced photometry and history limits follow."""
    from astropy.io import fits

    from broker.frame import celestial_wcs
    from broker.simulate import SimConfig, SkySimulator
    from streams.stages import score_handler, subtract_handler

    sim = SkySimulator(SimConfig(shape=(256, 256), fields=("F001",), filters=("r",), n_stars=150, n_galaxies=5,
                                 n_transients=10, n_variables=3, n_moving=0, n_cosmic_rays=0.0), seed=3)
    subtract, score = subtract_handler(config), score_handler(config)
    batches = []
    for epoch in range(5):
        frame = sim.frame("F001", "r", epoch)[0]
        value = serde.encode("frame", frame_record(frame, encode_fits(frame)))
        (ingested,) = ingest_handler(config)(InMessage(topics.FRAMES, 0, epoch, b"k", value, frame_headers(1.7e9), 0))
        (out,) = subtract(InMessage(topics.INGESTED, 0, epoch, b"k", ingested.value, ingested.headers, 0))
        (scored,) = score(InMessage(topics.CLASSIFIED, 0, epoch, b"k", out.value, out.headers, 0))
        batches.append(serde.decode("candidates", scored.value, scored.headers))
    assert [b["status"] for b in batches] == ["REFERENCE_BUILDING"] * 2 + ["IN_REFERENCE"] + ["SUBTRACTED"] * 2
    assert all((b["nx"], b["ny"]) == (256, 256) for b in batches)
    radec = celestial_wcs(fits.Header.fromstring(batches[3]["wcs_header"])).pixel_to_world_values(10, 20)
    assert [float(v) for v in radec] == pytest.approx(
        [float(v) for v in sim.frame("F001", "r", 3)[0].wcs.pixel_to_world_values(10, 20)], abs=1e-10)
    assert [b["limiting_flux"] is None for b in batches] == [True, True, True, False, False]
    third, fourth = batches[3], batches[4]
    assert third["limiting_flux"] == third["diagnostics"]["limiting_flux"] > 0
    assert all(c["x_err"] > 0 and c["dec_err"] > 0 and c["forced"] == [] for c in third["candidates"])
    assert all([f["frame_id"] for f in c["forced"]] == [third["frame_id"]] for c in fourth["candidates"])
    assert all(f["limiting_flux"] == third["limiting_flux"] and f["magzp"] == third["magzp"] is not None
               for c in fourth["candidates"] for f in c["forced"])
    seen = [h for c in fourth["candidates"] for h in c["history"]]
    assert seen and all((h["magzp"], h["limiting_flux"]) == (third["magzp"], third["limiting_flux"]) for h in seen)
    assert len(list((config.state_dir / "diffs").glob("*/*/*/*/diff.npy"))) == 2


def test_the_alert_handler_writes_each_configured_topic_in_its_framing(config):
    """One alert per candidate on every alert topic, in its framing; per-filter copies where asked."""
    from broker.candidate import ObjectSummary
    from broker.config import AlertTopicConfig
    from streams.framing import decode_alert
    from streams.stages import alert_handler, stage
    from tests.helpers import candidate

    cfg = replace(config, schema_registry_url="mock://stage-test", alert_topics=(
        AlertTopicConfig("alerts-rubin", "confluent", per_filter=False), AlertTopicConfig("alerts-fink", "fink"),
        AlertTopicConfig("alerts-ztf", "ocf", "deflate", per_filter=False)))
    cands = [candidate(), candidate()]
    for i, cand in enumerate(cands):
        cand.cand_id, cand.rb, cand.anomaly = f"TEST-F1-r-0001/{i}", 0.9, 0.1
        cand.obj = ObjectSummary(f"OBJ{i:013d}", 150.0, 2.0, 1, 60000.5)
    outs = alert_handler(cfg)(_scored("r", {"t.exposure_end": b"1700000000.0"}, cands))

    assert [o.topic for o in outs] == ["alerts-rubin", "alerts-fink", "alerts-fink.r", "alerts-ztf"] * 2
    assert outs[0].value[0] == 0 and outs[1].key.startswith(b"{") and outs[3].value.startswith(b"Obj\x01")
    assert outs[0].key == outs[3].key == b"OBJ0000000000000"  # the fink framing's key is the schema
    by_topic: dict[str, list] = {}
    for o in outs:
        by_topic.setdefault(o.topic, []).extend(decode_alert(o.key, o.value, o.headers))
    assert all(by_topic[t] == by_topic["alerts-ztf"] for t in by_topic)
    assert [a["candid"] for a in by_topic["alerts-ztf"]] == [c.cand_id for c in cands]
    # the restart guard reads back every configured topic
    assert stage("alert").writes_for(cfg) == ("alerts-rubin", "alerts-fink", "alerts-ztf", "followup", "dlq.alert")


def _scored(band: str, headers: dict[str, bytes], cands: list | None = None) -> InMessage:
    """A ``scored`` batch in ``band`` with ``headers``: of ``cands``, else of one candidate (rb 0.9)."""
    from broker.candidate import ObjectSummary
    from tests.helpers import candidate

    if cands is None:
        cands = [candidate()]
        cands[0].rb, cands[0].anomaly = 0.9, 0.1
        cands[0].obj = ObjectSummary("OBJ00000000000ff", 150.0, 2.0, 1, 60000.5)
    batch = {"frame_id": "TEST-F1-r-0001", "telescope": "TEST", "field": "F1", "filter": band,
             "mjd_start": 60000.5, "exptime": 30.0, "magzp": 27.0, "status": "SUBTRACTED", "reference_frames": ["a"],
             "diagnostics": {}, "model_versions": {"rb": "rb-1", "anomaly": "an-1"}, "nx": 256, "ny": 256,
             "wcs_header": "", "limiting_flux": None, "candidates": [serde.candidate_to_record(c) for c in cands]}
    tag = {serde.SCHEMA_HEADER: serde.schema_tag("candidates").encode(), **headers}
    return InMessage(topics.SCORED, 0, 0, b"k", serde.encode("candidates", batch), tag, 0)


def test_an_alert_topic_may_carry_only_a_watchlists_or_a_filters_alerts(config, tmp_path):
    """``[[alert_topics]]`` with ``watchlist`` and ``filter``: Lasair-like streams any Kafka client reads."""
    from broker.candidate import ObjectSummary
    from broker.config import AlertTopicConfig
    from streams.framing import decode_alert
    from streams.stages import WATCHLIST_HEADER, alert_handler
    from tests.helpers import candidate

    watch = tmp_path / "targets.csv"
    watch.write_text(f"name,ra,dec\nhost,{150.0 + 1 / 3600},2.0\nfar,151.0,3.0\n")
    spots = ((150.0, 2.0, 0.9), (150.01, 2.0, 0.9), (151.0, 3.0 + 0.5 / 3600, 0.3))  # ra, dec, rb
    cands = []
    for i, (ra, dec, rb) in enumerate(spots):
        cands.append(candidate(f"TEST-F1-r-0001/{i}", ra, dec, seed=i))
        cands[-1].rb, cands[-1].anomaly = rb, 0.1
        cands[-1].obj = ObjectSummary(f"OBJ{i:013d}", ra, dec, 1, 60000.5)
    cfg = replace(config, alert_topics=(
        AlertTopicConfig(), AlertTopicConfig("alerts-watch", per_filter=False, watchlist=str(watch)),
        AlertTopicConfig("alerts-real", per_filter=False, filter="scores.rb > 0.5"),
        AlertTopicConfig("alerts-both", watchlist=str(watch), watchlist_radius_arcsec=0.5, filter="rb > 0.5")))
    outs = alert_handler(cfg)(_scored("r", {}, cands))
    by_topic: dict[str, list] = {}
    for o in outs:
        by_topic.setdefault(o.topic, []).append((decode_alert(o.key, o.value, o.headers)[0]["candid"][-1],
                                                 json.loads(o.headers.get(WATCHLIST_HEADER, b"null"))))
    assert [c for c, _ in by_topic["alerts"]] == ["0", "1", "2"] and by_topic["alerts"][0][1] is None
    assert by_topic["alerts-watch"] == [("0", [{"name": "host", "distance_arcsec": 0.999}]),  # cos(2 deg)
                                        ("2", [{"name": "far", "distance_arcsec": 0.5}])]
    assert [c for c, _ in by_topic["alerts-real"]] == ["0", "1"]
    assert "alerts-both" not in by_topic  # 0 is 1 arcsec from its entry, beyond the topic's 0.5

    # an edited watchlist reaches the running stage (looked at on every alert here: watchlist_check_s=0)
    handle = alert_handler(replace(cfg, alert_topics=(
        AlertTopicConfig("alerts-watch", per_filter=False, watchlist=str(watch), watchlist_check_s=0.0),)))
    assert [o.topic for o in handle(_scored("r", {}, cands))] == ["alerts-watch"] * 2
    watch.write_text("name,ra,dec\nneighbour,150.01,2.0\n")
    outs = handle(_scored("r", {}, cands))
    assert [json.loads(o.headers[WATCHLIST_HEADER])[0]["name"] for o in outs] == ["neighbour"]


def test_an_alert_a_topics_filter_cannot_be_evaluated_on_is_left_out_of_that_topic_only(config, caplog):
    """A topic's filter that raises on one alert leaves that alert out of that topic, and nothing else.

    ``source.snr ** source.snr ** source.snr`` parses, and raised on a bright alert out of the
    handler: the batch was dead-lettered, its alerts lost from every topic.
    """
    from broker.candidate import ObjectSummary
    from broker.config import AlertTopicConfig
    from streams.stages import alert_handler
    from tests.helpers import candidate

    cands = [candidate(f"TEST-F1-r-0001/{i}", 150.0 + i / 100, 2.0, seed=i) for i in range(2)]
    for i, (c, snr) in enumerate(zip(cands, (50.0, 1.0), strict=True)):
        c.detection.snr, c.rb, c.anomaly = snr, 0.9, 0.1
        c.obj = ObjectSummary(f"OBJ{i:013d}", c.detection.ra, c.detection.dec, 1, 60000.5)
    cfg = replace(config, alert_topics=(
        AlertTopicConfig(), AlertTopicConfig("alerts-odd", per_filter=False,
                                             filter="source.snr ** source.snr ** source.snr > 0")))
    outs = alert_handler(cfg)(_scored("r", {}, cands))
    assert sorted(o.topic for o in outs) == ["alerts", "alerts", "alerts-odd", "alerts.r", "alerts.r"]
    assert "alert topic alerts-odd: filter not evaluated on alert" in caplog.text


@pytest.mark.parametrize("spec, message", [
    ({"filter": "rb >"}, "alert topic alerts-x: invalid filter expression"),
    ({"filter": "open('x')"}, "alert topic alerts-x: unknown name(s) ['open']"),
    ({"watchlist": "/nonexistent/targets.csv"}, "alert topic alerts-x: cannot read the watchlist"),
])
def test_an_alert_topic_whose_filter_or_watchlist_is_bad_stops_the_stage_at_start(config, spec, message):
    from broker.config import AlertTopicConfig
    from broker.errors import BrokerError
    from streams.stages import alert_handler

    with pytest.raises(BrokerError, match=re.escape(message)):
        alert_handler(replace(config, alert_topics=(AlertTopicConfig("alerts-x", **spec),)))


@pytest.mark.parametrize("spec", [{"filter": " "}, {"watchlist": ""}, {"watchlist_radius_arcsec": 0.0},
                                  {"watchlist_radius_arcsec": float("nan")}, {"watchlist_radius_arcsec": 1e5},
                                  {"watchlist_check_s": -1.0}, {"watchlist_check_s": float("nan")}])
def test_an_alert_topic_with_an_empty_filter_or_an_absurd_radius_is_a_config_error(spec):
    from broker.config import AlertTopicConfig
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match="alert topic alerts-x"):
        AlertTopicConfig("alerts-x", **spec)


def test_a_band_from_the_header_never_makes_an_illegal_alert_topic(config):
    """FILTER ``r'`` made the alert stage produce to ``alerts.r'`` and exit (issue 27): now ``alerts.r_-<hash>``."""
    from streams.framing import decode_alert
    from streams.stages import alert_handler, pipeline_topics

    handle = alert_handler(config)
    for band in ("r'", "H\u03b1", "../x", ""):
        outs = handle(_scored(band, {}))
        assert [o.topic for o in outs] == ["alerts", topics.filter_topic("alerts", band)]
        assert all(topics.is_legal_topic(o.topic) for o in outs)
        assert decode_alert(outs[1].key, outs[1].value, outs[1].headers)[0]["source"]["filter"] == band
    names = [t.name for t in pipeline_topics(("r'",))]
    assert topics.filter_topic("alerts", "r'") in names and all(topics.is_legal_topic(n) for n in names)


def test_a_bad_exposure_end_header_does_not_lose_the_alerts(config):
    """A malformed ``t.exposure_end`` used to fail the alert stage after the history was written (issue 27).

    The runner drops it at the first stage (``tests/streams/test_runner.py``); the alert handler
    itself reads timing headers leniently too: the alert is made with an unknown (NaN) exposure end.
    """
    import math

    from streams.framing import decode_alert
    from streams.stages import alert_handler

    handle = alert_handler(config)
    for bad in (b"not a time", b"1e300", b"inf", b"\xff"):
        outs = handle(_scored("r", {"t.exposure_end": bad, "t.ingest.start": b"junk", "t.ingest.end": b"1.0"}))
        (alert,) = decode_alert(outs[0].key, outs[0].value, outs[0].headers)
        assert math.isnan(alert["timing"]["exposure_end"])
        assert [s["stage"] for s in alert["timing"]["stages"]] == ["alert"]
    good = handle(_scored("r", {"t.exposure_end": b"1700000000.5"}))[0]
    assert decode_alert(good.key, good.value, good.headers)[0]["timing"]["exposure_end"] == 1_700_000_000.5


def _ingested(config, frame, offset: int = 0, **record) -> InMessage:
    """``frame`` through the ingest handler, as the subtract stage receives it at ``offset`` of ``ingested``."""
    (out,) = ingest_handler(config)(_msg(frame_record(frame, encode_fits(frame)) | record))
    return InMessage(topics.INGESTED, 0, offset, out.key, out.value, out.headers, 0)


def test_ingest_refuses_a_record_lying_about_its_frame_and_foreign_uris(config):
    """Ny = -5, nx = 1e9 was copied onto ingested; an ``::http://`` URI was ``unexpected:ImportError``."""
    from broker.errors import RecordMismatch

    frame = star_frame()
    with pytest.raises(RecordMismatch, match=r"ny=-5 \(the FITS says 256\), nx=1000000000"):
        ingest_handler(config)(_msg(frame_record(frame, encode_fits(frame)) | {"ny": -5, "nx": 10 ** 9}))
    payload = encode_fits(frame)
    uri, digest = FrameStore(config.frame_store).put(payload)
    for forged in (f"{config.frame_store}/x::http://127.0.0.1:9/{digest}.fits", f"{uri}::http://127.0.0.1:9/x",
                   f"http://127.0.0.1:9/{digest}.fits", f"{config.frame_store}/sub/../{digest}.fits"):
        with pytest.raises(FrameStoreError, match="outside the frame store") as err:
            ingest_handler(config)(_msg(frame_record(frame, payload, inline=False, uri=forged)))
        assert err.value.reason == "frame_store"


def test_subtract_checks_what_it_is_given_as_ingest_did(config):
    """A 16x16 frame on ingested was SUBTRACTED with 0 candidates; a record ingest never wrote was used."""
    from broker.errors import BadShape, ImplausibleHeader, NotIngested
    from streams.stages import subtract_handler

    subtract = subtract_handler(config)
    frame = star_frame()
    tiny = InMessage(topics.INGESTED, 0, 0, b"k", _ingested(config, frame).value, {}, 0)
    tiny_frame = type(frame)(frame.meta, frame.data[:16, :16], frame.header)
    rec = serde.decode("frame", tiny.value, tiny.headers)
    payload = encode_fits(tiny_frame)
    forged = frame_record(tiny_frame, payload) | {"quality": rec["quality"]}
    with pytest.raises(BadShape, match="16x16"):
        subtract(InMessage(topics.INGESTED, 0, 1, b"k", serde.encode("frame", forged), {}, 0))
    raw = serde.encode("frame", frame_record(frame, encode_fits(frame)))  # straight from a producer
    with pytest.raises(NotIngested, match="not written by ingest") as err:
        subtract(InMessage(topics.INGESTED, 0, 2, b"k", raw, {}, 0))
    assert err.value.reason == "not_ingested"
    absurd = star_frame(GAIN=-1.5)
    forged = frame_record(absurd, encode_fits(absurd)) | {"quality": rec["quality"]}
    with pytest.raises(ImplausibleHeader, match="GAIN=-1.5"):
        subtract(InMessage(topics.INGESTED, 0, 3, b"k", serde.encode("frame", forged), {}, 0))
    flagged = rec | {"quality": rec["quality"] | {"flags": ["seeing"]}}  # a flag ingest rejects on
    with pytest.raises(PoorQuality, match="rejecting quality flags"):
        subtract(InMessage(topics.INGESTED, 0, 4, b"k", serde.encode("frame", flagged), {}, 0))


def test_a_frame_sent_again_gives_no_new_batch_but_a_restart_does(config):
    """Re-sent frames were processed again (their alerts 2-3 times on ``alerts``); a redelivery is not lost."""
    from broker.errors import DuplicateFrame
    from streams.stages import subtract_handler

    subtract = subtract_handler(config)
    frame = star_frame()
    (first,) = subtract(_ingested(config, frame, offset=5))
    assert serde.decode("candidates", first.value, first.headers)["status"] == "REFERENCE_BUILDING"
    (again,) = subtract_handler(config)(_ingested(config, frame, offset=5))  # a restarted stage, same message
    assert again.value == first.value
    with pytest.raises(DuplicateFrame, match=r"already processed \(REFERENCE_BUILDING\) from ingested:0:5") as err:
        subtract(_ingested(config, frame, offset=9))
    assert err.value.reason == "duplicate_frame"
    renamed = type(frame)(frame.meta, frame.data, frame.header.copy())
    renamed.header["FRAMEID"] = "TEST-F1-r-0099"
    with pytest.raises(DuplicateFrame, match="same pixels as frame TEST-F1-r-0001"):
        subtract(_ingested(config, type(frame)(replace(frame.meta, frame_id="TEST-F1-r-0099"), frame.data,
                                                 renamed.header), offset=10))


def test_a_frame_whose_batch_cannot_be_encoded_can_be_sent_again(config, monkeypatch):
    """A frame whose outputs failed to encode is not in the ledger.

    The ledger recorded a frame before its batch was encoded: an error there (a bug, dead-lettered
    ``unexpected``) left it recorded, and the frame sent again was refused ``duplicate_frame``.
    """
    from streams import stages

    subtract = stages.subtract_handler(config)
    frame = star_frame()
    message = _ingested(config, frame, offset=5)
    with monkeypatch.context() as patch:
        patch.setattr(stages, "_batch", lambda *_: {"candidates": object()})  # not a batch serde encodes
        with pytest.raises(Exception) as err:
            subtract(message)
    assert not isinstance(err.value, PoorQuality)
    (again,) = subtract(_ingested(config, frame, offset=9))  # re-sent: a new position on ingested
    assert serde.decode("candidates", again.value, again.headers)["status"] == "REFERENCE_BUILDING"


@pytest.mark.parametrize("frame_id", ["R" * 300, "% #?/" * 60])
def test_a_frame_id_too_long_for_a_file_name_is_subtracted_and_stored(config, frame_id):
    """A FRAMEID continued over several cards (or short, but of escaped characters) was ``unexpected:OSError``.

    Its pending reference frame and difference image are files named after it (255 bytes at most).
    """
    from streams.stages import subtract_handler

    subtract = subtract_handler(config)
    for i in range(4):
        frame = star_frame(FRAMEID=f"{frame_id}{i}", **{"MJD-OBS": 60000.0 + i})
        # same stars, fresh noise: a pedestal of i ADU alone would leave one exposure four times
        noisy = np.random.default_rng(i).poisson(np.clip(frame.data, 0, None)).astype(np.float32)
        frame = type(frame)(frame.meta, noisy, frame.header)
        (out,) = subtract(_ingested(config, frame, offset=i))
        batch = serde.decode("candidates", out.value, out.headers)
        assert batch["frame_id"] == f"{frame_id}{i}"
    assert batch["status"] != "REFERENCE_BUILDING"
    assert len(list((config.state_dir / "diffs").rglob("meta.json"))) == 1


def test_a_small_compressed_huge_frame_costs_subtract_no_memory(config, tmp_path):
    """1.1 MB of RICE announcing 8192^2 zeros left ~600 MB resident in subtract; it is refused from its header."""
    import subprocess
    import sys

    from tests.broker.test_frame import _bomb

    bomb = star_frame()  # a valid record whose FITS bytes are the bomb
    payload = _bomb()
    rec = frame_record(bomb, payload) | {"quality": {
        "sky": 0.0, "sky_rms": 1.0, "fwhm": 3.0, "fwhm_arcsec": 3.0, "n_stars": 10, "limit_flux": 1.0,
        "limit_mag": None, "nan_fraction": 0.0, "saturated_fraction": 0.0, "flags": []}}
    (tmp_path / "msg.avro").write_bytes(serde.encode("frame", rec))
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from broker.config import load_config\n"
        "from streams import topics\n"
        "from streams.runner import InMessage\n"
        "from streams.stages import subtract_handler\n"
        "cfg = load_config(state_dir=sys.argv[1] + '/state', frame_store=sys.argv[1] + '/frames')\n"
        "handle = subtract_handler(cfg)  # keeps freed memory, as the stage does\n"
        "value = Path(sys.argv[1], 'msg.avro').read_bytes()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    handle(InMessage(topics.INGESTED, 0, 0, b'k', value, {}, 0))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc.reason)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    refused, grown_mib = res.stdout.split("\n")[:2]
    assert refused == "ImplausibleCompression implausible_compression"
    assert int(grown_mib) < 32, res.stdout


def _classified(cands: list, offset: int, **batch) -> InMessage:
    """A ``classified`` batch (candidates/v3) of ``cands`` at ``offset``, frame-level fields overridable."""
    record = {"frame_id": f"TEST-F1-r-{offset:04d}", "telescope": "TEST", "field": "F1", "filter": "r",
              "mjd_start": 60000.5 + offset, "exptime": 30.0, "magzp": 27.0, "status": "SUBTRACTED",
              "reference_frames": ["a"], "diagnostics": {}, "model_versions": {"rb": "rb-1"}, "nx": 256, "ny": 256,
              "wcs_header": "", "limiting_flux": None, "candidates": [serde.candidate_to_record(c) for c in cands]}
    tag = {serde.SCHEMA_HEADER: serde.schema_tag("candidates").encode()}
    return InMessage(topics.CLASSIFIED, 0, offset, b"k", serde.encode("candidates", record | batch), tag, 0)


def test_the_score_stage_refuses_implausible_batches_before_writing_the_history(config):
    """A zero point of -800 mag was written to the history and overflowed every later light curve of its object.

    Every later alert of that object was ``unexpected:OverflowError``; an MJD of -1e300 became the
    object's ``first_mjd``; a NaN flux was ``unexpected:IntegrityError``. Such a batch on ``classified``
    is now refused with its reason and nothing of it is written.
    """
    from broker.errors import ImplausibleHeader, InvalidMeasurement
    from streams.stages import score_handler
    from tests.helpers import candidate

    score = score_handler(config)

    def cand(i: int, **det):
        c = candidate(cand_id=f"TEST-F1-r-{i:04d}/0", ra=10.0, dec=10.0, seed=i)
        c.rb = 0.95
        for name, value in det.items():
            setattr(c.detection, name, value)
        return c

    for i, (batch, match) in enumerate(((dict(magzp=-800.0), "MAGZP=-800"), (dict(mjd_start=-1e300), "MJD-OBS=-1e"),
                                        (dict(exptime=float("nan")), "EXPTIME=nan")), start=1):
        with pytest.raises(ImplausibleHeader, match=match) as err:
            score(_classified([cand(i)], i, **batch))
        assert err.value.reason == "implausible_header"
    for i, name in enumerate(("flux", "flux_err", "snr"), start=4):
        with pytest.raises(InvalidMeasurement, match=f"{name}=nan") as err:
            score(_classified([cand(i, **{name: float("nan")})], i))
        assert err.value.reason == "invalid_measurement"
    (out,) = score(_classified([cand(9)], 9))  # the object at that position: nothing of the above was kept
    (rec,) = serde.decode("candidates", out.value, out.headers)["candidates"]
    assert rec["history"] == [] and rec["object"]["ndet"] == 1 and rec["object"]["first_mjd"] == 60009.5
    assert rec["features"] is not None and rec["anomaly"] is not None


def _untimed(msg: InMessage) -> dict:
    """A candidates batch without its stage timings (``diagnostics.t_*_s``)."""
    batch = serde.decode("candidates", msg.value, msg.headers)
    batch["diagnostics"] = {k: v for k, v in batch["diagnostics"].items() if not k.startswith("t_")}
    return batch


def test_a_full_disk_keeps_the_frame_and_its_retry_once_freed_gives_the_same_batch(config, small_disk):
    """The state folder's disk full was ``unexpected:OSError`` (dead-lettered; the stage stopped at 5 in a row).

    Now the stage's error is :class:`StorageFull` (kept and retried, ``test_runner``), and the retry after
    a partial write, once space is freed, makes the batch a roomy disk makes: the disk filled while the
    subtraction builds a reference and keeps a difference image, and while the scoring writes the history.
    """
    from broker.errors import storage_full
    from broker.simulate import SimConfig, SkySimulator
    from streams.stages import score_handler, subtract_handler

    sim = SkySimulator(SimConfig(shape=(256, 256), fields=("F001",), filters=("r",), n_stars=150, n_galaxies=5,
                                 n_transients=10, n_variables=3, n_moving=0, n_cosmic_rays=0.0), seed=3)
    roomy, full = config, replace(config, state_dir=small_disk / "state")
    stages = {c.state_dir: (subtract_handler(c), score_handler(c)) for c in (roomy, full)}

    def run(c, step: int, msg: InMessage) -> InMessage:
        (out,) = stages[c.state_dir][step](msg)
        topic = topics.CANDIDATES if step == 0 else topics.SCORED
        return InMessage(topic, 0, msg.offset, out.key, out.value, out.headers, 0)

    statuses = []
    for epoch in range(5):
        ingested = _ingested(config, sim.frame("F001", "r", epoch)[0], offset=epoch)
        expected = got = ingested
        for step in (0, 1):
            expected = run(roomy, step, expected)
            if (epoch, step) in ((2, 0), (3, 0), (4, 1)):  # the reference; a difference image; the history
                fill_disk(small_disk)
                with pytest.raises(Exception) as err:
                    run(full, step, got)
                assert storage_full(err.value) is not None, repr(err.value)
                (small_disk / "ballast").unlink()
            got = run(full, step, got)
            assert _untimed(got) == _untimed(expected), (epoch, step)
        statuses.append(_untimed(got)["status"])
    assert statuses == ["REFERENCE_BUILDING"] * 2 + ["IN_REFERENCE"] + ["SUBTRACTED"] * 2


def test_the_score_stage_refuses_a_candidate_off_its_frame_before_writing_the_history(config):
    """One of eight candidates at x = 1e200 overflowed the trail search's k-d tree: ``unexpected:ValueError``.

    The trail search (:func:`broker.context.trail_matches`) runs on every batch of eight or more
    candidates, after the history was written. A position off the frame, or not finite, is now
    refused with its reason and nothing of the batch is written.
    """
    from broker.errors import InvalidMeasurement
    from streams.stages import score_handler
    from tests.helpers import candidate

    score = score_handler(config)

    def cands(i: int, **last) -> list:
        out = []
        for k in range(8):
            c = candidate(cand_id=f"TEST-F1-r-{i:04d}/{k}", ra=10.0 + 0.01 * k, dec=10.0, seed=k)
            c.rb, c.detection.x, c.detection.y = 0.95, 10.0 + 5 * k, 20.0
            out.append(c)
        for name, value in last.items():
            setattr(out[-1].detection, name, value)
        return out

    for i, last in enumerate((dict(x=1e200), dict(y=-1e300), dict(x=300.0), dict(y=float("nan"))), start=1):
        with pytest.raises(InvalidMeasurement, match="position") as err:
            score(_classified(cands(i, **last), i))
        assert err.value.reason == "invalid_measurement"
    (out,) = score(_classified(cands(9, x=256.0 + 20.0), 9))  # a PSF fit may move an edge peak a little off
    recs = serde.decode("candidates", out.value, out.headers)["candidates"]
    assert [r["object"]["ndet"] for r in recs] == [1] * 8  # nothing of the refused batches was kept


def _left_out_field():
    """Four frames of a field of close star pairs: P-1 alone holds a transient (3000 ADU at (96.3, 60.7)).

    With ``[reference] flux_min_stars = 1000`` no star measures a flux ratio: P-0 and P-2 have
    measured zero points (P-2 twice as deep), P-1 has none, so the co-add of P-0..P-2 leaves P-1 out.
    """
    import math

    from tests.broker.test_reference import _calibrated, _paired_frames

    frames, _, _ = _paired_frames(scales=(1.0, 1.0, 2.0, 1.0), extra=[(1, 96.3, 60.7, 3000.0)])
    return [_calibrated(frames[0], 25.0), frames[1], _calibrated(frames[2], 25.0 + 2.5 * math.log10(2.0)), frames[3]]


def _outputs(outs) -> list[tuple]:
    """(frame id, status, candidates' (x, y)) of each candidates output, (topic, reason, offset) of a dead letter."""
    got = []
    for out in outs:
        if out.topic == topics.CANDIDATES:
            b = serde.decode("candidates", out.value, out.headers)
            got.append((b["frame_id"], b["status"], [(c["x"], c["y"]) for c in b["candidates"]]))
        else:
            d = serde.decode("dlq", out.value, out.headers)
            got.append((out.topic, d["reason"], d["offset"], d["message"]))
    return got


def test_a_frame_its_new_reference_left_out_is_searched_once(config):
    """A pending frame the co-add left out was answered REFERENCE_BUILDING and never searched: its transient was lost.

    It is now searched in the transaction of the frame that completed the reference (its batch
    before that frame's), again when that message is redelivered (a restart), and never by a later
    message; the frames of the reference are not searched against it.
    """
    from broker.errors import DuplicateFrame
    from broker.reference import ReferenceConfig
    from streams.stages import subtract_handler

    config = replace(config, reference=ReferenceConfig(flux_min_stars=1000))
    frames = _left_out_field()
    msgs = [_ingested(config, f, offset=i) for i, f in enumerate(frames)]
    subtract = subtract_handler(config)
    assert [_outputs(subtract(m)) for m in msgs[:2]] == [[("P-0", "REFERENCE_BUILDING", [])],
                                                         [("P-1", "REFERENCE_BUILDING", [])]]
    completed = subtract(msgs[2])
    (late, late_status, found), own = _outputs(completed)
    assert (late, late_status, own) == ("P-1", "SUBTRACTED", ("P-2", "IN_REFERENCE", []))
    assert any(math.hypot(x - 96.3, y - 60.7) < 2.0 for x, y in found), found  # the transient
    batch = serde.decode("candidates", completed[0].value, completed[0].headers)
    assert batch["reference_frames"] == ["P-0", "P-2"] and batch["mjd_start"] == frames[1].meta.mjd_start
    again = subtract_handler(config)(msgs[2])  # a restart before the transaction committed: the same outputs
    assert _outputs(again) == _outputs(completed)
    later = subtract(msgs[3])
    assert [b[:2] for b in _outputs(later)] == [("P-3", "SUBTRACTED")]  # P-1 not searched twice
    assert [b[:2] for b in _outputs(subtract_handler(config)(msgs[3]))] == [("P-3", "SUBTRACTED")]
    refs = config.state_dir / "refs" / "T1" / "P" / "r"
    assert list((refs / "omitted").iterdir()) == []  # dropped once its search was committed
    with pytest.raises(DuplicateFrame):
        subtract(_ingested(config, frames[1], offset=9))  # re-sent: refused as before


def test_a_left_out_frame_its_search_refuses_is_dead_lettered_under_its_own_position(config):
    """The search of a left-out frame that fails (F_r unmeasured) dead-letters it, not the message in hand."""
    from broker.reference import ReferenceConfig
    from broker.subtract import SubtractConfig
    from streams.stages import subtract_handler

    config = replace(config, reference=ReferenceConfig(flux_min_stars=1000),
                     subtract=SubtractConfig(min_flux_ratio_stars=1000))
    from tests.broker.test_reference import _calibrated

    frames = _left_out_field()
    frames[3] = _calibrated(frames[3], 25.0)  # its F_r measured by the zero points
    msgs = [_ingested(config, f, offset=i) for i, f in enumerate(frames)]
    subtract = subtract_handler(config)
    for m in msgs[:2]:
        subtract(m)
    (topic, reason, offset, message), own = _outputs(subtract(msgs[2]))
    assert (topic, reason, offset, own) == (topics.dlq("subtract"), "poor_quality", 1, ("P-2", "IN_REFERENCE", []))
    assert message.startswith("frame P-1, left out of its reference's co-add, searched against it in the "
                              "transaction of ingested:0:2: frame P-1 not subtracted: no flux ratio")
    letter = subtract_handler(config)(msgs[2])[0]
    assert letter.topic == topics.dlq("subtract")  # a redelivery makes it again
    assert [b[:2] for b in _outputs(subtract(msgs[3]))] == [("P-3", "SUBTRACTED")]  # a later message does not
    # --resend said "a message of 'ingested', not a frame ... (send the frame it came from again instead)",
    # and that frame, sent again, is refused duplicate_frame: it names the left-out frame's search now
    from broker.errors import NotResendable
    from streams.deadletters import DeadLetter, resend

    with pytest.raises(NotResendable, match=r"the search of frame 'P-1', which its field's new reference left "
                       r"out, against that reference, dead-lettered \(poor_quality: it failed, or its batch was "
                       r"refused\); it holds no frame \(the frame's record stays "
                       r"on ingested\[0\]@1 for its retention\)"):
        resend(DeadLetter(topics.dlq("subtract"), 0, 0, serde.decode("dlq", letter.value, letter.headers)), None)


def _refused_build_field(flipped: bool = False):
    """Five frames of one field; F1-0 and F1-1 each hold a transient of their own (8000 ADU).

    F1-1 lost the lower two thirds of its readout (zeros): it can serve in no reference
    (``broker.reference.check_usable``), so the first build, of F1-0..F1-2, is refused. With
    ``flipped``, F1-1's pixels are instead turned 180 deg under its WCS: it registers onto no frame.
    """
    from tests.broker.conftest import make_frame, make_sky
    from tests.broker.test_reference import SHAPE

    sky = make_sky(50, SHAPE, 40)
    extra = {0: [(60.3, 70.6, 8000.0)], 1: [(150.4, 170.2, 8000.0)]}
    frames = [make_frame(60 + i, SHAPE, sky, fwhm=2.6 + 0.3 * (i % 3), dx=1.3 * i, dy=-0.7 * i, rot_deg=0.2 * i,
                         extra=extra.get(i, []), frame_id=f"F1-{i}", mjd=60000.0 + i) for i in range(5)]
    if flipped:
        frames[1].data = np.ascontiguousarray(frames[1].data[::-1, ::-1])
    else:
        frames[1].data[: 2 * SHAPE[0] // 3] = 0.0
    return frames


def test_the_frames_of_a_refused_build_wait_and_are_searched_once_a_reference_is_built(config):
    """A refused build set every pending frame aside in rejected/ and dead-lettered the frame in hand: lost transients.

    Now the frame that cannot serve is set aside with its reason, the others wait for a later frame
    to complete the reference with them, and the set-aside frame is searched against it once, in
    that frame's transaction: its transient found, not again from a later message.
    """
    from streams.stages import subtract_handler

    frames = _refused_build_field()
    msgs = [_ingested(config, f, offset=i) for i, f in enumerate(frames)]
    subtract = subtract_handler(config)
    for m, frame_id in zip(msgs[:3], ("F1-0", "F1-1", "F1-2"), strict=True):
        assert _outputs(subtract(m)) == [(frame_id, "REFERENCE_BUILDING", [])]
    refs = config.state_dir / "refs" / "T1" / "F1" / "r"
    assert "F1-1 cannot serve in a reference" in (refs / "omitted" / "F1-1.txt").read_text()
    assert not (refs / "rejected").exists()
    completed = subtract(msgs[3])
    (late, late_status, found), own = _outputs(completed)
    assert (late, late_status, own) == ("F1-1", "SUBTRACTED", ("F1-3", "IN_REFERENCE", []))
    assert any(math.hypot(x - 150.4, y - 170.2) < 2.0 for x, y in found), found
    batch = serde.decode("candidates", completed[0].value, completed[0].headers)
    assert batch["reference_frames"] == ["F1-0", "F1-2", "F1-3"]
    assert _outputs(subtract_handler(config)(msgs[3])) == _outputs(completed)  # a redelivery: the same
    assert [b[:2] for b in _outputs(subtract(msgs[4]))] == [("F1-4", "SUBTRACTED")]  # F1-1 not searched twice
    assert list((refs / "omitted").iterdir()) == []


def test_a_frame_of_a_refused_build_whose_search_fails_is_dead_lettered_with_its_reason(config):
    """A frame whose pixels do not register (flipped under its WCS) is set aside with the grid frame it failed with.

    Both are searched once a reference is built from later frames: the grid frame's transient is
    found, the flipped frame is dead-lettered (``alignment``) under its own position on ingested.
    """
    from streams.stages import subtract_handler

    frames = _refused_build_field(flipped=True)
    msgs = [_ingested(config, f, offset=i) for i, f in enumerate(frames)]
    subtract = subtract_handler(config)
    for m in msgs[:3]:
        assert [b[1] for b in _outputs(subtract(m))] == ["REFERENCE_BUILDING"]
    refs = config.state_dir / "refs" / "T1" / "F1" / "r"
    assert sorted(p.name for p in (refs / "omitted").iterdir()) == ["F1-0.fits", "F1-0.txt", "F1-1.fits", "F1-1.txt"]
    assert "F1-1 does not register onto the grid frame F1-0" in (refs / "omitted" / "F1-0.txt").read_text()
    assert [b[1] for b in _outputs(subtract(msgs[3]))] == ["REFERENCE_BUILDING"]  # F1-2, F1-3: one short
    searched = _outputs(subtract(msgs[4]))
    (late, late_status, found), (topic, reason, offset, message), own = searched
    assert (late, late_status, own) == ("F1-0", "SUBTRACTED", ("F1-4", "IN_REFERENCE", []))
    assert any(math.hypot(x - 60.3, y - 70.6) < 2.0 for x, y in found), found
    assert (topic, reason, offset) == (topics.dlq("subtract"), "alignment", 1)
    assert message.startswith("frame F1-1, left out of its reference's co-add, searched against it in the "
                              "transaction of ingested:0:4")
    # broker dead-letters --resend: the dead letter holds no frame, and the frame, sent again, is a duplicate
    from broker.errors import DuplicateFrame, NotResendable
    from streams.deadletters import DeadLetter, resend

    letter = subtract_handler(config)(msgs[4])[1]
    record = serde.decode("dlq", letter.value, letter.headers)
    assert record["value"] is None and record["headers"] == {"left_out_frame": b"F1-1"}
    with pytest.raises(NotResendable, match=r"dlq.subtract\[0\]@3 is the search of frame 'F1-1', which its "
                       r"field's new reference left out, against that reference, dead-lettered \(alignment: it "
                       r"failed, or its batch was refused\); it holds no frame "
                       r"\(the frame's record stays on ingested\[0\]@1 for its retention\) and is not sent again"):
        resend(DeadLetter(topics.dlq("subtract"), 0, 3, record), producer=None)  # refused before producing
    with pytest.raises(DuplicateFrame):
        subtract(_ingested(config, frames[1], offset=9))


def test_the_subtract_stage_counts_frames_set_aside_waiting_and_searched(config):
    """Frames a refused build set aside were seen only in a log warning and a .txt file: no metric showed them.

    Through the runner as ``broker stage subtract`` runs it: the flipped field's first build sets
    F1-0 and F1-1 aside (``broker_reference_frames_set_aside_total{reason="alignment"}`` 2, counted
    once, not again by a redelivery), ``broker_reference_frames_waiting`` reads 2 and the oldest's
    age, and once F1-4 builds the reference the searches are counted by outcome and nothing waits.
    """
    import os

    from broker.reference import ReferenceStore
    from streams.lineage import Lineage
    from streams.runner import StageRunner
    from streams.settings import KafkaSettings
    from streams.stages import STAGES, subtract_handler

    (spec,) = [s for s in STAGES if s.name == "subtract"]
    metrics = StageMetrics("subtract")
    metrics.watch_references(ReferenceStore(spec.references(config)), interval=0.0)
    runner = StageRunner("subtract", topics.INGESTED, subtract_handler(config), KafkaSettings("127.0.0.1:1"), metrics)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"stage": "subtract", **labels})

    def run(msg) -> list:
        outs, unexpected = runner._handle(msg, Lineage(msg.topic, msg.partition, msg.offset))
        assert not unexpected
        runner._observe(msg, outs, 0.0, 1.0)
        return outs

    msgs = [_ingested(config, f, offset=i) for i, f in enumerate(_refused_build_field(flipped=True))]
    assert sample("broker_reference_frames_waiting") == 0.0
    assert sample("broker_reference_oldest_waiting_seconds") == 0.0
    for m in msgs[:3]:
        run(m)
    run(msgs[2])  # a redelivery: nothing set aside again
    assert sample("broker_reference_frames_set_aside_total", reason="alignment") == 2.0
    omitted = config.state_dir / "refs" / "T1" / "F1" / "r" / "omitted"
    os.utime(omitted / "F1-0.fits", (time.time() - 7200, time.time() - 7200))  # arrived 2 h ago
    assert sample("broker_reference_frames_waiting") == 2.0
    assert 7199 < sample("broker_reference_oldest_waiting_seconds") < 7300
    run(msgs[3])
    searched = run(msgs[4])
    assert [o.left_out for o in searched] == ["SUBTRACTED", "dead_lettered", None]
    assert sample("broker_left_out_searched_total", outcome="SUBTRACTED") == 1.0
    assert sample("broker_left_out_searched_total", outcome="dead_lettered") == 1.0
    assert sample("broker_errors_total", reason="alignment") == 1.0
    assert sample("broker_reference_frames_waiting") == 0.0  # the field has its reference: searched
    assert sample("broker_reference_frames_set_aside_total", reason="alignment") == 2.0


class _RefusingProducer:
    """A transactional producer whose client refuses every record to ``refuse`` (``MSG_SIZE_TOO_LARGE`` at produce)."""

    def __init__(self, refuse: str) -> None:
        self.refuse, self.open, self.committed = refuse, [], []

    def begin_transaction(self) -> None:
        self.open = []

    def produce(self, topic, value=None, key=None, partition=None, headers=None, on_delivery=None) -> None:
        from confluent_kafka import KafkaError, KafkaException

        if topic == self.refuse:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.open.append((topic, value, headers))

    def send_offsets_to_transaction(self, offsets, metadata, timeout) -> None:
        pass

    def commit_transaction(self, timeout) -> None:
        self.committed += self.open

    def abort_transaction(self, timeout) -> None:
        self.open = []


class _Group:
    def consumer_group_metadata(self) -> None:
        return None


def _completing(config, max_message_bytes: int | None = None):
    """The runner of the subtract stage, and the outputs of F1-4 (completing the flipped field's reference)."""
    from streams.lineage import Lineage
    from streams.runner import StageRunner
    from streams.settings import KafkaSettings
    from streams.stages import subtract_handler

    runner = StageRunner("subtract", topics.INGESTED, subtract_handler(config), KafkaSettings("127.0.0.1:1"),
                         StageMetrics("subtract"), **({} if max_message_bytes is None else
                                                      {"max_message_bytes": max_message_bytes}))
    msgs = [_ingested(config, f, offset=i) for i, f in enumerate(_refused_build_field(flipped=True))]
    for m in msgs:
        outs, _ = runner._handle(m, Lineage(m.topic, m.partition, m.offset))
    return runner, msgs[4], outs


def _letters(outs) -> list[tuple]:
    """(frame id or None, reason, topic, offset, message) of each dead letter in ``outs``."""
    got = []
    for out in outs:
        assert out.topic == topics.dlq("subtract"), out.topic
        d = serde.decode("dlq", out.value, out.headers)
        left = d["headers"].get("left_out_frame")
        got.append((left and left.decode(), d["reason"], d["topic"], d["offset"], d["message"]))
    return got


def test_left_out_searches_of_a_transaction_the_broker_refuses_keep_dead_letters_of_their_own(config):
    """The broker refused the completing message's outputs at commit: only its dead letter was committed.

    The ledger already held F1-0 (SUBTRACTED, its transient found) and F1-1 (alignment) as searched
    in that transaction, so no later message searched them: both outcomes were lost, with no dead
    letter. Now each left-out search commits a dead letter of its own (under its first position on
    ingested, reason the refusal's) beside the input's, and the metrics count them dead-lettered.
    """
    from streams.runner import TopicPartition

    runner, msg, outs = _completing(config)
    assert [o.left_out for o in outs] == ["SUBTRACTED", "dead_lettered", None]
    producer = _RefusingProducer(topics.CANDIDATES)
    runner._progress = None
    assert runner._commit_in_transaction(_Group(), producer, msg, outs, {}, [TopicPartition(msg.topic, 0, 5)])
    letters = _letters(outs)
    assert [lt[:4] for lt in letters] == [("F1-0", "too_large", topics.INGESTED, 0),
                                          ("F1-1", "alignment", topics.INGESTED, 1),
                                          (None, "too_large", topics.INGESTED, 4)]
    assert letters[0][4].startswith("frame F1-0, left out of its reference's co-add, searched against it in the "
                                    "transaction of ingested:0:4: its batch (SUBTRACTED, ")
    assert "were refused, the broker refused an output to 'candidates': MSG_SIZE_TOO_LARGE" in letters[0][4]
    assert [t for t, _, _ in producer.committed] == [topics.dlq("subtract")] * 3
    from broker.errors import NotResendable
    from streams.deadletters import DeadLetter, resend

    record = serde.decode("dlq", outs[0].value, outs[0].headers)
    with pytest.raises(NotResendable, match=r"is the search of frame 'F1-0', which its field's new reference left "
                       r"out, against that reference, dead-lettered \(too_large: it failed, or its batch was "
                       r"refused\); it holds no frame \(the frame's record stays on ingested\[0\]@0"):
        resend(DeadLetter(topics.dlq("subtract"), 0, 0, record), producer=None)
    runner._observe(msg, outs, 0.0, 1.0)
    sample = runner.metrics.registry.get_sample_value
    assert sample("broker_left_out_searched_total", {"stage": "subtract", "outcome": "dead_lettered"}) == 2.0
    assert sample("broker_left_out_searched_total", {"stage": "subtract", "outcome": "SUBTRACTED"}) is None
    assert sample("broker_errors_total", {"stage": "subtract", "reason": "too_large"}) == 2.0


def test_left_out_searches_of_an_input_over_the_size_limit_keep_dead_letters_of_their_own(config):
    """An output over the runner's size limit dead-lettered the input alone: the left-out searches were lost."""
    from streams.runner import HEADROOM_BYTES

    _, _, outs = _completing(config)
    small = max(len(o.value) + sum(len(k) + len(v) for k, v in o.headers.items()) for o in outs[1:])
    runner, _, outs = _completing(replace(config, state_dir=config.state_dir.with_name("again")),
                                  HEADROOM_BYTES + small + 1)  # the batch of F1-0 is the one too large
    assert [lt[:2] for lt in _letters(outs)] == [("F1-0", "too_large"), ("F1-1", "alignment"), (None, "too_large")]


def test_a_left_out_frames_batch_carries_its_own_shutter_close_and_stays_out_of_the_latency_histogram(config):
    """A left-out batch carried the completing message's t.exposure_end (and its t.ingest.*): its delay was hidden.

    Its shutter closed nights earlier, so the alerts' ``timing.exposure_end`` and the latency
    metrics under-reported it. The batch now carries its own (MJD-OBS + EXPTIME) and
    ``t.searched_late``; the next stage keeps both (``_checked``) and leaves the message out of
    ``broker_latency_from_exposure_seconds`` (the SLO's: late by design, not a pipeline behind).
    """
    from astropy.time import Time

    from streams.runner import StageRunner, TopicPartition
    from streams.settings import KafkaSettings

    runner, msg, outs = _completing(config)
    msg.headers = {**msg.headers, "t.exposure_end": b"1700000000.0", "t.ingest.start": b"1699999990.0"}
    timing = {"t.exposure_end": b"1700000000.0", "t.ingest.start": b"1699999990.0", "t.subtract.start": b"1.7e9",
              "src": b"ingested:0:4"}
    producer, runner._progress = _RefusingProducer("none"), None
    assert runner._commit_in_transaction(_Group(), producer, msg, outs, timing, [TopicPartition(msg.topic, 0, 5)])
    late, letter, own = (headers for _, _, headers in producer.committed)
    f1_0 = _refused_build_field(flipped=True)[0].meta
    assert float(late["t.exposure_end"]) == pytest.approx(Time(f1_0.mjd_end, format="mjd").unix, abs=0.01)
    assert "t.searched_late" in late and "t.ingest.start" not in late
    assert (late["t.subtract.start"], late["src"]) == (b"1.7e9", b"ingested:0:4")
    assert own["t.exposure_end"] == letter["t.exposure_end"] == b"1700000000.0" and "t.searched_late" not in own

    classify = StageRunner("classify", topics.CANDIDATES, lambda m: [], KafkaSettings("127.0.0.1:1"),
                           StageMetrics("classify"))
    for headers in (late, own):
        checked = classify._checked(InMessage(topics.CANDIDATES, 0, 0, None, b"", dict(headers), 0))
        assert checked.headers.keys() == headers.keys()  # t.searched_late is a valid timing header
        classify._observe(checked, [], 0.0, 1.0)
    count = classify.metrics.registry.get_sample_value("broker_latency_from_exposure_seconds_count",
                                                       {"stage": "classify"})
    assert count == 1.0  # the completing frame's batch only
