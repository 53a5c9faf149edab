"""Tests of broker.training.realpixels: triplets cut from real stamps, labelled by how they are made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker.errors import ConfigError
from broker.training.realpixels import (
    RealPixelConfig,
    inject_point_source,
    moffat,
    psf_flux_sigma,
    real_pixel_check,
    real_pixel_set,
    recentre,
    residual_peaks,
    stamp_fwhm,
)
from tests.helpers import gz_fits, write_avro, ztf_packet

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _noise(seed: int = 0, n: int = 63, sigma: float = 10.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sigma, (n, n))


def _source(n: int, y: float, x: float, flux: float, fwhm: float = 2.5) -> np.ndarray:
    return flux * moffat((n, n), y, x, fwhm)


def test_residual_peaks_keep_dipoles_away_from_the_candidate_and_nothing_else():
    diff = _noise()
    diff += _source(63, 31, 31, 5000)  # the candidate itself
    diff += _source(63, 31, 45, 3000)  # a clean point source: no opposite lobe
    diff += _source(63, 10, 20, 3000) - _source(63, 10, 22.5, 3000)  # a dipole, 23 px away
    diff += _source(63, 60, 60, 3000) - _source(63, 60, 57.5, 3000)  # a dipole beyond max_shift
    peaks = residual_peaks(diff)
    assert len(peaks) == 2 and {p[2] for p in peaks} == {1, -1}  # both lobes of the one dipole
    for y, x, _ in peaks:
        assert abs(y - 10) <= 1 and 19 <= x <= 23
    assert residual_peaks(_noise(1)) == []


def test_recentre_puts_the_pixel_at_the_centre_and_pads_with_nan():
    a = np.arange(51 * 51, dtype=float).reshape(51, 51)
    (w,) = recentre([a], 5, 40)
    assert w.shape == (63, 63) and w[31, 31] == a[5, 40]
    assert w[31 - 5, 0] == a[0, 40 - 31] and np.isnan(w[31 - 6, 31]) and np.isnan(w[31, 31 + 11])
    assert np.isfinite(w).sum() == (5 + 32) * (51 - 9)


def test_an_injected_source_has_the_requested_psf_snr_and_shot_noise():
    rng = np.random.default_rng(3)
    sci, diff = _noise(4) + 500.0, _noise(5)
    flux = 20.0 * psf_flux_sigma(diff, 3.0)
    s2, d2 = inject_point_source(sci, diff, 20.3, 40.7, flux, fwhm=3.0, gain=6.2, rng=rng)
    added = d2 - diff
    assert np.allclose(s2 - sci, added)  # the same source in science and difference
    psf = moffat(diff.shape, 20.3, 40.7, 3.0)
    snr = float(np.sum(added * psf) / np.sum(psf**2)) * np.sqrt(np.sum(psf**2)) / 10.0
    assert snr == pytest.approx(20.0, rel=0.1)  # PSF photometry on white noise of sigma 10
    resid = added - added.sum() * psf / psf.sum()
    assert 0 < np.std(resid) < 3  # shot noise of ~2.6e3 DN at gain 6.2


def test_the_psf_flux_noise_grows_with_correlated_pixel_noise():
    from scipy import ndimage

    white = _noise(7, n=200)
    corr = ndimage.gaussian_filter(white, 1.0)
    corr *= np.std(white) / np.std(corr)  # the same pixel sigma, correlated over ~2 px
    s_white, s_corr = psf_flux_sigma(white, 3.0), psf_flux_sigma(corr, 3.0)
    psf = moffat((200, 200), 100, 100, 3.0)
    assert s_white == pytest.approx(10.0 / np.sqrt(np.sum(psf**2)), rel=0.1)
    assert s_corr > 2 * s_white


def test_stamp_fwhm_measures_the_stars_and_falls_back_to_the_default():
    rng = np.random.default_rng(6)
    sci = rng.normal(0.0, 5.0, (63, 63))
    for y, x in ((15, 15), (45, 20), (20, 48), (48, 48)):
        g = np.exp(-0.5 * ((np.mgrid[:63, :63][0] - y) ** 2 + (np.mgrid[:63, :63][1] - x) ** 2)
                   / (3.0 / 2.3548) ** 2)
        sci += 2000 * g
    assert stamp_fwhm(sci, 9.0) == pytest.approx(3.0, abs=0.3)
    assert stamp_fwhm(rng.normal(0.0, 5.0, (63, 63)), 2.5) == 2.5  # no star: the default


def test_config_refuses_impossible_settings():
    with pytest.raises(ConfigError):
        RealPixelConfig(min_offset=30, max_shift=20)
    with pytest.raises(ConfigError):
        RealPixelConfig(snr=(10.0, 5.0))
    with pytest.raises(ConfigError):
        RealPixelConfig(gain=0.0)


def test_real_pixel_set_cuts_labelled_triplets_and_skips_bad_alerts(tmp_path):
    sci = [_noise(10 + i) + 300 + _source(63, 31, 31, 4000) for i in range(3)]
    ref = [_noise(20 + i) + 300 for i in range(3)]
    diff = [s - r - 300 for s, r in zip(sci, ref, strict=True)]
    diff[0] = diff[0] + _source(63, 15, 45, 4000) - _source(63, 15, 47.5, 4000)  # a dipole
    good = [ztf_packet(i, [gz_fits(sci[i]), gz_fits(ref[i]), gz_fits(diff[i])]) for i in range(3)]
    hostile = [
        ztf_packet(3, [b"\xff\xd8\xff\xe0jpeg", gz_fits(ref[0]), gz_fits(diff[0])]),  # JPEG stamp
        ztf_packet(4, [gz_fits(a[:48]) for a in (sci[0], ref[0], diff[0])]),  # cut at a CCD edge
        ztf_packet(5, [gz_fits(sci[0]), gz_fits(ref[0]), gz_fits(np.full((63, 63), np.nan))]),  # no pixels
        ztf_packet(6, [gz_fits(np.full((63, 63), np.nan)), gz_fits(ref[0]), gz_fits(diff[0])]),
        ztf_packet(7, [gz_fits(np.zeros((63, 63)))] * 3),  # constant: nothing to cut, no crash
        {**good[1], "objectId": "again"},  # a repeated candid
    ]
    write_avro(tmp_path / "a.avro", good[:2] + hostile)
    write_avro(tmp_path / "b.avro", good[2:])
    (tmp_path / "broken.avro").write_bytes(b"Obj\x01garbage")
    data = real_pixel_set(tmp_path, seed=1, config=RealPixelConfig(n_inject=3))
    assert int(data["n_stamps"]) == 4  # the three good ones and the constant one
    assert data["x"].shape == (len(data["y"]), 3, 63, 63) and np.isfinite(data["x"]).all()
    assert np.sum(data["kind"] == "residual") == 2 and np.all(data["y"][data["kind"] == "residual"] == 0)
    assert np.sum(data["y"] == 1) == 9 and np.all(data["snr"][data["y"] == 1] >= 5)
    assert set(data["group"]) == {"ZTF000", "ZTF001", "ZTF002"}
    centre = data["x"][data["y"] == 1][:, 2, 30:33, 30:33].max(axis=(1, 2))
    assert np.all(centre > 1.0)  # every injection sits at the centre of its triplet
    again = real_pixel_set(tmp_path, seed=1, config=RealPixelConfig(n_inject=3))
    assert np.array_equal(again["x"], data["x"])  # seeded
    assert len(real_pixel_set(tmp_path / "missing")["y"]) == 0


def test_real_pixel_check_counts_by_kind_and_snr():
    data = {"y": np.array([0, 0, 1, 1, 1, 1]), "snr": np.array([np.nan, np.nan, 6, 8, 15, 50]),
            "n_stamps": np.array(2)}
    c = real_pixel_check(np.array([0.9, 0.1, 0.2, 0.7, 0.8, 0.95]), data)
    assert (c["n_stamps"], c["n_residual"], c["n_injected"]) == (2, 2, 4)
    assert c["residual_passed"] == 0.5 and c["injected_kept"] == 0.75
    assert c["injected_kept_by_snr"] == {"5-10": 0.5, "10-20": 1.0, "20-100": 1.0}
    assert c["auc"] == pytest.approx(5 / 8)  # of the 8 (injected, residual) pairs, 5 ordered right
    one = real_pixel_check(np.array([0.9]), {"y": np.array([1]), "snr": np.array([7.0]),
                                             "n_stamps": np.array(1)})
    assert np.isnan(one["auc"]) and np.isnan(one["residual_passed"])


@pytest.mark.skipif(not (SHARED / "ztf_alerts").is_dir(),
                    reason="../shared/data/ztf_alerts is absent (real ZTF alerts)")
def test_the_shipped_model_rejects_real_ztf_residuals_and_keeps_bright_injections():
    from broker.realbogus import RealBogusClassifier

    data = real_pixel_set(SHARED / "ztf_alerts", seed=0)
    assert int(data["n_stamps"]) > 700 and np.sum(data["y"] == 0) > 200
    c = real_pixel_check(RealBogusClassifier.load().score(data["x"]), data)
    # realbogus-v11 on 2026-12-05: 3.7 % of 323 residuals passed, 99 % of S/N 20-100 kept
    assert c["residual_passed"] < 0.1 and c["injected_kept_by_snr"]["20-100"] > 0.9


def test_stamps_of_different_shapes_are_skipped_with_their_reason(tmp_path):
    """A difference stamp of another shape crashed the injection, a template of another shape was cut misaligned."""
    sci, ref = _noise(1) + 300, _noise(2) + 300
    diff = sci - ref
    write_avro(tmp_path / "a.avro", [
        ztf_packet(0, [gz_fits(sci), gz_fits(ref), gz_fits(diff[1:-1, 1:-1])]),  # 61 x 61 difference
        ztf_packet(1, [gz_fits(sci), gz_fits(ref[:48]), gz_fits(diff)]),  # a template cut at an edge
        ztf_packet(2, [gz_fits(a[:48]) for a in (sci, ref, diff)]),  # the whole triplet cut there
        ztf_packet(3, [gz_fits(sci), gz_fits(ref), gz_fits(diff)]),
    ])
    (tmp_path / "b.avro").write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))  # a .tar.gz named .avro
    data = real_pixel_set(tmp_path, seed=0)
    assert int(data["n_stamps"]) == 1 and set(data["group"]) == {"ZTF003"}
    reasons = list(data["rejected"])
    assert len(reasons) == 4 and all(r.startswith(("a.avro: ", "b.avro: ")) for r in reasons)
    assert sum("different shapes" in r for r in reasons) == 2
    assert any("not square" in r for r in reasons) and any("gzip-compressed" in r for r in reasons)
    write_avro(tmp_path / "a.avro", [ztf_packet(0, [gz_fits(a[:30, :30]) for a in (sci, ref, diff)])])
    assert "under 31 px a side" in real_pixel_set(tmp_path)["rejected"][0]
