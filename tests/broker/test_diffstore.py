"""The difference store (atomic, idempotent, bounded) and forced photometry on its images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from broker.diffstore import DifferenceImage, DifferenceStore, DiffStoreConfig, celestial_header
from broker.frame import Frame, FrameMeta, celestial_wcs
from broker.psf import gaussian_psf
from tests.broker.conftest import make_wcs, render

SHAPE = (120, 150)
FWHM = 3.0
SIGMA = 10.0  # ADU per pixel of the synthetic difference images
KEY = ("T1", "F1", "r")


def _meta(frame_id: str, mjd: float) -> FrameMeta:
    return FrameMeta(frame_id=frame_id, telescope="T1", field="F1", filter="r", mjd_start=mjd, exptime=60.0,
                     magzp=27.0)


def _image(seed: int, sources: list[tuple[float, float, float]] = (), masked: tuple[slice, slice] | None = None
           ) -> DifferenceImage:
    """White noise of SIGMA ADU plus pixel-integrated Gaussian sources (x, y, flux ADU)."""
    rng = np.random.default_rng(seed)
    diff = rng.normal(0.0, SIGMA, SHAPE)
    if sources:
        src = np.asarray(sources, float)
        diff += render(SHAPE, src[:, 0], src[:, 1], src[:, 2], FWHM)
    diff = diff.astype(np.float32)
    if masked is not None:
        diff[masked] = np.nan
    psf = gaussian_psf(FWHM, 8)
    limit = 5 * SIGMA / float(np.sqrt((psf.astype(float) ** 2).sum()))
    return DifferenceImage(diff, np.ones(SHAPE, np.float32), psf[None], np.array([[0, SHAPE[0], 0, SHAPE[1]]]),
                           np.array([1.0 / SIGMA]), np.array([FWHM]), limit)


def _header(dx: float = 0.0, dy: float = 0.0) -> str:
    return make_wcs(SHAPE, dx, dy).to_header().tostring()


def _sky(xy: np.ndarray, dx: float = 0.0, dy: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    ra, dec = make_wcs(SHAPE, dx, dy).pixel_to_world_values(xy[:, 0], xy[:, 1])
    return np.asarray(ra), np.asarray(dec)


def _grid(seed: int, n: int = 8) -> np.ndarray:
    """Positions on a grid 20 px apart, moved by up to half a pixel (px)."""
    rng = np.random.default_rng(seed)
    g = np.array([(x, y) for x in np.linspace(15, SHAPE[1] - 15, n) for y in np.linspace(15, SHAPE[0] - 15, n - 1)])
    return g + rng.uniform(-0.5, 0.5, g.shape)


def test_forced_photometry_recovers_injected_fluxes_and_zero_where_nothing_is(tmp_path):
    xy, flux = _grid(0), 800.0  # S/N ~ 13
    store = DifferenceStore(tmp_path)
    assert store.put(_meta("a", 1.0), _header(), _image(1, [(x, y, flux) for x, y in xy]))
    assert store.put(_meta("b", 2.0), _header(), _image(2))
    forced = store.forced_photometry(KEY, 3.0, *_sky(xy))
    assert [[f["frame_id"] for f in fs] for fs in forced] == [["a", "b"]] * len(xy)
    a = np.array([[fs[0]["flux"], fs[0]["flux_err"]] for fs in forced])
    b = np.array([[fs[1]["flux"], fs[1]["flux_err"]] for fs in forced])
    pull_a, pull_b = (a[:, 0] - flux) / a[:, 1], b[:, 0] / b[:, 1]
    assert abs(pull_a.mean()) < 0.6 and 0.7 < pull_a.std() < 1.35  # flux recovered within its error
    assert abs(pull_b.mean()) < 0.6 and 0.7 < pull_b.std() < 1.35  # nothing: 0 +- error
    assert np.allclose(a[:, 1], SIGMA / np.sqrt((gaussian_psf(FWHM, 8).astype(float) ** 2).sum()), rtol=0.05)
    rec = forced[0][0]
    assert set(rec) == {"frame_id", "mjd", "exptime", "filter", "flux", "flux_err", "magzp", "limiting_flux"}
    assert (rec["mjd"], rec["exptime"], rec["filter"], rec["magzp"]) == (1.0, 60.0, "r", 27.0)
    assert rec["limiting_flux"] == pytest.approx(_image(1).limiting_flux)


def test_only_frames_whose_footprint_holds_the_position_and_enough_good_pixels(tmp_path):
    store = DifferenceStore(tmp_path)
    store.put(_meta("here", 1.0), _header(), _image(1, masked=(slice(0, 60), slice(0, 40))))
    store.put(_meta("moved", 2.0), _header(dx=-100.0), _image(2))  # pointed 100 px further in +x
    xy = np.array([[130.0, 80.0],   # on both
                   [20.0, 80.0],    # off "moved" (x = -80 there)
                   [20.0, 30.0],    # masked on "here", off "moved"
                   [147.0, 5.0],    # near the corner of "here"; x = 47 on "moved"
                   [-3.0, 50.0]])   # off both
    forced = store.forced_photometry(KEY, 5.0, *_sky(xy))
    assert [[f["frame_id"] for f in fs] for fs in forced] == [["here", "moved"], ["here"], [], ["here", "moved"], []]


def test_earlier_means_exposure_start_before_and_the_answer_does_not_change(tmp_path):
    xy = _grid(3)
    store = DifferenceStore(tmp_path)
    store.put(_meta("e1", 10.0), _header(), _image(1, [(x, y, 500.0) for x, y in xy]))
    store.put(_meta("e2", 11.0), _header(), _image(2))
    first = store.forced_photometry(KEY, 12.0, *_sky(xy))
    store.put(_meta("e3", 12.0), _header(), _image(3))  # the frame being measured, kept
    store.put(_meta("e4", 13.0), _header(), _image(4))  # a later frame
    assert not store.put(_meta("e3", 12.0), _header(), _image(99))  # replayed: kept once
    again = store.forced_photometry(KEY, 12.0, *_sky(xy))
    assert again == first and {f["frame_id"] for fs in again for f in fs} == {"e1", "e2"}
    fresh = DifferenceStore(tmp_path).forced_photometry(KEY, 12.0, *_sky(xy))  # after a restart
    assert fresh == first
    assert store.forced_photometry(KEY, 10.0, *_sky(xy)) == [[] for _ in xy]
    assert store.forced_photometry(KEY, 12.0, np.zeros(0), np.zeros(0)) == []


def test_store_is_atomic_idempotent_memory_mapped_and_bounded(tmp_path):
    store = DifferenceStore(tmp_path, DiffStoreConfig(max_frames=3))
    d = store._dir(KEY)
    assert store.put(_meta("f0", 5.0), _header(), _image(0))
    kept = d / "f0"
    stamp = {p.name: p.stat().st_mtime_ns for p in kept.iterdir()}
    assert not store.put(_meta("f0", 5.0), _header(), _image(1))  # idempotent by frame id
    assert {p.name: p.stat().st_mtime_ns for p in kept.iterdir()} == stamp
    assert sorted(stamp) == ["diff.npy", "meta.json", "noise.npy", "psf.npy"]
    # a writer killed mid-frame leaves a hidden directory: never listed, cleared by the next write
    (d / ".f9.12345.tmp").mkdir()
    (d / ".f9.12345.tmp" / "diff.npy").write_bytes(b"partial")
    assert store.frame_ids(KEY) == ["f0"]
    for i, mjd in ((1, 9.0), (2, 1.0), (3, 7.0), (4, 8.0)):  # out of order; the oldest by MJD go
        store.put(_meta(f"f{i}", mjd), _header(), _image(i))
    assert store.frame_ids(KEY) == ["f3", "f4", "f1"]
    assert sorted(p.name for p in d.iterdir()) == ["f1", "f3", "f4"]
    stored = store._load(d / "f1")
    assert isinstance(stored.image.diff, np.memmap) and isinstance(stored.image.noise_scale, np.memmap)
    assert np.array_equal(stored.image.diff, _image(1).diff, equal_nan=True)
    assert stored.image.noise_scale.dtype == np.float16
    off = DifferenceStore(tmp_path / "off", DiffStoreConfig(max_frames=0))
    assert not off.put(_meta("x", 1.0), _header(), _image(0)) and not (tmp_path / "off").exists()


def test_an_unreadable_stored_frame_is_skipped_with_a_warning(tmp_path):
    store = DifferenceStore(tmp_path)
    store.put(_meta("good", 1.0), _header(), _image(1))
    store.put(_meta("bad", 2.0), _header(), _image(2))
    (store._dir(KEY) / "bad" / "meta.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        forced = DifferenceStore(tmp_path).forced_photometry(KEY, 3.0, *_sky(np.array([[50.0, 50.0]])))
    assert [f["frame_id"] for f in forced[0]] == ["good"]


def test_celestial_header_round_trips_the_wcs():
    from astropy.io import fits

    wcs = make_wcs(SHAPE, 3.0, -2.0, rot_deg=10.0)
    frame = Frame(_meta("w", 1.0), np.zeros(SHAPE, np.float32), fits.Header(wcs.to_header()))
    text = celestial_header(frame)
    assert len(text) % 2880 == 0
    back = celestial_wcs(fits.Header.fromstring(text))
    assert np.allclose(back.pixel_to_world_values(10.0, 20.0), wcs.pixel_to_world_values(10.0, 20.0), atol=1e-10)


def test_meta_holds_the_frame_metadata(tmp_path):
    store = DifferenceStore(tmp_path)
    store.put(_meta("m", 4.5), _header(), _image(0))
    meta = json.loads((store._dir(KEY) / "m" / "meta.json").read_text())
    assert {k: meta[k] for k in ("frame_id", "mjd", "exptime", "filter", "magzp", "nx", "ny")} == {
        "frame_id": "m", "mjd": 4.5, "exptime": 60.0, "filter": "r", "magzp": 27.0, "nx": SHAPE[1], "ny": SHAPE[0]}
    assert meta["limiting_flux"] == pytest.approx(_image(0).limiting_flux) and meta["wcs_header"] == _header()
    assert not any(p.name.startswith(".") for p in store._dir(KEY).iterdir())  # no temporary left


@pytest.mark.parametrize("values", [{"max_frames": -1}, {"cache_frames": -2}, {"min_psf_fraction": 0.0},
                                    {"min_psf_fraction": 1.5}])
def test_settings_out_of_range_are_config_errors(values):
    """``max_frames = -1`` was taken and meant "store nothing", silently."""
    from broker.config import load_config
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match=r"differences\]"):
        load_config(differences=values)
