"""The ``broker`` command line."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from broker.errors import BrokerError, FilterExpressionError, InvalidFrame, KafkaAuthError, Outage
from streams.triplet_png import printable

if TYPE_CHECKING:
    import pyarrow as pa

    from broker.archive.reader import Archive
    from broker.config import PipelineConfig
    from streams.alert_expr import AlertFilter, FieldSelection
    from streams.archiver import Archiver
    from streams.deadletters import DeadLetter
    from streams.demo import DemoResult
    from streams.metrics import StageMetrics
    from streams.producer import FrameProducer, Published
    from streams.runner import StageRunner
    from streams.settings import KafkaSettings
    from streams.stages import Stage
    from streams.subscriber import SubscriptionStats
    from streams.web.tokens import TokenStore

app = typer.Typer(help="A streaming transient alert broker: frames in, Avro alerts out.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(soft_wrap=True, emoji=False)  # a file named :x:.fits is printed as named

Bootstrap = Annotated[str, typer.Option(help="Kafka bootstrap servers host:port[,host:port].")]
AppId = Annotated[str, typer.Option(help="Prefix of consumer groups and transactional ids.")]
# Help texts are rich markup: a config section is written \[section] there, or rich takes it for a tag and drops it.
ConfigOpt = Annotated[Optional[Path], typer.Option(help="Pipeline config (TOML); see broker/config.py.",
                                                    envvar="BROKER_CONFIG")]
FramingOpt = Annotated[Optional[list[str]], typer.Option(
    "--framing", help="Alert topic as TOPIC=FRAMING[:CODEC] (framing ocf, confluent or fink; codec of ocf: "
                      "null, deflate, snappy); repeat for several topics. Replaces [\\[alert_topics]] of the config.")]
RegistryOpt = Annotated[Optional[str], typer.Option(
    help="Schema registry URL for confluent-framed alert topics (overrides schema_registry_url).",
    envvar="BROKER_SCHEMA_REGISTRY")]


def _alert_overrides(framing: Optional[list[str]], registry_url: Optional[str]) -> dict:
    """``load_config`` overrides of the alert topics (``--framing``) and the registry (``--registry-url``)."""
    from broker.config import parse_alert_topic

    return {"alert_topics": tuple(parse_alert_topic(f) for f in framing) if framing else None,
            "schema_registry_url": registry_url}


#: A replica id (``--instance``): it becomes part of a transactional id.
_INSTANCE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(str(exc))}")  # escaped: "[[followup.rules]]" is not markup
    raise typer.Exit(2)


def _check_idle_timeout(timeout: Optional[float]) -> None:
    """BrokerError for a ``--timeout`` of NaN: no idle time ever exceeds it, so the command would never stop."""
    if timeout is not None and math.isnan(timeout):
        raise BrokerError("--timeout nan is no number of seconds (leave it out to wait until Ctrl-C)")


def _require_torch(command: str) -> None:
    """Fail with the install line, not an ImportError's traceback, when torch is absent."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        _fail(BrokerError(f"broker {command} needs torch, which is not installed: "
                          "pip install 'transient-broker[classify]'"))


@app.command()
def stage(name: Annotated[str, typer.Argument(help="ingest | subtract | classify | score | alert | archive")],
          bootstrap: Bootstrap, app_id: AppId = "broker", config: ConfigOpt = None,
          state_dir: Annotated[Optional[Path], typer.Option(help="Overrides state_dir of the config.")] = None,
          frame_store: Annotated[Optional[str], typer.Option(help="Overrides frame_store of the config.")] = None,
          metrics_port: Annotated[int, typer.Option(
              min=-1, max=65535, help="Port of /metrics on 127.0.0.1 (0: a free one, -1: none).")] = 0,
          metrics_addr: Annotated[str, typer.Option(help="Address /metrics listens on.")] = "127.0.0.1",
          instance: Annotated[str, typer.Option(
              help="Replica id, unique among the stage's replicas and stable across restarts: an index or a "
                   "pod name (k8s sets BROKER_INSTANCE to the StatefulSet pod's); keys the transactional id "
                   "<app-id>.<stage>.<instance>.", envvar="BROKER_INSTANCE")] = "0",
          framing: FramingOpt = None, registry_url: RegistryOpt = None) -> None:
    """Run one stage until SIGTERM / Ctrl-C (exit code 3 after repeated unexpected errors, 4 when Kafka fails it)."""
    from confluent_kafka import KafkaException

    from broker.config import load_config
    from broker.errors import StageFailure
    from broker.reference import ReferenceStore
    from streams.metrics import StageMetrics
    from streams.runner import EXIT_HUNG
    from streams.settings import KafkaSettings
    from streams.stages import stage as stage_named

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    metrics = StageMetrics(name)
    try:
        spec = stage_named(name)
        if not _INSTANCE.fullmatch(instance):
            raise BrokerError(f"--instance {instance[:80]!r}: 1-64 letters, digits, '.', '_' or '-'")
        cfg = load_config(config, state_dir=state_dir, frame_store=frame_store,
                          **_alert_overrides(framing, registry_url))
        settings = KafkaSettings.load(bootstrap, cfg, app_id)
        runner = _stage_runner(spec, cfg, settings, metrics, instance)
        state = spec.state(cfg) if spec.state else None
        if state is not None:
            metrics.watch_disk(state)
        if spec.references is not None:
            metrics.watch_references(ReferenceStore(spec.references(cfg)))
        settings.verify_login()  # a refused login stops the stage here, with the reason (exit code 2)
    except BrokerError as exc:
        _fail(exc)
    if metrics_port >= 0:
        try:
            port = metrics.serve(metrics_port, metrics_addr)
        except BrokerError as exc:
            _fail(exc)
        print(f"{name}: metrics on http://{metrics_addr}:{port}/metrics", flush=True)
    runner.install_signal_handlers()
    print(f"{name}: consuming {spec.input} from {bootstrap}", flush=True)
    try:
        n = runner.run()
    except StageFailure as exc:
        console.print(f"[red]stopped:[/red] {exc}")
        raise typer.Exit(3) from exc
    except KafkaAuthError as exc:  # credentials revoked or changed while running
        _fail(exc)
    except KafkaException as exc:  # no answer at start-up (init_transactions), fenced by a newer instance, ...
        console.print(f"[red]stopped:[/red] Kafka at {escape(bootstrap)}: {escape(exc.args[0].str())}")
        raise typer.Exit(EXIT_HUNG) from exc
    print(f"{name}: stopped after {n} messages", flush=True)


def _stage_runner(spec: Stage, cfg: PipelineConfig, settings: KafkaSettings, metrics: StageMetrics,
                  instance: str) -> StageRunner | Archiver:
    """The loop of stage ``spec``: the per-message runner over its handler, or the archive's batches."""
    from streams.archiver import Archiver, archive_url
    from streams.runner import StageRunner
    from streams.stages import upstream_of

    if spec.make_handler is None:  # kind "archive"
        return Archiver(cfg.archive, archive_url(cfg), settings, metrics, spec.name, spec.input,
                        cfg.max_consecutive_unexpected, cfg.schema_registry_url)
    return StageRunner(spec.name, spec.input, spec.make_handler(cfg), settings, metrics, instance,
                       upstream=upstream_of(spec, cfg), max_unexpected=cfg.max_consecutive_unexpected,
                       dlq_value_bytes=cfg.dlq_value_bytes, transaction_deadline_s=cfg.transaction_deadline_s)


@app.command()
def topics(bootstrap: Bootstrap,
           filters: Annotated[str, typer.Option(help="Comma-separated bands for alerts.<filter>.")] = "g,r,i",
           partitions: Annotated[int, typer.Option(min=1, help="Partitions per topic.")] = 1,
           config: ConfigOpt = None, framing: FramingOpt = None) -> None:
    """Create the pipeline's topics, the configured alert topics included (existing ones are left alone)."""
    from broker.config import load_config
    from streams.settings import KafkaSettings
    from streams.stages import pipeline_topics
    from streams.topics import create_topics

    try:
        cfg = load_config(config, **_alert_overrides(framing, None))
        settings = KafkaSettings.load(bootstrap, cfg)
        settings.verify_login()
        bands = tuple(band.strip() for band in filters.split(",") if band.strip())  # "g,r,": no topic alerts.
        created = create_topics(settings, pipeline_topics(bands, partitions, cfg))
    except BrokerError as exc:
        _fail(exc)
    console.print(f"created {len(created)} topic(s): {', '.join(created) or '-'}")


@app.command()
def embedded(port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: a free one).")] = 0,
             create: Annotated[bool, typer.Option(help="Create the pipeline topics.")] = True,
             registry: Annotated[bool, typer.Option(
                 help="Also run a small in-memory schema registry (streams/registry.py).")] = True,
             auth: Annotated[bool, typer.Option(
                 help="Require SASL SCRAM-SHA-512 over TLS (a gateway in front of tansu, streams/gateway.py); "
                      "prints the users, their password files and the BROKER_KAFKA_* settings of one.")] = False,
             tls: Annotated[bool, typer.Option(
                 help="With --auth: serve TLS (SASL_SSL). --no-tls serves SASL_PLAINTEXT, for clients that cannot "
                      "do TLS (fink-client's AlertConsumer); on 127.0.0.1 only.")] = True,
             auth_dir: Annotated[Optional[Path], typer.Option(
                 help="Where --auth writes its CA, users and password files (default: a temporary directory, "
                      "removed at exit).")] = None,
             metrics_port: Annotated[int, typer.Option(
                 min=-1, max=65535, help="With --auth: port of the gateway's /metrics (logins, refusals, "
                                         "connections, bytes; 0: a free one, -1: none).")] = -1,
             metrics_addr: Annotated[str, typer.Option(
                 help="Address the gateway's /metrics listens on.")] = "127.0.0.1",
             durable: Annotated[Optional[str], typer.Option(
                 help="Keep everything in this PostgreSQL database (postgresql://user@host/db; password from "
                      "PGPASSWORD) instead of memory: a restart on the same DSN has every topic, record and "
                      "offset (streams/durable.py).", envvar="BROKER_EMBEDDED_DURABLE")] = None) -> None:
    """Run the embedded Kafka-compatible broker (tansu) on 127.0.0.1 until Ctrl-C (or SIGTERM)."""
    from contextlib import nullcontext

    from streams.embedded import EmbeddedKafka
    from streams.registry import EmbeddedRegistry
    from streams.stages import pipeline_topics
    from streams.topics import create_topics

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if auth:  # cryptography (the embedded extra) only then
        from streams.secure_embedded import SecureEmbeddedKafka

        broker: EmbeddedKafka | SecureEmbeddedKafka = SecureEmbeddedKafka(
            port=port or None, directory=auth_dir, tls=tls, metrics_port=metrics_port, metrics_addr=metrics_addr)
    elif metrics_port >= 0:  # tansu itself exports no metrics: the gateway's are the broker's only ones
        _fail(BrokerError("--metrics-port serves the SASL gateway's metrics: it needs --auth"))
    else:
        broker = EmbeddedKafka(port or None, storage=durable)
    if durable:
        from streams.durable import ObjectServer

        try:
            if auth:
                raise BrokerError("--durable and --auth cannot be combined yet")
            ObjectServer(durable).check()  # psycopg installed, the database reachable: else a clear error
        except BrokerError as exc:
            _fail(exc)
    try:
        with broker as kafka, EmbeddedRegistry() if registry else nullcontext() as reg:
            admin = kafka.settings("admin") if not isinstance(kafka, EmbeddedKafka) else kafka.bootstrap
            if create:
                create_topics(admin, pipeline_topics(("g", "r", "i")))
            print(f"bootstrap: {kafka.bootstrap}", flush=True)
            if not isinstance(kafka, EmbeddedKafka):
                print(kafka.describe(), flush=True)
            if reg is not None:
                print(f"schema registry: {reg.url}", flush=True)
            stop.wait()
    except BrokerError as exc:  # the port taken, tansu exiting at start
        _fail(exc)


#: Simulated frames' sides (px): those the ingest stage accepts (``IngestConfig.min_side``, ``max_side``).
SimSide = Annotated[int, typer.Option("--size", min=64, max=16384, help="Frame side (px).")]
SimSeed = Annotated[int, typer.Option("--seed", min=0, help="Random seed.")]


@app.command()
def simulate(out: Annotated[Path, typer.Argument(help="Directory for FITS frames and truth JSON.")],
             frames: Annotated[int, typer.Option(min=0, help="Number of frames.")] = 6,
             size: SimSide = 2048, seed: SimSeed = 1,
             amateur: Annotated[bool, typer.Option(help="A smart telescope instead (docs/telescopes.md): raw Bayer "
                                                        "frames without a WCS, vendor headers; needs the Tycho-2 "
                                                        "index files.")] = False) -> None:
    """Write simulated frames (tile-compressed FITS) and their truth records."""
    from broker.frame import encode_fits
    from broker.simulate import SimConfig, SkySimulator
    from broker.simulate.amateur import amateur_series

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file, or out of reach
        _fail(OSError(f"cannot write to {out}: {exc.strerror or exc}"))
    if amateur:
        try:
            series = amateur_series(frames, seed=seed)
        except BrokerError as exc:
            _fail(exc)
        for name, payload, record in series:
            (out / name).write_bytes(payload)
            (out / f"{name}.truth.json").write_text(json.dumps(record))
            console.print(f"wrote {name}: transient {record['transient']}")
        return
    for frame, truth in SkySimulator(SimConfig(shape=(size, size)), seed=seed).frames(frames):
        (out / f"{frame.meta.frame_id}.fits.fz").write_bytes(encode_fits(frame))
        (out / f"{frame.meta.frame_id}.truth.json").write_text(json.dumps(truth.to_dict()))
        console.print(f"wrote {frame.meta.frame_id}: {len(truth.injections)} injections")


@app.command()
def produce(paths: Annotated[list[Path], typer.Argument(help="FITS files, or one directory with --watch.")],
            bootstrap: Bootstrap, config: ConfigOpt = None,
            watch: Annotated[bool, typer.Option(help="Watch the directory and publish new files.")] = False,
            pattern: Annotated[str, typer.Option(help="Glob of files to watch (default: FITS names in any case: "
                                                      ".fits .fit .fts .fz .gz .bz2).")] = "",
            recursive: Annotated[bool, typer.Option(help="With --watch, also watch every subfolder.")] = False,
            telescope: Annotated[Optional[str], typer.Option(
                help="Telescope (or profile) name of files whose header names none (no TELESCOP, no INSTRUME); "
                     "a header that names one keeps it.")] = None) -> None:
    """Publish FITS frames to the frames topic (validated first; bad files are reported)."""
    from broker.config import load_config
    from broker.headers import telescope_name
    from broker.telescopes import load_profiles
    from streams.frame_auth import FrameSigner
    from streams.framestore import FrameStore
    from streams.producer import FrameProducer
    from streams.producer import watch as watch_dir
    from streams.settings import KafkaSettings

    try:
        if telescope is not None:
            telescope = telescope_name(telescope)
        cfg = load_config(config)
        settings = KafkaSettings.load(bootstrap, cfg)
        settings.verify_login()
        signer = FrameSigner.load(cfg.kafka)
        profiles = load_profiles(cfg.ingest.telescopes_dir)
    except BrokerError as exc:
        _fail(exc)
    producer = FrameProducer(settings, FrameStore(cfg.frame_store), cfg.inline_limit_bytes,
                             cfg.max_frame_bytes, cfg.ingest, signer, profiles, telescope)
    failed = 0
    if watch:
        if len(paths) != 1 or not paths[0].is_dir():
            _fail(BrokerError("--watch takes exactly one directory"))
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        what = (pattern or "FITS files") + (", in every subfolder" if recursive else "")
        console.print(f"watching {paths[0]} for {what} (Ctrl-C to stop)")
        try:
            for path, res in watch_dir(paths[0], producer.publish_file, stop.is_set, pattern or None,
                                       recursive=recursive):
                _report(path, res)
                _flush(producer)  # the file is recorded as sent only once this returns
        except Outage as exc:  # the frame store down: exit 2, the file is sent again by the next start
            _fail(exc)
        return
    for i, path in enumerate(paths):
        try:
            res = producer.publish_file(path)
        except InvalidFrame as exc:
            res = exc
        except Outage as exc:  # the frame store down: what was sent is flushed, the rest named
            _flush(producer)
            _fail(BrokerError(f"{exc}; not sent: {', '.join(map(str, paths[i:i + 5]))}"
                              f"{f' and {len(paths) - i - 5} more' if len(paths) - i > 5 else ''}"))
        _report(path, res)
        failed += any(isinstance(r, Exception) for r in (res if isinstance(res, list) else [res]))
    _flush(producer)
    if failed:
        raise typer.Exit(1)


def _flush(producer: FrameProducer) -> None:
    """Wait for Kafka to take every frame sent; exit 2 naming those it refused or never acknowledged."""
    try:
        producer.flush()
    except (BrokerError, TimeoutError) as exc:
        _fail(exc)


def _report(path: Path, res: list[Published | InvalidFrame] | Exception) -> None:
    """One line per frame sent or refused (a file, or each image of a mosaic file), with the reason of a refusal."""
    for one in res if isinstance(res, list) else [res]:
        if isinstance(one, Exception):
            why = str(one).removeprefix(f"{path}: ")  # the producer's errors name the file too
            console.print(f"[red]rejected[/red] {escape(str(path))}: {escape(why)} "
                          f"[dim]({getattr(one, 'reason', 'error')})[/dim]")
        else:
            how = "inline" if one.inline else "by reference"
            console.print(f"[green]sent[/green] {escape(str(path))} as {escape(one.frame_id)} "
                          f"({one.size_bytes / 1e6:.1f} MB, {how})")


_START_HELP = ("Where a new subscription starts: earliest, latest, an offset (the same on every partition; "
               "beyond the end: the end) or an ISO time (2025-03-01T04:00:00Z; UTC if no zone): each partition "
               "from its first message at or after it. Without it a named --group resumes from its committed "
               "position (earliest if none); given, it applies even to a group with commits.")
_FILTER_HELP = ("Boolean expression over the alert: dotted paths (source.snr, scores.rb, object.ndet, "
                "prv_sources.filter), short names (snr, rb, filter, ndet, telescope, field, latency, class_label, "
                "class_probability) and functions "
                "over the history: ndet(band) detections in band (this one included), nprev(band) previous ones, "
                "since_first(band) and since_last(band) in days, nbands(), nnondet(band) upper limits and "
                "since_nondet(band). "
                "E.g. 'scores.rb > 0.8 and source.snr > 7 and ndet(\"r\") >= 2'.")
_FIELDS_HELP = ("Show only these fields: comma-separated dotted paths, e.g. objectId,source.ra,source.dec,scores.rb "
                "(nested in --json output; path=value in text).")


_WATCH_RADIUS_HELP = "Match radius of the watchlist's entries without a radius column (arcsec)."


@app.command()
def subscribe(bootstrap: Bootstrap,
              topic: Annotated[str, typer.Option(help="Alert topic (alerts, alerts.<filter>).")] = "alerts",
              filter: Annotated[Optional[str], typer.Option("--filter", help=_FILTER_HELP)] = None,
              group: Annotated[Optional[str], typer.Option(
                  help="Consumer group (default: a new one); a named group commits its position.")] = None,
              start: Annotated[Optional[str], typer.Option(help=_START_HELP)] = None,
              fields: Annotated[Optional[str], typer.Option(help=_FIELDS_HELP)] = None,
              png_dir: Annotated[Optional[Path], typer.Option(
                  help="Write each shown alert's cutout triplet as PNG here.")] = None,
              max_alerts: Annotated[Optional[int], typer.Option(help="Stop after this many alerts read.")] = None,
              timeout: Annotated[Optional[float], typer.Option(help="Stop after this many idle seconds.")] = None,
              status_every: Annotated[float, typer.Option(
                  help="Seconds between status lines on stderr (alerts, lag, skipped); 0: none.")] = 5.0,
              registry_url: RegistryOpt = None, config: ConfigOpt = None,
              watchlist: Annotated[Optional[Path], typer.Option(
                  help="Show only alerts within the radius of an entry of this watchlist CSV (ra, dec, optional "
                       "name and radius); each shown with the entries it matched.")] = None,
              watch_radius: Annotated[float, typer.Option(help=_WATCH_RADIUS_HELP)] = 2.0,
              json_out: Annotated[bool, typer.Option(
                  "--json", help="Print each alert as one JSON line (no cutouts).")] = False) -> None:
    """Print alerts as they arrive: from a chosen start, filtered, projected, with the lag.

    Messages that are not alerts of our schema (in any framing) are skipped with a warning on stderr and counted.
    A status line on stderr every --status-every s, and a summary at the end, give the counts and the lag.
    A topic that does not exist is an error (exit code 2) naming the topics that do.
    """
    from broker.config import load_config
    from broker.watchlist import load_watchlist
    from streams.alert_expr import AlertFilter, FieldSelection
    from streams.settings import KafkaSettings
    from streams.subscriber import Subscription, parse_start

    try:
        _check_idle_timeout(timeout)
        if png_dir:
            _check_png_dir(png_dir)
        keep, chosen, where = AlertFilter(filter), FieldSelection(fields), parse_start(start)
        watched = load_watchlist(watchlist, watch_radius) if watchlist else None
        settings = KafkaSettings.load(bootstrap, load_config(config))
        settings.verify_login()
    except BrokerError as exc:
        _fail(exc)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    shown, warn = 0, _SkipWarnings(err)
    sub = Subscription(settings, topic, group, where, on_skip=warn,
                       on_status=lambda st: err.print(f"[dim]{st.line()}[/dim]"), status_every=status_every or 1e9,
                       registry=registry_url)
    try:
        with sub:
            for alert, _ in sub.alerts(timeout, max_alerts):
                near = watched.near(alert["source"]["ra"], alert["source"]["dec"]) if watched else None
                if _matches(keep, alert, sub.stats, warn) and (near is None or near):
                    shown += 1
                    _show_alert(alert, chosen, json_out, png_dir, err, near)
    except BrokerError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass
    err.print(f"{shown} shown; {sub.stats.line()}")


@app.command()
def followup(bootstrap: Bootstrap,
             group: Annotated[Optional[str], typer.Option(
                 help="Consumer group (default: a new one, from the earliest request).")] = None,
             filters: Annotated[Optional[str], typer.Option(
                 help="Bands this telescope observes, comma-separated; other bands are dead-lettered.")] = None,
             max_requests: Annotated[Optional[int], typer.Option(help="Stop after this many valid requests.")] = None,
             timeout: Annotated[Optional[float], typer.Option(help="Stop after this many idle seconds.")] = None,
             config: ConfigOpt = None) -> None:
    """A telescope's side of follow-up: print each valid request on `followup` as one JSON line.

    A request that does not decode, or that asks for the impossible (off-sky or NaN coordinates, an expired
    request, an unknown band, a non-positive exposure, ...), goes to `dlq.followup` with its reason.
    """
    from broker.config import load_config
    from streams.followup import run_listener
    from streams.settings import KafkaSettings

    try:
        _check_idle_timeout(timeout)
        settings = KafkaSettings.load(bootstrap, load_config(config))
        bands = [b.strip() for b in filters.split(",") if b.strip()] if filters else None
        stats = run_listener(settings, group=group, filters=bands, timeout=timeout, max_requests=max_requests)
    except BrokerError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        return
    Console(stderr=True).print(f"{stats.valid} valid request(s); dead letters: {dict(stats.dead_letters) or 'none'}")


@app.command("dead-letters")
def dead_letters_command(
        bootstrap: Bootstrap,
        stage: Annotated[Optional[list[str]], typer.Option(
            help="Stage whose dead letters to read (repeatable); default: every stage, and followup.")] = None,
        reason: Annotated[Optional[str], typer.Option(
            help="Only this reason (unsolvable, solver_backoff, corrupt, undecodable, ...).")] = None,
        key: Annotated[Optional[str], typer.Option(
            help="Only messages whose key holds this text (frames: <telescope>/<field>).")] = None,
        resend: Annotated[bool, typer.Option(
            "--resend", help="Send the selected dead-lettered frames to `frames` again, as they were.")] = False,
        json_out: Annotated[bool, typer.Option(
            "--json", help="One JSON line per dead letter (no value bytes).")] = False,
        timeout: Annotated[float, typer.Option(help="Stop reading after this many seconds.")] = 60.0,
        config: ConfigOpt = None) -> None:
    """List the messages the stages refused, each with its reason; optionally send refused frames again.

    Reads dlq.<stage> from the start to the end without joining a group; a count by stage and reason goes to
    stderr. With --resend each selected dead letter of a frame is produced to `frames` again with its original
    key, headers and value (after fixing what refused it); one kept only in part (a frame over dlq_value_bytes)
    is read back from `frames` while retention keeps it. One that cannot be sent (not a frame, or kept only in
    part and gone from `frames`) is named and skipped.
    """
    from broker.config import load_config
    from streams.deadletters import DEAD_LETTER_STAGES
    from streams.settings import KafkaSettings

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        unknown = sorted(set(stage or ()) - set(DEAD_LETTER_STAGES))
        if unknown:
            raise BrokerError(f"unknown stage(s) {unknown}; known: {', '.join(DEAD_LETTER_STAGES)}")
        settings = KafkaSettings.load(bootstrap, load_config(config))
        settings.verify_login()
        counts = _read_dead_letters(settings, stage or list(DEAD_LETTER_STAGES), reason, key, resend, json_out,
                                    timeout, err)
    except BrokerError as exc:
        _fail(exc)
    err.print(f"dead letters: {', '.join(f'{s} {r}: {n}' for (s, r), n in sorted(counts.items())) or 'none'}")


def _read_dead_letters(settings: KafkaSettings, stages: list[str], reason: Optional[str], key: Optional[str],
                       resend: bool, json_out: bool, timeout: float, err: Console) -> dict[tuple[str, str], int]:
    """Show (and with ``resend`` send again) the selected dead letters; their count by stage and reason."""
    from confluent_kafka import Producer

    from streams.deadletters import dead_letters
    from streams.deadletters import resend as resend_letter

    producer = Producer(settings.producer()) if resend else None
    counts: dict[tuple[str, str], int] = {}
    for letter in dead_letters(settings, stages, timeout):
        rec = letter.record or {}
        if (reason and letter.reason != reason) or (key and key.encode() not in (rec.get("key") or b"")):
            continue
        group = (str(rec.get("stage", letter.topic)), letter.reason)
        counts[group] = counts.get(group, 0) + 1
        _show_dead_letter(letter, json_out)
        if producer is not None:
            try:
                resend_letter(letter, producer, settings)
                err.print(f"sent again: {letter.topic}[{letter.partition}]@{letter.offset}")
            except BrokerError as exc:
                err.print(f"[yellow]not sent again[/yellow]: {escape(printable(exc))}")
    if producer is not None and producer.flush(30):
        raise BrokerError("some frames were not delivered to Kafka within 30 s")
    return counts


def _show_dead_letter(letter: DeadLetter, json_out: bool) -> None:
    """One dead letter as a JSON line or a line of text; whatever its bytes hold is printed escaped."""
    rec = letter.record
    where = f"{letter.topic}[{letter.partition}]@{letter.offset}"
    row: dict[str, object]
    if rec is None:
        row = {"dead_letter": where, "reason": "undecodable", "message": letter.problem}
    else:
        row = {"dead_letter": where, **{k: v for k, v in rec.items() if k not in ("value", "key", "headers")},
               "key": None if rec["key"] is None else rec["key"].decode(errors="backslashreplace"),
               "headers": {k: v.decode(errors="backslashreplace") for k, v in rec["headers"].items()}}
    if json_out:
        print(json.dumps(row), flush=True)
        return
    source = f"{row['topic']}[{row['partition']}]@{row['offset']}" if rec is not None else "-"
    text = f"{where}  {row.get('stage', '-')}  {row['reason']}  {source}  key={row.get('key')}  {row['message']}"
    console.print(escape(printable(text)), soft_wrap=True)


@app.command()
def feedback(object_id: Annotated[Optional[str], typer.Argument(help="The object looked at.")] = None,
             alert_id: Annotated[Optional[str], typer.Argument(help="The alert looked at (candid or alertId).")] = None,
             label: Annotated[Optional[str], typer.Argument(help="interesting | not")] = None,
             who: Annotated[str, typer.Option(help="Who labels (recorded with the label).")] = "operator",
             model: Annotated[str, typer.Option(help="Anomaly model version of the score looked at.")] = "anomaly-v5",
             score: Annotated[Optional[float], typer.Option(help="The anomaly score looked at.")] = None,
             state_dir: Annotated[Path, typer.Option(help="State directory (labels in feedback.sqlite).")] = Path(
                 "var/state"),
             export: Annotated[bool, typer.Option("--export", help="Print every label recorded as JSON lines "
                                                               "instead (no arguments needed).")] = False
             ) -> None:
    """Record an operator's "interesting / not" label of an anomaly (the active-learning hook), or export them."""
    from broker.feedback import FeedbackStore

    try:
        store = FeedbackStore(state_dir / "feedback.sqlite")
    except BrokerError as exc:
        _fail(exc)
    try:
        if export:
            for row in store.export():
                print(json.dumps(row))
            return
        if object_id is None or alert_id is None or label is None:
            raise BrokerError("give OBJECT_ID ALERT_ID LABEL (interesting | not), or --export")
        row_id = store.record(object_id, alert_id, label, who, model, score)
    except BrokerError as exc:
        _fail(exc)
    finally:
        store.close()
    console.print(f"label {row_id}: {object_id} {alert_id} {label} by {who} ({model})")


# --- telescope profiles (broker.telescopes; docs/telescopes.md) -----------------------------------
telescope_app = typer.Typer(help="Telescope profiles: what a telescope's FITS headers lack (docs/telescopes.md).",
                            no_args_is_help=True)
app.add_typer(telescope_app, name="telescope")


@telescope_app.command("add")
def telescope_add(
        name: Annotated[str, typer.Argument(help="Telescope name (letters, digits, ._-); it keys references.")],
        directory: Annotated[Path, typer.Option("--dir", help="Profile directory (\\[ingest] telescopes_dir).")],
        match: Annotated[Optional[list[str]], typer.Option(help="TELESCOP/INSTRUME value that selects it.")] = None,
        gain: Annotated[Optional[float], typer.Option(help="Gain, e-/ADU.")] = None,
        read_noise: Annotated[Optional[float], typer.Option(help="Read noise, e-.")] = None,
        saturation: Annotated[Optional[float], typer.Option(help="Saturation level, ADU.")] = None,
        pixel_scale: Annotated[Optional[float], typer.Option(help="Pixel scale, arcsec/px (unbinned).")] = None,
        filter_map: Annotated[Optional[list[str]], typer.Option("--filter", help="VENDOR=BAND, repeatable.")] = None,
        time_reference: Annotated[str, typer.Option(help="What DATE-OBS marks: start or mid.")] = "start",
        zeropoint_1s: Annotated[Optional[float], typer.Option(help="Nominal zero point, mag for 1 ADU/s.")] = None,
        field_grid: Annotated[float, typer.Option(help="Sky-grid cell for field ids, deg.")] = 0.5,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing profile.")] = False) -> None:
    """Write a telescope profile <dir>/<name>.toml for what the telescope's headers lack."""
    from broker.telescopes import TelescopeProfile, write_profile

    try:
        pairs = [item.split("=", 1) for item in (filter_map or [])]
        if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            raise BrokerError(f"--filter takes VENDOR=BAND, not {filter_map}")
        profile = TelescopeProfile(name=name, match=tuple(match or ()), gain=gain, read_noise=read_noise,
                                   saturation=saturation, pixel_scale_arcsec=pixel_scale,
                                   filters={p[0].strip(): p[1].strip() for p in pairs},
                                   time_reference=time_reference, zeropoint_1s=zeropoint_1s,
                                   field_grid_deg=field_grid)
        path = write_profile(directory, profile, overwrite)
    except BrokerError as exc:
        _fail(exc)
    console.print(f"wrote {path}")


# --- vetting labels (the portal's vetting page; broker.vetting) ----------------------------------
labels_app = typer.Typer(help="The portal's vetting labels: export them for fine-tuning.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")


@labels_app.command("export")
def labels_export(
        out: Annotated[Path, typer.Option(help="Vetted labels file to write (.npz, broker.labelsfile).")],
        labels: Annotated[Optional[Path], typer.Option(
            help="Labels database of the portal (default <state-dir>/labels.sqlite).")] = None,
        archive: Annotated[Optional[str], typer.Option(
            help="Archive the labelled alerts' cutouts are read from (default: that of the config).")] = None,
        config: ConfigOpt = None, state_dir: Annotated[Optional[Path], typer.Option(
            help="The portal's state folder, as for `broker serve` (default: the config's state_dir with a "
                 "config, else that of `broker demo`).")] = None) -> None:
    """Write the latest real/bogus label of each vetted alert, with its cutouts, for `train-realbogus --labels`.

    Labels whose alert is not in the archive, or whose cutouts cannot be decoded, are left out and counted.
    """
    import sqlite3
    from collections import Counter

    from broker.errors import ConfigError, InvalidLabel
    from broker.labelsfile import write_labels
    from broker.vetting import LabelStore, archived_records, export_labels

    try:
        store, cfg = _open_archive(archive, config, _portal_state(config, state_dir))
        path = labels or cfg.state_dir / "labels.sqlite"
        if not path.is_file():
            raise ConfigError(f"no labels database at {path}: vet some alerts on the portal first, or name it "
                              "with --labels")
        with LabelStore(path) as db:
            verdicts = db.latest()
        result = export_labels(verdicts, archived_records(store, [v.alert_id for v in verdicts]))
        if not result.labels:
            raise InvalidLabel(f"no real/bogus label to export from {path} ({len(verdicts)} labelled, "
                               f"left out: {sorted(set(result.skipped.values()))[:5]})")
        n = write_labels(out, result.labels)
    except BrokerError as exc:
        _fail(exc)
    except sqlite3.Error as exc:
        _fail(InvalidLabel(f"{path} is not a labels database of the portal: {exc}"))
    real = sum(lab.label for lab in result.labels)
    console.print(f"wrote {n} label(s) ({real} real, {n - real} bogus) to {out}")
    if result.skipped:
        reasons = Counter(r.split(":")[0] for r in result.skipped.values())
        console.print(f"[yellow]left out {len(result.skipped)}[/yellow]: {dict(reasons)}")


class _SkipWarnings:
    """Warn on stderr about the first 20 skipped messages; the status line counts the rest."""

    def __init__(self, err: Console, first: int = 20) -> None:
        self.err, self.left = err, first

    def __call__(self, skipped: object) -> None:
        from rich.markup import escape

        self.left -= 1
        if self.left >= 0:
            self.err.print(f"[yellow]skipped[/yellow] {escape(printable(str(skipped)))}")
        if self.left == 0:
            self.err.print("[yellow]further skipped messages are only counted[/yellow]")


def _matches(keep: AlertFilter, alert: dict, stats: SubscriptionStats, warn: _SkipWarnings) -> bool:
    """Whether ``alert`` passes ``keep``; one the filter cannot be evaluated on does not, and is counted and warned of.

    The filter language's bounds (``MAX_WALK`` items, string lengths, powers) can be passed by the
    values of one alert (``'r' in prv_sources.filter`` over 20,000 detections), and such an alert,
    which anyone may write, ended the subscription (exit 2): it is skipped (``filter_error``).
    """
    def skipped(exc: FilterExpressionError) -> None:
        stats.skipped["filter_error"] += 1
        warn(f"alert {alert.get('alertId')} (filter_error): {exc}")

    return keep.passes(alert, skipped)


def _show_alert(alert: dict, chosen: FieldSelection, json_out: bool, png_dir: Optional[Path], err: Console,
                near: list[dict] | None = None) -> None:
    """Print one alert (JSON line or text, whole or projected; the watchlist entries ``near`` it); write its PNG."""
    from rich.markup import escape

    from streams.alert_expr import to_json
    from streams.triplet_png import save_triplet_png

    if json_out:
        slim = chosen.apply(alert) if chosen else {k: v for k, v in alert.items() if not k.startswith("cutout")}
        print(to_json(slim | ({"watchlist": near} if near else {})), flush=True)
    else:
        console.print(escape(printable(chosen.text(alert) if chosen else format_alert(alert))))
        if near:
            console.print(escape(printable("  watchlist: " + ", ".join(
                f"{m['name']} ({m['distance_arcsec']:.2f}\")" for m in near))))
    if png_dir:
        path = png_dir / png_name(alert["candid"])
        try:
            png = save_triplet_png(alert, path)
        except OSError as exc:  # the disk full, the folder gone: the alert is shown, its PNG only missing
            err.print(f"[yellow]PNG not written[/yellow] to {escape(str(path))}: {escape(str(exc))}")
            return
        for problem in png.problems:
            err.print(f"[yellow]cutout not drawn[/yellow] in {png.path.name}: {escape(problem)}")


def _check_png_dir(png_dir: Path) -> None:
    """Make ``png_dir`` (and its parents); a ConfigError when it cannot be made or written in.

    Checked before connecting: an unusable ``--png-dir`` (a file, a path under ``/proc``) raised
    ``FileExistsError`` or ``FileNotFoundError`` out of the first alert, a traceback after the group join.
    """
    from broker.errors import ConfigError

    try:
        png_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--png-dir {png_dir} cannot be made a folder: {exc.strerror or exc}") from exc
    if not os.access(png_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--png-dir {png_dir} is not a folder this user may write in")


def png_name(candid: str) -> str:
    """The triplet PNG's file name of candidate ``candid``: ``/`` and NUL as ``_``, a long one cut and hashed.

    Whatever the candidate id (a NUL, 300 characters), the name is one a file system accepts.
    """
    name = candid.replace("/", "_").replace("\x00", "_")
    if len(name) > 64 or len(name.encode()) > 200:
        name = f"{name[:48]}~{hashlib.sha1(candid.encode()).hexdigest()[:12]}"
    return f"{name}.png"


def _score(value: float | None) -> str:
    return " -  " if value is None else f"{value:.2f}"


def passes(alert: dict, rb_cut: float) -> bool:
    """Whether the alert's real/bogus score is at or above ``rb_cut`` (a null score is not)."""
    return alert["scores"]["rb"] is not None and alert["scores"]["rb"] >= rb_cut


def format_alert(alert: dict) -> str:
    """One line of text for an alert: object, candidate, band, position, S/N, magnitude, scores."""
    s, sc = alert["source"], alert["scores"]
    mag = f"{s['magpsf']:.2f}" if s.get("magpsf") is not None else "  -  "
    return (f"{alert['objectId']} {alert['candid']:<28} {s['filter']} RA={s['ra']:9.5f} Dec={s['dec']:+9.5f} "
            f"S/N={s['snr']:+7.1f} mag={mag} rb={_score(sc['rb'])} anomaly={_score(sc.get('anomaly'))} "
            f"ndet={alert['object']['ndet']}")


#: What ``broker demo`` writes in its workdir (streams/demo.py): all it may remove there at its next start.
_DEMO_ENTRIES = frozenset({"logs", "state", "frames"})


def _check_demo_workdir(workdir: Path) -> None:
    """BrokerError unless ``workdir`` is absent, empty or holds only what a demo wrote (it is emptied next)."""
    if not workdir.exists():
        return
    if not workdir.is_dir():
        raise BrokerError(f"--workdir {workdir} is not a folder")
    foreign = sorted(p.name for p in workdir.iterdir() if p.name not in _DEMO_ENTRIES)
    if foreign:
        raise BrokerError(f"--workdir {workdir} holds what the demo did not write ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}): the demo empties its workdir at start; "
                          "name a new or empty folder")


@app.command()
def demo(frames: Annotated[int, typer.Option(min=1, help="Simulated frames to send.")] = 12, size: SimSide = 2048,
         bootstrap: Annotated[Optional[str], typer.Option(help="Use this Kafka instead of the embedded one.")] = None,
         workdir: Annotated[Path, typer.Option(
             help="State, frame store and logs; emptied at start (refused when it holds anything else).")]
         = Path("var/demo"),
         seed: SimSeed = 1,
         interval: Annotated[float, typer.Option(help="Seconds between frames from the simulated telescope "
                                                      "(0: all at once).")] = 8.0,
         rb_cut: Annotated[float, typer.Option(
             help="Real/bogus threshold for printing alerts and the summary.")] = 0.5) -> None:
    """Embedded broker + all stages + simulated telescope + subscriber, then a summary."""
    import shutil

    from broker.simulate import SimConfig
    from streams.demo import run_demo

    try:
        _check_demo_workdir(workdir)
    except BrokerError as exc:
        _fail(exc)
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
    mix = result.class_mix(rb_cut)
    table.add_row(f"classes (rb >= {rb_cut})", ", ".join(f"{k}: {v}" for k, v in mix.items()) or "none")
    table.add_row("  right class, by truth", ", ".join(
        f"{k} {right}/{n}" for k, (right, n) in result.classes_vs_truth(rb_cut).items()) or "none")
    table.add_row("context", ", ".join(f"{k}: {v}" for k, v in result.context_counts().items()))
    for rank, (alert, truth) in enumerate(result.anomaly_top(10, rb_cut), 1):
        label = (alert.get("classification") or {}).get("label", "-")
        table.add_row(f"  anomaly #{rank}" if rank > 1 else f"anomaly top 10 (rb >= {rb_cut})",
                      f"{alert['scores']['anomaly']:.3f} {alert['candid']} rb={_score(alert['scores']['rb'])} "
                      f"class={label}: injected {truth}")
    _followup_rows(table, result)
    if result.archive:
        table.add_row("archive", f"{result.archived} alerts in {result.archive}")
        table.add_row("  query it", f'broker query --archive {result.archive} "SELECT object_id, mjd, ra, dec, rb '
                                    'FROM alerts ORDER BY rb DESC LIMIT 10"')
        table.add_row("  browse it", f"broker serve --state-dir {Path(result.archive).parent}  "
                                     "# then http://127.0.0.1:8000/")
    table.add_row("wall time", f"{elapsed:.0f} s")
    console.print(table)


def _followup_rows(table: Table, result: DemoResult) -> None:
    """The follow-up loop of the demo: requests issued, frames observed for them, new detections there."""
    rules: dict[str, int] = {}
    for r in result.followups:
        rules[r["reason"]["rule"]] = rules.get(r["reason"]["rule"], 0) + 1
    table.add_row("follow-up requests", f"{len(result.followups)} received by the telescope"
                  + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(rules.items()))})" if rules else ""))
    frames = ", ".join(result.followup_frames)
    table.add_row("  observed", f"{len(result.followup_frames)} follow-up frame(s) {frames}; "
                                f"{result.followup_detections()} new detection(s) of requested objects there")


# --- the archive ---------------------------------------------------------------------------------
ArchiveOpt = Annotated[Optional[str], typer.Option(
    "--archive", envvar="BROKER_ARCHIVE",
    help="Archive directory or fsspec URL (default: \\[archive] path of --config, else <state-dir>/archive).")]
StateDirOpt = Annotated[Optional[Path], typer.Option(help="Overrides state_dir of the config.")]
_QUERY_HELP = ("SQL over the view alerts: one row per alert with night, telescope, object_id, alert_id, candid, "
               "frame_id, mjd, ra, dec, filter, snr, magpsf, rb, anomaly, schema_version, kafka_topic, "
               "kafka_partition, kafka_offset, and the whole record as the struct alert (alert.source.flux, "
               "alert.prv_sources, alert.cutoutScience.stampData, ...). Cones: in_cone(ra, dec, ra0, dec0, r_deg) "
               "and ang_sep_deg(ra1, dec1, ra2, dec2). An alert id archived twice is one row of alerts (its first "
               "copy); the view alerts_all holds every copy.")


def _open_archive(archive: Optional[str], config: Optional[Path],
                  state_dir: Optional[Path]) -> tuple[Archive, PipelineConfig]:
    """The archive named by ``--archive`` or the config, and the config; a clear error when there is none."""
    from broker.archive.reader import Archive
    from broker.config import load_config
    from broker.errors import ArchiveError
    from streams.archiver import archive_url

    cfg = load_config(config, state_dir=state_dir)
    store = Archive(archive or archive_url(cfg))
    try:
        found = store.fs.isdir(store.root)
    except Exception as exc:  # each fsspec back-end raises its own: botocore's NoCredentialsError, ...
        raise ArchiveError(f"cannot reach archive {store.url}: {type(exc).__name__}: {exc}") from exc
    if not found:  # nothing there, or a file: either way no archive
        raise ArchiveError(f"no archive at {store.url}: run `broker demo` or the archive stage first, or name one "
                           "with --archive (the demo's is var/demo/state/archive)")
    return store, cfg


@app.command()
def crossmatch(watchlist: Annotated[Path, typer.Argument(
                   help="CSV with a header row: ra and dec (decimal deg or sexagesimal), optional name and "
                        "radius (arcsec); docs/portal.md, 'Watchlists'.")],
               archive: ArchiveOpt = None, config: ConfigOpt = None, state_dir: StateDirOpt = None,
               radius: Annotated[float, typer.Option(help=_WATCH_RADIUS_HELP)] = 2.0,
               since_mjd: Annotated[Optional[float], typer.Option(help="Only alerts at or after this MJD.")] = None,
               limit: Annotated[int, typer.Option(min=1, help="Matches shown or written at most.")] = 100_000,
               out: Annotated[Optional[Path], typer.Option(
                   help="Write the matches to this .csv or .json file instead of printing them.")] = None) -> None:
    """Archived alerts near a watchlist's entries: by entry (its row order), newest first."""
    from broker.watchlist import load_watchlist
    from streams.web.queries import crossmatch as match_archive
    from streams.web.queries import matches_csv

    try:
        if out is not None and out.suffix.lower() not in (".csv", ".json"):  # as query and forced refuse theirs
            raise BrokerError(f"cannot write {out}: the output is .csv or .json")
        wl = load_watchlist(watchlist, radius)
        store, _ = _open_archive(archive, config, state_dir)
        found = match_archive(store, wl, limit, since_mjd)
    except BrokerError as exc:
        _fail(exc)
    summary = (f"{found['matched']} match(es) of {found['entries_matched']} of {len(wl)} entries"
               + (f", the first {limit}" if found["matched"] > limit else ""))
    if out is not None:
        text = json.dumps(found, indent=1) if out.suffix.lower() == ".json" else matches_csv(found["items"])
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            _fail(OSError(f"cannot write {out}: {exc.strerror or exc}"))
        console.print(f"{summary}; written to {escape(str(out))}")
        return
    table = Table("entry", "dist [\"]", "alert_id", "object_id", "mjd", "band", "mag", "rb", "class", caption=summary)
    for i in found["items"]:
        table.add_row(escape(printable(i["watch"]["name"])), f"{i['distance_arcsec']:.2f}", str(i["alert_id"]),
                      escape(printable(i["object_id"])), _fixed(i["mjd"], 5), escape(printable(i["band"])),
                      _fixed(i["magpsf"], 3), _score(i["rb"]), escape(printable(i["class"] or "")))
    console.print(table)


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(value: object) -> Text:
    """A value of a query's result as plain text (a string's ``[red]`` is shown, not read as markup)."""
    if value is None:
        return Text("null", style="dim")
    if isinstance(value, bytes):
        return Text(f"<{len(value)} bytes>")
    if isinstance(value, float):
        return Text(f"{value:.10g}")
    if isinstance(value, dict):  # a record: select its fields (alert.source.ra) to see them
        return Text(f"{{{len(value)} fields}}")
    if isinstance(value, list):
        return Text(f"[{len(value)} items]")
    text = str(value)
    return Text(text if len(text) <= 60 else text[:57] + "...")


def result_table(table: pa.Table, max_rows: int) -> Table:
    """A rich table of the first ``max_rows`` rows of an Arrow table (bytes shown as their size)."""
    out = Table(*map(escape, table.column_names), caption=f"{table.num_rows} row(s)" + (
        f", the first {max_rows} shown (--out writes all)" if table.num_rows > max_rows else ""))
    for row in table.slice(0, max_rows).to_pylist():
        out.add_row(*(_cell(v) for v in row.values()))
    return out


@app.command()
def query(sql: Annotated[str, typer.Argument(help=_QUERY_HELP)], archive: ArchiveOpt = None,
          config: ConfigOpt = None, state_dir: StateDirOpt = None,
          out: Annotated[Optional[Path], typer.Option(
              help="Write the whole result to this .parquet or .csv file instead of printing it.")] = None,
          max_rows: Annotated[int, typer.Option(min=0, help="Rows printed at most.")] = 50,
          verify: Annotated[bool, typer.Option(
              help="First check every archive file against its SHA-256 (reads the whole archive).")] = False) -> None:
    """Run SQL over the alert archive (DuckDB, view alerts): print the result or write it to a file."""
    try:
        store, _ = _open_archive(archive, config, state_dir)
        if out is not None:
            console.print(f"wrote {store.export(sql, out, verify, bounded=True)} row(s) to {out}")
            return
        table = store.query(sql, verify, bounded=True)
    except BrokerError as exc:
        _fail(exc)
    console.print(result_table(table, max_rows))


#: The columns ``broker forced`` prints, with their formats (``--out`` writes every column, unrounded).
_FORCED_COLUMNS = {"mjd": ".5f", "telescope": "", "field": "", "filter": "", "frame_id": "", "flux": ".1f",
                   "flux_err": ".1f", "snr": ".1f", "mag": ".3f", "mag_err": ".3f", "mag_limit": ".2f"}


@app.command()
def forced(ra: Annotated[float, typer.Argument(help="Right ascension (deg, ICRS).")],
           dec: Annotated[float, typer.Argument(help="Declination (deg); a negative one after --: broker forced -- "
                                                     "10.5 -29.3.")],
           config: ConfigOpt = None, state_dir: StateDirOpt = None,
           start_mjd: Annotated[Optional[float], typer.Option(help="Exposures started at or after (MJD).")] = None,
           end_mjd: Annotated[Optional[float], typer.Option(help="Exposures started before (MJD).")] = None,
           min_snr: Annotated[float, typer.Option(help="Least S/N for a magnitude (else a limit).")] = 3.0,
           out: Annotated[Optional[Path], typer.Option(
               help="Write every column to this .csv or .parquet file instead of printing.")] = None) -> None:
    r"""Forced photometry at RA DEC on every kept difference image that covers it, oldest first (broker/forced.py).

    Fluxes are difference fluxes in science ADU on each frame's zero point; a magnitude where the S/N
    reaches --min-snr, else the frame's 5-sigma limiting magnitude. Only the newest \[differences]
    max_frames frames of each telescope, field and band are kept.
    """
    import pyarrow as pa

    from broker.config import load_config
    from broker.diffstore import DifferenceStore
    from broker.forced import forced_light_curve

    try:
        cfg = load_config(config, state_dir=state_dir)
        if not cfg.state_dir.is_dir():
            raise BrokerError(f"no state folder {cfg.state_dir} (--state-dir, or the config's state_dir)")
        points = forced_light_curve(DifferenceStore(cfg.state_dir / "diffs", cfg.differences), ra, dec,
                                    -math.inf if start_mjd is None else start_mjd,
                                    math.inf if end_mjd is None else end_mjd, min_snr)
        if out is not None and out.suffix.lower() not in (".csv", ".parquet"):
            raise BrokerError(f"cannot write {out}: the output is .csv or .parquet")
    except BrokerError as exc:
        _fail(exc)
    if not points:
        console.print(f"no kept difference image under {cfg.state_dir / 'diffs'} covers ra={ra}, dec={dec}")
        return
    if out is None:
        shown = Table(*_FORCED_COLUMNS, caption=f"{len(points)} frame(s); fluxes in science ADU on each frame's "
                      "zero point; mag_limit: 5 sigma")
        for p in points:
            shown.add_row(*("[dim]null[/dim]" if p[k] is None else escape(format(p[k], f))
                            for k, f in _FORCED_COLUMNS.items()))
        console.print(shown)
        return
    _write_table(pa.Table.from_pylist(points), out)
    console.print(f"wrote {len(points)} row(s) to {out}")


def _write_table(table: pa.Table, out: Path) -> None:
    """``table`` to ``out`` (.csv or .parquet); exit 2 naming the file when it cannot be written."""
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if out.suffix.lower() == ".csv":
            pyarrow.csv.write_csv(table, out)
        else:
            pyarrow.parquet.write_table(table, out)
    except OSError as exc:
        _fail(BrokerError(f"cannot write {out}: {exc}"))


@app.command()
def replay(topic: Annotated[str, typer.Option(help="Topic to publish to: it must exist, and not be the archived one.")],
           bootstrap: Bootstrap,
           start: Annotated[Optional[str], typer.Option(
               "--from", help="ISO time (UTC if no zone): alerts of exposures that started at or after it.")] = None,
           end: Annotated[Optional[str], typer.Option(
               "--to", help="ISO time: alerts of exposures that started before it.")] = None,
           where: Annotated[Optional[str], typer.Option(
               help="SQL condition over the alerts view, e.g. \"rb > 0.8 AND filter = 'r'\".")] = None,
           framing: Annotated[str, typer.Option(help="ocf, confluent (needs --registry-url) or fink.")] = "ocf",
           registry_url: RegistryOpt = None, archive: ArchiveOpt = None, config: ConfigOpt = None,
           state_dir: StateDirOpt = None,
           verify: Annotated[bool, typer.Option(
               help="First check the files of the selection against their SHA-256.")] = True) -> None:
    """Republish archived alerts (a time range, a condition) to a topic in any framing, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from streams.framing import FramingConfig
    from streams.replay import replay as replay_alerts
    from streams.replay import selection
    from streams.settings import KafkaSettings

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        store, cfg = _open_archive(archive, config, state_dir)
        fcfg = FramingConfig(framing, "null", registry_url or cfg.schema_registry_url)
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"replay to {topic}", total=None)
            settings = KafkaSettings.load(bootstrap, cfg)
            n = replay_alerts(store, settings, topic, selection(start, end, where), fcfg, verify,
                              on_start=lambda total: progress.update(task, total=total),
                              on_alert=lambda: progress.advance(task))
    except BrokerError as exc:
        _fail(exc)
    console.print(f"replayed {n} alert(s) from {store.url} to {topic} ({framing})")


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
        max_minutes: Annotated[float, typer.Option(help="Wall-clock budget of the training loop.")] = 28.0,
        labels: Annotated[Optional[Path], typer.Option(
            help="Vetted labels file (broker labels export): fine-tune the shipped model on it.")] = None,
        adapt: Annotated[Optional[Path], typer.Option(
            help="Folder of a telescope's unlabelled alerts: re-estimate batch-norm statistics on them.")] = None,
        artifacts: Annotated[int, typer.Option(
            min=0, help="With --labels / --adapt: also fine-tune on this many stamp-level artifacts.")] = 0,
        base: Annotated[Optional[str], typer.Option(
            help="With --labels / --adapt: the model adapted (default: the default version).")] = None) -> None:
    """Generate training data from the simulated pipeline, train the real/bogus CNN, evaluate, write the card.

    With --labels and / or --adapt: adapt the shipped model to a telescope instead (fine-tuning
    guarded against forgetting; its card gives the simulated and real figures before / after).
    """
    _require_torch("train-realbogus")
    from broker import MODELS_DIR
    from broker.realbogus import DEFAULT_VERSION
    from broker.training.generate import default_workers
    from broker.training.main import main_train
    from broker.training.trainer import TrainConfig

    if labels is not None or adapt is not None:
        from broker.training.finetune import FineTuneConfig, main_finetune

        try:
            ft = main_finetune(labels, base=base, version=version, out_dir=out_dir,
                               n_artifacts=artifacts, adapt_dir=adapt,
                               config=FineTuneConfig(seed=seed))
        except BrokerError as exc:
            _fail(exc)
        console.print(f"weights: {ft['weights']}; card: {ft['card']}")
        console.print_json(data={"before": ft["before"], "after": ft["after"]})
        return
    version = version or DEFAULT_VERSION
    workers = workers or default_workers()
    res = main_train(out_dir or MODELS_DIR, seed, version=version, target_n=target_n, test_n=test_n,
                     workers=workers, train_config=TrainConfig(seed=seed, max_seconds=60 * max_minutes))
    console.print(f"weights: {res['weights']}; report: reports/{version}/report.md; "
                  f"{res['seconds_total']:.0f} s")


@app.command("train-lcclass")
def train_lcclass(
        seed: Annotated[int, typer.Option(help="Seeds the simulated light curves and the forest.")] = 0,
        objects: Annotated[int, typer.Option(help="Simulated objects (every detection of each is an alert).")] = 2000,
        version: Annotated[str, typer.Option(help="Model version written.")] = "lcclass-v2",
        out_dir: Annotated[Optional[Path], typer.Option(help="Where the model and card go (default broker/models/).")]
        = None) -> None:
    """Simulate light curves of every class, train the light-curve classifier, evaluate it, write the card."""
    from broker import MODELS_DIR
    from broker.training.lightcurves import main_train_lcclass

    res = main_train_lcclass(seed=seed, n_objects=objects, out=out_dir or MODELS_DIR, version=version)
    console.print(json.dumps({k: v for k, v in res.items() if isinstance(v, (str, int, float))}))


@app.command("train-anomaly")
def train_anomaly(
        seed: Annotated[int, typer.Option(help="Seeds the simulated light curves and the fit.")] = 0,
        objects: Annotated[int, typer.Option(help="Simulated objects of the ordinary classes.")] = 2000,
        version: Annotated[str, typer.Option(help="Model version written.")] = "anomaly-v5",
        out_dir: Annotated[Optional[Path], typer.Option(help="Where the model and card go (default broker/models/).")]
        = None,
        feedback: Annotated[Optional[Path], typer.Option(
            help="Operators' interesting / not labels (feedback.sqlite of `broker feedback` and the portal's "
                 "vetting): the model's terms are re-weighted with them; their alerts are read from the archive. "
                 "The default version then becomes anomaly-v5-feedback (the shipped model stays).")]
        = None,
        archive: ArchiveOpt = None, config: ConfigOpt = None, state_dir: StateDirOpt = None) -> None:
    """Fit the anomaly model on simulated ordinary light curves (bogus included), evaluate it on rare events."""
    from broker import MODELS_DIR
    from broker.anomaly import DEFAULT_VERSION
    from broker.training.lightcurves import main_train_anomaly

    try:
        labelled = _archived_feedback(feedback, archive, config, state_dir) if feedback is not None else None
    except BrokerError as exc:
        _fail(exc)
    if labelled is not None and version == DEFAULT_VERSION:
        version = f"{version}-feedback"
    res = main_train_anomaly(seed=seed, n_objects=objects, out=out_dir or MODELS_DIR, version=version,
                             feedback=labelled)
    console.print(json.dumps({k: v for k, v in res.items() if isinstance(v, (str, int, float))}))


def _archived_feedback(path: Path, archive: Optional[str], config: Optional[Path],
                       state_dir: Optional[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels of the operators' labelled alerts found in the archive; a clear error when none is."""
    import sqlite3

    from broker.anomaly_feedback import archived_labels
    from broker.errors import InvalidLabel
    from broker.feedback import FeedbackStore

    if not path.is_file():
        raise InvalidLabel(f"no feedback file at {path} (labels are recorded by `broker feedback` and the portal)")
    try:
        with FeedbackStore(path) as store:
            labels = store.export()
    except sqlite3.DatabaseError as exc:
        raise InvalidLabel(f"{path} is not a feedback database: {exc}") from exc
    alerts, _ = _open_archive(archive, config, state_dir)
    rows, interesting, skipped = archived_labels(labels, alerts)
    Console(stderr=True).print(f"{len(rows)} of {len(labels)} label(s) used ({int(interesting.sum())} interesting); "
                               f"not used: {skipped}")
    if len(rows) == 0:
        raise InvalidLabel(f"none of the {len(labels)} label(s) in {path} names an archived alert with features "
                           f"({skipped}); name the archive of those alerts with --archive")
    return rows, interesting


@app.command("eval-lightcurves")
def eval_lightcurves(
        out_dir: Annotated[Path, typer.Option(help="Report folder.")] = Path("docs/lightcurve-report"),
        seed: Annotated[int, typer.Option(help="Held-out simulations use seed + 2000 (rare events seed + 2001).")] = 0,
        objects: Annotated[int, typer.Option(help="Simulated held-out objects.")] = 2000) -> None:
    """Report of the light-curve models: confusion matrix, feature importances, anomaly recovery of rare events."""
    from broker.training.lightcurves import main_report

    res = main_report(out_dir=out_dir, seed=seed, n_objects=objects)
    console.print(json.dumps({k: v for k, v in res.items() if isinstance(v, (str, int, float))}))


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
            help="Second model evaluated on the same data.")] = None,
        dev_dir: Annotated[Optional[Path], typer.Option(
            help="Real ZTF dev set (default ../shared/data/ztf_alerts_dev).")] = None,
        surveys_dir: Annotated[Optional[Path], typer.Option(
            help="Other surveys' alerts (default ../shared/data/other_surveys).")] = None) -> None:
    """Evaluate a real/bogus model on held-out simulated and real ZTF triplets; write a Markdown + PNG report."""
    _require_torch("eval-realbogus")
    from broker.training.evaluation import main_eval

    try:
        res = main_eval(model, out_dir, sim_dir, ztf_dir, threshold=threshold, max_sim=max_sim,
                        compare=compare, dev_dir=dev_dir, surveys_dir=surveys_dir)
    except BrokerError as exc:
        _fail(exc)
    console.print(f"report: {out_dir / 'report.md'}")
    summary = {k: {kk: v for kk, v in res[k].items() if not isinstance(v, (list, dict))}
               for k in ("sim", "ztf", "dev") if res.get(k)}
    console.print_json(data=summary)


#: The state folder `broker demo` leaves: the portal's when neither --state-dir nor a config names one.
DEMO_STATE_DIR = Path("var/demo/state")
PortalStateOpt = Annotated[Optional[Path], typer.Option(
    help="The pipeline's state folder: archive, history.sqlite, refs/, diffs/, and the portal's tokens.sqlite "
         "(default: the config's state_dir with --config or BROKER_CONFIG, else that of `broker demo`, "
         "var/demo/state).")]


def _portal_state(config: Optional[Path], state_dir: Optional[Path]) -> Optional[Path]:
    """The ``state_dir`` override of the portal's commands: ``--state-dir``, else none with a config, else the demo's.

    With a config and no ``--state-dir`` the config's ``state_dir`` holds (it was replaced by the demo's, so
    ``broker serve --config`` served another folder than the pipeline's).
    """
    return state_dir if state_dir is not None or config is not None else DEMO_STATE_DIR


@app.command()
def serve(state_dir: PortalStateOpt = None,
          host: Annotated[str, typer.Option(help="Interface to listen on (127.0.0.1: this machine only).")
                          ] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
          archive: Annotated[Optional[str], typer.Option(
              help="Archive directory or URL (default: the config's \\[archive] path, else <state-dir>/archive).")
                             ] = None,
          bootstrap: Annotated[Optional[str], typer.Option(
              help="Kafka, for uploads published to the frames topic and the live alert stream.")] = None,
          config: ConfigOpt = None,
          cors_origin: Annotated[Optional[list[str]], typer.Option(
              help="An origin allowed to call the API from its pages (repeat; default: CORS closed).")] = None,
          private: Annotated[bool, typer.Option(help="Reads need a token with scope read too.")] = False,
          max_upload_mb: Annotated[float, typer.Option(help="Largest upload (MiB).")] = 64.0,
          uploads_per_minute: Annotated[int, typer.Option(help="Uploads per token per minute.")] = 10,
          client_work_s: Annotated[float, typer.Option(
              help="Seconds of costly work (archive reads, images) a client (token, else address) may use a "
                   "minute; 429 beyond.")] = 120.0,
          max_costly: Annotated[int, typer.Option(
              help="Costly requests at work at once (the server keeps one more thread for the cheap reads); "
                   "503 beyond the 64 waiting.")] = 3,
          tap_maxrec: Annotated[int, typer.Option(
              help="Rows a TAP query (/api/v1/tap) answers without MAXREC.")] = 10_000,
          tap_max_maxrec: Annotated[int, typer.Option(
              help="Most rows a TAP query answers whatever its MAXREC (QUERY_STATUS OVERFLOW beyond).")] = 50_000,
          tap_timeout: Annotated[float, typer.Option(
              help="Seconds a TAP query may run before DuckDB is interrupted and an error answered.")] = 30.0,
          ) -> None:
    """The web portal and its REST API (FastAPI + uvicorn): alerts, objects, light curves, uploads, vetting."""
    import uvicorn

    from broker.config import load_config
    from broker.errors import ConfigError
    from streams.archiver import archive_url
    from streams.web.app import create_app
    from streams.web.config import WebConfig

    try:
        if not 0 < max_upload_mb < 1024 * 1024:
            raise ConfigError(f"--max-upload-mb must be within (0, 1048576) MiB, not {max_upload_mb}")
        pipeline = load_config(config, state_dir=_portal_state(config, state_dir))
        state_dir = pipeline.state_dir
        overrides: dict = {"host": host, "port": port, "bootstrap": bootstrap, "pipeline": pipeline,
                           "cors_origins": tuple(cors_origin or ()), "public_read": not private,
                           "max_upload_bytes": int(max_upload_mb * 1024 * 1024), "history": pipeline.history,
                           "uploads_per_minute": uploads_per_minute, "archive": archive or archive_url(pipeline),
                           "client_work_s_per_minute": client_work_s, "max_costly": max_costly,
                           "query_threads": max(4, max_costly + 1),  # one thread left to the cheap reads
                           "tap_maxrec": tap_maxrec, "tap_max_maxrec": tap_max_maxrec, "tap_timeout_s": tap_timeout}
        application = create_app(WebConfig.for_state_dir(state_dir, **overrides))
    except BrokerError as exc:
        _fail(exc)
    where = overrides["archive"]
    if "://" not in where and not Path(where).exists():
        console.print(f"[yellow]no archive at {where}[/yellow]: run `broker demo` first, or pass "
                      "--state-dir / --archive")
    console.print(f"portal on http://{host}:{port}/ (API: /api/v1/, OpenAPI: /openapi.json), state {state_dir}")
    uvicorn.run(application, host=host, port=port, log_level="info", server_header=False,
                timeout_graceful_shutdown=5)


token_app = typer.Typer(help="API tokens of the portal (hashed at rest; scopes read, upload, vet).",
                        no_args_is_help=True)
app.add_typer(token_app, name="token")


def _tokens(config: Optional[Path], state_dir: Optional[Path], tokens: Optional[Path]) -> TokenStore:
    """The token file ``broker serve`` reads with the same options: ``--tokens``, else ``<state-dir>/tokens.sqlite``."""
    from broker.config import load_config
    from streams.web.tokens import TokenStore

    if tokens is None:
        folder = _portal_state(config, state_dir)
        tokens = (folder if folder is not None else load_config(config).state_dir) / "tokens.sqlite"
    return TokenStore(tokens)


TokensOpt = Annotated[Optional[Path], typer.Option(help="Token file (default <state-dir>/tokens.sqlite).")]


@token_app.command("add")
def token_add(name: Annotated[str, typer.Argument(help="Who or what uses the token.")],
              scope: Annotated[list[str], typer.Option(help="read, upload or vet (repeat).")],
              telescope: Annotated[Optional[list[str]], typer.Option(
                  help="A telescope whose frames the token may publish (scope upload; repeat), as the pipeline "
                       "records it (its TELESCOP, or its profile's name). Without one, an upload token may only "
                       "predict.")] = None,
              state_dir: PortalStateOpt = None, tokens: TokensOpt = None,
              config: ConfigOpt = None) -> None:
    """Create a token and print it once (only its salted hash is kept)."""
    from streams.web.tokens import check_telescopes

    try:
        bound = check_telescopes(telescope or ())  # before the file is opened: a bad name creates nothing
        clear = _tokens(config, state_dir, tokens).add(name, scope, bound)
    except BrokerError as exc:
        _fail(exc)
    may = (f"; publishes telescopes {', '.join(map(repr, bound))}" if bound
           else "; predict only, publishes no telescope" if "upload" in scope else "")
    console.print(f"token for {escape(name)} (scopes {', '.join(sorted(set(scope)))}{escape(may)}); "
                  "shown once, keep it:")
    print(clear)


@token_app.command("list")
def token_list(state_dir: PortalStateOpt = None, tokens: TokensOpt = None, config: ConfigOpt = None) -> None:
    """The tokens: id, name, scopes, telescopes it may publish, created, revoked (no secret is stored).

    An upload token bound to no telescope is listed ``predict only``: it may not publish.
    """
    from rich.table import Column

    try:
        listed = _tokens(config, state_dir, tokens).list()
    except BrokerError as exc:
        _fail(exc)
    widest = min(24, max((len(t.name) for t in listed), default=4))  # names whole in 80 columns, up to 24 characters
    table = Table(Column("id", no_wrap=True), Column("name", min_width=widest, overflow="fold"), "scopes",
                  Column("telescopes", overflow="fold"), "created (UTC)", "revoked (UTC)")
    for t in listed:
        stamp = (lambda s: time.strftime("%Y-%m-%d %H:%M", time.gmtime(s)) if s else "")  # noqa: E731
        bound = ", ".join(t.telescopes) if t.telescopes else "predict only" if "upload" in t.scopes else ""
        table.add_row(t.token_id, escape(printable(t.name)), ", ".join(t.scopes), escape(printable(bound)),
                      stamp(t.created), stamp(t.revoked))
    console.print(table)


@token_app.command("revoke")
def token_revoke(key: Annotated[str, typer.Argument(help="Token id or name.")],
                 state_dir: PortalStateOpt = None, tokens: TokensOpt = None, config: ConfigOpt = None) -> None:
    """Revoke the active tokens of an id or a name."""
    try:
        n = _tokens(config, state_dir, tokens).revoke(key)
    except BrokerError as exc:
        _fail(exc)
    if not n:
        _fail(BrokerError(f"no active token with id or name {key!r}"))
    console.print(f"revoked {n} token(s)")


@app.command()
def explain(path: Annotated[Path, typer.Argument(
    help="Avro alert file, or .npz (science/reference/difference, or a shard's x).")],
            index: Annotated[int, typer.Option(help="Record / row in the file.")] = 0,
            out: Annotated[Optional[Path], typer.Option(
                help="PNG (default: <stem>-<index>-explain.png next to the input).")] = None,
            model: Annotated[Optional[str], typer.Option(help="Model version or .pt path.")] = None,
            steps: Annotated[int, typer.Option(help="Integrated-gradients steps.")] = 64) -> None:
    """Attribution map (integrated gradients) of the real/bogus score of one triplet, as a PNG."""
    _require_torch("explain")
    from broker.explain import main_explain

    try:
        console.print(f"wrote {main_explain(path, index, out, model, steps)}")
    except BrokerError as exc:
        _fail(exc)


if __name__ == "__main__":
    app()
