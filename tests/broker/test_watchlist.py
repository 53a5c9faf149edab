"""Watchlists: reading the CSV (and refusing what is not a position), matching against truth."""

from __future__ import annotations

import time

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from broker.errors import InvalidWatchlist
from broker.watchlist import DEFAULT_RADIUS_ARCSEC, WatchlistFile, parse_angle, read_watchlist


def test_a_list_is_read_with_its_aliases_sexagesimal_and_default_radius():
    text = ("\ufeff# targets of the night\n\nObjName;RAJ2000;DEJ2000;Radius_arcsec\n"
            "M31;00:42:44.3;+41:16:09;60\n\n# a comment between rows\nSN 2026x;10.5;-5.25;\n"
            "NGC 4993;13h09m47.7s;-23d23m02s;3.5\n")
    wl = read_watchlist(text.encode())
    assert wl.names == ("M31", "SN 2026x", "NGC 4993")
    np.testing.assert_allclose(wl.ra, [10.684583, 10.5, 197.44875], atol=1e-6)
    np.testing.assert_allclose(wl.dec, [41.269167, -5.25, -23.383889], atol=1e-6)
    np.testing.assert_allclose(wl.radius_arcsec, [60.0, DEFAULT_RADIUS_ARCSEC, 3.5])


def test_entries_without_a_name_are_named_by_their_row_and_the_default_radius_is_the_readers():
    wl = read_watchlist("ra\tdec\n1\t2\n\n3\t-4\n", default_radius_arcsec=7.0)
    assert wl.names == ("row 2", "row 4") and list(wl.radius_arcsec) == [7.0, 7.0]


@pytest.mark.parametrize("text, hours, degrees", [
    ("12:30:00", True, 187.5), ("12 30 00", True, 187.5), ("12h30m00s", True, 187.5),
    ("-05:30:00", False, -5.5), ("-0:30:00", False, -0.5), ("+89°59′60.0″", False, None), ("45.25", True, 45.25)])
def test_angles_in_decimal_degrees_or_sexagesimal(text, hours, degrees):
    if degrees is None:
        with pytest.raises(ValueError, match="under 60"):
            parse_angle(text, hours)
    else:
        assert parse_angle(text, hours) == pytest.approx(degrees)


def test_matches_are_those_astropy_finds_with_each_entrys_radius():
    rng = np.random.default_rng(3)
    n_entries, n_alerts = 400, 5000
    ra, dec = rng.uniform(10, 12, n_entries), rng.uniform(-1, 1, n_entries)
    radius = rng.uniform(1, 120, n_entries)
    wl = read_watchlist("name,ra,dec,radius\n" + "".join(
        f"e{i},{a:.9f},{d:.9f},{r:.6f}\n" for i, (a, d, r) in enumerate(zip(ra, dec, radius, strict=True))))
    ara, adec = rng.uniform(10, 12, n_alerts), rng.uniform(-1, 1, n_alerts)
    found = wl.match(ara, adec)
    sep = SkyCoord(ara * u.deg, adec * u.deg)[:, None].separation(SkyCoord(ra * u.deg, dec * u.deg)[None, :])
    truth = sorted(zip(*np.nonzero(sep.arcsec <= radius[None, :]), strict=True))
    assert sorted(zip(found.alert.tolist(), found.entry.tolist(), strict=True)) == truth
    assert len(truth) > 100
    np.testing.assert_allclose(found.separation_arcsec, sep.arcsec[found.alert, found.entry], atol=1e-4)
    assert np.all(np.diff(found.alert) >= 0)


def test_matches_across_ra_zero_and_at_the_pole_and_none_for_nan():
    wl = read_watchlist("name,ra,dec,radius\nzero,359.9999,0,2\npole,0,90,5\n")
    found = wl.match(np.array([0.0002, 123.0, np.nan, 0.0]), np.array([0.0, 89.999, 0.0, np.inf]))
    assert [(wl.names[e], a) for a, e in zip(found.alert, found.entry, strict=True)] == [("zero", 0), ("pole", 1)]
    assert found.separation_arcsec[0] == pytest.approx(1.08, abs=0.01)
    assert len(wl.match(np.array([]), np.array([]))) == 0


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"# only a comment\n", "empty"),
    (b"a,b\n1,2\n", "no ra or dec column"),
    (b"ra,dec\n", "no entries"),
    (b"ra,RA,dec\n1,2,3\n", "names the ra column twice"),
    (b"ra,dec\n400,0\n", "row 2, ra: 400 deg is outside"),
    (b"ra,dec\n10,-91\n", "row 2, dec: -91 deg is outside"),
    (b"ra,dec\nnan,0\n", "not a finite number"),
    (b"ra,dec\ninf,0\n", "not a finite number"),
    (b"ra,dec\n1e999,0\n", "not a finite number"),
    (b"ra,dec\n12:61:00,0\n", "under 60"),
    (b"ra,dec\nabc,0\n", "neither decimal degrees nor sexagesimal"),
    (b"ra,dec\n1,2\n3\n", "row 3: no dec"),
    (b"ra,dec,radius\n1,2,-1\n", "radius"),
    (b"ra,dec,radius\n1,2,0\n", "radius"),
    (b"ra,dec,radius\n1,2,1e9\n", "radius"),
    (b"ra,dec,radius\n1,2,wide\n", "not a number"),
    (b"ra,dec,name\n1,2,a\x00b\n", "control characters"),
    (b"ra,dec,name\n1,2,\x1b[2Jclear\n", "control characters"),
    (b"ra,dec,name\n1,2," + b"n" * 200 + b"\n", "at most 128"),
    (b"\xff\xfera,dec\n", "not UTF-8"),
    (b"ra,dec\n" + b"1,1\n" * 11, "more than 10 entries"),
    (b'ra,dec\n"' + b"9" * 200_000 + b'",1\n', "field larger than field limit"),
    (b"ra,dec\n1" + b" " * 100_000 + b"x,1\n", "longer than 32 characters"),  # quadratic for the regex
])
def test_what_is_not_a_watchlist_is_refused_naming_the_row(data, message):
    start = time.perf_counter()
    with pytest.raises(InvalidWatchlist, match=message):
        read_watchlist(data, max_entries=10)
    assert time.perf_counter() - start < 1.0


def test_more_pairs_than_allowed_are_refused_before_any_is_made():
    wl = read_watchlist("ra,dec,radius\n" + "10,0,3600\n" * 100)
    ra, dec = np.full(1000, 10.0), np.zeros(1000)
    assert len(wl.match(ra, dec, max_pairs=100_000)) == 100_000
    with pytest.raises(InvalidWatchlist, match="100,000 .entry, position. pairs, more than 99,999"):
        wl.match(ra, dec, max_pairs=99_999)


def test_a_watchlist_file_is_read_again_when_it_changes_and_a_bad_change_keeps_the_last_good_list(tmp_path, caplog):
    path = tmp_path / "targets.csv"
    path.write_text("name,ra,dec\nA,10,0\n")
    now = [0.0]
    watched = WatchlistFile(path, check_s=30.0, clock=lambda: now[0])
    path.write_text("name,ra,dec\nA,10,0\nB,20,0\n")
    assert watched.current().names == ("A",)  # not looked at again before check_s
    now[0] = 30.0
    assert watched.current().names == ("A", "B")
    path.write_text("name,ra,dec\nC,20,95\n")  # a bad row: the list of A and B stays
    now[0] = 60.0
    with caplog.at_level("WARNING", logger="broker.watchlist"):
        assert watched.current().names == ("A", "B")
    assert "row 2, dec: 95 deg is outside" in caplog.text and "keeping the previous list of 2 entries" in caplog.text
    path.unlink()
    now[0] = 90.0
    assert watched.current().names == ("A", "B")
    path.write_text("name,ra,dec\nD,30,0\n")
    now[0] = 120.0
    assert watched.current().names == ("D",)
    with pytest.raises(InvalidWatchlist, match="cannot read the watchlist"):
        WatchlistFile(tmp_path / "none.csv")


def test_a_bad_default_radius_is_refused():
    with pytest.raises(InvalidWatchlist, match="default radius"):
        read_watchlist("ra,dec\n1,2\n", default_radius_arcsec=float("nan"))
