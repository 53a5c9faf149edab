"""The command line on bad input: clear messages and exit codes, no tracebacks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.cli import app

runner = CliRunner()


def test_produce_reports_each_bad_file_and_fails(tmp_path):
    (tmp_path / "empty.fits").write_bytes(b"")
    (tmp_path / "junk.fits").write_bytes(b"\x00" * 5000)
    res = runner.invoke(app, ["produce", str(tmp_path / "empty.fits"), str(tmp_path / "junk.fits"),
                              "--bootstrap", "127.0.0.1:1"])
    assert res.exit_code == 1
    assert "rejected" in res.output and "empty payload" in res.output and "(corrupt)" in res.output
    assert "Traceback" not in res.output


def test_produce_names_a_rejected_file_once(tmp_path):
    """``rejected adir.fits: adir.fits: adir.fits: not a regular file``: each layer named the file again."""
    (tmp_path / "adir.fits").mkdir()
    (tmp_path / "junk.fits").write_bytes(b"\x00" * 5000)
    res = runner.invoke(app, ["produce", str(tmp_path / "adir.fits"), str(tmp_path / "junk.fits"),
                              "--bootstrap", "127.0.0.1:1"], terminal_width=500)
    assert res.exit_code == 1 and "not a regular file" in res.output, res.output
    assert res.output.count("adir.fits") == 1 and res.output.count("junk.fits") == 1, res.output


def test_produce_prints_a_file_s_name_as_it_is(tmp_path):
    """A path holding ``[/x]`` was read as rich markup: a MarkupError traceback instead of "rejected"."""
    odd = tmp_path / "M31[" / "L]:x:.fits"  # its path holds "M31[/L]:x:.fits"
    odd.parent.mkdir()
    odd.write_bytes(b"not FITS")
    res = runner.invoke(app, ["produce", str(odd), str(tmp_path / "M31[" / "red]"), "--bootstrap", "127.0.0.1:1"])
    assert res.exit_code == 1 and "Traceback" not in res.output, (res.output, res.exception)
    assert res.output.count("rejected") == 2 and "M31[/L]:x:.fits" in res.output and "M31[/red]" in res.output


def test_produce_names_the_frames_kafka_did_not_take_and_exits_2(tmp_path, monkeypatch):
    """``FrameNotDelivered`` out of the final flush was a traceback (exit 1) after "sent" lines."""
    from broker.errors import FrameNotDelivered
    from broker.frame import encode_fits
    from streams.producer import FrameProducer
    from tests.helpers import star_frame

    def refused(self, timeout=30.0):
        raise FrameNotDelivered("1 frame(s) not delivered to Kafka: TEST-F1-r-0001 (Broker: Message too large)")

    monkeypatch.setattr(FrameProducer, "flush", refused)
    (tmp_path / "good.fits").write_bytes(encode_fits(star_frame()))
    res = runner.invoke(app, ["produce", str(tmp_path / "good.fits"), "--bootstrap", "127.0.0.1:1"])
    assert res.exit_code == 2, res.output
    assert "not delivered to Kafka: TEST-F1-r-0001" in res.output and "Traceback" not in res.output


def test_produce_stops_on_a_frame_store_that_cannot_be_written_and_names_what_was_not_sent(tmp_path):
    """A store down was a traceback out of the first frame sent by reference."""
    from broker.frame import encode_fits
    from tests.helpers import star_frame

    (tmp_path / "blocked").write_bytes(b"")  # the store's path runs through a file: it cannot be written
    store = tmp_path / "blocked" / "frames"
    (tmp_path / "cfg.toml").write_text(f'frame_store = "{store}"\ninline_limit_bytes = 1000\n')
    for name in ("a.fits", "b.fits"):
        (tmp_path / name).write_bytes(encode_fits(star_frame()))
    res = runner.invoke(app, ["produce", str(tmp_path / "a.fits"), str(tmp_path / "b.fits"), "--config",
                              str(tmp_path / "cfg.toml"), "--bootstrap", "127.0.0.1:1"])
    assert res.exit_code == 2, res.output
    assert "cannot be written" in res.output and "b.fits" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args,message", [
    (["subscribe", "--bootstrap", "127.0.0.1:1", "--filter", "rb >"], "invalid filter expression"),
    (["subscribe", "--bootstrap", "127.0.0.1:1", "--filter", "open('x')"], "unknown name(s) ['open']"),
    (["subscribe", "--bootstrap", "127.0.0.1:1", "--filter", "rb.__class__"], "not allowed"),
    (["stage", "nonsense", "--bootstrap", "127.0.0.1:1"], "unknown stage"),
    (["train-realbogus", "--workers", "-1"], "greater than or equal to 0"),
    (["produce", "x.fits", "--bootstrap", "127.0.0.1:1", "--telescope", " ?? "], "names no telescope"),
])
def test_bad_arguments_are_explained(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and message in res.output, res.output


def test_bad_config_file_is_explained(tmp_path):
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text("[ingest]\nmax_nan_fractio = 0.3\n")
    res = runner.invoke(app, ["stage", "ingest", "--bootstrap", "127.0.0.1:1", "--config", str(cfg),
                              "--metrics-port", "-1"])
    assert res.exit_code == 2 and "unknown setting" in res.output and "max_nan_fractio" in res.output


def test_a_stage_stopped_by_repeated_bugs_exits_non_zero(monkeypatch):
    """``broker stage`` turns a StageFailure into exit code 3 (for the supervisor), not a traceback."""
    from broker.errors import StageFailure
    from streams.runner import StageRunner

    def fail(self, *args, **kwargs):
        raise StageFailure("alert: 5 unexpected errors in a row")

    monkeypatch.setattr(StageRunner, "run", fail)
    res = runner.invoke(app, ["stage", "alert", "--bootstrap", "127.0.0.1:1", "--metrics-port", "-1"])
    assert res.exit_code == 3 and "5 unexpected errors in a row" in res.output, res.output


@pytest.mark.slow
def test_a_stage_whose_kafka_does_not_answer_stops_with_the_reason_not_a_traceback():
    """Plaintext has no login to check first: the runner's ``init_transactions`` times out after 30 s.

    That KafkaException used to end ``broker stage`` with a traceback and exit code 1.
    """
    res = runner.invoke(app, ["stage", "ingest", "--bootstrap", "127.0.0.1:1", "--metrics-port", "-1"])
    assert res.exit_code == 4, res.output
    assert "stopped: Kafka at 127.0.0.1:1: Timed out" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_topics_on_a_kafka_that_does_not_answer_is_explained():
    """``broker topics`` (compose's one-shot ``topics`` service) used to end with a KafkaException's traceback."""
    res = runner.invoke(app, ["topics", "--bootstrap", "127.0.0.1:1"])
    assert res.exit_code == 2, res.output
    assert "Kafka at 127.0.0.1:1 did not answer" in res.output and "Traceback" not in res.output


def test_topics_makes_no_topic_of_an_empty_band_nor_of_no_partitions(monkeypatch):
    """``--filters g,r,`` (a trailing comma) created a topic "alerts.-e3b0c442" for the band ""."""
    import streams.topics
    from streams.settings import KafkaSettings

    made: list = []
    monkeypatch.setattr(KafkaSettings, "verify_login", lambda self: None)
    monkeypatch.setattr(streams.topics, "create_topics", lambda settings, specs: made.extend(specs) or [])
    res = runner.invoke(app, ["topics", "--bootstrap", "127.0.0.1:1", "--filters", "g, r,,"])
    assert res.exit_code == 0, (res.output, res.exception)
    alerts = sorted(t.name for t in made if t.name.startswith("alerts."))
    assert alerts == ["alerts.g", "alerts.r"]
    res = runner.invoke(app, ["topics", "--bootstrap", "127.0.0.1:1", "--partitions", "0"])
    assert res.exit_code == 2 and "partitions" in res.output


def test_a_metrics_port_that_is_taken_is_explained():
    """Two stages given one --metrics-port: the second said ``OSError: [Errno 98]`` in a traceback (exit code 1)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = runner.invoke(app, ["stage", "ingest", "--bootstrap", "127.0.0.1:1", "--metrics-port", str(port)])
    assert res.exit_code == 2, res.output
    assert f"cannot serve /metrics on 127.0.0.1:{port}: Address already in use" in res.output


@pytest.mark.parametrize("port", ["65536", "99999", "-2"])
def test_a_metrics_port_that_is_no_port_is_refused(port):
    """``--metrics-port 99999`` was ``OverflowError: bind(): port must be 0-65535`` in a traceback."""
    res = runner.invoke(app, ["stage", "ingest", "--bootstrap", "127.0.0.1:1", "--metrics-port", port])
    assert res.exit_code == 2 and "metrics-port" in res.output, (res.output, res.exception)


def test_stage_help_names_every_stage():
    from streams.stages import STAGE_NAMES

    res = runner.invoke(app, ["stage", "--help"])
    assert " | ".join(STAGE_NAMES) in res.output


@pytest.mark.parametrize("args,message", [
    (["--framing", "alerts=protobuf"], "unknown alert framing"),
    (["--framing", "confluent"], "NAME=FRAMING"),
    (["--framing", "alerts-rubin=confluent"], "no schema registry is configured"),
    (["--framing", "alerts-rubin=confluent", "--registry-url", "http://127.0.0.1:9"], "cannot register"),
])
def test_bad_alert_framings_stop_the_alert_stage_at_start_up(args, message):
    res = runner.invoke(app, ["stage", "alert", "--bootstrap", "127.0.0.1:1", "--metrics-port", "-1", *args])
    assert res.exit_code == 2 and message in res.output, res.output


@pytest.mark.kafka
def test_topics_creates_the_configured_alert_topics(kafka):
    from confluent_kafka.admin import AdminClient

    res = runner.invoke(app, ["topics", "--bootstrap", kafka.bootstrap, "--filters", "g", "--framing", "cli-ocf=ocf",
                              "--framing", "cli-fink=fink"])
    assert res.exit_code == 0, res.output
    names = set(AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics)
    assert {"cli-ocf", "cli-ocf.g", "cli-fink", "cli-fink.g"} <= names


def _small_archive(path):
    from broker.archive.log import OffsetRange
    from broker.archive.reader import Archive
    from broker.archive.rows import to_batch
    from broker.archive.writer import ArchiveWriter
    from tests.broker.test_archive import archived, objects

    writer = ArchiveWriter(Archive(path))
    writer.recover()
    alerts = archived(objects(30, 2))
    writer.commit(writer.write([to_batch(alerts)]), [OffsetRange("alerts", 0, 0, 30)])
    return Archive(path)


def test_query_prints_a_table_writes_files_and_reports_a_bad_archive(tmp_path):
    archive = _small_archive(tmp_path / "archive")
    url = str(tmp_path / "archive")
    res = runner.invoke(app, ["query", "--archive", url, "--max-rows", "3",
                              "SELECT object_id, alert.cutoutScience.stampData AS stamp, alert.source FROM alerts "
                              "ORDER BY object_id"])
    assert res.exit_code == 0 and "OBJ000000" in res.output and "OBJ000003" not in res.output, res.output
    assert "bytes>" in res.output and "fields}" in res.output and "30 row(s), the first 3 shown" in res.output
    res = runner.invoke(app, ["query", "--archive", url, "--out", str(tmp_path / "r.csv"),
                              "SELECT object_id, rb FROM alerts WHERE rb > 0.5"])
    n = sum(1 for line in (tmp_path / "r.csv").read_text().splitlines()[1:])
    assert res.exit_code == 0 and f"wrote {n} row(s)" in res.output and 0 < n < 30
    for args, message in ((["--archive", str(tmp_path / "none"), "SELECT 1"], "no archive at"),
                          (["--archive", url, "SELEC 1"], "query failed"),
                          (["--archive", url, "--out", str(tmp_path / "r.txt"), "SELECT 1"], ".parquet or .csv")):
        res = runner.invoke(app, ["query", *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    f = archive.files()[0]
    data = archive.fs.cat_file(archive.path(f.path))
    data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    archive.fs.pipe_file(archive.path(f.path), data)  # altered, same size: found by --verify
    res = runner.invoke(app, ["query", "--archive", url, "--verify", "SELECT count(*) FROM alerts"])
    assert res.exit_code == 2 and "SHA-256" in res.output and f.path in res.output, res.output


def test_crossmatch_finds_a_watchlists_alerts_in_the_archive_and_explains_a_bad_list(tmp_path):
    archive = _small_archive(tmp_path / "archive")
    rows = archive.query("SELECT object_id, ra, dec FROM alerts ORDER BY object_id").to_pylist()
    first = [r for r in rows if r["object_id"] == rows[0]["object_id"]]
    watch = tmp_path / "targets.csv"
    watch.write_text(f"name,ra,dec,radius\nhost,{first[0]['ra'] + 1 / 3600},{first[0]['dec']},3\nnothing,1,-80,\n")
    url = str(tmp_path / "archive")
    res = runner.invoke(app, ["crossmatch", str(watch), "--archive", url])
    assert res.exit_code == 0 and "host" in res.output and f"{len(first)} match(es) of 1 of 2 entries" in res.output, \
        res.output
    res = runner.invoke(app, ["crossmatch", str(watch), "--archive", url, "--out", str(tmp_path / "m.csv")])
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert res.exit_code == 0 and len(lines) == 1 + len(first) and lines[1].startswith("host,"), res.output
    assert all(abs(float(line.split(",")[4]) - 1.0) < 0.01 for line in lines[1:])  # the distance, 1 arcsec
    watch.write_text("name,ra,dec\nbad,1,95\n")
    for args, message in (([str(watch)], "targets.csv: row 2, dec: 95 deg is outside"),
                          ([str(tmp_path / "none.csv")], "cannot read the watchlist"),
                          ([str(tmp_path)], "cannot read the watchlist"),
                          ([str(tmp_path / "m.csv"), "--out", str(tmp_path / "no" / "m.csv")], "cannot write"),
                          ([str(tmp_path / "m.csv"), "--radius", "nan"], "the default radius")):
        res = runner.invoke(app, ["crossmatch", *args, "--archive", url])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_an_archive_path_that_is_a_file_is_no_archive(tmp_path):
    (tmp_path / "alerts.parquet").write_bytes(b"PAR1")
    res = runner.invoke(app, ["query", "--archive", str(tmp_path / "alerts.parquet"), "SELECT 1"])
    assert res.exit_code == 2 and "no archive at" in res.output, (res.output, res.exception)
    res = runner.invoke(app, ["query", "--archive", str(tmp_path), "--max-rows", "-5", "SELECT 1"])
    assert res.exit_code == 2 and "--max-rows" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_serve_explains_an_absurd_upload_limit(tmp_path, value):
    res = runner.invoke(app, ["serve", "--state-dir", str(tmp_path), "--max-upload-mb", value, "--port", "1"])
    assert res.exit_code == 2 and "--max-upload-mb" in res.output, (res.output, res.exception)


@pytest.mark.parametrize("command", [["token", "list"], ["token", "revoke", "x"],
                                     ["token", "add", "x", "--scope", "read"]])
def test_a_token_file_that_is_not_a_token_database_is_explained(tmp_path, command):
    (tmp_path / "junk.sqlite").write_bytes(b"not a database " * 100)
    for tokens in (tmp_path / "junk.sqlite", tmp_path):  # another file, then a folder
        res = runner.invoke(app, [*command, "--tokens", str(tokens)])
        assert res.exit_code == 2 and "as a token database" in res.output, (res.output, res.exception)


def test_label_databases_that_are_not_databases_are_explained(tmp_path):
    (tmp_path / "feedback.sqlite").write_bytes(b"not a database " * 100)
    res = runner.invoke(app, ["feedback", "OBJ1", "F-1/3", "interesting", "--state-dir", str(tmp_path)])
    assert res.exit_code == 2 and "feedback database" in res.output, (res.output, res.exception)
    (tmp_path / "portal").mkdir()
    (tmp_path / "portal" / "labels.sqlite").write_bytes(b"not a database " * 100)
    _small_archive(tmp_path / "archive")
    res = runner.invoke(app, ["labels", "export", "--out", str(tmp_path / "l.npz"), "--archive",
                              str(tmp_path / "archive"), "--labels", str(tmp_path / "portal" / "labels.sqlite")])
    assert res.exit_code == 2 and "as a labels database" in res.output, (res.output, res.exception)


def test_a_kafka_that_does_not_answer_is_explained_by_subscribe_and_replay(tmp_path, monkeypatch):
    from confluent_kafka import KafkaException

    class Silent:  # list_topics as confluent_kafka raises it when no broker answers
        def __init__(self, *args, **kwargs):
            pass

        def list_topics(self, timeout=None):
            raise KafkaException("Failed to get metadata: Local: Broker transport failure")

        def close(self):
            pass

    monkeypatch.setattr("streams.subscriber.Consumer", Silent)
    monkeypatch.setattr("streams.replay.AdminClient", Silent)
    res = runner.invoke(app, ["subscribe", "--bootstrap", "127.0.0.1:1", "--max-alerts", "1"])
    assert res.exit_code == 2 and "did not answer" in res.output, (res.output, res.exception)
    _small_archive(tmp_path / "archive")
    res = runner.invoke(app, ["replay", "--topic", "x", "--bootstrap", "127.0.0.1:1",
                              "--archive", str(tmp_path / "archive")])
    assert res.exit_code == 2 and "did not answer" in res.output, (res.output, res.exception)


def test_feedback_records_labels_exports_them_and_refuses_bad_ones(tmp_path):
    import json

    state = ["--state-dir", str(tmp_path)]
    res = runner.invoke(app, ["feedback", "OBJ1", "F-1/3", "interesting", "--who", "ann", "--score", "0.995", *state])
    assert res.exit_code == 0, res.output
    for bad in (["OBJ1", "F-1/3", "maybe"], ["OBJ1", "F-1/3", "not", "--score", "2"], [" ", "F-1/3", "not"]):
        res = runner.invoke(app, ["feedback", *bad, *state])
        assert res.exit_code == 2 and "error" in res.output, bad
    res = runner.invoke(app, ["feedback", "-", "-", "-", "--export", *state])
    (row,) = [json.loads(line) for line in res.output.splitlines()]
    from broker.anomaly import DEFAULT_VERSION

    assert (row["object_id"], row["label"], row["who"], row["score"], row["model_version"]) == (
        "OBJ1", "interesting", "ann", 0.995, DEFAULT_VERSION)  # the default is the shipped model


def test_feedback_export_needs_no_arguments_and_recording_needs_all_three(tmp_path):
    """``broker feedback --export`` alone was refused "Missing argument 'object_id'"."""
    state = ["--state-dir", str(tmp_path)]
    assert runner.invoke(app, ["feedback", "OBJ1", "F-1/3", "not", *state]).exit_code == 0
    res = runner.invoke(app, ["feedback", "--export", *state])
    assert res.exit_code == 0 and '"OBJ1"' in res.output, res.output
    res = runner.invoke(app, ["feedback", "OBJ1", *state])
    assert res.exit_code == 2 and "--export" in res.output, res.output


@pytest.mark.parametrize("setting,message", [
    ('openngc = "{missing}"', "OpenNGC"),
    ('openngc = "{corrupt}"', "OpenNGC"),
    ('lcclass_model = "{missing}"', "not found"),
    ('anomaly_model = "{corrupt}"', "corrupt anomaly model"),
    ('[followup]\n[[followup.rules]]\nname = "x"\nwhen = "scores.rb >"', "followup.rules"),
])
def test_a_missing_or_corrupt_catalog_model_or_rule_stops_the_score_stage_at_start_up(tmp_path, setting, message):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not a model")
    corrupt.with_suffix(".json").write_text("{}")
    config = tmp_path / "pipeline.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n' + setting.format(missing=tmp_path / "missing.db", corrupt=corrupt))
    res = runner.invoke(app, ["stage", "score", "--bootstrap", "127.0.0.1:1", "--metrics-port", "-1",
                              "--config", str(config)])
    assert res.exit_code == 2 and message in res.output, res.output


def test_telescope_add_writes_a_profile_and_refuses_bad_values(tmp_path):
    from broker.telescopes import load_profiles

    args = ["telescope", "add", "seestar-s50", "--dir", str(tmp_path), "--match", "Seestar S50", "--gain", "1.0",
            "--filter", "IRCUT=lum", "--zeropoint-1s", "20.5"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "seestar-s50.toml" in res.output
    (profile,) = load_profiles(tmp_path)
    assert profile.gain == 1.0 and profile.filters == {"IRCUT": "lum"} and profile.match == ("Seestar S50",)
    new = ["telescope", "add", "x", "--dir", str(tmp_path)]
    for bad, message in ((args, "exists"), (new + ["--gain", "-1.5"], "gain"),
                         (["telescope", "add", "x y", "--dir", str(tmp_path)], "telescope name"),
                         (new + ["--filter", "IRCUT"], "VENDOR=BAND"),
                         (new + ["--time-reference", "end"], "time_reference"),
                         (["telescope", "add", "x", "--dir", str(tmp_path / "seestar-s50.toml")], "cannot write")):
        res = runner.invoke(app, bad)
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("option", [["--filter", "L=rr"], ["--filter", "a=b=c"], ["--match", "Seestar\nS50"],
                                    ["--filter", "L\x01=lum"]])
def test_telescope_add_writes_no_profile_that_would_not_read_back(tmp_path, option):
    """A band that is not canonical, or a control character, is refused before anything is written.

    Such a profile was written: every later load of the directory (``broker produce``, the ingest
    stage) then failed on that file.
    """
    from broker.telescopes import load_profiles

    res = runner.invoke(app, ["telescope", "add", "x", "--dir", str(tmp_path), *option])
    assert res.exit_code == 2 and "error" in res.output and "Traceback" not in res.output, res.output
    assert load_profiles(tmp_path) == ()


@pytest.mark.parametrize("args", [["--frames", "-1"], ["--size", "0"], ["--size", "10"], ["--size", "100000"],
                                  ["--seed", "-1"], ["--out-is-a-file"]])
def test_simulate_refuses_impossible_numbers_and_folders_in_one_line(tmp_path, args):
    """Each was a traceback: islice of -1 frames, numpy's "high <= 0", a 74.5 GiB allocation, a mkdir of a file."""
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file") if args == ["--out-is-a-file"] else str(tmp_path / "out")
    res = runner.invoke(app, ["simulate", out, "--frames", "1", "--size", "64",
                              *([] if args == ["--out-is-a-file"] else args)])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_training_commands_write_the_shipped_versions_by_default():
    import inspect

    from broker import anomaly, lcclass
    from streams.cli import train_anomaly, train_lcclass

    assert inspect.signature(train_lcclass).parameters["version"].default == lcclass.DEFAULT_VERSION
    assert inspect.signature(train_anomaly).parameters["version"].default == anomaly.DEFAULT_VERSION


def _feedback_archive(tmp_path):
    """An archive of 3 alerts (schema v4 sample) and a feedback file labelling two of them and one elsewhere."""
    import copy

    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter
    from broker.feedback import FeedbackStore
    from tests.broker.test_archive import archived, commit, sample

    records = [copy.deepcopy(sample(4)) for _ in range(3)]
    for i, rec in enumerate(records):
        rec["alertId"], rec["candid"] = 200 + i, f"TEL-F1-r-0002/{i}"
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    commit(writer, archived(records))
    with FeedbackStore(tmp_path / "feedback.sqlite") as store:
        store.record("OBJ", "200", "interesting", "ana", "anomaly-v5", 0.999)
        store.record("OBJ", "TEL-F1-r-0002/1", "not", "ana", "anomaly-v5", 0.995)
        store.record("OBJ", "777", "not", "ana", "anomaly-v5", 0.991)
    return tmp_path / "archive", tmp_path / "feedback.sqlite"


def test_train_anomaly_with_feedback_reweights_the_model_and_says_what_it_used(tmp_path):
    archive, feedback = _feedback_archive(tmp_path)
    res = runner.invoke(app, ["train-anomaly", "--objects", "40", "--out-dir", str(tmp_path / "models"),
                              "--feedback", str(feedback), "--archive", str(archive)])
    assert res.exit_code == 0, res.output
    assert "2 of 3 label(s) used (1 interesting)" in res.output and "'not_archived': 1" in res.output
    from broker.anomaly import AnomalyModel

    model = AnomalyModel.load(tmp_path / "models" / "anomaly-v5-feedback")  # not the shipped version's name
    assert model.metadata["feedback"]["n_not"] == 1 and "fb_weights" in model.params
    assert "operator labels" in (tmp_path / "models" / "anomaly-v5-feedback.md").read_text()


def test_train_anomaly_explains_unusable_feedback(tmp_path):
    archive, feedback = _feedback_archive(tmp_path)
    (tmp_path / "junk.sqlite").write_bytes(b"\x00not sqlite" * 100)
    from broker.feedback import FeedbackStore

    with FeedbackStore(tmp_path / "elsewhere.sqlite") as store:
        store.record("OBJ", "999", "not", "ana", "anomaly-v5", 0.99)
    cases = [(tmp_path / "absent.sqlite", "no feedback file"), (tmp_path / "junk.sqlite", "as a feedback database"),
             (tmp_path / "elsewhere.sqlite", "none of the 1 label(s)")]
    for path, message in cases:
        res = runner.invoke(app, ["train-anomaly", "--objects", "40", "--out-dir", str(tmp_path / "m"),
                                  "--feedback", str(path), "--archive", str(archive)])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(app, ["train-anomaly", "--feedback", str(feedback), "--archive", str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and "no archive at" in res.output
    assert not (tmp_path / "m").exists()  # nothing trained


@pytest.mark.parametrize("args", [["explain", "alert.avro"], ["train-realbogus"], ["eval-realbogus"]])
def test_commands_that_need_torch_say_how_to_install_it(tmp_path, monkeypatch, args):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "needs torch" in res.output and "[classify]" in res.output, res.output
    assert "Traceback" not in res.output


def test_an_alert_s_strings_cannot_drive_the_terminal_or_name_an_impossible_png(tmp_path, capsys):
    """A hostile producer's alert is shown as text, and its PNG written, whatever its strings hold.

    Escapes in ``objectId`` reached the terminal as they were, and a candid with a NUL or of 300
    characters raised ``ValueError`` / ``OSError`` out of ``broker subscribe --png-dir``.
    """
    import copy
    import warnings

    from streams.alert_expr import FieldSelection
    from streams.cli import _show_alert
    from tests.schemas.test_schemas import _alert

    _, alert = _alert()
    alert["objectId"] = "OBJ\x1b[2J\x1b]0;owned\x07\nforged line"
    _show_alert(alert, FieldSelection(None), False, None, None)
    _show_alert(alert, FieldSelection("objectId"), False, None, None)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and out.count("\n") == 2
    assert out.count("OBJ\\x1b[2J\\x1b]0;owned\\x07\\nforged line") == 2
    for candid in ("F1/\x00/3", "F" * 300 + "/0", "É" * 70 + "/1"):
        hostile = copy.deepcopy(alert)
        hostile["objectId"], hostile["candid"] = "OBJ1", candid
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Glyph", UserWarning)  # the NUL in the PNG's title
            _show_alert(hostile, FieldSelection(None), False, tmp_path, None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and "F1___3.png" in names and all(len(n.encode()) <= 255 for n in names)


def test_an_unusable_png_dir_is_refused_before_connecting_and_a_png_that_cannot_be_written_is_a_warning(tmp_path):
    """``--png-dir`` naming a file (or a path under /proc) raised FileExistsError out of the first alert.

    It is now refused at once (exit 2, no Kafka contacted: the bootstrap answers nothing); a PNG
    that cannot be written later (here: a folder of its name) is a warning, and the alert is shown.
    """
    from rich.console import Console

    from streams.alert_expr import FieldSelection
    from streams.cli import _show_alert, png_name
    from tests.schemas.test_schemas import _alert

    (tmp_path / "a-file").write_text("not a folder")
    for bad in (tmp_path / "a-file", tmp_path / "a-file" / "below", Path("/proc/no-such-folder")):
        res = runner.invoke(app, ["subscribe", "--bootstrap", "127.0.0.1:1", "--png-dir", str(bad), "--timeout", "1"])
        assert res.exit_code == 2 and "--png-dir" in res.output and "Traceback" not in res.output, res.output
    _, alert = _alert()
    (tmp_path / "pngs" / png_name(alert["candid"])).mkdir(parents=True)
    err = Console(file=io.StringIO(), width=300)
    _show_alert(alert, FieldSelection(None), False, tmp_path / "pngs", err)
    assert "PNG not written" in err.file.getvalue()


def test_forced_photometry_at_a_position_prints_writes_and_refuses_what_is_not_a_position(tmp_path):
    import csv

    import numpy as np

    from broker.diffstore import DifferenceStore
    from tests.broker.test_diffstore import _header, _image, _meta, _sky

    store = DifferenceStore(tmp_path / "diffs")
    store.put(_meta("a", 1.0), _header(), _image(1))
    store.put(_meta("b", 2.0), _header(), _image(2, [(60.3, 50.6, 800.0)]))
    ra, dec = (float(v[0]) for v in _sky(np.array([[60.3, 50.6]])))
    where = ["--state-dir", str(tmp_path)]
    res = runner.invoke(app, ["forced", *where, "--", str(ra), str(dec)])
    assert res.exit_code == 0 and "2 frame(s)" in res.output and " b " in res.output, res.output
    res = runner.invoke(app, ["forced", *where, "--out", str(tmp_path / "lc.csv"), "--start-mjd", "1.5", "--",
                              str(ra), str(dec)])
    assert res.exit_code == 0 and "wrote 1 row(s)" in res.output
    (row,) = csv.DictReader((tmp_path / "lc.csv").read_text().splitlines())
    assert row["frame_id"] == "b" and float(row["snr"]) > 5 and row["telescope"] == "T1"
    res = runner.invoke(app, ["forced", *where, "--", "10.0", "-30.0"])
    assert res.exit_code == 0 and "no kept difference image" in res.output
    for args in (["nan", "0"], ["400", "0"], ["10", "-95"]):
        res = runner.invoke(app, ["forced", *where, "--", *args])
        assert res.exit_code == 2 and "position out of range" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["forced", *where, "--out", str(tmp_path / "lc.txt"), "--", str(ra), str(dec)])
    assert res.exit_code == 2 and ".csv or .parquet" in res.output
    res = runner.invoke(app, ["forced", "--state-dir", str(tmp_path / "nowhere"), "--", str(ra), str(dec)])
    assert res.exit_code == 2 and "no state folder" in res.output  # was exit 0, "no kept difference image"


def test_serve_max_costly_keeps_a_thread_for_the_cheap_reads(tmp_path, monkeypatch):
    """``--max-costly 6`` was refused (below the 4 query threads only): BrokerPortalBusy's advice could not be taken."""
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **kwargs: served.append(application.state.portal.config))
    for costly, threads in ((3, 4), (6, 7)):
        res = runner.invoke(app, ["serve", "--state-dir", str(tmp_path), "--max-costly", str(costly)])
        assert res.exit_code == 0, res.output
        assert (served[-1].max_costly, served[-1].query_threads) == (costly, threads)


def test_serve_sets_the_tap_limits_and_refuses_a_default_over_the_most(tmp_path, monkeypatch):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **kwargs: served.append(application.state.portal.config))
    res = runner.invoke(app, ["serve", "--state-dir", str(tmp_path), "--tap-maxrec", "500", "--tap-max-maxrec", "2000",
                              "--tap-timeout", "5"])
    assert res.exit_code == 0, res.output
    assert (served[-1].tap_maxrec, served[-1].tap_max_maxrec, served[-1].tap_timeout_s) == (500, 2000, 5.0)
    res = runner.invoke(app, ["serve", "--state-dir", str(tmp_path), "--tap-maxrec", "5000", "--tap-max-maxrec", "10"])
    assert res.exit_code == 2 and "tap_maxrec <= tap_max_maxrec" in res.output and "Traceback" not in res.output


def test_demo_refuses_a_workdir_holding_what_it_did_not_write_and_deletes_nothing(tmp_path, monkeypatch):
    """``broker demo --workdir DIR`` emptied DIR (shutil.rmtree) whatever it held: a user's folder was lost."""
    import streams.demo

    def never(*args, **kwargs):
        raise AssertionError("the demo started")

    monkeypatch.setattr(streams.demo, "run_demo", never)
    (tmp_path / "observations.txt").write_text("precious")
    res = runner.invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert res.exit_code == 2 and "observations.txt" in res.output and "Traceback" not in res.output, res.output
    assert (tmp_path / "observations.txt").read_text() == "precious"
    from streams.cli import _check_demo_workdir

    for name in ("logs", "state", "frames"):  # a previous demo's: emptied at the next start
        (tmp_path / "old" / name).mkdir(parents=True)
    _check_demo_workdir(tmp_path / "old")
    _check_demo_workdir(tmp_path / "new")


def test_no_help_text_loses_a_config_section_to_rich_markup():
    r"""Every help text renders as written (a config section is escaped: ``\[archive]``).

    ``[archive]``, ``[ingest]``, ``[[alert_topics]]`` and ``[differences]`` were read as markup tags
    and dropped: ``--help`` said "the config's  path" and "Profile directory ( telescopes_dir)".
    """
    import click
    from rich.text import Text
    from typer.main import get_command

    def texts(command: click.Command):
        yield command.help or ""
        yield from (getattr(p, "help", None) or "" for p in command.params)
        for sub in getattr(command, "commands", {}).values():
            yield from texts(sub)

    lost = [t for t in texts(get_command(app)) if Text.from_markup(t).plain != t.replace("\\[", "[")]
    assert not lost


def test_an_archive_url_that_cannot_be_reached_is_one_line(monkeypatch):
    """``--archive s3://bucket`` without credentials was botocore's NoCredentialsError traceback."""
    from fsspec.implementations.memory import MemoryFileSystem

    class NoCredentialsError(Exception):
        pass

    def refused(self, path):
        raise NoCredentialsError("Unable to locate credentials")

    monkeypatch.setattr(MemoryFileSystem, "isdir", refused)
    res = runner.invoke(app, ["query", "select 1", "--archive", "memory://bucket/archive"])
    assert res.exit_code == 2 and "cannot reach archive" in res.output, (res.output, res.exception)
    assert "Unable to locate credentials" in res.output


@pytest.mark.parametrize("since", ["nan", "inf", "-inf"])
def test_crossmatch_refuses_a_since_mjd_that_is_no_number(tmp_path, since):
    """``--since-mjd nan`` was DuckDB's "Binder Error: Referenced column "nan" not found"."""
    _small_archive(tmp_path / "archive")
    (tmp_path / "w.csv").write_text("ra,dec\n10,10\n")
    res = runner.invoke(app, ["crossmatch", str(tmp_path / "w.csv"), "--archive", str(tmp_path / "archive"),
                              "--since-mjd", since])
    assert res.exit_code == 2 and "since_mjd" in res.output and "Binder" not in res.output, res.output


def test_query_prints_strings_as_they_are(tmp_path):
    """A string cell or column name holding ``[red]`` or ``[/x]`` was read as markup: dropped, or a MarkupError."""
    _small_archive(tmp_path / "archive")
    sql = "SELECT '[red]x[/red] [bold]' AS \"[b]\", 'M31[/L]' AS m, NULL AS n"
    res = runner.invoke(app, ["query", sql, "--archive", str(tmp_path / "archive")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "[red]x[/red] [bold]" in res.output and "M31[/L]" in res.output and "[b]" in res.output
    assert "null" in res.output


def test_crossmatch_writes_only_the_formats_it_names(tmp_path):
    """``--out matches.xlsx`` (or .parquet) was written as CSV under that name, "written to matches.xlsx"."""
    _small_archive(tmp_path / "archive")
    (tmp_path / "w.csv").write_text("ra,dec\n10,10\n")
    args = ["crossmatch", str(tmp_path / "w.csv"), "--archive", str(tmp_path / "archive"), "--out"]
    res = runner.invoke(app, [*args, str(tmp_path / "m.xlsx")])
    assert res.exit_code == 2 and ".csv or .json" in res.output and not (tmp_path / "m.xlsx").exists(), res.output
    res = runner.invoke(app, [*args, str(tmp_path / "m.JSON")])
    assert res.exit_code == 0 and (tmp_path / "m.JSON").read_text().startswith("{"), res.output


def test_embedded_refuses_a_port_another_server_listens_on(monkeypatch):
    """A port in use is refused before tansu starts.

    Tansu exited (address in use) while the other server answered its readiness check: ``broker
    embedded --port P`` printed "bootstrap: 127.0.0.1:P" and served another broker, or tracebacked.
    """
    import signal
    import socket

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the command's Ctrl-C handler: not pytest's
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = runner.invoke(app, ["embedded", "--port", str(port), "--no-create", "--no-registry"])
    assert res.exit_code == 2 and "in use" in res.output and "bootstrap:" not in res.output, (res.output,
                                                                                              res.exception)
    res = runner.invoke(app, ["embedded", "--port", "99999"])
    assert res.exit_code == 2 and "65535" in res.output


@pytest.mark.parametrize("command", ["subscribe", "followup"])
def test_an_idle_timeout_of_nan_is_refused(command):
    """``--timeout nan`` never stopped: no idle time is greater than NaN (a hang until Ctrl-C)."""
    res = runner.invoke(app, [command, "--bootstrap", "127.0.0.1:1", "--timeout", "nan"])
    assert res.exit_code == 2 and "--timeout nan" in res.output, (res.output, res.exception)


def test_the_portal_commands_use_the_configs_state_dir(tmp_path, monkeypatch):
    """``broker serve``, ``token`` and ``labels export`` with ``--config``: the config's state_dir, not the demo's."""
    pytest.importorskip("fastapi")
    import uvicorn

    state = tmp_path / "state"
    config = tmp_path / "pipeline.toml"
    config.write_text(f'state_dir = "{state}"\n')
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **kw: served.append(application))
    res = runner.invoke(app, ["serve", "--config", str(config)])
    assert res.exit_code == 0 and served, res.output
    portal = served[0].state.portal.config
    assert portal.state_dir == state and portal.tokens_path == state / "tokens.sqlite", portal
    assert portal.archive == str(state / "archive")
    res = runner.invoke(app, ["serve", "--config", str(config), "--state-dir", str(tmp_path / "other")])
    assert served[1].state.portal.config.state_dir == tmp_path / "other"
    res = runner.invoke(app, ["token", "add", "ana", "--scope", "vet", "--config", str(config)])
    assert res.exit_code == 0 and (state / "tokens.sqlite").is_file(), res.output  # where the portal reads them
    _small_archive(state / "archive")
    res = runner.invoke(app, ["labels", "export", "--config", str(config), "--out", str(tmp_path / "v.npz")])
    assert res.exit_code == 2 and f"no labels database at {state / 'labels.sqlite'}" in res.output.replace("\n", ""), \
        res.output
