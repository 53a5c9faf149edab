"""Active learning: the anomaly score after an operator labels the top of another week's streams.

    python -m bench.anomaly_feedback [--runs 2] [--labels 20,50,100,200] [--batch 10] [--cache DIR]

Run ``r`` (the tables of :mod:`bench.anomaly_methods`, same ``--cache``): the base model
(anomaly-v5's method) is fitted on run ``r``'s training alerts. A simulated operator works on
another run's streams, the *labelling week* (run ``r + 1``'s mixed and season-only streams, each
with its rare objects injected at the evaluation's rate, 0.5 % of the objects): in rounds, the
``batch`` highest-scored objects not yet labelled are looked at, each at its highest-scored alert,
and labelled as a person would (an injected rare object "interesting", anything else "not"); the
model is refitted with every label so far (:func:`broker.anomaly_feedback.fit_feedback`, from the
base model). The models are evaluated on run ``r``'s own streams, which no label came from
(:func:`broker.training.lightcurves.anomaly_evaluation`).

Two questions: how far do the labels move the rare-event recovery and the bogus at the top, and
does the gain reach kinds of rare event nobody labelled? For the second, each rare kind in turn is
left out of the labelling week (as if it had never happened before) and its recovery on the
evaluation streams is compared with the base model's.

Prints Markdown tables (means over the runs). Needs no scikit-learn once the tables are cached.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.anomaly_methods import _tables
from bench.common import git_rev, machine
from broker.anomaly import AnomalyConfig, AnomalyModel, fit_anomaly
from broker.anomaly_feedback import FeedbackConfig, fit_feedback
from broker.simulate.lightcurves import RARE_CLASSES
from broker.training.lightcurves import AlertTable, anomaly_evaluation

RARE_RATE = 0.005  # rare objects per ordinary object in a stream (the evaluation's)


@dataclass(frozen=True)
class Week:
    """A labelling week: every alert of its streams, the object and kind of each."""

    x: np.ndarray
    kind: np.ndarray
    object_id: np.ndarray

    def without(self, kind: str) -> Week:
        """The week without the objects of ``kind``."""
        keep = self.kind != kind
        return Week(self.x[keep], self.kind[keep], self.object_id[keep])


def labelling_week(tables: list[AlertTable]) -> Week:
    """Run tables' mixed and season streams with their first 0.5 % rare objects injected."""
    _, mixed, rare, season, rare_season = tables
    parts = []
    for i, (t, r) in enumerate(((mixed, rare), (season, rare_season))):
        n_inj = max(1, round(RARE_RATE * len(np.unique(t.object_id))))
        inj = np.isin(r.object_id, np.unique(r.object_id)[:n_inj])
        ids = np.concatenate([t.object_id, r.object_id[inj]])
        parts.append((np.vstack([t.x, r.x[inj]]), np.concatenate([t.kind, r.kind[inj]]),
                      np.char.add(f"{i}:", ids.astype(str))))
    return Week(*(np.concatenate([p[j] for p in parts]) for j in range(3)))


def operator_labels(base: AnomalyModel, train: AlertTable, week: Week, counts: list[int], batch: int,
                    config: FeedbackConfig) -> dict[int, AnomalyModel]:
    """The model refitted after each number of labels in ``counts``, ``batch`` objects looked at a round."""
    looked: dict[str, int] = {}  # object -> row of the alert looked at
    models, current = {0: base}, base
    while len(looked) < max(counts):
        want = min(len(looked) + batch, min(c for c in counts if c > len(looked)))
        for i in np.argsort(-current.raw_score(week.x), kind="stable"):
            looked.setdefault(str(week.object_id[i]), int(i))
            if len(looked) >= want:
                break
        rows = np.fromiter(looked.values(), dtype=np.int64)
        current = fit_feedback(base, train.x, train.kind, week.x[rows], np.isin(week.kind[rows], RARE_CLASSES),
                               config)
        if len(looked) in counts:
            models[len(looked)] = current
    return models


FIGURES = ("rare_recovered", "bogus_objects_in_top100")


def run_once(run: int, week_run: int, counts: list[int], batch: int, n_objects: int, cache: Path | None,
             config: FeedbackConfig) -> dict:
    """Figures on run ``run``'s streams by number of labels (from run ``week_run``), and with each kind held out."""
    train, mixed, rare, season, rare_season = _tables(run, n_objects, cache)
    week = labelling_week(_tables(week_run, n_objects, cache))
    base = fit_anomaly(train.x, train.kind, AnomalyConfig())
    streams = {"mixed": (mixed, rare), "season": (season, rare_season)}

    def evaluate(model: AnomalyModel) -> dict[str, dict]:
        return {s: anomaly_evaluation(model, 0, n_objects, table=t, rare=r) for s, (t, r) in streams.items()}

    by_count = operator_labels(base, train, week, counts, batch, config)
    held = {kind: evaluate(operator_labels(base, train, week.without(kind), [max(counts)], batch, config)[max(counts)])
            for kind in RARE_CLASSES}
    return {"labels": {n: evaluate(m) for n, m in by_count.items()}, "held_out": held,
            "week_rare_objects": len(np.unique(week.object_id[np.isin(week.kind, RARE_CLASSES)]))}


def _mean(results: list[dict], *path: object) -> float:
    """Mean over the runs of the figure at ``path`` in each run's results."""
    values = []
    for r in results:
        for key in path:
            r = r[key]
        values.append(float(r))  # type: ignore[arg-type]
    return float(np.mean(values))


def markdown(results: list[dict], counts: list[int]) -> list[str]:
    """Tables: figures by number of labels; per-kind recovery with all kinds labelled and with the kind held out."""
    lines = ["| labels | rare in top 1 %, mixed | season | bogus objects in top 100, mixed | season |",
             "|---|---|---|---|---|"]
    for n in [0, *counts]:
        rec, bogus = ([_mean(results, "labels", n, s, f) for s in ("mixed", "season")] for f in FIGURES)
        lines.append(f"| {n} | {rec[0]:.1%} | {rec[1]:.1%} | {bogus[0]:.1f} | {bogus[1]:.1f} |")
    top = max(counts)
    lines += ["", f"| rare kind, mixed / season | no labels | {top} labels | {top} labels, this kind never labelled |",
              "|---|---|---|---|"]
    for kind in RARE_CLASSES:
        cells = [" / ".join(f"{_mean(results, *where, s, 'rare_recovered_by_class', kind):.0%}"
                            for s in ("mixed", "season"))
                 for where in (("labels", 0), ("labels", top), ("held_out", kind))]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2, help="evaluation runs 0..runs-1; run r labels run r+1's week")
    ap.add_argument("--first", type=int, default=0, help="first evaluation run")
    ap.add_argument("--labels", default="20,50,100,200", help="numbers of labels evaluated")
    ap.add_argument("--batch", type=int, default=10, help="objects looked at per round")
    ap.add_argument("--prior", type=float, default=FeedbackConfig.prior)
    ap.add_argument("--n-objects", type=int, default=2000)
    ap.add_argument("--cache", type=Path, help="folder of the simulated tables (bench.anomaly_methods --cache)")
    args = ap.parse_args(argv)
    counts = sorted(int(c) for c in args.labels.split(","))
    config = FeedbackConfig(prior=args.prior)
    t0 = time.perf_counter()
    results = []
    for run in range(args.first, args.first + args.runs):
        results.append(run_once(run, run + 1, counts, args.batch, args.n_objects, args.cache, config))
        print(f"run {run} done, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nMachine: {machine()}; git {git_rev()}; {time.perf_counter() - t0:.0f} s. Command: "
          f"`python -m bench.anomaly_feedback --runs {args.runs} --first {args.first} --labels {args.labels} "
          f"--batch {args.batch} --prior {args.prior}`\n")
    print(f"Rare objects in the labelling weeks: {[r['week_rare_objects'] for r in results]}\n")
    print("\n".join(markdown(results, counts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
