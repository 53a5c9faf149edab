"""The ``broker`` command line."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from broker.errors import BrokerError, InvalidFrame

if TYPE_CHECKING:
    from streams.demo import DemoResult
    from streams.producer import Published

app = typer.Typer(help="A streaming transient alert broker: frames in, Avro alerts out.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(soft_wrap=True)

Bootstrap = Annotated[str, typer.Option(help="Kafka bootstrap servers host:port[,host:port].")]
AppId = Annotated[str, typer.Option(help="Prefix of consumer groups and transactional ids.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="Pipeline config (TOML); see broker/config.py.",
                                                    envvar="BROKER_CONFIG")]


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


@app.command()
def stage(name: Annotated[str, typer.Argument(help="ingest | subtract | classify | score | alert")],
          bootstrap: Bootstrap, app_id: AppId = "broker", config: ConfigOpt = None,
          state_dir: Annotated[Optional[Path], typer.Option(help="Overrides state_dir of the config.")] = None,
          frame_store: Annotated[Optional[str], typer.Option(help="Overrides frame_store of the config.")] = None,
          metrics_port: Annotated[int, typer.Option(
              help="Port of /metrics on 127.0.0.1 (0: a free one, -1: none).")] = 0,
          metrics_addr: Annotated[str, typer.Option(help="Address /metrics listens on.")] = "127.0.0.1",
          instance: Annotated[int, typer.Option(help="Replica index (keys the transactional id).")] = 0) -> None:
    """Run one stage until SIGTERM / Ctrl-C (exit code 3 after repeated unexpected errors)."""
    from broker.config import load_config
    from broker.errors import StageFailure
    from streams.metrics import StageMetrics
    from streams.runner import StageRunner
    from streams.settings import KafkaSettings
    from streams.stages import stage as stage_named

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    try:
        spec = stage_named(name)
        cfg = load_config(config, state_dir=state_dir, frame_store=frame_store)
        handler = spec.make_handler(cfg)
    except BrokerError as exc:
        _fail(exc)
    metrics = StageMetrics(name)
    if metrics_port >= 0:
        port = metrics.serve(metrics_port, metrics_addr)
        print(f"{name}: metrics on http://{metrics_addr}:{port}/metrics", flush=True)
    runner = StageRunner(name, spec.input, handler, KafkaSettings(bootstrap, app_id=app_id), metrics, instance,
                         outputs=spec.writes, max_unexpected=cfg.max_consecutive_unexpected)
    runner.install_signal_handlers()
    print(f"{name}: consuming {spec.input} from {bootstrap}", flush=True)
    try:
        n = runner.run()
    except StageFailure as exc:
        console.print(f"[red]stopped:[/red] {exc}")
        raise typer.Exit(3) from exc
    print(f"{name}: stopped after {n} messages", flush=True)


@app.command()
def topics(bootstrap: Bootstrap,
           filters: Annotated[str, typer.Option(help="Comma-separated bands for alerts.<filter>.")] = "g,r,i",
           partitions: Annotated[int, typer.Option(help="Partitions per topic.")] = 1) -> None:
    """Create the pipeline's topics (existing ones are left alone)."""
    from streams.stages import pipeline_topics
    from streams.topics import create_topics

    created = create_topics(bootstrap, pipeline_topics(tuple(filters.split(",")), partitions))
    console.print(f"created {len(created)} topic(s): {', '.join(created) or '-'}")


@app.command()
def embedded(port: Annotated[int, typer.Option(help="Port (0: a free one).")] = 0,
             create: Annotated[bool, typer.Option(help="Create the pipeline topics.")] = True) -> None:
    """Run the embedded Kafka-compatible broker (tansu) on 127.0.0.1 until Ctrl-C."""
    from streams.embedded import EmbeddedKafka
    from streams.stages import pipeline_topics
    from streams.topics import create_topics

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedKafka(port or None) as kafka:
        if create:
            create_topics(kafka.bootstrap, pipeline_topics(("g", "r", "i")))
        print(f"bootstrap: {kafka.bootstrap}", flush=True)
        stop.wait()


@app.command()
def simulate(out: Annotated[Path, typer.Argument(help="Directory for FITS frames and truth JSON.")],
             frames: Annotated[int, typer.Option(help="Number of frames.")] = 6,
             size: Annotated[int, typer.Option(help="Frame side (px).")] = 2048,
             seed: Annotated[int, typer.Option(help="Random seed.")] = 1) -> None:
    """Write simulated frames (tile-compressed FITS) and their truth records."""
    from broker.frame import encode_fits
    from broker.simulate import SimConfig, SkySimulator

    out.mkdir(parents=True, exist_ok=True)
    for frame, truth in SkySimulator(SimConfig(shape=(size, size)), seed=seed).frames(frames):
        (out / f"{frame.meta.frame_id}.fits.fz").write_bytes(encode_fits(frame))
        (out / f"{frame.meta.frame_id}.truth.json").write_text(json.dumps(truth.to_dict()))
        console.print(f"wrote {frame.meta.frame_id}: {len(truth.injections)} injections")


@app.command()
def produce(paths: Annotated[list[Path], typer.Argument(help="FITS files, or one directory with --watch.")],
            bootstrap: Bootstrap, config: ConfigOpt = None,
            watch: Annotated[bool, typer.Option(help="Watch the directory and publish new files.")] = False,
            pattern: Annotated[str, typer.Option(help="Glob of files to watch.")] = "*.fits*") -> None:
    """Publish FITS frames to the frames topic (validated first; bad files are reported)."""
    from broker.config import load_config
    from streams.framestore import FrameStore
    from streams.producer import FrameProducer
    from streams.producer import watch as watch_dir
    from streams.settings import KafkaSettings

    cfg = load_config(config)
    producer = FrameProducer(KafkaSettings(bootstrap), FrameStore(cfg.frame_store), cfg.inline_limit_bytes,
                             cfg.max_frame_bytes, cfg.ingest)
    failed = 0
    if watch:
        if len(paths) != 1 or not paths[0].is_dir():
            _fail(BrokerError("--watch takes exactly one directory"))
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        console.print(f"watching {paths[0]} for {pattern} (Ctrl-C to stop)")
        for path, res in watch_dir(paths[0], producer.publish_file, stop.is_set, pattern):
            _report(path, res)
            producer.flush()
        return
    for path in paths:
        try:
            res = producer.publish_file(path)
        except InvalidFrame as exc:
            res, failed = exc, failed + 1
        _report(path, res)
    producer.flush()
    if failed:
        raise typer.Exit(1)


def _report(path: Path, res: Published | Exception) -> None:
    if isinstance(res, Exception):
        console.print(f"[red]rejected[/red] {path}: {res} [dim]({getattr(res, 'reason', 'error')})[/dim]")
    else:
        how = "inline" if res.inline else "by reference"
        console.print(f"[green]sent[/green] {path} as {res.frame_id} ({res.size_bytes / 1e6:.1f} MB, {how})")


@app.command()
def subscribe(bootstrap: Bootstrap,
              topic: Annotated[str, typer.Option(help="Alert topic (alerts, alerts.<filter>).")] = "alerts",
              filter: Annotated[Optional[str], typer.Option("--filter", help="e.g. 'rb > 0.8 and snr > 7'.")] = None,
              group: Annotated[Optional[str], typer.Option(help="Consumer group (default: a new one).")] = None,
              png_dir: Annotated[Optional[Path], typer.Option(
                  help="Write each shown alert's triplet as PNG here.")] = None,
              max_alerts: Annotated[Optional[int], typer.Option(help="Stop after this many alerts read.")] = None,
              timeout: Annotated[Optional[float], typer.Option(help="Stop after this many idle seconds.")] = None,
              json_out: Annotated[bool, typer.Option(
                  "--json", help="Print each alert as one JSON line (no cutouts).")] = False) -> None:
    """Print alerts as they arrive, optionally filtered, optionally saving cutout triplets."""
    from streams.settings import KafkaSettings
    from streams.subscriber import AlertFilter, alerts, save_triplet_png

    try:
        keep = AlertFilter(filter)
    except BrokerError as exc:
        _fail(exc)
    for alert, _ in alerts(KafkaSettings(bootstrap), topic, group, timeout=timeout, max_alerts=max_alerts):
        if "_error" in alert:
            console.print(f"[yellow]skipped undecodable message at offset {alert['_offset']}: {alert['_error']}")
            continue
        try:
            if not keep(alert):
                continue
        except BrokerError as exc:
            _fail(exc)
        if json_out:
            slim = {k: v for k, v in alert.items() if not k.startswith("cutout")}
            print(json.dumps(slim, default=float), flush=True)
        else:
            console.print(format_alert(alert))
        if png_dir:
            save_triplet_png(alert, png_dir / f"{alert['candid'].replace('/', '_')}.png")


def _score(value: float | None) -> str:
    return " -  " if value is None else f"{value:.2f}"


def passes(alert: dict, rb_cut: float) -> bool:
    """Whether the alert's real/bogus score is at or above ``rb_cut`` (a null score is not)."""
    return alert["scores"]["rb"] is not None and alert["scores"]["rb"] >= rb_cut


def format_alert(alert: dict) -> str:
    """One line of text for an alert: object, candidate, band, position, S/N, magnitude, scores."""
    s, sc = alert["source"], alert["scores"]
    mag = f"{s['magpsf']:.2f}" if s["magpsf"] is not None else "  -  "
    return (f"{alert['objectId']} {alert['candid']:<28} {s['filter']} RA={s['ra']:9.5f} Dec={s['dec']:+9.5f} "
            f"S/N={s['snr']:+7.1f} mag={mag} rb={_score(sc['rb'])} anomaly={sc['anomaly']:.2f} "
            f"ndet={alert['object']['ndet']}")


@app.command()
def demo(frames: Annotated[int, typer.Option(help="Simulated frames to send.")] = 12,
         size: Annotated[int, typer.Option(help="Frame side (px).")] = 2048,
         bootstrap: Annotated[Optional[str], typer.Option(help="Use this Kafka instead of the embedded one.")] = None,
         workdir: Annotated[Path, typer.Option(help="State, frame store and logs.")] = Path("var/demo"),
         seed: Annotated[int, typer.Option(help="Simulation seed.")] = 1,
         interval: Annotated[float, typer.Option(help="Seconds between frames from the simulated telescope "
                                                      "(0: all at once).")] = 8.0,
         rb_cut: Annotated[float, typer.Option(
             help="Real/bogus threshold for printing alerts and the summary.")] = 0.5) -> None:
    """Embedded broker + all stages + simulated telescope + subscriber, then a summary."""
    import shutil

    from broker.simulate import SimConfig
    from streams.demo import run_demo

    shutil.rmtree(workdir, ignore_errors=True)
    sim = SimConfig(shape=(size, size))
    console.print(f"[bold]demo[/bold]: {frames} simulated {size}x{size} frames, fields {sim.fields}, "
                  f"filters {sim.filters}; the first {sim.reference_epochs} epochs of each field build its reference")
    console.print(f"stage logs and /metrics addresses: {workdir / 'logs'}")
    t0 = time.time()
    last: list = [None]

    def on_progress(published: int, backlog: int | None) -> None:
        if (published, backlog) == last[0]:
            return
        last[0] = (published, backlog)
        state = "telescope observing" if backlog is None else f"{backlog} message(s) in flight"
        console.print(f"[dim]{time.time() - t0:6.1f} s  frames sent {published}/{frames}, {state}[/dim]")

    def on_alert(alert: dict) -> None:
        if passes(alert, rb_cut):
            console.print(format_alert(alert))

    try:
        result = run_demo(frames, bootstrap, workdir, sim, seed, interval=interval, on_alert=on_alert,
                          on_progress=on_progress)
    except (BrokerError, RuntimeError, TimeoutError) as exc:
        _fail(exc)
    print_summary(result, rb_cut, time.time() - t0)


def print_summary(result: DemoResult, rb_cut: float, elapsed: float) -> None:
    """Print the demo's summary table: statuses, alerts, recovery per S/N bin, false alerts, latency."""
    statuses: dict[str, int] = {}
    for s in result.statuses.values():
        statuses[s] = statuses.get(s, 0) + 1
    table = Table(title="demo summary", show_header=False)
    table.add_row("frames sent", str(len(result.truths)))
    table.add_row("frames by status", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    table.add_row("candidates", str(result.candidates))
    n_pass = sum(passes(a, rb_cut) for a in result.alerts)
    table.add_row("alerts", f"{len(result.alerts)} ({n_pass} with rb >= {rb_cut})")
    table.add_row("dead letters", str(len(result.dead_letters)))
    for bin_, rec, inj in result.recovery():
        table.add_row(f"transients S/N {bin_}", f"{rec}/{inj} recovered" + (f" ({rec / inj:.0%})" if inj else ""))
    rec, inj = result.masked(10.0)
    table.add_row("  S/N >= 10 in saturated-star masks", f"{rec}/{inj} recovered (not in the rows above)")
    for frame_id, source_id, snr, dist, saturated in result.missed(10.0):
        why = ", inside a saturated-star mask" if saturated else ""
        table.add_row("  missed (S/N >= 10)",
                      f"{source_id} in {frame_id}: S/N {snr:.1f}, nearest alert {dist:.1f} px{why}")
    table.add_row("false alerts", f"{result.false_alerts()} (rb >= {rb_cut}: {result.false_alerts(rb_cut)})")
    if result.latencies:
        p50, p95 = np.percentile(result.latencies, [50, 95])
        table.add_row("latency exposure end -> alert", f"p50 {p50:.1f} s, p95 {p95:.1f} s")
    table.add_row("wall time", f"{elapsed:.0f} s")
    console.print(table)


# --- real/bogus model ----------------------------------------------------------------------------
@app.command("train-realbogus")
def train_realbogus(
        seed: Annotated[int, typer.Option(help="Seeds the training set, the held-out set (seed+1) and training.")] = 0,
        target_n: Annotated[int, typer.Option(help="Balanced training triplets to generate.")] = 100_000,
        test_n: Annotated[int, typer.Option(help="Held-out triplets (generator seed+1).")] = 12_000,
        version: Annotated[Optional[str], typer.Option(
            help="Model version written to broker/models/ (default: the shipped default's).")] = None,
        out_dir: Annotated[Optional[Path], typer.Option(
            help="Where weights and model card go (default broker/models/).")] = None,
        workers: Annotated[int, typer.Option(
            min=0, help="Generator processes (0: one per CPU core, at most one per GiB free).")] = 0,
        max_minutes: Annotated[float, typer.Option(help="Wall-clock budget of the training loop.")] = 28.0) -> None:
    """Generate training data from the simulated pipeline, train the real/bogus CNN, evaluate, write the card."""
    from broker import MODELS_DIR
    from broker.realbogus import DEFAULT_VERSION
    from broker.training.generate import default_workers
    from broker.training.main import main_train
    from broker.training.trainer import TrainConfig

    version = version or DEFAULT_VERSION
    workers = workers or default_workers()
    res = main_train(out_dir or MODELS_DIR, seed, version=version, target_n=target_n, test_n=test_n,
                     workers=workers, train_config=TrainConfig(seed=seed, max_seconds=60 * max_minutes))
    console.print(f"weights: {res['weights']}; report: reports/{version}/report.md; "
                  f"{res['seconds_total']:.0f} s")


@app.command("eval-realbogus")
def eval_realbogus(
        model: Annotated[Optional[str], typer.Option(
            help="Model version or .pt path (default: the default version).")] = None,
        out_dir: Annotated[Path, typer.Option(
            help="Report folder (report.md, metrics.json, PNGs).")] = Path("reports/realbogus"),
        sim_dir: Annotated[Optional[Path], typer.Option(
            help="Held-out simulated shards (default build/realbogus-test-1).")] = None,
        ztf_dir: Annotated[Optional[Path], typer.Option(
            help="Real ZTF alerts (default ../shared/data/ztf_alerts).")] = None,
        threshold: Annotated[float, typer.Option(help="Operating threshold reported.")] = 0.5,
        max_sim: Annotated[Optional[int], typer.Option(help="Use only this many held-out triplets.")] = None,
        compare: Annotated[Optional[str], typer.Option(
            help="Second model evaluated on the same data.")] = None) -> None:
    """Evaluate a real/bogus model on held-out simulated and real ZTF triplets; write a Markdown + PNG report."""
    from broker.training.evaluation import main_eval

    try:
        res = main_eval(model, out_dir, sim_dir, ztf_dir, threshold=threshold, max_sim=max_sim,
                        compare=compare)
    except BrokerError as exc:
        _fail(exc)
    console.print(f"report: {out_dir / 'report.md'}")
    summary = {k: {kk: v for kk, v in res[k].items() if not isinstance(v, (list, dict))}
               for k in ("sim", "ztf") if res.get(k)}
    console.print_json(data=summary)


@app.command()
def explain(path: Annotated[Path, typer.Argument(
    help="Avro alert file, or .npz (science/reference/difference, or a shard's x).")],
            index: Annotated[int, typer.Option(help="Record / row in the file.")] = 0,
            out: Annotated[Optional[Path], typer.Option(
                help="PNG (default: <stem>-<index>-explain.png next to the input).")] = None,
            model: Annotated[Optional[str], typer.Option(help="Model version or .pt path.")] = None,
            steps: Annotated[int, typer.Option(help="Integrated-gradients steps.")] = 64) -> None:
    """Attribution map (integrated gradients) of the real/bogus score of one triplet, as a PNG."""
    from broker.explain import main_explain

    try:
        console.print(f"wrote {main_explain(path, index, out, model, steps)}")
    except BrokerError as exc:
        _fail(exc)


if __name__ == "__main__":
    app()
