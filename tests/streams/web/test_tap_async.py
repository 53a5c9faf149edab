"""Asynchronous TAP (UWS 1.1 jobs at /api/v1/tap/async): pyvo's and STILTS' async modes, and hostile use.

The jobs run the synchronous path (``streams.web.tap.execute``): results are compared with the
archive read by DuckDB directly, errors end in phase ERROR with the ERROR VOTable at ``/error``.
"""

from __future__ import annotations

import gc
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from broker.archive.reader import Archive
from streams.web import tap
from streams.web.app import create_app
from streams.web.uws import UWS_NS
from tests.streams.web.test_live import running_server
from tests.streams.web.test_tap import CONE, _status, _stilts, _votable, needs_stilts
from tests.streams.web.test_vo import _token

ASYNC = "/api/v1/tap/async"
#: A query that runs for minutes: 6**14 rows counted.
SLOW = "SELECT COUNT(*) AS n FROM " + ", ".join(f"alerts AS a{i}" for i in range(14))


def _create(client, query: str, headers=None, **params) -> str:
    """Make a job; its path."""
    answer = client.post(ASYNC, data={"QUERY": query, "LANG": "ADQL", **params}, headers=headers,
                         follow_redirects=False)
    assert answer.status_code == 303, answer.text[:300]
    return answer.headers["location"].removeprefix("http://testserver")


def _uws(text: str, name: str) -> str | None:
    found = ET.fromstring(text).find(f"{{{UWS_NS}}}{name}")
    return None if found is None else found.text


def _phase(client, job: str, headers=None) -> str:
    return client.get(f"{job}/phase", headers=headers).text


def _until(client, job: str, phases: set[str], seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while (phase := _phase(client, job)) not in phases:
        assert time.monotonic() < deadline, f"job still {phase}"
        time.sleep(0.05)
    return phase


def _slots_free(client, seconds: float = 10) -> None:
    """Wait until no costly work runs (the slots of ``streams.web.limits``); fail after ``seconds``."""
    gate = client.app.state.portal.limits.gate
    deadline = time.monotonic() + seconds
    while gate.running:
        assert time.monotonic() < deadline, f"{gate.running} costly requests still at work"
        time.sleep(0.05)


def test_a_job_runs_the_sync_query_and_is_described_as_uws_says(client):
    job = _create(client, "SELECT TOP 3 alert_id FROM alerts ORDER BY alert_id", MAXREC="2", RUNID="mine")
    document = client.get(job)
    assert document.headers["content-type"].startswith("text/xml")
    assert (_uws(document.text, "phase"), _uws(document.text, "runId"), _uws(document.text, "ownerId")) == (
        "PENDING", "mine", "public")
    assert _uws(document.text, "executionDuration") == "30" and _uws(document.text, "startTime") is None
    assert client.get(f"{job}/results/result").status_code == 404
    assert 'id="query">SELECT TOP 3' in client.get(f"{job}/parameters").text
    assert client.post(f"{job}/executionduration", data={"EXECUTIONDURATION": "99999"}).status_code == 200
    assert client.get(f"{job}/executionduration").text == "30"  # cut to the service's limit
    assert client.post(f"{job}/phase", data={"PHASE": "RUN"}, follow_redirects=False).status_code == 303
    done = client.get(job, params={"WAIT": "20"}).text  # blocks until the phase changes
    done = done if _uws(done, "phase") == "COMPLETED" else client.get(job, params={"WAIT": "20"}).text
    assert _uws(done, "phase") == "COMPLETED" and _uws(done, "endTime")
    result = client.get(f"{job}/results/result")
    votable = _votable(result.content)
    assert _status(votable)[0] == "OVERFLOW" and [int(i) for i in votable.get_first_table().array["alert_id"]] == [
        1000, 1001]
    sync = client.post("/api/v1/tap/sync", data={"QUERY": "SELECT TOP 3 alert_id FROM alerts ORDER BY alert_id",
                                                 "MAXREC": "2"})
    assert result.content == sync.content  # one path: the same bytes
    listed = client.get(ASYNC, params={"PHASE": "COMPLETED"}).text
    assert job.rsplit("/", 1)[1] in listed and f'xmlns:uws="{UWS_NS}"' in listed
    assert job.rsplit("/", 1)[1] not in client.get(ASYNC, params={"PHASE": "PENDING"}).text
    gone = client.delete(job, follow_redirects=False)
    assert gone.status_code == 303 and gone.headers["location"].endswith(ASYNC)
    assert client.get(job).status_code == 404 and job.rsplit("/", 1)[1] not in client.get(ASYNC).text


def test_a_refused_query_ends_in_error_with_the_error_votable(client):
    job = _create(client, "SELECT * FROM read_csv('/etc/passwd')", PHASE="RUN")
    assert _until(client, job, {"ERROR", "COMPLETED"}) == "ERROR"
    summary = ET.fromstring(client.get(job).text).find(f"{{{UWS_NS}}}errorSummary")
    assert summary is not None and summary.get("type") == "fatal"
    message = summary.findtext(f"{{{UWS_NS}}}message")
    assert message and "table functions" in message
    status, reason = _status(_votable(client.get(f"{job}/error").content))
    assert status == "ERROR" and "table functions" in reason
    assert client.get(f"{job}/results/result").status_code == 404


def test_the_time_limit_ends_a_job_in_error(portal_config):
    with TestClient(create_app(replace(portal_config, tap_timeout_s=1.0))) as client:
        job = _create(client, SLOW, PHASE="RUN")
        assert _until(client, job, {"ERROR", "COMPLETED"}) == "ERROR"
        assert "time limit of 1 s" in _status(_votable(client.get(f"{job}/error").content))[1]


def test_abort_mid_run_interrupts_the_query_and_the_next_job_runs(portal_config):
    with TestClient(create_app(replace(portal_config, tap_timeout_s=120.0))) as client:
        job = _create(client, SLOW, PHASE="RUN")
        _until(client, job, {"EXECUTING"})
        time.sleep(0.3)
        start = time.monotonic()
        assert client.post(f"{job}/phase", data={"PHASE": "ABORT"}, follow_redirects=False).status_code == 303
        assert _phase(client, job) == "ABORTED"
        _slots_free(client)  # the query was interrupted: it would hold its slot 120 s
        after = _create(client, "SELECT COUNT(*) AS n FROM alerts", PHASE="RUN")
        assert _until(client, after, {"COMPLETED", "ERROR"}, 15) == "COMPLETED"
        assert time.monotonic() - start < 15  # the slot was given back: the aborted query stopped
        assert client.get(f"{job}/results/result").status_code == 404 and client.get(f"{job}/error").status_code == 404
        assert client.post(f"{job}/phase", data={"PHASE": "RUN"}).status_code == 200  # ended: RUN runs nothing
        assert _phase(client, job) == "ABORTED"


def test_unknown_ids_path_characters_and_another_clients_job_are_404(portal_config):
    with TestClient(create_app(replace(portal_config, public_read=False))) as client:
        tokens = client.app.state.portal.tokens
        alice = {"Authorization": f"Bearer {tokens.add('alice', ['read'])}"}
        bob = {"Authorization": f"Bearer {tokens.add('bob', ['read'])}"}
        job = _create(client, "SELECT TOP 1 alert_id FROM alerts", headers=alice)
        assert client.get(job).status_code == 401  # no token
        for path in (job, f"{job}/phase", f"{job}/results/result", f"{job}/error", f"{job}/parameters"):
            refused = client.get(path, headers=bob)
            assert refused.status_code == 404 and refused.json()["error"] == "not_found", path
        for method, path, data in (("POST", f"{job}/phase", {"PHASE": "RUN"}), ("DELETE", job, None),
                                   ("POST", job, {"ACTION": "DELETE"}),
                                   ("POST", f"{job}/destruction", {"DESTRUCTION": "2099-01-01T00:00:00Z"})):
            assert client.request(method, path, data=data, headers=bob).status_code == 404, path
        assert job.rsplit("/", 1)[1] not in client.get(ASYNC, headers=bob).text
        assert _phase(client, job, alice) == "PENDING"  # bob changed nothing
        for bad in ("0123456789abcdef", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "x" * 5000, "a%00b", "%2Fsync"):
            answer = client.get(f"{ASYNC}/{bad}", headers=alice)
            assert answer.status_code in (404, 405) and "Traceback" not in answer.text, bad


def test_phases_not_in_uws_and_bad_values_are_400_and_change_nothing(client):
    job = _create(client, "SELECT TOP 1 alert_id FROM alerts")
    for phase in ("FOO", "SUSPEND", "ARCHIVE", "", "RUN; DROP", "run\x00"):
        answer = client.post(f"{job}/phase", data={"PHASE": phase})
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_query", phase
    assert client.post(ASYNC, data={"QUERY": "SELECT 1", "PHASE": "ABORT"}).status_code == 400
    assert client.get(ASYNC, params={"PHASE": "NOPE"}).status_code == 400
    assert client.post(job, data={"ACTION": "EXPLODE"}).status_code == 400
    assert client.post(f"{job}/executionduration", data={"EXECUTIONDURATION": "-5"}).status_code == 400
    assert client.get(job, params={"WAIT": "soon"}).status_code == 400
    past = client.post(f"{job}/destruction", data={"DESTRUCTION": "2001-01-01T00:00:00Z"})
    assert past.status_code == 400 and "past" in past.json()["detail"]
    assert client.post(f"{job}/destruction", data={"DESTRUCTION": "tomorrow"}).status_code == 400
    assert _phase(client, job) == "PENDING"
    later = client.post(f"{job}/destruction", data={"DESTRUCTION": "2999-01-01T00:00:00Z"}, follow_redirects=False)
    assert later.status_code == 303
    created = _uws(client.get(job).text, "creationTime")
    destruction = client.get(f"{job}/destruction").text
    assert created and destruction[:4] == created[:4]  # cut to a day after creation, not 2999


def test_huge_parameter_values_are_refused_before_a_job_is_kept(client):
    assert client.post(ASYNC, data={"QUERY": "SELECT * FROM alerts WHERE object_id = '" + "x" * 40_000 + "'"}
                       ).status_code == 400
    assert client.post(ASYNC, data={"QUERY": "SELECT 1", "MAXREC": "9" * 1000}).status_code == 400
    assert client.post(ASYNC, data={"QUERY": "SELECT 1 " + " " * 1_100_000}).status_code == 413
    assert client.get(ASYNC).text.count("jobref") == 0
    job = _create(client, "SELECT 1 AS one FROM alerts", MAXREC="99999999999999999999", PHASE="RUN")
    assert _until(client, job, {"COMPLETED", "ERROR"}) == "COMPLETED"  # as /sync: cut to tap_max_maxrec


def test_jobs_are_bounded_per_client_and_in_all(portal_config):
    config = replace(portal_config, tap_jobs=3, tap_jobs_per_client=2, public_read=False)
    with TestClient(create_app(config)) as client:
        tokens = client.app.state.portal.tokens
        heads = [{"Authorization": f"Bearer {tokens.add(f'user{i}', ['read'])}"} for i in range(3)]
        first = _create(client, "SELECT 1", headers=heads[0])
        _create(client, "SELECT 1", headers=heads[0])
        refused = client.post(ASYNC, data={"QUERY": "SELECT 1"}, headers=heads[0])
        assert refused.status_code == 409 and "tap_jobs_per_client" in refused.json()["detail"]
        _create(client, "SELECT 1", headers=heads[1])
        full = client.post(ASYNC, data={"QUERY": "SELECT 1"}, headers=heads[2])
        assert full.status_code == 409 and "tap_jobs" in full.json()["detail"]
        assert client.post(first, data={"ACTION": "DELETE"}, headers=heads[0], follow_redirects=False
                           ).status_code == 303
        _create(client, "SELECT 1", headers=heads[2])  # room again


def test_jobs_are_destroyed_at_their_destruction_time(portal_config):
    with TestClient(create_app(replace(portal_config, tap_job_destruction_s=1.0, tap_job_max_destruction_s=1.0,
                                       tap_timeout_s=60.0))) as client:
        done = _create(client, "SELECT alert_id FROM alerts", PHASE="RUN")
        running = _create(client, SLOW, PHASE="RUN")
        _until(client, done, {"COMPLETED"})
        time.sleep(1.2)
        assert client.app.state.portal.extras["tap_jobs"].jobs == {}  # by the loop's timer, no request needed
        _slots_free(client)  # the running job's query was interrupted with it
        assert client.get(done).status_code == 404 and client.get(running).status_code == 404
        after = _create(client, "SELECT COUNT(*) AS n FROM alerts", PHASE="RUN")  # the slot was given back
        assert _until(client, after, {"COMPLETED", "ERROR"}, 15) == "COMPLETED"


def test_results_past_their_memory_bound_end_the_job_in_error(portal_config):
    with TestClient(create_app(replace(portal_config, tap_job_results_mb=1))) as client:
        small = _create(client, "SELECT alert_id FROM alerts", PHASE="RUN")
        big = _create(client, "SELECT * FROM alerts AS a, alerts AS b, alerts AS c, alerts AS d", PHASE="RUN")
        assert _until(client, small, {"COMPLETED", "ERROR"}) == "COMPLETED"
        assert _until(client, big, {"COMPLETED", "ERROR"}) == "ERROR"
        assert "past this service's 1 MiB" in _status(_votable(client.get(f"{big}/error").content))[1]


def test_a_wait_is_bounded_and_ends_when_the_phase_changes(portal_config):
    with TestClient(create_app(replace(portal_config, tap_job_wait_s=1.0))) as client:
        job = _create(client, "SELECT COUNT(*) AS n FROM alerts")
        start = time.monotonic()
        assert _uws(client.get(job, params={"WAIT": "3600"}).text, "phase") == "PENDING"
        assert 0.9 < time.monotonic() - start < 5
        start = time.monotonic()
        assert _uws(client.get(job, params={"WAIT": "-1", "PHASE": "QUEUED"}).text, "phase") == "PENDING"
        assert time.monotonic() - start < 0.9  # not in that phase: answered at once, not after the 1 s wait


def test_concurrent_runs_of_one_job_run_it_once(client, monkeypatch):
    calls = []
    original = tap.execute

    def counted(*args, **kwargs):
        calls.append(1)
        time.sleep(0.2)
        return original(*args, **kwargs)

    monkeypatch.setattr(tap, "execute", counted)
    job = _create(client, "SELECT COUNT(*) AS n FROM alerts")
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        client.post(f"{job}/phase", data={"PHASE": "RUN"}, follow_redirects=False).status_code)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [303] * 8
    assert _until(client, job, {"COMPLETED", "ERROR"}) == "COMPLETED" and len(calls) == 1


def test_a_fault_of_the_service_ends_the_job_in_error_not_executing(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tap, "execute", broken)
    job = _create(client, "SELECT 1", PHASE="RUN")
    assert _until(client, job, {"ERROR", "COMPLETED"}) == "ERROR"
    status, message = _status(_votable(client.get(f"{job}/error").content))
    assert status == "ERROR" and "internal error of the service (RuntimeError)" in message and "a bug" not in message


def test_pyvo_runs_and_manages_async_jobs(portal_config, state):
    """The run_async and submit_job / run / wait / fetch_result / delete of pyvo, against a private portal (uvicorn)."""
    import pyvo
    import requests

    with running_server(replace(portal_config, public_read=False)) as base:
        with requests.Session() as session, warnings.catch_warnings():
            # pyvo's submit_job posts with stream=True and never reads nor closes the answer (pyvo 1.10,
            # dal/tap.py TAPQuery.submit): its socket is collected unclosed, pyvo's leak, not the portal's
            warnings.simplefilter("ignore", ResourceWarning)
            _check_pyvo(pyvo, requests, base, session, portal_config, state)
            gc.collect()


def _check_pyvo(pyvo, requests, base, session, portal_config, state) -> None:
    """run_async, then a job submitted, run, waited for, fetched, listed and deleted; errors as pyvo raises them."""
    if True:
        session.headers["Authorization"] = f"Bearer {_token(portal_config)}"
        service = pyvo.dal.TAPService(f"{base}/api/v1/tap", session=session)
        results = service.run_async(f"SELECT alert_id, ra, dec FROM broker.alerts WHERE {CONE} ORDER BY alert_id")
        direct = Archive(state[0] / "archive").query("SELECT alert_id FROM alerts WHERE in_cone(ra, dec, 150.0, "
                                                     "2.0, 0.012) ORDER BY alert_id").column(0).to_pylist()
        assert [int(i) for i in results["alert_id"]] == direct and len(direct) == 5
        assert str(results.to_table()["ra"].unit) == "deg"
        job = service.submit_job("SELECT object_id, n_alerts FROM broker.objects ORDER BY n_alerts DESC, object_id")
        assert job.phase == "PENDING"
        job.run().wait(timeout=30)
        assert job.phase == "COMPLETED" and job.execution_duration.value == 30
        rows = job.fetch_result()
        assert len(rows) == 4 and int(rows["n_alerts"][0]) == 3
        url = job.url
        assert url.rsplit("/", 1)[1] in {j.jobid for j in service.get_job_list()}
        job.delete()
        assert session.get(url).status_code == 404 and service.get_job_list() == []
        bad = service.submit_job("SELECT * FROM alerts_all").run().wait(timeout=30)
        assert bad.phase == "ERROR"
        with pytest.raises(pyvo.dal.DALQueryError, match="not published"):
            bad.raise_if_error()
        with pytest.raises(pyvo.dal.DALQueryError, match="not published"):
            service.run_async("SELECT * FROM alerts_all")
        with requests.Session() as anonymous:  # no token: 401 (pyvo's DALServiceError), no job made
            refused = anonymous.post(f"{base}/api/v1/tap/async", data={"QUERY": "SELECT 1"}, allow_redirects=False)
            assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"


@needs_stilts
def test_stilts_tapquery_runs_async_as_topcat_does(portal_config):
    with running_server(portal_config) as base:
        tap_url = f"tapurl={base}/api/v1/tap"
        found = _stilts("tapquery", tap_url, "ofmt=csv", "delete=always",
                        "adql=SELECT object_id, n_alerts FROM broker.objects ORDER BY n_alerts DESC, object_id")
        refused = _stilts("tapquery", tap_url, "ofmt=csv", "adql=SELECT * FROM read_csv('/etc/passwd')")
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[:2] == ["object_id,n_alerts", "OBJ3488120545576,3"]
    assert "COMPLETED" in found.stderr  # the job's phases, as stilts reports them
    assert refused.returncode != 0 and "table functions are not read" in refused.stdout + refused.stderr


def _restarted(config) -> TestClient:
    """A second portal over the same settings: what a restart of ``broker serve`` reads back."""
    return TestClient(create_app(config))


def test_jobs_survive_a_restart_with_their_results_parameters_and_times(portal_config):
    """Jobs were kept in memory only: a restart of the portal lost every job, result and destruction time."""
    config = replace(portal_config, tap_timeout_s=120.0)
    with TestClient(create_app(config)) as client:
        done = _create(client, "SELECT TOP 3 alert_id FROM alerts ORDER BY alert_id", PHASE="RUN", RUNID="r1")
        _until(client, done, {"COMPLETED"})
        failed = _create(client, "SELECT * FROM alerts_all", PHASE="RUN")
        _until(client, failed, {"ERROR"})
        pending = _create(client, "SELECT COUNT(*) AS n FROM alerts", MAXREC="5")
        client.post(f"{pending}/destruction", data={"DESTRUCTION": "2999-01-01T00:00:00Z"})
        running = _create(client, SLOW, PHASE="RUN")
        _until(client, running, {"EXECUTING"})
        before = {job: client.get(job).text for job in (done, failed, pending)}
        result = client.get(f"{done}/results/result").content
    assert (portal_config.tap_jobs_dir / done.rsplit("/", 1)[1] / "job.json").is_file()
    with _restarted(config) as client:
        for job, document in before.items():
            assert client.get(job).text == document, job  # phase, times, parameters, runId, destruction
        assert client.get(f"{done}/results/result").content == result
        assert "not published" in _status(_votable(client.get(f"{failed}/error").content))[1]
        stopped = client.get(running).text
        assert _uws(stopped, "phase") == "ERROR" and "portal stopped while this job was EXECUTING" in stopped
        assert client.post(f"{pending}/phase", data={"PHASE": "RUN"}, follow_redirects=False).status_code == 303
        assert _until(client, pending, {"COMPLETED", "ERROR"}) == "COMPLETED"
        client.delete(done)
    with _restarted(config) as client:
        assert client.get(done).status_code == 404 and _phase(client, pending) == "COMPLETED"
    assert not (portal_config.tap_jobs_dir / done.rsplit("/", 1)[1]).exists()


def test_restored_jobs_are_destroyed_at_their_time_and_bounded(portal_config):
    config = replace(portal_config, tap_job_destruction_s=2.0, tap_job_max_destruction_s=3600.0)
    with TestClient(create_app(config)) as client:
        longer = [_create(client, "SELECT 1 AS one FROM alerts") for _ in range(3)]
        for job in longer:
            client.post(f"{job}/destruction", data={"DESTRUCTION": "2999-01-01T00:00:00Z"})
        short = _create(client, "SELECT 1 AS one FROM alerts")
    with _restarted(replace(config, tap_jobs=3, tap_jobs_per_client=3)) as client:
        assert client.get(short).status_code == 200  # not yet destroyed
        kept = [job for job in longer if client.get(job).status_code == 200]
        assert kept == longer[1:]  # the newest within the bound, the oldest dropped
        time.sleep(2.2)
        assert client.get(short).status_code == 404  # destroyed by the loop's timer, restored with it
    assert sorted(p.name for p in portal_config.tap_jobs_dir.iterdir()) == sorted(j.rsplit("/", 1)[1] for j in kept)


def test_unreadable_job_folders_are_left_out_and_the_portal_serves(portal_config, caplog):
    folder = portal_config.tap_jobs_dir
    (folder / "0123456789abcdef").mkdir(parents=True)
    (folder / "0123456789abcdef" / "job.json").write_text("{not json")
    (folder / "fedcba9876543210").mkdir()
    (folder / "fedcba9876543210" / "job.json").write_text('{"job_id": "fedcba9876543210", "phase": "EXECUTING"}')
    (folder / "00000000000000aa").mkdir()  # a job made as the portal stopped, before its state was written
    (folder / "not-a-job").mkdir()
    with TestClient(create_app(portal_config)) as client:
        assert client.get(ASYNC).text.count("jobref") == 0
        job = _create(client, "SELECT COUNT(*) AS n FROM alerts", PHASE="RUN")
        assert _until(client, job, {"COMPLETED", "ERROR"}) == "COMPLETED"
    assert "not read, left out" in caplog.text and not (folder / "00000000000000aa").exists()
    assert (folder / "not-a-job").is_dir()  # not ours: left alone


def test_a_job_folder_that_cannot_be_written_keeps_the_job_in_memory(portal_config, caplog):
    portal_config.tap_jobs_dir.parent.mkdir(parents=True, exist_ok=True)
    portal_config.tap_jobs_dir.write_text("a file where the folder should be")
    with TestClient(create_app(portal_config)) as client:
        job = _create(client, "SELECT COUNT(*) AS n FROM alerts", PHASE="RUN")
        assert _until(client, job, {"COMPLETED", "ERROR"}) == "COMPLETED"
        assert _status(_votable(client.get(f"{job}/results/result").content))[0] == "OK"
    assert "not saved" in caplog.text
