"""Real/bogus CNN throughput on the CPU: triplets/s at batch 1, 64, 256, FLOPs, share of peak.

Writes the ``realbogus`` section of BENCHMARKS.md::

    python -m bench.realbogus                # the default model, 1 and 2 threads
    python -m bench.realbogus --threads 2 --seconds 5 --models realbogus-v11 realbogus-v10

Inputs are normalised triplets (real ZTF ones when ``../shared/data`` is present, else
simulated stamps), scored through ``RealBogusClassifier.score`` (numpy in, numpy out), i.e.
what the classify stage pays per batch after normalisation; the normalisation itself is timed
separately. The machine's peak is estimated from /proc/cpuinfo (clock x FP32 FLOP/cycle: 32
with AVX2 FMA, 64 with AVX-512) and is only an order of magnitude: the 2 cores are shared.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import git_rev, machine, write_section
from broker.normalise import normalise_triplet
from broker.realbogus import DEFAULT_VERSION, RealBogusClassifier, ScoreConfig
from broker.training.data import synth_triplets
from broker.training.main import model_cost

BATCHES = (1, 64, 256)
#: Target of issue 4: triplets/s at batch 256 on the 2 cores.
TARGET_256 = 2000.0


def peak_gflops(cores: int) -> tuple[float, str]:
    """Rough FP32 peak (GFLOP/s) of ``cores`` cores and how it was estimated."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        mhz = max(float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info))
        flags = re.search(r"flags\s*:(.*)", info).group(1).split()
    except (OSError, ValueError, AttributeError):
        return float("nan"), "unknown"
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
    return cores * mhz / 1e3 * per_cycle, f"{cores} x {mhz:.0f} MHz x {per_cycle} FLOP/cycle"


def inputs(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``n`` normalised triplets and the raw ones they came from, with a description."""
    raw, _, _ = synth_triplets(min(n, 512), seed=0)
    x = np.stack([normalise_triplet(*t)[0] for t in raw])
    reps = -(-n // len(x))
    return np.tile(x, (reps, 1, 1, 1))[:n], raw, "simulated stamps (broker.training.synth_triplets)"


def rate(clf: RealBogusClassifier, x: np.ndarray, batch: int, seconds: float) -> float:
    """Triplets/s of ``clf.score`` on batches of ``batch`` for about ``seconds``."""
    xb = x[:batch]
    clf.score(xb)  # warm-up
    clf.score(xb)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        clf.score(xb)
        n += batch
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=[DEFAULT_VERSION])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch intra-op thread counts to measure")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    x, raw, src = inputs(max(BATCHES))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for t in raw[:256]:
        normalise_triplet(*t)
    norm_rate = 256 / (time.perf_counter() - t0)
    load = os.getloadavg()
    rows = []
    for m in dict.fromkeys(args.models):
        clf = RealBogusClassifier.load(m)
        cost = model_cost(clf.net)
        for th in args.threads:
            torch.set_num_threads(th)
            peak, how = peak_gflops(th)
            r = {b: rate(clf, x, b, args.seconds) for b in BATCHES}
            gf = r[256] * cost["mflops"] / 1e3
            rows.append(f"| `{clf.version}` | {clf.net.arch['name']} | {cost['n_params']:,} | "
                        f"{cost['mflops']:.2f} | {th} | " +
                        " | ".join(f"{r[b]:,.0f}" for b in BATCHES) +
                        f" | {gf:.1f} ({gf / peak:.0%} of {peak:.0f}) | "
                        f"{'met' if r[256] >= TARGET_256 else 'NOT met'} |")
    end_load = os.getloadavg()
    body = "\n".join([
        "## Real/bogus CNN throughput (CPU)", "",
        f"Machine: {machine()}; git {git_rev()}. 1-min load average {load[0]:.1f} at the start, "
        f"{end_load[0]:.1f} at the end (above {os.cpu_count()}: other work shared the cores, "
        "and the figures are lower bounds).",
        f"Inputs: {src}, already normalised; `RealBogusClassifier.score` (numpy in/out; an "
        f"input batch is run in forward passes of `ScoreConfig.batch_size` = "
        f"{ScoreConfig().batch_size}), "
        f"{args.seconds:.0f} s per point. FLOPs counted by `torch.utils.flop_counter."
        f"FlopCounterMode` (2 per multiply-add). Peak: FP32 estimate per thread count "
        f"({how.split(' x ', 1)[1]} per core).",
        "On an oversubscribed machine two intra-op threads wait on each other (batch 1 can "
        "fall to a few triplets/s): a busy pipeline should score with 1 thread per process.",
        f"Normalisation (`normalise_triplet`, one triplet at a time, 1 thread): "
        f"{norm_rate:,.0f} triplets/s.", "",
        "| model | network | parameters | MFLOP/triplet | threads | triplets/s @1 | @64 | @256 "
        f"| GFLOP/s @256 (share of peak) | target >= {TARGET_256:,.0f}/s @256 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        "Reproduce: `python -m bench.realbogus --models " + " ".join(args.models) + "`.",
    ])
    print(body)
    if not args.no_write:
        write_section("realbogus", body)
    return body


if __name__ == "__main__":
    main()
