r"""Real/bogus accuracy side by side: models x dihedral views on held-out sets and real ZTF alerts.

Writes the ``realbogus-accuracy`` section of BENCHMARKS.md::

    python -m bench.realbogus_accuracy --models realbogus-v11 realbogus-v10 \
        --sets build/realbogus-test-1 --views 1 8

For each model and number of views (``ScoreConfig.views``): the equal error rate (FNR = FPR) on
each held-out simulated set (``broker train-realbogus`` writes them under ``build/``), overall,
for brightenings / fadings apart (:func:`broker.training.metrics.by_sign`) and on the frames
whose reference was left as built (sets that record it), and the ROC
AUC, with its Hanley-McNeil standard error, against ZTF's ``drb > 0.5`` and ``rb > 0.5`` on the
real alerts of ``../shared/data/ztf_alerts`` (skipped when absent), and on the ZTF dev set
``../shared/data/ztf_alerts_dev`` the AUC against ``drb > 0.5`` with its bootstrap interval and
the fraction of braai-bogus scored >= 0.5 (:func:`broker.training.devset.dev_analysis`); for an
ensemble, also the
range of those AUCs over its members scored alone (members differ only by their seed and
fields, so the range is the seed noise of one recipe on ZTF). Every model is scored on the
same inputs in one run, so the columns compare directly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.common import SHARED_DATA, git_rev, machine, write_section
from broker.errors import DatasetError
from broker.realbogus import DEFAULT_VERSION, RealBogusClassifier, RealBogusEnsemble, ScoreConfig
from broker.training.data import load_training_set
from broker.training.devset import dev_analysis
from broker.training.metrics import _auc_se, by_sign, equal_error
from broker.training.ztf import compare_with_ztf, ztf_triplets

ZTF_DIR = SHARED_DATA / "ztf_alerts"
DEV_DIR = SHARED_DATA / "ztf_alerts_dev"


def _dev_cells(clf: RealBogusClassifier, dev: tuple) -> list[str]:
    """The dev set's AUC against drb > 0.5 [95 % interval] and braai-bogus passed at 0.5."""
    d = dev_analysis(clf.score(dev[0]), dev[1])
    a = d["auc_drb"]
    return [f"{a['auc']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]", f"{d['frac_bogus_passed']:.3f}"]


def _set_label(path: Path) -> str:
    man = json.loads((path / "manifest.json").read_text())
    return f"`{path.name}` ({man['n']:,}, seed {man['seed']})"


def _member_range(clf: RealBogusClassifier, ztf: tuple) -> str:
    """min-max of the ZTF drb and rb AUCs of an ensemble's members scored alone, else "-"."""
    if not isinstance(clf.net, RealBogusEnsemble):
        return "-"
    aucs = {"drb": [], "rb": []}
    for m in clf.net.members:
        res = compare_with_ztf(RealBogusClassifier(m, clf.version, norm_config=clf.norm_config,
                                                config=clf.config).score(ztf[0]),
                               ztf[1])
        for ref in aucs:
            aucs[ref].append(res[ref]["auc"])
    return " / ".join(f"{min(a):.3f}-{max(a):.3f}" for a in aucs.values())


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[DEFAULT_VERSION])
    ap.add_argument("--sets", nargs="+", type=Path, default=[Path("build/realbogus-test-1")])
    ap.add_argument("--views", nargs="+", type=int, default=[1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:  # a set named but not there (or unfinished) is an error, not a shorter table
        sets = {p: load_training_set(p) for p in args.sets}
    except DatasetError as exc:
        ap.error(f"{exc}; `broker train-realbogus` writes the sets under build/")
    ztf = ztf_triplets(ZTF_DIR) if ZTF_DIR.is_dir() else None
    dev = ztf_triplets(DEV_DIR)[:2] if DEV_DIR.is_dir() else None
    head = (["model", "views"] + [f"EER {_set_label(p)}" for p in sets]
            + (["ZTF drb AUC", "ZTF rb AUC", "members' drb / rb AUC"] if ztf else [])
            + (["dev drb AUC [95 %]", "dev braai-bogus >= 0.5"] if dev else []))
    rows = []
    for version in args.models:
        for v in args.views:
            clf = RealBogusClassifier.load(version, ScoreConfig(views=v))
            row = [f"`{clf.version}`", str(v)]
            for d in sets.values():
                s = clf.score(d["x"])
                b = by_sign(s, d["y"], d["snr"])
                clean = ""
                # sets made since the generator records each frame's reference have it
                if len(d.get("reference", ())) == len(d["y"]):
                    m = d["reference"] == "as_built"
                    clean = f"; as built {100 * equal_error(s[m], d['y'][m])[1]:.2f}"
                row.append(f"{100 * equal_error(s, d['y'])[1]:.2f} % ("
                           f"{100 * b['brightening']['eer']:.2f} / {100 * b['fading']['eer']:.2f}"
                           f"{clean})")
            if ztf:
                res = compare_with_ztf(clf.score(ztf[0]), ztf[1])
                for ref in ("drb", "rb"):
                    r = res[ref]
                    se = _auc_se(r["auc"], r["n_real"], r["n"] - r["n_real"])
                    row.append(f"{r['auc']:.3f} ± {se:.3f}")
                row.append(_member_range(clf, ztf))
            if dev:
                row += _dev_cells(clf, dev)
            rows.append(row)
            print(" | ".join(row), flush=True)
    body = "\n".join([
        "## Real/bogus accuracy, side by side", "",
        f"Machine: {machine()}; git {git_rev()}.",
        "EER: the rate where FNR = FPR on a held-out simulated set (other seed and fields than "
        "the training set), and in brackets that of brightenings / fadings (difference S/N > 0 "
        "/ < 0) apart and, for sets that record it, that of the frames whose reference the "
        "generator left as built (neither misaligned nor blurred). ZTF: ROC AUC of our score "
        "against ZTF's score > 0.5 on the real "
        "alerts that carry it, ± the Hanley-McNeil standard error (drb: "
        + (f"{int(np.isfinite(ztf[1]['drb']).sum())} alerts, "
           f"{int((ztf[1]['drb'] <= 0.5).sum())} at <= 0.5" if ztf else "absent") + "). Dev: "
        "the ZTF dev set (" + (f"{int(np.isfinite(dev[1]['drb']).sum())} triplets with drb, "
                               f"{int((dev[1]['drb'] <= 0.5).sum())} at <= 0.5), AUC with a "
                               "stratified bootstrap interval" if dev else "absent)") + ".", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows), "",
        "Reproduce: `python -m bench.realbogus_accuracy "
        + " ".join(["--models", *args.models, "--sets", *map(str, sets), "--views",
                    *map(str, args.views)]) + "`",
    ])
    if not args.no_write:
        write_section("realbogus-accuracy", body)
    return body


if __name__ == "__main__":
    print(main())
