"""Training-set generator speed, side by side: the same field from two checkouts, alternating.

Each run generates field 0 of the default :class:`~broker.training.settings.TrainingSetConfig`
(seed 0) in a fresh single-threaded process, and prints its time, candidates and a hash of the
triplets and labels, so that a speed change can be read as a ratio and checked for sameness::

    git worktree add /tmp/base <commit>
    python -m bench.generator /tmp/base . --repeats 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from bench.common import machine

# ``broker.training.generate`` has both names in every version of the code, so a base checkout
# from before the generator's split into settings / labels / stress / shards runs it as well.
_FIELD = """
import hashlib, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from broker.training.generate import TrainingSetConfig, field_candidates
t = time.perf_counter()
out = field_candidates(TrainingSetConfig(seed=0), 0)
dt = time.perf_counter() - t
h = hashlib.sha1(np.stack([c.triplet for c in out]).tobytes()
                 + bytes(c.label + 1 for c in out)).hexdigest()[:12]
print(f"{dt:.1f} {len(out)} {h}")
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="+", help="checkouts to compare (the first is the base)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    for tree in args.trees:  # else the subprocess would silently import the installed broker
        if not os.path.isfile(os.path.join(tree, "broker", "training", "generate.py")):
            p.error(f"{tree}: not a checkout of this project (no broker/training/generate.py)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times: dict[str, list[float]] = {t: [] for t in args.trees}
    print(machine())
    for _ in range(args.repeats):
        for tree in args.trees:
            r = subprocess.run([sys.executable, "-c", _FIELD, os.path.abspath(tree)],
                               capture_output=True, text=True, env=env, check=True)
            dt, n, h = r.stdout.split()
            times[tree].append(float(dt))
            print(f"{tree}: {dt} s, {n} candidates, hash {h}")
    base = min(times[args.trees[0]])
    for tree, ts in times.items():
        print(f"{tree}: best {min(ts):.1f} s, {min(ts) / base:.2f}x the base")


if __name__ == "__main__":
    main()
