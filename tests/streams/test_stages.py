"""Stage handlers called directly (no broker): frames by reference, rejects, metrics endpoint."""

from __future__ import annotations

import urllib.request
from dataclasses import replace

import pytest

from broker.config import load_config
from broker.errors import ChecksumMismatch, ConfigError, FrameStoreError, InvalidFrame, PoorQuality
from broker.frame import encode_fits
from broker.ingest import IngestConfig
from streams import serde, topics
from streams.framestore import FrameStore
from streams.metrics import StageMetrics
from streams.producer import frame_headers, frame_record
from streams.runner import InMessage
from streams.stages import ingest_handler
from tests.helpers import star_frame


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
    assert rec["uri"] == uri and rec["fits"] is None and rec["quality"]["n_stars"] > 10
    bad = frame_record(frame, payload, inline=False, uri=uri) | {"sha256": "0" * 64}
    with pytest.raises(ChecksumMismatch):
        ingest_handler(config)(_msg(bad))
    with pytest.raises(FrameStoreError):
        ingest_handler(config)(_msg(frame_record(frame, payload, inline=False, uri="/etc/passwd")))


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
        "import streams.subscriber, streams.producer\n"
        "from streams.stages import STAGES, stage\n"
        "cfg = load_config(state_dir=sys.argv[1] + '/state', frame_store=sys.argv[1] + '/frames')\n"
        "for s in STAGES:\n"
        "    if s.name != 'classify':\n"
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
    assert names == ["frames", "ingested", "candidates", "classified", "scored", "alerts", "alerts.g", "alerts.r",
                     "dlq.ingest", "dlq.subtract", "dlq.classify", "dlq.score", "dlq.alert"]
    for before, after in zip(STAGES, STAGES[1:], strict=False):  # consecutive pairs
        assert after.input == before.output  # a chain: each stage reads the previous one's output
    assert stage("subtract").writes == ("candidates", "dlq.subtract")
    with pytest.raises(ConfigError, match="unknown stage"):
        stage("nonsense")
