"""Limits of the costly endpoints: a budget per client (429), a bound on the work in hand (503), both with Retry-After.

The portal is served through :class:`AsClient`, which gives each request the client address of
its ``X-Test-Client`` header, as uvicorn gives the connection's peer, so that one test plays many
machines. A costly request is held at work by :func:`held`, a triplet PNG that waits for an event.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from broker.errors import Busy, ConfigError, RateLimited
from streams.web import limits, render
from streams.web.app import create_app
from streams.web.config import WebConfig
from streams.web.limits import RATE_WINDOW_S, RateLimiter, WorkGate, client_key
from tests.streams.web.conftest import FRAMES

#: Endpoints that must answer whatever the costly ones do.
CHEAP = ("/api/v1/health", "/static/live.js", "/", "/objects/x", "/openapi.json", "/metrics", "/favicon.ico")


class AsClient:
    """ASGI wrapper: a request's client address is its ``X-Test-Client`` header, when it has one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        host = dict(scope.get("headers") or []).get(b"x-test-client")
        if scope["type"] == "http" and host:
            scope = {**scope, "client": (host.decode(), 50000)}
        await self.app(scope, receive, send)


@pytest.fixture
def serve(portal_config):
    """``serve(**overrides) -> (TestClient, Portal)``: the tests' portal with other limits."""
    with ExitStack() as stack:
        def make(**overrides):
            app = create_app(replace(portal_config, **overrides))
            return stack.enter_context(TestClient(AsClient(app))), app.state.portal
        yield make


@pytest.fixture
def held(monkeypatch):
    """An event that every triplet PNG waits for (set when the test ends): costly requests held at work."""
    release = threading.Event()

    def waiting(record):
        release.wait(30)
        return b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(render, "triplet_png", waiting)
    yield release
    release.set()


def _as(address: str, **headers) -> dict:
    return {"X-Test-Client": address, **headers}


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _retry_after(response) -> int:
    value = int(response.headers["Retry-After"])
    assert 1 <= value <= RATE_WINDOW_S
    return value


def _metric(client, line_start: str) -> float:
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(line_start)]
    assert len(lines) == 1, lines
    return float(lines[0].rsplit(" ", 1)[1])


# --- the per-client budget -----------------------------------------------------------------------
def test_a_burst_over_a_clients_budget_is_429_with_retry_after_and_others_are_unaffected(serve, state):
    client, portal = serve(client_work_s_per_minute=1e-6)  # one request of any length spends it
    url = f"/api/v1/alerts/{state[1][0]['alertId']}/cutouts/science.png"
    codes = [client.get(url, headers=_as("192.0.2.10")) for _ in range(5)]
    assert [r.status_code for r in codes] == [200, 429, 429, 429, 429]
    refused = codes[1]
    assert refused.json()["error"] == "rate_limited" and "192.0.2.10" in refused.json()["detail"]
    assert _retry_after(refused) >= 59  # the one request falls out of the window a minute after it
    assert client.get(url, headers=_as("192.0.2.11")).status_code == 200  # another machine
    assert client.get(url, headers=_as("192.0.2.10", **{"X-Forwarded-For": "198.51.100.1"})).status_code == 429
    assert client.get("/api/v1/cone", params={"ra": 150, "dec": 2}, headers=_as("192.0.2.10")).status_code == 429
    assert _metric(client, 'portal_refused_total{limit="client_budget"}') == 6.0


def test_a_tokens_budget_is_its_own_whatever_the_address(serve, state):
    client, portal = serve(client_work_s_per_minute=1e-6)
    url = f"/api/v1/alerts/{state[1][0]['alertId']}"
    ana = {"Authorization": f"Bearer {portal.tokens.add('ana', ['read', 'vet'])}"}
    bob = {"Authorization": f"Bearer {portal.tokens.add('bob', ['read'])}"}
    assert client.get(url, headers=_as("192.0.2.10")).status_code == 200
    assert client.get(url, headers=_as("192.0.2.10")).status_code == 429
    assert client.get(url, headers=_as("192.0.2.10", **ana)).status_code == 200  # same machine, a token
    assert client.get("/api/v1/vet/queue", headers=_as("192.0.2.99", **ana)).status_code == 429  # elsewhere: spent
    assert client.get(url, headers=_as("192.0.2.10", **bob)).status_code == 200
    forged = {"Authorization": "Bearer 00000000.forged"}  # no fresh budget from a made-up token: 401 first
    assert client.get(url, headers=_as("192.0.2.10", **forged)).status_code == 401


def test_cheap_endpoints_answer_a_client_over_its_budget(serve, state):
    client, _ = serve(client_work_s_per_minute=1e-6)
    client.get(f"/api/v1/alerts/{state[1][0]['alertId']}")
    assert client.get("/api/v1/alerts").status_code == 429
    for url in CHEAP:
        response = client.get(url)
        assert response.status_code == 200, (url, response.text[:200])
        assert "Retry-After" not in response.headers


def test_uploads_over_their_rate_are_429_with_retry_after(serve):
    client, portal = serve(uploads_per_minute=2)
    token = {"Authorization": f"Bearer {portal.tokens.add('up', ['upload'])}",
             "Content-Type": "application/fits"}
    codes = [client.post("/api/v1/frames", content=b"garbage", headers=token) for _ in range(3)]
    assert [r.status_code for r in codes] == [400, 400, 429]
    assert _retry_after(codes[2]) >= 59


# --- the bound on the work in hand ---------------------------------------------------------------
def _hold_a_slot(pool, client, portal, state):
    """A triplet PNG of 192.0.2.1 at work in ``pool`` (held until the ``held`` fixture's event): its URL and future."""
    triplet = f"/api/v1/alerts/{state[1][0]['alertId']}/triplet.png"
    working = pool.submit(client.get, triplet, headers=_as("192.0.2.1"))
    _wait_for(lambda: portal.limits.gate.running == 1)
    return triplet, working


def test_a_flood_past_the_work_in_hand_is_503_at_once_while_cheap_reads_answer(serve, state, held):
    client, portal = serve(max_costly=1, max_costly_queued=0, query_threads=2)
    with ThreadPoolExecutor(8) as pool:
        triplet, working = _hold_a_slot(pool, client, portal, state)

        def timed(i: int):
            start = time.perf_counter()
            response = client.get(triplet if i % 2 else "/api/v1/alerts", headers=_as(f"192.0.2.{100 + i}"))
            return response, time.perf_counter() - start

        flood = list(pool.map(timed, range(40)))
        assert [r.status_code for r, _ in flood] == [503] * 40
        assert {r.json()["error"] for r, _ in flood} == {"busy"} and all(_retry_after(r) for r, _ in flood)
        assert max(s for _, s in flood) < 1.0  # answered, not queued behind the held request
        for url in CHEAP:
            start = time.perf_counter()
            assert client.get(url).status_code == 200 and time.perf_counter() - start < 1.0, url
        assert _metric(client, 'portal_refused_total{limit="busy"}') == 40.0
        assert _metric(client, "portal_costly_running") == 1.0
        held.set()
        assert working.result(10).status_code == 200
    assert client.get(triplet).status_code == 200


def test_a_request_waits_for_a_slot_up_to_costly_wait_s(serve, state, held):
    client, portal = serve(max_costly=1, max_costly_queued=4, costly_wait_s=0.3, query_threads=2)
    with ThreadPoolExecutor(4) as pool:
        _, working = _hold_a_slot(pool, client, portal, state)
        start = time.perf_counter()
        late = client.get("/api/v1/alerts", headers=_as("192.0.2.2"))
        waited = time.perf_counter() - start
        assert late.status_code == 503 and _retry_after(late) and 0.3 <= waited < 2.0
        waiting = pool.submit(client.get, "/api/v1/alerts", headers=_as("192.0.2.3"))
        _wait_for(lambda: portal.limits.gate.queued == 1)
        held.set()  # the slot passes to the waiting request
        assert working.result(10).status_code == 200 and waiting.result(10).status_code == 200
    assert (portal.limits.gate.running, portal.limits.gate.queued, portal.limits.in_hand) == (0, 0, {})


def test_a_client_may_hold_only_client_concurrency_costly_requests(serve, state, held):
    client, portal = serve(client_concurrency=1, max_costly=2, query_threads=3)
    with ThreadPoolExecutor(2) as pool:
        _, working = _hold_a_slot(pool, client, portal, state)
        second = client.get("/api/v1/alerts", headers=_as("192.0.2.1"))
        assert second.status_code == 429 and _retry_after(second) and "in hand" in second.json()["detail"]
        assert client.get("/api/v1/alerts", headers=_as("192.0.2.2")).status_code == 200
        held.set()
        assert working.result(10).status_code == 200
    assert client.get("/api/v1/alerts", headers=_as("192.0.2.1")).status_code == 200
    assert _metric(client, 'portal_refused_total{limit="client_concurrency"}') == 1.0


def test_slots_are_given_back_after_errors(serve):
    client, portal = serve(max_costly=1, query_threads=2)
    for url in ("/api/v1/alerts/999999", "/api/v1/objects/nosuch", "/api/v1/alerts?cursor=bad", "/api/v1/cone?ra=1"):
        assert client.get(url).status_code in (400, 404, 422), url
    assert (portal.limits.gate.running, portal.limits.in_hand) == (0, {})
    assert client.get("/api/v1/alerts").status_code == 200


def test_the_defaults_leave_the_portals_own_pages_alone(client, state):
    """Five loads of the live page, three of an object's and a frame's, six at a time as a browser asks."""
    records = state[1]
    alerts = client.get("/api/v1/alerts", params={"limit": 60}).json()["items"]
    live = ["/api/v1/alerts?limit=60"] + [f"/api/v1/alerts/{a['alert_id']}/cutouts/{k}.png" for a in alerts
                                          for k in ("science", "reference", "difference")]
    a = records[0]
    obj = [f"/api/v1/objects/{a['objectId']}", f"/api/v1/alerts/{a['alertId']}/triplet.png",
           f"/api/v1/alerts/{a['alertId']}", f"/api/v1/frames/{FRAMES[-1]}", f"/api/v1/frames/{FRAMES[-1]}/image.png"]
    if importlib.util.find_spec("torch") is not None:  # without it the attribution map is 503, limits or not
        obj.append(f"/api/v1/alerts/{a['alertId']}/attribution.png")
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda url: client.get(url).status_code, live * 5 + obj * 3))
    assert set(codes) == {200}


# --- the parts -----------------------------------------------------------------------------------
def test_the_rate_limiter_counts_costs_in_a_sliding_minute():
    limiter = RateLimiter(10, what="s of work")
    limiter.add("a", 8.0, now=0.0)
    limiter.add("a", 3.0, now=10.0)
    with pytest.raises(RateLimited) as refused:
        limiter.take("a", 0.0, now=20.0)
    assert refused.value.retry_after_s == pytest.approx(40.0)  # the 8 s of t=0 leave the window at 60
    limiter.take("a", 0.0, now=60.5)
    limiter.take("b", 0.0, now=20.0)
    uploads = RateLimiter(2)
    uploads.take("t", now=0.0)
    uploads.take("t", now=1.0)
    with pytest.raises(RateLimited) as refused:
        uploads.take("t", now=30.0)
    assert refused.value.retry_after_s == pytest.approx(30.0)
    uploads.take("t", now=60.0)


def test_the_rate_limiter_forgets_old_clients_and_keeps_a_bounded_number(monkeypatch):
    limiter = RateLimiter(5)
    for i in range(50):
        limiter.take(f"k{i}", now=0.0)
    limiter.take("late", now=RATE_WINDOW_S + 1)
    assert len(limiter) == 1
    monkeypatch.setattr(limits, "MAX_KEYS", 10)
    for i in range(50):
        limiter.take(f"m{i}", now=100.0)
    assert len(limiter) == 10


@pytest.mark.parametrize(("host", "key"), [
    ("192.0.2.7", "addr:192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "addr:2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "addr:2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "addr:192.0.2.7"),
    ("testclient", "addr:testclient"),
])
def test_a_client_is_its_address_an_ipv6_one_by_its_64(host, key):
    from starlette.requests import Request

    assert client_key(Request({"type": "http", "headers": [], "client": (host, 1)})) == key
    token = [(b"authorization", b"Bearer 0a1b2c3d.secret")]
    assert client_key(Request({"type": "http", "headers": token, "client": (host, 1)})) == "token:0a1b2c3d"


def test_the_gate_hands_slots_over_and_loses_none_to_timeouts_or_cancels():
    async def scenario() -> None:
        gate = WorkGate(running=1, queued=2, wait_s=0.2)
        await gate.acquire()
        with pytest.raises(Busy):  # waited 0.2 s
            await gate.acquire()
        waiter = asyncio.ensure_future(gate.acquire())
        cancelled = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0.01)
        with pytest.raises(Busy):  # two already wait
            await gate.acquire()
        cancelled.cancel()
        await asyncio.sleep(0.01)
        gate.release()
        await waiter
        assert (gate.running, gate.queued) == (1, 0)
        gate.release()
        assert gate.running == 0

    asyncio.run(scenario())


def test_the_gate_serves_waiting_clients_in_turn():
    async def scenario() -> list[str]:
        gate, served = WorkGate(running=1, queued=10, wait_s=5.0), []
        await gate.acquire("greedy")

        async def one(key: str, n: int) -> None:
            await gate.acquire(key)
            served.append(f"{key}{n}")

        tasks = [asyncio.ensure_future(one("greedy", n)) for n in range(3)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(one("polite", 0)))
        await asyncio.sleep(0.01)
        gate.mean_s = 1.0
        assert gate.expected_wait_s("newcomer") == pytest.approx(3.0)  # one turn of each client before it
        assert gate.expected_wait_s("greedy") == pytest.approx(5.0)  # its three waiting, polite's one, itself
        for _ in tasks:
            gate.release()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return served

    assert asyncio.run(scenario()) == ["greedy0", "polite0", "greedy1", "greedy2"]


def test_the_gate_refuses_at_once_a_request_that_would_wait_past_wait_s():
    async def scenario() -> None:
        gate = WorkGate(running=1, queued=10, wait_s=1.0)
        await gate.acquire()
        gate.release(held_s=10.0)  # slow work lately: the mean time a slot is held is now 2 s
        await gate.acquire()
        start = time.perf_counter()
        with pytest.raises(Busy) as refused:
            await gate.acquire()
        assert time.perf_counter() - start < 0.1 and refused.value.retry_after_s == pytest.approx(2.0)
        assert gate.queued == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("overrides", [
    {"max_costly": 4}, {"max_costly": 0}, {"client_work_s_per_minute": 0.0}, {"client_concurrency": 0},
    {"max_costly_queued": -1}, {"costly_wait_s": float("nan")},
])
def test_limits_that_cannot_hold_are_refused_at_start(overrides):
    with pytest.raises(ConfigError):
        WebConfig(**overrides)
