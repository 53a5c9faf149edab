"""Writing an archive: each batch's files, then its commit record; recovery, compaction and vacuum."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
import uuid
from collections.abc import Sequence
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from broker.archive.arrow import SCHEMA_KEY
from broker.archive.config import ArchiveConfig
from broker.archive.log import CHECKPOINTS, COMMITS, Commit, DataFile, OffsetRange, Snapshot
from broker.archive.reader import Archive
from broker.errors import ArchiveCorrupt, ArchiveError

#: Most bytes of Arrow data in one row group of a file (about; a row group holds whole record batches). The
#: ``alert`` column is a struct holding the cutouts: Arrow concatenates it in one chunk only below 2 GiB
#: ("offset overflow while concatenating arrays"), and its Parquet reader refuses a row group holding
#: 2 GiB of it ("Nested data conversions not implemented for chunked array outputs").
ROW_GROUP_BYTES = 512 * 1024 * 1024
#: Most rows in one row group of a file. A file's rows are sorted by declination (:func:`_sky_order`), so
#: each row group's min/max statistics of ``dec`` span a narrow band and DuckDB skips the row groups that a
#: cone's declination band misses (``in_cone``): a 5 arcsec cone reads one row group of a file, not all of them.
#: 16384: DuckDB spends ~0.25 ms on each row group it opens, whatever it reads (the files' 167 leaf
#: columns): with 64-byte cutouts, at 10^6 alerts in 95 files, row groups of 4096 rows made a count 1.7x
#: and a read of every ``ra``, ``dec`` 1.5x slower, and a 5 arcsec cone no faster than one unsorted row
#: group; 16384 were as fast as one for those and the fastest cone (``bench/portal.py``'s archive, CPU
#: time of one DuckDB thread). Alerts with v2 cutouts (~45 kB) reach :data:`ROW_GROUP_BYTES` first (~11,900).
ROW_GROUP_ROWS = 16384
#: The columns that say which Kafka message a row came from (the first keys of ``COPY_ORDER``).
_KAFKA = ("kafka_topic", "kafka_partition", "kafka_offset")


def _slug(text: str | None) -> str:
    """A partition folder value: Hive-style %XX escapes for anything but letters, digits and ``-_.``.

    A value escaped to over 64 characters keeps its first 48 and a hash of the whole (the column
    keeps the value itself), so that no telescope name makes a path too long.
    """
    slug = quote(text, safe="-_.") if text else "unknown"
    return slug if len(slug) <= 64 else f"{slug[:48]}~{hashlib.sha1(slug.encode()).hexdigest()[:12]}"


def _partitions(batches: Sequence[pa.RecordBatch]) -> dict[tuple[str, str, int], pa.Table]:
    """The rows of ``batches`` by (night, telescope, schema version)."""
    by_version: dict[int, list[pa.RecordBatch]] = {}
    for batch in batches:
        by_version.setdefault(int((batch.schema.metadata or {})[SCHEMA_KEY]), []).append(batch)
    out: dict[tuple[str, str, int], pa.Table] = {}
    for version, group in by_version.items():
        table = pa.Table.from_batches(group)  # in its chunks: _write_parquet combines them by row group
        rows: dict[tuple[str, str], list[int]] = {}
        keys = zip(table.column("night").to_pylist(), table.column("telescope").to_pylist(), strict=True)
        for i, (night, telescope) in enumerate(keys):
            rows.setdefault((night.isoformat(), telescope or ""), []).append(i)
        for (night, telescope), idx in rows.items():  # a filter, not take(): take() concatenates the chunks
            out[(night, telescope, version)] = table if len(rows) == 1 else table.filter(_mask(table.num_rows, idx))
    return out


def _mask(n: int, rows: list[int]) -> pa.Array:
    """A boolean array of ``n`` values, true at ``rows``."""
    mask = [False] * n
    for i in rows:
        mask[i] = True
    return pa.array(mask, pa.bool_())


def _sky_order(table: pa.Table) -> np.ndarray:
    """Row indices of ``table`` by declination (null last), each Kafka message's rows in their order.

    The rows that share Kafka coordinates (the alerts of one message, or an offset archived twice)
    all take the declination of the first of them, and ties keep the rows' order: so the order of
    such rows in the file, which breaks ties in ``broker.archive.reader.COPY_ORDER`` (the copy of
    an alert that ``alerts`` holds), is the order they had before.
    """
    n = table.num_rows
    coords = table.select(list(_KAFKA))
    by_message = pc.sort_indices(coords, [(c, "ascending") for c in _KAFKA]).to_numpy()  # stable
    starts = np.zeros(n, dtype=bool)
    starts[:1] = True
    for name, missing in zip(_KAFKA, ("", -1, -1), strict=True):
        values = coords.column(name).fill_null(missing).take(by_message).to_numpy(zero_copy_only=False)
        starts[1:] |= values[1:] != values[:-1]
    message = np.cumsum(starts) - 1  # the message of each row, in by_message order
    dec = table.column("dec").to_numpy(zero_copy_only=False).astype(np.float64)  # null: NaN, sorted last
    key = np.empty(n)
    key[by_message] = dec[by_message[starts]][message]
    return np.lexsort((np.arange(n), key))


def _row_groups(batches: list[pa.RecordBatch], order: np.ndarray) -> list[np.ndarray]:
    """``order`` cut in row groups of at most :data:`ROW_GROUP_ROWS` rows and ~:data:`ROW_GROUP_BYTES`.

    ``order`` indexes the rows of ``batches`` (non-empty) end to end. Bytes are estimated from each
    record batch's bytes per row; :func:`_pieces` checks the real size.
    """
    sizes = [b.nbytes / b.num_rows for b in batches]
    per_row = np.repeat(sizes, [b.num_rows for b in batches])[order]
    groups, start = [], 0
    while start < len(order):
        fits = int(np.searchsorted(np.cumsum(per_row[start:start + ROW_GROUP_ROWS]), ROW_GROUP_BYTES, "right"))
        end = start + max(1, fits)
        groups.append(order[start:end])
        start = end
    return groups


def _pieces(batches: list[pa.RecordBatch], starts: np.ndarray, rows: np.ndarray) -> list[list[pa.RecordBatch]]:
    """``rows`` of ``batches`` (first rows at ``starts``) in their order, as row groups under :data:`ROW_GROUP_BYTES`.

    Taken from each record batch apart: ``Table.take`` concatenates the chunks, over 2 GiB for a
    merge of large alerts. A row group over the bound (alerts of very different sizes in one batch)
    is halved, down to one row.
    """
    rows = np.sort(rows)
    cuts = np.searchsorted(rows, starts)
    pieces = [batches[b].take(pa.array(rows[cuts[b]:cuts[b + 1]] - starts[b]))
              for b in range(len(batches)) if cuts[b + 1] > cuts[b]]
    if len(rows) > 1 and sum(p.nbytes for p in pieces) > ROW_GROUP_BYTES:
        half = len(rows) // 2
        return _pieces(batches, starts, rows[:half]) + _pieces(batches, starts, rows[half:])
    return [pieces]


def _write_parquet(table: pa.Table, sink: pa.BufferOutputStream, compression: str) -> None:
    """Write ``table`` as Parquet: its rows by declination (:func:`_sky_order`), in row groups of :func:`_row_groups`.

    Each row group is combined in one chunk (Parquet writes many chunks 30x slower) and holds its
    rows in their order in ``table``. The whole table was once combined, and 33 alerts of 64 MiB
    (2.2 GB, a batch of the archive stage or a compaction) raised ``ArrowInvalid`` ("offset
    overflow"); a row group stays under 2 GiB, so every row group can be read back.
    """
    batches = [b for b in table.to_batches() if b.num_rows]
    starts = np.cumsum([0] + [b.num_rows for b in batches])
    with pq.ParquetWriter(sink, table.schema, compression=compression) as out:
        if not batches:
            out.write_table(table)
        for group in _row_groups(batches, _sky_order(table)):
            for pieces in _pieces(batches, starts, group):
                out.write_table(pa.Table.from_batches(pieces, table.schema).combine_chunks())


def _bounds(table: pa.Table, column: str) -> tuple[float, float] | tuple[None, None]:
    """Least and greatest value of ``column`` in ``table``, nulls left out: a file's bounds (:class:`DataFile`).

    (None, None) when the column holds no value, or a NaN or an infinity among them (which the
    archive's rows never hold: a NaN is null there), so that such a file is always read.
    """
    values = pc.drop_null(table.column(column)).to_numpy().astype(np.float64)
    if not values.size or not np.isfinite(values).all():
        return None, None
    return float(values.min()), float(values.max())


def _is_orphan(rel: str, committed: set[str]) -> bool:
    """Whether ``rel`` is left over from a batch that never committed (a data file or a temporary)."""
    return ".tmp-" in rel.rsplit("/", 1)[-1] or (rel.endswith(".parquet") and rel not in committed)


def _unix(iso: str) -> float:
    """Unix time of an ISO 8601 time of the commit log."""
    return dt.datetime.fromisoformat(iso).timestamp()


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArchiveWriter:
    """The one writer of an archive: each batch's files, then the batch's commit record; compactions.

    Parameters
    ----------
    archive : Archive
    config : ArchiveConfig
        Parquet codec and compaction settings.

    An archive has one writer at a time: :meth:`recover` deletes every file that no commit names,
    and a second writer's commit fails on the record name the first one took.
    """

    def __init__(self, archive: Archive, config: ArchiveConfig | None = None) -> None:
        self.archive = archive
        self.config = config or ArchiveConfig()
        self.snap = Snapshot()
        self.retired: dict[str, float] = {}  # path -> Unix time after which it may be deleted

    def recover(self) -> list[str]:
        """Read the commit log; delete the files of batches that never committed and retired files past their time.

        Returns the paths deleted.
        """
        self.snap = self.archive.snapshot()
        now, keep = time.time(), self.config.retain_removed_seconds
        self.retired = {p: _unix(c) + keep for p, c in self.snap.retired.items()}
        self.retired = {p: t for p, t in self.retired.items() if t > now and p not in self.snap.live}
        self.snap.retired = {p: c for p, c in self.snap.retired.items() if p in self.retired}
        kept = set(self.snap.live) | set(self.retired)
        orphans = sorted(rel for rel in self.archive.sizes() if _is_orphan(rel, kept))
        for rel in orphans:
            self.archive.fs.rm_file(self.archive.path(rel))
        return orphans

    def positions(self) -> dict[tuple[str, int], int]:
        """Where each (topic, partition) stands: the offset after the last archived one."""
        return dict(self.snap.positions)

    def write(self, batches: Sequence[pa.RecordBatch]) -> list[DataFile]:
        """Write ``batches`` (of :func:`to_batch`) as the files of the next commit, each whole or not at all.

        One file per (night, telescope, schema version); nothing reads them before :meth:`commit`.
        """
        seq = self.snap.seq + 1
        parts = sorted(_partitions(batches).items())
        return [self._write_file(f"part-{seq:08d}-{i:03d}", key, table) for i, (key, table) in enumerate(parts)]

    def _write_file(self, stem: str, key: tuple[str, str, int], table: pa.Table) -> DataFile:
        night, telescope, version = key
        rel = f"night={night}/telescope={_slug(telescope)}/{stem}.parquet"
        sink = pa.BufferOutputStream()
        _write_parquet(table, sink, self.config.compression)
        data = sink.getvalue().to_pybytes()
        self._put(rel, data)
        return DataFile(rel, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), version, night, telescope,
                        *_bounds(table, "ra"), *_bounds(table, "dec"), *_bounds(table, "mjd"))

    def commit(self, files: Sequence[DataFile], offsets: Sequence[OffsetRange], dead_letters: int = 0,
               removed: Sequence[str] = ()) -> Commit:
        """Write the next commit record, which makes ``files`` visible, retires ``removed`` and moves the offsets.

        Raises
        ------
        ArchiveError
            Another writer took this commit's record name.
        """
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        commit = Commit(self.snap.seq + 1, created, tuple(files), tuple(offsets), dead_letters, tuple(removed))
        self._put(f"{COMMITS}/{commit.seq:020d}.json", commit.to_json(), exclusive=True)
        self.snap.apply(commit)
        for path in removed:
            self.retired[path] = time.time() + self.config.retain_removed_seconds
        if self.config.checkpoint_every and commit.seq % self.config.checkpoint_every == 0:
            self._put(f"{CHECKPOINTS}/{commit.seq:020d}.json", self.snap.to_json())
        return commit

    def compact(self) -> list[Commit]:
        """Merge small files, tier by tier; return the compaction commits.

        Files under ``compact_max_bytes`` sit in tiers by their rows (tier t: K^t <= rows < K^(t+1),
        K = ``compact_files``). K files of one tier and one (night, telescope, schema version)
        become one file of the next tier, in a commit that adds it and retires them (they stay
        ``retain_removed_seconds`` for queries in flight, then :meth:`vacuum` deletes them). An
        alert is so rewritten at most log_K(alerts of a night) times, and a night of small batches
        ends as a few files, not thousands.

        Raises
        ------
        ArchiveCorrupt
            A file to merge does not match its SHA-256 (nothing is merged).
        """
        commits = []
        while (group := self._full_tier()) is not None:
            commits.append(self._merge(group))
        return commits

    def _full_tier(self) -> list[DataFile] | None:
        """The first K small files of one tier and partition, if any."""
        k = self.config.compact_files
        if k < 2:
            return None
        tiers: dict[tuple[str, str, int, int], list[DataFile]] = {}
        for f in self.snap.live.values():
            if f.size < self.config.compact_max_bytes:
                tier, rows = 0, f.rows
                while rows >= k:
                    tier, rows = tier + 1, rows // k
                group = tiers.setdefault((f.night, f.telescope, f.schema_version, tier), [])
                group.append(f)
                if len(group) == k:
                    return group
        return None

    def _merge(self, group: list[DataFile]) -> Commit:
        tables = []
        for f in group:
            data = self.archive.fs.cat_file(self.archive.path(f.path))
            if hashlib.sha256(data).hexdigest() != f.sha256:
                raise ArchiveCorrupt(f"{self.archive.url}: {f.path} does not match its SHA-256; not compacted")
            tables.append(pq.read_table(pa.BufferReader(data)))
        table = pa.concat_tables(tables)
        key = (group[0].night, group[0].telescope, group[0].schema_version)
        merged = self._write_file(f"part-{self.snap.seq + 1:08d}-merged", key, table)
        return self.commit([merged], [], removed=[f.path for f in group])

    def vacuum(self, now: float | None = None) -> list[str]:
        """Delete the retired files whose time is up (``now``: Unix s, default the clock); return their paths."""
        now = time.time() if now is None else now
        due = sorted(p for p, t in self.retired.items() if t <= now)
        for path in due:
            try:
                self.archive.fs.rm_file(self.archive.path(path))
            except FileNotFoundError:
                pass
            del self.retired[path]
            self.snap.retired.pop(path, None)
        return due

    def _put(self, rel: str, data: bytes, exclusive: bool = False) -> None:
        """Write ``rel`` whole or not at all.

        Locally: a temporary file, fsynced, renamed (``exclusive``: linked, which fails when the name
        is taken). Elsewhere: one upload, which an object store makes visible whole (there is no
        rename; ``exclusive`` checks the name first, which is safe with one writer).
        """
        a = self.archive
        path = a.path(rel)
        if not a.local:
            if exclusive and a.fs.exists(path):
                raise ArchiveError(f"{a.url}: {rel} exists: another writer commits to this archive")
            a.fs.pipe_file(path, data)
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            if exclusive:
                os.link(tmp, path)
            else:
                os.replace(tmp, path)
        except FileExistsError as exc:
            raise ArchiveError(f"{a.url}: {rel} exists: another writer commits to this archive") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(folder)
