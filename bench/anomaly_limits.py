"""What limits the anomaly score: the shipped method, its variants and a supervised ceiling.

    python -m bench.anomaly_limits [--seed 0] [--n-objects 2000] [--n-rare-train 400]

On the light-curve report's streams (:func:`broker.training.lightcurves._report_streams`: the
mixed and the season-only surveys, ordinary objects of seed ``seed + 2000``, rare ones of
``seed + 2001``), fitted on the ordinary alerts of seed ``seed + 3000`` (as the report's method
comparison), four scores are evaluated with
:func:`broker.training.lightcurves.anomaly_evaluation` (rare objects with an alert in the top 1 %,
bogus alerts in the top 100):

- ``hbos``: HBOS per class without the conditional term (anomaly-v3's method), one density per
  ordinary class, each feature on its own;
- ``shipped``: the same plus the quadratic ridge conditional term of
  :class:`broker.anomaly.AnomalyConfig` (anomaly-v4);
- ``hbos + conditional``: HBOS plus, per class, an attribute-wise conditional term (Paulheim &
  Meusel 2015, "ALSO") with gradient-boosted regressors: each scaled feature is predicted from the
  others by a regressor fitted on that class, and the score adds sum_j log(1 + (residual_j /
  MAD_j)^2) times ``--weight``, so that an unusual *combination* of individually common values
  counts; per-class CDFs and the minimum over classes as in :class:`broker.anomaly.AnomalyModel`;
- ``supervised ceiling``: a random forest that has *seen* the rare classes (``--n-rare-train``
  rare objects of seed ``seed + 5001`` against the ordinary training alerts, balanced), scored by
  its rare-class probability. It is not an anomaly score (it knows what to look for); it bounds
  how separable the rare classes are with the alert's features.

Prints a Markdown table; the figures are recorded in ``docs/notes/anomaly-experiments.md``. Needs
the ``[train]`` extra (scikit-learn). About 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import git_rev, machine
from broker.anomaly import AnomalyConfig, AnomalyModel, class_cdf, fit_anomaly
from broker.simulate.lightcurves import RARE_CLASSES
from broker.training.lightcurves import (
    AlertTable,
    _report_streams,
    alert_stream,
    alert_table,
    anomaly_evaluation,
    simulate_objects,
)


class _Scored:
    """The interface :func:`anomaly_evaluation` needs: ``raw_score`` and ``score`` of rows."""

    def __init__(self, raw: Callable[[np.ndarray], np.ndarray]) -> None:
        self.raw_score = raw
        self.score = raw


def conditional_model(base: AnomalyModel, train: AlertTable, weight: float) -> _Scored:
    """HBOS per class plus ``weight`` x the attribute-wise conditional term (module docstring)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    groups = list(base.metadata["groups"])
    z_train = base._prepare(train.x)
    regressors: dict[tuple[int, int], tuple[Any, float]] = {}
    for k, g in enumerate(groups):
        zg = z_train[train.kind == g]
        for j in range(zg.shape[1]):
            if np.ptp(zg[:, j]) < 1e-9:
                continue
            others = np.delete(zg, j, axis=1)
            reg = HistGradientBoostingRegressor(max_iter=100, min_samples_leaf=40,
                                                random_state=0).fit(others, zg[:, j])
            mad = float(np.median(np.abs(zg[:, j] - reg.predict(others))))
            regressors[(k, j)] = (reg, 1.4826 * mad + 1e-3)

    def per_class(x: np.ndarray) -> np.ndarray:
        z = base._prepare(x)
        out = np.empty((len(z), len(groups)))
        for k in range(len(groups)):
            out[:, k] = base._class_scores(z, k)
            for (kk, j), (reg, scale) in regressors.items():
                if kk == k:
                    resid = z[:, j] - reg.predict(np.delete(z, j, axis=1))
                    out[:, k] += weight * np.log1p((resid / scale) ** 2)
        return out

    knots = _class_cdfs(per_class(train.x), train.kind, groups)

    def raw(x: np.ndarray) -> np.ndarray:
        p = per_class(x)
        return np.column_stack([class_cdf(p[:, k], kn) for k, kn in enumerate(knots)]).min(axis=1)
    return _Scored(raw)


def _class_cdfs(per: np.ndarray, kind: np.ndarray, groups: list[str]) -> list[np.ndarray]:
    """Each class's CDF knots (1001,) of its own training alerts' per-class raw scores ``per`` (N, K)."""
    q = np.linspace(0.0, 1.0, 1001)
    return [np.quantile(per[kind == g, k], q) for k, g in enumerate(groups)]


def knn_model(base: AnomalyModel, train: AlertTable, k: int = 5, blend: bool = False) -> _Scored:
    """Per class, the mean distance to the class's ``k`` nearest training alerts (scaled as ``base``).

    Each class's distance is mapped to its CDF over the class's own training alerts (each left out
    of its own neighbours), the raw anomaly is the smallest over classes, as in ``base``. With
    ``blend`` each class's value is the mean of the kNN CDF and ``base``'s own class CDF.
    """
    from sklearn.neighbors import NearestNeighbors

    groups = list(base.metadata["groups"])
    z_train = base._prepare(train.x)
    q = np.linspace(0.0, 1.0, 1001)
    nns, knots = [], []
    for g in groups:
        zg = z_train[train.kind == g]
        nns.append(NearestNeighbors(n_neighbors=k + 1).fit(zg))
        knots.append(np.quantile(nns[-1].kneighbors(zg)[0][:, 1:].mean(axis=1), q))  # self left out

    def raw(x: np.ndarray) -> np.ndarray:
        z = base._prepare(x)
        per = np.column_stack([class_cdf(nn.kneighbors(z, n_neighbors=k)[0].mean(axis=1), kn)
                               for nn, kn in zip(nns, knots, strict=True)])
        if blend:
            per = 0.5 * (per + np.column_stack([class_cdf(base._class_scores(z, j), kn)
                                                for j, kn in enumerate(base.class_knots)]))
        return per.min(axis=1)
    return _Scored(raw)


def supervised_ceiling(base: AnomalyModel, train: AlertTable, rare_train: AlertTable) -> _Scored:
    """A random forest trained on rare against ordinary alerts (classes balanced)."""
    from sklearn.ensemble import RandomForestClassifier

    x = np.vstack([base._prepare(train.x), base._prepare(rare_train.x)])
    y = np.r_[np.zeros(len(train)), np.ones(len(rare_train))]
    w = np.r_[np.ones(len(train)), np.full(len(rare_train), len(train) / len(rare_train))]
    forest = RandomForestClassifier(200, min_samples_leaf=5, n_jobs=2, random_state=0)
    forest.fit(x, y, sample_weight=w)
    jitter = np.random.default_rng(0)
    return _Scored(lambda rows: forest.predict_proba(base._prepare(rows))[:, 1]
                   + 1e-9 * jitter.random(len(rows)))  # ties broken at random


def _row(name: str, model: Any,
         streams: dict[str, tuple[AlertTable, AlertTable]], n_objects: int) -> str:
    cells = []
    for table, rare in streams.values():
        ev = anomaly_evaluation(model, 0, n_objects, table=table, rare=rare)
        by = ", ".join(f"{c} {v:.0%}" for c, v in ev["rare_recovered_by_class"].items())
        cells += [f"{ev['rare_recovered']:.1%} ({by})",
                  f"{ev['bogus_in_top100']} ({ev['bogus_objects_in_top100']} objects)"]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-objects", type=int, default=2000)
    ap.add_argument("--n-rare-train", type=int, default=400)
    ap.add_argument("--weight", type=float, default=0.5, help="weight of the conditional term")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    train = alert_table(alert_stream(simulate_objects(args.n_objects, args.seed + 3000)))
    rare_train = alert_table(alert_stream(simulate_objects(args.n_rare_train, args.seed + 5001,
                                                           RARE_CLASSES, prefix="rare-train")))
    table, rare, season, rare_season = _report_streams(args.seed, args.n_objects)
    streams = {"mixed": (table, rare), "season": (season, rare_season)}
    base = fit_anomaly(train.x, train.kind, AnomalyConfig(conditional_weight=0.0))
    rows = [_row("HBOS per class (anomaly-v3's method)", base, streams, args.n_objects),
            _row("HBOS + 0.5 x quadratic conditional term (shipped, anomaly-v5)",
                 fit_anomaly(train.x, train.kind), streams, args.n_objects),
            _row(f"HBOS + {args.weight:g} x gradient-boosted conditional term",
                 conditional_model(base, train, args.weight), streams, args.n_objects),
            _row("supervised ceiling (has seen the rare classes)",
                 supervised_ceiling(base, train, rare_train), streams, args.n_objects)]
    print(f"Machine: {machine()}; git {git_rev()}; {time.perf_counter() - t0:.0f} s. "
          f"Command: `python -m bench.anomaly_limits --seed {args.seed} --n-objects "
          f"{args.n_objects} --n-rare-train {args.n_rare_train} --weight {args.weight:g}`\n")
    print("| method | rare in top 1 %, mixed | bogus in top 100, mixed | rare in top 1 %, season "
          "| bogus in top 100, season |\n|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
