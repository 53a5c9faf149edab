import pytest

from broker.errors import ConfigError
from broker.history import HistoryConfig, ObjectHistory
from tests.helpers import candidate


def test_association_within_radius_and_history():
    h = ObjectHistory(":memory:")
    a = candidate("f1/0", ra=150.0, dec=2.0)
    h.associate("f1", 60000.0, "r", [a])
    assert a.history == [] and a.obj.ndet == 1
    b = candidate("f2/0", ra=150.0 + 1.0 / 3600, dec=2.0)  # 1.0 arcsec away: same object
    c = candidate("f2/1", ra=150.0 + 3.0 / 3600, dec=2.0)  # 3 arcsec: a new one
    h.associate("f2", 60001.0, "r", [b, c])
    assert b.obj.object_id == a.obj.object_id and b.obj.ndet == 2
    assert [d["cand_id"] for d in b.history] == ["f1/0"]
    assert c.obj.object_id != a.obj.object_id and c.history == []
    assert abs(b.obj.ra - (150.0 + 0.5 / 3600)) < 1e-9  # running mean position


def test_reprocessing_a_frame_gives_the_same_answer():
    h = ObjectHistory(":memory:", HistoryConfig(radius_arcsec=1.5))
    h.associate("f1", 60000.0, "r", [candidate("f1/0")])
    first = candidate("f2/0")
    h.associate("f2", 60001.0, "r", [first])
    again = candidate("f2/0")
    h.associate("f2", 60001.0, "r", [again])  # replay after a crash
    assert again.obj == first.obj and again.history == first.history
    assert h.db.execute("SELECT COUNT(*) FROM detections").fetchone()[0] == 2


def test_zero_point_and_limiting_flux_are_kept_with_each_detection():
    h = ObjectHistory(":memory:")
    h.associate("f1", 60000.0, "r", [candidate("f1/0")], magzp=27.5, limiting_flux=120.0)
    h.associate("f2", 60001.0, "r", [candidate("f2/0")])  # a frame without zero point or limit
    later = candidate("f3/0")
    h.associate("f3", 60002.0, "r", [later], magzp=26.0, limiting_flux=80.0)
    assert [(d["cand_id"], d["magzp"], d["limiting_flux"]) for d in later.history] == [
        ("f1/0", 27.5, 120.0), ("f2/0", None, None)]


def test_a_history_file_of_the_first_release_gains_the_new_columns(tmp_path):
    import sqlite3

    path = tmp_path / "history.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE objects (object_id TEXT PRIMARY KEY, ra REAL NOT NULL, dec REAL NOT NULL,
            ndet INTEGER NOT NULL, first_mjd REAL NOT NULL);
        CREATE TABLE detections (cand_id TEXT PRIMARY KEY, object_id TEXT NOT NULL, frame_id TEXT NOT NULL,
            mjd REAL NOT NULL, filter TEXT NOT NULL, ra REAL NOT NULL, dec REAL NOT NULL, flux REAL NOT NULL,
            flux_err REAL NOT NULL, snr REAL NOT NULL, rb REAL);
        INSERT INTO objects VALUES ('OBJold', 150.0, 2.0, 1, 59999.0);
        INSERT INTO detections VALUES ('f0/0', 'OBJold', 'f0', 59999.0, 'r', 150.0, 2.0, 900.0, 90.0, 10.0, 0.8);
    """)
    old.commit()
    old.close()
    h = ObjectHistory(path)
    cols = [r[1] for r in h.db.execute("PRAGMA table_info(detections)")]
    assert cols[-3:] == ["magzp", "limiting_flux", "telescope"]
    assert [r[1] for r in h.db.execute("PRAGMA table_info(objects)")][-3:] == ["features", "classification",
                                                                               "summary_mjd"]
    a = candidate("f1/0")
    h.associate("f1", 60000.0, "r", [a], magzp=27.0, limiting_flux=100.0, telescope="T1")
    b = candidate("f2/0")
    h.associate("f2", 60001.0, "r", [b])
    assert a.obj.object_id == "OBJold" and [(d["cand_id"], d["magzp"]) for d in a.history] == [("f0/0", None)]
    assert [(d["cand_id"], d["magzp"], d["limiting_flux"], d["telescope"]) for d in b.history] == [
        ("f0/0", None, None, None), ("f1/0", 27.0, 100.0, "T1")]
    h.close()
    again = ObjectHistory(path)  # a migrated file opens again as it is
    assert again.db.execute("SELECT COUNT(*) FROM detections").fetchone()[0] == 3
    again.close()


def test_an_objects_summary_is_that_of_its_latest_detection():
    h = ObjectHistory(":memory:")
    a, b = candidate("f1/0"), candidate("f2/0")
    h.associate("f1", 60000.0, "r", [a])
    h.associate("f2", 60001.0, "r", [b])
    oid = b.obj.object_id
    assert h.summary(oid) == (None, None) and h.summary("OBJnone") == (None, None)
    h.keep_summaries([(oid, 60001.0, {"ndet": 2.0}, {"label": "SN"})])
    h.keep_summaries([(oid, 60000.0, {"ndet": 1.0}, None)])  # the earlier frame re-processed late: kept as it was
    assert h.summary(oid) == ({"ndet": 2.0}, {"label": "SN"})
    h.close()


def test_copy_region_copies_the_nearby_objects_with_their_detections_and_reads_only():
    source = ObjectHistory(":memory:")
    for f, mjd in (("f1", 60000.0), ("f2", 60001.0)):
        source.associate(f, mjd, "r", [candidate(f"{f}/0", ra=150.0, dec=2.0),  # one object, two detections
                                       candidate(f"{f}/1", ra=150.2, dec=2.0),  # 0.2 deg away
                                       candidate(f"{f}/2", ra=10.0, dec=-40.0)], magzp=27.0)
    source.keep_summaries([(_object_of(source, "f2/0"), 60001.0, {"ndet": 2.0}, None)])
    before = source.db.execute("SELECT COUNT(*) FROM detections").fetchone()[0]
    into = ObjectHistory(":memory:")
    assert source.copy_region(into, 150.0, 2.0, 0.1) == 1
    later = candidate("f3/0", ra=150.0, dec=2.0)
    into.associate("f3", 60002.0, "r", [later])
    assert later.obj.ndet == 3 and [(d["cand_id"], d["magzp"]) for d in later.history] == [("f1/0", 27.0),
                                                                                            ("f2/0", 27.0)]
    assert into.summary(later.obj.object_id)[0] == {"ndet": 2.0}
    assert source.db.execute("SELECT COUNT(*) FROM detections").fetchone()[0] == before  # nothing written there
    wide = ObjectHistory(":memory:")
    assert source.copy_region(wide, 150.0, 2.0, 1.0, max_objects=1) == 1  # the nearest only
    assert wide.db.execute("SELECT ra FROM objects").fetchall() == [(150.0,)]
    assert source.copy_region(ObjectHistory(":memory:"), float("nan"), 2.0, 1.0) == 0
    assert source.copy_region(ObjectHistory(":memory:"), 150.0, 95.0, 1.0) == 0


def _object_of(history: ObjectHistory, cand_id: str) -> str:
    return history.db.execute("SELECT object_id FROM detections WHERE cand_id = ?", (cand_id,)).fetchone()[0]


@pytest.mark.parametrize("radius", [3600.1, 1e308, float("inf")])
def test_an_association_radius_beyond_a_degree_is_a_config_error(radius):
    """1e308 arcsec loaded, then the score stage locked every sky cell and never finished; inf overflowed."""
    with pytest.raises(ConfigError, match="radius_arcsec must be 0 to 3600"):
        HistoryConfig(radius_arcsec=radius)
    assert HistoryConfig(radius_arcsec=3600.0).radius_arcsec == 3600.0  # the bound itself
