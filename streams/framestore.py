"""Frame store for frames sent by reference (too large to travel inline on Kafka).

Objects are content-addressed (``<root>/<sha256>.fits``) through fsspec, so the root can be a local
directory or an object store URL. Reads are confined to the configured root: a message cannot make
a stage read an arbitrary path, nor reach another filesystem (an ``::http://`` chain).
"""

from __future__ import annotations

import re

import fsspec

from broker.errors import ChecksumMismatch, FrameStoreError, FrameStoreUnavailable, FrameTooLarge
from broker.frame import sha256

#: The name of an object: the hex SHA-256 of its bytes.
_OBJECT = re.compile(r"[0-9a-f]{64}\.fits")


class FrameStore:
    """Put and get frame bytes by URI.

    Parameters
    ----------
    root : str
        fsspec URL or local directory of the store.
    """

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)

    def put(self, payload: bytes) -> tuple[str, str]:
        """Store ``payload``; return (uri, sha256).

        Raises
        ------
        FrameStoreUnavailable
            The store cannot be written (down, full, read-only): an outage, the frame is kept and retried.
        """
        digest = sha256(payload)
        path = f"{self._root_path}/{digest}.fits"
        try:
            self.fs.makedirs(self._root_path, exist_ok=True)
            if not self.fs.exists(path):
                tmp = f"{path}.tmp"
                with self.fs.open(tmp, "wb") as fh:
                    fh.write(payload)
                self.fs.mv(tmp, path)
        except Exception as exc:
            raise FrameStoreUnavailable(f"frame store {self.root} cannot be written: "
                                        f"{type(exc).__name__}: {exc}") from exc
        return f"{self.root}/{digest}.fits", digest

    def get(self, uri: str, checksum: str, max_bytes: int) -> bytes:
        """Read the object ``uri`` of this store, check its size and SHA-256.

        The store is content-addressed, so the only URIs it serves are ``<root>/<sha256>.fits``
        (64 lowercase hex digits), read through the store's own filesystem. Anything else (another
        path, ``..``, an fsspec chain such as ``<root>/x::http://host/y``, another scheme) is
        refused before any filesystem is touched.

        Raises
        ------
        FrameStoreError
            A URI that is not one of this store's objects, or a missing object.
        FrameTooLarge, ChecksumMismatch
            The object is over ``max_bytes``, or its bytes do not hash to ``checksum``.
        """
        name = uri[len(self.root) + 1:] if uri.startswith(self.root + "/") else ""
        if not _OBJECT.fullmatch(name):
            raise FrameStoreError(f"URI {uri[:200]!r} is outside the frame store: it serves only "
                                  f"{self.root}/<sha256>.fits (64 hex digits)")
        payload = self._read(f"{self._root_path}/{name}", uri, max_bytes)
        if sha256(payload) != checksum:
            raise ChecksumMismatch(f"{uri}: SHA-256 {sha256(payload)[:12]}... != announced {checksum[:12]}...")
        return payload

    def _read(self, path: str, uri: str, max_bytes: int) -> bytes:
        """The bytes of the object at ``path``, at most ``max_bytes`` of them read whatever its size claims.

        Raises
        ------
        FrameStoreError
            No such object, or one that cannot be read (a directory at its name was
            ``unexpected:IsADirectoryError``), in a store that answers.
        FrameStoreUnavailable
            The read failed and the store's root does not answer either (:meth:`_check_reachable`).
        FrameTooLarge
            Over ``max_bytes``, by its size or by what it holds (a link to ``/dev/zero`` claims 0 bytes).
        """
        try:
            size = self.fs.size(path)
            if size is not None and size > max_bytes:
                raise FrameTooLarge(f"{uri} holds {size} bytes, over the {max_bytes}-byte limit")
            with self.fs.open(path, "rb") as fh:
                payload = fh.read(max_bytes + 1)
        except FrameTooLarge:
            raise
        except Exception as exc:
            self._check_reachable(exc)
            if isinstance(exc, FileNotFoundError):
                raise FrameStoreError(f"{uri} does not exist in the frame store") from exc
            raise FrameStoreError(f"{uri} cannot be read from the frame store: {type(exc).__name__}: {exc}") from exc
        if len(payload) > max_bytes:
            raise FrameTooLarge(f"{uri} holds over {max_bytes} bytes, the limit")
        return payload

    def _check_reachable(self, cause: Exception) -> None:
        """Raise :class:`FrameStoreUnavailable` unless the store's root answers.

        Called after a read failed, to tell the input's fault from the store's. A root that answers,
        even "no such folder" (then no object exists either), makes the failure the input's: a
        missing object is dead-lettered. A root that does not answer (a connection refused or timed
        out, a stale network mount, no permission) is the store's: the frame is kept and retried,
        so an outage loses nothing. The listing cache is dropped first, so a store that went away
        is not taken for present.
        """
        try:
            self.fs.invalidate_cache()
            self.fs.info(self._root_path)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise FrameStoreUnavailable(f"frame store {self.root} does not answer ({type(exc).__name__}: {exc}); "
                                        f"reading an object gave {type(cause).__name__}: {cause}") from cause
