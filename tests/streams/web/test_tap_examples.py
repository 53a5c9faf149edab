"""The TAP service's examples document: well-formed XHTML with DALI's RDFa, and every query run against the archive.

Each example is posted to ``/sync`` as TOPCAT would run it (the upload one with a table uploaded, as
``test_tap_upload`` sends it), so a renamed table or column fails here. STILTS ``taplint``'s stage
EXA reads the document and runs the queries too (``test_tap.py``'s taplint run).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from streams.web import tap_examples
from streams.web.tap_examples import EXAMPLES
from tests.streams.web.test_tap import _status, _sync, _votable
from tests.streams.web.test_tap_upload import _targets, _upload, _votable_bytes

XHTML = "{http://www.w3.org/1999/xhtml}"


def _properties(element: ET.Element, name: str) -> list[str]:
    """The plain text of every descendant of ``element`` with ``property="name"`` (RDFa Lite: no markup inside)."""
    found = [e for e in element.iter() if e.get("property") == name]
    assert all(len(e) == 0 for e in found), name  # taplint's E-EXA-PTXT: the value must be plain text
    return [e.text or "" for e in found]


def test_the_examples_document_is_xhtml_with_dalis_rdfa_and_is_declared(client):
    response = client.get("/api/v1/tap/examples")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/xhtml+xml")
    root = ET.fromstring(response.content)  # well-formed XML, or this raises
    assert root.tag == f"{XHTML}html"
    (body,) = [e for e in root.iter() if e.get("vocab") is not None]
    assert body.get("vocab") == tap_examples.VOCABULARY
    found = [e for e in root.iter() if e.get("typeof") == "example"]
    assert [e.get("id") for e in found] == [x.id for x in EXAMPLES] and 6 <= len(found) <= 10
    published = {"broker.alerts", "broker.objects"}
    for element, example in zip(found, EXAMPLES, strict=True):
        assert element.get("resource") == f"#{example.id}"
        assert _properties(element, "name") == [example.name]
        assert _properties(element, "query") == [example.query]  # escaped and read back whole ('<', '&')
        assert set(_properties(element, "table")) == set(example.tables) <= published
    capabilities = client.get("/api/v1/tap/capabilities").text
    assert ('standardID="ivo://ivoa.net/std/DALI#examples"><interface xsi:type="vs:ParamHTTP">'
            '<accessURL use="full">http://testserver/api/v1/tap/examples</accessURL>') in capabilities


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_every_example_runs_against_the_archive(client, example):
    if example.needs_upload:
        votable = _upload(client, example.query, _votable_bytes(_targets()))
    else:
        votable = _votable(_sync(client, example.query).content)
    status, message = _status(votable)
    assert status == "OK", message
    rows = votable.get_first_table().array
    if example.id in ("recent-cone", "objects-box", "polygon", "upload-crossmatch", "nightly-counts"):
        assert len(rows) > 0  # the tests' archive lies around (150, 2) on three nights
    if example.id == "class-alerts":  # every alert of the tests' archive: the v3 sample's SN at 0.81
        assert len(rows) == 6 and {str(c) for c in rows["class_label"]} == {"SN"}
    if example.id == "light-curve":  # the object seen on all three frames
        assert len(rows) == 3 and list(rows["mjd"]) == sorted(rows["mjd"])
    if example.id == "upload-crossmatch":
        assert {str(n) for n in rows["name"]} == {"first", "fourth"}


def test_only_the_upload_example_needs_an_upload_and_says_so():
    assert [e.id for e in EXAMPLES if e.needs_upload] == ["upload-crossmatch"]
    assert all("needs an upload" in e.name for e in EXAMPLES if e.needs_upload)
