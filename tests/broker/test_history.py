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
