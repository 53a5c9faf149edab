import pytest

from broker.errors import ChecksumMismatch, FrameStoreError, FrameTooLarge
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
