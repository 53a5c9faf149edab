"""Which anomaly method: the candidates compared over several independent simulations.

    python -m bench.anomaly_methods [--runs 4] [--n-objects 2000]

One simulation gives a noisy verdict: a single long-lived recurring artefact with an unusual context
adds dozens of alerts to the top 100, and 200 rare objects give a recovery within +-3 points. So
each run ``r`` draws its own training alerts (ordinary objects of seed ``100 r + 3000``) and its own
evaluation streams (:func:`broker.training.lightcurves._report_streams` of seed ``100 r``: mixed
and season-only surveys, rare objects at 0.5 % of the objects), fits every candidate on the
training alerts and evaluates it with :func:`broker.training.lightcurves.anomaly_evaluation`.
Bogus at the top are counted in alerts and in objects.

Candidates: HBOS per class, HBOS plus the attribute-wise conditional term (gradient-boosted
regressors as in :mod:`bench.anomaly_limits`, or the ridge regressions on a linear or quadratic
basis of :class:`broker.anomaly.AnomalyConfig`), the mean distance to the k nearest training alerts
of each class (alone, or averaged with anomaly-v5's class CDFs), isolation forests per class (physical + context
features, or all features) and one isolation forest for all classes over all features (Fink's
set-up).

Prints a Markdown table of the mean and the range over the runs. Needs the ``[train]`` extra
(scikit-learn). About 8 minutes per run on 2 cores (33 min for 4 runs); with ``--cache`` the
second call skips the simulation (about 20 s per run for the ridge candidates).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.anomaly_limits import conditional_model, knn_model
from bench.common import git_rev, machine
from broker.anomaly import AnomalyConfig, fit_anomaly
from broker.lightcurve import ALL_FEATURE_NAMES
from broker.training.lightcurves import (
    AlertTable,
    _report_streams,
    alert_stream,
    alert_table,
    anomaly_evaluation,
    simulate_objects,
)

#: HBOS per class without the conditional term (anomaly-v3's method).
PLAIN = AnomalyConfig(conditional_weight=0.0)
#: Candidate name -> function of the training alerts returning a scored model.
CANDIDATES: dict[str, Callable[[AlertTable], Any]] = {
    "HBOS per class": lambda t: fit_anomaly(t.x, t.kind, PLAIN),
    "HBOS + 0.5 x conditional term, gradient-boosted": lambda t: conditional_model(
        fit_anomaly(t.x, t.kind, PLAIN), t, 0.5),
    "HBOS + 0.5 x conditional term, linear": lambda t: fit_anomaly(
        t.x, t.kind, AnomalyConfig(conditional_weight=0.5, conditional_degree=1)),
    "HBOS + 0.5 x conditional term, quadratic (anomaly-v5)": lambda t: fit_anomaly(
        t.x, t.kind, AnomalyConfig(conditional_weight=0.5, conditional_degree=2)),
    "kNN per class (k = 5)": lambda t: knn_model(fit_anomaly(t.x, t.kind, PLAIN), t),
    "mean of anomaly-v5's and kNN's class CDFs": lambda t: knn_model(fit_anomaly(t.x, t.kind), t, blend=True),
    "isolation forest per class, physical + context": lambda t: fit_anomaly(
        t.x, t.kind, AnomalyConfig(method="iforest")),
    "isolation forest per class, all features": lambda t: fit_anomaly(
        t.x, t.kind, AnomalyConfig(method="iforest", features=ALL_FEATURE_NAMES)),
    "one isolation forest, all features (Fink)": lambda t: fit_anomaly(
        t.x, None, AnomalyConfig(method="iforest", per_class=False, features=ALL_FEATURE_NAMES)),
}
_FIELDS = ("x", "kind", "object_id", "survey")
#: Figures collected per candidate, stream and run.
FIGURES = ("rare_recovered", "bogus_in_top100", "bogus_objects_in_top100")


def _tables(run: int, n_objects: int, cache: Path | None) -> list[AlertTable]:
    """Training alerts and the four report streams of run ``run``, read from or written to ``cache``."""
    path = cache / f"run{run}-{n_objects}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as a:
            return [AlertTable(*(a[f"{i}_{f}"] for f in _FIELDS)) for i in range(5)]
    tables = [alert_table(alert_stream(simulate_objects(n_objects, 100 * run + 3000))),
              *_report_streams(100 * run, n_objects)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"{i}_{f}": getattr(t, f) for i, t in enumerate(tables) for f in _FIELDS})
    return tables


def run_once(run: int, n_objects: int, names: list[str],
             cache: Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Figures of the candidates ``names`` on run ``run``'s training alerts and streams."""
    train, table, rare, season, rare_season = _tables(run, n_objects, cache)
    streams = {"mixed": (table, rare), "season": (season, rare_season)}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        model = CANDIDATES[name](train)
        out[name] = {}
        for stream, (t, r) in streams.items():
            ev = anomaly_evaluation(model, 0, n_objects, table=t, rare=r)
            out[name][stream] = {f: float(ev[f]) for f in FIGURES}
    return out


def _cell(values: list[float], percent: bool) -> str:
    a = np.asarray(values)
    if percent:
        return f"{a.mean():.1%} ({a.min():.0%}-{a.max():.0%})"
    return f"{a.mean():.1f} ({a.min():.0f}-{a.max():.0f})"


def markdown_rows(results: list[dict[str, dict[str, dict[str, float]]]]) -> list[str]:
    """Markdown rows: per candidate and stream, mean (min-max) over the runs."""
    lines = ["| method | stream | rare in top 1 % | bogus alerts in top 100 | bogus objects in top 100 |",
             "|---|---|---|---|---|"]
    for name in results[0]:
        for stream in ("mixed", "season"):
            cells = [_cell([r[name][stream][f] for r in results], f == "rare_recovered")
                     for f in FIGURES]
            lines.append(f"| {name} | {stream} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--n-objects", type=int, default=2000)
    ap.add_argument("--only", default="", help="evaluate the candidates whose name contains this")
    ap.add_argument("--cache", type=Path, help="folder keeping the simulated alert tables between calls")
    args = ap.parse_args(argv)
    names = [n for n in CANDIDATES if args.only in n]
    t0 = time.perf_counter()
    results = []
    for run in range(args.runs):
        results.append(run_once(run, args.n_objects, names, args.cache))
        print(f"run {run} done, {time.perf_counter() - t0:.0f} s", flush=True)
        print("\n".join(markdown_rows(results[-1:])[2:]), flush=True)
    print(f"\nMachine: {machine()}; git {git_rev()}; {time.perf_counter() - t0:.0f} s. Command: "
          f"`python -m bench.anomaly_methods --runs {args.runs} --n-objects {args.n_objects}"
          + (f" --only '{args.only}'" if args.only else "") + "`\n")
    print("\n".join(markdown_rows(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
