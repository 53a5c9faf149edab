"""Portal benchmark: latency of the object page's API call and of cone searches over an archive (``broker serve``).

    python -m bench.portal [--state-dir var/demo/state] [--requests 200] [--clients 8] [--synthetic 100000]
                           [--tap-requests 20] [--synthetic-only]

Starts ``broker serve`` on the state folder (by default the one ``broker demo`` leaves) in its own
process, then times over HTTP, from this process with httpx:

- ``GET /api/v1/objects/{id}`` (what the object page loads: the object's alerts from the archive,
  its detections and summary from the history, its light curve), for objects drawn at random;
- ``GET /api/v1/cone`` of 5 arcsec around alerts drawn at random, and of 1 deg around them; the
  same 1 deg cone as the VO's Simple Cone Search answers it (``GET /api/v1/scs``, a VOTable); the
  objects (one row each, over all their alerts) in 0.1 deg (``GET /api/v1/scs/objects``);
- ``GET /api/v1/alerts?limit=50`` (the first page of the live page);
- ``POST /api/v1/crossmatch`` of a watchlist of 1,000 targets, each 0.5 arcsec from an alert drawn
  at random (radius 2 arcsec): the whole archive's positions matched per request, the first 1,000
  matches (the default ``limit``) answered.

- TAP (``GET /api/v1/tap/sync``, ADQL) side by side with its REST/SCS equivalent over the same
  positions: a 1 deg ``CONTAINS`` cone, its 1000 nearest alerts as ``/api/v1/cone?limit=1000``
  answers them (also through pyvo's ``TAPService.run_sync``, whose VOTable parsing by astropy is
  counted), the newest 100 alerts, the objects in 0.1 deg
  (``broker.objects``), an aggregate over every object, 10,000 full rows (``MAXREC=10000``), and a
  cross-match of 1,000 uploaded positions (``UPLOAD``, a VOTable of targets drawn as the watchlist's,
  ``JOIN TAP_UPLOAD.mine ON CONTAINS(POINT, CIRCLE)`` of 2 arcsec) beside ``POST /api/v1/crossmatch``
  (``--tap-requests`` of those over every row, as of the aggregate and the upload).

Each endpoint: ``--requests`` requests one after the other (p50, p95 latency in ms, requests/s of one
client), then the same number spread over ``--clients`` concurrent clients (requests/s). With
``--synthetic N [N ...]``, the same over an archive of N alerts (each N) written by ``bench/archive.py`` (~5 alerts an
object in 100 deg^2, cutouts of 64 random bytes; no history), to see how the latency grows with the
archive; ``--synthetic-only`` leaves the demo's state out. Writes BENCHMARKS.md section ``portal``.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.common import git_rev, machine, write_section
from broker.archive.reader import Archive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(state_dir: Path, port: int, *options: str) -> subprocess.Popen:
    """``broker serve`` on ``state_dir`` with ``options``, once its health endpoint answers."""
    # one address stands for many users here: no per-client budget, the default bound on work in hand
    cmd = [sys.executable, "-m", "streams.cli", "serve", "--state-dir", str(state_dir), "--port", str(port),
           "--client-work-s", "1e9", *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("broker serve did not answer within 120 s")


@dataclass(frozen=True)
class Pyvo:
    """A TAP query made by pyvo (``TAPService.run_sync``): the ADQL and MAXREC."""

    adql: str
    maxrec: int

    def service(self, base: str):  # noqa: ANN201 (pyvo is imported here only)
        """The portal at ``base`` as pyvo's TAP service."""
        import pyvo

        return pyvo.dal.TAPService(base.rstrip("/") + "/api/v1/tap")


@dataclass(frozen=True)
class Upload:
    """A synchronous TAP query of an uploaded table (``UPLOAD=mine,param:mine``, the VOTable a multipart part)."""

    adql: str
    votable: bytes


#: A request of a workload: a GET of its URL, a POST of (URL, CSV body), a pyvo TAP query or a TAP upload.
Call = str | tuple[str, str] | Pyvo | Upload


def timed(client: httpx.Client, call: Call) -> float:
    """Seconds one request takes (the body read); raises on a non-200 answer or a TAP ERROR."""
    t0 = time.perf_counter()
    if isinstance(call, Pyvo):
        service = call.service(str(client.base_url))
        result = service.run_sync(call.adql, maxrec=call.maxrec)
        assert len(result) > 0, call.adql
        return time.perf_counter() - t0
    if isinstance(call, str):
        response = client.get(call)
    elif isinstance(call, Upload):
        response = client.post("/api/v1/tap/sync", data={"QUERY": call.adql, "UPLOAD": "mine,param:mine",
                                                          "MAXREC": "50000"},
                               files={"mine": ("mine.xml", call.votable, "application/x-votable+xml")})
    else:
        response = client.post(call[0], content=call[1], headers={"content-type": "text/csv"})
    elapsed = time.perf_counter() - t0
    response.raise_for_status()
    if b'name="QUERY_STATUS" value="ERROR"' in response.content[:4000]:
        raise RuntimeError(f"TAP error for {call}: {response.text[:600]}")
    return elapsed


def measure(base: str, urls: list[Call], clients: int) -> dict:
    """Latencies of ``urls`` one after the other, then requests/s with ``clients`` at once."""
    with httpx.Client(base_url=base, timeout=60) as client:
        timed(client, urls[0])  # warm-up: caches, the first DuckDB connection
        t0 = time.perf_counter()
        lat = [timed(client, u) for u in urls]
        serial = len(urls) / (time.perf_counter() - t0)
    chunks = [urls[i::clients] for i in range(clients)]

    def run(chunk: list[Call]) -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            for u in chunk:
                timed(c, u)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, chunks))
    parallel = len(urls) / (time.perf_counter() - t0)
    ms = np.array(lat) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "mean": statistics.fmean(ms),
            "rps1": serial, "rpsN": parallel}


def workloads(archive: Archive, n: int, seed: int) -> dict[str, list[Call]]:
    """The requests of each endpoint: random objects, random alert positions, watchlists of them."""
    rng = np.random.default_rng(seed)
    objects = archive.query("SELECT DISTINCT object_id FROM alerts").column(0).to_pylist()
    pos = archive.query("SELECT ra, dec FROM alerts").to_pylist()
    picks = [pos[i] for i in rng.integers(len(pos), size=n)]

    def cone(p: dict, r: float) -> str:
        return f"/api/v1/cone?ra={p['ra']:.6f}&dec={p['dec']:.6f}&radius_arcsec={r:g}&limit=1000"

    return {
        "object page: `GET /api/v1/objects/{id}`": [f"/api/v1/objects/{objects[i]}"
                                                     for i in rng.integers(len(objects), size=n)],
        "cone 5 arcsec: `GET /api/v1/cone`": [cone(p, 5.0) for p in picks],
        "cone 1 deg: `GET /api/v1/cone`": [cone(p, 3600.0) for p in picks],
        "cone 1 deg, VOTable: `GET /api/v1/scs`": [f"/api/v1/scs?RA={p['ra']:.6f}&DEC={p['dec']:.6f}&SR=1&MAXREC=1000"
                                                   for p in picks],
        "objects in 0.1 deg, VOTable: `GET /api/v1/scs/objects`": [
            f"/api/v1/scs/objects?RA={p['ra']:.6f}&DEC={p['dec']:.6f}&SR=0.1&MAXREC=1000" for p in picks],
        "latest 50: `GET /api/v1/alerts?limit=50`": ["/api/v1/alerts?limit=50"] * n,
        "latest 100: `GET /api/v1/alerts?limit=100`": ["/api/v1/alerts?limit=100"] * n,
        "objects in 0.1 deg: `GET /api/v1/objects`": [
            f"/api/v1/objects?ra={p['ra']:.6f}&dec={p['dec']:.6f}&radius_arcsec=360&limit=1000" for p in picks],
        "watchlist of 1,000 targets: `POST /api/v1/crossmatch`": [
            ("/api/v1/crossmatch", _watchlist([pos[i] for i in rng.integers(len(pos), size=1000)]))
            for _ in range(n)],
    }


def _watchlist(targets: list[dict]) -> str:
    """A watchlist CSV of ``targets``, each moved 0.5 arcsec north."""
    return "name,ra,dec\n" + "".join(f"t{i},{p['ra']:.7f},{min(p['dec'] + 0.5 / 3600, 90.0):.7f}\n"
                                      for i, p in enumerate(targets))


def tap(adql: str, maxrec: int) -> str:
    """The URL of a synchronous TAP query (VOTable)."""
    return "/api/v1/tap/sync?" + urllib.parse.urlencode({"QUERY": adql, "LANG": "ADQL", "MAXREC": maxrec})


def _upload(targets: list[dict]) -> bytes:
    """A VOTable (astropy's TABLEDATA, as pyvo uploads) of ``targets`` moved 0.5 arcsec north, as :func:`_watchlist`."""
    from astropy.table import Table

    out = io.BytesIO()
    Table({"name": [f"t{i}" for i in range(len(targets))], "ra": [p["ra"] for p in targets],
           "dec": [min(p["dec"] + 0.5 / 3600, 90.0) for p in targets]}).write(out, format="votable")
    return out.getvalue()


#: The uploaded targets' cross-match, at the radius of a watchlist's default (2 arcsec).
_MATCH_ADQL = ("SELECT m.name, a.alert_id, a.object_id, a.mjd, a.magpsf, DISTANCE(POINT('ICRS', a.ra, a.dec), "
               "POINT('ICRS', m.ra, m.dec)) AS dist FROM broker.alerts AS a JOIN TAP_UPLOAD.mine AS m ON "
               f"1 = CONTAINS(POINT('ICRS', a.ra, a.dec), CIRCLE('ICRS', m.ra, m.dec, {2 / 3600!r}))")


def _cone_adql(p: dict, r_deg: float, table: str = "broker.alerts", columns: str = "*", nearest: bool = False) -> str:
    """A TAP cone of ``r_deg`` at ``p``; ``nearest``: the 1000 nearest, newest first at a distance, as ``queries.cone``.

    Without an order, ``TOP 1000`` answers the first 1000 rows DuckDB finds, and it stops reading there.
    """
    point = f"POINT('ICRS', {p['ra']:.6f}, {p['dec']:.6f})"
    distance = f", DISTANCE(POINT('ICRS', ra, dec), {point}) AS distance" if nearest else ""
    order = " ORDER BY distance, mjd DESC" if nearest else ""
    return (f"SELECT TOP 1000 {columns}{distance} FROM {table} WHERE CONTAINS(POINT('ICRS', ra, dec), "
            f"CIRCLE('ICRS', {p['ra']:.6f}, {p['dec']:.6f}, {r_deg:g})) = 1{order}")


#: Columns of the objects' cone, as ``/api/v1/objects`` answers them.
_OBJECT_COLUMNS = "object_id, ra, dec, n_alerts, first_mjd, last_mjd, last_mag, last_band, max_rb, max_anomaly"


def tap_workloads(archive: Archive, n: int, heavy: int, seed: int) -> dict[str, tuple[list[Call], str | None]]:
    """The TAP requests, each with the name of its REST/SCS counterpart in :func:`workloads` (or None)."""
    rng = np.random.default_rng(seed)
    pos = archive.query("SELECT ra, dec FROM alerts").to_pylist()
    picks = [pos[i] for i in rng.integers(len(pos), size=n)]
    return {
        "TAP cone 1 deg, `CONTAINS(POINT, CIRCLE)`, TOP 1000 nearest (`ORDER BY DISTANCE`, as REST)": (
            [tap(_cone_adql(p, 1.0, nearest=True), 1000) for p in picks], "cone 1 deg: `GET /api/v1/cone`"),
        "the same through pyvo `TAPService.run_sync` (astropy parses the VOTable)": (
            [Pyvo(_cone_adql(p, 1.0, nearest=True), 1000) for p in picks[:heavy]],
            "cone 1 deg, VOTable: `GET /api/v1/scs`"),
        "TAP newest 100, `SELECT TOP 100 * ... ORDER BY mjd DESC`": (
            [tap("SELECT TOP 100 * FROM broker.alerts ORDER BY mjd DESC", 100)] * n,
            "latest 100: `GET /api/v1/alerts?limit=100`"),
        "TAP objects in 0.1 deg, `broker.objects` cone, TOP 1000": (
            [tap(_cone_adql(p, 0.1, "broker.objects", _OBJECT_COLUMNS), 1000) for p in picks],
            "objects in 0.1 deg: `GET /api/v1/objects`"),
        "TAP aggregate over every object, `SELECT COUNT(*), AVG(n_alerts), MAX(last_mjd) FROM broker.objects`": (
            [tap("SELECT COUNT(*) AS n, AVG(n_alerts) AS mean_alerts, MAX(last_mjd) AS last FROM broker.objects",
                 10)] * heavy, None),
        "TAP 10,000 full rows, `SELECT * FROM broker.alerts`, MAXREC=10000 (VOTable)": (
            [tap("SELECT * FROM broker.alerts", 10_000)] * heavy, None),
        "TAP 10,000 full rows, the same as CSV": (
            [tap("SELECT * FROM broker.alerts", 10_000) + "&FORMAT=csv"] * heavy, None),
        "TAP cross-match of 1,000 uploaded positions (`UPLOAD`, `JOIN TAP_UPLOAD.mine ON CONTAINS(POINT, "
        "CIRCLE 2 arcsec)`)": (
            [Upload(_MATCH_ADQL, _upload([pos[i] for i in rng.integers(len(pos), size=1000)])) for _ in range(heavy)],
            "watchlist of 1,000 targets: `POST /api/v1/crossmatch`"),
    }


def _row(name: str, v: dict) -> str:
    return f"| {name} | {v['p50']:.1f} | {v['p95']:.1f} | {v['mean']:.1f} | {v['rps1']:.0f} | {v['rpsN']:.0f} |"


def _tap_row(name: str, v: dict, rest: str | None, rows: dict) -> str:
    if rest is None:
        return f"| {name} | {v['p50']:.1f} | {v['p95']:.1f} | {v['n']} | | |"
    r = rows[rest]
    return (f"| {name} | {v['p50']:.1f} | {v['p95']:.1f} | {v['n']} | {rest} ({r['p50']:.1f}, {r['p95']:.1f}) | "
            f"{v['p50'] / r['p50']:.2f} / {v['p95'] / r['p95']:.2f} |")


def run(state_dir: Path, requests: int, clients: int, seed: int,
        tap_requests: int) -> tuple[list[str], list[str], int, int]:
    """The table rows of one state folder (REST, then TAP with its ratios), its alerts and objects."""
    archive = Archive(state_dir / "archive")
    n_alerts = archive.count()
    if n_alerts == 0:
        raise SystemExit(f"no alerts in {state_dir / 'archive'}: run `broker demo` first")
    n_objects = archive.query("SELECT count(DISTINCT object_id) FROM alerts").column(0).to_pylist()[0]
    port = free_port()
    proc = start_server(state_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        rows = {name: measure(base, urls, clients) for name, urls in workloads(archive, requests, seed).items()}
        taps = {name: (measure(base, urls, clients) | {"n": len(urls)}, rest)
                for name, (urls, rest) in tap_workloads(archive, requests, tap_requests, seed).items()}
    finally:
        proc.terminate()
        proc.wait(30)
    return ([_row(k, v) for k, v in rows.items()], [_tap_row(k, v, rest, rows) for k, (v, rest) in taps.items()],
            n_alerts, n_objects)


def synthetic_state(n: int) -> Path:
    """A state folder under ``var/bench`` with an archive of ``n`` alerts (``bench.archive.write``)."""
    from bench.archive import write

    root = Path(f"var/bench/portal-state-{n}")
    if (root / "archive").exists() and Archive(root / "archive").count() == n:
        return root  # the same seeded archive as a previous run wrote
    write(root / "archive", n, 2000, 64, decode=False)
    return root


def _tables(rows: list[str], taps: list[str], clients: int) -> list[str]:
    head = ["| endpoint | p50 (ms) | p95 (ms) | mean (ms) | req/s, 1 client | "
            f"req/s, {clients} clients |", "|---|---|---|---|---|---|"]
    tap_head = ["| TAP query (`GET /api/v1/tap/sync`) | p50 (ms) | p95 (ms) | requests | REST/SCS equivalent "
                "(p50, p95 ms) | TAP/REST p50 / p95 |", "|---|---|---|---|---|---|"]
    return [*head, *rows, "", *tap_head, *taps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state-dir", type=Path, default=Path("var/demo/state"))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--synthetic", type=int, nargs="+", default=[],
                    help="Also synthetic archives of these many alerts, each (none by default).")
    ap.add_argument("--synthetic-only", action="store_true", help="Leave --state-dir out (with --synthetic).")
    ap.add_argument("--tap-requests", type=int, default=20,
                    help="Requests of the TAP queries over every row (the aggregate, the 10,000 rows, pyvo).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="Print the table, leave BENCHMARKS.md alone.")
    args = ap.parse_args()
    if args.synthetic_only and not args.synthetic:
        raise SystemExit("--synthetic-only needs --synthetic N")
    load = os.getloadavg()
    header = machine()
    state = "" if args.synthetic_only else f" --state-dir {args.state_dir}"
    command = (f"python -m bench.portal{state} --requests {args.requests} --clients "
               f"{args.clients}{' --synthetic ' + ' '.join(map(str, args.synthetic)) if args.synthetic else ''}"
               f"{' --synthetic-only' if args.synthetic_only else ''} --tap-requests {args.tap_requests}")
    body = [
        "## Portal API",
        "",
        f"Machine: {header}. Date {time.strftime('%Y-%m-%d')}, commit {git_rev()}. Command: `{command}`.",
        "",
        "`broker serve` (one uvicorn process, 4 query threads, at most 3 costly requests at work: `--max-costly`, "
        "the default; no per-client budget: `--client-work-s 1e9`, since one address stands for many users here) "
        "over HTTP on 127.0.0.1 from httpx in another process; per endpoint "
        f"{args.requests} requests at random objects / alert positions, one after the other "
        f"(latency, and the rate of one client), then spread over {args.clients} concurrent clients. TAP queries "
        "over the same positions, each beside its REST or SCS equivalent measured in the same run (the ratio "
        f"is TAP's latency over the equivalent's); those over every row or parsed by pyvo {args.tap_requests} "
        "times.",
    ]
    if not args.synthetic_only:
        rows, taps, n_alerts, n_objects = run(args.state_dir, args.requests, args.clients, args.seed,
                                              args.tap_requests)
        body += ["", f"The archive and history of `{args.state_dir}` ({n_alerts} alerts, {n_objects} objects):",
                 "", *_tables(rows, taps, args.clients)]
    for size in args.synthetic:
        rows, taps, n_alerts, n_objects = run(synthetic_state(size), args.requests, args.clients, args.seed,
                                              args.tap_requests)
        body += ["", f"A synthetic archive of {n_alerts:,} alerts ({n_objects:,} objects in 100 deg², "
                 "`bench/archive.py`'s sky; cutouts of 64 bytes, no history: the object page reads the archive "
                 "only):", "", *_tables(rows, taps, args.clients)]
    if args.synthetic:
        body += ["", "The synthetic alerts come in time order at objects drawn at random over the whole patch, so "
                 "every batch (2,000 alerts, one file) spans the patch: no file is left out of a cone by its bounds, "
                 "only the row groups of the merged files are skipped (rows by declination, `ROW_GROUP_ROWS`). A "
                 "telescope's batch covers a few fields, and a cone opens only the files whose bounds may hold it "
                 "(section `pruning`: `bench/pruning.py`, files of one field each); the cones here are the slower "
                 "case. The newest-first pages open only the files of their times."]
    end = os.getloadavg()
    body += [
        "",
        f"Load average (1, 5, 15 min) at the start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, at the end "
        f"{end[0]:.1f} {end[1]:.1f} {end[2]:.1f} (a shared 2-core machine: compare the ratios, measured side by "
        "side, rather than the absolute figures).",
        "",
        "Each server thread keeps the archive's DuckDB view open and opens it again when a commit changes its files "
        "(`streams/web/queries.py:ArchiveView`); the commit log is read at every request, so that a request sees "
        "every commit the archiver made before it. The object page reads the object's whole alert records (for its "
        "light curve's forced photometry and upper limits) and its detections in the history.",
    ]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section("portal", text)


if __name__ == "__main__":
    main()
