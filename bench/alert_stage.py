"""Alert stage benchmark: alerts/s per core of the alert handler, of build_alert, and of the v1 builder.

    python -m bench.alert_stage [--size 2048] [--science 3] [--repeat 15]

Real batches: ``--science`` simulated ``--size``² frames of one field (after the 3 that build its
reference) go through the stages' own handlers (ingest, subtract, classify, score), so the
candidates carry real cutouts, history and forced photometry. The alert handler is then timed on
each scored message (decode, cutouts as FITS with WCS, gzip, Avro container encoding, both output
messages), and ``build_alert`` and ``build_alert`` + encoding on the decoded candidates; the v1
builder (commit 202a7f0: ``astropy.io.fits`` stamps, gzip level 6, ``alert/v1``) is timed side by
side as the "before". All in one process on one thread, in CPU time of the thread. Also the gzip
level of the stamps: size against time, zlib and ISA-L. Writes the section ``alert-stage`` of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import io
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import fastavro
import numpy as np
from astropy.io import fits

import schemas
from bench.common import git_rev, machine, write_section
from broker.alert import PUBLISHER, FrameContext, alert_id, build_alert, fits_image, frame_context
from broker.candidate import Candidate
from broker.config import load_config
from broker.errors import SchemaError
from broker.frame import encode_fits
from broker.simulate import SimConfig, SkySimulator
from streams import serde, topics
from streams.framing import AlertEncoder, FramingConfig
from streams.producer import frame_headers, frame_record
from streams.runner import InMessage, OutMessage
from streams.stages import STAGE_NAMES, STAGES

MODELS = {"rb": "realbogus-v11", "anomaly": "anomaly-v5"}
TIMING = {"exposure_end": 1.8e9, "stages": [{"stage": "ingest", "start": 1.8e9 + 1.0, "end": 1.8e9 + 1.5}]}


# --- the v1 builder (broker/alert.py at 202a7f0), the "before" -------------------------------------
def _v1_stamp(image: np.ndarray, name: str) -> dict:
    buf = io.BytesIO()
    fits.PrimaryHDU(np.asarray(image, dtype=np.float32)).writeto(buf)
    return {"fileName": name, "stampData": gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)}


def v1_build_alert(ctx: FrameContext, cand: Candidate, model_versions: dict[str, str], timing: dict,
                   alert_time: float) -> dict:
    """The ``alert/v1`` record as the v1 builder made it (astropy stamps, gzip level 6)."""
    det, obj = cand.detection, cand.obj
    if obj is None or cand.anomaly is None:
        raise SchemaError(f"candidate {cand.cand_id} has not been classified and scored")
    mag = sig = None
    if ctx.magzp is not None and det.flux != 0:
        mag = float(ctx.magzp - 2.5 * np.log10(abs(det.flux)))
        sig = float(2.5 / np.log(10) * det.flux_err / abs(det.flux))
    name = cand.cand_id.replace("/", "_")
    keys = ("mjd", "filter", "ra", "dec", "flux", "flux_err", "snr", "rb")
    return {
        "schemavsn": "1.0", "publisher": PUBLISHER, "alertId": alert_id(cand.cand_id), "objectId": obj.object_id,
        "candid": cand.cand_id,
        "source": {
            "mjd": ctx.mjd_start, "exptime": ctx.exptime, "filter": ctx.filter, "ra": det.ra, "dec": det.dec,
            "x": det.x, "y": det.y, "flux": det.flux, "flux_err": det.flux_err, "snr": det.snr,
            "scorr": det.scorr, "isdiffpos": bool(det.flux > 0), "magpsf": mag, "sigmapsf": sig,
            "fwhm": det.fwhm, "elongation": det.elongation, "dipole": det.dipole, "n_bad": det.n_bad,
            "ref_dist": det.ref_dist, "ref_flux": det.ref_flux,
        },
        "object": {"objectId": obj.object_id, "ra": obj.ra, "dec": obj.dec, "ndet": obj.ndet,
                   "first_mjd": obj.first_mjd},
        "prv_sources": [{"candid": h["cand_id"], **{k: h[k] for k in keys}} for h in cand.history],
        "cutoutScience": _v1_stamp(cand.science, f"{name}_sci.fits.gz"),
        "cutoutTemplate": _v1_stamp(cand.reference, f"{name}_ref.fits.gz"),
        "cutoutDifference": _v1_stamp(cand.difference, f"{name}_diff.fits.gz"),
        "scores": {"rb": cand.rb, "rb_model": model_versions["rb"], "anomaly": float(cand.anomaly),
                   "anomaly_model": model_versions["anomaly"]},
        "provenance": {"telescope": ctx.telescope, "field": ctx.field, "frame_id": ctx.frame_id,
                       "reference_frames": list(ctx.reference_frames), "pipeline_version": "v1"},
        "timing": {**timing, "alert_time": alert_time},
    }


def _v1_encode(record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, schemas.load("alert", 1), [record])
    return buf.getvalue()


def v1_handle(msg: InMessage) -> list[OutMessage]:
    """The v1 alert handler: decode, v1 builder, one container file, two output messages."""
    batch = serde.decode("candidates", msg.value, msg.headers)
    ctx = FrameContext(batch["frame_id"], batch["telescope"], batch["field"], batch["filter"], batch["mjd_start"],
                       batch["exptime"], batch["magzp"], tuple(batch["reference_frames"]))
    outs = []
    for rec in batch["candidates"]:
        alert = v1_build_alert(ctx, serde.record_to_candidate(rec), batch["model_versions"], TIMING, time.time())
        body = _v1_encode(alert)
        key = alert["objectId"].encode()
        outs += [OutMessage(topics.ALERTS, body, key, {}),
                 OutMessage(topics.alerts_for_filter(ctx.filter), body, key, {})]
    return outs


# --- real scored batches --------------------------------------------------------------------------
def scored_messages(size: int, n_science: int) -> list[InMessage]:
    """The ``scored`` messages of ``n_science`` subtracted frames (handlers of ingest..score)."""
    sim = SkySimulator(SimConfig(shape=(size, size), fields=("F001",), filters=("r",)), seed=7)
    workdir = Path(tempfile.mkdtemp(prefix="bench-alert-"))
    try:
        config = load_config(state_dir=str(workdir / "state"), frame_store=str(workdir / "frames"))
        upstream = STAGES[:STAGE_NAMES.index("alert")]  # ingest .. score
        handlers = {s.name: s.make_handler(config) for s in upstream}
        out = []
        for offset, (frame, _) in enumerate(sim.frames(3 + n_science)):
            payload = encode_fits(frame)
            msg = InMessage(topics.FRAMES, 0, offset, b"bench", serde.encode("frame", frame_record(frame, payload)),
                            frame_headers(time.time()), 0)
            for stage in upstream:
                mine = [o for o in handlers[stage.name](msg) if o.topic == stage.output]
                if not mine:
                    break
                msg = InMessage(mine[0].topic, 0, offset, mine[0].key, mine[0].value, mine[0].headers, 0)
            else:
                if serde.decode("candidates", msg.value, msg.headers)["candidates"]:
                    out.append(msg)
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _best(fn: Callable[[], object], repeat: int) -> float:
    """Median CPU time of this thread in ``fn()`` over ``repeat`` calls (s).

    CPU time, not wall time: the work is single-threaded and never waits, and on a shared machine
    wall time would also count other processes' turns on the core.
    """
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def handler_rates(messages: list[InMessage], repeat: int) -> list[tuple[int, float, float]]:
    """Per batch: (alerts, s per batch now, s per batch with the v1 handler)."""
    handle = STAGES[STAGE_NAMES.index("alert")].make_handler(load_config())
    rows = []
    for msg in messages:
        n = len(serde.decode("candidates", msg.value, msg.headers)["candidates"])
        rows.append((n, _best(lambda m=msg: handle(m), repeat), _best(lambda m=msg: v1_handle(m), repeat)))
    return rows


def builder_rates(messages: list[InMessage], repeat: int) -> dict[str, float]:
    """Alerts/s of the builders alone and with encoding over every candidate of the batches; alert contents."""
    batches = []
    for msg in messages:
        batch = serde.decode("candidates", msg.value, msg.headers)
        batches.append((batch, [serde.record_to_candidate(r) for r in batch["candidates"]]))
    work = [(frame_context(batch), cand) for batch, cands in batches for cand in cands]
    encoder = AlertEncoder(FramingConfig())  # the alert stage's default framing: one OCF per alert
    n = len(work)

    def fresh() -> list[tuple[FrameContext, Candidate]]:
        """A new context per frame and run: the per-frame WCS parse is timed too."""
        return [(ctx, cand) for batch, cands in batches for ctx in [frame_context(batch)] for cand in cands]

    cases = {
        "build_alert (v2)": lambda: [build_alert(c, cand, MODELS, TIMING, 0.0) for c, cand in fresh()],
        "build_alert + OCF encoding (v2)": lambda: [encoder.encode(build_alert(c, cand, MODELS, TIMING, 0.0), b"k")
                                                    for c, cand in fresh()],
        "v1 builder": lambda: [v1_build_alert(c, cand, MODELS, TIMING, 0.0) for c, cand in work],
        "v1 builder + OCF encoding": lambda: [_v1_encode(v1_build_alert(c, cand, MODELS, TIMING, 0.0))
                                              for c, cand in work],
    }
    alerts = [build_alert(c, cand, MODELS, TIMING, 0.0) for c, cand in work]
    means = {key: float(np.mean([len(a[key]) for a in alerts]))
             for key in ("prv_sources", "prv_nondetections", "prv_forced_sources")}
    means["kB"] = float(np.mean([len(encoder.encode(a, b"k").value) for a in alerts])) / 1e3
    return {name: n / _best(fn, repeat) for name, fn in cases.items()} | {"n": n} | means


def gzip_levels(messages: list[InMessage], repeat: int) -> list[tuple[str, float, float]]:
    """(compressor, mean bytes per stamp, us per stamp) on the FITS stamps of the batches."""
    raws = []
    for msg in messages:
        for rec in serde.decode("candidates", msg.value, msg.headers)["candidates"]:
            cand = serde.record_to_candidate(rec)
            raws += [fits_image(img, []) for img in (cand.science, cand.reference, cand.difference)]
    cases: dict[str, Callable[[bytes], bytes]] = {"none": lambda r: r}
    cases |= {f"zlib {lvl}": (lambda r, lvl=lvl: zlib.compress(r, lvl, wbits=31)) for lvl in (1, 6, 9)}
    try:
        from isal import isal_zlib

        cases |= {f"isal {lvl}": (lambda r, lvl=lvl: isal_zlib.compress(r, lvl, wbits=31)) for lvl in (0, 1, 2, 3)}
    except ImportError:
        pass
    rows = []
    for name, fn in cases.items():
        sizes = [len(fn(r)) for r in raws]
        rows.append((name, float(np.mean(sizes)), _best(lambda fn=fn: [fn(r) for r in raws], repeat) / len(raws) * 1e6))
    return rows


def _report(args: argparse.Namespace, rows: list, rates: dict, levels: list, stamp_raw: int) -> str:
    n_alerts = sum(n for n, _, _ in rows)
    now, before = sum(t for _, t, _ in rows), sum(t for _, _, t in rows)
    lines = [
        "## Alert stage",
        "",
        f"Machine: {machine()}. Date {datetime.date.today()}, commit {git_rev()}. Command: "
        f"`python -m bench.alert_stage --size {args.size} --science {args.science} --repeat {args.repeat}`.",
        "",
        f"The alert handler on the `scored` batches of {len(rows)} simulated {args.size}x{args.size} frames (real "
        "cutouts, history and forced photometry; decode, three gzipped FITS cutouts with WCS, Avro container "
        "encoding, both output messages), one process, one thread, CPU time of the thread; median of "
        f"{args.repeat} runs per batch. Before: the v1 handler (commit 202a7f0: `astropy.io.fits` stamps, gzip 6).",
        "",
        "| batch | alerts | v2 handler (s) | alerts/s/core | v1 handler (s) | alerts/s/core |",
        "|---|---|---|---|---|---|",
    ]
    for i, (n, t, t1) in enumerate(rows):
        lines.append(f"| {i + 1} | {n} | {t:.4f} | {n / t:.0f} | {t1:.4f} | {n / t1:.0f} |")
    lines += [f"| **all** | **{n_alerts}** | {now:.4f} | **{n_alerts / now:.0f}** | {before:.4f} | "
              f"**{n_alerts / before:.0f}** |", "",
              "On a shared machine (see the load average) the figures vary from run to run, CPU time included "
              "(caches, clock): compare the columns of one run.", "",
              f"Builders alone on the same {rates['n']} candidates (alerts/s/core; v2 includes the per-frame "
              "WCS parse):",
              "", "| step | alerts/s/core |", "|---|---|"]
    lines += [f"| {name} | {rate:.0f} |" for name, rate in rates.items() if "build" in name]
    lines += ["", f"An alert carries on average {rates['prv_sources']:.1f} previous sources, "
              f"{rates['prv_nondetections']:.1f} upper limits and {rates['prv_forced_sources']:.1f} forced sources, "
              f"and weighs {rates['kB']:.1f} kB as a container file."]
    lines += ["", f"gzip of the FITS stamps ({stamp_raw} bytes each uncompressed): the stamps use ISA-L level 1 "
              "(`broker.alert.STAMP_COMPRESSLEVEL`; zlib level 1 without `isal`).", "",
              "| compressor, level | bytes per stamp | CPU us per stamp |", "|---|---|---|"]
    lines += [f"| {name} | {size:.0f} | {us:.0f} |" for name, size, us in levels]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and write its section."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=2048, help="frame side (px)")
    ap.add_argument("--science", type=int, default=3, help="subtracted frames (after the 3 reference frames)")
    ap.add_argument("--repeat", type=int, default=15, help="runs per timing (median)")
    args = ap.parse_args()
    messages = scored_messages(args.size, args.science)
    if not messages:
        raise SystemExit("no candidates: nothing to time")
    rows = handler_rates(messages, args.repeat)
    rates = builder_rates(messages, args.repeat)
    levels = gzip_levels(messages, args.repeat)
    text = _report(args, rows, rates, levels, len(fits_image(np.zeros((63, 63), np.float32), [])))
    write_section("alert-stage", text)
    print(text)


if __name__ == "__main__":
    main()
