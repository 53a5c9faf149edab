"""The shipped light-curve models on the pixel pipeline: classes and anomaly scores against the truth.

    python -m bench.lightcurves [--size 2048] [--fields 2] [--epochs 9] [--seed 5] [--no-followup]
                                [--compare DIR] [--write]

Fields of the pixel simulator (:class:`broker.simulate.SkySimulator`, default :class:`SimConfig`
populations scaled to the frame area: transients, variable stars, moving objects, artefacts; one
band r, one telescope, nightly cadence) go through the pipeline as the demo runs it: the first 3
epochs build the reference, every later frame goes through :func:`broker.pipeline.process_frame`
with a :class:`~broker.diffstore.DifferenceStore` (so that candidates get forced photometry on the
earlier difference images, as in the subtract stage) and then
:func:`broker.pipeline.associate_and_score` with :meth:`ScoreModels.load` (the shipped
default light-curve classifier and anomaly model). With follow-up visits (default), every science epoch is also
revisited ``followup_gap_days`` (0.02 d) later, as the demo's telescope does for requested objects.

Every candidate is an alert, matched to the truth within 2 px (:func:`bench.context._match`):
transient -> SN, variable -> variable_star, moving -> mover; unmatched candidates (artefacts,
subtraction residuals, cosmic rays) -> bogus. Figures: the classifier's confusion matrix per truth
kind, the anomaly score per truth kind (median, fraction above 0.99) and the 20 highest anomalies.
``--compare DIR`` scores the same alerts (same model inputs) with the models of another folder, for
a before/after table; the classes and scores of the light-curve models do not feed back into the
features, so the rows are the same.

``--write`` replaces (or appends) the section "On the pixel pipeline" of
``docs/lightcurve-report/README.md``.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import git_rev, machine
from bench.context import _match
from broker.anomaly import AnomalyModel
from broker.candidate import Candidate
from broker.context import alert_inputs
from broker.diffstore import DifferenceStore
from broker.history import ObjectHistory
from broker.lcclass import CLASS_NAMES, LightCurveClassifier
from broker.pipeline import SUBTRACTED, ScoreModels, associate_and_score, process_frame
from broker.reference import ReferenceStore
from broker.simulate import SimConfig, SkySimulator
from broker.training.lightcurves import previous_models

REPORT = Path(__file__).resolve().parents[1] / "docs" / "lightcurve-report" / "README.md"
SECTION = "## On the pixel pipeline"
#: Truth kind of the pixel simulator -> light-curve class.
TRUTH_CLASS = {"transient": "SN", "variable": "variable_star", "moving": "mover", "none": "bogus"}


@dataclass(frozen=True)
class Alert:
    """One scored candidate with its truth."""

    truth: str
    source: str
    label: str
    anomaly: float
    features: dict
    x: np.ndarray


def run(size: int, n_fields: int, epochs: int, seed: int, followup: bool = True,
        models: ScoreModels | None = None) -> tuple[list[Alert], int]:
    """Simulate, process and score; (alerts, science frames)."""
    area = (size / 2048) ** 2
    base = SimConfig()
    cfg = SimConfig(shape=(size, size), fields=tuple(f"F{i:03d}" for i in range(1, n_fields + 1)),
                    n_stars=int(base.n_stars * area), n_galaxies=max(int(base.n_galaxies * area), 20),
                    n_transients=max(round(base.n_transients * area), 4),
                    n_variables=max(round(base.n_variables * area), 8),
                    n_moving=max(round(base.n_moving * area), 2))
    models = models or ScoreModels.load(openngc="")
    sim, alerts, frames = SkySimulator(cfg, seed=seed), [], 0
    with tempfile.TemporaryDirectory() as tmp:
        refs = ReferenceStore(Path(tmp) / "refs")
        for fld in cfg.fields:
            history = ObjectHistory(":memory:")
            diffs = DifferenceStore(Path(tmp) / "diff")
            for epoch in range(epochs):
                visits = (0, 1) if followup and epoch >= cfg.reference_epochs else (0,)
                for visit in visits:
                    frame, truth = sim.frame(fld, "r", epoch, visit)
                    res = process_frame(frame, refs, differences=diffs)
                    if res.status != SUBTRACTED or not res.candidates:
                        continue
                    frames += 1
                    m = frame.meta
                    associate_and_score(history, models, m.frame_id, m.mjd_start, m.filter, res.candidates,
                                        m.magzp, res.limiting_flux, m.telescope, frame.shape)
                    matched = {id(c): inj for inj, c in _match(res.candidates, truth)}
                    for c in res.candidates:
                        inj = matched.get(id(c))
                        kind = inj.kind if inj is not None else "none"
                        alerts.append(Alert(TRUTH_CLASS[kind], inj.source_id if inj else "",
                                            str((c.classification or {}).get("label")),
                                            float(c.anomaly if c.anomaly is not None else np.nan),
                                            dict(c.features or {}), _inputs(c)))
    return alerts, frames


def _inputs(c: Candidate) -> np.ndarray:
    """The candidate's row of model inputs, as the score stage built it."""
    return alert_inputs(c.features, c.context)


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _kind_table(alerts: list[Alert], label: np.ndarray, score: np.ndarray) -> tuple[list[str], float, list[int]]:
    """Rows of the per-truth table, the accuracy on the real kinds and the 20 highest-scored alerts."""
    truth = np.array([a.truth for a in alerts])
    rows = ["| truth | alerts | objects | " + " | ".join(CLASS_NAMES) + " | anomaly median | anomaly > 0.99 |",
            "|" + "---|" * (len(CLASS_NAMES) + 5)]
    for k in [k for k in TRUTH_CLASS.values() if (truth == k).any()]:
        sel = truth == k
        rows.append(f"| {k} | {int(sel.sum())} | {len({a.source for a in alerts if a.truth == k and a.source})} | "
                    + " | ".join(f"{np.mean(label[sel] == c):.2f}" for c in CLASS_NAMES)
                    + f" | {np.median(score[sel]):.3f} | {np.mean(score[sel] > 0.99):.2f} |")
    real = np.isin(truth, ["SN", "variable_star", "mover"])
    acc = float(np.mean(label[real] == truth[real])) if real.any() else float("nan")
    return rows, acc, [int(i) for i in np.argsort(-score, kind="stable")[:20]]


def _top10(alerts: list[Alert], top: list[int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in Counter(alerts[i].truth for i in top[:10]).most_common())


def report(alerts: list[Alert], frames: int, command: str, seconds: float, versions: str,
           compare: tuple[str, LightCurveClassifier, AnomalyModel] | None = None) -> str:
    """The Markdown section; ``compare`` (name, classifier, anomaly model) scores the same rows again."""
    label = np.array([a.label for a in alerts])
    score = np.array([a.anomaly for a in alerts])
    rows, acc, top = _kind_table(alerts, label, score)
    feats = ("ndet", "nulim", "duration", "frac_negative", "amplitude", "rise_rate", "decline_rate",
             "reduced_chi2")
    top_rows = [f"| {r + 1} | {score[i]:.4f} | {alerts[i].truth} | {label[i]} | "
                + " | ".join(_fmt(alerts[i].features.get(f)) for f in feats) + " |" for r, i in enumerate(top)]
    other: list[str] = []
    if compare is not None and alerts:
        name, clf, anom = compare
        x = np.stack([a.x for a in alerts])
        c_label = np.array(CLASS_NAMES)[np.argmax(clf.predict_proba(x), axis=1)]
        c_rows, c_acc, c_top = _kind_table(alerts, c_label, anom.score(x))
        other = [f"The same alerts (same features) scored by {name}: accuracy on the real kinds {c_acc:.2f}; "
                 f"top 10 anomalies by truth: {_top10(alerts, c_top)}.", "", *c_rows, ""]
    return "\n".join([
        SECTION, "",
        f"Models {versions}, on {frames} science frames of the pixel simulator through `process_frame` (with "
        "forced photometry from a `DifferenceStore`) and `associate_and_score` (`bench/lightcurves.py`; one "
        "band r, one telescope, nightly epochs after 3 reference epochs, plus a follow-up visit 0.02 d after "
        "each science epoch; default `SimConfig` populations scaled to the frame area). Every candidate is "
        "an alert; truth within 2 px (transient -> SN, variable -> variable_star, moving -> mover, "
        "unmatched -> bogus).", "",
        f"Command: `{command}` (git {git_rev()}); {seconds:.0f} s; {machine()}.", "",
        f"Rows: truth; columns: fraction predicted as each class, then the anomaly score. Accuracy on the "
        f"real kinds (SN, variable_star, mover): {acc:.2f}. Top 10 anomalies by truth: {_top10(alerts, top)}.", "",
        *rows, "",
        *other,
        "The 20 highest anomaly scores:", "",
        "| rank | anomaly | truth | label | " + " | ".join(feats) + " |",
        "|" + "---|" * (len(feats) + 4),
        *top_rows, "",
    ])


def write(section: str, path: Path = REPORT) -> None:
    """Replace the section (up to the next ``## `` heading) or append it."""
    text = path.read_text() if path.exists() else ""
    pattern = re.escape(SECTION) + r"\n.*?(?=\n## |\Z)"
    if re.search(pattern, text, flags=re.S):
        text = re.sub(pattern, lambda _: section.rstrip() + "\n", text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--fields", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=9, help="epochs per field, 3 of them for the reference")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--no-followup", action="store_true", help="no follow-up visit after each science epoch")
    ap.add_argument("--compare", metavar="DIR", help="also score the same alerts with the light-curve "
                    "classifier and anomaly model of this folder, one of each (e.g. the previous models)")
    ap.add_argument("--write", action="store_true", help="write the section of docs/lightcurve-report/README.md")
    a = ap.parse_args()
    command = (f"python -m bench.lightcurves --size {a.size} --fields {a.fields} --epochs {a.epochs} "
               f"--seed {a.seed}" + (" --no-followup" if a.no_followup else "")
               + (f" --compare {a.compare}" if a.compare else "") + (" --write" if a.write else ""))
    t0 = time.perf_counter()
    models = ScoreModels.load(openngc="")
    alerts, frames = run(a.size, a.fields, a.epochs, a.seed, not a.no_followup, models)
    compare = None
    if a.compare:
        compare = (f"the models of `{a.compare}`", *previous_models(a.compare))
    text = report(alerts, frames, command, time.perf_counter() - t0,
                  f"`{models.lcclass.version}` and `{models.anomaly.version}`", compare)
    print(text)
    if a.write:
        write(text)


if __name__ == "__main__":
    main()
