"""Hostile input (issue 27): every input a hostile telescope, user or client sent, handled.

Each input the issue found mishandled is a test: the frame-level cases (frames and their records)
and the stream-level cases (topic names, message sizes, headers, lineage) are tested where they are
handled (``tests/broker/``, ``tests/streams/test_runner.py``, ``test_stages.py``,
``test_subscriber.py``, ``test_lineage.py``). This module adds the hostile run: all of them,
mixed with good frames, fed to the five stages and the archive on the embedded broker (one run
shared by the ``test_hostile_run_*`` tests), which checks that every stage process is alive at the
end, that every good frame's alerts are there, and that each hostile input was dead-lettered with an
intelligible reason (or, for a band or a header that must not cost a frame its alerts, that its
alerts are there).
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import io
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import fastavro
import numpy as np
import pytest

from broker.frame import Frame, encode_fits
from broker.simulate import SimConfig, SkySimulator
from streams import serde, topics
from streams.demo import MATCH_PX
from streams.monitor import read_all
from streams.producer import frame_headers, frame_record
from streams.runner import EXPOSURE_END

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

#: Small frames, two fields: F001 in band r, F002 relabelled ``r'`` (a band no topic name may hold).
SIM = SimConfig(shape=(256, 256), fields=("F001", "F002"), filters=("r",), n_stars=150, n_galaxies=5,
                n_transients=10, n_variables=3, n_moving=0, n_cosmic_rays=0.0)
PRIME = "r'"


@dataclass
class Case:
    """A hostile input: where it goes, which stage must dead-letter it, and with which reasons.

    ``reasons`` None: any intelligible reason (a :class:`~broker.errors.BrokerError`'s, not
    ``unexpected:*``). ``frame_id``: the dead letter is found by the frame id inside its value (a
    frame re-sent reaches a later stage than the topic it was sent to); else by its offset.
    """

    topic: str
    stage: str
    reasons: frozenset[str] | None
    frame_id: str | None = None
    offset: int = -1


#: The hostile inputs of issue 27 that must be dead-lettered, and by whom.
CASES: dict[str, Case] = {
    "exptime_nan": Case(topics.FRAMES, "ingest", frozenset({"unparseable_header"})),
    "gain_negative": Case(topics.FRAMES, "ingest", frozenset({"implausible_header"})),
    "mjd_minus_1e6": Case(topics.FRAMES, "ingest", frozenset({"implausible_header"})),
    "mjd_9.9e7": Case(topics.FRAMES, "ingest", frozenset({"implausible_header"})),
    "exptime_1e300": Case(topics.FRAMES, "ingest", frozenset({"implausible_header"})),
    "all_zero_after_reference": Case(topics.FRAMES, "ingest", frozenset({"implausible_pixels"})),
    "binary_in_reference_building": Case(topics.FRAMES, "ingest", frozenset({"implausible_pixels"})),
    "record_lies_about_size": Case(topics.FRAMES, "ingest", frozenset({"record_mismatch"})),
    "compressed_8192_squared": Case(topics.FRAMES, "ingest",
                                    frozenset({"implausible_compression", "too_many_pixels"})),
    "http_frame_uri": Case(topics.FRAMES, "ingest", frozenset({"frame_store"})),
    "near_64_mib_message": Case(topics.FRAMES, "ingest", None),
    "frame_sent_again": Case(topics.FRAMES, "subtract", frozenset({"duplicate_frame"})),
    "tiny_frame_on_ingested": Case(topics.INGESTED, "subtract", frozenset({"bad_shape"})),
    # frame-level cases added by the frames part (``_frame_checks_inputs``, ``_clouded``)
    "renamed_copy_sent_again": Case(topics.FRAMES, "subtract", frozenset({"duplicate_frame"}),
                                    frame_id="SIM1-F001-renamed"),
    "clouded_after_reference": Case(topics.FRAMES, "subtract", frozenset({"poor_quality"}),
                                    frame_id="SIM1-F001-clouded"),
    "store_uri_chained_to_http": Case(topics.FRAMES, "ingest", frozenset({"frame_store"})),
    "record_not_from_ingest": Case(topics.INGESTED, "subtract", frozenset({"not_ingested"})),
    "compressed_8192_squared_on_ingested": Case(topics.INGESTED, "subtract", frozenset({"implausible_compression"})),
    "forged_src_on_ingested": Case(topics.INGESTED, "subtract", frozenset({"decode"})),
    "nan_coordinates": Case(topics.CLASSIFIED, "score", frozenset({"bad_coordinates"})),
    "forged_src_on_alerts": Case(topics.ALERTS, "archive", frozenset({"decode"})),
    "foreign_alert_container": Case(topics.ALERTS, "archive", frozenset({"decode"})),
}


@dataclass
class HostileRun:
    """What went in (the good frames' truths, the cases) and what came out."""

    settings: object
    cases: dict[str, Case]
    good: dict[str, object] = field(default_factory=dict)  # frame id -> truth
    bad_header_frame: str = ""
    prime_frames: tuple[str, ...] = ()
    alive: list[bool] = field(default_factory=list)
    returncodes: list[int | None] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    prime_topic_alerts: list[dict] = field(default_factory=list)
    batches: list[dict] = field(default_factory=list)
    dead: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0


def _variant(frame: Frame, frame_id: str, data: np.ndarray | None = None, **cards) -> Frame:
    """``frame`` under another frame id, with header cards changed and, optionally, other pixels."""
    from broker.frame import meta_from_header

    header = frame.header.copy()
    header.update({k.replace("_", "-"): v for k, v in cards.items()})
    header["FRAMEID"] = frame_id  # the record then says what the FITS says, as a producer's does
    return Frame(meta_from_header(header), frame.data if data is None else data, header)


def _with_raw_card(payload: bytes, keyword: str, value: str) -> bytes:
    """``payload`` with the card ``keyword`` rewritten verbatim (what astropy refuses to write: ``EXPTIME = NaN``)."""
    i = payload.find(f"{keyword:<8}=".encode())
    assert i >= 0
    return payload[:i] + f"{keyword:<8}= {value:>20}".ljust(80).encode() + payload[i + 80:]


def _bomb(frame: Frame) -> bytes:
    """An all-zero 8192^2 16-bit frame, RICE-compressed to ~1.1 MB, with ``frame``'s header."""
    from astropy.io import fits

    header = frame.header.copy()
    header["FRAMEID"] = "SIM1-F001-bomb"
    hdu = fits.CompImageHDU(np.zeros((8192, 8192), np.uint16), header=header, compression_type="RICE_1")
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    return buf.getvalue()


def _near_limit(frame: Frame) -> bytes:
    """A ``frame`` record, ``frames`` message within 300 bytes of the 64 MiB limit: garbage FITS with its SHA-256."""
    rec = frame_record(frame, b"")
    target = topics.MAX_MESSAGE_BYTES - 300 - len(b"SIM1/F001") - sum(len(k) + len(v) for k, v in
                                                                       frame_headers(1.7e9).items())
    fits_bytes = b"SIMPLE  = garbage" + bytes(target - 2000)
    for _ in range(3):  # the record's overhead, then the length varint's
        rec.update(fits=fits_bytes, sha256=hashlib.sha256(fits_bytes).hexdigest(), size_bytes=len(fits_bytes))
        fits_bytes = fits_bytes + bytes(target - len(serde.encode("frame", rec)))
    rec.update(fits=fits_bytes, sha256=hashlib.sha256(fits_bytes).hexdigest(), size_bytes=len(fits_bytes))
    value = serde.encode("frame", rec)
    assert len(value) == target
    return value


def _batch(frame_id: str, cands: list, band: str = "r") -> dict:
    """A ``candidates`` batch (v2) of ``cands``."""
    return {"frame_id": frame_id, "telescope": "SIM1", "field": "F001", "filter": band, "mjd_start": 60010.5,
            "exptime": 60.0, "magzp": 27.5, "status": "SUBTRACTED", "reference_frames": ["a"], "diagnostics": {},
            "model_versions": {"rb": "rb-1"}, "nx": 256, "ny": 256, "wcs_header": "", "limiting_flux": None,
            "candidates": [serde.candidate_to_record(c) for c in cands]}


def _stream_inputs() -> list[tuple[str, str, bytes, dict[str, bytes]]]:
    """(case, topic, value, headers) of the hostile inputs sent straight to internal and alert topics."""
    from tests.helpers import candidate
    from tests.schemas.test_schemas import _alert

    foreign = io.BytesIO()
    fastavro.writer(foreign, fastavro.parse_schema({"type": "record", "name": "Other", "fields": [
        {"name": "objectId", "type": "string"}]}), [{"objectId": "ZTF"}])
    nan_cand = candidate(cand_id="SIM1-F001-nan/0", ra=float("nan"))
    nan_cand.rb = 0.9
    candidates_tag = {serde.SCHEMA_HEADER: serde.schema_tag("candidates").encode()}
    return [
        ("forged_src_on_ingested", topics.INGESTED, b"\x00not a frame record",
         {serde.SCHEMA_HEADER: b"frame/1", "src": b"frames:0:999999999"}),
        ("nan_coordinates", topics.CLASSIFIED, serde.encode("candidates", _batch("SIM1-F001-nan", [nan_cand])),
         candidates_tag),
        ("forged_src_on_alerts", topics.ALERTS, b"\x00not an alert", {"src": b"scored:0:999999999"}),
        ("foreign_alert_container", topics.ALERTS, foreign.getvalue(), {"_format": b"avro"}),
        # read by the subscriber at the end: a null rb (drawn with --png-dir) and a garbage stamp
        ("", topics.ALERTS, serde.encode_ocf("alert", _null_rb(_alert()[1])), {"_format": b"avro"}),
        ("", topics.ALERTS, serde.encode_ocf("alert", _garbage_stamp(_alert()[1])), {"_format": b"avro"}),
    ]


def _null_rb(alert: dict) -> dict:
    alert = copy.deepcopy(alert)
    alert["scores"]["rb"], alert["candid"], alert["alertId"] = None, "hostile-nullrb/0", 271
    return alert


def _garbage_stamp(alert: dict) -> dict:
    alert = copy.deepcopy(alert)
    alert["candid"], alert["alertId"] = "hostile-stamp/0", 272
    alert["cutoutDifference"]["stampData"] = gzip.compress(b"SIMPLE  =                    T" + bytes(100))
    return alert


def _frame_inputs(sim: SkySimulator) -> tuple[list[tuple[str, Frame | None, bytes, dict[str, bytes]]], dict]:
    """The ``frames`` messages in order: (case or "", frame, value, headers); and the good frames' truths."""
    good = {}
    f1 = [sim.frame("F001", "r", e) for e in range(6)]
    base = f1[5][0]  # never sent as itself: hostile variants of it cannot collide with a good frame

    def send(frame: Frame, payload: bytes | None = None, **rec) -> tuple[Frame, bytes, dict[str, bytes]]:
        record = frame_record(frame, encode_fits(frame) if payload is None else payload) | rec
        return frame, serde.encode("frame", record), frame_headers(time.time())

    msgs: list[tuple[str, Frame | None, bytes, dict[str, bytes]]] = []
    for epoch in range(5):
        frame, truth = f1[epoch]
        good[truth.frame_id] = truth
        if epoch == 4:  # a bad timing header on a good frame: its alerts must survive
            msgs.append(("bad_exposure_end", *send(frame)[:2], {**frame_headers(0), EXPOSURE_END: b"not-a-time"}))
        else:
            msgs.append(("", *send(frame)))
        if epoch == 0:
            binary = _variant(base, "SIM1-F001-binary", (np.arange(base.data.size) % 2).reshape(base.shape)
                              .astype(np.float32))
            msgs.append(("binary_in_reference_building", *send(binary)))
        if epoch == 2:
            zero = _variant(base, "SIM1-F001-zero", np.zeros_like(base.data))
            msgs.append(("all_zero_after_reference", *send(zero)))
            for name, cards in (("gain_negative", {"GAIN": -1.5}), ("mjd_minus_1e6", {"MJD_OBS": -1e6}),
                                ("mjd_9.9e7", {"MJD_OBS": 9.9e7}), ("exptime_1e300", {"EXPTIME": 1e300})):
                msgs.append((name, *send(_variant(base, f"SIM1-F001-{name}", **cards))))
            nan = _with_raw_card(encode_fits(_variant(base, "SIM1-F001-nanexp")), "EXPTIME", "NaN")
            msgs.append(("exptime_nan", *send(base, nan)))
            msgs.append(("record_lies_about_size", *send(_variant(base, "SIM1-F001-liar"), ny=-5, nx=10 ** 9)))
            msgs.append(("compressed_8192_squared", *send(_variant(base, "SIM1-F001-bomb"), _bomb(base))))
            msgs.append(("http_frame_uri", *send(_variant(base, "SIM1-F001-http"), fits=None,
                                                  uri="simplecache::http://127.0.0.1:9/frame.fits")))
            msgs.append(("near_64_mib_message", base, _near_limit(base), frame_headers(time.time())))
        if epoch == 3:  # the same frame again, at once
            msgs.append(("frame_sent_again", *send(frame)))
            msgs.append(("clouded_after_reference", *send(_clouded(base))))
        if epoch == 4:  # the frame of epoch 3 again, under another id: the same pixels
            msgs.append(("renamed_copy_sent_again", *send(_variant(f1[3][0], "SIM1-F001-renamed"))))
    for epoch in range(4):  # F002 in band r': a reference of three, then one subtracted
        frame, truth = sim.frame("F002", "r", epoch)
        header = frame.header.copy()
        header["FILTER"] = PRIME
        prime = Frame(dataclasses.replace(frame.meta, filter=PRIME, frame_id=f"{truth.frame_id}-prime"), frame.data,
                      header)
        good[prime.meta.frame_id] = dataclasses.replace(truth, frame_id=prime.meta.frame_id)
        msgs.append(("", *send(prime)))
    return msgs, good


def _tiny_ingested(sim: SkySimulator) -> bytes:
    """A 16x16 frame on ``ingested`` with a real frame's quality record (once "SUBTRACTED", 0 candidates)."""
    from broker.ingest import IngestConfig, ingest

    frame = sim.frame("F001", "r", 5)[0]
    tiny = _variant(frame, "SIM1-F001-tiny", frame.data[:16, :16].copy())
    record = frame_record(tiny, encode_fits(tiny)) | {"quality": ingest(frame, IngestConfig()).to_record()}
    return serde.encode("frame", record)


def _clouded(frame: Frame) -> Frame:
    """``frame``'s field clouded out: sky noise and no star (ingest flags it ``few_stars``; once subtracted)."""
    noise = np.random.default_rng(4).normal(float(np.median(frame.data)), 15.0, frame.shape).astype(np.float32)
    return _variant(frame, "SIM1-F001-clouded", np.round(noise))


def _frame_checks_inputs(sim: SkySimulator, store: object) -> list[tuple[str, str, bytes, dict[str, bytes]]]:
    """(case, topic, value, headers) of the frame-level inputs that need the stages' frame store or ``ingested``.

    A URI inside the frame store chained to HTTP (``<store>/x::http://...``) was
    ``unexpected:ImportError``; on ``ingested``, a record ingest never wrote (no quality) and the
    8192^2 compressed frame, which subtract would have decompressed into ~600 MB it keeps.
    """
    from tests.broker.test_frame import _bomb as bomb_of_side

    frame = sim.frame("F001", "r", 5)[0]
    chained = frame_record(_variant(frame, "SIM1-F001-chained"), encode_fits(frame)) | {
        "fits": None, "uri": f"{store}/x::http://127.0.0.1:9/frame.fits"}
    raw = frame_record(frame, encode_fits(frame))  # straight from a producer: quality null
    quality = {"sky": 200.0, "sky_rms": 15.0, "fwhm": 3.0, "fwhm_arcsec": 3.0, "n_stars": 30, "limit_flux": 300.0,
               "limit_mag": None, "nan_fraction": 0.0, "saturated_fraction": 0.0, "flags": []}
    bomb = frame_record(_variant(frame, "SIM1-F001-bomb-ingested"), bomb_of_side()) | {"quality": quality}
    return [(name, topic, serde.encode("frame", rec), frame_headers(time.time())) for name, topic, rec in (
        ("store_uri_chained_to_http", topics.FRAMES, chained), ("record_not_from_ingest", topics.INGESTED, raw),
        ("compressed_8192_squared_on_ingested", topics.INGESTED, bomb))]


def _run(settings, workdir) -> HostileRun:
    """Send everything, run the stages until drained, collect the topics."""
    from confluent_kafka import Producer

    from streams.demo import start_stages, stop_stages, wait_until_drained
    from streams.stages import pipeline_topics

    sim = SkySimulator(SIM, seed=11)
    frames, good = _frame_inputs(sim)
    run = HostileRun(settings, copy.deepcopy(CASES), good)
    run.bad_header_frame = next(f.meta.frame_id for name, f, _, _ in frames if name == "bad_exposure_end")
    run.prime_frames = tuple(i for i in good if i.endswith("-prime"))
    topics.create_topics(settings.bootstrap, pipeline_topics(("r",)))  # not r': its topic is a surprise
    producer = Producer(settings.producer())

    def produce(name: str, topic: str, value: bytes, headers: dict[str, bytes], key: bytes = b"SIM1/F001") -> None:
        def delivered(err, msg) -> None:
            assert err is None, err
            if name in run.cases:
                run.cases[name].offset = msg.offset()

        producer.produce(topic, value, key, headers=headers, on_delivery=delivered)

    for name, topic, value, headers in _stream_inputs():  # before the stages first see their partitions
        produce(name, topic, value, headers)
    produce("tiny_frame_on_ingested", topics.INGESTED, _tiny_ingested(sim), frame_headers(time.time()))
    for name, topic, value, headers in _frame_checks_inputs(sim, workdir / "frames"):
        produce(name, topic, value, headers)
    producer.flush(30)
    t0 = time.monotonic()
    procs = start_stages(settings.bootstrap, settings.app_id, workdir)
    try:
        for name, frame, value, headers in frames:
            key = f"{frame.meta.telescope}/{frame.meta.field}".encode() if frame is not None else b"SIM1/F001"
            produce(name, topics.FRAMES, value, headers, key)
            if name == "frame_sent_again":
                run.cases[name].frame_id = frame.meta.frame_id
        assert producer.flush(60) == 0
        wait_until_drained(settings, procs, timeout=900)
        run.alive = [p.poll() is None for p in procs]
    finally:
        stop_stages(procs)
    run.seconds = time.monotonic() - t0
    run.returncodes = [p.returncode for p in procs]
    _collect(run)
    return run


def _collect(run: HostileRun) -> None:
    from streams.framing import decode_alert
    from streams.stages import STAGE_NAMES

    settings = run.settings
    for msg in read_all(settings, [topics.ALERTS]):
        try:
            run.alerts += decode_alert(msg.key(), msg.value(), dict(msg.headers() or []))
        except Exception:  # the hostile messages sent to the topic
            continue
    prime = topics.filter_topic(topics.ALERTS, PRIME)
    for msg in read_all(settings, [prime]):
        run.prime_topic_alerts += decode_alert(msg.key(), msg.value(), dict(msg.headers() or []))
    run.batches = [serde.decode("candidates", m.value(), dict(m.headers()))
                   for m in read_all(settings, [topics.SCORED])]
    run.dead = {s: [serde.decode("dlq", m.value(), dict(m.headers())) for m in read_all(settings, [topics.dlq(s)])]
                for s in STAGE_NAMES}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The hostile run (one per module): its broker stays up for the subscriber test."""
    from streams.embedded import EmbeddedKafka
    from streams.settings import KafkaSettings

    with EmbeddedKafka() as kafka:
        yield _run(KafkaSettings(kafka.bootstrap, app_id="hostile-test"), tmp_path_factory.mktemp("hostile"))


def test_hostile_run_leaves_every_stage_alive(hostile):
    """Every stage process ran to the end of the run (a SIGTERM then stops each cleanly).

    The run (this test's setup) takes 60-80 s on the 2-core build machine: six stage processes
    start (torch in classify), a 64 MiB message and two 8192^2 compressed frames are refused, and
    nine 256x256 frames are subtracted; every other test of the module reads the same run.
    """
    assert hostile.alive == [True] * len(hostile.alive) and len(hostile.alive) == 6
    assert hostile.returncodes == [0] * 6


def _my_alerts(run: HostileRun, frame_id: str) -> list[dict]:
    return [a for a in run.alerts if a["provenance"]["frame_id"] == frame_id]


def test_hostile_run_keeps_every_good_frames_alerts(hostile):
    """Every good frame has its batch, every candidate of a subtracted one its alert (once), bright transients found."""
    statuses = {b["frame_id"]: b["status"] for b in hostile.batches}
    expected = ["REFERENCE_BUILDING"] * 2 + ["IN_REFERENCE"] + ["SUBTRACTED"] * 2
    assert [statuses.get(i) for i in hostile.good if not i.endswith("-prime")] == expected
    assert [statuses.get(i) for i in hostile.prime_frames] == expected[:4]
    counts = Counter(a["candid"] for a in hostile.alerts)
    assert counts and max(counts.values()) == 1  # none twice: the frame sent again made none
    subtracted = [b for b in hostile.batches if b["status"] == "SUBTRACTED"]
    assert sorted(b["frame_id"] for b in subtracted) == sorted(i for i, s in statuses.items() if s == "SUBTRACTED")
    for batch in subtracted:
        assert batch["frame_id"] in hostile.good
        mine = _my_alerts(hostile, batch["frame_id"])
        assert mine and {a["candid"] for a in mine} == {c["cand_id"] for c in batch["candidates"]}
        for inj in hostile.good[batch["frame_id"]].of_kind("transient"):
            if inj.snr >= 10:
                d = min(np.hypot(a["source"]["x"] - inj.x, a["source"]["y"] - inj.y) for a in mine)
                assert d <= MATCH_PX, f"{batch['frame_id']}: {inj.source_id} (S/N {inj.snr:.1f}) missed by {d:.2f} px"


def test_hostile_run_a_bad_exposure_end_header_costs_no_alert(hostile):
    """The frame sent with ``t.exposure_end: not-a-time`` has its alerts, their exposure end unknown (NaN)."""
    mine = _my_alerts(hostile, hostile.bad_header_frame)
    assert mine and all(math.isnan(a["timing"]["exposure_end"]) for a in mine)
    others = [a for a in hostile.alerts if a["provenance"]["frame_id"] != hostile.bad_header_frame
              and a["provenance"]["frame_id"] in hostile.good]
    assert others and all(math.isfinite(a["timing"]["exposure_end"]) for a in others)


def test_hostile_run_a_band_no_topic_name_may_hold_has_its_alerts(hostile):
    """FILTER ``r'``: the alerts are on ``alerts`` and on ``alerts.r_-<hash>`` (the alert stage used to exit)."""
    (science,) = [i for i in hostile.prime_frames if _my_alerts(hostile, i)]
    mine = _my_alerts(hostile, science)
    assert all(a["source"]["filter"] == PRIME for a in mine)
    assert sorted(a["candid"] for a in hostile.prime_topic_alerts) == sorted(a["candid"] for a in mine)
    assert topics.filter_topic(topics.ALERTS, PRIME).startswith("alerts.r_-")


def _dead_letter_of(run: HostileRun, case: Case) -> list[dict]:
    if case.frame_id is not None:
        def frame_id(d: dict) -> str | None:
            try:
                return serde.decode("frame", d["value"], {serde.SCHEMA_HEADER: d["headers"].get("schema", b"")}
                                    )["frame_id"]
            except Exception:
                return None
        return [d for d in run.dead[case.stage] if frame_id(d) == case.frame_id]
    return [d for d in run.dead[case.stage] if (d["topic"], d["offset"]) == (case.topic, case.offset)]


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_run_dead_letters_each_hostile_input_with_its_reason(hostile, name):
    """Each hostile input is dead-lettered once, by the stage that must catch it, with an intelligible reason."""
    case = hostile.cases[name]
    assert case.offset >= 0
    (dead,) = _dead_letter_of(hostile, case)
    assert not dead["reason"].startswith("unexpected:") and dead["message"], dead["reason"]
    if case.reasons is not None:
        assert dead["reason"] in case.reasons, (dead["reason"], dead["message"])
    if name == "near_64_mib_message":  # kept: its first MiB, its length and checksum
        assert dead["truncated"] and dead["value_size"] > topics.MAX_MESSAGE_BYTES - 400
        assert len(dead["value"]) == 1024 * 1024 and len(dead["value_sha256"]) == 64


def test_hostile_run_dead_letters_nothing_else_and_nothing_unexpected(hostile):
    """Every dead letter is one of the hostile inputs (no good frame lost), none an unexpected error."""
    reasons = [(s, d["reason"]) for s, dead in hostile.dead.items() for d in dead]
    assert not [r for r in reasons if r[1].startswith("unexpected:")], reasons
    assert len(reasons) == len(CASES), reasons


def test_hostile_run_subscriber_shows_the_alerts_among_hostile_records(hostile, tmp_path):
    """``broker subscribe`` (text output, ``--filter``, ``--png-dir``) over the run's alerts and the hostile records.

    The topic also holds a null-rb alert, one with a garbage stamp, a foreign container and garbage: the
    subscriber shows every alert that matches, draws each (a note for the stamp it cannot draw) and exits 0.
    """
    from typer.testing import CliRunner

    from streams.cli import app

    real = sorted(a["candid"] for a in hostile.alerts if a["provenance"]["frame_id"] in hostile.good)
    chosen = (*real[:3], "hostile-nullrb/0", "hostile-stamp/0")  # drawing each costs ~0.3 s
    res = CliRunner().invoke(app, ["subscribe", "--bootstrap", hostile.settings.bootstrap, "--filter",
                                   f"candid in {chosen!r} and snr > 0", "--png-dir", str(tmp_path), "--timeout", "2"])
    assert res.exit_code == 0, res.output
    shown = sorted(line.split()[1] for line in res.output.splitlines() if " RA=" in line and " rb=" in line)
    assert shown == sorted(chosen)
    assert len(list(tmp_path.glob("*.png"))) == len(shown) and "cutout not drawn" in res.output
