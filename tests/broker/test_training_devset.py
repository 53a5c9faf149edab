"""Tests of broker.training.devset: bootstrap AUCs, the dev-set analysis and other surveys' stamps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker.errors import CutoutError
from broker.training.devset import (
    SURVEY_STAMPS,
    bootstrap_auc,
    dev_analysis,
    other_survey_triplets,
    survey_triplet,
)
from broker.training.ztf import _drb
from tests.helpers import gz_fits

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_bootstrap_auc_brackets_the_auc_and_needs_both_classes():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200), np.zeros(40)]
    s = np.r_[rng.normal(1, 1, 200), rng.normal(0, 1, 40)]
    r = bootstrap_auc(y, s, n_boot=300)
    assert r["lo"] < r["auc"] < r["hi"] and 0.6 < r["auc"] < 0.9
    assert (r["n_pos"], r["n_neg"]) == (200, 40)
    assert bootstrap_auc(y, np.r_[np.ones(200), np.zeros(40)], n_boot=50)["lo"] == 1.0
    assert np.isnan(bootstrap_auc(np.ones(5), np.arange(5.0))["auc"])


def test_dev_analysis_counts_the_bogus_passed_and_lists_the_worst():
    drb = np.array([0.9, 0.95, 0.1, 0.2, 0.3, np.nan])
    meta = {"drb": drb, "rb": np.array([0.8, 0.7, 0.6, 0.1, 0.2, 0.9]),
            "fading": np.array([False, True, False, True, False, False])}
    s = np.array([0.9, 0.2, 0.8, 0.1, 0.6, 0.99])
    d = dev_analysis(s, meta, n_examples=2)
    assert d["n_drb"] == 5 and d["n_drb_bogus"] == 3
    assert d["frac_bogus_passed"] == pytest.approx(2 / 3)
    assert d["frac_real_rejected"] == pytest.approx(1 / 2)
    assert d["high_bogus"] == [2, 4] and d["low_real"] == [1, 0]
    assert d["by_sign"]["fading"] == {"n_bogus": 1, "n_real": 1, "frac_bogus_passed": 0.0,
                                      "frac_real_rejected": 1.0}


def test_a_filled_in_drb_without_its_version_is_no_score():
    assert _drb({"drb": 0.0, "drbversion": ""}) is None
    assert _drb({"drb": 0.0}) is None
    assert _drb({"drb": 0.3, "drbversion": "d6_m7"}) == 0.3


def test_survey_triplets_rebuild_a_missing_reference_and_crop_large_stamps():
    rng = np.random.default_rng(1)
    sci, diff = rng.normal(100, 5, (61, 61)), rng.normal(0, 5, (61, 61))
    rec = {"cutoutScience": {"stampData": gz_fits(sci)}, "cutoutDifference": {"stampData": gz_fits(diff)}}
    x = survey_triplet(rec, SURVEY_STAMPS["atlas"])
    assert x.shape == (3, 63, 63) and np.isfinite(x).all()
    big = {k: gz_fits(rng.normal(0, 1, (81, 81))) for k in ("cutout_science", "cutout_template",
                                                          "cutout_difference")}
    assert survey_triplet(big, SURVEY_STAMPS["pgir_winter"]).shape == (3, 63, 63)


@pytest.mark.parametrize("record", [
    {},  # no stamps at all
    {"cutoutScience": {"stampData": b"not a fits file"}, "cutoutDifference": {"stampData": b""}},
    {"cutoutScience": {"stampData": gz_fits(np.zeros((61, 61)))},
     "cutoutDifference": {"stampData": gz_fits(np.zeros((40, 61)))}},  # shapes differ
])
def test_bad_survey_packets_are_refused_with_a_reason(record):
    with pytest.raises(CutoutError):
        survey_triplet(record, SURVEY_STAMPS["atlas"])


def test_an_unreadable_avro_file_is_rejected_not_fatal(tmp_path):
    (tmp_path / "broken.avro").write_bytes(b"Obj\x01garbage")
    x, rejected = other_survey_triplets(tmp_path, "decam_desirt")
    assert x.shape == (0, 3, 63, 63) and len(rejected) == 1 and "broken.avro" in rejected[0]


@pytest.mark.skipif(not (SHARED / "other_surveys").is_dir(),
                    reason="../shared/data/other_surveys is absent (real alerts of other surveys)")
def test_the_real_decam_alerts_are_read():
    x, rejected = other_survey_triplets(SHARED / "other_surveys" / "decam_desirt_alerts_avro",
                                        "decam_desirt")
    assert len(x) >= 90 and np.isfinite(x).all()


def test_each_rejection_names_its_file_and_why(tmp_path):
    from tests.helpers import write_avro, ztf_packet

    write_avro(tmp_path / "jpeg.avro", [ztf_packet(0, [b"\xff\xd8\xff\xe0jpeg"] * 3)])
    (tmp_path / "wire.avro").write_bytes(b"\x00\x00\x00\x04\x4c" + bytes(50))  # Confluent framing
    (tmp_path / "tar.avro").write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))
    _, rejected = other_survey_triplets(tmp_path, "atlas")
    assert sorted(r.split(":")[0] for r in rejected) == ["jpeg.avro", "tar.avro", "wire.avro"]
    why = dict(r.split(": ", 1) for r in rejected)
    assert "JPEG" in why["jpeg.avro"] and "gzip-compressed" in why["tar.avro"]
    assert "Confluent wire framing" in why["wire.avro"]


def test_a_larger_even_stamp_is_cropped_around_its_centre_pixel():
    from broker.training.devset import centre_crop

    a = np.zeros((64, 64))
    a[32, 32] = 1.0  # the centre pixel of an even stamp, as broker.cutouts cuts them
    assert np.unravel_index(np.argmax(centre_crop(a)), (63, 63)) == (31, 31)
    assert centre_crop(np.zeros((81, 81))).shape == (63, 63)
