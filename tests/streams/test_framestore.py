import pytest

from broker.errors import ChecksumMismatch, FrameStoreError, FrameStoreUnavailable, FrameTooLarge, Outage
from broker.frame import sha256
from streams.framestore import FrameStore


def test_put_get_and_guards(tmp_path):
    store = FrameStore(str(tmp_path / "store"))
    uri, digest = store.put(b"frame-bytes")
    assert digest == sha256(b"frame-bytes")
    assert store.get(uri, digest, 100) == b"frame-bytes"
    with pytest.raises(ChecksumMismatch):
        store.get(uri, sha256(b"other"), 100)
    with pytest.raises(FrameTooLarge):
        store.get(uri, digest, 5)
    with pytest.raises(FrameStoreError, match="outside"):
        store.get("/etc/passwd", digest, 100)
    with pytest.raises(FrameStoreError, match="outside"):
        store.get(f"{store.root}/../../etc/passwd", digest, 100)
    with pytest.raises(FrameStoreError, match="does not exist"):
        store.get(f"{store.root}/{'0' * 64}.fits", digest, 100)


def test_objects_that_are_not_files_are_refused_with_a_reason(tmp_path):
    """A directory at an object's name was ``unexpected:IsADirectoryError``; a link to /dev/zero was read endlessly."""
    import os

    store = FrameStore(str(tmp_path / "store"))
    store.put(b"frame-bytes")
    folder, endless = "ab" * 32, "cd" * 32
    os.makedirs(f"{store.root}/{folder}.fits")
    with pytest.raises(FrameStoreError, match="cannot be read") as err:
        store.get(f"{store.root}/{folder}.fits", folder, 1 << 20)
    assert err.value.reason == "frame_store"
    os.symlink("/dev/zero", f"{store.root}/{endless}.fits")
    with pytest.raises(FrameTooLarge, match="over 1000 bytes"):
        store.get(f"{store.root}/{endless}.fits", endless, 1000)


def test_a_missing_object_is_the_inputs_fault_even_without_a_root(tmp_path):
    """The store answers "no such object" (its root, or not even that): dead-lettered, not retried for ever."""
    import shutil

    store = FrameStore(str(tmp_path / "store"))
    uri, digest = store.put(b"frame-bytes")
    shutil.rmtree(tmp_path / "store")
    with pytest.raises(FrameStoreError, match="does not exist") as err:
        store.get(uri, digest, 100)
    assert not isinstance(err.value, FrameStoreUnavailable)


def test_a_store_that_does_not_answer_is_an_outage_until_it_is_back(tmp_path):
    """A root the filesystem cannot reach (here a file where a folder of its path should be, as a broken mount)."""
    import shutil

    good = FrameStore(str(tmp_path / "store"))
    uri, digest = good.put(b"frame-bytes")
    shutil.move(tmp_path / "store", tmp_path / "kept")
    (tmp_path / "store").write_bytes(b"")  # the root's path now runs through a file: ENOTDIR, not ENOENT
    broken = FrameStore(str(tmp_path / "store" / "frames"))
    with pytest.raises(FrameStoreUnavailable, match="does not answer") as err:
        broken.get(uri.replace(good.root, broken.root), digest, 100)
    assert isinstance(err.value, Outage) and err.value.reason == "frame_store_unavailable"
    with pytest.raises(FrameStoreUnavailable, match="cannot be written"):
        broken.put(b"other-bytes")
    (tmp_path / "store").unlink()
    shutil.move(tmp_path / "kept", tmp_path / "store")
    assert good.get(uri, digest, 100) == b"frame-bytes"  # back: the kept message now goes through


def test_a_network_store_that_refuses_connections_is_an_outage(tmp_path, monkeypatch):
    """An object store or network mount down: every call of its filesystem fails with a connection error."""
    store = FrameStore(str(tmp_path / "store"))
    uri, digest = store.put(b"frame-bytes")

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    for name in ("size", "open", "info"):
        monkeypatch.setattr(store.fs, name, refused)
    with pytest.raises(FrameStoreUnavailable, match="Connection refused"):
        store.get(uri, digest, 100)
    monkeypatch.undo()
    assert store.get(uri, digest, 100) == b"frame-bytes"
