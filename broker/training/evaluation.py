"""Evaluation of a real/bogus model: plots, :func:`main_eval` and the Markdown report.

PNG plots (:func:`plot_roc`, :func:`plot_histograms`, :func:`plot_triplet_grid`), the
evaluation command :func:`main_eval` (held-out simulated set and real ZTF alerts, optionally
against a second model), the promotion rule (:func:`promotion_check`,
:data:`PROMOTION_LEVEL`, :data:`TARGETS`), the report writer :func:`write_eval_report` and
the number formatter :func:`_fmt` shared with the model card.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.errors import DatasetError
from broker.realbogus import RealBogusClassifier
from broker.training.data import load_training_set
from broker.training.devset import SURVEY_FOLDERS, dev_analysis, score_other_surveys
from broker.training.metrics import (
    _auc_se,
    _centre_mean,
    by_lobe_ratio,
    by_reference_brightness,
    domain_stats,
    evaluate,
    evaluate_simulated,
    paired_auc_difference,
)
from broker.training.settings import label_settings_differ
from broker.training.ztf import compare_with_ztf, ztf_triplets


# --- evaluation report ----------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """ROC curves ``{name: (scores, labels)}`` on one plot (log FPR axis)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=80)
    for name, (s, y) in curves.items():
        if 0 < np.sum(y) < len(y):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(np.maximum(fpr, 1e-4), tpr, label=f"{name} (AUC {roc_auc_score(y, s):.4f})")
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_xlabel("false positive rate (bogus kept)")
    ax.set_ylabel("true positive rate (reals kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_histograms(groups: dict[str, np.ndarray], path: Path, title: str,
                    threshold: float | None = None) -> Path:
    """Score histograms, one per group ``{name: scores}`` (log counts)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=80)
    bins = np.linspace(0, 1, 41)
    for name, s in groups.items():
        if len(s):
            ax.hist(s, bins=bins, histtype="step", lw=1.5, label=f"{name} (n={len(s)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("real/bogus score")
    ax.set_ylabel("candidates")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:  # every group can be empty (a dev set without scorable alerts)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_triplet_grid(x: np.ndarray, captions: Sequence[str], path: Path, title: str,
                      dpi: int = 45) -> Path:
    """Rows of normalised triplets (science | reference | difference) with a caption each.

    ``dpi`` 45 gives ~45 px per stamp: a 20-triplet grid stays under ~150 KB (noise does not
    compress); use more for short grids that must be read closely.
    """
    plt = _plt()
    n = len(x)
    cols = 2  # two triplets per row
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(7.5, 1.35 * rows + 0.4), dpi=dpi,
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i in range(n):
        r, c = divmod(i, cols)
        for ch in range(3):
            ax = axes[r, 3 * c + ch]
            ax.imshow(x[i, ch], origin="lower", cmap="gray", vmin=-5, vmax=20)
        axes[r, 3 * c].set_title(captions[i], fontsize=7, loc="left")
    fig.suptitle(f"{title}  (science | reference | difference, normalised)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _examples(s: np.ndarray, y: np.ndarray, kinds: np.ndarray, threshold: float,
              rng: np.random.Generator, per: int = 1) -> np.ndarray:
    """Indices: ``per`` random examples of each kind, plus the worst misclassified ones."""
    idx = []
    for k in sorted(set(kinds.tolist())):
        m = np.flatnonzero(kinds == k)
        idx += rng.choice(m, min(per, len(m)), replace=False).tolist()
    wrong = np.flatnonzero((s >= threshold) != (y == 1))
    worst = wrong[np.argsort(-np.abs(s[wrong] - threshold))][:4]
    return np.array(idx + [int(i) for i in worst if i not in idx], dtype=int)


def main_eval(
    model: str | Path | None = None,
    out_dir: str | Path = "reports/realbogus",
    sim_dir: str | Path | None = None,
    ztf_dir: str | Path | None = None,
    *,
    threshold: float = 0.5,
    max_sim: int | None = None,
    compare: str | Path | None = None,
    seed: int = 0,
    dev_dir: str | Path | None = None,
    surveys_dir: str | Path | None = None,
) -> dict:
    """Evaluate a real/bogus model and write ``report.md``, ``metrics.json`` and PNG plots.

    Parameters
    ----------
    model : str or path, optional
        Version (``realbogus-v11``) or weights path; default the classifier's default version.
    out_dir : path
        Report folder (created).
    sim_dir : path, optional
        Held-out simulated set (shards + manifest of
        :func:`~broker.training.generate.generate_training_set`, made with a
        seed the model was not trained on). Default ``build/realbogus-test-1`` when present.
    ztf_dir : path, optional
        Real ZTF alerts; default ``../shared/data/ztf_alerts`` when present.
    threshold : float
        The operating threshold reported (FNR/FPR at it).
    max_sim : int, optional
        Use only the first ``max_sim`` held-out candidates (quick runs, tests).
    compare : str or path, optional
        A second model (e.g. the previous default) evaluated on the same data for the comparison.
    seed : int
        Picks the example triplets.
    dev_dir : path, optional
        The real ZTF dev set (:func:`_eval_dev`); default ``../shared/data/ztf_alerts_dev`` when
        present.
    surveys_dir : path, optional
        Other surveys' alerts (:func:`broker.training.devset.score_other_surveys`); default
        ``../shared/data/other_surveys`` when present.

    Returns
    -------
    dict
        The metrics (also in ``metrics.json``).
    """
    _check_folders(ztf_dir=ztf_dir, dev_dir=dev_dir, surveys_dir=surveys_dir)
    root = Path(__file__).resolve().parent.parent.parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clf = RealBogusClassifier.load(model)
    run = _Run(clf, RealBogusClassifier.load(compare) if compare else None, out, root,
               threshold, np.random.default_rng(seed),
               {"model": clf.version, "threshold": threshold, "files": {}}, {})
    if sim_dir is None:
        cand = root / "build" / "realbogus-test-1"
        sim_dir = cand if (cand / "manifest.json").is_file() else None
    if ztf_dir is None:
        cand = root.parent / "shared" / "data" / "ztf_alerts"
        ztf_dir = cand if cand.is_dir() else None
    dev_dir, surveys_dir = dev_dir or _shared(root, "ztf_alerts_dev"), \
        surveys_dir or _shared(root, "other_surveys")
    if sim_dir is not None:
        _eval_held_out(run, Path(sim_dir), max_sim)
    if ztf_dir is not None:
        _eval_ztf(run, Path(ztf_dir))
    if dev_dir is not None:
        _eval_dev(run, Path(dev_dir))
    if surveys_dir is not None:
        _eval_surveys(run, Path(surveys_dir))
    _eval_real_pixels(run, _real_pixel_folders(ztf_dir, dev_dir, surveys_dir))
    res = run.res
    if res.get("sim_compare") or res.get("ztf_compare"):
        res["promotion"] = promotion_check(res)
    if run.curves:
        res["files"]["roc"] = plot_roc(run.curves, out / "roc.png").name
    (out / "metrics.json").write_text(json.dumps(res, indent=2, sort_keys=True, default=float))
    write_eval_report(out / "report.md", res)
    return res


def _check_folders(**folders: str | Path | None) -> None:
    """DatasetError for an alert folder given by name that is not a folder.

    A mistyped ``--ztf-dir`` would otherwise read no alert and report an empty section.
    """
    for name, folder in folders.items():
        if folder is not None and not Path(folder).is_dir():
            raise DatasetError(f"{name} {folder}: no such folder of alerts")


def _shared(root: Path, name: str) -> Path | None:
    """``../shared/data/<name>`` beside the repository when present, else None."""
    path = root.parent / "shared" / "data" / name
    return path if path.is_dir() else None


@dataclass
class _Run:
    """One :func:`main_eval`: the models, where the files go, and what it has collected."""

    clf: RealBogusClassifier
    other: RealBogusClassifier | None  # the compared model
    out: Path  # report folder
    root: Path  # repository root, that recorded paths are relative to
    threshold: float
    rng: np.random.Generator  # picks the example triplets
    res: dict  # the metrics
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # ROC curves: {name: (scores, labels)}


def _eval_held_out(run: _Run, sim_dir: Path, max_sim: int | None) -> None:
    """The held-out simulated set: metrics, the compared model's, plots and examples.

    Metrics (``res["sim"]``), the compared model's (``res["sim_compare"]``), ROC curves, score
    histograms and example triplets.
    """
    d = load_training_set(sim_dir, np.float16)
    n = len(d["y"]) if max_sim is None else min(max_sim, len(d["y"]))
    x, y, kinds, snr = d["x"][:n], d["y"][:n].astype(int), d["kind"][:n], d["snr"][:n]
    # sets made before reference states were recorded lack them; one mixing older shards has
    # too few to use
    ref = d["reference"][:n] if len(d.get("reference", ())) == len(d["y"]) else None
    man = json.loads((sim_dir / "manifest.json").read_text())
    clf, other, threshold = run.clf, run.other, run.threshold
    s = clf.score(x)
    sim = run.res["sim"] = {"dir": _relative(sim_dir, run.root), "seed": man.get("seed"),
                            "n": int(n), **evaluate_simulated(s, y, kinds, snr, threshold, ref)}
    run.curves[f"{clf.version}, simulated held-out"] = (s, y)
    sim["domain"] = {"real": domain_stats(x[y == 1]), "bogus": domain_stats(x[y == 0])}
    sim["by_reference"] = by_reference_brightness(s, y, x, threshold)
    if ref is not None:
        sim.update(_by_reference_state(s, y, x, kinds, ref, sim["eer_threshold"],
                                       clf.norm_config.soft_knee, man.get("config") or {}))
    if other is not None:
        so = other.score(x)
        run.res["sim_compare"] = {"model": other.version,
                                  **evaluate_simulated(so, y, kinds, snr, threshold, ref),
                                  "labels_differ": label_settings_differ(
                                      man.get("config"), _card_config(other))}
        run.curves[f"{other.version}, simulated held-out"] = (so, y)
    groups = {"real": s[y == 1], "bogus": s[y == 0]}
    run.res["files"]["hist_sim"] = plot_histograms(
        groups, run.out / "hist_sim.png", "held-out simulated candidates", threshold).name
    ex = _examples(s, y, kinds, threshold, run.rng)
    caps = [f"{kinds[i]} {'R' if y[i] else 'B'} s={s[i]:.2f} snr={snr[i]:.0f}" for i in ex]
    run.res["files"]["examples_sim"] = plot_triplet_grid(
        x[ex].astype(np.float32), caps, run.out / "examples_sim.png",
        "simulated held-out: examples per kind, then worst errors").name


def _by_reference_state(s: np.ndarray, y: np.ndarray, x: np.ndarray, kinds: np.ndarray,
                        ref: np.ndarray, threshold: float, soft_knee: float, config: dict) -> dict:
    """Held-out errors by the state of the frame's reference at the equal-error ``threshold``.

    ``errors_by_state`` ({state: {kind: (errors, n)}}) and, where some references were misaligned,
    ``misaligned_by_lobe_ratio`` and the set's ``dipole_rule`` settings.
    """
    out: dict = {"errors_by_state": {
        str(r): {k: (round(d["misclassified"] * d["n"]), d["n"])
                 for k, d in evaluate(s[m], y[m], threshold, kinds[m])["per_kind"].items()}
        for r in sorted(set(ref.tolist())) for m in [ref == r]}}
    if np.any(ref == "misaligned"):
        mis = ref == "misaligned"
        out["misaligned_by_lobe_ratio"] = by_lobe_ratio(s[mis], y[mis], x[mis], threshold,
                                                        soft_knee)
        out["dipole_rule"] = {k: config.get(k) for k in (
            "variable_dipole_lobe", "dipole_lobe_kinds", "min_dipole_lobe_snr")}
    return out


def _eval_ztf(run: _Run, ztf_dir: Path) -> None:
    """The real ZTF alerts: agreement with ZTF's scores, the compared model's, plots and examples.

    Agreement with ZTF's scores (``res["ztf"]``), the compared model's (``res["ztf_compare"]``, with
    paired AUC differences), the ROC curve against drb, score histograms, the largest disagreements
    and random examples.
    """
    xz, meta, rejected = ztf_triplets(ztf_dir)
    sz = run.clf.score(xz) if len(xz) else np.zeros(0)
    reasons = Counter(r.split(": ", 1)[-1].split(" (")[0][:60] for r in rejected)
    z = run.res["ztf"] = {"dir": _relative(ztf_dir, run.root), "n_rejected": len(rejected),
                          "rejected_reasons": dict(reasons.most_common()),
                          "n_repaired": int(np.sum((meta["n_nan"] > 0) | (meta["n_pad"] > 0))),
                          "n_fading": int(meta["fading"].sum()),
                          "domain": domain_stats(xz) if len(xz) else {},
                          **compare_with_ztf(sz, meta)}
    neg = np.flatnonzero(meta["drb"] <= 0.5)  # NaN (no drb) compares False
    centre = _centre_mean(xz[neg, 1]) if len(neg) else np.zeros(0, np.float32)
    z["drb_negatives"] = [
        {"objectId": str(meta["objectId"][i]), "drb": float(meta["drb"][i]),
         "rb": float(meta["rb"][i]), "score": float(sz[i]), "reference_centre": float(c)}
        for i, c in zip(neg, centre, strict=True)]
    okr = np.isfinite(meta["rb"])
    if okr.any():  # against rb: drb has too few negatives to split (9 in the public sample)
        z["by_reference"] = by_reference_brightness(sz[okr], meta["rb"][okr] > 0.5, xz[okr],
                                                    run.threshold)
    if run.other is not None and len(xz):
        run.res["ztf_compare"] = _ztf_compare(run.other, xz, sz, meta)
    _ztf_plots(run, xz, sz, meta)


def _ztf_compare(other: RealBogusClassifier, xz: np.ndarray, sz: np.ndarray,
                 meta: dict[str, np.ndarray]) -> dict:
    """The compared model against ZTF's scores, and the AUC difference per ZTF score.

    The AUC difference (ours ``sz`` minus its) comes with its paired bootstrap interval
    (:data:`PROMOTION_LEVEL`).
    """
    so = other.score(xz)
    out = {"model": other.version, **compare_with_ztf(so, meta), "delta_auc": {}}
    for name in ("drb", "rb"):
        okn = np.isfinite(meta[name])
        out["delta_auc"][name] = paired_auc_difference(meta[name][okn] > 0.5, sz[okn], so[okn],
                                                       level=PROMOTION_LEVEL)
    return out


def _ztf_plots(run: _Run, xz: np.ndarray, sz: np.ndarray, meta: dict[str, np.ndarray]) -> None:
    """Plots and examples of the ZTF alerts.

    ROC curve against drb > 0.5, score histograms by drb, the ten largest disagreements with ZTF
    (also listed in ``res["ztf"]["disagreements"]``) and six random examples.
    """
    files, threshold = run.res["files"], run.threshold
    ok = np.isfinite(meta["drb"])
    if ok.any():
        run.curves[f"{run.clf.version} vs ZTF drb>0.5"] = (sz[ok],
                                                           (meta["drb"][ok] > 0.5).astype(int))
        gz = {"ZTF drb > 0.5": sz[ok & (meta["drb"] > 0.5)],
              "ZTF drb <= 0.5": sz[ok & (meta["drb"] <= 0.5)],
              "no drb (older packets)": sz[~ok]}
    else:
        gz = {"all": sz}
    files["hist_ztf"] = plot_histograms(gz, run.out / "hist_ztf.png",
                                        "real ZTF alerts, by ZTF's drb", threshold).name
    ref = np.where(ok, meta["drb"], meta["rb"])
    gap = np.abs(sz - np.nan_to_num(ref, nan=0.5))
    worst = np.argsort(-gap)[:10]
    run.res["ztf"]["disagreements"] = [
        {"objectId": str(meta["objectId"][i]), "candid": int(meta["candid"][i]),
         "score": float(sz[i]), "drb": float(meta["drb"][i]), "rb": float(meta["rb"][i])}
        for i in worst]
    caps = [f"{meta['objectId'][i]} ours={sz[i]:.2f} drb={meta['drb'][i]:.2f} "
            f"rb={meta['rb'][i]:.2f}" for i in worst]
    files["disagree_ztf"] = plot_triplet_grid(
        xz[worst], caps, run.out / "disagree_ztf.png",
        "ZTF: largest |ours - drb (or rb)|", dpi=70).name
    typical = run.rng.choice(len(xz), min(6, len(xz)), replace=False)
    caps = [f"{meta['objectId'][i]} ours={sz[i]:.2f} drb={meta['drb'][i]:.2f}" for i in typical]
    files["examples_ztf"] = plot_triplet_grid(
        xz[typical], caps, run.out / "examples_ztf.png", "ZTF: random examples").name


def _eval_dev(run: _Run, dev_dir: Path) -> None:
    """The real ZTF dev set: :func:`~broker.training.devset.dev_analysis`, plots and example grids.

    ``res["dev"]``: AUCs against drb and rb with bootstrap intervals, the fraction of braai-bogus
    passed, the compared model's figures (``compare``, with paired AUC differences); score
    histograms by drb, the braai-bogus scored highest and the braai-reals scored lowest.
    """
    x, meta, rejected = ztf_triplets(dev_dir)
    s = run.clf.score(x) if len(x) else np.zeros(0)
    d = run.res["dev"] = {"dir": _relative(dev_dir, run.root), "n_rejected": len(rejected),
                          **dev_analysis(s, meta, run.threshold)}
    if run.other is not None and len(x):
        so = run.other.score(x)
        ok = np.isfinite(meta["drb"])
        d["compare"] = {"model": run.other.version, **dev_analysis(so, meta, run.threshold),
                        "delta_auc_drb": paired_auc_difference(
                            meta["drb"][ok] > 0.5, s[ok], so[ok], level=PROMOTION_LEVEL)}
    files, ok = run.res["files"], np.isfinite(meta["drb"])
    files["hist_dev"] = plot_histograms(
        {"braai real (drb > 0.5)": s[ok & (meta["drb"] > 0.5)],
         "braai bogus (drb <= 0.5)": s[ok & (meta["drb"] <= 0.5)]},
        run.out / "hist_dev.png", "ZTF dev set, by braai's drb", run.threshold).name
    for key, title in (("high_bogus", "dev set: braai-bogus we score highest"),
                       ("low_real", "dev set: braai-real we score lowest")):
        idx = np.array(d[key][:16], dtype=int)
        d[key] = [{"objectId": str(meta["objectId"][i]), "candid": int(meta["candid"][i]),
                   "score": float(s[i]), "drb": float(meta["drb"][i]), "rb": float(meta["rb"][i]),
                   "fading": bool(meta["fading"][i])} for i in d[key]]
        caps = [f"{meta['objectId'][i]} ours={s[i]:.2f} drb={meta['drb'][i]:.2f} "
                f"{'fading' if meta['fading'][i] else ''}" for i in idx]
        files[f"dev_{key}"] = plot_triplet_grid(x[idx], caps, run.out / f"dev_{key}.png",
                                                title, dpi=60).name


def _eval_surveys(run: _Run, root: Path) -> None:
    """Other surveys' stamps scored (``res["surveys"]``) and their score histograms."""
    res = score_other_surveys(run.clf, root, run.threshold)
    run.res["surveys"] = {k: {kk: vv for kk, vv in v.items() if kk != "scores"}
                          for k, v in res.items()}
    if res:
        run.res["files"]["hist_surveys"] = plot_histograms(
            {k: np.array(v["scores"]) for k, v in res.items()}, run.out / "hist_surveys.png",
            "other surveys' alert stamps (behaviour, not labels)", run.threshold).name


def _real_pixel_folders(ztf_dir: str | Path | None, dev_dir: str | Path | None,
                        surveys_dir: str | Path | None) -> dict[str, tuple[Path, str]]:
    """``{name: (folder, packet shape)}`` of every alert folder given or found."""
    out = {name: (Path(d), "ztf") for name, d in (("ztf", ztf_dir), ("ztf_dev", dev_dir)) if d}
    for survey, sub in SURVEY_FOLDERS.items():
        if surveys_dir is not None and (Path(surveys_dir) / sub).is_dir():
            out[survey] = (Path(surveys_dir) / sub, survey)
    return out


def _eval_real_pixels(run: _Run, folders: dict[str, tuple[Path, str]]) -> None:
    """Each survey's real pixels labelled by construction (``res["real_pixels"]``) and a grid.

    :func:`broker.training.realpixels.real_pixel_set` (seed 0) scored by the model and the
    compared one; the grid shows, per survey, the 2 residuals scored highest and the 2
    injections scored lowest.
    """
    from broker.training.realpixels import real_pixel_check, real_pixel_set

    out: dict[str, dict] = {}
    xs, caps = [], []
    for name, (folder, survey) in folders.items():
        data = real_pixel_set(folder, survey, seed=0)
        if not len(data["y"]):
            continue
        s = run.clf.score(data["x"])
        out[name] = {"dir": _relative(folder, run.root),
                     "model": real_pixel_check(s, data, run.threshold)}
        if run.other is not None:
            out[name]["compare"] = {"version": run.other.version, **real_pixel_check(
                run.other.score(data["x"]), data, run.threshold)}
        res_i, inj_i = np.flatnonzero(data["y"] == 0), np.flatnonzero(data["y"] == 1)
        for i in list(res_i[np.argsort(-s[res_i])][:2]) + list(inj_i[np.argsort(s[inj_i])][:2]):
            xs.append(data["x"][i])
            what = "residual" if data["y"][i] == 0 else f"injected S/N {data['snr'][i]:.0f}"
            caps.append(f"{name} {what} ours={s[i]:.2f}")
    if out:
        run.res["real_pixels"] = out
        run.res["files"]["real_pixels"] = plot_triplet_grid(
            np.stack(xs), caps, run.out / "real_pixels.png",
            "real pixels: residuals scored highest, injections scored lowest", dpi=60).name


#: Coverage of the paired bootstrap interval (:func:`paired_auc_difference`) that
#: :func:`promotion_check` reads: a drop of a ZTF AUC counts only when the interval of
#: (new - old) lies wholly below 0 at this level.
PROMOTION_LEVEL = 0.95


def promotion_check(res: dict) -> dict:
    """Whether the evaluated model should replace the compared one as the default.

    Rule: better on the held-out simulated set (lower FNR = FPR and AUC not lower) and not
    significantly worse on the real ZTF triplets: for each of drb > 0.5 and rb > 0.5, the
    paired bootstrap interval (:data:`PROMOTION_LEVEL`) of this model's AUC minus the other's
    reaches 0. The interval scales with each reference's negatives: rb's 169 resolve ~0.01,
    drb's 9 only ~0.1 (why not a fixed allowed drop: ``docs/notes/training-settings.md``,
    "Promotion rule"). A held-out set labelled with other
    :data:`~broker.training.settings.LABEL_SETTINGS` than the other model's training data
    proves nothing either way: then the held-out half fails, and both models must be read on
    both sets (``bench.realbogus_accuracy``) by whoever promotes.
    """
    compared = res.get("sim_compare") or res.get("ztf_compare")
    if compared is None:
        raise ValueError("promotion_check needs the results of a compared model")
    out: dict = {"against": compared["model"], "level": PROMOTION_LEVEL}
    sim, simc = res.get("sim"), res.get("sim_compare")
    if sim and simc:
        out["sim_better"] = bool(sim["eer"] < simc["eer"] and
                                 sim["at_threshold"]["auc"] >= simc["at_threshold"]["auc"])
        # on a set labelled otherwise than its training data the other model is read against
        # a convention it never learnt, and either model wins on its own
        out["labels_differ"] = simc.get("labels_differ")
        if out["labels_differ"]:
            out["sim_better"] = False
    delta = (res.get("ztf_compare") or {}).get("delta_auc")
    if delta:
        out["ztf_not_worse"] = bool(all(not np.isfinite(d["hi"]) or d["hi"] >= 0
                                        for d in delta.values()))
    out["promote"] = bool(out.get("sim_better", False) and out.get("ztf_not_worse", False))
    return out


TARGETS = {
    "eer": ("FNR = FPR on the held-out simulated set", 0.01, "<="),
    "ztf_auc_drb": ("AUC against ZTF drb > 0.5 on real ZTF triplets", 0.95, ">="),
    "dev_auc_drb": ("AUC against ZTF drb > 0.5 on the dev set", 0.95, ">="),
    "dev_bogus_passed": ("braai-bogus of the dev set scored >= the threshold", 0.15, "<"),
}


def write_eval_report(path: Path, res: dict) -> Path:
    """Markdown report of :func:`main_eval`'s results (every number from ``res``)."""
    lines = [f"# Real/bogus evaluation: `{res['model']}`", ""]
    lines += _held_out_section(res)
    lines += _ztf_section(res)
    lines += _dev_section(res)
    lines += _surveys_section(res)
    lines += _real_pixels_section(res)
    lines += _limits_section(res)
    lines += _domain_section(res)
    lines += _reference_table(res)
    lines += _promotion_section(res)
    if "roc" in res["files"]:
        lines += ["## ROC", "", "![ROC](roc.png)", ""]
    path.write_text("\n".join(lines))
    return path


def _held_out_section(res: dict) -> list[str]:
    """Report lines: the held-out simulated set's metrics, with its plots.

    The metrics overall, per kind, by sign, by reference state and by S/N.
    """
    sim = res.get("sim")
    if not sim:
        return []
    a, e, t = sim["at_threshold"], sim["at_eer"], res["threshold"]
    eer_target = TARGETS["eer"][1]
    lines = ["## Held-out simulated candidates", "",
             f"{sim['n']} candidates ({a['n_real']} real, {a['n_bogus']} bogus) from "
             f"`{sim['dir']}` (generator seed {sim['seed']}, never seen in training).", "",
             "| metric | value | target |", "|---|---|---|",
             f"| ROC AUC | {_fmt(a['auc'], 5)} | |",
             f"| FNR at {t} | {_fmt(a['fnr'], 4)} | |",
             f"| FPR at {t} | {_fmt(a['fpr'], 4)} | |",
             f"| threshold where FNR = FPR | {_fmt(sim['eer_threshold'], 3)} | |",
             f"| FNR = FPR there | {_fmt(sim['eer'], 4)} | <= {eer_target} "
             f"({'met' if sim['eer'] <= eer_target else 'NOT met'}) |"]
    if res.get("sim_compare"):
        c = res["sim_compare"]
        lines += [f"| {c['model']}: AUC / FNR=FPR | {_fmt(c['at_threshold']['auc'], 5)} / "
                  f"{_fmt(c['eer'], 4)} | |"]
    lines += ["", f"Per kind (misclassified fraction at {t} and at the "
              f"equal-error threshold {_fmt(sim['eer_threshold'], 3)}):", "",
              "| kind | n | at threshold | at FNR=FPR |", "|---|---|---|---|"]
    for k, d in sorted(a["per_kind"].items()):
        lines.append(f"| {k} | {d['n']} | {_fmt(d['misclassified'], 4)} | "
                     f"{_fmt(e['per_kind'][k]['misclassified'], 4)} |")
    lines += _held_out_subsets(res)
    return lines + ["", "![score histograms](hist_sim.png)", "",
                    "![examples](examples_sim.png)", ""]


def _held_out_subsets(res: dict) -> list[str]:
    """Report lines: the held-out set by subset.

    By sign of the difference, by the state of the frame's reference and (reals) by measured S/N.
    """
    sim, lines = res["sim"], []
    if sim.get("by_sign"):
        lines += ["", "By sign of the difference (a fading star and a badly subtracted one both "
                  "leave a negative blob on a star):", ""]
        lines += _subset_table(res, "by_sign", lambda k: f"{k} (S/N "
                               f"{'>' if k == 'brightening' else '<'} 0)")
    if sim.get("by_reference_state"):
        lines += ["", "By the state of the frame's reference: the generator gives some frames a "
                  "deliberately misaligned reference (dipoles on its stars) or a blurred one "
                  "(PSF-mismatch rings), and labels a variable's change on a misaligned one by "
                  "what its stamp shows (`variable_dipole_lobe`). FNR / FPR are at the overall "
                  f"equal-error threshold {_fmt(sim['eer_threshold'], 3)}.", ""]
        lines += _subset_table(res, "by_reference_state", str, with_rates=True)
    if sim.get("fnr_by_snr"):
        lines += ["", "FNR of real candidates by measured S/N:", "", "| S/N | n | FNR |",
                  "|---|---|---|"]
        lines += [f"| {b['snr_lo']}-{b['snr_hi']} | {b['n']} | {_fmt(b['fnr'], 4)} |"
                  for b in sim["fnr_by_snr"] if b["n"]]
    return lines


def _ztf_section(res: dict) -> list[str]:
    """Report lines: agreement with ZTF's drb and rb on the real alerts, and the AUC target."""
    z = res.get("ztf")
    if not z:
        return []
    d = z["drb"]
    lines = ["## Real ZTF alerts", "",
             f"{z['n']} unique ZTF triplets from `{z['dir']}` ({z['n_rejected']} records "
             f"rejected: {json.dumps(z['rejected_reasons'])}; {z['n_repaired']} had NaNs "
             f"filled or were padded; {z['n_fading']} are fadings, whose difference stamp ZTF "
             "cuts from reference - science and which are turned to science - reference as in "
             "our pipeline, `broker.normalise.alert_triplet`). ZTF's scores are a reference, "
             "not truth: the public sample alerts are nearly all real.", "",
             "| reference | n | n > 0.5 | AUC of our score | Spearman | agreement at 0.5 |",
             "|---|---|---|---|---|---|"]
    for name in ("drb", "rb"):
        r = z[name]
        lines.append(f"| ZTF {name} | {r['n']} | {r['n_real']} | {_fmt(r['auc'])} | "
                     f"{_fmt(r['spearman'])} (p={r['spearman_p']:.1g}) | "
                     f"{_fmt(r['agree_at_0.5'])} |")
    if res.get("ztf_compare"):
        c = res["ztf_compare"]
        lines.append(f"| {c['model']}: ZTF drb | {c['drb']['n']} | {c['drb']['n_real']} | "
                     f"{_fmt(c['drb']['auc'])} | {_fmt(c['drb']['spearman'])} | "
                     f"{_fmt(c['drb']['agree_at_0.5'])} |")
    neg, target = d["n"] - d["n_real"], TARGETS["ztf_auc_drb"][1]
    return lines + [
        "", f"Target: AUC >= {target} against drb > 0.5: "
        f"{'met' if d['auc'] >= target else 'NOT met'} "
        f"({_fmt(d['auc'])}, with only {neg} triplets at drb <= 0.5, so the AUC's "
        f"standard error is about {_fmt(_auc_se(d['auc'], d['n_real'], neg), 2)}).",
        f"Fraction of the ZTF triplets we score >= {res['threshold']}: "
        f"{_fmt(z['frac_above_0.5'])}.", "",
        "![score histograms](hist_ztf.png)", "", "Largest disagreements:", "",
        "![disagreements](disagree_ztf.png)", "", "![examples](examples_ztf.png)", ""]


def _dev_section(res: dict) -> list[str]:
    """Report lines: the ZTF dev set's AUCs, pass rates, histograms and worst examples."""
    d = res.get("dev")
    if not d:
        return []

    def auc(a: dict) -> str:
        return f"{_fmt(a['auc'])} [{_fmt(a['lo'])}, {_fmt(a['hi'])}]"

    rows = [(res["model"], d)] + ([(d["compare"]["model"], d["compare"])] if d.get("compare")
                                  else [])
    t = d["threshold"]
    lines = ["## Real ZTF dev set", "",
             f"{d['n']} triplets from `{d['dir']}` ({d['n_rejected']} records rejected), "
             f"{d['n_drb']} with braai's drb, {d['n_drb_bogus']} of them <= 0.5. ZTF's scores "
             "are for evaluation only: nothing was trained, stopped or thresholded on them. "
             "AUCs with 95 % stratified bootstrap intervals "
             "(`broker.training.devset.bootstrap_auc`).", "",
             f"| model | AUC vs drb > 0.5 | AUC vs rb > 0.5 | braai-bogus scored >= {t} | "
             f"braai-real scored < {t} | fadings: bogus passed / real rejected |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        f = r["by_sign"]["fading"]
        lines.append(f"| `{name}` | {auc(r['auc_drb'])} | {auc(r['auc_rb'])} | "
                     f"{_fmt(r['frac_bogus_passed'])} | {_fmt(r['frac_real_rejected'])} | "
                     f"{_fmt(f['frac_bogus_passed'])} / {_fmt(f['frac_real_rejected'])} |")
    if d.get("compare"):
        da = d["compare"]["delta_auc_drb"]
        lines += ["", f"AUC vs drb of `{res['model']}` minus `{d['compare']['model']}`: "
                  f"{da['delta']:+.3f} [{da['lo']:+.3f}, {da['hi']:+.3f}] (paired bootstrap)."]
    tg, tb = TARGETS["dev_auc_drb"][1], TARGETS["dev_bogus_passed"][1]
    lines += ["", f"Targets: AUC vs drb >= {tg}: "
              f"{'met' if d['auc_drb']['auc'] >= tg else 'NOT met'}; braai-bogus passed < "
              f"{tb}: {'met' if d['frac_bogus_passed'] < tb else 'NOT met'}.", "",
              "![dev histograms](hist_dev.png)", "",
              "![braai-bogus scored highest](dev_high_bogus.png)", "",
              "![braai-real scored lowest](dev_low_real.png)", ""]
    return lines


def _surveys_section(res: dict) -> list[str]:
    """Report lines: the other surveys' stamps scored (behaviour only)."""
    sv = res.get("surveys")
    if not sv:
        return []
    lines = ["## Other surveys' stamps", "",
             "Scored as a check of behaviour, not accuracy (their own scores are not labels, and "
             "these samples are not a random draw of their streams). ATLAS packets carry no "
             "reference stamp: it is rebuilt as science - difference; WINTER's 81 px stamps are "
             "cut to their central 63 px.", "",
             f"| survey | n (rejected) | scored >= {res['threshold']} | quartiles |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} ({v['n_rejected']}) | {_fmt(v['frac_passed'])} | "
              + " / ".join(_fmt(q, 2) for q in v["quartiles"]) + " |" for k, v in sv.items()]
    return lines + ["", "![other surveys](hist_surveys.png)", ""]


def _real_pixels_section(res: dict) -> list[str]:
    """Report lines: each survey's real pixels, labelled by construction."""
    rp = res.get("real_pixels")
    if not rp:
        return []
    from broker.training.realpixels import SNR_BIN_NAMES

    t = res["threshold"]
    lines = ["## Real pixels, labelled by construction", "",
             "Triplets cut from each survey's own alert stamps away from the candidate "
             "(`broker.training.realpixels`): **residuals**, off-centre detections of the "
             "difference stamp with an opposite lobe (star residuals, dipoles, mask edges), and "
             "**injections**, a point source of the science stamp's measured FWHM added to the "
             "science and difference stamps, its S/N counted against the PSF-flux noise "
             "measured on the stamp (pixel correlations included). No survey score is read. It checks that the model "
             "rejects a telescope's own residuals and keeps sources on its real backgrounds; it "
             "is not the accuracy on the survey's candidates, which are harder.", "",
             f"| alerts | model | stamps | residuals passed (>= {t}) | injections kept | "
             + " | ".join(f"kept, S/N {b}" for b in SNR_BIN_NAMES) + " | AUC |",
             "|---|---|---|---|---|" + "---|" * len(SNR_BIN_NAMES) + "---|"]
    for name, r in rp.items():
        for key in ("model", "compare"):
            if key not in r:
                continue
            c = r[key]
            model = c.get("version", res["model"])
            lines.append(f"| {name} | `{model}` | {c['n_stamps']} | {_fmt(c['residual_passed'])} "
                         f"({c['n_residual']}) | {_fmt(c['injected_kept'])} ({c['n_injected']}) | "
                         + " | ".join(_fmt(c["injected_kept_by_snr"][b]) for b in SNR_BIN_NAMES)
                         + f" | {_fmt(c['auc'])} |")
    return lines + ["", "![real pixels](real_pixels.png)", ""]


def _domain_section(res: dict) -> list[str]:
    """Report lines: our stamps (real, bogus) and ZTF's side by side after normalisation."""
    sim, z = res.get("sim"), res.get("ztf")
    if not (sim and z and z.get("domain")):
        return []
    lines = ["## Our stamps and ZTF's after normalisation", "",
             "Per channel, in normalised units (median over triplets): mean of the central 5x5 "
             "px / fraction of pixels above 3 / fraction exactly 0 (NaN-filled or padded) / "
             "99th percentile.", "",
             "| channel | ours, real | ours, bogus | ZTF |", "|---|---|---|---|"]

    def f(d: dict) -> str:
        return " / ".join(_fmt(d[k], 3) for k in ("centre", "frac_gt3", "frac_zero", "p99"))

    for ch in ("science", "reference", "difference"):
        lines.append(f"| {ch} | {f(sim['domain']['real'][ch])} | "
                     f"{f(sim['domain']['bogus'][ch])} | {f(z['domain'][ch])} |")
    return lines + [""]


def _promotion_section(res: dict) -> list[str]:
    """Report lines: :func:`promotion_check`'s verdict against the compared model."""
    p = res.get("promotion")
    if not p:
        return []
    lines = ["## Against the previous model", "",
             f"Compared with `{p['against']}` on the same data: better on the held-out "
             f"simulated set: {p.get('sim_better')}; not significantly worse on ZTF (the "
             f"paired {p['level']:.0%} interval of the AUC difference against drb and rb "
             f"each reaches 0): {p.get('ztf_not_worse')}. "
             f"**Promote to default: {p['promote']}.**", ""]
    if p.get("labels_differ"):
        lines += [f"This held-out set is labelled otherwise than `{p['against']}`'s training "
                  f"data ({', '.join(f'`{k}`' for k in p['labels_differ'])}), so its figures "
                  "here do not compare the networks: read both models on both sets "
                  "(`python -m bench.realbogus_accuracy --models ... --sets ...`).", ""]
    da = (res.get("ztf_compare") or {}).get("delta_auc")
    if da:
        lines += ["ZTF AUC of this model minus the other's, with a 95 % paired bootstrap "
                  "interval (both scored on each resample of the alerts; "
                  "`broker.training.metrics.paired_auc_difference`): " + "; ".join(
                      f"{k} {da[k]['delta']:+.3f} [{da[k]['lo']:+.3f}, {da[k]['hi']:+.3f}]"
                      for k in ("drb", "rb")) + ".", ""]
    return lines


def _limits_section(res: dict) -> list[str]:
    """Report lines: where the held-out errors come from, and what ZTF's drb negatives are."""
    sim, z = res.get("sim") or {}, res.get("ztf") or {}
    states, lobes, neg = sim.get("by_reference_state"), sim.get("misaligned_by_lobe_ratio"), \
        z.get("drb_negatives")
    if not (states or neg):
        return []
    lines = ["## What limits the targets", ""]
    if states:
        by_kind = sim["errors_by_state"]
        errs = {st: sum(e for e, _ in kk.values()) for st, kk in by_kind.items()}
        total, n = sum(errs.values()), sum(d["n"] for d in states.values())
        lines += [f"Held-out FNR = FPR: {_fmt(sim['eer'], 4)}; {total} errors at its threshold "
              f"{_fmt(sim['eer_threshold'], 3)}. By the state of the frame's reference: " +
              "; ".join(f"{k}: {e} errors ({e / max(total, 1):.0%}) from "
                        f"{states[k]['n'] / n:.0%} of the candidates, FNR = FPR "
                        f"{_fmt(states[k]['eer'], 4)} within them"
                        for k, e in sorted(errs.items(), key=lambda t: -t[1])) + ".", "",
              "Largest kinds of error per state (errors / candidates of the kind): " + "; ".join(
                  f"{st}: " + ", ".join(f"{k} {e} / {c}" for k, (e, c) in sorted(
                      kk.items(), key=lambda t: -t[1][0])[:4] if e)
                  for st, kk in by_kind.items()) + ".", ""]
    if lobes:
        band = sum(b["err_real"] + b["err_bogus"] for b in lobes if 0.1 <= b["lo"] < 0.4)
        tot = sum(b["err_real"] + b["err_bogus"] for b in lobes)
        rule = sim.get("dipole_rule") or {}
        (snr, ratio), kinds = rule.get("variable_dipole_lobe") or (4.0, 0.25), \
            rule.get("dipole_lobe_kinds") or ["variable"]
        lines += ["On misaligned references, by the difference stamp's opposite / central lobe "
              "ratio (`broker.training.metrics.by_lobe_ratio`): the set labels a change of a "
              f"{' or '.join(kinds)} a dipole (bogus) once the opposite lobe reaches {ratio:g} "
              f"of the central one and {snr:g} sigma, and a constant star's residual one once "
              f"its opposite lobe reaches {rule.get('min_dipole_lobe_snr', 4.0):g} sigma, "
              f"whatever the ratio. {band} of these {tot} errors lie between 0.1 and 0.4, "
              "where the same stamp carries either label.", "",
              "| lobe ratio | reals (errors) | bogus (errors) |", "|---|---|---|"]
        lines += [f"| {b['lo']:g} to {b['hi']:g} | {b['n_real']} ({b['err_real']}) | "
              f"{b['n_bogus']} ({b['err_bogus']}) |" for b in lobes] + [""]
    if neg:
        rb_real = sum(d["rb"] > 0.5 for d in neg)
        lines += [f"ZTF drb: {len(neg)} alerts have drb <= 0.5, so one alert moves the AUC by up to "
              f"{1 / len(neg):.2f}; ZTF's own rb scores {rb_real} of them > 0.5. Reference "
              "centre in normalised units (20 is ~150 robust sigmas a pixel):", "",
              "| objectId | drb | rb | ours | reference centre |", "|---|---|---|---|---|"]
        lines += [f"| {d['objectId']} | {_fmt(d['drb'], 2)} | {_fmt(d['rb'], 2)} | "
              f"{_fmt(d['score'], 2)} | {_fmt(d['reference_centre'], 1)} |" for d in neg] + [""]
    return lines


def _subset_table(res: dict, key: str, label, with_rates: bool = False) -> list[str]:
    """Report lines: a :func:`~broker.training.metrics.by_subset` result of the held-out set.

    Each row is followed by the compared model's.
    """
    other = res.get("sim_compare") or {}
    lines = ["| candidates | n (real / bogus) | ROC AUC | FNR = FPR" +
         (" | FNR / FPR" if with_rates else "") + " |",
         "|---|---|---|---" + ("|---" if with_rates else "") + "|"]
    for name, b in res["sim"][key].items():
        rows = [(f"{label(name)}", f"{b['n']} ({b['n_real']} / {b['n_bogus']})", b)]
        if other.get(key, {}).get(name):
            rows.append((f"{label(name)}, {other['model']}", "", other[key][name]))
        for cap, n, d in rows:
            lines.append(f"| {cap} | {n} | {_fmt(d['auc'], 5)} | {_fmt(d['eer'], 4)} |" +
                     (f" {_fmt(d['fnr'], 4)} / {_fmt(d['fpr'], 4)} |" if with_rates else ""))
    return lines


def _reference_table(res: dict) -> list[str]:
    """Report lines: :func:`by_reference_brightness` of the held-out set and of ZTF side by side."""
    sim = (res.get("sim") or {}).get("by_reference")
    z = (res.get("ztf") or {}).get("by_reference")
    bins = sim or z
    if not bins:
        return []
    lines = ["## By brightness of the reference source", "",
         "Bins of the reference channel's central 5x5 px mean (normalised units; 20 is ~150 "
         "robust sigmas a pixel). Per side: reals / bogus in the bin, the fraction of each "
         f"scored >= {res['threshold']}, and the AUC within the bin. ZTF's side is labelled by "
         "its rb > 0.5 (drb has too few negatives to split).", "",
         "| reference centre | held-out n (real / bogus) | passed (real / bogus) | AUC "
         "| ZTF n (rb > 0.5 / <= 0.5) | passed | AUC |", "|---|---|---|---|---|---|---|"]
    for i, b in enumerate(bins):
        cells = [f"< {b['hi']:g}" if b["lo"] == -np.inf else
                 f">= {b['lo']:g}" if b["hi"] == np.inf else f"{b['lo']:g} to {b['hi']:g}"]
        for side in (sim, z):
            d = side[i] if side else None
            cells += ([f"{d['n_real']} / {d['n_bogus']}",
                       f"{_fmt(d['pass_real'], 2)} / {_fmt(d['pass_bogus'], 2)}", _fmt(d["auc"])]
                      if d else ["-", "-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _card_config(clf: RealBogusClassifier) -> dict | None:
    """The generator config of a model's training data, from its sidecar (None if absent)."""
    data = clf.metadata.get("data")
    return data.get("config") if isinstance(data, dict) else None


def _relative(path: str | Path, root: Path) -> str:
    """``path`` relative to the repository root (``../shared/...`` for the shared data).

    Reports and model cards thus do not record the machine they were made on.
    """
    return os.path.relpath(Path(path).resolve(), root)


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"
