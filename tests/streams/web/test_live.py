"""The live stream: server-sent events of new alerts, each viewer through its own filter, the loop never blocked."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import httpx
import pytest

from streams.alert_expr import AlertFilter
from streams.settings import KafkaSettings
from streams.web import live
from streams.web.app import create_app
from streams.web.config import WebConfig
from tests.broker.test_archive import sample


@contextmanager
def running_server(config: WebConfig) -> Iterator[str]:
    """``broker serve``'s application under uvicorn in a thread, on a free 127.0.0.1 port; its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning",
                                           ws="none", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the portal did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def _record(alert_id: int, rb: float) -> dict:
    rec = copy.deepcopy(sample(3))
    rec["alertId"] = rec["sourceId"] = alert_id
    rec["candid"], rec["scores"]["rb"] = f"LIVE-F1-r-0001/{alert_id % 1000}", rb
    return rec


def test_an_event_is_one_json_line_without_nan():
    text = live.sse("alert", {"alert_id": 2**63 - 1, "rb": float("nan"), "object_id": "a\nb"})
    name, data, end = text.split("\n", 2)
    assert name == "event: alert" and end == "\n"
    assert json.loads(data.removeprefix("data: ")) == {"alert_id": 2**63 - 1, "rb": None, "object_id": "a\nb"}


class _Offline(live.LiveHub):
    """A hub without its consumer: the test hands it alerts as the consumer thread would."""

    def _start_consumer(self) -> None:
        pass


def test_the_hub_hands_each_alert_to_the_viewers_whose_filter_it_passes():
    from prometheus_client import CollectorRegistry

    hub = _Offline(KafkaSettings("127.0.0.1:9"), "alerts", CollectorRegistry())

    async def scenario() -> tuple[list[str], list[str]]:
        everyone, picky = hub.join(AlertFilter(None)), hub.join(AlertFilter("rb > 0.5"))
        for v in (everyone, picky):
            assert json.loads(v.queue.get_nowait().split("data: ")[1])["state"] == "waiting"
        deliver = threading.Thread(target=lambda: [hub._deliver(_record(1, 0.1)), hub._deliver(_record(2, 0.9)),
                                                   hub._deliver({"alertId": "not an alert"})])
        deliver.start()  # from another thread, as the consumer does
        while deliver.is_alive():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the hand-over is call_soon_threadsafe
        got = ([everyone.queue.get_nowait() for _ in range(everyone.queue.qsize())],
               [picky.queue.get_nowait() for _ in range(picky.queue.qsize())])
        hub.leave(everyone)
        hub.leave(picky)
        return got

    everyone, picky = asyncio.run(scenario())
    ids = lambda events: [json.loads(e.split("data: ")[1])["alert_id"] for e in events]  # noqa: E731
    assert ids(everyone) == [1, 2] and ids(picky) == [2]
    assert hub.alerts._value.get() == 3 and hub.viewers._value.get() == 0


def test_live_streams_beyond_the_most_a_server_keeps_are_refused_until_one_closes(monkeypatch):
    """Every open stream was kept, without bound: a connection, a queue and a filter each."""
    from prometheus_client import CollectorRegistry

    from broker.errors import RateLimited

    monkeypatch.setattr(live, "MAX_VIEWERS", 3)
    hub = _Offline(KafkaSettings("127.0.0.1:9"), "alerts", CollectorRegistry())

    async def scenario() -> None:
        open_ = [hub.join(AlertFilter(None)) for _ in range(3)]
        with pytest.raises(RateLimited, match="3 live streams are open") as refused:
            hub.join(AlertFilter(None))
        assert refused.value.retry_after_s == live.RETRY_VIEWER_S  # the 429's Retry-After
        hub.leave(open_.pop())
        open_.append(hub.join(AlertFilter(None)))  # room again
        for v in open_:
            hub.leave(v)

    asyncio.run(scenario())
    assert hub.viewers._value.get() == 0


def test_one_client_cannot_hold_every_live_stream(monkeypatch, portal_config):
    """One client (one token, or one address without) could open all MAX_VIEWERS streams: every other got 429."""
    monkeypatch.setattr(live, "MAX_VIEWERS_PER_CLIENT", 2, raising=False)
    config = replace(portal_config, bootstrap="127.0.0.1:9")  # no Kafka there: the streams open, status "down"
    mine, other = (config_token(config, name) for name in ("mine", "other"))
    with running_server(config) as url, httpx.Client(base_url=url, timeout=10) as client:
        def opened(token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = client.send(client.build_request("GET", "/api/v1/stream", headers=headers), stream=True)
            held.append(response)
            return response.status_code

        held: list[httpx.Response] = []
        try:
            assert [opened(mine), opened(mine), opened(mine)] == [200, 200, 429]
            assert "the most one client keeps" in held[-1].read().decode()
            assert [opened(other), opened(None)] == [200, 200]  # another token, the address without one
            held[0].close()
            _wait(lambda: opened(mine) == 200, 10, "a stream of 'mine' once one of its own closed")
        finally:
            for response in held:
                response.close()


def config_token(config: WebConfig, name: str) -> str:
    """A read token added to ``config``'s token file (the server opens the same file)."""
    from streams.web.tokens import TokenStore

    store = TokenStore(config.tokens_path)
    try:
        return store.add(name, ["read"])
    finally:
        store.close()


def test_a_slow_viewer_loses_its_oldest_alerts_not_the_servers_memory():
    async def scenario() -> live.Viewer:
        viewer = live.Viewer(AlertFilter(None), asyncio.get_running_loop())
        for i in range(live.QUEUE_SIZE + 10):
            viewer.offer(f"event {i}")
        return viewer

    viewer = asyncio.run(scenario())
    assert viewer.queue.qsize() == live.QUEUE_SIZE and viewer.dropped == 10
    assert viewer.queue.get_nowait() == "event 10"


def test_without_kafka_the_stream_is_503_and_a_bad_filter_400(client):
    res = client.get("/api/v1/stream")
    assert res.status_code == 503 and res.json()["error"] == "unavailable" and "--bootstrap" in res.json()["detail"]
    res = client.get("/api/v1/stream", params={"filter": "__import__('os').system('true')"})
    assert res.status_code == 400 and res.json()["error"] == "filter"
    res = client.get("/api/v1/stream", params={"filter": "x" * 1001})
    assert res.status_code == 422


def test_the_hub_logs_in_as_the_pipeline_config_says(portal_config, tmp_path):
    """The ``[kafka]`` table of ``--config`` (k8s/config.yaml: SASL_SSL with a CA) reaches the consumer."""
    from types import SimpleNamespace

    password = tmp_path / "password"
    password.write_text("s3cret\n")
    kafka = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "username": "subscriber",
             "password_file": str(password)}
    config = replace(portal_config, bootstrap="127.0.0.1:9", pipeline=replace(portal_config.pipeline, kafka=kafka))
    portal = SimpleNamespace(config=config, extras={}, registry=None, archive=None)
    hub = live.live_hub(SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(portal=portal))))
    conf = hub.settings.common()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.username"] == "subscriber"


def _read_events(url: str, out: list[tuple[str, dict]], stop: threading.Event) -> None:
    """Collect (event, data) of a stream until ``stop`` (the server's shutdown then cuts it off)."""
    try:
        with httpx.stream("GET", url, timeout=httpx.Timeout(5.0, read=60.0)) as res:
            assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in res.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name:
                    out.append((name, json.loads(line[6:])))
                if stop.is_set():
                    return
    except httpx.HTTPError:
        if not stop.is_set():
            raise


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.kafka
def test_a_new_alert_reaches_every_open_stream_that_wants_it(kafka, portal_config):
    from streams.topics import TopicSpec, create_topics

    topic = f"alerts-live-{uuid.uuid4().hex[:8]}"
    create_topics(kafka.bootstrap, [TopicSpec(topic)])
    config = replace(portal_config, bootstrap=kafka.bootstrap, alerts_topic=topic)
    everyone: list[tuple[str, dict]] = []
    picky: list[tuple[str, dict]] = []
    stop = threading.Event()
    with running_server(config) as base:
        readers = [threading.Thread(target=_read_events, args=(f"{base}/api/v1/stream", everyone, stop), daemon=True),
                   threading.Thread(target=_read_events, args=(f"{base}/api/v1/stream?filter=rb%20%3E%200.5", picky,
                                                               stop), daemon=True)]
        for r in readers:
            r.start()
        try:
            _send_two_alerts_and_check_both_streams(base, kafka.bootstrap, topic, everyone, picky)
        finally:  # the readers end quietly when the server stops: no thread's traceback beside this test's report
            stop.set()
    for r in readers:
        r.join(10)


def _send_two_alerts_and_check_both_streams(base: str, bootstrap: str, topic: str, everyone: list[tuple[str, dict]],
                                            picky: list[tuple[str, dict]]) -> None:
    from confluent_kafka import Producer

    from streams import serde

    _wait(lambda: ("status", {"state": "live", "message": f"reading {topic}"}) in everyone, 30, "the consumer")
    health = httpx.get(f"{base}/api/v1/health", timeout=10)  # the event loop still answers
    assert health.status_code == 200
    producer = Producer({"bootstrap.servers": bootstrap})
    big = 2**63 - 5
    for alert_id, rb in ((big, 0.1), (big + 1, 0.9)):
        producer.produce(topic, serde.encode_ocf("alert", _record(alert_id, rb)), b"k")
    producer.flush(10)
    _wait(lambda: len([e for e in everyone if e[0] == "alert"]) == 2, 60, "two alerts on the open stream")
    _wait(lambda: any(e[0] == "alert" for e in picky), 10, "the filtered stream")
    time.sleep(0.5)
    assert [e[1]["alert_id"] for e in everyone if e[0] == "alert"] == [big, big + 1]
    assert [e[1]["alert_id"] for e in picky if e[0] == "alert"] == [big + 1]
    (summary,) = [e[1] for e in picky if e[0] == "alert"]
    assert summary["rb"] == 0.9 and summary["candid"] == f"LIVE-F1-r-0001/{(big + 1) % 1000}"
    # not archived: its cutouts come from what the live stream read
    cut = httpx.get(f"{base}/api/v1/alerts/{big + 1}/cutouts/difference.png", timeout=10)
    assert cut.status_code == 200 and cut.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert httpx.get(f"{base}/api/v1/alerts/{big + 1}", timeout=10).json()["summary"]["rb"] == 0.9


def test_the_context_of_a_live_alert_is_told_in_brief():
    rec = sample(3)
    brief = live.context_of(rec)
    ctx = rec["context"]
    assert brief["moving"] == bool(ctx["moving"]) and brief["on_star"] == ctx["on_star"]
    assert brief["host"] == (ctx["host"] or {}).get("name")
    assert live.context_of({"context": None}) is None and live.context_of({}) is None
    hostile = live.context_of({"context": {"host": "not a record", "matches": ["x", {"name": "NGC1"}]}})
    assert hostile == {"host": None, "host_offset_arcsec": None, "nuclear": None, "on_star": None, "moving": False,
                       "catalog": "NGC1", "trail": False}
    trail = {"catalog": "frame", "version": "F-1", "name": "trail 1", "kind": "trail"}
    on_trail = live.context_of({"context": {"matches": [trail]}})
    assert on_trail["trail"] and on_trail["catalog"] is None  # a trail is not a catalogued object


def test_the_consumer_stops_once_nobody_watches_and_starts_again_for_the_next_viewer(monkeypatch):
    from prometheus_client import CollectorRegistry

    monkeypatch.setattr(live, "IDLE_STOP_S", 0.2)
    runs = []

    class _Counting(live.LiveHub):
        def _consume(self) -> None:  # stands for the Kafka consumer: reads until told to stop
            runs.append(time.monotonic())
            while not self._should_stop():
                time.sleep(0.02)

    hub = _Counting(KafkaSettings("127.0.0.1:9"), "alerts", CollectorRegistry())

    async def watch_then_leave() -> None:
        viewer = hub.join(AlertFilter(None))
        await asyncio.sleep(0.1)
        hub.leave(viewer)

    asyncio.run(watch_then_leave())
    _wait(lambda: hub._thread is None, 5, "the idle consumer to stop")
    asyncio.run(watch_then_leave())
    assert hub._thread is not None and len(runs) == 2  # a new viewer, a new consumer
    hub.close()
    assert hub._thread is None


# --- an alert id read live and held in the archive -------------------------------------------------
def _forged(record: dict) -> dict:
    """``record``'s id with other values: what a hostile or faulty producer of the alert topic sends."""
    out = copy.deepcopy(record)
    out["scores"]["rb"], out["candid"] = 0.001, "FORGED/0"
    out["cutoutDifference"]["stampData"] = b"not a cutout"
    return out


def test_a_live_alert_reusing_an_archived_id_never_replaces_the_archived_one(client, state):
    """An alert published with an archived id is never shown in place of the archived one.

    The hub put every alert it read in the record cache, which answered by id before the archive: the
    live one was shown, cutouts and all.
    """
    from streams.web.api import record_cache

    archived = state[1][0]
    alert_id = archived["alertId"]
    assert client.get(f"/api/v1/alerts/{alert_id}").json()["summary"]["rb"] == archived["scores"]["rb"]
    cache = record_cache(client.app.state.portal)
    forged_too = _forged(state[1][1])
    kept = [cache.put(_forged(archived)), cache.put(forged_too)]  # as the hub does with what it reads
    for rec in (archived, state[1][1]):
        got = client.get(f"/api/v1/alerts/{rec['alertId']}").json()
        assert got["summary"]["rb"] == rec["scores"]["rb"] and got["candid"] == rec["candid"]
        assert client.get(f"/api/v1/alerts/{rec['alertId']}/cutouts/difference.png").status_code == 200
    assert kept == [False, True]  # held archived: not kept; not held yet: kept as provisional, then replaced
    assert cache.put(forged_too) is False


def test_the_first_record_seen_live_wins_until_the_archive_holds_the_id(monkeypatch):
    from types import SimpleNamespace

    from broker.errors import NotFound
    from streams.web import queries

    held: dict[int, dict] = {}  # the archive: its records by id, and its files
    files = [SimpleNamespace(path="part-1.parquet")]
    lookups = []

    def alert_record(_archive, alert_id: int) -> dict:
        lookups.append(alert_id)
        if alert_id not in held:
            raise NotFound(f"no alert {alert_id}")
        return held[alert_id]

    monkeypatch.setattr(queries, "alert_record", alert_record)
    cache = queries.RecordCache(SimpleNamespace(files=lambda: list(files)), size=2)  # type: ignore[arg-type]
    first, forged = _record(7, 0.8), _forged(_record(7, 0.8))
    kept = [cache.put(first), cache.put(forged)]
    assert cache.get(7) is first  # provisional: the archive is asked first, and does not hold it
    assert kept == [True, False] and lookups == [7]
    assert cache.get(7) is first and cache.get(7) is first and lookups == [7]  # nothing committed: not asked again
    held[7] = _record(7, 0.6)  # archived (its first copy), the live one aside
    files.append(SimpleNamespace(path="part-2.parquet"))
    assert cache.get(7)["scores"]["rb"] == 0.6 and not cache.put(forged) and lookups == [7, 7]
    assert cache.get(7)["scores"]["rb"] == 0.6 and lookups == [7, 7]  # archived: kept, not read again
    cache.put(_record(8, 0.1))
    cache.put(_record(9, 0.1))  # 7 leaves the cache (size 2) ...
    assert cache.put(forged)  # ... and comes back live, forged: held as provisional only
    assert cache.get(7)["scores"]["rb"] == 0.6  # the archive still answers for it
    with pytest.raises(NotFound):
        cache.get(12345)


def test_images_of_a_provisional_record_are_not_cached_for_ever(client, state):
    """Cutouts of an alert read live were ``immutable`` for a day; the archive's record of its id may differ."""
    from streams.web.api import record_cache

    live = _forged(state[1][0])
    live["alertId"] = 987654321  # read live, not (yet) archived
    assert record_cache(client.app.state.portal).put(live)
    provisional = client.get("/api/v1/alerts/987654321/cutouts/science.fits").headers["Cache-Control"]
    archived = client.get(f"/api/v1/alerts/{state[1][0]['alertId']}/cutouts/science.fits").headers["Cache-Control"]
    assert "immutable" not in provisional and "max-age=30" in provisional and "immutable" in archived


def test_the_cutouts_of_a_card_asked_at_once_read_the_archive_once(monkeypatch):
    import threading
    import time
    from types import SimpleNamespace

    from streams.web import queries

    reads = []

    def alert_record(_archive, alert_id: int) -> dict:
        reads.append(alert_id)
        time.sleep(0.2)  # a read from the archive
        return _record(alert_id, 0.5)

    monkeypatch.setattr(queries, "alert_record", alert_record)
    cache = queries.RecordCache(SimpleNamespace(files=lambda: []))  # type: ignore[arg-type]
    threads = [threading.Thread(target=cache.get, args=(alert_id,)) for alert_id in (7, 7, 7, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(reads) == [7, 8]
