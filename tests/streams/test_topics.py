"""Topic names (``streams.topics``): legal names, and per-filter topics of bands from FITS headers."""

from __future__ import annotations

import pytest

from streams.topics import band_suffix, filter_topic, is_legal_topic


def test_legal_topic_names():
    assert all(is_legal_topic(n) for n in ("alerts", "alerts.r", "dlq.ingest", "a-b_c.9", "x" * 249))
    assert not any(is_legal_topic(n) for n in ("", ".", "..", "alerts.r'", "alerts r", "alerts/r", "x" * 250,
                                                "alerts.H\u03b1"))


@pytest.mark.parametrize("band", ["r", "g", "i", "z", "Halpha", "r_sdss", "V-Johnson", "B" * 32])
def test_plain_bands_name_their_topic_unchanged(band):
    assert band_suffix(band) == band and filter_topic("alerts", band) == f"alerts.{band}"


@pytest.mark.parametrize("band", ["r'", "", "H\u03b1", "r.x", "../../x", "r\x00", "B" * 33, "'" * 300, "g r"])
def test_other_bands_get_a_legal_distinct_topic(band):
    """A band from a FITS header (``FILTER = 'r'''``: issue 27) never makes an illegal topic name."""
    topic = filter_topic("alerts", band)
    assert is_legal_topic(topic) and topic.startswith("alerts.") and topic.count(".") == 1
    assert len(band_suffix(band)) <= 33 and band_suffix(band) == band_suffix(band)  # stable


def test_bands_that_differ_get_different_topics():
    bands = ["r'", "r\"", "r`", "r_", "r", "r''", "H\u03b1", "H\u03b2", "", " "]
    assert len({band_suffix(b) for b in bands}) == len(bands)
    assert band_suffix("r'").startswith("r_-")
