"""Every POST, PUT and DELETE endpoint of the OpenAPI document, sent hostile bodies.

JSON of the wrong types, huge, deeply nested, with NaN or control characters; forms with many parts,
huge names, no boundary, empty parts and path-traversing file names; bodies of the wrong content
type. The answer is a 2xx or a clear 4xx with the portal's error body (``{"error", "detail"}``),
never a 5xx, and the portal keeps answering. The endpoints come from the app's own OpenAPI document
(as tests/streams/web/test_hostile_params.py does for GET), so a new one is covered without
editing this file. The bodies stay within the portal's limits (streams/web/app.py ``BodyLimit``)
except where a test is about them.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from fastapi.testclient import TestClient

from streams.web.app import SMALL_BODY_BYTES, create_app
from tests.streams.web.test_hostile_params import _assert_clear

#: Methods whose requests carry a body, or change state.
WRITES = ("post", "put", "delete", "patch")
#: A name for each path parameter (a saved watchlist's name, an id).
PATH_VALUE = "fuzz"

_DEEP = 30_000  # levels of nesting: far past any parser's recursion limit, within the 64 kB limit


@pytest.fixture
def client(portal_config):
    """The portal with its rate limits lifted (each request must reach its endpoint's parsing) and 1 MiB uploads."""
    config = dataclasses.replace(portal_config, uploads_per_minute=10 ** 6, uploads_in_flight=10 ** 3,
                                 client_work_s_per_minute=1e9, max_upload_bytes=1 << 20)
    with TestClient(create_app(config)) as c:
        yield c


def _json_bodies() -> list[tuple[str, bytes]]:
    """(name, body) of JSON no endpoint expects."""
    values: dict[str, object] = {
        "null": None, "list": [], "string": "x", "number": 1, "true": True,
        "wrong_types": {"alert_id": "1", "label": 5}, "float_id": {"alert_id": 1.0, "label": "real"},
        "negative": {"alert_id": -1, "label": "real"}, "too_big_id": {"alert_id": 2 ** 70, "label": "real"},
        "extra_key": {"alert_id": 1, "label": "real", "admin": True}, "unknown_label": {"alert_id": 1, "label": "x"},
        "controls": {"alert_id": 1, "label": "real\u0000\u202e\u2028"}, "nested_dict": {"alert_id": {"a": 1}},
        "huge_array": {"alert_id": [0] * 20_000, "label": "real"}, "long_string": {"label": "é" * 5_000},
    }
    bodies = [(name, json.dumps(v).encode()) for name, v in values.items()]
    bodies += [("nan", b'{"alert_id": NaN, "label": "real"}'), ("infinity", b'{"alert_id": Infinity}'),
               ("minus_infinity", b"-Infinity"), ("digits_5000", b'{"alert_id": ' + b"7" * 5000 + b"}"),
               ("exponent", b'{"alert_id": 1e400, "label": "real"}'), ("deep_list", b"[" * _DEEP + b"]" * _DEEP),
               ("deep_dict", b'{"a":' * 10_000 + b"1" + b"}" * 10_000), ("not_json", b"{'alert_id': 1}"),
               ("cut", b'{"alert_id": 1, "lab'), ("not_utf8", b'{"label": "\xff\xfe"}'), ("empty", b""),
               ("bom", b'\xef\xbb\xbf{"alert_id": 1, "label": "real"}'),
               ("duplicate_keys", b'{"alert_id": 1, "alert_id": "x", "label": "real"}')]
    assert all(len(body) <= SMALL_BODY_BYTES for _, body in bodies)  # within the limit: the parsers see them
    return bodies


def _multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"fuzzboundary") -> bytes:
    """A multipart body of (part headers, part bytes)."""
    out = b"".join(b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    return out + b"--" + boundary + b"--\r\n"


def _file(name: bytes, filename: bytes = b"x.csv", data: bytes = b"ra,dec\n1,2\n") -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"', data


def _form_bodies() -> list[tuple[str, str, bytes]]:
    """(name, content type, body) of hostile forms."""
    form = "multipart/form-data; boundary=fuzzboundary"
    names = (b"frame", b"reference", b"watchlist")
    return [
        ("many_parts", form, _multipart([_file(b"f%d" % i) for i in range(1000)])),
        ("many_fields", form, _multipart([(b'Content-Disposition: form-data; name="x%d"' % i, b"1")
                                          for i in range(1000)])),
        ("many_files_of_each_name", form, _multipart([_file(n) for n in names for _ in range(8)])),
        ("huge_field_name", form, _multipart([_file(b"n" * 60_000)])),
        ("huge_filename", form, _multipart([_file(name, b"f" * 60_000) for name in names])),
        ("huge_part_header", form, _multipart([(b"X-Fuzz: " + b"h" * 60_000, b"1")])),
        ("no_boundary", "multipart/form-data", _multipart([_file(n) for n in names])),
        ("wrong_boundary", "multipart/form-data; boundary=other", _multipart([_file(n) for n in names])),
        ("empty_boundary", "multipart/form-data; boundary=", _multipart([_file(n) for n in names])),
        ("empty_parts", form, _multipart([_file(n, data=b"") for n in names])),
        ("path_traversal", form, _multipart([_file(n, b"../../../etc/passwd") for n in names])),
        ("absolute_filename", form, _multipart([_file(n, b"/etc/passwd\x00.fits") for n in names])),
        ("field_not_file", form, _multipart([(b'Content-Disposition: form-data; name="' + n + b'"', b"1")
                                             for n in names])),
        ("no_disposition", form, _multipart([(b"Content-Type: text/csv", b"ra,dec\n1,2\n")])),
        ("not_utf8_names", form, _multipart([_file(b"\xff\xfe", b"\xff.csv")])),
        ("unterminated", form, _multipart([_file(n) for n in names])[:-20]),
        ("only_preamble", form, b"just some bytes, no part at all"),
        ("empty_body", form, b""),
    ]


def _write_operations(client) -> list[tuple[str, str, dict]]:
    doc = client.app.openapi()
    return [(method, path.replace("{name}", PATH_VALUE).replace("{", "").replace("}", ""), op)
            for path, ops in doc["paths"].items() for method, op in ops.items() if method in WRITES]


def _send(client, token, method: str, url: str, content_type: str | None, body: bytes):
    headers = {**token, **({"Content-Type": content_type} if content_type else {})}
    response = client.request(method.upper(), url, content=body, headers=headers)
    assert response.status_code != 429, (method, url, response.text)  # refused before its body was parsed
    return response


def _healthy(client) -> None:
    assert client.get("/api/v1/health").status_code == 200


def test_the_document_lists_the_write_endpoints(client):
    """A broken document would test nothing: the five known ones are there (new ones are fuzzed too)."""
    found = {(m, p) for m, p, _ in _write_operations(client)}
    assert {("post", "/api/v1/frames"), ("post", "/api/v1/crossmatch"), ("put", "/api/v1/watchlists/fuzz"),
            ("delete", "/api/v1/watchlists/fuzz"), ("post", "/api/v1/labels")} <= found


@pytest.mark.parametrize("content_type", ["application/json", "text/csv", "application/fits", None])
def test_every_write_endpoint_answers_hostile_json_with_a_clear_4xx(client, token, content_type):
    for method, url, _ in _write_operations(client):
        for name, body in _json_bodies():
            _assert_clear(_send(client, token, method, url, content_type, body), f"{method} {url} {name}")
    _healthy(client)


def test_every_write_endpoint_answers_hostile_forms_with_a_clear_4xx(client, token):
    for method, url, _ in _write_operations(client):
        for name, content_type, body in _form_bodies():
            _assert_clear(_send(client, token, method, url, content_type, body), f"{method} {url} {name}")
    _healthy(client)


@pytest.mark.parametrize("content_type", ["application/xml", "text/html", "application/x-www-form-urlencoded",
                                          "multipart/mixed; boundary=x", "text/csv; charset=utf-7", "*/*", "",
                                          "application/json\u0000", "a" * 5000])
def test_every_write_endpoint_answers_a_wrong_content_type_with_a_clear_4xx(client, token, content_type):
    for method, url, _ in _write_operations(client):
        response = _send(client, token, method, url, content_type, b"ra,dec\n1,2\n")
        _assert_clear(response, f"{method} {url} {content_type[:40]!r}")
    _healthy(client)


def test_seeded_random_bytes_of_every_content_type_are_never_a_5xx(client, token):
    rng = random.Random(20261207)
    kinds = ["application/json", "text/csv", "multipart/form-data; boundary=fuzzboundary", "application/fits",
             "application/x-www-form-urlencoded"]
    seeds = [b'{"alert_id": 1, "label": "real"}', b"name,ra,dec,radius\nA,10.5,-3,5\n",
             _multipart([_file(b"watchlist"), _file(b"frame", data=b"SIMPLE  =                    T")])]
    for method, url, _ in _write_operations(client):
        for _ in range(40):
            body = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 6)):
                i = rng.randrange(len(body))
                body[i:i + rng.randint(0, 3)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 3)))
            _assert_clear(_send(client, token, method, url, rng.choice(kinds), bytes(body)), f"{method} {url}")
    _healthy(client)


def test_a_body_over_its_limit_is_413_with_the_error_body(client, token):
    from streams.web.app import BodyLimit

    limits = BodyLimit(client.app, client.app.state.portal.config.max_upload_bytes)
    for method, url, _ in _write_operations(client):
        limit = limits.limit({"method": method.upper(), "path": url})
        response = _send(client, token, method, url, "application/json", b"[" + b"0," * (limit // 2) + b"0]")
        _assert_clear(response, f"{method} {url} over the limit")
        assert response.status_code == 413, (method, url, response.status_code)
    _healthy(client)


@pytest.mark.parametrize("url", ["/api/v1/crossmatch", "/api/v1/watchlists/fuzz", "/api/v1/frames"])
def test_a_form_cut_inside_a_part_is_refused_and_its_spooled_file_closed(client, token, url):
    """A form without its closing boundary was answered without its last part, whose file stayed open.

    ``/crossmatch`` answered 400 "the form needs one file part named 'watchlist'" (the part was there),
    and the part's SpooledTemporaryFile was left to the garbage collector (a ResourceWarning).
    """
    import gc
    import warnings

    name = b"frame" if url.endswith("frames") else b"watchlist"
    cut = _multipart([_file(name, data=b"ra,dec\n1,2\n" * 1000)])[:-20]  # without "\r\n--fuzzboundary--\r\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method = "put" if "watchlists" in url else "post"
        response = _send(client, token, method, url, "multipart/form-data; boundary=fuzzboundary", cut)
        gc.collect()
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "invalid_query",
                               "detail": "the form ends inside a part: its closing boundary is missing"}


def test_a_method_a_route_does_not_serve_is_405_with_the_error_body(client, token):
    doc = client.app.openapi()
    for path, ops in doc["paths"].items():
        url = path.replace("{name}", PATH_VALUE).replace("{", "").replace("}", "")
        for method in {"POST", "PUT", "DELETE", "PATCH", "BREW"} - {m.upper() for m in ops}:
            response = _send(client, token, method, url, "application/json", b"{}")
            _assert_clear(response, f"{method} {url}")
            assert response.status_code in (404, 405), (method, url, response.status_code)
    _healthy(client)
