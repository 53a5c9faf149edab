"""Follow-up rules over alerts, and the telescope's listener on the ``followup`` topic."""

from __future__ import annotations

import uuid

import pytest

from broker.errors import ConfigError, DecodeError
from broker.followup import DEFAULT_RULES, FollowupConfig, FollowupRule, FollowupStatus, request_record
from broker.simulate import SimConfig, SkySimulator
from streams import topics
from streams.demo import DemoResult, FollowupDesk, plan_followups
from streams.followup import FollowupListener, FollowupRules, decode_request, encode_request, request_message


def _view(anomaly=0.995, rb=0.95, sn=0.1, ndet=5, matches=()):
    return {"objectId": "OBJ0000000000001", "candid": "SIM1-F001-r-0004/7",
            "source": {"ra": 150.25, "dec": 2.5, "filter": "r", "mjd": 60004.1, "snr": 12.0},
            "object": {"ra": 150.25, "dec": 2.5, "ndet": ndet}, "scores": {"rb": rb, "anomaly": anomaly},
            "classification": {"label": "SN", "probabilities": {"SN": sn}}, "context": {"matches": list(matches)}}


def test_topic_names():
    assert topics.DLQ_FOLLOWUP == topics.dlq("followup") and topics.FOLLOWUP == "followup"


def test_the_default_rules_compile_and_pick_the_first_match():
    rules = FollowupRules(FollowupConfig())
    assert rules.first_match(_view()) is DEFAULT_RULES[0]
    assert rules.first_match(_view(anomaly=0.5, sn=0.9, ndet=2)) is DEFAULT_RULES[1]
    assert rules.first_match(_view(anomaly=0.5, sn=0.9, ndet=4)) is None
    assert rules.first_match(_view(rb=None)) is None  # a null score does not match
    assert rules.first_match({}) is None  # nor a missing field
    assert FollowupRules(FollowupConfig(enabled=False)).first_match(_view()) is None
    trail = {"catalog": "frame", "version": "F-1", "name": "trail 1", "kind": "trail"}
    galaxy = {"catalog": "OpenNGC", "version": "20231203", "name": "NGC1", "kind": "galaxy"}
    assert rules.first_match(_view(matches=[galaxy])) is DEFAULT_RULES[0]
    assert rules.first_match(_view(matches=[galaxy, trail])) is None  # a satellite's glint: no telescope time
    assert rules.first_match(_view(anomaly=0.5, sn=0.9, ndet=2, matches=[trail])) is None


def test_a_rule_past_the_language_bounds_on_one_alert_does_not_match_and_the_next_rule_is_tried():
    """``source.snr ** source.snr ** source.snr`` compiles, then overflows on an alert's S/N of 12.

    It raised out of the score stage, and the frame's whole batch was dead-lettered.
    """
    rules = FollowupRules(FollowupConfig(rules=(
        FollowupRule("huge", "source.snr ** source.snr ** source.snr > 1"), FollowupRule("any", "scores.rb > 0.5"))))
    assert rules.first_match(_view()).name == "any"


@pytest.mark.parametrize("when", ["scores.rb >", "no.such.field > 1", "__import__('os')", "scores.rb[0] > 1",
                                  "open('x')", "[x for x in prv_sources]"])
def test_a_bad_expression_stops_the_stage_at_start_up(when):
    with pytest.raises(ConfigError, match="followup.rules"):
        FollowupRules(FollowupConfig(rules=(FollowupRule("bad", when),)))


@pytest.mark.parametrize("payload,headers", [(b"", None), (b"\x02garbage", None), (b"x" * 70000, None),
                                             (None, None)])
def test_undecodable_requests(payload, headers):
    with pytest.raises(DecodeError):
        decode_request(payload, headers)


def test_a_record_of_another_schema_is_undecodable():
    body = encode_request(_record("FU1"))
    with pytest.raises(DecodeError, match="schema header"):
        decode_request(body, {"schema": b"alert/3"})
    with pytest.raises(DecodeError, match="trailing"):
        decode_request(body + b"\x00")


def _record(rid, **over):
    status = FollowupStatus(rid, "anomalous", 60004.1, "requested", 0)
    rec = request_record(status, DEFAULT_RULES[0], _view(), "broker-test", 1.7e9)
    rec.update(over)
    return rec


@pytest.mark.kafka
def test_the_listener_yields_valid_requests_and_dead_letters_the_others(settings):
    from confluent_kafka import Producer

    from streams import serde
    from streams.monitor import read_all

    topic = f"followup-test-{uuid.uuid4().hex[:8]}"
    topics.create_topics(settings, [topics.TopicSpec(topic), topics.TopicSpec(topics.DLQ_FOLLOWUP)])
    good, second = request_message(_record("FU-good")), request_message(_record("FU-second", filter="g"))
    bad = {"garbage": (b"\x00\xff not avro", {}),
           "off_sky": (request_message(_record("FU-dec", dec=95.0)).value, {}),
           "nan": (request_message(_record("FU-nan", ra=float("nan"), n_visits=0)).value, {}),
           "expired": (request_message(_record("FU-old", expiry_mjd=60004.5)).value, {}),
           "band": (request_message(_record("FU-band", filter="u")).value, {}),
           "foreign": (good.value, {"schema": b"candidates/3"})}
    producer = Producer(settings.producer())
    producer.produce(topic, good.value, good.key, headers=list(good.headers.items()))
    for value, headers in bad.values():
        producer.produce(topic, value, b"k", headers=list(headers.items()))
    producer.produce(topic, good.value, good.key, headers=list(good.headers.items()))  # the same request again
    producer.produce(topic, second.value, second.key, headers=list(second.headers.items()))
    producer.flush(10)

    with FollowupListener(settings, "scope", filters=("r", "g"), clock=lambda: 60005.0, topic=topic) as listener:
        got = list(listener.requests(timeout=3.0, max_requests=2))
    assert [r["request_id"] for r in got] == ["FU-good", "FU-second"]
    assert got[0] == decode_request(good.value)
    stats = listener.stats
    assert (stats.received, stats.valid, stats.duplicates) == (9, 2, 1)
    assert stats.dead_letters == {"decode": 2, "invalid_request": 4}

    letters = [serde.decode("dlq", m.value(), dict(m.headers() or []))
               for m in read_all(settings, [topics.DLQ_FOLLOWUP])]
    mine = sorted((d for d in letters if d["topic"] == topic), key=lambda d: d["offset"])
    assert [d["offset"] for d in mine] == [1, 2, 3, 4, 5, 6] and all(d["stage"] == "followup" for d in mine)
    reasons = [(d["reason"], d["message"]) for d in mine]
    assert reasons[0][0] == "decode" and reasons[5][0] == "decode" and "schema header" in reasons[5][1]
    assert reasons[1][0] == "invalid_request" and "coordinates: dec 95.0" in reasons[1][1]
    assert "coordinates: ra nan" in reasons[2][1] and "n_visits: 0" in reasons[2][1]
    assert "expired:" in reasons[3][1] and "filter: 'u'" in reasons[4][1]
    assert mine[1]["value"] == bad["off_sky"][0]  # the original bytes, to inspect or replay



class _Consumer:
    """Hands out ``messages`` once each and records the commits (a listener's consumer, without Kafka)."""

    def __init__(self, messages: list) -> None:
        self.messages, self.commits = list(messages), []

    def poll(self, timeout: float):
        return self.messages.pop(0) if self.messages else None

    def commit(self, message, asynchronous: bool = True) -> None:
        self.commits.append(message.offset())


class _Producer:
    """Reports ``error`` (a KafkaError or None) for every message, and ``left`` messages undelivered at flush."""

    def __init__(self, error=None, left: int = 0) -> None:
        self.error, self.left, self.pending, self.sent = error, left, [], []

    def produce(self, topic, value, key=None, headers=None, on_delivery=None) -> None:
        self.pending.append((topic, value, on_delivery))

    def flush(self, timeout: float) -> int:
        for topic, value, on_delivery in self.pending:
            if on_delivery is not None:
                on_delivery(self.error, None)
            if self.error is None and not self.left:
                self.sent.append((topic, value))
        self.pending = []
        return self.left


def test_a_dead_letter_that_is_not_delivered_stops_the_listener_before_its_offset_is_committed():
    """A refused or undelivered dead letter was ignored and the request's offset committed: the request was lost.

    Now the listener stops (``StageFailure``) with the offset uncommitted, so a restarted listener meets
    the request again; a delivered dead letter is committed and counted as before.
    """
    from confluent_kafka import KafkaError, Message

    from broker.errors import StageFailure
    from streams.settings import KafkaSettings

    def garbage(offset: int) -> Message:
        return Message(topic=topics.FOLLOWUP, partition=0, offset=offset, key=b"k", value=b"\x00\xff not avro")

    def listener_of(message: Message, producer: _Producer) -> FollowupListener:
        listener = FollowupListener(KafkaSettings("127.0.0.1:1"))
        listener._consumer, listener._producer, listener._assigned_at = _Consumer([message]), producer, 0.0
        return listener

    for producer in (_Producer(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)), _Producer(left=1)):
        listener = listener_of(garbage(7), producer)
        with pytest.raises(StageFailure, match=r"followup\[0\]@7 did not reach dlq.followup"):
            list(listener.requests(timeout=0.1))
        assert listener._consumer.commits == [] and listener.stats.dead_letters == {}
    listener = listener_of(garbage(8), _Producer())
    assert list(listener.requests(timeout=0.1)) == []
    assert listener._consumer.commits == [8] and listener.stats.dead_letters == {"decode": 1}
    assert [topic for topic, _ in listener._producer.sent] == [topics.DLQ_FOLLOWUP]

# --- the demo's telescope: planning and serving follow-up visits --------------------------------------

SIM = SimConfig(shape=(256, 256), fields=("F001", "F002"), filters=("r", "g"), n_stars=60, n_galaxies=8,
                n_transients=3, n_variables=2, n_moving=1, n_cosmic_rays=4, n_hot_pixels=2, n_hot_columns=0)


def _scheduled(sim, epoch=4):
    return {(f, b): sim.frame(f, b, epoch)[1] for f in SIM.fields for b in SIM.filters}


def _request_at(truth, rid, band="r", priority=5, expiry=None):
    inj = truth.of_kind("transient")[0]
    rec = _record(rid, ra=inj.ra, dec=inj.dec, filter=band, priority=priority, object_id=f"OBJ-{rid}",
                  created_mjd=truth.mjd - 0.5)
    rec["expiry_mjd"] = truth.mjd + 3.0 if expiry is None else expiry
    return rec


def test_plan_one_visit_per_field_and_band_in_the_next_slot():
    sim = SkySimulator(SIM, seed=2)
    scheduled = _scheduled(sim)
    t1, t2 = scheduled[("F001", "r")], scheduled[("F002", "r")]
    reqs = [_request_at(t1, "a", priority=4), _request_at(t1, "b", priority=1), _request_at(t2, "c", band="g"),
            _request_at(t2, "lapsed", expiry=t2.mjd + 0.01), _record("nowhere", ra=10.0, dec=-80.0)]
    made: dict = {}
    plan = plan_followups(sim, reqs, scheduled, made)
    assert [(v.field, v.band, v.epoch, v.visit) for v in plan] == [("F001", "r", 4, 1), ("F002", "g", 4, 1)]
    assert [r["request_id"] for r in plan[0].requests] == ["b", "a"]  # highest priority first
    assert plan[0].mjd == pytest.approx(t1.mjd + SIM.followup_gap_days)
    again = plan_followups(sim, reqs[:1], scheduled, made)
    assert [(v.field, v.visit) for v in again] == [("F001", 2)]


def test_followup_detections_count_requested_objects_in_follow_up_frames():
    res = DemoResult(followups=[{"object_id": "OBJ1"}, {"object_id": "OBJ2"}], followup_frames=["S-F-r-0004-v1"])
    res.alerts = [{"objectId": o, "provenance": {"frame_id": f}} for o, f in
                  [("OBJ1", "S-F-r-0004-v1"), ("OBJ2", "S-F-r-0004-v1"), ("OBJ3", "S-F-r-0004-v1"),
                   ("OBJ1", "S-F-r-0004")]]
    assert res.followup_detections() == 2


@pytest.mark.kafka
def test_the_desk_observes_what_it_was_asked_for(settings):
    from confluent_kafka import Producer

    topic = f"followup-desk-{uuid.uuid4().hex[:8]}"
    topics.create_topics(settings, [topics.TopicSpec(topic), topics.TopicSpec(topics.DLQ_FOLLOWUP)])
    sim = SkySimulator(SIM, seed=2)
    scheduled = _scheduled(sim)
    t1 = scheduled[("F001", "g")]
    producer = Producer(settings.producer())
    for rec in (_request_at(t1, "FU-desk", band="g"), _request_at(t1, "FU-z", band="z")):
        msg = request_message(rec)
        producer.produce(topic, msg.value, msg.key, headers=list(msg.headers.items()))
    producer.produce(topic, b"garbage")
    producer.flush(10)

    desk = FollowupDesk(settings, sim, topic=topic)
    desk.now_mjd = t1.mjd
    desk.start()
    try:
        assert desk.caught_up(30.0)
        seen = []
        visits = desk.serve(scheduled, lambda frame, truth: seen.append((frame, truth)))
        assert desk.serve(scheduled, lambda frame, truth: seen.append((frame, truth))) == []  # served once
    finally:
        desk.stop()
    assert [r["request_id"] for r in desk.received] == ["FU-desk"]
    assert desk.listener.stats.dead_letters == {"invalid_request": 1, "decode": 1}  # band z; garbage
    assert [(v.field, v.band, v.visit) for v in visits] == [("F001", "g", 1)]
    (frame, truth), = seen
    assert frame.header["FOLLOWUP"] == "FU-desk" and truth.frame_id == "SIM1-F001-g-0004-v1"
    inj = {i.source_id for i in truth.of_kind("transient")}
    assert t1.of_kind("transient")[0].source_id in inj  # the target is on the follow-up frame


@pytest.mark.kafka
def test_a_request_whose_header_name_is_not_utf8_is_dead_lettered(settings):
    """Reading such a header raised ``SystemError`` out of ``broker followup``, which stopped on it at each start."""
    from streams.monitor import read_all
    from streams.settings import KafkaSettings
    from tests.streams.raw_produce import produce_raw

    topic = f"followup-test-{uuid.uuid4().hex[:8]}"
    topics.create_topics(settings, [topics.TopicSpec(topic)])
    good = request_message(_record("FU-hdr"))
    produce_raw(settings.bootstrap, topic, good.value, [(b"\xffschema", b"followup/1")], key=good.key)
    (raw,) = read_all(settings, [topic])
    listener = FollowupListener(KafkaSettings("127.0.0.1:1"))
    listener._producer = producer = _Producer()
    assert listener._handle(raw) is None
    assert listener.stats.dead_letters == {"decode": 1} and len(producer.sent) == 1


def test_broker_followup_without_kafka_is_one_error_line_not_a_traceback():
    """``list_topics`` raised KafkaException out of ``FollowupListener.open``: a traceback of ``broker followup``."""
    from typer.testing import CliRunner

    from streams.cli import app

    res = CliRunner().invoke(app, ["followup", "--bootstrap", "127.0.0.1:1", "--timeout", "1"])
    assert res.exit_code == 2, res.output
    assert "Kafka at 127.0.0.1:1 did not answer" in res.output and "Traceback" not in res.output
