"""Saved watchlists: kept per owner in order, replaced by name, bounded, and hostile names refused."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from broker.errors import ConfigError, InvalidWatchlist, InvalidWatchlistName, NotFound, WatchlistQuota
from broker.watchlist import Watchlist, read_watchlist
from broker.watchlist_store import MAX_LIST_NAME, WatchlistStore, check_list_name

TARGETS = "name,ra,dec,radius\nNGC 4993,13:09:47.7,-23:23:02,5\nM31,10.6847,41.2690,60\nfield #1,0.5,-89.9,\n"


def _list(n: int) -> Watchlist:
    return read_watchlist("ra,dec\n" + "".join(f"{i * 0.01},{i * 0.001}\n" for i in range(n)))


def test_a_list_comes_back_in_order_with_its_entries_and_persists(tmp_path):
    path = tmp_path / "sub" / "watchlists.sqlite"
    saved = read_watchlist(TARGETS, default_radius_arcsec=3.0)
    with WatchlistStore(path) as store:
        info, created = store.save("ana", "hosts", saved, now=100.0)
    assert created and (info.name, info.entries, info.created, info.updated) == ("hosts", 3, 100.0, 100.0)
    with WatchlistStore(path) as store:  # another connection, as the portal opens one per request
        info, back = store.load("ana", "hosts")
        listed = store.lists("ana")
    assert back.names == ("NGC 4993", "M31", "field #1") and listed == [info]
    np.testing.assert_array_equal(back.ra, saved.ra)
    np.testing.assert_array_equal(back.dec, saved.dec)
    np.testing.assert_array_equal(back.radius_arcsec, [5.0, 60.0, 3.0])
    assert back.near(float(saved.ra[1]), float(saved.dec[1]))[0]["name"] == "M31"  # matches as the original


def test_saving_a_name_again_replaces_the_list_and_keeps_when_it_was_created(tmp_path):
    with WatchlistStore(tmp_path / "w.sqlite") as store:
        store.save("ana", "hosts", read_watchlist(TARGETS), now=100.0)
        info, created = store.save("ana", "hosts", _list(1), now=200.0)
        assert not created and (info.entries, info.created, info.updated) == (1, 100.0, 200.0)
        assert store.load("ana", "hosts")[1].names == ("row 2",)
        assert store.lists("ana") == [info]
        db = sqlite3.connect(store.path)
        assert db.execute("SELECT count(*) FROM watchlist_entries").fetchone() == (1,)  # the old rows are gone
        db.close()


def test_an_owner_sees_and_changes_only_their_own_lists(tmp_path):
    with WatchlistStore(tmp_path / "w.sqlite") as store:
        store.save("ana", "hosts", read_watchlist(TARGETS))
        store.save("ana", "fields", _list(2))
        store.save("ben", "hosts", _list(1))
        assert [s.name for s in store.lists("ana")] == ["fields", "hosts"]
        assert [(s.name, s.entries) for s in store.lists("ben")] == [("hosts", 1)]
        assert store.lists("carla") == []
        for act in (store.load, store.delete):
            with pytest.raises(NotFound, match="no watchlist named 'fields'"):
                act("ben", "fields")
        store.delete("ben", "hosts")
        assert store.load("ana", "hosts")[0].entries == 3  # ana's list of that name is untouched


def test_deleting_removes_the_entries_and_a_missing_list_is_not_found(tmp_path):
    with WatchlistStore(tmp_path / "w.sqlite") as store:
        store.save("ana", "hosts", read_watchlist(TARGETS))
        store.delete("ana", "hosts")
        with pytest.raises(NotFound):
            store.delete("ana", "hosts")
        with pytest.raises(NotFound):
            store.load("ana", "hosts")
        db = sqlite3.connect(store.path)
        assert db.execute("SELECT (SELECT count(*) FROM watchlists), (SELECT count(*) FROM watchlist_entries)"
                          ).fetchone() == (0, 0)
        db.close()


@pytest.mark.parametrize("name", ["M31", "hosts-2026.v1_b", "0", "a" * MAX_LIST_NAME])
def test_names_of_letters_digits_dots_dashes_and_underscores_are_taken(name):
    assert check_list_name(name) == name


@pytest.mark.parametrize("name", [
    "", ".", "..", "../x", "..\\x", "a/b", ".hidden", "-rf", "_x", "a" * (MAX_LIST_NAME + 1), "a" * 10_000,
    "a\x00", "a\n", "a\r\nb", "\x1b[31m", "a\u2028", "é", "名前", "M 31", " M31", "M31 ", "a%2Fb", "a;drop", 7, None,
])
def test_other_names_are_refused_with_the_rule(tmp_path, name):
    with pytest.raises(InvalidWatchlistName, match="1-64 ASCII letters") as caught:
        check_list_name(name)
    assert len(str(caught.value)) < 200  # a 10 kB name is not echoed whole
    with WatchlistStore(tmp_path / "w.sqlite") as store:
        with pytest.raises(InvalidWatchlistName):
            store.save("ana", name, _list(1))
        with pytest.raises(InvalidWatchlistName):
            store.load("ana", name)
        assert store.lists("ana") == []


def test_the_entries_of_a_list_are_bounded_and_an_empty_list_refused(tmp_path):
    with WatchlistStore(tmp_path / "w.sqlite", max_entries=3) as store:
        store.save("ana", "three", _list(3))
        with pytest.raises(InvalidWatchlist, match="1 to 3 entries, not 4"):
            store.save("ana", "four", _list(4))
        empty = Watchlist((), np.zeros(0), np.zeros(0), np.zeros(0))
        with pytest.raises(InvalidWatchlist, match="not 0"):
            store.save("ana", "none", empty)
        assert [s.name for s in store.lists("ana")] == ["three"]


def test_an_owners_lists_and_entries_are_bounded_a_replacement_is_not_counted_twice(tmp_path):
    with WatchlistStore(tmp_path / "w.sqlite", max_lists=2, max_owner_entries=5) as store:
        store.save("ana", "a", _list(2))
        store.save("ana", "b", _list(2))
        with pytest.raises(WatchlistQuota, match=r"keep 2 watchlists, the most allowed \(2\)"):
            store.save("ana", "c", _list(1))
        store.save("ana", "b", _list(3))  # replacing one: 2 + 3 entries, within 5
        with pytest.raises(WatchlistQuota, match="would hold 6 entries, more than the 5"):
            store.save("ana", "b", _list(4))
        assert [(s.name, s.entries) for s in store.lists("ana")] == [("a", 2), ("b", 3)]  # the refusal changed nothing
        assert store.load("ana", "b")[1].names == ("row 2", "row 3", "row 4")
        store.save("ben", "c", _list(5))  # another owner's room is their own
        store.delete("ana", "a")
        store.save("ana", "c", _list(2))


def test_saves_at_once_of_one_owner_cannot_both_pass_the_bounds(tmp_path):
    path, barrier = tmp_path / "w.sqlite", threading.Barrier(8)
    WatchlistStore(path).close()

    def save(i: int) -> str:
        with WatchlistStore(path, max_lists=1) as store:
            barrier.wait()
            try:
                store.save("ana", f"list{i}", _list(1))
            except WatchlistQuota:
                return "refused"
            return "saved"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(save, range(8)))
    assert sorted(outcomes) == ["refused"] * 7 + ["saved"]
    with WatchlistStore(path) as store:
        assert len(store.lists("ana")) == 1


def test_a_file_that_is_not_a_watchlists_database_is_a_config_error(tmp_path):
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="watchlists database"):
        WatchlistStore(tmp_path / "junk.sqlite")
    with pytest.raises(ConfigError):
        WatchlistStore(tmp_path)  # a folder
