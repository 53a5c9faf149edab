"""Pruning benchmark: the portal's cones and newest-first pages read with and without the files' bounds.

    python -m bench.pruning [--files 96] [--per-file 1000] [--repeat 30] [--no-write]

Writes an archive of ``--files`` files (one commit each, no compaction) of ``--per-file`` alerts
each (``bench/archive.py``'s alerts, cutouts of 64 bytes), each file one 1 x 1 deg field of a
10 x 10 deg grid, the files in time order, as a telescope's batches are (``bench/portal.py``'s
synthetic batches each span the whole patch instead, so no file is skipped there by position).
Then, in this process, on one :class:`streams.web.queries.ArchiveView` (its DuckDB view kept open,
as a portal thread keeps it), times ``queries.cone`` (5 arcsec and 0.5 deg around alerts drawn at
random) and ``queries.latest`` (the first page of 100, and a page at a cursor), each read from the
files whose bounds may hold its rows (``DataFile`` bounds, ``may_hold_cone``) and from every file
(the same queries with the file filter dropped: what they did before), alternately, median of
``--repeat``; and ``queries.object_records`` (the object page's read: the files found from the
``object_id`` column, then the records from those) against its one query before, over every file,
TAP cones (``TapView.run``, ``SELECT TOP 1000 *`` of 5 arcsec and 0.5 deg) with and without
the files' bounds, TAP's newest 100 (``ORDER BY mjd DESC``) with and without its MJD bound, and
``broker query`` (a file's span of MJD, a 0.5 deg ``in_cone``: a new ``Archive`` each, as each
command is a process), a replay's selection of a file's span of MJD (``Archive.select``) and a
cross-match of 10 entries (``queries.crossmatch``), with and without the bounds of their WHERE or
entries. Checks that both answer the same rows. Writes BENCHMARKS.md section ``pruning``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench.archive import Sky, alert, template
from bench.common import git_rev, machine, write_section
from broker.archive import reader
from broker.archive.bounds import FileFilter, may_hold_cone
from broker.archive.config import ArchiveConfig
from broker.archive.log import DataFile, OffsetRange
from broker.archive.reader import Archive
from broker.archive.rows import Archived, to_batch, version_of
from broker.archive.writer import ArchiveWriter
from broker.watchlist import Watchlist
from streams.web import adql, queries, tap_schema
from streams.web.config import WebConfig
from streams.web.records import encode_cursor
from streams.web.tap import TapView


def write_fields(root: Path, n_files: int, per_file: int) -> None:
    """``n_files`` commits of ``per_file`` alerts each, file k in field k of a 10 x 10 grid of 1 deg fields."""
    shutil.rmtree(root, ignore_errors=True)
    tpl, sky = template(), Sky(n_files * per_file)
    version = version_of(tpl)
    rng = np.random.default_rng(2)
    writer = ArchiveWriter(Archive(root), ArchiveConfig(compact_files=0))
    writer.recover()
    for k in range(n_files):
        idx = np.arange(k * per_file, (k + 1) * per_file)
        sky.ra[idx] = 150.0 + k % 10 + rng.uniform(0.0, 1.0, per_file)
        sky.dec[idx] = -5.0 + (k // 10) % 10 + rng.uniform(0.0, 1.0, per_file)
        alerts = [Archived(alert(tpl, sky, int(i), 64), version, "alerts", 0, int(i)) for i in idx]
        writer.commit(writer.write([to_batch(alerts)]), [OffsetRange("alerts", 0, int(idx[0]), int(idx[-1]) + 1)])


class Unpruned:
    """A view that reads every file: the queries' file filter dropped."""

    def __init__(self, view: queries.ArchiveView) -> None:
        self.view = view

    def files(self) -> list[DataFile]:
        """The committed files."""
        return self.view.files()

    def query(self, sql: str, *, keep: FileFilter | None = None, files: list[DataFile] | None = None) -> pa.Table:
        """``sql`` over every file (of ``files``, as the caller read them), whatever ``keep`` keeps."""
        return self.view.query(sql, files=files)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds ``fn(*args)`` took, and its result."""
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def tap_cone(tap: TapView, p: dict, radius: float, pruned: bool) -> list[dict]:
    """The rows of a TAP cone of ``radius`` (deg) at ``p``: from the files its bounds admit (``pruned``), or all."""
    query = (f"SELECT TOP 1000 * FROM broker.alerts WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
             f"CIRCLE('ICRS', {p['ra']!r}, {p['dec']!r}, {radius!r}))")
    t = adql.translate(query, tap_schema.published(), 1000)
    return tap.run(t.sql, t.tables, cone=t.cone if pruned else None).to_pylist()


def tap_newest(tap: TapView, pruned: bool) -> list[dict]:
    """TAP's newest 100: with ``mjd >=`` their least MJD, from the files that reach it (``pruned``), or from all."""
    query = "SELECT TOP 100 * FROM broker.alerts ORDER BY mjd DESC, alert_id DESC"
    t = adql.translate(query, tap_schema.published(), 1000)
    return tap.run(t.sql, t.tables, newest=t.newest if pruned else None).to_pylist()


@contextlib.contextmanager
def where_unbounded() -> Iterator[None]:
    """``Archive.query(bounded=True)``, ``export`` and ``select`` read every file while it lasts (as before)."""
    held = reader.query_files, reader.where_files
    reader.query_files, reader.where_files = (lambda con, sql: None), (lambda con, where: None)
    try:
        yield
    finally:
        reader.query_files, reader.where_files = held


def cli_query(root: Path, sql: str, bounded: bool) -> list[dict]:
    """``broker query SQL``'s read: a new ``Archive`` (a process each), bounded by its WHERE or over every file."""
    if bounded:
        return Archive(root).query(sql, bounded=True).to_pylist()
    with where_unbounded():
        return Archive(root).query(sql, bounded=True).to_pylist()


def replay_selection(root: Path, where: str, bounded: bool) -> list[int]:
    """The alert ids a replay of ``where`` sends, in order (``Archive.select``, no SHA-256 check), read as asked."""
    if not bounded:
        with where_unbounded():
            return replay_selection(root, where, True)
    _, rows = Archive(root).select(where, verify=False)
    return [record["alertId"] for _, record in rows]


def cli_reads(root: Path, spots: list[dict], span: float) -> tuple[dict[str, Callable[[Any, dict], Any]], dict]:
    """The reads of ``broker query``, a replay's selection and the cross-match, bounded (first) and not (second)."""
    def window(p: dict) -> str:
        return f"mjd >= {p['mjd'] - span / 2!r} AND mjd < {p['mjd'] + span / 2!r}"

    n = min(10, len(spots))
    watch = Watchlist(tuple(f"e{i}" for i in range(n)), np.array([p["ra"] for p in spots[:n]]),
                      np.array([p["dec"] for p in spots[:n]]), np.full(n, 60.0))
    time_sql = "SELECT * EXCLUDE (alert) FROM alerts WHERE {} ORDER BY alert_id"
    cone_sql = "SELECT * EXCLUDE (alert) FROM alerts WHERE in_cone(ra, dec, {!r}, {!r}, 0.5) ORDER BY alert_id"
    names = (f"`broker query`, a file's span of MJD ({span * 24:.2f} h; `Archive.query`, a new one each)",
             "`broker query`, a 0.5 deg `in_cone` (`Archive.query`, a new one each)",
             f"replay selection of a file's span of MJD (`Archive.select`, {span * 24:.2f} h, no SHA-256)",
             f"cross-match of {n} entries of 60 arcsec (`queries.crossmatch`)")
    reads: dict[str, Callable[[Any, dict], Any]] = {
        names[0]: lambda v, p: cli_query(root, time_sql.format(window(p)), True),
        names[1]: lambda v, p: cli_query(root, cone_sql.format(p["ra"], p["dec"]), True),
        names[2]: lambda v, p: replay_selection(root, window(p), True),
        names[3]: lambda v, p: queries.crossmatch(v, watch, 1000),
    }
    before: dict[str, Callable[[Any, dict], Any]] = {
        names[0]: lambda v, p: cli_query(root, time_sql.format(window(p)), False),
        names[1]: lambda v, p: cli_query(root, cone_sql.format(p["ra"], p["dec"]), False),
        names[2]: lambda v, p: replay_selection(root, window(p), False),
    }
    return reads, before


def measure(view: queries.ArchiveView, repeat: int, seed: int) -> tuple[list[tuple[str, float, float]], dict]:
    """(read, pruned ms, every file ms) of each read, medians of ``repeat``; and the files the cones keep (median)."""
    plain = Unpruned(view)
    spots = view.query(f"SELECT ra, dec, mjd, alert_id, object_id FROM alerts USING SAMPLE {repeat} ROWS "
                       f"(reservoir, {seed})").to_pylist()
    reads: dict[str, Callable[[Any, dict], Any]] = {
        "cone 5 arcsec (`queries.cone`)": lambda v, p: queries.cone(v, p["ra"], p["dec"], 5.0, 100),
        "cone 0.5 deg (`queries.cone`)": lambda v, p: queries.cone(v, p["ra"], p["dec"], 1800.0, 100),
        "newest 100 (`queries.latest`)": lambda v, p: queries.latest(v, 100, None),
        "100 before an alert (`queries.latest`, cursor)": lambda v, p: queries.latest(
            v, 100, encode_cursor(p["mjd"], p["alert_id"])),
        "an object's records (`queries.object_records`, the object page)": lambda v, p: queries.object_records(
            v, p["object_id"]),
    }
    before: dict[str, Callable[[Any, dict], Any]] = {  # reads whose code before was another query
        "an object's records (`queries.object_records`, the object page)": lambda v, p: queries.records_of(
            v, f"SELECT schema_version, alert FROM alerts WHERE object_id = '{p['object_id']}' ORDER BY mjd, "
               "kafka_topic, kafka_partition, kafka_offset"),
    }
    tap = TapView(view.archive, WebConfig())
    for radius, size in ((5 / 3600, "5 arcsec"), (0.5, "0.5 deg")):
        name = f"TAP cone {size}, `SELECT TOP 1000 *` (`TapView.run`)"
        reads[name] = lambda v, p, r=radius: tap_cone(tap, p, r, True)
        before[name] = lambda v, p, r=radius: tap_cone(tap, p, r, False)
    name = "TAP newest 100, `SELECT TOP 100 * ... ORDER BY mjd DESC, alert_id DESC` (`TapView.run`)"
    reads[name] = lambda v, p: tap_newest(tap, True)
    before[name] = lambda v, p: tap_newest(tap, False)
    span = statistics.median(f.mjd_max - f.mjd_min for f in view.files() if f.mjd_max is not None and
                             f.mjd_min is not None)
    more, more_before = cli_reads(Path(view.archive.url), spots, span)
    reads.update(more)
    before.update(more_before)
    out = []
    for name, read in reads.items():
        pruned, every = [], []
        for p in spots:
            t_pruned, a = timed(read, view, p)
            t_every, b = timed(before.get(name, read), plain, p)
            if a != b:
                raise AssertionError(f"{name}: the pruned read answered other rows at {p}")
            pruned.append(t_pruned)
            every.append(t_every)
        out.append((name, statistics.median(pruned) * 1e3, statistics.median(every) * 1e3))
    files = view.files()
    kept = {r: statistics.median(sum(may_hold_cone(f, p["ra"], p["dec"], r / 3600) for f in files) for p in spots)
            for r in (5.0, 1800.0)}
    return out, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=96, help="Files (one commit each; default 96).")
    ap.add_argument("--per-file", type=int, default=1000, help="Alerts a file (default 1000).")
    ap.add_argument("--repeat", type=int, default=30, help="Reads of each kind, each way (default 30).")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="Print, do not write BENCHMARKS.md.")
    args = ap.parse_args()
    root = Path("var/bench/pruning")
    header, load0 = machine(), os.getloadavg()  # the load before the archive is written
    write_fields(root, args.files, args.per_file)
    view = queries.ArchiveView(Archive(root))
    n_files = len(view.files())
    rows, kept = measure(view, args.repeat, args.seed)
    load1 = os.getloadavg()
    body = [
        "## Portal reads with and without the files' bounds",
        "",
        f"Machine: {header}. Date {time.strftime('%Y-%m-%d')}, commit {git_rev()}. Command: "
        f"`python -m bench.pruning --files {args.files} --per-file {args.per_file} --repeat {args.repeat}`.",
        "",
        f"{args.files * args.per_file:,} alerts in {n_files} files (one per commit, no compaction), each a 1 x 1 deg "
        "field, in time order; one `ArchiveView` kept open, in this process; the same reads from the files whose "
        "bounds may hold their rows and from every file, alternately (the same rows, checked), median of "
        f"{args.repeat}:",
        "",
        "| read | pruned (ms) | every file (ms) | every file / pruned |",
        "|---|---|---|---|",
        *(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.1f} |" for name, a, b in rows),
        "",
        f"Files a cone reads (median): {kept[5.0]:g} at 5 arcsec, {kept[1800.0]:g} at 0.5 deg, of {n_files}. "
        "Both ways read the commit log once a read (`ArchiveView` sees every commit; here its records, "
        "no checkpoint before 100 commits).",
        "",
        f"Load average (1, 5, 15 min) at the start {' '.join(f'{x:.1f}' for x in load0)}, at the end "
        f"{' '.join(f'{x:.1f}' for x in load1)}.",
    ]
    print("\n".join(body))
    if not args.no_write:
        write_section("pruning", "\n".join(body))


if __name__ == "__main__":
    main()
