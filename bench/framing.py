"""Alert framing benchmark: encode and decode alerts/s per core for each framing, on real alerts.

    python -m bench.framing [--size 1024] [--science 3] [--repeat 7]

Real alerts: ``--science`` simulated frames of one field (after the 3 that build its reference) go
through the stages' own handlers (``bench.alert_stage.scored_messages``: ingest, subtract, classify,
score) and the alert handler, so the alerts carry real cutouts (FITS with WCS), history and forced
photometry. Each framing's :class:`~streams.framing.AlertEncoder` then encodes all of them, and
:func:`~streams.framing.decode_alert` and the framing's own client path decode them (hop-client's
``AvroBlob``, fink-client's per-message schema parse + ``schemaless_reader``, confluent-kafka's
``AvroDeserializer`` with a ``mock://`` registry), one thread, CPU time (one core), median of ``--repeat``
passes interleaved across the framings.
Writes the section ``framing`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import statistics
import time
from collections.abc import Callable

import fastavro

import schemas
from bench.alert_stage import scored_messages
from bench.common import git_rev, machine, write_section
from broker.config import load_config
from streams import serde
from streams.framing import AlertEncoder, Framed, FramingConfig, decode_alert, registry_client
from streams.stages import alert_handler

REGISTRY = "mock://bench-framing"


def real_alerts(size: int, n_science: int) -> list[dict]:
    """The alerts the alert handler makes from ``n_science`` subtracted frames."""
    handle = alert_handler(load_config())
    alerts = []
    for msg in scored_messages(size, n_science):
        alerts += [a for o in handle(msg) if o.topic == "alerts" for a in decode_alert(o.key, o.value, o.headers)]
    return alerts


def _cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU time of one call of ``fn()`` in this one-threaded process: one core's time, whatever else runs."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _client_decoders() -> dict[str, Callable[[Framed], object]]:
    """Each framing's decoding as its usual client does it."""
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext
    from hop.models import AvroBlob

    rubin = AvroDeserializer(registry_client(REGISTRY))
    ctx = SerializationContext("alerts-rubin", MessageField.VALUE)

    def fink(m: Framed) -> object:  # fink_client.consumer.AlertConsumer.process_message
        parsed = fastavro.schema.parse_schema(json.loads((m.key or b"").decode("utf8")))
        return fastavro.schemaless_reader(io.BytesIO(m.value), parsed)

    return {"ocf": lambda m: AvroBlob.deserialize(m.value).content, "fink": fink,
            "confluent": lambda m: rubin(m.value, ctx)}


def measure(alerts: list[dict], repeat: int) -> list[tuple[str, str, float, float, float, float]]:
    """Per framing: (framing, client, bytes per message, encode/s, decode_alert/s, client decode/s).

    The passes are interleaved (each pass times every framing's three paths in turn), so that a change
    of the machine's load during the run weighs on every framing alike; each rate is ``len(alerts)``
    over the median of its ``repeat`` passes.
    """
    clients = _client_decoders()
    names = {"ocf": "hop-client AvroBlob (= fastavro.reader)", "confluent": "AvroDeserializer + registry",
             "fink": "fink-client (schema parsed per message)"}
    paths: dict[str, list[Callable[[], object]]] = {}
    sizes = {}
    for framing in names:
        enc = AlertEncoder(FramingConfig(framing, registry_url=REGISTRY), topic=f"alerts-{framing}")
        msgs = [enc.encode(a, str(a["objectId"]).encode()) for a in alerts]
        for m, a in zip(msgs, alerts, strict=True):  # byte-identical round trip (NaN != NaN as values)
            (back,) = decode_alert(m.key, m.value, m.headers)
            assert serde.encode("alert", back) == serde.encode("alert", a)
        sizes[framing] = statistics.mean(len(m.value) + len(m.key or b"") for m in msgs)
        paths[framing] = [lambda e=enc: [e.encode(a, b"k") for a in alerts],
                          lambda ms=msgs: [decode_alert(m.key, m.value, m.headers) for m in ms],
                          lambda ms=msgs, f=clients[framing]: [f(m) for m in ms]]
    times: dict[str, list[list[float]]] = {f: [[], [], []] for f in names}
    for _ in range(repeat):
        for framing, fns in paths.items():
            for kept, fn in zip(times[framing], fns, strict=True):
                kept.append(_cpu_seconds(fn))
    n = len(alerts)
    return [(f, names[f], sizes[f], *(n / statistics.median(t) for t in times[f])) for f in names]


def _report(args: argparse.Namespace, alerts: list[dict], rows: list) -> str:
    version = schemas.CURRENT["alert"]
    lines = [
        "## Alert framings",
        "",
        f"Machine: {machine()}. Date {datetime.date.today()}, commit {git_rev()}. Command: "
        f"`python -m bench.framing --size {args.size} --science {args.science} --repeat {args.repeat}`.",
        "",
        f"{len(alerts)} real `alert/v{version}` alerts (the alert handler's, from {args.science} subtracted "
        f"{args.size}x{args.size} simulated frames: FITS cutouts with WCS, history, forced photometry), one "
        f"thread, alerts per CPU second (one core; the machine is shared, so CPU time, not wall time), median "
        f"of {args.repeat} passes interleaved across the framings. Goal: >= 5,000/s/core encoding.",
        "",
        "| framing | bytes / message (value + key) | encode /s | `decode_alert` /s | client's own decoding | its /s |",
        "|---|---|---|---|---|---|",
    ]
    for framing, client, size, enc, dec, cli in rows:
        lines.append(f"| `{framing}` | {size:,.0f} | {enc:,.0f} | {dec:,.0f} | {client} | {cli:,.0f} |")
    lines += ["", "`decode_alert` checks every writer schema against the repository's alert versions (Parsing "
              "Canonical Form, cached) and reads containers block by block with a bounded decompression; "
              "the `fink` key carries the whole writer schema (docs included) in every message."]
    return "\n".join(lines)


def main() -> None:
    """Measure and write the ``framing`` section of BENCHMARKS.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="frame side (px)")
    ap.add_argument("--science", type=int, default=3, help="subtracted frames whose alerts are used")
    ap.add_argument("--repeat", type=int, default=7, help="timed passes over all alerts (median)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    alerts = real_alerts(args.size, args.science)
    if not alerts:
        raise SystemExit("no alerts: the simulated frames gave no candidates")
    text = _report(args, alerts, measure(alerts, args.repeat))
    print(text)
    if not args.no_write:
        write_section("framing", text)


if __name__ == "__main__":
    main()
