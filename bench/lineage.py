"""Duplicate-guard recovery benchmark: time to first sight of input partitions, old guard vs new.

    python -m bench.lineage [--partitions 1 4 16] [--per-partition 8] [--repeat 3]

For each partition count P, on the embedded broker (tansu): an input topic, an upstream topic and
an output topic of P partitions each (the alert stage's shape: ``scored`` in, ``alerts`` and
``dlq.alert`` out). The new stage runner processes ``--per-partition`` messages of every input
partition (outputs spread over all output partitions, a progress record per input), as a stage
that ran before a restart. Then a fresh guard, as a restarted process has, meets each input
partition for the first time:

- **old** (``streams/lineage.py`` of commit 2e77dcc, read with ``git show``): it reads back the
  lineage of the input partition and every non-empty partition of its output topics, each to its
  end;
- **new**, partitions met one at a time: it reads the end of one partition of
  ``progress.<stage>``;
- **new**, all P assigned together (a rebalance hands a process its partitions at once): one pass
  over P partitions of ``progress.<stage>``.

Wall time of the guard's first ``is_duplicate``/``check`` per partition (median over the P
partitions) and in all (a single replica meeting every partition). The old guard runs once (it
takes minutes at P = 16), the new ``--repeat`` times (median). Writes the section ``lineage`` of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from confluent_kafka import Producer, TopicPartition

from bench.common import git_rev, machine, write_section
from streams import topics
from streams.embedded import EmbeddedKafka
from streams.lineage import Deduplicator, src_of
from streams.runner import OutMessage, StageRunner
from streams.settings import KafkaSettings

OLD_COMMIT = "2e77dcc"


def old_lineage() -> ModuleType:
    """``streams/lineage.py`` as it was at :data:`OLD_COMMIT`, imported from ``git show``."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{OLD_COMMIT}:streams/lineage.py"], cwd=root, capture_output=True,
                          text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_lineage.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_lineage", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(settings: KafkaSettings, n: int, per_partition: int) -> tuple[str, str, tuple[str, ...]]:
    """Topics of ``n`` partitions, a stage that processed ``per_partition`` inputs of each: (stage, input, outputs)."""
    stage, upstream, inp = f"bench{n}", f"classified{n}", f"scored{n}"
    outputs = (f"alerts{n}", f"dlq.bench{n}")
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(t, n) for t in (upstream, inp, *outputs)] +
                         [topics.TopicSpec(topics.progress(stage), n, config=topics.PROGRESS_CONFIG)])
    prod = Producer(settings.producer())
    for p in range(n):
        for i in range(per_partition):
            prod.produce(upstream, b"u", f"k{p}-{i}".encode(), partition=p)
            prod.produce(inp, b"x" * 200, f"k{p}-{i}".encode(), partition=p, headers={"src": src_of(upstream, p, i)})
    prod.flush(30)
    runner = StageRunner(stage, inp, lambda m: [OutMessage(outputs[0], m.value or b"", m.key)], settings,
                         upstream=(upstream,))
    assert runner.run(max_messages=n * per_partition) == n * per_partition
    return stage, inp, outputs


def _first_sights(check, inp: str, n: int, next_offset: int, src: bytes) -> list[float]:
    """Seconds of ``check(topic, partition, offset, src)`` on each of ``n`` partitions, in turn."""
    times = []
    for p in range(n):
        t0 = time.perf_counter()
        check(inp, p, next_offset, src)
        times.append(time.perf_counter() - t0)
    return times


def measure(settings: KafkaSettings, old: ModuleType, n: int, per_partition: int, repeat: int) -> dict:
    """The figures of one partition count ``n``."""
    stage, inp, outputs = prepare(settings, n, per_partition)
    src = src_of(f"classified{n}", 0, per_partition - 1)
    guard = old.Deduplicator(settings, outputs=outputs)
    old_times = _first_sights(guard.is_duplicate, inp, n, per_partition, src)
    one, together = [], []
    for _ in range(repeat):
        new = Deduplicator(settings, stage, (f"classified{n}",))
        one.append(_first_sights(new.check, inp, n, per_partition, src))
        new.close()
        new = Deduplicator(settings, stage, (f"classified{n}",))
        new.assigned([TopicPartition(inp, p) for p in range(n)])
        together.append(sum(_first_sights(new.check, inp, n, per_partition, src)))
        new.close()
    return {"n": n, "old_one": statistics.median(old_times), "old_all": sum(old_times),
            "new_one": statistics.median(statistics.median(t) for t in one),
            "new_all": statistics.median(sum(t) for t in one), "new_together": statistics.median(together)}


def report(args: argparse.Namespace, rows: list[dict], started: str) -> str:
    """The BENCHMARKS.md section."""
    cmd = "python -m bench.lineage " + " ".join(sys.argv[1:])
    lines = [
        "## Duplicate guard: recovery at first sight of an input partition", "",
        f"Machine: {machine()}. Date {started}, commit {git_rev()} (work tree). Command: `{cmd}`.", "",
        f"The alert stage's shape on the embedded broker (tansu): input, upstream and output topics of P partitions, "
        f"{args.per_partition} inputs processed per partition before the restart. Wall time of a fresh guard's "
        f"first check of each input partition: the old guard (commit {OLD_COMMIT}: reads back the input's "
        "lineage and every non-empty output partition), the new one (the end of its `progress.<stage>` "
        "partition), partitions met one at a time or all assigned together (one pass).", "",
        "| partitions P | old, one partition (s) | old, all P (s) | new, one partition (s) | new, all P one by one (s) "
        "| new, all P together (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']} | {r['old_one']:.2f} | {r['old_all']:.1f} | {r['new_one']:.3f} | "
                     f"{r['new_all']:.3f} | {r['new_together']:.3f} |")
    lines += ["", "The old guard's cost per partition grows with P (one read of each output partition, each "
              "waiting for its end), so a process meeting all P partitions pays ~P²; the new one reads a "
              "few records of one progress partition (or of all P in one pass), whatever P."]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and write its BENCHMARKS.md section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--per-partition", type=int, default=8, help="inputs processed per partition before")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the new guard (median)")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = ap.parse_args()
    started = datetime.date.today().isoformat()
    old = old_lineage()
    rows = []
    with EmbeddedKafka() as kafka:
        settings = KafkaSettings(kafka.bootstrap, app_id="bench-lineage")
        for n in args.partitions:
            rows.append(measure(settings, old, n, args.per_partition, args.repeat))
            print(rows[-1], flush=True)
    text = report(args, rows, started)
    print(text)
    if not args.no_write:
        write_section("lineage", text)


if __name__ == "__main__":
    main()
