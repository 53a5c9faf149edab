"""Shard writing: labelled candidates streamed into balanced ``.npz`` shards and a manifest.

:class:`ShardWriter` keeps reals and bogus in two bounded buffers and writes half-real,
half-bogus shards (bogus taken round-robin over their kinds); :func:`write_training_set`
drives it over a stream of :class:`~broker.training.labels.LabelledCandidate` and keeps
``manifest.json`` (config, counts by kind, shard names, pipeline commit) up to date after every
shard, marking it complete at the end.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from broker.training.labels import LabelledCandidate
from broker.training.settings import TrainingSetConfig, config_dict

#: Default settings (frozen, shared).
_DEFAULT = TrainingSetConfig()


class ShardWriter:
    """Stream labelled candidates into balanced ``shard-XXXX.npz`` files, bounded memory.

    Reals and bogus wait in two buffers; each time both hold half a shard, a shard of half real,
    half bogus is written. Bogus are taken round-robin over their kinds, so that rare kinds
    (trails, bleeds, dipoles) are all used while the common ones (cosmic rays) fill the rest.
    A buffer over ``max_buffer`` drops a random member of its most common kind.

    Shards hold ``x`` (N, 3, 63, 63) float16 normalised triplets (|values| <=
    ``NormaliseConfig.clip``, where float16's spacing is at most 0.03, i.e. 0.6 % of a star's
    brightness above the soft knee), ``y`` (N,) uint8, ``kind`` (N,) str, ``group`` (N,) str,
    ``snr`` (N,) float32, ``reference`` (N,) str
    (:data:`~broker.training.settings.REFERENCE_STATES`).
    """

    def __init__(self, out_dir: str | Path, shard_size: int, seed: int, balance: bool = True,
                 max_buffer: int | None = None) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for old in self.out.glob("shard-*.npz"):
            old.unlink()
        self.shard_size, self.balance = shard_size, balance
        self.max_buffer = max_buffer or 2 * shard_size
        self.rng = np.random.default_rng(seed)
        self.buf: dict[int, list[LabelledCandidate]] = {0: [], 1: []}
        self.shards: list[str] = []
        self.seen: Counter = Counter()
        self.written: Counter = Counter()
        self.n_real = self.n_bogus = 0

    @property
    def n(self) -> int:
        """Candidates written so far."""
        return self.n_real + self.n_bogus

    def add(self, item: LabelledCandidate) -> None:
        """Take one candidate (an ambiguous one, label -1, is only counted); write a shard when the buffers allow."""
        self.seen[item.kind] += 1
        if item.label < 0:  # ambiguous: counted, not written
            return
        buf = self.buf[int(item.label)]
        buf.append(item)
        if len(buf) > self.max_buffer:  # drop a random member of the most common kind
            common = Counter(it.kind for it in buf).most_common(1)[0][0]
            idx = [i for i, it in enumerate(buf) if it.kind == common]
            buf.pop(int(self.rng.choice(idx)))
        half = self.shard_size // 2
        if not self.balance and len(self.buf[0]) + len(self.buf[1]) >= self.shard_size:
            self._write(self.buf[1] + self.buf[0])
            self.buf = {0: [], 1: []}
        elif self.balance and min(len(self.buf[0]), len(self.buf[1])) >= half:
            self._write(self._take(1, half) + self._take(0, half))

    def _take(self, label: int, n: int) -> list[LabelledCandidate]:
        """``n`` members of a buffer: random for reals, round-robin over kinds for bogus."""
        buf = self.buf[label]
        if label == 1:
            pick = set(self.rng.choice(len(buf), n, replace=False).tolist())
        else:
            by_kind: dict[str, list[int]] = {}
            for i in self.rng.permutation(len(buf)):
                by_kind.setdefault(buf[i].kind, []).append(int(i))
            pick, lists = set(), list(by_kind.values())
            while len(pick) < n:
                for lst in lists:
                    if lst and len(pick) < n:
                        pick.add(lst.pop())
        self.buf[label] = [it for i, it in enumerate(buf) if i not in pick]
        return [it for i, it in enumerate(buf) if i in pick]

    def _write(self, chunk: list[LabelledCandidate]) -> None:
        chunk = [chunk[i] for i in self.rng.permutation(len(chunk))]
        name = f"shard-{len(self.shards):04d}.npz"
        np.savez_compressed(
            self.out / name,
            x=np.stack([it.triplet for it in chunk]).astype(np.float16),
            y=np.array([it.label for it in chunk], dtype=np.uint8),
            kind=np.array([it.kind for it in chunk]),
            group=np.array([it.group for it in chunk]),
            snr=np.array([it.snr for it in chunk], dtype=np.float32),
            reference=np.array([it.reference for it in chunk]),
        )
        self.shards.append(name)
        self.written.update(it.kind for it in chunk)
        self.n_real += sum(it.label for it in chunk)
        self.n_bogus += sum(1 - it.label for it in chunk)

    def close(self, flush_partial: bool = True) -> None:
        """Write what is left as a last (balanced) shard."""
        if not flush_partial:
            return
        if self.balance:
            m = min(len(self.buf[0]), len(self.buf[1]))
            if m:
                self._write(self._take(1, m) + self._take(0, m))
        elif self.buf[0] or self.buf[1]:
            self._write(self.buf[1] + self.buf[0])
        self.buf = {0: [], 1: []}


def write_training_set(
    out_dir: str | Path,
    candidates: Iterator[LabelledCandidate],
    config: TrainingSetConfig = _DEFAULT,
    source: str = "pipeline",
    progress: bool = False,
) -> dict:
    """Balance and write candidates as ``shard-XXXX.npz`` + ``manifest.json`` (streamed).

    Stops reading ``candidates`` once ``config.target_n`` are written.

    Returns
    -------
    dict
        The manifest: source, seed, config, n / n_real / n_bogus, counts by kind written and
        seen (before balancing), shard names, wall time.
    """
    t0 = time.time()
    w = ShardWriter(out_dir, config.shard_size, config.seed, config.balance)
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task("[bold]training set[/] triplets written", total=config.target_n)
    n_shards = 0
    try:
        for item in candidates:
            w.add(item)
            if bar is not None:
                bar.update(task, completed=w.n)
            if len(w.shards) > n_shards:  # a usable manifest after every shard
                n_shards = len(w.shards)
                _write_manifest(out_dir, w, config, source, t0, complete=False)
            if w.n >= config.target_n:
                break
        else:
            w.close()
    finally:
        if bar is not None:
            bar.stop()
    return _write_manifest(out_dir, w, config, source, t0, complete=True)


def _git_commit() -> str:
    """``git describe`` of the code that made the set (labels depend on the detection code)."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).resolve().parent
                              ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_manifest(out_dir: str | Path, w: ShardWriter, config: TrainingSetConfig, source: str,
                    t0: float, complete: bool) -> dict:
    """Write ``manifest.json`` for the shards written so far; ``complete`` False while running."""
    manifest = {
        "source": source,
        "seed": config.seed,
        "config": config_dict(config),
        "n": w.n,
        "n_real": w.n_real,
        "n_bogus": w.n_bogus,
        "counts_by_kind": dict(sorted(w.written.items())),
        "counts_by_kind_before_balancing": dict(sorted(w.seen.items())),
        "shards": w.shards,
        "format": "npz: x (N,3,63,63) float16 normalised by broker.normalise.normalise_triplet; "
                  "y uint8 (1 real); kind str; group str (field); snr float32; reference str "
                  "(as_built / misaligned / blurred)",
        "seconds": round(time.time() - t0, 1),
        "complete": complete,
        "pipeline_commit": _git_commit(),
    }
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
