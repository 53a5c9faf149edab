"""Cutout triplets as PNG (``streams.triplet_png``)."""

import gzip
import io

import fastavro
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import schemas
from streams.alert_expr import AlertFilter
from streams.subscriber import alert_problem
from streams.triplet_png import MASKED_COLOUR, north_east, read_cutout, save_triplet_png
from tests.schemas.test_schemas import _alert

# --- cutout PNGs ---------------------------------------------------------------------------------------

def _stamp(image, wcs=True, rotation_deg=0.0):
    header = fits.Header()
    if wcs:
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [150.0, 2.0]
        w.wcs.crpix = [32.0, 32.0]
        t, s = np.radians(rotation_deg), 1.0 / 3600
        w.wcs.cd = [[-s * np.cos(t), s * np.sin(t)], [s * np.sin(t), s * np.cos(t)]]
        header = w.to_header()
        header["BUNIT"] = "adu"
    buf = io.BytesIO()
    fits.PrimaryHDU(np.asarray(image, np.float32), header=header).writeto(buf)
    return gzip.compress(buf.getvalue(), mtime=0)


def _triplet(seed=1, wcs=True):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:63, :63]
    star = 3000 * np.exp(-((xx - 31) ** 2 + (yy - 31) ** 2) / (2 * 1.5 ** 2))
    sci = 500 + rng.normal(0, 20, (63, 63)) + star
    ref = 500 + rng.normal(0, 10, (63, 63)) + 0.5 * star
    diff = sci - ref
    sci[:, :8] = diff[:, :8] = np.nan  # off the frame's edge
    _, alert = _alert()
    for key, img in zip(("cutoutScience", "cutoutTemplate", "cutoutDifference"), (sci, ref, diff), strict=True):
        alert[key]["stampData"] = _stamp(img, wcs)
    return alert


def test_read_cutout_gives_pixels_wcs_and_unit():
    img = np.arange(63 * 63, dtype=np.float32).reshape(63, 63)
    cut = read_cutout(_stamp(img))
    assert np.array_equal(cut.data, img) and cut.unit == "adu"
    assert cut.wcs is not None and cut.wcs.has_celestial
    plain = read_cutout(_stamp(img, wcs=False))
    assert plain.wcs is None and plain.unit == ""


@pytest.mark.parametrize("rotation", [0.0, 30.0, -90.0])
def test_north_east_arrows_follow_the_wcs(rotation):
    cut = read_cutout(_stamp(np.zeros((63, 63)), rotation_deg=rotation))
    north, east = north_east(cut.wcs, cut.data.shape)
    t = np.radians(rotation)
    # CD = R(t) @ diag(-s, s): north is +y rotated by t, east is -x rotated by t
    assert np.allclose(north, [np.sin(t), np.cos(t)], atol=1e-3)
    assert np.allclose(east, [-np.cos(t), np.sin(t)], atol=1e-3)


def _pixels_of(path, colour):
    import matplotlib.colors as mcolors
    import matplotlib.image as mimage

    rgb = mimage.imread(path)[..., :3]
    return int(np.all(np.abs(rgb - np.array(mcolors.to_rgb(colour))) < 0.02, axis=-1).sum())


def test_triplet_png_draws_masked_pixels_in_their_colour(tmp_path):
    png = save_triplet_png(_triplet(), tmp_path / "a.png")
    assert png.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.problems == ()
    # two panels with 8 NaN columns of 63 shown over ~220 px: thousands of masked-colour pixels
    assert _pixels_of(png.path, MASKED_COLOUR) > 2000
    clean = _triplet()
    for key in ("cutoutScience", "cutoutDifference"):
        img = read_cutout(clean[key]["stampData"]).data
        clean[key]["stampData"] = _stamp(np.nan_to_num(img, nan=500.0))
    assert _pixels_of(save_triplet_png(clean, tmp_path / "b.png").path, MASKED_COLOUR) < 200  # the legend only


def test_triplet_png_survives_all_nan_garbage_and_missing_stamps(tmp_path):
    alert = _triplet(wcs=False)
    alert["cutoutTemplate"]["stampData"] = _stamp(np.full((63, 63), np.nan), wcs=False)
    alert["cutoutDifference"]["stampData"] = b"\x1f\x8bgarbage"
    png = save_triplet_png(alert, tmp_path / "bad.png")
    assert png.path.exists()
    assert [p.split(":")[0] for p in png.problems] == ["reference", "difference"]
    assert "NaN" in png.problems[0]
    nothing = save_triplet_png({"source": None, "cutoutScience": {"stampData": "text"}}, tmp_path / "none.png")
    assert nothing.path.exists() and len(nothing.problems) == 3


def test_triplet_png_of_an_alert_whose_ids_look_like_tex_or_hold_control_characters(tmp_path):
    r"""``$\frac{1}{$`` in an objectId was a ParseSyntaxException out of savefig: ``--png-dir`` stopped."""
    alert = _triplet()
    alert["objectId"], alert["candid"] = "OBJ$\\frac{1}{$x\x1b[2J", "c$\\undefined$/1\n"
    png = save_triplet_png(alert, tmp_path / "tex.png")
    assert png.path.exists() and png.problems == ()


@pytest.mark.parametrize("version", schemas.versions("alert"))
def test_triplet_png_of_the_sample_alerts(version, tmp_path):
    (alert,) = list(fastavro.reader(io.BytesIO((schemas.ROOT / "alert" / "samples" / f"v{version}.avro").read_bytes())))
    assert alert_problem(alert) is None and AlertFilter("ndet() >= 1 and since_first() >= 0")(alert)
    png = save_triplet_png(alert, tmp_path / "sample.png")
    assert png.problems == () and _pixels_of(png.path, MASKED_COLOUR) > 2000  # the sample sits at a frame edge


def test_triplet_png_of_a_gzip_bomb_is_refused(tmp_path):
    bomb = gzip.compress(b"SIMPLE  =                    T" + b" " * (40 * 1024 * 1024))
    alert = _triplet()
    alert["cutoutScience"]["stampData"] = bomb
    png = save_triplet_png(alert, tmp_path / "bomb.png")
    assert "inflate beyond 16.8 MB" in png.problems[0]
