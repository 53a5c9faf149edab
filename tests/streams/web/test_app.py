"""The application: errors as JSON without tracebacks, CORS closed by default, body limits before reading."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from broker.errors import ConfigError
from streams.web.app import SMALL_BODY_BYTES, BodyLimit, create_app
from streams.web.config import WebConfig


def test_an_unexpected_error_is_500_without_a_traceback(portal_config):
    app = create_app(portal_config)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/boom")
    assert response.status_code == 500 and response.json() == {"error": "internal"}
    assert "secret" not in response.text and "Traceback" not in response.text


def test_a_broken_archive_is_503_with_its_reason(portal_config, tmp_path):
    (tmp_path / "broken" / "_commits").mkdir(parents=True)
    (tmp_path / "broken" / "_commits" / "00000000000000000001.json").write_text("{not json")
    with TestClient(create_app(replace(portal_config, archive=str(tmp_path / "broken")))) as c:
        response = c.get("/api/v1/alerts")
    assert response.status_code == 503 and response.json()["error"] == "archive_corrupt"


def test_without_an_archive_the_alert_endpoints_are_503(portal_config):
    with TestClient(create_app(replace(portal_config, archive=None))) as c:
        assert c.get("/api/v1/health").json()["archive"] is None
        response = c.get("/api/v1/alerts")
        assert response.status_code == 503 and response.json()["error"] == "unavailable"


def test_cors_is_closed_by_default_and_opens_to_named_origins(client, portal_config):
    asked = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    assert "access-control-allow-origin" not in client.get("/api/v1/health", headers=asked).headers
    assert "access-control-allow-origin" not in client.options("/api/v1/alerts", headers=asked).headers
    friendly = replace(portal_config, cors_origins=("https://ok.example",))
    with TestClient(create_app(friendly)) as c:
        ok = c.get("/api/v1/health", headers={"Origin": "https://ok.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ok.example"
        assert "access-control-allow-origin" not in c.get("/api/v1/health", headers=asked).headers


def test_a_wildcard_origin_is_refused():
    with pytest.raises(ConfigError):
        WebConfig(cors_origins=("*",))


def test_small_endpoints_refuse_large_bodies(client):
    response = client.post("/api/v1/labels", content=b"{" + b" " * (SMALL_BODY_BYTES + 10) + b"}",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("length", [b"999999999999", b"-1", b"12abc"])
def test_a_declared_length_over_the_limit_is_answered_without_reading_the_body(length):
    called, sent = [], []

    async def app(scope, receive, send):  # the application behind the limit: never reached
        called.append(scope)

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/frames", "headers": [(b"content-length", length)]}
    asyncio.run(BodyLimit(app, upload_bytes=1000)(scope, receive, send))
    assert not called and sent[0]["status"] == 413


@pytest.mark.parametrize("archive_in", ["state_dir", "config"])
def test_broker_serve_listens_on_localhost_and_serves_the_state(state, tmp_path, archive_in):
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "streams.cli", "serve", "--state-dir", str(state[0]), "--port", str(port)]
    if archive_in == "config":  # as k8s/portal.yaml: the archive where the pipeline's [archive] path says
        (tmp_path / "pipeline.toml").write_text(f'archive = {{path = "{state[0] / "archive"}"}}\n')
        cmd[5] = str(tmp_path / "empty-state")
        cmd += ["--config", str(tmp_path / "pipeline.toml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.3)
        assert body is not None and body["archive"] == 6
        assert proc.poll() is None
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert f"http://127.0.0.1:{port}/" in out


def test_a_slow_read_does_not_hold_the_other_requests(portal_config, monkeypatch):
    import threading
    import time

    import httpx

    from streams.web import queries

    release = threading.Event()
    real_cone = queries.cone

    def slow_cone(*args):
        release.wait(10)  # a long archive read, in the pool
        return real_cone(*args)

    monkeypatch.setattr(queries, "cone", slow_cone)
    app = create_app(portal_config)

    async def scenario() -> tuple[float, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://portal") as c:
            slow = asyncio.create_task(c.get("/api/v1/cone", params={"ra": 150.0, "dec": 2.0}))
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            health = await c.get("/api/v1/health")
            waited = time.perf_counter() - t0
            assert not slow.done() and health.status_code == 200
            release.set()
            return waited, (await slow).status_code

    waited, status = asyncio.run(scenario())
    assert waited < 5 and status == 200


def test_every_answer_is_neither_sniffed_nor_framed_nor_referred(client, state):
    """API answers (JSON, PNG, a FITS cutout's bytes as the alert holds them, errors, 413) had no such headers."""
    alert_id = state[1][0]["alertId"]
    answers = [client.get(path, follow_redirects=False) for path in (
        "/api/v1/health", f"/api/v1/alerts/{alert_id}", f"/api/v1/alerts/{alert_id}/cutouts/science.png",
        f"/api/v1/alerts/{alert_id}/cutouts/science.fits", "/api/v1/objects/%3Cscript%3E", "/metrics",
        "/openapi.json", "/static/favicon.svg", "/api/v1/alerts/")]
    answers.append(client.post("/api/v1/labels", content=b"x" * (SMALL_BODY_BYTES + 1)))
    for response in answers:
        where = (response.request.url, response.status_code)
        assert response.headers["x-content-type-options"] == "nosniff", where
        assert response.headers["x-frame-options"] == "DENY", where
        assert response.headers["referrer-policy"] == "no-referrer", where
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], where
    assert {r.status_code for r in answers} >= {200, 307, 404, 413}


def test_a_page_keeps_its_own_content_security_policy(client):
    from streams.web.pages import CSP

    response = client.get("/")
    assert response.headers["content-security-policy"] == CSP
    assert len(response.headers.get_list("content-security-policy")) == 1
