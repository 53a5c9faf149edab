"""The whole chain on the embedded broker: frames in, alerts out, dead letters, crash recovery.

Each test runs the five stages as separate processes (``broker stage``), exactly as the demo and a
deployment do, on small simulated frames.
"""

from __future__ import annotations

import io
import json
import signal
import time
from collections import Counter

import fastavro
import numpy as np
import pytest
from astropy.coordinates import SkyCoord

from broker.frame import Frame, encode_fits
from broker.simulate import SimConfig, SkySimulator
from streams import serde, topics
from streams.demo import start_stages, stop_stages, wait_until_drained
from streams.framestore import FrameStore
from streams.monitor import read_all
from streams.producer import FrameProducer, frame_headers, frame_record
from streams.runner import FAILPOINT_ENV
from streams.stages import STAGE_NAMES, pipeline_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
def settings():
    """A broker of its own per test: the pipeline's topic names are fixed."""
    from streams.embedded import EmbeddedKafka
    from streams.settings import KafkaSettings

    with EmbeddedKafka() as kafka:
        yield KafkaSettings(kafka.bootstrap, app_id="pipeline-test")

SIM = SimConfig(shape=(512, 512), fields=("F001",), n_stars=250, n_galaxies=25, n_transients=6,
                n_variables=4, n_moving=1, n_cosmic_rays=10.0)


def _frames(n: int, seed: int = 3):
    return list(SkySimulator(SIM, seed=seed).frames(n))


def _run(settings, workdir, send, kill=None, env=None, config=None):
    topics.create_topics(settings.bootstrap, pipeline_topics(SIM.filters))
    procs = start_stages(settings.bootstrap, settings.app_id, workdir, config, env=env)
    try:
        producer = FrameProducer(settings, FrameStore(str(workdir / "frames")), 8 << 20, 1 << 30)
        send(producer)
        producer.flush()
        if kill:
            procs = kill(procs)
        wait_until_drained(settings, procs, timeout=600)
    finally:
        stop_stages(procs)
    assert [p.returncode for p in procs] == [0] * len(STAGE_NAMES)  # SIGTERM: a clean stop
    alerts = []
    for msg in read_all(settings, [topics.ALERTS]):
        assert dict(msg.headers())["_format"] == b"avro"
        alerts += list(fastavro.reader(io.BytesIO(msg.value())))  # plain fastavro, as subscribers do
    batches = [serde.decode("candidates", m.value(), dict(m.headers()))
               for m in read_all(settings, [topics.CANDIDATES])]
    dead = {s: [serde.decode("dlq", m.value(), dict(m.headers())) for m in read_all(settings, [topics.dlq(s)])]
            for s in STAGE_NAMES}
    return alerts, batches, dead


def _raw(producer: FrameProducer, record: dict | bytes) -> None:
    value = record if isinstance(record, bytes) else serde.encode("frame", record)
    producer.producer.produce(topics.FRAMES, value, b"TEST/F001", headers=frame_headers(time.time()))


def _bad_frames(good: Frame) -> list[tuple[str, dict | bytes]]:
    no_wcs = good.header.copy()
    for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2"):
        no_wcs.remove(key, ignore_missing=True)
    nan = Frame(good.meta, np.full_like(good.data, np.nan), good.header)
    nowcs = Frame(good.meta, good.data, no_wcs)
    garbage = b"SIMPLE  = T / truncated download" * 40
    return [
        ("corrupt", frame_record(good, garbage)),
        ("no_wcs", frame_record(nowcs, encode_fits(nowcs))),
        ("nan_fraction", frame_record(nan, encode_fits(nan))),
        ("decode", b"\x00not an avro frame record"),
    ]


def test_frames_in_alerts_out_with_dead_letters(settings, tmp_path):
    frames = _frames(5)  # epochs 0-2 build the reference, 3-4 are subtracted
    bad = _bad_frames(frames[3][0])

    def send(producer):
        for frame, _ in frames[:3]:
            producer.publish_frame(frame, time.time())
        for _, record in bad:
            _raw(producer, record)
        for frame, _ in frames[3:]:
            producer.publish_frame(frame, time.time())

    config = tmp_path / "pipeline.toml"  # a follow-up rule every alert meets: one request per object
    config.write_text('[followup]\n[[followup.rules]]\nname = "every"\nwhen = "object.ndet >= 1"\n')
    alerts, batches, dead = _run(settings, tmp_path, send, config=config)

    # every bad frame is dead-lettered by ingest with its reason and original bytes
    assert [d["reason"] for d in dead["ingest"]] == [reason for reason, _ in bad]
    assert all(d["value"] for d in dead["ingest"]) and not any(dead[s] for s in STAGE_NAMES if s != "ingest")
    assert [b["status"] for b in batches] == ["REFERENCE_BUILDING"] * 2 + ["IN_REFERENCE"] + ["SUBTRACTED"] * 2
    # one alert per candidate, none twice
    n_cand = sum(len(b["candidates"]) for b in batches)
    assert len(alerts) == n_cand == len({a["candid"] for a in alerts})
    # every injected transient with S/N >= 10 in a subtracted frame has an alert within 1 px
    for _frame, truth in frames[3:]:
        mine = [a for a in alerts if a["provenance"]["frame_id"] == truth.frame_id]
        for inj in truth.of_kind("transient"):
            if inj.snr >= 10:
                d = min(np.hypot(a["source"]["x"] - inj.x, a["source"]["y"] - inj.y) for a in mine)
                assert d < 1.0, f"{inj.source_id} (S/N {inj.snr:.1f}) missed: nearest alert {d:.2f} px"
    a = alerts[0]
    assert a["scores"]["rb_model"] and a["scores"]["anomaly_model"]
    # what the alert is: context, light-curve features and class on every alert, and one request per object
    assert all(x["context"] is not None and x["features"]["ndet"] == x["object"]["ndet"] for x in alerts)
    assert all(x["classification"]["model"] and x["followup"]["rule"] == "every" for x in alerts)
    requests = [serde.decode("followup", m.value(), dict(m.headers())) for m in read_all(settings, [topics.FOLLOWUP])]
    assert sorted(r["object_id"] for r in requests) == sorted({x["objectId"] for x in alerts})
    again = [x for x in alerts if x["object"]["ndet"] > 1]  # detected again after its request
    assert again and all(x["followup"]["state"] == "observed" and x["followup"]["n_since"] >= 1 for x in again)
    assert [s["stage"] for s in a["timing"]["stages"]] == list(STAGE_NAMES[:STAGE_NAMES.index("alert") + 1])

    # a subscriber with a filter, writing cutout triplets
    from typer.testing import CliRunner

    from streams.cli import app

    cut = sorted(x["source"]["snr"] for x in alerts)[len(alerts) // 2]
    res = CliRunner().invoke(app, ["subscribe", "--bootstrap", settings.bootstrap, "--filter", f"snr >= {cut}",
                                   "--json", "--png-dir", str(tmp_path / "png"), "--timeout", "8"])
    assert res.exit_code == 0, res.output
    shown = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert {x["candid"] for x in shown} == {x["candid"] for x in alerts if x["source"]["snr"] >= cut}
    assert len(list((tmp_path / "png").glob("*.png"))) == len(shown)

    # a subscriber with a watchlist: two alerts' positions and an empty patch of sky
    watched = SkyCoord([x["source"]["ra"] for x in alerts[:2]], [x["source"]["dec"] for x in alerts[:2]], unit="deg")
    (tmp_path / "watch.csv").write_text("name,ra,dec\n" + "".join(
        f"w{i},{float(c.ra.deg)!r},{float(c.dec.deg)!r}\n" for i, c in enumerate(watched)) + "empty,1.0,-80.0\n")
    res = CliRunner().invoke(app, ["subscribe", "--bootstrap", settings.bootstrap, "--watchlist",
                                   str(tmp_path / "watch.csv"), "--json", "--max-alerts", str(len(alerts)),
                                   "--timeout", "20"])
    assert res.exit_code == 0, res.output
    shown = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    near = {x["candid"] for x in alerts if SkyCoord(x["source"]["ra"], x["source"]["dec"], unit="deg")
            .separation(watched).arcsec.min() <= 2.0}
    assert {x["candid"] for x in shown} == near and all(x["watchlist"][0]["name"] in ("w0", "w1") for x in shown)


def test_sigkill_mid_run_loses_and_duplicates_nothing(settings, tmp_path):
    """Stages SIGKILLed mid-run lose and duplicate nothing.

    Classify is SIGKILLed from outside mid-run; subtract, score and alert SIGKILL themselves inside
    an open transaction (outputs produced, offsets not committed). Each is restarted; every frame
    must come out exactly once, and no alert twice on the topic itself (tansu commits the killed
    transaction; the restarted alert stage must see its outputs and not make them again).
    """
    frames = _frames(8, seed=5)
    index = {s: i for i, s in enumerate(STAGE_NAMES)}

    def send(producer):
        for frame, _ in frames:
            producer.publish_frame(frame, time.time())

    def restart(procs, name):
        (procs[index[name]],) = start_stages(settings.bootstrap, settings.app_id, tmp_path, stages=(name,))

    def kill(procs):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(read_all(settings, [topics.CANDIDATES], timeout=5)) < 4:
            time.sleep(0.5)
        procs[index["classify"]].send_signal(signal.SIGKILL)
        procs[index["classify"]].wait()
        restart(procs, "classify")
        for name in ("subtract", "score", "alert"):  # they crash at their failpoints
            assert procs[index[name]].wait(timeout=300) == -signal.SIGKILL
            restart(procs, name)
        return procs

    alerts, batches, dead = _run(settings, tmp_path, send, kill, env={FAILPOINT_ENV: "subtract:5,score:6,alert:4"})

    assert not any(dead.values())
    # every frame reached the candidates topic (on tansu a crashed transaction of subtract can show
    # there twice: tansu commits it when the restarted instance re-initialises; classify drops the
    # copy by its lineage header, see streams/lineage.py)
    assert {b["frame_id"] for b in batches} == {t.frame_id for _, t in frames}
    counts = Counter(a["candid"] for a in alerts)
    assert counts and max(counts.values()) == 1  # no duplicate alerts
    expected = {c["cand_id"] for b in batches for c in b["candidates"]}
    assert set(counts) == expected  # no missing alerts
