"""Vetting over HTTP: labels need scope vet, carry the archived alert's model and score, hostile bodies are 4xx."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from broker.vetting import LabelStore
from streams.web.app import create_app


@pytest.fixture
def vet(portal_config, tmp_path):
    """(client, vet-token headers, read-token headers, labels path) of a portal with a labels file of its own."""
    from dataclasses import replace

    config = replace(portal_config, labels_path=tmp_path / "labels.sqlite")
    with TestClient(create_app(config)) as client:
        tokens = client.app.state.portal.tokens
        vetter = {"Authorization": f"Bearer {tokens.add('ana', ['read', 'vet'])}"}
        reader = {"Authorization": f"Bearer {tokens.add('rita', ['read'])}"}
        yield client, vetter, reader, config.labels_path


def test_a_label_is_stored_with_who_when_and_the_alerts_model_and_score(vet, state):
    client, vetter, _, path = vet
    rec = state[1][4]
    res = client.post("/api/v1/labels", json={"alert_id": rec["alertId"], "label": "bogus"}, headers=vetter)
    assert res.status_code == 201, res.text
    body = res.json()
    assert (body["alert_id"], body["label"], body["who"]) == (rec["alertId"], "bogus", "ana")
    assert body["model_version"] == rec["scores"]["rb_model"] and body["score"] == pytest.approx(rec["scores"]["rb"])
    res = client.post("/api/v1/labels", json={"alert_id": rec["alertId"], "label": "interesting"}, headers=vetter)
    assert res.json()["model_version"] == rec["scores"]["anomaly_model"]
    assert res.json()["score"] == pytest.approx(rec["scores"]["anomaly"])
    with LabelStore(path) as store:
        (saved,) = store.realbogus()
        assert (saved.alert_id, saved.object_id, saved.candid, saved.who) == (
            rec["alertId"], rec["objectId"], rec["candid"], "ana")
        assert store.labelled() == {rec["alertId"]}
    listing = client.get("/api/v1/labels", headers=vetter).json()
    assert [i["label"] for i in listing["items"]] == ["interesting", "bogus"]  # newest first
    assert listing["counts"] == {"bogus": 1, "interesting": 1}


def test_a_corrupt_labels_file_is_503_on_every_label_endpoint(vet, state):
    client, vetter, _, path = vet
    path.write_bytes(b"not a database" * 100)
    body = {"alert_id": state[1][0]["alertId"], "label": "real"}
    for res in (client.post("/api/v1/labels", json=body, headers=vetter),
                client.get("/api/v1/labels", headers=vetter),
                client.get("/api/v1/vet/queue", headers=vetter)):
        assert res.status_code == 503, res.text
        assert res.json()["error"] == "unavailable" and "labels database" in res.json()["detail"]
    assert path.read_bytes() == b"not a database" * 100  # left as found


def test_labels_need_a_token_with_scope_vet(vet, state):
    client, _, reader, path = vet
    body = {"alert_id": state[1][0]["alertId"], "label": "real"}
    assert client.post("/api/v1/labels", json=body).status_code == 401
    res = client.post("/api/v1/labels", json=body, headers=reader)
    assert res.status_code == 403 and res.json()["error"] == "forbidden"
    assert client.post("/api/v1/labels", json=body, headers={"Authorization": "Bearer 0000.forged"}).status_code == 401
    assert client.get("/api/v1/labels", headers=reader).status_code == 403
    assert client.get("/api/v1/vet/queue", headers=reader).status_code == 403
    assert not path.exists()  # nothing was written


@pytest.mark.parametrize("body", [
    {"alert_id": 1000, "label": "REAL"},
    {"alert_id": 1000, "label": "real'); DROP TABLE vetting; --"},
    {"alert_id": "1000", "label": "real"},  # strict: a string is not an id
    {"alert_id": 1000.0, "label": "real"},
    {"alert_id": True, "label": "real"},
    {"alert_id": -1, "label": "real"},
    {"alert_id": 2**64, "label": "real"},
    {"alert_id": 1000},
    {"alert_id": 1000, "label": "real", "who": "somebody else"},  # who comes from the token only
    {"alert_id": 1000, "label": "real", "score": 0.99},  # the score comes from the archive only
    [1000, "real"],
    None,
])
def test_hostile_label_bodies_are_422_and_nothing_is_stored(vet, body):
    client, vetter, _, path = vet
    res = client.post("/api/v1/labels", json=body, headers=vetter)
    assert res.status_code == 422, res.text
    assert res.json()["error"] == "invalid_query" and "Traceback" not in res.text
    assert not path.exists()


def test_a_label_of_an_alert_the_archive_lacks_is_404_and_junk_bodies_are_refused(vet):
    client, vetter, _, path = vet
    res = client.post("/api/v1/labels", json={"alert_id": 12345, "label": "real"}, headers=vetter)
    assert res.status_code == 404 and res.json()["error"] == "not_found"
    junk = {**vetter, "Content-Type": "application/json"}
    res = client.post("/api/v1/labels", content=b"\xff\xfe{not json", headers=junk)
    assert res.status_code == 400 and "error" in res.json() and "Traceback" not in res.text
    res = client.post("/api/v1/labels", content=b"{" + b" " * (100 * 1024) + b"}", headers=junk)
    assert res.status_code == 413  # over the small-body limit, refused before it is read
    assert not path.exists()


def test_the_queue_holds_unlabelled_alerts_most_uncertain_first(vet, state):
    client, vetter, _, _ = vet
    records = state[1]
    queue = client.get("/api/v1/vet/queue", params={"limit": 500}, headers=vetter).json()
    ids = [a["alert_id"] for a in queue["items"]]
    assert sorted(ids) == sorted(r["alertId"] for r in records) and queue["labelled"] == 0
    distance = [abs(a["rb"] - 0.5) for a in queue["items"]]
    assert distance == sorted(distance)
    first = ids[0]
    client.post("/api/v1/labels", json={"alert_id": first, "label": "real"}, headers=vetter)
    after = client.get("/api/v1/vet/queue", params={"order": "newest"}, headers=vetter).json()
    assert first not in [a["alert_id"] for a in after["items"]] and after["labelled"] == 1
    mjds = [a["mjd"] for a in after["items"]]
    assert mjds == sorted(mjds, reverse=True)
    for params in ({"order": "random"}, {"limit": 0}, {"limit": 501}):
        assert client.get("/api/v1/vet/queue", params=params, headers=vetter).status_code == 422


def test_labels_given_on_the_portal_round_trip_through_broker_labels_export(vet, state, tmp_path):
    from typer.testing import CliRunner

    from broker.labelsfile import read_labels
    from streams.cli import app

    client, vetter, _, path = vet
    records = state[1]
    for rec, label in ((records[0], "real"), (records[1], "bogus"), (records[2], "interesting")):
        assert client.post("/api/v1/labels", json={"alert_id": rec["alertId"], "label": label},
                           headers=vetter).status_code == 201
    out = tmp_path / "vetted.npz"
    res = CliRunner().invoke(app, ["labels", "export", "--out", str(out), "--labels", str(path),
                                   "--archive", str(state[0] / "archive")])
    assert res.exit_code == 0, res.output
    assert "wrote 2 label(s) (1 real, 1 bogus)" in res.output
    data = read_labels(out)
    assert sorted(zip(data["candidate_id"], data["y"], strict=True)) == sorted(
        [(records[0]["candid"], 1), (records[1]["candid"], 0)])
    assert set(data["labeller"]) == {"ana"} and set(data["model_version"]) == {records[0]["scores"]["rb_model"]}
    # no labels file, or nothing to export: a clear error, exit code 2
    res = CliRunner().invoke(app, ["labels", "export", "--out", str(out), "--labels", str(tmp_path / "none.sqlite"),
                                   "--archive", str(state[0] / "archive")])
    assert res.exit_code == 2 and "no labels database" in res.output


@pytest.fixture
def long_ids(tmp_path):
    """(client, vet-token headers, the archived record, state folder) of a portal whose one alert has long ids.

    Its frame id is 255 characters (the longest the pipeline's reference and difference stores take as
    a file name), its object id 300; a second copy of the alert (its id, other ids and scores) was
    archived after it, as a faulty or hostile producer of the alert topic would have it.
    """
    import copy

    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter
    from streams.web.config import WebConfig
    from tests.broker.test_archive import archived, commit, sample

    rec = copy.deepcopy(sample(3))
    frame_id = "LSST-" + "x" * 250
    rec["alertId"] = rec["sourceId"] = 4242
    rec["objectId"], rec["candid"], rec["provenance"]["frame_id"] = "OBJ" + "a" * 297, f"{frame_id}/17", frame_id
    forged = copy.deepcopy(rec)
    forged["objectId"], forged["candid"], forged["scores"]["rb"] = "FORGED", "FORGED/0", 0.001
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    commit(writer, archived([rec]))
    commit(writer, archived([forged], start=1))
    config = WebConfig.for_state_dir(tmp_path, tokens_path=tmp_path / "tokens.sqlite")
    with TestClient(create_app(config)) as client:
        vetter = {"Authorization": f"Bearer {client.app.state.portal.tokens.add('ana', ['read', 'vet'])}"}
        yield client, vetter, rec, tmp_path


def test_an_alert_with_ids_over_128_characters_is_labelled_and_exported(long_ids, tmp_path):
    """Its label was refused, HTTP 400 (``candid must be 1-128 printable characters``)."""
    from typer.testing import CliRunner

    from broker.labelsfile import read_labels
    from streams.cli import app

    client, vetter, rec, state_dir = long_ids
    res = client.post("/api/v1/labels", json={"alert_id": 4242, "label": "real"}, headers=vetter)
    assert res.status_code == 201, res.text
    body = res.json()  # the first archived copy's ids and score, not the later copy's
    assert (body["object_id"], body["candid"]) == (rec["objectId"], rec["candid"])
    assert body["score"] == pytest.approx(rec["scores"]["rb"])
    assert client.get("/api/v1/vet/queue", headers=vetter).json()["items"] == []  # one alert, labelled
    out = tmp_path / "vetted.npz"
    res = CliRunner().invoke(app, ["labels", "export", "--out", str(out), "--labels", str(state_dir / "labels.sqlite"),
                                   "--archive", str(state_dir / "archive")])
    assert res.exit_code == 0 and "wrote 1 label(s) (1 real, 0 bogus)" in res.output, res.output
    data = read_labels(out)
    assert list(data["candidate_id"]) == [rec["candid"]] and list(data["group"]) == [rec["objectId"]]


def test_a_full_disk_under_the_labels_is_503_and_the_label_stored_once_freed(portal_config, state, small_disk):
    """The labels file's disk full was a 500 ``internal``: a vetter's label is answered 503 ``storage_full``."""
    from dataclasses import replace

    from tests.helpers import fill_disk

    config = replace(portal_config, labels_path=small_disk / "labels.sqlite")
    body = {"alert_id": state[1][0]["alertId"], "label": "real"}
    with TestClient(create_app(config)) as client:
        vetter = {"Authorization": f"Bearer {client.app.state.portal.tokens.add('ana', ['read', 'vet'])}"}
        assert client.post("/api/v1/labels", json=body, headers=vetter).status_code == 201
        fill_disk(small_disk)
        res = client.post("/api/v1/labels", json=body | {"label": "bogus"}, headers=vetter)
        assert res.status_code == 503 and res.json()["error"] == "storage_full", res.text
        assert "Traceback" not in res.text
        (small_disk / "ballast").unlink()
        assert client.post("/api/v1/labels", json=body | {"label": "bogus"}, headers=vetter).status_code == 201
    with LabelStore(config.labels_path) as store:
        assert [v.label for v in store.realbogus()] == ["real", "bogus"]
