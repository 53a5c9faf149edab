"""Load and scale: lag and memory under twice the sustained rate, and throughput per replica count.

    python -m bench.load overload [--size 1024] [--fields 4] [--factor 2] [--overload-s 600] [--recover-s 600]
    python -m bench.load replicas [--size 1024] [--fields 8] [--per-field 4] [--replicas 1 2]

Both run the real stage processes (``broker stage``, one process per stage and replica) on the
embedded broker, with the duplicate guard on, fed simulated frames of ``--size``² pixels. Each
field's first three frames build its reference before anything is measured; every later frame
is a science frame of the pool, re-sent with a new frame id and one pixel changed so that frame
idempotence does not refuse it.

**overload**: a rate R is measured first (a batch of science frames sent at once, frames per
second until the pipeline drained). Frames are then sent at ``--factor`` x R for ``--overload-s``
and, for ``--recover-s``, at the rate the pipeline sustained over the second half of the overload
(frames subtracted per second: the rate sent less the growth of the frames in flight). Every
``--sample-s`` the backlog of each stage (its consumer group's uncommitted input,
:func:`streams.monitor.stage_backlog`) and the resident memory of each stage process and of the
broker are sampled. Bounded means: in the 1x phase the frames in flight stop growing (slope near
0 frames per minute) and the stages' memory stays at its overload level.

**replicas**: ``--fields`` fields on as many partitions; for each k of ``--replicas``, k ingest
and k subtract processes (``--instance i``) subtract ``--per-field`` frames per field; the other
stages are not run. Throughput is frames per second from the first frame sent to the last
``candidates`` batch committed; efficiency is throughput(k) / (k x throughput(1)).

Writes the sections ``load`` and ``replicas`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.common import git_rev, machine, write_section
from broker.frame import Frame
from broker.simulate import SimConfig, SkySimulator
from streams import topics
from streams.demo import start_stages, stop_stages
from streams.embedded import EmbeddedKafka
from streams.framestore import FrameStore
from streams.monitor import stage_backlog
from streams.producer import FrameProducer
from streams.settings import KafkaSettings
from streams.stages import STAGES, pipeline_topics

#: Frames of each field that build its reference (``ReferenceConfig.n_frames``).
REFERENCE_FRAMES = 3
#: The stages that commit message by message (the archive commits batches).
PER_MESSAGE = tuple(s.name for s in STAGES if s.make_handler is not None)


def simulated(size: int, fields: int, per_field: int, seed: int = 7) -> tuple[list[Frame], list[Frame]]:
    """(reference frames, science frames) of ``fields`` simulated fields, ``per_field`` science frames each."""
    names = tuple(f"L{i:03d}" for i in range(fields))
    config = SimConfig(shape=(size, size), fields=names, filters=("r",))
    frames = [f for f, _ in SkySimulator(config, seed=seed).frames(fields * (REFERENCE_FRAMES + per_field))]
    return frames[:fields * REFERENCE_FRAMES], frames[fields * REFERENCE_FRAMES:]


def restamped(pool: list[Frame]) -> Iterator[Frame]:
    """The pool's frames over and over, each time a new frame: new frame id, one pixel up by the repeat count."""
    for n in range(10**9):
        for frame in pool:
            data = frame.data.copy()
            data[0, 0] += n + 1
            meta = dataclasses.replace(frame.meta, frame_id=f"{frame.meta.frame_id}-r{n}")
            yield Frame(meta, data, frame.header.copy())


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (MiB; NaN once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Bench:
    """The embedded broker, the pipeline's topics, a frame producer and the stage processes started."""

    def __init__(self, workdir: Path, partitions: int) -> None:
        self.kafka = EmbeddedKafka().start()
        self.settings = KafkaSettings(self.kafka.bootstrap, app_id="load")
        topics.create_topics(self.kafka.bootstrap, pipeline_topics(("r",), partitions))
        self.workdir = workdir
        self.producer = FrameProducer(self.settings, FrameStore(str(workdir / "frames")), 8 << 20, 1 << 30)
        self.procs: list = []

    def start(self, stages: tuple[str, ...], replicas: int = 1) -> None:
        """Start ``replicas`` processes of each of ``stages`` (instances 0, 1, ...)."""
        for i in range(replicas):
            self.procs += start_stages(self.kafka.bootstrap, "load", self.workdir, stages=stages,
                                       env={"BROKER_INSTANCE": str(i)})

    def send(self, frames: list[Frame]) -> None:
        """Publish ``frames`` (exposure end: now) and wait for their delivery."""
        for frame in frames:
            self.producer.publish_frame(frame, time.time())
        self.producer.flush()

    def backlog(self, stages: tuple[str, ...]) -> dict[str, int]:
        """Uncommitted input of each of ``stages`` (offsets)."""
        return {s.name: stage_backlog(self.settings, s.name, s.input) for s in STAGES if s.name in stages}

    def drain(self, stages: tuple[str, ...], timeout: float = 3600) -> None:
        """Wait until ``stages`` have committed all their input (raise if a stage exited)."""
        deadline = time.monotonic() + timeout
        while sum(self.backlog(stages).values()):
            if time.monotonic() > deadline:
                raise TimeoutError("the stages did not drain")
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a stage exited; see {self.workdir / 'logs'}")
            time.sleep(1.0)

    def close(self) -> None:
        """Stop the stages and the broker."""
        stop_stages(self.procs)
        self.kafka.stop()


def paced(bench: Bench, frames: Iterator[Frame], rate: float, seconds: float, sample_s: float, phase: str,
          t0: float, rows: list[dict]) -> None:
    """Send ``rate`` frames/s for ``seconds``, sampling backlog and memory every ``sample_s`` into ``rows``."""
    start, sent, next_sample = time.monotonic(), 0, 0.0
    names = tuple(s.name for s in STAGES)
    while (elapsed := time.monotonic() - start) < seconds:
        while sent < rate * elapsed:
            bench.send([next(frames)])
            sent += 1
        if elapsed >= next_sample:
            rss = {names[i]: rss_mib(p.pid) for i, p in enumerate(bench.procs)}
            rss["broker"] = rss_mib(bench.kafka.pid or 0)
            rows.append({"t": time.monotonic() - t0, "phase": phase, "sent": sent, "backlog": bench.backlog(names),
                         "rss": rss})
            next_sample += sample_s
        time.sleep(0.2)


def in_flight(row: dict) -> float:
    """Frames sent, not yet subtracted: ingest backlog + subtract backlog / 2 (a message and a marker per frame)."""
    return row["backlog"]["ingest"] + row["backlog"]["subtract"] / 2


def slope_per_min(rows: list[dict], value) -> float:
    """Least-squares slope of ``value(row)`` over the rows (per minute)."""
    t = np.array([r["t"] for r in rows]) / 60
    y = np.array([value(r) for r in rows], dtype=float)
    return float(np.polyfit(t, y, 1)[0]) if len(rows) > 2 else float("nan")


def overload(args: argparse.Namespace) -> str:
    """Run the overload benchmark; its markdown section."""
    refs, pool = simulated(args.size, args.fields, args.pool)
    names = tuple(s.name for s in STAGES)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), 1)
        try:
            bench.start(names)
            bench.send(refs)
            bench.drain(names)
            frames = restamped(pool)
            batch = [next(frames) for _ in range(args.calibrate)]
            t = time.monotonic()
            bench.send(batch)
            bench.drain(PER_MESSAGE)  # not the archive: it commits a batch every few seconds
            rate = args.calibrate / (time.monotonic() - t)
            bench.drain(names)
            rows: list[dict] = []
            t0 = time.monotonic()
            paced(bench, frames, args.factor * rate, args.overload_s, args.sample_s, f"{args.factor:g}x", t0, rows)
            sustained = subtracted_per_s(rows, args.factor * rate)
            paced(bench, frames, sustained, args.recover_s, args.sample_s, "1x", t0, rows)
        finally:
            bench.close()
    return overload_report(args, rate, sustained, rows)


def subtracted_per_s(rows: list[dict], offered: float) -> float:
    """Frames subtracted per second over the second half of ``rows``, sent at ``offered`` frames per second."""
    return offered - slope_per_min(rows[len(rows) // 2:], in_flight) / 60


def overload_report(args: argparse.Namespace, rate: float, sustained: float, rows: list[dict]) -> str:
    """The ``load`` section: the samples every minute, and per phase the backlog slope and memory."""
    names = [s.name for s in STAGES]
    every = max(1, round(120 / args.sample_s))
    lines = ["| t (s) | phase | frames sent in the phase | frames in flight | " +
             " | ".join(f"{n} backlog" for n in names) + " | stages' RSS (MiB, sum) | broker RSS (MiB) |",
             "|---" * (len(names) + 6) + "|"]
    for r in rows[::every] + rows[-1:]:
        lines.append(f"| {r['t']:.0f} | {r['phase']} | {r['sent']} | {in_flight(r):.0f} | " +
                     " | ".join(str(r["backlog"][n]) for n in names) +
                     f" | {sum(r['rss'][n] for n in names):.0f} | {r['rss']['broker']:.0f} |")
    phases = []
    for phase, offered in ((f"{args.factor:g}x", args.factor * rate), ("1x", sustained)):
        half = [r for r in rows if r["phase"] == phase]
        half = half[len(half) // 2:]  # the second half of the phase: after the transient
        growth = slope_per_min(half, in_flight)
        stages_rss = slope_per_min(half, lambda r: sum(r["rss"][n] for n in names))
        phases.append(f"| {phase} | {60 * offered:.1f} | {growth:+.1f} | {60 * offered - growth:.1f} | "
                      f"{stages_rss:+.1f} | {slope_per_min(half, lambda r: r['rss']['broker']):+.0f} |")
    return "\n".join([
        "## Load: twice the sustained rate, then the sustained rate",
        "",
        f"Machine: {machine()}. Date {datetime.date.today()}, commit {git_rev()}. Command: `python -m bench.load "
        f"overload --size {args.size} --fields {args.fields} --factor {args.factor:g} --overload-s "
        f"{args.overload_s:g} --recover-s {args.recover_s:g}`. All six stages, one process each, on the "
        f"embedded broker (memory storage). The overload is {args.factor:g} x R, R = {rate:.3f} frames/s "
        f"({args.calibrate} frames sent at once, until the per-message stages drained); the 1x phase sends "
        f"at the rate the pipeline sustained in the overload's second half, {sustained:.3f} frames/s (the "
        "stages share the cores with the frame producer). Backlogs are in offsets of each stage's input "
        "(a frame, one frame's batch or an alert, and a transaction marker each on transactional topics); "
        "frames in flight = ingest backlog + subtract backlog / 2. Samples every two minutes:",
        "", *lines, "",
        "Per phase, over its second half (after the transient), in frames or MiB per minute:",
        "", "| phase | frames offered / min | frames in flight, growth / min | frames subtracted / min | "
        "stages' RSS growth / min | broker RSS growth / min |", "|---|---|---|---|---|---|", *phases,
    ])


def replicas(args: argparse.Namespace) -> str:
    """Run the replica benchmark; its markdown section."""
    refs, science = simulated(args.size, args.fields, args.per_field)
    stages = ("ingest", "subtract")
    results = []
    for k in args.replicas:
        with tempfile.TemporaryDirectory() as tmp:
            bench = Bench(Path(tmp), args.fields)
            try:
                bench.start(stages, k)
                bench.send(refs)
                bench.drain(stages)
                t = time.monotonic()
                bench.send(science)
                bench.drain(stages)
                results.append((k, len(science) / (time.monotonic() - t)))
            finally:
                bench.close()
    base = results[0][1] / results[0][0]
    rows = [f"| {k} | {rate:.3f} | {rate / base:.2f} | {rate / (k * base):.2f} |" for k, rate in results]
    return "\n".join([
        "## Replicas: ingest and subtract on many fields",
        "",
        f"Machine: {machine()}. Date {datetime.date.today()}, commit {git_rev()}. Command: `python -m bench.load "
        f"replicas --size {args.size} --fields {args.fields} --per-field {args.per_field} --replicas "
        f"{' '.join(map(str, args.replicas))}`. {args.fields} fields on {args.fields} partitions, "
        f"{len(science)} science frames after the references, k processes each of ingest and subtract, "
        f"the duplicate guard on. {os.cpu_count()} cores: k replicas are 2 x k busy processes, so "
        f"more than {max(1, (os.cpu_count() or 2) // 2)} replica(s) cannot speed it up here.", "",
        "| replicas k | frames/s | speed-up | efficiency |", "|---|---|---|---|", *rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    over = sub.add_parser("overload")
    over.add_argument("--size", type=int, default=1024)
    over.add_argument("--fields", type=int, default=4)
    over.add_argument("--pool", type=int, default=2, help="science frames per field in the pool")
    over.add_argument("--calibrate", type=int, default=12, help="frames sent at once to measure the rate")
    over.add_argument("--factor", type=float, default=2.0)
    over.add_argument("--overload-s", type=float, default=600)
    over.add_argument("--recover-s", type=float, default=600)
    over.add_argument("--sample-s", type=float, default=10)
    rep = sub.add_parser("replicas")
    rep.add_argument("--size", type=int, default=1024)
    rep.add_argument("--fields", type=int, default=8)
    rep.add_argument("--per-field", type=int, default=4)
    rep.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, as the stages run
    if args.mode == "overload":
        write_section("load", overload(args))
    else:
        write_section("replicas", replicas(args))


if __name__ == "__main__":
    main()
