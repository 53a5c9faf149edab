"""Archive benchmark: write throughput and query times over 10^6 alerts (``broker/archive/``, no Kafka).

    python -m bench.archive [--alerts 1000000] [--write-alerts 20000] [--batch 2000]

Alerts are the published sample alert of the current schema (``schemas/alert/samples``) with their
own object id, candidate id, position, time, band and scores. Two archives are written through
:class:`broker.archive.writer.ArchiveWriter`, in batches of ``--batch`` alerts (one commit each, as the
archive stage does with its default ``batch_alerts``):

- ``--write-alerts`` alerts with cutouts of the sample's sizes (random bytes, as incompressible as
  gzipped FITS): write throughput (alerts/s, MB/s), as the archive stage does it (decode each OCF
  message, then rows, files and commit per batch) and from records;
- ``--alerts`` alerts with 64-byte random stand-ins for the cutouts (10^6 alerts with cutouts would
  take ~20 GB here): query times. A query reads only the columns it names (Parquet is columnar),
  so the cutouts' size changes the disk used, not what these queries read.

Each query is timed from a fresh :class:`Archive` (commit log read, file sizes checked, DuckDB view
made) to its result; median of ``--repeat`` runs. Then ``--copies`` of the alerts are archived a
second time and the view's cost of keeping one row per alert id is timed. Writes BENCHMARKS.md
section ``archive``.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import time
from pathlib import Path

import fastavro
import numpy as np

import schemas
from bench.common import git_rev, machine, write_section
from broker.archive.log import OffsetRange
from broker.archive.reader import Archive
from broker.archive.rows import Archived, to_batch, version_of
from broker.archive.writer import ArchiveWriter
from streams.framing import AlertEncoder, FramingConfig, decode_alert

FILTERS = ("g", "r", "i")


CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


def template() -> dict:
    """The current version's sample alert."""
    version = schemas.CURRENT["alert"]
    data = (schemas.ROOT / "alert" / "samples" / f"v{version}.avro").read_bytes()
    (rec,) = fastavro.reader(io.BytesIO(data))
    return rec


#: Alerts a night: 10^6 over 30 nights (a batch of 2000 then spans ~3 min of a night, as in a stream).
PER_NIGHT = 1_000_000 / 30


class Sky:
    """Objects in a 10 x 10 deg patch, ~5 alerts each, :data:`PER_NIGHT` alerts a night, in time order."""

    def __init__(self, n: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        n_obj = max(1, n // 5)
        self.obj_ra = rng.uniform(150.0, 160.0, n_obj)
        self.obj_dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-5.0)), np.sin(np.radians(5.0)), n_obj)))
        self.obj = rng.integers(0, n_obj, n)
        jitter = rng.normal(0.0, 0.1 / 3600, (2, n))
        self.ra = self.obj_ra[self.obj] + jitter[0]
        self.dec = self.obj_dec[self.obj] + jitter[1]
        self.mjd = 60000.3 + np.sort(rng.uniform(0.0, n / PER_NIGHT, n))
        self.band = rng.integers(0, len(FILTERS), n)
        self.snr = rng.uniform(5.0, 50.0, n)
        self.rb = rng.uniform(0.0, 1.0, n)
        self.rng = rng


def alert(tpl: dict, sky: Sky, i: int, stamp: int | None) -> dict:
    """Alert ``i``: the template with its own ids, position, time, band, scores and cutouts.

    Cutouts of random bytes, ``stamp`` bytes each (None: the sample's sizes); other sub-records shared.
    """
    rec = dict(tpl)
    for name in CUTOUTS:
        rec[name] = {**tpl[name], "stampData": sky.rng.bytes(stamp or len(tpl[name]["stampData"]))}
    oid = f"OBJ{sky.obj[i]:011x}"
    rec["objectId"], rec["candid"], rec["alertId"] = oid, f"BENCH-{i}/0", i
    rec["source"] = {**tpl["source"], "ra": float(sky.ra[i]), "dec": float(sky.dec[i]), "mjd": float(sky.mjd[i]),
                     "filter": FILTERS[sky.band[i]], "snr": float(sky.snr[i]),
                     "magpsf": float(27.0 - 2.5 * np.log10(100.0 * sky.snr[i]))}
    rec["object"] = {**tpl["object"], "objectId": oid}
    rec["scores"] = {**tpl["scores"], "rb": float(sky.rb[i])}
    return rec


def write(root: Path, n: int, batch: int, stamp: int | None, decode: bool) -> dict:
    """Write ``n`` alerts in batches; seconds spent (decoding and) building rows, writing files, committing."""
    shutil.rmtree(root, ignore_errors=True)
    tpl, sky, encoder = template(), Sky(n), AlertEncoder(FramingConfig("ocf"))
    version = version_of(tpl)
    writer = ArchiveWriter(Archive(root))
    writer.recover()
    t = {"rows": 0.0, "files": 0.0, "commit": 0.0, "compact": 0.0}
    for start in range(0, n, batch):
        records = [alert(tpl, sky, i, stamp) for i in range(start, min(n, start + batch))]
        messages = [encoder.encode(r, None).value for r in records] if decode else []  # what Kafka delivers
        t0 = time.perf_counter()
        if decode:
            records = [r for m in messages for r in decode_alert(None, m)]
        alerts = [Archived(r, version_of(r) if decode else version, "alerts", 0, start + k)
                  for k, r in enumerate(records)]
        rows = [to_batch(alerts)]
        t1 = time.perf_counter()
        files = writer.write(rows)
        t2 = time.perf_counter()
        writer.commit(files, [OffsetRange("alerts", 0, start, start + len(alerts))])
        t3 = time.perf_counter()
        writer.compact()  # as the archive stage does after each commit
        t["rows"] += t1 - t0
        t["files"] += t2 - t1
        t["commit"] += t3 - t2
        t["compact"] += time.perf_counter() - t3
    size = sum(f.size for f in Archive(root).files())
    return {**t, "n": n, "bytes": size, "seconds": sum(t.values()), "sky": sky}


def add_copies(root: Path, sky: Sky, n_copies: int, first_offset: int, batch: int) -> None:
    """Archive alerts ``0 .. n_copies - 1`` again, at later offsets (a replay into the archived topic, say)."""
    tpl, writer = template(), ArchiveWriter(Archive(root))
    writer.recover()  # where the archive stands: its next commit number
    version = version_of(tpl)
    for start in range(0, n_copies, batch):
        ids = range(start, min(n_copies, start + batch))
        alerts = [Archived(alert(tpl, sky, i, 64), version, "alerts", 0, first_offset + i) for i in ids]
        files = writer.write([to_batch(alerts)])
        writer.commit(files, [OffsetRange("alerts", 0, first_offset + start, first_offset + ids[-1] + 1)])
    writer.compact()


def copies(root: Path, repeat: int) -> list[tuple[str, str, float, int]]:
    """(name, SQL, median seconds, rows) of reads over an archive holding some alerts twice."""
    cases = [("open (commit log, sizes, view; ids archived twice found)", "SELECT 1"),
             ("count, view `alerts` (one row per alert id)", "SELECT count(*) FROM alerts"),
             ("count, view `alerts_all` (every copy)", "SELECT count(*) FROM alerts_all")]
    out = []
    for name, sql in cases:
        seconds, table = timed(lambda sql=sql: Archive(root).query(sql), repeat)
        out.append((name, sql, seconds, table.column(0)[0].as_py() if "count" in name else table.num_rows))
    return out


def timed(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def queries(root: Path, sky: Sky, repeat: int) -> list[tuple[str, str, float, int]]:
    """(name, SQL, median seconds, rows) of the documented queries, each from a fresh Archive."""
    oid = f"OBJ{sky.obj[len(sky.obj) // 2]:011x}"
    ra0, dec0 = float(sky.obj_ra[sky.obj[7]]), float(sky.obj_dec[sky.obj[7]])
    lo, hi = float(sky.mjd[len(sky.mjd) // 2]), float(sky.mjd[len(sky.mjd) // 2]) + 1.0
    cases = [
        ("open (commit log, sizes, view; ids archived twice looked for)", "SELECT 1"),
        ("all alerts of one object",
         f"SELECT object_id, mjd, filter, magpsf, rb FROM alerts WHERE object_id = '{oid}'"),
        ("... with whole records (cutouts)", f"SELECT alert FROM alerts WHERE object_id = '{oid}'"),
        ("cone, 5 arcsec", f"SELECT object_id, ra, dec, mjd FROM alerts WHERE in_cone(ra, dec, {ra0}, {dec0}, "
                           f"{5 / 3600})"),
        ("cone, 1 deg", f"SELECT object_id, ra, dec, mjd FROM alerts WHERE in_cone(ra, dec, {ra0}, {dec0}, 1.0)"),
        ("one night, rb > 0.8 (count)", f"SELECT count(*) FROM alerts WHERE mjd >= {lo} AND mjd < {hi} AND rb > 0.8"),
    ]
    out = []
    for name, sql in cases:
        seconds, table = timed(lambda sql=sql: Archive(root).query(sql), repeat)
        rows = table.column(0)[0].as_py() if name.endswith("(count)") else table.num_rows
        out.append((name, sql, seconds, rows))
    return out


def report(args, full: dict, bulk: dict, big: dict, qs: list, verify_s: tuple[float, float], files: int,
           twice: list) -> str:
    mb = full["bytes"] / 1e6
    lines = [
        "## Archive",
        "",
        f"Machine: {machine()}. Date {time.strftime('%Y-%m-%d')}, commit {git_rev()}. Command: "
        f"`python -m bench.archive --alerts {args.alerts} --write-alerts {args.write_alerts} --batch {args.batch}`.",
        "",
        f"Write (`broker/archive/`, local disk, zstd, batches of {args.batch} alerts = one commit each, compacted "
        f"as the archive stage does it: 16 files of a tier into one), "
        f"the sample alert of schema v{schemas.CURRENT['alert']} with cutouts of its sizes in random bytes "
        f"({full['bytes'] / full['n'] / 1e3:.1f} kB an alert in Parquet):",
        "",
        "| path | alerts | alerts/s | MB/s | (decode +) rows / files / commit / compaction (s) |",
        "|---|---|---|---|---|",
    ]
    for name, w in (("as the archive stage: OCF messages decoded, then rows", full), ("from records", bulk)):
        lines.append(f"| {name} | {w['n']} | {w['n'] / w['seconds']:,.0f} | {w['bytes'] / 1e6 / w['seconds']:.1f} | "
                     f"{w['rows']:.2f} / {w['files']:.2f} / {w['commit']:.2f} / {w['compact']:.2f} |")
    lines += [
        "",
        f"Queries over {big['n']:,} alerts ({files} files, {big['bytes'] / 1e6:,.0f} MB; written in "
        f"{big['seconds']:.0f} s, {big['n'] / big['seconds']:,.0f} alerts/s, compaction {big['compact']:.0f} s of it; "
        "cutouts of 64 random bytes): "
        f"~{big['n'] // 5:,} objects in 100 deg², {big['n'] / PER_NIGHT:.0f} nights. Median of {args.repeat}, "
        "each from a fresh `Archive` (what one `broker query` does, Python start-up excluded):",
        "",
        "| query | s | rows |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s:.3f} | {rows} |" for name, _, s, rows in qs]
    lines += [
        "",
        f"`--verify` (SHA-256 of every file) of these {big['bytes'] / 1e6:,.0f} MB: {verify_s[0]:.2f} s; with real "
        f"cutouts 10^6 alerts are ~{full['bytes'] / full['n'] * 1e6 / 1e9:.0f} GB "
        f"(the {mb:.0f} MB above verify at {mb / verify_s[1]:.0f} MB/s).",
        "",
        "The cone is `in_cone(ra, dec, ra0, dec0, r)`: a declination band (pushed into the Parquet scan) and "
        "the haversine separation; the SQL of each row is in `bench/archive.py`.",
        "",
        f"The same archive after {args.copies:,} of its alerts were archived a second time (later offsets, as a "
        "replay into the archived topic would): each id is one row of `alerts`, its first copy "
        "(`broker/archive/reader.py`, `COPY_ORDER`), found when the view is made; "
        + "; ".join(f"{name}: {s:.3f} s" + (f", {rows:,} rows" if "count" in name else "")
                    for name, _, s, rows in twice) + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alerts", type=int, default=1_000_000)
    ap.add_argument("--write-alerts", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--copies", type=int, default=10_000, help="Alerts archived a second time (the last table).")
    ap.add_argument("--workdir", type=Path, default=Path("build/bench-archive"))
    ap.add_argument("--keep", action="store_true", help="Keep the archives written.")
    args = ap.parse_args()
    try:
        full = write(args.workdir / "full", args.write_alerts, args.batch, stamp=None, decode=True)
        print(f"write, real cutouts: {full['n'] / full['seconds']:,.0f} alerts/s", flush=True)
        small = Archive(args.workdir / "full")
        verify_full_s, _ = timed(lambda: small.check(small.files(), deep=True), 1)
        bulk = write(args.workdir / "bulk", args.write_alerts, args.batch, stamp=None, decode=False)
        print(f"write, bulk: {bulk['n'] / bulk['seconds']:,.0f} alerts/s", flush=True)
        big = write(args.workdir / "big", args.alerts, args.batch, stamp=64, decode=False)
        print(f"write, {args.alerts} alerts: {big['seconds']:.0f} s", flush=True)
        archive = Archive(args.workdir / "big")
        verify_s, _ = timed(lambda: archive.check(archive.files(), deep=True), 1)
        qs = queries(args.workdir / "big", big["sky"], args.repeat)
        n_files = len(archive.files())
        add_copies(args.workdir / "big", big["sky"], args.copies, args.alerts, args.batch)
        twice = copies(args.workdir / "big", args.repeat)
        for name, _, s, rows in qs + twice:
            print(f"{name}: {s:.3f} s, {rows} rows", flush=True)
        write_section("archive", report(args, full, bulk, big, qs, (verify_s, verify_full_s), n_files, twice))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
