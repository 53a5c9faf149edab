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
