import math
import sqlite3
from dataclasses import replace

import numpy as np
import pytest

from broker.context import (
    CONTEXT_FEATURE_NAMES,
    OPENNGC_COLUMNS,
    CatalogMatch,
    Context,
    ContextConfig,
    Host,
    OpenNGC,
    build_context,
    on_star,
    trail_matches,
)
from broker.detect import DetectConfig, reference_context
from broker.errors import ConfigError
from broker.moving import Tracklet
from tests.helpers import candidate

M51 = (202.469575, 47.195258)  # NGC 5194 nucleus (deg)


@pytest.fixture(scope="module")
def ngc() -> OpenNGC:
    return OpenNGC()


def _db(path, rows, columns=OPENNGC_COLUMNS):
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE objects ({', '.join(columns)})")
    db.executemany(f"INSERT INTO objects VALUES ({', '.join('?' * len(columns))})", rows)
    db.commit()
    db.close()
    return path


def test_a_position_in_m51_matches_ngc5194_from_the_shipped_database(ngc):
    assert len(ngc) > 13000 and ngc.version.isdigit() and len(ngc.version) == 8
    matches, host = ngc.lookup(M51[0] + 30 / 3600 / math.cos(math.radians(M51[1])), M51[1])  # 30" east
    assert matches[0].name == "NGC5194/M51" and matches[0].kind == "galaxy" and matches[0].catalog == "OpenNGC"
    assert abs(matches[0].distance_arcsec - 30.0) < 2.0 and matches[0].size_arcsec > 600
    assert matches[0].version == ngc.version
    assert host is not None and host.name == "NGC5194/M51" and not host.nuclear and 0 < host.offset_norm < 0.2
    assert ngc.lookup(*M51)[1].nuclear
    assert ngc.match(150.0, -60.0) == ()  # blank sky


def test_the_ellipse_and_its_position_angle_decide_a_match(tmp_path):
    # a galaxy 4' x 1' with its major axis east-west (PA 90), and a star without size
    path = _db(tmp_path / "ongc.db", [
        ("NGC0001", "G", math.radians(10.0), 0.0, 4.0, 1.0, 90, 13.0, None, ""),
        ("NGC0002", "*", math.radians(20.0), 0.0, None, None, None, None, 11.0, "007"),
        ("NGC0003", "Dup", math.radians(30.0), 0.0, 1.0, 1.0, 0, None, None, ""),
    ])
    cat = OpenNGC(path, version="test", config=ContextConfig(ngc_margin_arcsec=0.0))
    assert len(cat) == 2  # the duplicate record is left out
    east, north = 10.0 + 100 / 3600, 100 / 3600
    m, host = cat.lookup(east, 0.0)  # 100" along the major axis (semi-axis 120"): inside
    assert [x.name for x in m] == ["NGC0001"] and abs(host.offset_norm - 100 / 120) < 1e-3
    assert m[0].mag == 13.0 and m[0].size_arcsec == pytest.approx(240.0)
    assert cat.lookup(10.0, north) == ((), None)  # 100" along the minor axis (30"): outside
    m, host = cat.lookup(20.0 + 5 / 3600, 0.0)
    assert m[0].name == "NGC0002/M7" and m[0].kind == "star" and m[0].size_arcsec is None and host is None


def test_a_missing_or_corrupt_catalogue_is_a_clear_startup_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        OpenNGC(tmp_path / "absent.db")
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not SQLite" * 200)
    with pytest.raises(ConfigError, match="corrupt.db"):
        OpenNGC(bad)
    cols = tuple(c for c in OPENNGC_COLUMNS if c != "majax")
    path = _db(tmp_path / "old.db", [], cols)
    with pytest.raises(ConfigError, match="majax"):
        OpenNGC(path)
    with pytest.raises(ConfigError, match="no object"):
        OpenNGC(_db(tmp_path / "empty.db", []))


def test_nan_or_off_sky_positions_give_an_empty_context(ngc):
    for ra, dec in ((math.nan, 10.0), (10.0, math.inf), (10.0, 95.0)):
        assert ngc.lookup(ra, dec) == ((), None)
        det = replace(candidate().detection, ra=ra, dec=dec)
        ctx = build_context(det, ngc, None)
        assert ctx.matches == () and ctx.host is None and not ctx.moving
        assert list(ctx.features()) == list(CONTEXT_FEATURE_NAMES)


def test_records_round_trip_and_features_follow_the_contract():
    m51 = CatalogMatch("OpenNGC", "20260501", "NGC5194/M51", "galaxy", 202.47, 47.2, 3.0, 822.0, None)
    ctx = Context(matches=(m51,),
                  host=Host("reference", "", 202.47, 47.2, 3.0, 0.5, False, 1200.0), on_star=False, moving=True,
                  moving_speed=42.0, moving_links=("a/1", "b/2"))
    rec = ctx.to_record()
    assert rec["matches"][0]["mag"] is None and rec["host"]["flux"] == 1200.0 and rec["moving_links"] == ["a/1", "b/2"]
    assert Context.from_record(rec) == ctx
    assert ctx.features() == {"host": 1.0, "host_offset_norm": 0.5, "nuclear": 0.0, "on_star": 0.0, "moving": 1.0}
    empty = Context().features()
    assert tuple(empty) == CONTEXT_FEATURE_NAMES
    assert empty["host"] == 0.0 and math.isnan(empty["host_offset_norm"]) and math.isnan(empty["on_star"])
    assert Context.from_record(Context().to_record()) == Context()


def test_the_reference_host_wins_unless_absent_or_smaller_than_a_catalogued_galaxy(ngc):
    base = candidate().detection
    ref = replace(base, host_ra=150.0, host_dec=2.0, host_dist=0.6, host_size=3.0, host_flux=900.0, ref_extended=1.0)
    ctx = build_context(ref, ngc, Tracklet(55.0, ("x/1", "y/2"), 0.3))
    assert ctx.host.catalog == "reference" and ctx.host.nuclear and ctx.host.offset_norm == pytest.approx(0.2)
    assert ctx.on_star is False and ctx.moving and ctx.moving_speed == 55.0 and ctx.moving_links == ("x/1", "y/2")
    # in M51: the catalogued galaxy (13' across) is larger than the reference stamp can measure
    in_m51 = replace(ref, ra=M51[0], dec=M51[1] + 60 / 3600)
    assert build_context(in_m51, ngc, None).host.name == "NGC5194/M51"
    assert build_context(in_m51, ngc, None, ContextConfig(ngc_host_min_arcsec=1e6)).host.catalog == "reference"
    nothing = replace(base, ra=M51[0], dec=M51[1] + 60 / 3600)
    assert build_context(nothing, ngc, None, ContextConfig(ngc_host_min_arcsec=1e6)).host.catalog == "OpenNGC"
    assert build_context(nothing, None, None).host is None


def test_on_star_from_the_reference_measurement():
    det = candidate().detection
    assert on_star(replace(det, ref_extended=0.0, ref_dist=0.3)) is True
    assert on_star(replace(det, ref_extended=1.0, ref_dist=0.3)) is False
    assert on_star(replace(det, ref_dist=8.0)) is False  # nothing within 1 FWHM
    assert on_star(replace(det, ref_dist=0.4)) is None  # a source under it, not measured (old record)


def _gauss(shape, x, y, flux, sigma_x, sigma_y=None):
    sigma_y = sigma_x if sigma_y is None else sigma_y
    yy, xx = np.indices(shape)
    r2 = ((xx - x) / sigma_x) ** 2 + ((yy - y) / sigma_y) ** 2
    return flux / (2 * np.pi * sigma_x * sigma_y) * np.exp(-0.5 * r2)


def test_reference_context_finds_the_star_under_and_the_galaxy_around_a_candidate():
    rng = np.random.default_rng(3)
    fwhm = 3.0
    s = fwhm / 2.3548
    shape = (160, 160)
    img = rng.normal(0, 5.0, shape)
    img += _gauss(shape, 40.3, 40.7, 2e4, s)  # a star
    gal_x, gal_y = 110.2, 100.6
    img += _gauss(shape, gal_x, gal_y, 3e4, np.hypot(4.0, s), np.hypot(2.5, s))  # a galaxy, rms 4 x 2.5 px
    psf = _gauss((21, 21), 10, 10, 1.0, s)
    x = np.array([40.0, gal_x + 4.0, 20.0, 112.0])  # on the star, on the galaxy, blank sky, off the edge of the light
    y = np.array([41.0, gal_y - 2.0, 130.0, 100.0 + 11.0])
    ref_xy = np.array([[40.3, 40.7], [gal_x, gal_y]])
    out = reference_context(img.astype(np.float32), 5.0, psf, fwhm, x, y, ref_xy, 1.0,
                            DetectConfig(host_radius_arcsec=5.0))
    assert out[0, 0] == 0.0 and np.isnan(out[0, 1])  # on a star: point-like, no host
    assert np.isnan(out[1, 0])  # the galaxy centre is 4.5 px away: no source within 1 FWHM
    assert np.hypot(out[1, 1] - gal_x, out[1, 2] - gal_y) < 0.5 and abs(out[1, 3] - np.hypot(4, 2)) < 0.5
    assert 3.0 < out[1, 4] < 4.5 and 2e4 < out[1, 5] < 3.2e4
    assert np.isnan(out[2]).all()  # blank sky
    assert np.hypot(out[3, 1] - gal_x, out[3, 2] - gal_y) < 0.5  # outside the isophote, within 5"
    # a NaN position, an unusable noise, no candidates: NaN, no crash
    assert np.isnan(reference_context(img, 5.0, psf, fwhm, np.array([np.nan]), np.array([1.0]), ref_xy, 1.0)).all()
    assert np.isnan(reference_context(img, 0.0, psf, fwhm, x, y, ref_xy, 1.0)).all()
    assert reference_context(img, 5.0, psf, fwhm, np.zeros(0), np.zeros(0), ref_xy, 1.0).shape == (0, 6)


def test_subtraction_measures_the_host_and_the_star_under_simulated_candidates(tmp_path):
    from broker.pipeline import SUBTRACTED, process_frame
    from broker.reference import ReferenceStore
    from broker.simulate import SimConfig, SkySimulator
    from broker.simulate import population as pop

    cfg = SimConfig(shape=(384, 384), fields=("F001",), n_stars=150, n_galaxies=12, galaxy_mag_range=(15.5, 18.0),
                    n_transients=4, transient_on_galaxy=1.0, n_variables=4, n_moving=0, n_cosmic_rays=5.0)
    sim, store = SkySimulator(cfg, seed=4), ReferenceStore(tmp_path)
    for epoch in range(3):
        process_frame(sim.frame("F001", "r", epoch)[0], store)
    frame, truth = sim.frame("F001", "r", 3)
    res = process_frame(frame, store)
    assert res.status == SUBTRACTED and res.diagnostics["t_context_s"] < 0.5
    sky = pop.static_sky(cfg, 4, "F001")
    hosts = variables = 0
    for inj in truth.of_kind("transient", "variable"):
        near = [c.detection for c in res.candidates if math.hypot(c.detection.x - inj.x, c.detection.y - inj.y) < 2]
        if not near:
            continue
        det = near[0]
        if inj.kind == "variable":
            variables += 1
            assert det.ref_extended == 0.0 and on_star(det)
            continue
        g = int(np.argmin(np.hypot((sky.gal_ra - inj.ra) * math.cos(math.radians(inj.dec)), sky.gal_dec - inj.dec)
                          / sky.gal_reff))
        err = math.hypot((det.host_ra - sky.gal_ra[g]) * math.cos(math.radians(inj.dec)), det.host_dec - sky.gal_dec[g])
        assert err * 3600 < 1.5 and det.host_size > 0 and det.host_flux > 0 and det.host_dist >= 0
        hosts += 1
    assert hosts >= 2 and variables >= 1


def _detections_at(x, y):
    """Detections at pixel positions of a 1"/px TAN frame (tests/helpers.header, 1024^2)."""
    from astropy.wcs import WCS

    from tests.helpers import header

    ra, dec = WCS(header((1024, 1024))).wcs_pix2world(x, y, 0)
    return [replace(candidate(seed=i).detection, x=float(a), y=float(b), ra=float(r), dec=float(d))
            for i, (a, b, r, d) in enumerate(zip(x, y, ra, dec, strict=True))]


def test_candidates_in_a_line_share_their_trail_and_the_others_get_none():
    rng = np.random.default_rng(4)
    t = np.arange(12) * 40.0 + rng.uniform(-5, 5, 12)  # a row of candidates 40 px apart, 440 px long
    x = np.r_[100.0 + 0.8 * t, rng.uniform(0, 1024, 60)]
    y = np.r_[200.0 + 0.6 * t + rng.normal(0, 0.3, 12), rng.uniform(0, 1024, 60)]
    matches = trail_matches(_detections_at(x, y), (1024, 1024), "TEST-F1-r-0001")
    assert sorted(matches) == list(range(12))
    m = matches[0]
    assert (m.catalog, m.version, m.name, m.kind) == ("frame", "TEST-F1-r-0001", "trail 1", "trail")
    ends = np.hypot(x[11] - x[0], y[11] - y[0])  # px = arcsec at 1"/px
    assert m.size_arcsec == pytest.approx(ends, rel=1e-3)
    assert {matches[i].size_arcsec for i in range(12)} == {m.size_arcsec}
    assert matches[0].distance_arcsec == pytest.approx(ends / 2, rel=0.02)  # an end is half the length away
    assert CatalogMatch.from_record(m.to_record()) == m


def test_trails_need_a_frame_with_an_area_and_ignore_unplaced_detections():
    x = np.r_[np.arange(10) * 30.0 + 50.0, np.nan]
    y = np.r_[np.full(10, 500.0), 7.0]
    dets = _detections_at(np.nan_to_num(x), y)
    dets[-1] = replace(dets[-1], x=float("nan"))
    assert sorted(trail_matches(dets, (1024, 1024), "F")) == list(range(10))
    assert trail_matches(dets, (0, 1024), "F") == {}  # a batch claiming an empty frame
    assert trail_matches([], (1024, 1024), "F") == {}
