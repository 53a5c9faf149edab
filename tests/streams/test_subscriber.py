"""The subscriber: start positions, what is not an alert, and hostile topics (``streams.subscriber``)."""

import copy
import gzip
import io
import json
import time
import uuid
from datetime import UTC, datetime

import fastavro
import pytest

import schemas
from broker.errors import ConfigError
from streams import serde
from streams.subscriber import StartPosition, alert_problem, parse_start
from tests.schemas.test_schemas import _alert


def test_parse_start():
    assert parse_start(None) is None and parse_start("") is None
    assert parse_start("earliest") == StartPosition("earliest")
    assert parse_start("latest") == StartPosition("latest")
    assert parse_start("1200") == StartPosition("offset", offset=1200)
    ms = int(datetime(2025, 3, 1, 4, 0, tzinfo=UTC).timestamp() * 1000)
    assert parse_start("2025-03-01T04:00:00Z") == StartPosition("time", time_ms=ms)
    assert parse_start("2025-03-01T04:00") == StartPosition("time", time_ms=ms)  # naive: UTC
    assert parse_start("2025-03-01T05:00:00+01:00") == StartPosition("time", time_ms=ms)
    for bad in ("-5", "yesterday", "2025-13-01"):
        with pytest.raises(ConfigError):
            parse_start(bad)


def test_a_start_kafka_cannot_take_is_clamped_or_refused():
    """A time before 1970 was a negative Kafka timestamp: -1 asks for the end (nothing read), others an error.

    ``0001-01-01`` raised a ``KafkaError`` out of ``poll``, ``1969-12-31T23:59:59.999`` read nothing; an
    offset past 2**63 raised ``SystemError`` there, and ``²`` (a digit ``int()`` refuses) ``ValueError`` here.
    """
    for text in ("0001-01-01", "1969-12-31T23:59:59.999Z", "1970-01-01T01:00:00+02:00"):
        assert parse_start(text) == StartPosition("time", time_ms=0), text  # every message
    assert parse_start(str(2**63 - 1)) == StartPosition("offset", offset=2**63 - 1)
    for bad in (str(2**63), "9" * 30, "\u00b2", "\u00b9\u00b2"):
        with pytest.raises(ConfigError, match="--start"):
            parse_start(bad)


def test_a_start_time_the_broker_cannot_look_up_is_a_clear_error():
    """An ``offsets_for_times`` timeout came out of ``poll`` as the client's own exception: a traceback."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka import TopicPartition as KafkaPartition

    from broker.errors import Unavailable
    from streams.settings import KafkaSettings
    from streams.subscriber import Subscription

    class Slow:
        def offsets_for_times(self, partitions, timeout):
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Local: Timed out"))

    sub = Subscription(KafkaSettings(bootstrap="127.0.0.1:1"), "alerts", start=parse_start("2025-03-01"))
    with pytest.raises(Unavailable, match="cannot find where alerts reaches the --start time.*Timed out"):
        sub._on_assign(Slow(), [KafkaPartition("alerts", 0)])


def _foreign_schema_with_null_scores():
    """The alert schema with ``scores`` nullable: what a foreign producer might write."""
    raw = json.loads((schemas.ROOT / "alert" / "v1.avsc").read_text())
    for f in raw["fields"]:
        if f["name"] == "scores":
            f["type"] = ["null", f["type"]]
    return fastavro.parse_schema(raw)


def test_what_is_not_an_alert():
    _, good = _alert()
    assert alert_problem(good) is None
    assert "not a record" in alert_problem([1, 2])
    ztf_like = {"objectId": "ZTF21aaaaaaa", "candid": 123, "candidate": {"jd": 2459000.5}}
    assert "not an alert of our schema: alertId is missing" == alert_problem(ztf_like)
    for path, value, words in [("scores", None, "scores is missing"), ("source.snr", "12", "source.snr is a str"),
                               ("alertId", True, "alertId"), ("prv_sources", [1], "prv_sources"),
                               ("cutoutDifference.stampData", b"\x00garbage", "garbage cutout"),
                               ("cutoutScience.stampData", gzip.compress(b"not FITS"), "garbage cutout")]:
        bad = copy.deepcopy(good)
        *parents, leaf = path.split(".")
        node = bad
        for p in parents:
            node = node[p]
        node[leaf] = value
        assert words in (alert_problem(bad) or ""), path
    good["scores"]["rb"] = None  # a null real/bogus score is allowed by the schema
    assert alert_problem(good) is None


# --- against a broker ------------------------------------------------------------------------------------


def _alerts(n, prefix):
    """``n`` distinct alerts (candid, alertId and objectId differ)."""
    _, base = _alert()
    out = []
    for i in range(n):
        a = copy.deepcopy(base)
        a["candid"], a["alertId"], a["objectId"] = f"{prefix}/{i}", hash((prefix, i)) & (2**62 - 1), f"{prefix}{i}"
        out.append(a)
    return out


def _topic(settings, partitions=1):
    from streams.topics import TopicSpec, create_topics

    name = f"alerts-test-{uuid.uuid4().hex[:8]}"
    create_topics(settings.bootstrap, [TopicSpec(name, partitions)])
    return name


def _hostile_messages(good, topic):
    """(key, value, headers) of good alerts in every framing mixed with hostile and foreign records.

    Good: good[0] (OCF), good[1] (OCF), a null-rb alert, good[2] (fink), good[3] (confluent). Skipped: six
    undecodable or foreign messages, one alert with garbage cutout bytes; dropped: a repeat of good[0].
    """
    from streams.framing import AlertEncoder, FramingConfig

    nulls = copy.deepcopy(good[0])
    nulls["scores"], nulls["candid"] = None, "nulls/0"
    buf = io.BytesIO()
    fastavro.writer(buf, _foreign_schema_with_null_scores(), [nulls])
    foreign = io.BytesIO()
    fastavro.writer(foreign, fastavro.parse_schema({"type": "record", "name": "Other", "fields": [
        {"name": "objectId", "type": "string"}, {"name": "candid", "type": "long"}]}), [{"objectId": "Z", "candid": 1}])
    garbage_stamp = copy.deepcopy(good[1])
    garbage_stamp["cutoutScience"]["stampData"] = b"\x00\x01garbage"
    garbage_stamp["alertId"] += 1
    null_rb = copy.deepcopy(good[1])
    null_rb["scores"]["rb"], null_rb["candid"], null_rb["alertId"] = None, "nullrb/0", 7
    ocf = serde.encode_ocf("alert", good[0])
    fink = AlertEncoder(FramingConfig("fink")).encode(good[2], b"k")
    confluent = AlertEncoder(FramingConfig("confluent", registry_url="mock://subscriber-test"), topic).encode(
        good[3], b"k")
    plain = lambda value: (b"k", value, {})  # noqa: E731
    return [
        plain(ocf),
        plain(b"\x00garbage that is no framing"),
        plain(ocf[: len(ocf) // 2]),  # a truncated container
        plain(b""),
        plain(foreign.getvalue()),  # a record of another schema
        plain(buf.getvalue()),  # scores null
        (json.dumps({"type": "record", "name": "X", "fields": []}).encode(), b"\x00", {}),  # fink-like, foreign
        plain(serde.encode_ocf("alert", garbage_stamp)),
        plain(serde.encode_ocf("alert", good[1])),
        plain(ocf),  # a repeat
        plain(serde.encode_ocf("alert", null_rb)),
        (fink.key, fink.value, fink.headers),
        (confluent.key, confluent.value, confluent.headers),
    ]


@pytest.mark.kafka
def test_subscribe_skips_and_counts_hostile_and_foreign_records(settings, tmp_path):
    from confluent_kafka import Producer
    from typer.testing import CliRunner

    from streams.cli import app

    topic = _topic(settings, partitions=2)
    good = _alerts(4, "good")
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    for i, (key, value, headers) in enumerate(_hostile_messages(good, topic)):
        producer.produce(topic, value=value, key=key, headers=list(headers.items()), partition=i % 2)
    producer.flush(10)
    res = CliRunner().invoke(app, ["subscribe", "--bootstrap", settings.bootstrap, "--topic", topic, "--json",
                                   "--timeout", "2", "--status-every", "0.5", "--png-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    shown = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert sorted(a["candid"] for a in shown) == sorted([a["candid"] for a in good] + ["nullrb/0"])
    assert "cutoutScience" not in shown[0]
    summary = res.output.strip().splitlines()[-1]
    assert summary.startswith("5 shown; 5 alerts, lag 0, skipped 7 (garbage_cutout 1, "), summary
    assert summary.endswith(", 1 duplicates dropped"), summary
    assert res.output.count("skipped partition") == 7  # one warning each
    assert any(line.startswith("0 alerts, lag ") for line in res.output.splitlines())  # status while joining
    assert len(list(tmp_path.glob("*.png"))) == 5



@pytest.mark.kafka
def test_subscribe_skips_a_message_whose_header_name_is_not_utf8(settings):
    """Reading such a header raised ``SystemError`` out of ``broker subscribe``, which stopped there."""
    from typer.testing import CliRunner

    from streams.cli import app
    from tests.streams.raw_produce import produce_raw

    topic = _topic(settings)
    bad, good = _alerts(2, "hdr")
    produce_raw(settings.bootstrap, topic, serde.encode_ocf("alert", bad), [(b"\xff_format", b"avro")])
    produce_raw(settings.bootstrap, topic, serde.encode_ocf("alert", good), [(b"_format", b"avro")])
    res = CliRunner().invoke(app, ["subscribe", "--bootstrap", settings.bootstrap, "--topic", topic, "--json",
                                   "--timeout", "2"])
    assert res.exit_code == 0, res.output
    shown = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert [a["candid"] for a in shown] == ["hdr/1"]
    assert "skipped 1 (undecodable 1)" in res.output.strip().splitlines()[-1], res.output

@pytest.mark.kafka
def test_subscribe_to_a_missing_topic_is_a_clear_error(settings):
    from typer.testing import CliRunner

    from streams.cli import app

    existing = _topic(settings)
    res = CliRunner().invoke(app, ["subscribe", "--bootstrap", settings.bootstrap, "--topic", "no-such-topic",
                                   "--timeout", "1"])
    assert res.exit_code == 2
    assert "'no-such-topic' does not exist" in res.output and existing in res.output


def _produce_timed(settings, topic, per_partition, partitions, base_ms):
    """Alerts i = 0..per_partition-1 on each partition, alert i stamped ``base_ms + i`` s."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": settings.bootstrap})
    for p in range(partitions):
        for i, a in enumerate(_alerts(per_partition, f"p{p}")):
            producer.produce(topic, value=serde.encode_ocf("alert", a), partition=p, timestamp=base_ms + 1000 * i)
            producer.flush(10)  # one batch per message: offsets and times as a real stream has them


def _read(settings, topic, start=None, group=None, max_alerts=None, timeout=1.5):
    from streams.subscriber import Subscription

    with Subscription(settings, topic, group, start) as sub:
        return sorted(a["candid"] for a, _ in sub.alerts(timeout=timeout, max_alerts=max_alerts))


@pytest.mark.kafka
def test_start_positions(settings):
    topic = _topic(settings, partitions=2)
    base = int(time.time() * 1000) - 60_000
    _produce_timed(settings, topic, 10, 2, base)
    every = sorted(f"p{p}/{i}" for p in range(2) for i in range(10))
    assert _read(settings, topic) == every  # a new group: from the earliest
    assert _read(settings, topic, StartPosition("offset", offset=7)) == sorted(
        f"p{p}/{i}" for p in range(2) for i in (7, 8, 9))  # the same offset on every partition
    assert _read(settings, topic, StartPosition("time", time_ms=base + 5500)) == sorted(
        f"p{p}/{i}" for p in range(2) for i in range(6, 10))
    assert _read(settings, topic, StartPosition("latest"), timeout=1.0) == []
    assert _read(settings, topic, StartPosition("offset", offset=500), timeout=1.0) == []  # beyond the end
    # the same from the command line, with a projection
    from typer.testing import CliRunner

    from streams.cli import app

    res = CliRunner().invoke(app, ["subscribe", "--bootstrap", settings.bootstrap, "--topic", topic, "--start", "8",
                                   "--fields", "candid,source.snr", "--timeout", "1"])
    assert res.exit_code == 0, res.output
    assert sorted(line for line in res.output.splitlines() if line.startswith("candid=")) == sorted(
        f"candid=p{p}/{i} source.snr=12.0" for p in range(2) for i in (8, 9))


@pytest.mark.kafka
def test_a_start_time_before_1970_reads_every_message(settings):
    topic = _topic(settings)
    _produce_timed(settings, topic, 3, 1, int(time.time() * 1000) - 60_000)
    for text in ("0001-01-01", "1969-12-31T23:59:59.999Z"):
        assert _read(settings, topic, parse_start(text)) == ["p0/0", "p0/1", "p0/2"], text


@pytest.mark.kafka
def test_a_named_group_resumes_unless_a_start_is_given(settings):
    topic = _topic(settings)
    _produce_timed(settings, topic, 10, 1, int(time.time() * 1000))
    first = _read(settings, topic, group="g", max_alerts=4)
    rest = _read(settings, topic, group="g")
    assert len(first) == 4 and len(rest) == 6 and not set(first) & set(rest)
    assert len(_read(settings, topic, StartPosition("earliest"), group="g")) == 10


@pytest.mark.kafka
def test_lag_is_shown_while_consuming(settings):
    from streams.subscriber import Subscription

    topic = _topic(settings)
    _produce_timed(settings, topic, 20, 1, int(time.time() * 1000))
    statuses = []
    with Subscription(settings, topic, on_status=lambda st: statuses.append(st.line()), status_every=0.0) as sub:
        got = list(sub.alerts(timeout=1.5, max_alerts=5))
        assert len(got) == 5
        assert sub.lag() == 15  # 20 on the partition, 5 read
        assert sub.stats.lag == 15
    assert any(s.startswith("0 alerts, lag ") or ", lag 15" in s for s in statuses)


@pytest.mark.kafka
def test_rich_output_with_a_filter_survives_null_scores_garbage_stamps_and_foreign_containers(settings, tmp_path):
    """Rich output with ``--filter`` and ``--png-dir`` over null scores, garbage stamps and foreign containers.

    Issue 27: ``broker subscribe`` crashed on rb = null (``--png-dir``), a garbage stamp, and a
    container holding a non-alert record (``--filter``, rich output); a regression test. The hostile
    topic above plus an alert whose stamp is gzipped FITS cut short (it passes the cheap check, then
    fails to draw), read with the text output and a filter on a score that may be null.
    """
    from confluent_kafka import Producer
    from typer.testing import CliRunner

    from streams.cli import app

    topic = _topic(settings)
    good = _alerts(4, "rich")
    broken_fits = copy.deepcopy(good[0])
    broken_fits["candid"], broken_fits["alertId"] = "brokenfits/0", 11
    broken_fits["cutoutDifference"]["stampData"] = gzip.compress(b"SIMPLE  =                    T" + b"\x00" * 100)
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    for key, value, headers in [*_hostile_messages(good, topic), (b"k", serde.encode_ocf("alert", broken_fits), {})]:
        producer.produce(topic, value=value, key=key, headers=list(headers.items()))
    producer.flush(10)
    # rb > 0.5 alone would fail on the null rb (no match); the null-rb alert is let through first
    res = CliRunner().invoke(app, ["subscribe", "--bootstrap", settings.bootstrap, "--topic", topic, "--filter",
                                   "candid == 'nullrb/0' or (rb > 0.5 and ndet >= 1)", "--timeout", "2",
                                   "--png-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    expected = sorted([a["candid"] for a in good] + ["nullrb/0", "brokenfits/0"])
    shown = sorted(line.split()[1] for line in res.output.splitlines() if " RA=" in line and " rb=" in line)
    assert shown == expected, res.output
    assert len(list(tmp_path.glob("*.png"))) == len(expected)
    assert "cutout not drawn" in res.output and "brokenfits_0.png" in res.output
    assert res.output.strip().splitlines()[-1].startswith(f"{len(expected)} shown; 6 alerts")


@pytest.mark.kafka
def test_an_alert_past_the_filter_languages_bounds_is_skipped_not_the_end_of_the_subscription(settings):
    """``'g' in prv_sources.filter`` over a history of 20,000 detections walks past ``MAX_WALK`` items.

    The evaluation raised ``FilterExpressionError`` out of ``broker subscribe``, which stopped there
    (exit 2, "cannot evaluate ...") on one alert anyone may write; the alerts after it were never shown.
    """
    from confluent_kafka import Producer
    from typer.testing import CliRunner

    from streams.cli import app

    topic = _topic(settings)
    long_history, before, after = _alerts(3, "walk")
    long_history["prv_sources"] = [{"filter": "r", "candid": "x", "mjd": 1.0}] * 20_000
    before["prv_sources"] = after["prv_sources"] = [{"filter": "g", "candid": "y", "mjd": 1.0}]
    producer = Producer({"bootstrap.servers": settings.bootstrap, "message.max.bytes": 16 << 20})
    for alert in (before, long_history, after):
        producer.produce(topic, value=serde.encode_ocf("alert", _with_history(alert)))
    producer.flush(10)
    res = CliRunner().invoke(app, ["subscribe", "--bootstrap", settings.bootstrap, "--topic", topic, "--json",
                                   "--filter", "'g' in prv_sources.filter", "--timeout", "2"])
    assert res.exit_code == 0, res.output
    shown = [json.loads(line)["candid"] for line in res.output.splitlines() if line.startswith("{")]
    assert shown == ["walk/1", "walk/2"]
    assert "(filter_error): cannot evaluate" in res.output
    assert res.output.strip().splitlines()[-1].startswith("2 shown; 3 alerts, lag 0, skipped 1 (filter_error 1)")


def _with_history(alert):
    """``alert`` with each of its ``prv_sources`` filled out to a full detection of the schema."""
    from tests.schemas.alert_samples import sample_alert

    template = sample_alert()["prv_sources"][0]
    return {**alert, "prv_sources": [{**template, **p} for p in alert["prv_sources"]]}


@pytest.mark.kafka
@pytest.mark.slow  # the registry client retries each look-up for ~5 s
def test_a_registry_that_does_not_answer_stops_the_subscription_before_the_alert_not_past_it(settings):
    """A registry down made every ``confluent`` alert "undecodable": skipped, and a named group committed past it.

    Only an id the registry does not know (HTTP 404) is the message's fault and skipped; a registry
    that does not answer stops the subscription (``broker subscribe``: exit 2) before that message,
    which the group reads once the registry is back.
    """
    import struct

    from confluent_kafka import Producer
    from typer.testing import CliRunner

    from broker.errors import RegistryUnavailable
    from streams.cli import app
    from streams.embedded import free_port
    from streams.framing import AlertEncoder, FramingConfig
    from streams.registry import EmbeddedRegistry
    from streams.settings import KafkaSettings
    from streams.subscriber import Subscription

    topic, alerts, group = _topic(settings), _alerts(2, "reg"), f"g-{uuid.uuid4().hex[:8]}"
    down = f"http://127.0.0.1:{free_port()}"
    with EmbeddedRegistry() as registry:
        encoder, producer = AlertEncoder(FramingConfig("confluent", registry_url=registry.url), topic), \
            Producer(settings.producer())
        for value in [encoder.encode(a, None).value for a in alerts] + [struct.pack(">bI", 0, 999) + b"\x00" * 300]:
            producer.produce(topic, value)
        assert producer.flush(15) == 0
        res = CliRunner().invoke(app, ["subscribe", "--bootstrap", settings.bootstrap, "--topic", topic, "--group",
                                       group, "--registry-url", down, "--timeout", "5", "--status-every", "0"])
        assert res.exit_code == 2 and "did not give schema id" in res.output and "skipped" not in res.output, \
            res.output
        cli_settings = KafkaSettings(settings.bootstrap)  # the app id of broker subscribe's group
        with Subscription(cli_settings, topic, group, registry=down) as sub:
            with pytest.raises(RegistryUnavailable, match="did not give schema id"):
                list(sub.alerts(timeout=5))
        with Subscription(cli_settings, topic, group, registry=registry.url) as sub:
            assert sorted(a["candid"] for a, _ in sub.alerts(timeout=1.5)) == ["reg/0", "reg/1"]
            assert sub.stats.skipped == {"undecodable": 1}  # the unknown id 999
