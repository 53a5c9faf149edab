import pytest

from broker.errors import FilterExpressionError
from streams.subscriber import AlertFilter, save_triplet_png
from tests.schemas.test_schemas import _alert


def test_filter_expressions():
    _, alert = _alert()  # rb 0.9, snr 12
    assert AlertFilter("rb > 0.8 and snr > 7")(alert)
    assert not AlertFilter("rb > 0.95 or abs(snr) < 5")(alert)
    assert AlertFilter("filter == 'r' and ndet >= 1")(alert)
    assert AlertFilter(None)(alert)


@pytest.mark.parametrize("expr", ["rb >", "__import__('os').system('true')", "rb.__class__", "nope > 1",
                                  "[x for x in range(10**9)]"])
def test_hostile_or_broken_filters_are_refused(expr):
    _, alert = _alert()
    with pytest.raises(FilterExpressionError):
        AlertFilter(expr)(alert)


def test_filter_is_checked_before_any_alert_and_null_scores_do_not_match():
    with pytest.raises(FilterExpressionError, match="unknown"):
        AlertFilter("rbb > 0.5")
    _, alert = _alert()
    alert["scores"]["rb"] = None  # cutouts that could not be normalised
    assert not AlertFilter("rb > 0.5")(alert)


def test_triplet_png(tmp_path):
    _, alert = _alert()
    path = save_triplet_png(alert, tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
