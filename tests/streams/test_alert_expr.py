"""Filters and projections over alerts (``streams.alert_expr``)."""


import numpy as np
import pytest

import schemas
from broker.errors import ConfigError, FilterExpressionError
from streams.alert_expr import AlertFilter, FieldSelection, alert_paths
from tests.schemas.test_schemas import _alert


def _with_history():
    """An r-band alert at MJD 60000.5 with earlier detections: r at 59990 and 59995, g at 59998."""
    _, alert = _alert()
    alert["prv_sources"] = [
        {"candid": f"h/{i}", "mjd": mjd, "filter": band, "ra": 150.0, "dec": 2.0, "flux": 900.0, "flux_err": 90.0,
         "snr": 10.0, "rb": 0.9} for i, (mjd, band) in enumerate([(59990.0, "r"), (59995.0, "r"), (59998.0, "g")])]
    return alert


def test_filter_expressions():
    _, alert = _alert()  # rb 0.9, snr 12
    assert AlertFilter("rb > 0.8 and snr > 7")(alert)
    assert not AlertFilter("rb > 0.95 or abs(snr) < 5")(alert)
    assert AlertFilter("filter == 'r' and ndet >= 1")(alert)
    assert AlertFilter(None)(alert)


def test_filters_over_nested_fields():
    _, alert = _alert()
    assert AlertFilter("source.snr > 7 and scores.rb > 0.8 and object.ndet >= 1")(alert)
    assert not AlertFilter("source.snr > 12.5")(alert)
    assert AlertFilter("provenance.telescope == 'TEST' and source.filter in ('g', 'r')")(alert)
    assert AlertFilter("latency > 4 and latency < 6")(alert)  # alert_time - exposure_end = 5 s


def test_class_label_and_class_probability_are_the_names_tap_and_rest_give_them():
    """The probability of an alert's label could not be read (TAP and REST answer it): ``class_probability``.

    A filter read ``classification.label`` but not that label's probability, which TAP's ``broker.alerts``
    and REST's summaries answer as ``class_probability``; both names are now the filter's too.
    """
    from tests.broker.test_archive import sample

    alert = sample(4)  # SN at 0.81, mover at 0.01
    f = lambda expr: AlertFilter(expr)(alert)  # noqa: E731
    assert f("class_label == 'SN' and class_probability > 0.8")
    assert f("class_label in ('SN', 'AGN') and class_probability == classification.probabilities.SN")
    assert not f("class_probability > 0.9") and not f("class_label == 'mover'")
    alert["classification"]["label"] = "mover"
    assert f("class_label == 'mover' and class_probability < 0.05")
    for unclassified in (sample(2), {**sample(4), "classification": None}):
        assert not AlertFilter("class_probability > 0")(unclassified)  # null: does not match
        assert AlertFilter("class_label is None and class_probability is None")(unclassified)
    hostile = {**sample(4), "classification": {"label": ["SN"], "probabilities": "SN"}}
    assert AlertFilter("class_probability is None")(hostile)

def test_filters_over_the_history():
    alert = _with_history()
    f = lambda expr: AlertFilter(expr)(alert)  # noqa: E731
    assert f("ndet('r') == 3 and nprev('r') == 2 and ndet() == 4 and nprev('g') == 1 and ndet('i') == 0")
    assert f("ndet(filter) == 3")  # the band of this alert
    assert f("abs(since_first('r') - 10.5) < 1e-9 and abs(since_last('r') - 5.5) < 1e-9")
    assert f("abs(since_first() - 10.5) < 1e-9 and abs(since_last('g') - 2.5) < 1e-9")
    assert f("nbands() == 2 and 'g' in prv_sources.filter and max(prv_sources.mjd) == 59998")
    assert not f("since_last('i') > 0")  # no previous detection in i: null does not match
    assert not f("ndet('r') >= 4")
    assert not f("ndet(5) >= 0")  # a band is a string: does not match
    alert["prv_nondetections"] = [{"frame_id": "f", "mjd": 59999.0, "filter": "r", "limiting_flux": 300.0,
                                   "diffmaglim": 20.8}]
    assert f("nnondet('r') == 1 and nnondet('g') == 0 and abs(since_nondet('r') - 1.5) < 1e-9")
    alert["prv_sources"].append({**alert["prv_sources"][0], "candid": "h/3", "filter": None})
    assert f("nbands() == 2")  # a detection without a filter is no third band
    assert not f("since_nondet('g') < 10")


def test_sep_is_the_angle_astropy_measures_and_a_cone_of_any_filter():
    from astropy.coordinates import SkyCoord

    rng = np.random.default_rng(5)
    _, alert = _alert()
    for ra, dec, ra0, dec0 in zip(*rng.uniform([0, -90, 0, -90], [360, 90, 360, 90], (400, 4)).T, strict=True):
        alert["source"]["ra"], alert["source"]["dec"] = float(ra), float(dec)
        far = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(ra0, dec0, unit="deg")).arcsec
        assert AlertFilter(f"abs(sep({float(ra0)!r}, {float(dec0)!r}) - {float(far)!r}) < 1e-3")(alert)  # 1 mas
    alert["source"]["ra"], alert["source"]["dec"] = 0.0001, 0.0
    assert AlertFilter("sep(359.9999, 0) < 0.73 and rb > 0.5")(alert)  # across RA 0
    assert not AlertFilter("sep('150', 2) < 1")(alert) and not AlertFilter("sep(1) < 1")(alert)  # no match
    alert["source"]["ra"] = None
    assert not AlertFilter("sep(0, 0) < 3600")(alert)  # a detection without a position is in no cone
    with pytest.raises(FilterExpressionError):
        AlertFilter("sep(1, 2, 3) < 1")


def test_a_missing_field_or_null_score_does_not_match():
    _, alert = _alert()
    alert["scores"]["rb"] = None  # cutouts that could not be normalised
    assert not AlertFilter("rb > 0.5")(alert)
    assert not AlertFilter("scores.rb > 0.5")(alert)
    del alert["source"]["magpsf"]  # e.g. an older packet: the field is null
    assert not AlertFilter("source.magpsf < 20")(alert)


@pytest.mark.parametrize("expr", ["rb >", "__import__('os').system('true')", "rb.__class__", "nope > 1",
                                  "[x for x in range(10**9)]",
                                  "source.__class__", "scores.rb.__class__.__mro__", "source.items()",
                                  "source['snr']", "().__class__.__bases__", "(lambda: 1)()", "ndet.__globals__",
                                  "'a' * 10**9", "10 ** 10 ** 10", "getattr(source, 'snr')", "open('/etc/passwd')",
                                  "eval('1')", "ndet(band='r')", "{**source}", "f'{source}'", "(x := 1)",
                                  "source.ra.real", "ndet('r').__class__", "type(source)", "ndet('r', 'g')",
                                  "nbands('r')", "_x > 1"])
def test_hostile_or_broken_filters_are_refused(expr):
    _, alert = _alert()
    with pytest.raises(FilterExpressionError):
        AlertFilter(expr)(alert)


@pytest.mark.parametrize("expr", [
    "1" + "+1" * 300,  # a syntax tree 300 deep: the evaluator's recursion would overflow Python's stack
    "-" * 900 + "snr",
    "not " * 200 + "rb",
    "7 ** 100000 > rb",  # simpleeval allows exponents to 4000000: 9 ** 4000000 takes seconds per alert
    "[[1] * 100] * 200 == 1",  # nested repetition: simpleeval walks every item of every value it makes
    "'%0200000d' % 1 == filter",  # printf formatting: '%0999999999d' % 1 would be a gigabyte per alert
])
def test_filters_that_would_exhaust_the_stack_the_cpu_or_the_memory_are_refused(expr):
    _, alert = _alert()
    with pytest.raises(FilterExpressionError, match="nested too deeply|too large|repeated|'%'"):
        AlertFilter(expr)(alert)


def test_bounded_operators_still_compute_what_filters_need():
    _, alert = _alert()  # rb 0.9, snr 12
    assert AlertFilter("snr ** 2 > 100 and snr % 5 == 2 and 10 ** 300 > snr and [1, 2] * 3 == [1, 2] * 3")(alert)
    assert AlertFilter("(" * 50 + "rb > 0.5" + ")" * 50)(alert)  # parentheses alone nest nothing


def test_a_filter_that_explodes_on_real_values_is_stopped_not_run():
    _, alert = _alert()
    keep = AlertFilter("filter * 10**9 == 'x'")  # a number on the stand-in values; a string on an alert
    with pytest.raises(FilterExpressionError):
        keep(alert)


def test_filter_is_checked_before_any_alert():
    with pytest.raises(FilterExpressionError, match="unknown"):
        AlertFilter("rbb > 0.5")
    with pytest.raises(FilterExpressionError, match="unknown"):
        AlertFilter("source.nope > 0.5")


def test_alert_paths_cover_every_version():
    paths = alert_paths()
    assert {"source.snr", "scores.rb", "object.ndet", "prv_sources.mjd", "cutoutTemplate.stampData"} <= paths
    for version in schemas.versions("alert"):
        top = {f["name"] for f in schemas.load("alert", version)["fields"]}
        assert top <= paths


def test_field_selection():
    alert = _with_history()
    sel = FieldSelection("objectId, source.ra,source.dec,scores.rb,prv_sources.mjd")
    out = sel.apply(alert)
    assert out == {"objectId": "OBJ1", "source": {"ra": 150.0, "dec": 2.0}, "scores": {"rb": 0.9},
                   "prv_sources": [{"mjd": 59990.0}, {"mjd": 59995.0}, {"mjd": 59998.0}]}
    assert sel.text(alert) == ("objectId=OBJ1 source.ra=150.0 source.dec=2.0 scores.rb=0.9 "
                               "prv_sources.mjd=[59990.0, 59995.0, 59998.0]")
    assert FieldSelection("source,source.ra").apply(alert)["source"] == alert["source"]  # the whole record wins
    assert FieldSelection(None).apply(alert) is alert and not FieldSelection("")
    with pytest.raises(ConfigError, match="source.nope"):
        FieldSelection("source.ra,source.nope")


def test_is_compares_only_with_none_true_or_false():
    """``filter is 'r'`` parsed and matched no alert, 'r' included: Python's identity, not equality."""
    _, alert = _alert()  # band r, rb 0.9
    for expr in ("filter is 'r'", "rb is not 0.9", "snr is 12", "'r' is filter"):
        with pytest.raises(FilterExpressionError, match="compare values with =="):
            AlertFilter(expr)
    assert AlertFilter("rb is not None and source.isdiffpos is True and filter == 'r'")(alert)
    alert["scores"]["rb"] = None
    assert AlertFilter("rb is None")(alert)
