"""Follow-up rules configuration, the per-object request store, the request record and its validation."""

from __future__ import annotations

import pytest

from broker.config import load_config
from broker.errors import ConfigError, InvalidRequest
from broker.followup import (
    DEFAULT_RULES,
    MAX_VISITS,
    FollowupConfig,
    FollowupRule,
    FollowupStatus,
    FollowupStore,
    detections_since,
    opened_by,
    request_id,
    request_record,
    validate_request,
)
from broker.history import ObjectHistory, SqliteStore

RULE = FollowupRule("anomalous", "scores.anomaly > 0.99", exposure_s=120.0, expiry_days=2.0)


def _view(**over):
    view = {"objectId": "OBJ0000000000001", "candid": "SIM1-F001-r-0004/7",
            "source": {"ra": 150.25, "dec": 2.5, "filter": "r", "mjd": 60004.1},
            "object": {"ra": 150.2501, "dec": 2.5001, "ndet": 2},
            "scores": {"rb": 0.95, "anomaly": 0.995},
            "classification": {"label": "SN", "probabilities": {"SN": 0.85, "AGN": 0.15}}}
    view.update(over)
    return view


# --- configuration ------------------------------------------------------------------------------------


def test_defaults_and_a_toml_table():
    assert FollowupConfig().rules == DEFAULT_RULES
    assert [r.name for r in DEFAULT_RULES] == ["anomalous", "young_sn"]
    assert load_config(followup={}).followup == FollowupConfig()
    cfg = load_config(followup={"enabled": True, "rules": [
        {"name": "bright", "when": "source.snr > 50", "filter": "g", "exposure_s": 60, "n_visits": 2, "priority": 1},
        {"name": "any", "when": "scores.rb > 0.5"}]}).followup
    assert cfg.rules[0] == FollowupRule("bright", "source.snr > 50", "g", 60.0, 0.5, 2, 1, 3.0)
    assert cfg.rules[1].filter is None
    assert load_config(followup={"rules": []}).followup.rules == ()


@pytest.mark.parametrize("table", [
    {"unknown": 1},
    {"rules": {"name": "x", "when": "scores.rb > 0"}},
    {"rules": ["scores.rb > 0"]},
    {"rules": [{"name": "x"}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "colour": "red"}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0"}, {"name": "x", "when": "scores.rb > 1"}]},
    {"rules": [{"name": "x", "when": "   "}]},
    {"rules": [{"name": "", "when": "scores.rb > 0"}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "exposure_s": 0}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "exposure_s": float("nan")}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "exposure_s": "60"}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "n_visits": 0}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "n_visits": MAX_VISITS + 1}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "n_visits": 2.5}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "priority": 0}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "priority": True}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "expiry_days": 0}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "cadence_days": -1}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "filter": ""}]},
    {"rules": [{"name": "x", "when": "scores.rb > 0", "filter": "r\n"}]},
    {"enabled": "yes"},
])
def test_bad_tables_are_config_errors(table):
    with pytest.raises(ConfigError):
        load_config(followup=table)


# --- the store ----------------------------------------------------------------------------------------


@pytest.fixture
def store():
    db = SqliteStore(":memory:")
    yield FollowupStore(db)
    db.close()


def test_one_open_request_per_object_until_it_expires(store):
    first, new = store.request("OBJ1", "f4/1", RULE, 60004.0)
    assert new and first == FollowupStatus(request_id("OBJ1", "f4/1", "anomalous"), "anomalous", 60004.0,
                                           "requested", 0)
    again, new = store.request("OBJ1", "f5/3", RULE, 60005.0)  # open: the same request, not new
    assert not new and again == first
    other, new = store.request("OBJ2", "f5/4", RULE, 60005.0)  # another object: its own
    assert new and other.request_id != first.request_id
    later, new = store.request("OBJ1", "f7/2", RULE, 60006.0)  # expired (60004 + 2 d): a new one
    assert new and later.request_id == request_id("OBJ1", "f7/2", "anomalous") and later.requested_mjd == 60006.0


def test_a_replayed_candidate_gets_the_same_answer(store):
    first = store.request("OBJ1", "f4/1", RULE, 60004.0)
    assert store.request("OBJ1", "f4/1", RULE, 60004.0) == first  # crash before the alert was committed
    store.request("OBJ1", "f5/1", RULE, 60005.0)
    assert store.request("OBJ1", "f4/1", RULE, 60004.0) == first  # and after later candidates came by
    assert store.request("OBJ1", "f5/1", RULE, 60005.0) == (first[0], False)


def test_status_as_of_an_alert(store):
    assert store.status("OBJ1", 60004.0, 0) is None
    store.request("OBJ1", "f4/1", RULE, 60004.0)
    assert store.status("OBJ1", 60003.9, 0) is None  # an alert from before the request
    assert store.status("OBJ1", 60004.0, 0).state == "requested"
    seen = store.status("OBJ1", 60004.5, 2)
    assert (seen.state, seen.n_since) == ("observed", 2)
    assert FollowupStatus.from_record(seen.to_record()) == seen
    history = [{"mjd": 60003.0}, {"mjd": 60004.0}, {"mjd": 60004.3}, {"mjd": None}]
    assert detections_since(history, 60004.0) == 1 and detections_since(history, 60004.0, 60004.5) == 2


def test_the_table_lives_beside_the_history_and_survives_reopening(tmp_path):
    path = tmp_path / "history.sqlite"
    hist = ObjectHistory(path)
    first = FollowupStore(hist.store).request("OBJ1", "f4/1", RULE, 60004.0)
    hist.close()
    db = SqliteStore(path)
    assert FollowupStore(db).request("OBJ1", "f4/1", RULE, 60004.0) == first
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {
        "objects", "detections", "followups"}
    db.close()


def test_the_store_in_postgresql(postgres):
    pytest.importorskip("psycopg")
    from broker.history_pg import PostgresStore

    db = PostgresStore(postgres.create_database())
    try:
        store = FollowupStore(db)
        first = store.request("OBJ1", "f4/1", RULE, 60004.0)
        assert first[1] and store.request("OBJ1", "f4/1", RULE, 60004.0) == first
        assert store.request("OBJ1", "f5/1", RULE, 60005.0) == (first[0], False)
        assert store.request("OBJ1", "f9/1", RULE, 60009.0)[1]
        FollowupStore(db)  # CREATE TABLE IF NOT EXISTS: opening again is fine
    finally:
        db.close()


def test_a_non_finite_time_is_refused(store):
    with pytest.raises(InvalidRequest):
        store.request("OBJ1", "f4/1", RULE, float("nan"))


# --- the record and its validation --------------------------------------------------------------------


def _record(**over):
    status = FollowupStatus("FU0123456789abcdef", "anomalous", 60004.1, "requested", 0)
    rec = request_record(status, RULE, _view(), "broker-test", created_unix=1.7e9)
    rec.update(over)
    return rec


def test_request_record():
    rec = _record()
    assert rec["ra"] == 150.2501 and rec["dec"] == 2.5001 and rec["filter"] == "r"  # object position, alert band
    assert rec["expiry_mjd"] == pytest.approx(60006.1) and rec["created_mjd"] == 60004.1
    assert rec["reason"] == {"rule": "anomalous", "expression": RULE.when, "rb": 0.95, "anomaly": 0.995,
                             "class_label": "SN", "class_probability": 0.85}
    assert (rec["schemavsn"], rec["target"], rec["requester"]) == ("1.0", "OBJ0000000000001", "broker-test")
    assert validate_request(rec, now_mjd=60005.0, filters=("r", "g")) == []
    bare = request_record(FollowupStatus("FU1", "x", 60004.1, "requested", 0),
                          FollowupRule("x", "scores.rb > 0", filter="g"),
                          _view(object=None, classification=None, scores={"rb": None}), "b")
    assert (bare["ra"], bare["filter"], bare["reason"]["class_label"], bare["reason"]["rb"]) == (150.25, "g", None,
                                                                                                 None)
    assert validate_request(bare) == []


@pytest.mark.parametrize("over,what", [
    ({"ra": float("nan")}, "coordinates"), ({"ra": 360.0}, "coordinates"), ({"ra": -1e-9}, "coordinates"),
    ({"dec": 90.5}, "coordinates"), ({"dec": float("inf")}, "coordinates"), ({"dec": None}, "coordinates"),
    ({"ra": True}, "coordinates"), ({"ra": 10**400}, "coordinates"), ({"dec": "0"}, "coordinates"),
    ({"filter": ""}, "filter"), ({"filter": "z"}, "filter"), ({"filter": "r" * 40}, "filter"),
    ({"filter": "r\x00"}, "filter"), ({"filter": 3}, "filter"),
    ({"exposure_s": 0.0}, "exposure"), ({"exposure_s": -5.0}, "exposure"), ({"exposure_s": float("nan")}, "exposure"),
    ({"exposure_s": 1e300}, "exposure"),
    ({"n_visits": 0}, "n_visits"), ({"n_visits": 10**6}, "n_visits"), ({"n_visits": -3}, "n_visits"),
    ({"n_visits": 2.0}, "n_visits"),
    ({"cadence_days": -0.1}, "cadence"), ({"cadence_days": float("nan")}, "cadence"),
    ({"priority": 0}, "priority"), ({"priority": 11}, "priority"),
    ({"expiry_mjd": 60004.5}, "expired"), ({"expiry_mjd": 60003.0}, "time"), ({"expiry_mjd": 1e12}, "time"),
    ({"created_mjd": float("nan")}, "time"), ({"created_unix": -1.0}, "time"),
    ({"created_mjd": 1e9, "expiry_mjd": 1e9 + 1}, "time"),  # made in the future: would never expire
    ({"request_id": ""}, "ids"), ({"request_id": "x" * 1025}, "ids"), ({"object_id": "a\nb"}, "ids"),
    ({"requester": None}, "ids"), ({"requester": "r" * 129}, "ids"), ({"candid": "c" * 10**6}, "ids"),
])
def test_hostile_values_are_refused_with_a_reason(over, what):
    problems = validate_request(_record(**over), now_mjd=60005.0, filters=("r", "g"))
    assert problems and all(":" in p for p in problems)
    assert any(p.startswith(what + ":") for p in problems), problems


def test_a_candidate_of_a_long_frame_id_can_be_followed_up():
    """Ids over 128 characters (a ``FRAMEID`` continued over cards) made valid requests invalid at the telescope."""
    long_frame = "LCO-2026-12-06-" + "x" * 240
    rec = _record(candid=f"{long_frame}/17", request_id="FU" + "0" * 300)
    assert validate_request(rec, now_mjd=60005.0, filters=("r", "g")) == []


def test_a_record_that_is_not_a_record_at_all():
    problems = validate_request({})
    assert {p.split(":")[0] for p in problems} >= {"ids", "coordinates", "filter", "exposure", "time"}


def test_what_the_score_and_alert_stages_call(store):
    cfg = FollowupConfig(rules=(RULE,))
    assert cfg.rule("anomalous") is RULE and cfg.rule("gone") is None
    assert store.for_candidate("OBJ1", "f3/1", 60003.0, [], None) is None  # no rule matched, no request
    opened = store.for_candidate("OBJ1", "f4/1", 60004.0, [{"mjd": 60003.0}], RULE)
    assert opened.state == "requested" and opened.n_since == 0 and opened_by(opened, "OBJ1", "f4/1")
    assert store.for_candidate("OBJ1", "f4/1", 60004.0, [{"mjd": 60003.0}], RULE) == opened  # replayed
    later = store.for_candidate("OBJ1", "f5/1", 60005.0, [{"mjd": 60003.0}, {"mjd": 60004.0}], RULE)
    assert (later.request_id, later.state, later.n_since) == (opened.request_id, "observed", 1)
    assert not opened_by(later, "OBJ1", "f5/1") and not opened_by(None, "OBJ1", "f5/1")
    rec = request_record(later, cfg.rule(later.rule), _view(objectId="OBJ1", candid="f4/1"), "app")
    assert rec["request_id"] == opened.request_id and rec["created_mjd"] == 60004.0


def test_the_record_wraps_ra_onto_the_circle():
    for ra, want in ((-1e-20, 0.0), (-10.0, 350.0), (720.5, 0.5)):
        rec = request_record(FollowupStatus("FU1", "x", 60004.1, "requested", 0), RULE,
                             _view(object={"ra": ra, "dec": 1.0}), "app")
        assert rec["ra"] == pytest.approx(want) and 0.0 <= rec["ra"] < 360.0
