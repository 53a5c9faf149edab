"""The object history on PostgreSQL: the SQLite behaviour, and association safe under concurrent writers.

A real PostgreSQL 15 server is started for the session (``postgres`` in tests/conftest.py); each
test gets a database of its own.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest

from broker.config import load_config
from broker.errors import BadCoordinates, ConfigError
from broker.history import CELL_ARCSEC, HistoryConfig, ObjectHistory, open_history, sky_cells
from tests.helpers import candidate


@pytest.fixture
def dsn(postgres):
    return postgres.create_database("hist")


@pytest.fixture(params=["sqlite", "postgres"])
def history(request, tmp_path):
    """The same association on both stores."""
    if request.param == "sqlite":
        h = open_history(tmp_path)
    else:
        h = open_history(tmp_path, HistoryConfig(dsn=request.getfixturevalue("dsn")))
    yield h
    h.close()


def _count(h: ObjectHistory, table: str) -> int:
    return h.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_association_history_and_idempotence_on_both_stores(history):
    a = candidate("f1/0", ra=150.0, dec=2.0)
    history.associate("f1", 60000.0, "r", [a], magzp=27.5, limiting_flux=120.0)
    b = candidate("f2/0", ra=150.0 + 1.0 / 3600, dec=2.0)  # 1 arcsec: the same object
    c = candidate("f2/1", ra=150.0 + 3.0 / 3600, dec=2.0)  # 3 arcsec: a new one
    history.associate("f2", 60001.0, "r", [b, c])
    assert b.obj.object_id == a.obj.object_id and b.obj.ndet == 2 and c.obj.object_id != a.obj.object_id
    assert [(d["cand_id"], d["magzp"], d["limiting_flux"]) for d in b.history] == [("f1/0", 27.5, 120.0)]
    assert abs(b.obj.ra - (150.0 + 0.5 / 3600)) < 1e-9  # running mean position, in double precision
    again = candidate("f2/0", ra=150.0 + 1.0 / 3600, dec=2.0)
    history.associate("f2", 60001.0, "r", [again])  # a replay after a crash
    assert again.obj == b.obj and again.history == b.history
    assert (_count(history, "detections"), _count(history, "objects")) == (3, 2)


def test_a_region_of_either_store_copies_into_a_prediction_history(history):
    """The portal's predictions copy the objects around a frame from SQLite or PostgreSQL (only read)."""
    history.associate("f1", 60000.0, "r", [candidate("f1/0", ra=359.99995, dec=10.0)], magzp=27.5)
    history.associate("f2", 60001.0, "r", [candidate("f2/0", ra=0.00005, dec=10.0)])  # 0.35 arcsec: the same
    into = ObjectHistory(":memory:")
    assert history.copy_region(into, 0.0, 10.0, 0.01) == 1  # across RA 0
    later = candidate("f3/0", ra=0.0, dec=10.0)
    into.associate("f3", 60002.0, "r", [later])
    assert later.obj.ndet == 3 and [d["magzp"] for d in later.history] == [27.5, None]
    assert (_count(history, "detections"), _count(history, "objects")) == (2, 1)


def test_association_across_ra_zero_and_near_the_pole(history):
    for ra, dec in ((359.9999, 10.0), (89.0, 89.9999)):
        first = candidate(f"a{dec}/0", ra=ra, dec=dec)
        history.associate(f"a{dec}", 60000.0, "g", [first])
        # 1 arcsec away on the sky, across RA 0 or around the pole
        ra2 = (ra + 1.0 / 3600 / np.cos(np.radians(dec))) % 360.0 if dec < 80 else (ra + 180.0) % 360.0
        dec2 = dec if dec < 80 else 90.0 - (1.0 / 3600 - (90.0 - dec))
        second = candidate(f"b{dec}/0", ra=ra2, dec=dec2)
        history.associate(f"b{dec}", 60001.0, "g", [second])
        assert second.obj.object_id == first.obj.object_id, (ra, dec)
        # the mean stays between them on the sky (an average of RAs would put it at RA 180)
        third = candidate(f"c{dec}/0", ra=ra, dec=dec)
        history.associate(f"c{dec}", 60002.0, "g", [third])
        assert third.obj.object_id == first.obj.object_id and third.obj.ndet == 3, (ra, dec, third.obj)


def test_bad_coordinates_are_refused_before_anything_is_written(history):
    good, bad = candidate("f1/0"), candidate("f1/1", ra=float("nan"))
    with pytest.raises(BadCoordinates):
        history.associate("f1", 60000.0, "r", [good, bad])
    assert _count(history, "detections") == 0


def test_sky_cells_cover_the_search_circle():
    rng = np.random.default_rng(1)
    r = 1.5 / 3600
    cell = CELL_ARCSEC / 3600
    for _ in range(2000):  # a point of the circle lies in a cell the circle's keys name
        ra, dec = rng.uniform(0, 360), np.degrees(np.arcsin(rng.uniform(-1, 1)))
        if rng.random() < 0.3:  # on a band edge
            dec = np.clip(round((dec + 90) / cell) * cell - 90 + rng.normal(0, r), -90, 90)
        keys = sky_cells(ra, dec, r)
        ang, dist = rng.uniform(0, 2 * np.pi), 0.99 * r * np.sqrt(rng.uniform(0, 1))
        dec2 = dec + dist * np.sin(ang)
        if abs(dec2) >= 90:
            continue
        ra2 = ra + dist * np.cos(ang) / max(np.cos(np.radians(dec2)), 1e-9)
        assert sky_cells(ra2 % 360, dec2, 0.0) <= keys, (ra, dec, ra2, dec2)
    assert len(sky_cells(10.0, 0.51, r)) == 1 and len(sky_cells(10.0, 0.5, r)) == 2  # inside a cell; astride two


def test_the_postgres_store_is_chosen_by_dsn_and_its_errors_are_clear(tmp_path, dsn):
    cfg = load_config(state_dir=str(tmp_path), history={"dsn": dsn})
    h = open_history(cfg.state_dir, cfg.history)
    assert type(h.store).__name__ == "PostgresStore" and "dsn" not in repr(cfg.history)
    h.close()
    assert not (tmp_path / "history.sqlite").exists()
    bad = "postgresql://postgres:s3cret@127.0.0.1:1/nowhere"
    with pytest.raises(ConfigError, match="cannot connect") as info:
        open_history(tmp_path, HistoryConfig(dsn=bad, connect_timeout_s=0.0))
    assert "s3cret" not in str(info.value) and "***" in str(info.value)


def test_an_older_postgres_history_gains_the_new_columns(dsn):
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE objects (object_id TEXT PRIMARY KEY, ra DOUBLE PRECISION NOT NULL, "
                     "dec DOUBLE PRECISION NOT NULL, ndet INTEGER NOT NULL, first_mjd DOUBLE PRECISION NOT NULL)")
        conn.execute("CREATE TABLE detections (cand_id TEXT PRIMARY KEY, object_id TEXT NOT NULL, frame_id TEXT "
                      "NOT NULL, mjd DOUBLE PRECISION NOT NULL, filter TEXT NOT NULL, ra DOUBLE PRECISION NOT NULL, "
                      "dec DOUBLE PRECISION NOT NULL, flux DOUBLE PRECISION NOT NULL, flux_err DOUBLE PRECISION "
                      "NOT NULL, snr DOUBLE PRECISION NOT NULL, rb DOUBLE PRECISION)")
        conn.execute("INSERT INTO objects VALUES ('OBJold', 150.0, 2.0, 1, 59999.0)")
        conn.execute("INSERT INTO detections VALUES ('f0/0', 'OBJold', 'f0', 59999.0, 'r', 150.0, 2.0, 900.0, "
                     "90.0, 10.0, 0.8)")
    h = open_history(".", HistoryConfig(dsn=dsn))
    a = candidate("f1/0")
    h.associate("f1", 60000.0, "r", [a], magzp=27.0, limiting_flux=100.0)
    assert a.obj.object_id == "OBJold" and [(d["cand_id"], d["magzp"]) for d in a.history] == [("f0/0", None)]
    h.close()


class _Held:
    """A PostgreSQL store that takes the cell locks or not, and holds its transaction open after the work."""

    def __new__(cls, dsn: str, locked: bool, hold: bool):
        from broker.history_pg import PostgresStore

        class Store(PostgresStore):
            def transaction(self, cells, work):
                def held():
                    work()
                    self.inside.set()
                    self.release.wait(10)

                super().transaction(cells if locked else [], held)

        store = Store(dsn)
        store.inside, store.release = threading.Event(), threading.Event()
        if not hold:
            store.release.set()
        return store


def test_a_second_writer_waits_for_the_cell_lock_and_joins_the_first_object(dsn):
    """Two connections, one position: the second transaction blocks on the cell lock, then sees the object.

    The same interleaving without the cell locks makes two objects: the check that the locks, not
    luck, keep association right.
    """

    def race(locked: bool) -> tuple[str, str]:
        first = ObjectHistory(_Held(dsn, locked, hold=True))
        second = ObjectHistory(_Held(dsn, locked, hold=False))
        dec = -30.0 if locked else -31.0  # apart: the second race must not find the first's object
        a, b = candidate(f"x{locked}/0", ra=20.0, dec=dec), candidate(f"y{locked}/0", ra=20.0, dec=dec)
        t1 = threading.Thread(target=first.associate, args=(f"x{locked}", 60000.0, "r", [a]))
        t1.start()
        assert first.store.inside.wait(10)  # a's object is written, not committed
        t2 = threading.Thread(target=second.associate, args=(f"y{locked}", 60000.1, "r", [b]))
        t2.start()
        time.sleep(0.5)
        assert second.store.inside.is_set() is not locked  # with the lock it waits; without, it goes ahead
        first.store.release.set()
        t1.join(10)
        t2.join(10)
        first.close()
        second.close()
        return a.obj.object_id, b.obj.object_id

    one, two = race(locked=True)
    assert one == two
    one, two = race(locked=False)
    assert one != two  # the duplicate object the locks prevent


def _writer(dsn: str, worker: int, positions: list[tuple[float, float]], frames: int, barrier) -> None:
    """Associate ``frames`` frames, each with a detection at every position (jittered), in lockstep with the other."""
    rng = np.random.default_rng(worker)
    h = open_history(".", HistoryConfig(dsn=dsn))
    for f in range(frames):
        cands = [candidate(f"w{worker}-{f}/{i}", ra=ra + rng.normal(0, 0.1) / 3600, dec=dec + rng.normal(0, 0.1) / 3600)
                 for i, (ra, dec) in enumerate(positions)]
        rng.shuffle(cands)
        barrier.wait(30)
        h.associate(f"w{worker}-{f}", 60000.0 + f + worker / 10, "r", cands)
    h.close()


def test_two_processes_associating_the_same_positions_make_one_object_each(dsn):
    """Two processes associate frames with detections at the same 24 positions, in lockstep: 24 objects."""
    cell = CELL_ARCSEC / 3600
    positions = [(150.0 + 10 * i / 3600, 2.0) for i in range(12)]  # 10 arcsec apart
    positions += [(0.0001 * i - 0.0003, round(-30.0 / cell) * cell + (0.6 if i % 2 else -0.6) / 3600 + 5 * i / 3600)
                  for i in range(12)]  # across RA 0 and astride a cell edge
    frames = 12
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(dsn, w, positions, frames, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    h = open_history(".", HistoryConfig(dsn=dsn))
    objects = h.db.execute("SELECT object_id, ndet FROM objects").fetchall()
    assert len(objects) == len(positions) and {n for _, n in objects} == {2 * frames}
    per_object = h.db.execute("SELECT object_id, COUNT(*) FROM detections GROUP BY object_id").fetchall()
    assert sorted(per_object) == sorted(objects)
    h.close()
