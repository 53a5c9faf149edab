"""Per-telescope adaptation on a small telescope's real frames (issue 30): ``--labels`` measured.

    OMP_NUM_THREADS=1 python -m bench.telescope_adaptation [--data ../shared/data] [--out-dir build/adapt]

The MicroObservatory night of ``small_telescopes/EXOTIC_sampledata`` (11 frames of one field)
goes through the chain of :mod:`bench.small_telescopes`: the first three frames build the
reference, and each later frame gets point sources injected into its real pixels before it is
subtracted (a Moffat PSF of the frame's measured seeing, S/N log-uniform against the
background-limited PSF-flux noise, shot noise added). Candidates are labelled by construction,
standing in for an observer's vetting: real within 2 px of an injection (and positive), bogus
otherwise, since the field holds no known transient; candidates within 30" of HAT-P-32, in
transit that night, are left out. The candidates of frames 3-6 become a vetted labels file
(:mod:`broker.labelsfile`), the default model is fine-tuned on it with
:func:`broker.training.finetune.main_finetune` (``broker train-realbogus --labels``), and both
models score the candidates of frames 7-10, which the fine-tuning never saw. The first run
generates the fine-tuning's rehearsal and held-out simulated sets (``build/realbogus-mix-0``,
``build/realbogus-test-1``; a few minutes), later runs take about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.stats import sigma_clipped_stats

from bench.common import SHARED_DATA
from bench.small_telescopes import ingested
from broker.candidate import Candidate
from broker.config import PipelineConfig
from broker.frame import Frame
from broker.labelsfile import VettedLabel, write_labels
from broker.normalise import normalise_triplet
from broker.pipeline import process_frame
from broker.realbogus import RealBogusClassifier
from broker.reference import ReferenceStore
from broker.training.realpixels import moffat

FRAMES = "small_telescopes/EXOTIC_sampledata"
#: HAT-P-32 (RA, Dec, deg), in transit during these frames: a real change, left unlabelled.
TARGET = (31.0429, 46.6879)
N_REFERENCE, FIRST_HELD_OUT = 3, 7


def inject(frame: Frame, fwhm: float, n: int, snr: tuple[float, float], rng: np.random.Generator
           ) -> tuple[Frame, np.ndarray]:
    """``frame`` with ``n`` point sources added 40 px or more inside it, and their (x, y, S/N)."""
    data = frame.data.astype(np.float64)
    _, _, rms = sigma_clipped_stats(data, sigma=3, maxiters=5)
    noise = rms * np.sqrt(4 * np.pi) * fwhm / 2.3548  # background-limited PSF-flux noise
    gain = float(frame.meta.gain or 1.0)
    h = int(4 * fwhm) + 2
    out = []
    for _ in range(n):
        y, x = rng.uniform(40, data.shape[0] - 40), rng.uniform(40, data.shape[1] - 40)
        s = float(np.exp(rng.uniform(*np.log(snr))))
        yc, xc = int(y), int(x)
        src = s * noise * moffat((2 * h + 1, 2 * h + 1), y - yc + h, x - xc + h, fwhm)
        src += rng.normal(0.0, 1.0, src.shape) * np.sqrt(np.clip(src, 0, None) / gain)
        data[yc - h: yc + h + 1, xc - h: xc + h + 1] += src
        out.append((x, y, s))
    return dataclasses.replace(frame, data=data.astype(np.float32)), np.array(out)


def labelled_candidates(folder: Path, n_inject: int, snr: tuple[float, float], seed: int) -> list[dict]:
    """Every candidate of the frames after the reference, with its label and frame number."""
    config, rng, rows = PipelineConfig(), np.random.default_rng(seed), []
    with tempfile.TemporaryDirectory() as tmp:
        refs = ReferenceStore(Path(tmp) / "refs", config.reference)
        for k, path in enumerate(sorted(folder.glob("*.FITS"))):
            frame, quality = ingested(path, config)
            truth = np.zeros((0, 3))
            if k >= N_REFERENCE:
                frame, truth = inject(frame, quality.fwhm, n_inject, snr, rng)
            for c in process_frame(frame, refs, config.subtract, clean=not quality.flags).candidates:
                rows += _row(c, k, truth)
    return rows


def _row(c: Candidate, k: int, truth: np.ndarray) -> list[dict]:
    """The candidate's labelled row; none near the target."""
    det = c.detection
    if np.hypot((det.ra - TARGET[0]) * np.cos(np.radians(TARGET[1])), det.dec - TARGET[1]) * 3600 < 30:
        return []
    d = np.hypot(truth[:, 0] - det.x, truth[:, 1] - det.y)
    real = bool(len(d)) and d.min() < 2.0 and det.snr > 0
    return [{"frame": k, "cand_id": c.cand_id, "label": int(real), "snr": float(det.snr),
             "injected_snr": float(truth[np.argmin(d), 2]) if real else np.nan,
             "cutouts": (c.science, c.reference, c.difference)}]


def write_vetted(rows: list[dict], path: Path) -> int:
    """The rows as a vetted labels file (labeller: the construction)."""
    now = time.time()
    return write_labels(path, [VettedLabel(r["cand_id"], r["cand_id"], r["label"], *r["cutouts"],
                                           labeller="construction: injected (real) / static field (bogus)",
                                           labelled_at=now, snr=r["snr"], telescope="Cecilia") for r in rows])


def score_line(model: str, rows: list[dict]) -> str:
    """A table row: bogus candidates passed (>= 0.5) and injections kept, overall and by S/N."""
    scores = RealBogusClassifier.load(model).score(np.stack([normalise_triplet(*r["cutouts"])[0] for r in rows]))
    y = np.array([r["label"] for r in rows])
    s_inj = np.array([r["injected_snr"] for r in rows])
    kept = [(scores[m] >= 0.5).sum() for m in (y == 1, (y == 1) & (s_inj < 15), (y == 1) & (s_inj >= 15))]
    n = [m.sum() for m in (y == 1, (y == 1) & (s_inj < 15), (y == 1) & (s_inj >= 15))]
    return (f"| `{Path(model).stem}` | {(scores[y == 0] >= 0.5).sum()} / {(y == 0).sum()} | "
            + " | ".join(f"{k} / {m}" for k, m in zip(kept, n, strict=True)) + " |")


def main() -> None:
    from broker.training.finetune import main_finetune

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--out-dir", type=Path, default=Path("build/adapt"))
    parser.add_argument("--inject", type=int, default=30, help="point sources per frame")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if not (args.data / FRAMES).is_dir():
        parser.error(f"{args.data / FRAMES} not found: the real frames are in ../shared/data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.seterr(all="ignore")
        rows = labelled_candidates(args.data / FRAMES, args.inject, (6.0, 60.0), args.seed)
    train = [r for r in rows if r["frame"] < FIRST_HELD_OUT]
    held = [r for r in rows if r["frame"] >= FIRST_HELD_OUT]
    labels = args.out_dir / "labels.npz"
    write_vetted(train, labels)
    tuned = main_finetune(labels, version="realbogus-v11-cecilia", out_dir=args.out_dir)
    print(f"labels: {len(train)} candidates of frames {N_REFERENCE}-{FIRST_HELD_OUT - 1} "
          f"({sum(r['label'] for r in train)} injected); card: {tuned['card']}\n")
    print(f"Candidates of frames {FIRST_HELD_OUT}-10 ({len(held)}), scored >= 0.5:\n")
    print("| model | bogus passed | injections kept | S/N < 15 | S/N >= 15 |\n|---|---|---|---|---|")
    for model in ("realbogus-v11", tuned["weights"]):
        print(score_line(model, held))


if __name__ == "__main__":
    main()
