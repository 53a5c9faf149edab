"""Every GET endpoint of the OpenAPI document, called with hostile path and query values.

Whatever a caller puts in a path or a query string, the answer is a 2xx or a clear 4xx with the
portal's error body (``{"error", "detail"}``), never a 5xx or a stack trace, and the portal keeps
answering. The endpoints come from the app's own OpenAPI document, so a new one is covered
without editing this file.
"""

from __future__ import annotations

import itertools
from urllib.parse import quote

import pytest

#: Values no endpoint expects: out of range, malformed, huge, injection-shaped, control characters.
HOSTILE = (
    "-1", "0", "9" * 40, "1e308", "-1e308", "nan", "inf", "-inf", "1.5", "0x10", "", " ", "null",
    "' OR 1=1 --", "\"; DROP TABLE objects; --", "../../etc/passwd", "%00", "\u202e\u0000x", "é" * 300,
    "x" * 5000, "{\"a\": 1}", "[1,2]", "*", "${jndi:ldap://x}", "<script>alert(1)</script>",
)
#: Endpoints whose answer is a stream that stays open (answered by tests/streams/web/test_live.py).
STREAMING = {"/api/v1/stream"}


def _get_operations(client) -> list[tuple[str, list[dict]]]:
    doc = client.app.openapi()
    return [(path, ops["get"].get("parameters", [])) for path, ops in doc["paths"].items()
            if "get" in ops and path not in STREAMING]


def _assert_clear(response, where: str) -> None:
    assert response.status_code < 500, (where, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) >= {"error", "detail"}, (where, body)
        assert "Traceback" not in response.text and 'File "/' not in response.text, where


def test_every_get_endpoint_answers_hostile_values_with_a_clear_4xx(client, token):
    operations = _get_operations(client)
    assert len(operations) >= 10  # the document lists the API (a broken document would test nothing)
    for path, params in operations:
        path_params = [p["name"] for p in params if p["in"] == "path"]
        query_params = [p["name"] for p in params if p["in"] == "query"]
        for value in HOSTILE:
            url = path
            for name in path_params:
                url = url.replace("{" + name + "}", quote(value, safe=""))
            response = client.get(url, params={q: value for q in query_params}, headers=token)
            _assert_clear(response, f"GET {url} {value!r}")
    assert client.get("/api/v1/health").status_code == 200


@pytest.mark.parametrize(("name", "value"), [
    ("limit", "-5"), ("limit", "0"), ("limit", "100000000"), ("cursor", "!!notbase64!!"), ("cursor", "A" * 200),
    ("ra", "361"), ("dec", "-91"), ("radius_arcsec", "-1"), ("radius_arcsec", "1e9"), ("order", "random()"),
])
def test_each_query_parameter_alone_out_of_range_is_a_clear_4xx(client, token, name, value):
    for path, params in _get_operations(client):
        if name in {p["name"] for p in params if p["in"] == "query"}:
            required = {p["name"]: "1" for p in params if p["in"] == "query" and p.get("required")}
            _assert_clear(client.get(path.replace("{", "").replace("}", ""), params={**required, name: value},
                                     headers=token), f"GET {path} {name}={value}")


def test_repeated_and_unknown_parameters_are_ignored_or_refused_clearly(client, token):
    for (path, params), extra in itertools.product(_get_operations(client), ("limit", "zzz")):
        if not any(p["in"] == "path" for p in params):
            response = client.get(f"{path}?{extra}=1&{extra}=2&{extra}=abc", headers=token)
            _assert_clear(response, f"GET {path} repeated {extra}")
