"""Tests of broker.training.evaluation: the promotion rule and the evaluation command."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from broker.realbogus import RealBogusClassifier
from broker.training.data import iter_synthetic_candidates
from broker.training.evaluation import main_eval, plot_histograms, promotion_check
from broker.training.settings import TrainingSetConfig
from broker.training.shards import write_training_set


def test_promotion_reads_each_ztf_drop_against_its_own_interval():
    def res(eer, drb, rb):
        sim = {"eer": eer, "at_threshold": {"auc": 0.99}}
        delta = {k: dict(zip(("delta", "lo", "hi"), v, strict=True)) for k, v in (("drb", drb), ("rb", rb))}
        return {"sim": sim, "sim_compare": {"model": "old", "eer": 0.02,
                                            "at_threshold": {"auc": 0.99}},
                "ztf_compare": {"model": "old", "delta_auc": delta}}

    # a large drb drop on 9 negatives whose interval reaches 0 is noise; rb resolved and fine
    assert promotion_check(res(0.015, (-0.06, -0.15, 0.01), (0.004, -0.003, 0.012)))["promote"]
    # a small rb drop whose interval lies below 0 is not
    p = promotion_check(res(0.015, (0.0, -0.05, 0.05), (-0.008, -0.014, -0.002)))
    assert p["sim_better"] and not p["ztf_not_worse"] and not p["promote"]
    # worse on the held-out set: never, whatever ZTF says
    assert not promotion_check(res(0.025, (0.05, 0.0, 0.1), (0.02, 0.01, 0.03)))["promote"]
    # a reference without both classes (NaN interval) does not decide
    assert promotion_check(res(0.015, (np.nan,) * 3, (0.0, -0.01, 0.01)))["promote"]
    # a held-out set labelled otherwise than the old model's training data decides nothing
    other = res(0.015, (0.0, -0.05, 0.05), (0.004, -0.003, 0.012))
    other["sim_compare"]["labels_differ"] = ["dipole_lobe_kinds"]
    p = promotion_check(other)
    assert p["labels_differ"] == ["dipole_lobe_kinds"] and not p["promote"]


def test_eval_command_end_to_end_on_small_subset(tmp_path):
    """main_eval on a few synthetic held-out triplets and (when present) five real ZTF alerts."""
    from broker.realbogus import RealBogusNetV2

    sim = tmp_path / "sim"
    write_training_set(sim, iter_synthetic_candidates(120, seed=5),
                       TrainingSetConfig(shard_size=64, seed=5), "synthetic")
    clf = RealBogusClassifier(RealBogusNetV2(), "test-v0")
    weights = clf.save(tmp_path / "test-v0")
    ztf = None
    src = Path(__file__).resolve().parents[2].parent / "shared/data/ztf_alerts/ztf-avro-alert"
    if src.is_dir():
        ztf = tmp_path / "ztf"
        ztf.mkdir()
        for f in sorted(src.rglob("*.avro"))[:5]:
            (ztf / f.name).symlink_to(f)
    dev, surveys = _subset(tmp_path, "ztf_alerts_dev", 40), _subset(
        tmp_path, "other_surveys/decam_desirt_alerts_avro", 5, "other_surveys/decam_desirt_alerts_avro")
    other = RealBogusClassifier(RealBogusNetV2(), "test-v1").save(tmp_path / "test-v1")
    res = main_eval(weights, tmp_path / "report", sim, ztf, max_sim=100, compare=str(other),
                    dev_dir=dev or tmp_path / "no-dev", surveys_dir=surveys and surveys.parent
                    or tmp_path / "no-surveys")
    rep = (tmp_path / "report" / "report.md").read_text()
    assert res["sim"]["n"] == 100 and "FNR = FPR" in rep
    assert 0 <= res["sim"]["eer"] <= 1 and res["sim"]["at_threshold"]["per_kind"]
    assert sum(d["n_real"] + d["n_bogus"] for d in res["sim"]["by_reference"]) == 100
    assert "By brightness of the reference source" in rep
    # synthetic stamps have no reference state; the split and the limits section still hold
    assert res["sim"]["by_reference_state"]["unknown"]["n"] == 100
    errs = res["sim"]["errors_by_state"]["unknown"]
    assert sum(n for _, n in errs.values()) == 100 and all(0 <= e <= n for e, n in errs.values())
    assert "What limits the targets" in rep
    root = Path(__file__).resolve().parents[2]  # paths recorded relative to the repository
    assert not Path(res["sim"]["dir"]).is_absolute()
    assert (root / res["sim"]["dir"]).resolve() == sim.resolve()
    for name in res["files"].values():
        assert (tmp_path / "report" / name).stat().st_size > 1000
    if ztf is not None:
        assert res["ztf"]["n"] > 0 and "Spearman" in rep
        assert sum(d["n_real"] + d["n_bogus"] for d in res["ztf"]["by_reference"]) == \
            res["ztf"]["rb"]["n"]
        assert set(res["ztf_compare"]["delta_auc"]) == {"drb", "rb"} and "paired bootstrap" in rep
    assert "Promote to default" in rep
    if dev is not None:  # the dev set: AUCs with intervals, pass rates, the worst as images
        d = res["dev"]
        assert d["n"] > 0 and d["auc_rb"]["n_pos"] + d["auc_rb"]["n_neg"] > 0
        assert 0 <= d["frac_real_rejected"] <= 1 and "Real ZTF dev set" in rep
        assert d["compare"]["model"] == "test-v1" and "paired bootstrap" in rep
        assert {"dev_high_bogus", "dev_low_real", "hist_dev"} <= set(res["files"])
    if surveys is not None:
        assert res["surveys"]["decam_desirt"]["n"] == 5 and "Other surveys' stamps" in rep
    if ztf or dev or surveys:  # real pixels labelled by construction, for both models
        rp = res["real_pixels"]
        assert "Real pixels, labelled by construction" in rep and "real_pixels" in res["files"]
        for r in rp.values():
            assert r["model"]["n_stamps"] > 0 and r["compare"]["version"] == "test-v1"
            assert 0 < r["model"]["n_injected"] <= 2 * r["model"]["n_stamps"]
    else:
        assert "real_pixels" not in res


def _subset(tmp_path: Path, name: str, n: int, sub: str | None = None) -> Path | None:
    """A folder of links to the first ``n`` alerts of ``../shared/data/<name>`` (None if absent)."""
    src = Path(__file__).resolve().parents[2].parent / "shared/data" / name
    if not src.is_dir():
        return None
    out = tmp_path / (sub or name)
    out.mkdir(parents=True)
    for f in sorted(src.rglob("*.avro"))[:n]:
        (out / f.name).symlink_to(f)
    return out


def test_histograms_of_empty_groups_are_drawn_without_a_legend(tmp_path):
    path = plot_histograms({"real": np.array([]), "bogus": np.array([])}, tmp_path / "h.png", "empty dev set")
    assert path.stat().st_size > 0


def test_a_mistyped_alert_folder_is_an_error_not_an_empty_section(tmp_path):
    import pytest

    from broker.errors import DatasetError

    for given in ({"ztf_dir": tmp_path / "ztf_alrets"}, {"dev_dir": tmp_path / "nope"},
                  {"surveys_dir": tmp_path / "file.txt"}):
        (tmp_path / "file.txt").write_text("not a folder")
        with pytest.raises(DatasetError, match="no such folder of alerts"):
            main_eval(None, tmp_path / "out", **given)
    assert not (tmp_path / "out").exists()  # refused before anything is loaded or written
