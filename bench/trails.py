"""Trails among a frame's candidates: how many of those on a satellite trail the score stage marks.

    OMP_NUM_THREADS=1 python -m bench.trails [--fields 12] [--seed 0]

Simulated 1024^2 fields (``broker.simulate``, seeing drawn in 1.8-4.5 px) get a reference from
three epochs; two science epochs each get the training set's science artifacts with more trails
(``broker.training.stress.add_science_artifacts``: on average 1.5 bright and 1 faint satellite
trail and 0.5 glinting satellite per frame, with bleeds, hot pixels and bad columns), go through
``broker.pipeline.process_frame`` and are scored by the default real/bogus model. Truth: a
candidate within 2 FWHM of a trail or glint track is on a trail; one within 2 px of an injected
transient is real. The score stage's :func:`broker.context.trail_matches` marks candidates; the
table counts the marked ones among those on a trail, among the rest, among the real transients,
and among the trail candidates the model passes (rb >= 0.5).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from broker.context import trail_matches
from broker.pipeline import FixedReference, process_frame
from broker.realbogus import RealBogusClassifier
from broker.reference import ReferenceConfig, build_reference
from broker.simulate import SimConfig, SkySimulator
from broker.training.settings import TrainingSetConfig
from broker.training.stress import add_science_artifacts

#: Science artifacts of the measured frames: the training set's, with more trails.
STRESS = TrainingSetConfig(trails_per_frame=1.5, faint_trails_per_frame=1.0, glints_per_frame=0.5)


def _segment_distance(x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Distance (px) of points to the segment (x0, y0)-(x1, y1)."""
    d = np.array([x1 - x0, y1 - y0])
    length = float(np.hypot(*d))
    u = d / length
    t = np.clip((x - x0) * u[0] + (y - y0) * u[1], 0.0, length)
    return np.hypot(x - (x0 + t * u[0]), y - (y0 + t * u[1]))


def frame_counts(seed: int, model: RealBogusClassifier) -> list[dict]:
    """Counts of two science epochs of field ``seed``."""
    rng = np.random.default_rng(seed)
    fwhm = float(rng.uniform(1.8, 4.5))
    sim = SkySimulator(SimConfig(shape=(1024, 1024), fwhm_range=(fwhm, 1.3 * fwhm), satellite_probability=0.0),
                       seed=seed)
    ref = build_reference([sim.frame("F000", "r", e)[0] for e in range(3)], ReferenceConfig(n_frames=3))
    out = []
    for epoch in (3, 4):
        frame, truth = sim.frame("F000", "r", epoch)
        tracks = [a for a in add_science_artifacts(frame, truth.fwhm, truth.sky, STRESS, rng) if a.kind == "satellite"]
        cands = process_frame(frame, FixedReference(ref)).candidates
        model.score_candidates(cands)
        x = np.array([c.detection.x for c in cands])
        y = np.array([c.detection.y for c in cands])
        marked = np.zeros(len(cands), bool)
        marked[list(trail_matches([c.detection for c in cands], frame.shape, frame.meta.frame_id))] = True
        on = np.zeros(len(cands), bool)
        for t in tracks:
            on |= _segment_distance(x, y, t.x0, t.y0, t.x1, t.y1) < 2.0 * truth.fwhm
        real = np.zeros(len(cands), bool)
        for inj in truth.of_kind("transient"):
            real |= np.hypot(x - inj.x, y - inj.y) < 2.0
        passed = np.array([c.rb is not None and c.rb >= 0.5 for c in cands], bool)
        out.append({"seed": seed, "epoch": epoch, "tracks": len(tracks), "candidates": len(cands),
                    "on": int(on.sum()), "on_marked": int((on & marked).sum()),
                    "off": int((~on).sum()), "off_marked": int((~on & marked).sum()),
                    "real": int(real.sum()), "real_marked": int((real & marked).sum()),
                    "on_passed": int((on & passed).sum()), "on_passed_marked": int((on & passed & marked).sum())})
        print(out[-1], flush=True)
    return out


def table(rows: list[dict]) -> str:
    """The summed counts as a Markdown table."""
    tot = {k: sum(r[k] for r in rows) for k in rows[0] if k not in ("seed", "epoch")}

    def frac(a: str, b: str) -> str:
        return f"{tot[a]} / {tot[b]} ({tot[a] / max(tot[b], 1):.0%})"

    return "\n".join([
        f"{len(rows)} frames, {tot['tracks']} trails and glint tracks, {tot['candidates']} candidates.", "",
        "| candidates | marked as on a trail |", "|---|---|",
        f"| on a trail or glint track | {frac('on_marked', 'on')} |",
        f"| of those, passed by the real/bogus model (rb >= 0.5) | {frac('on_passed_marked', 'on_passed')} |",
        f"| elsewhere | {frac('off_marked', 'off')} |",
        f"| injected transients | {frac('real_marked', 'real')} |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fields", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="first field's seed")
    parser.add_argument("--out", type=Path, default=None, help="write the per-frame counts (JSON)")
    args = parser.parse_args()
    model = RealBogusClassifier.load()
    rows = [r for s in range(args.seed, args.seed + args.fields) for r in frame_counts(s, model)]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
