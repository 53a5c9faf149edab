"""The archive's configuration (``[archive]``) and its columns: what is stored and how it batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from broker.errors import ConfigError

#: The struct column that holds the whole alert record.
ALERT_COLUMN = "alert"
#: Parquet codecs accepted by :class:`ArchiveConfig`.
CODECS = ("zstd", "snappy", "gzip", "lz4", "none")


@dataclass(frozen=True)
class ArchiveConfig:
    """The archive stage and its dataset (``[archive]`` of the pipeline config).

    Attributes
    ----------
    path : str
        Directory or fsspec URL (e.g. ``s3://bucket/alerts``) of the dataset. Default ``""``:
        ``<state_dir>/archive``, beside the stages' other state.
    batch_alerts : int
        Alerts per batch (count). A batch is one commit and one file per (night, telescope, schema
        version). Default 2000: files of ~100 MB with v2 cutouts (~45 kB an alert), the size range
        Parquet readers prefer, and a bounded batch in memory.
    batch_seconds : float
        A batch is also committed this long (s) after its first message, so a quiet stream is
        archived (and queryable) within this delay. Default 10: the demo and the tests wait for
        it; a deployment with steady traffic may raise it to make fewer, larger files.
    batch_bytes : int
        A batch is also committed once the messages it holds (their keys and values, as read from
        Kafka) pass this size (bytes), so that a batch of large alerts (up to 64 MiB each,
        ``streams.topics.MAX_MESSAGE_BYTES``) stays bounded in memory: the stage holds the
        messages, their decoded alerts and, while writing, their Arrow rows and Parquet buffers,
        about 6.5 times this at its peak (121 MiB of messages of 6 MiB alerts: 263 MiB of Python
        objects by tracemalloc and 396 MiB of Arrow's memory pool besides the messages; resident
        memory rose 690 MiB). Default 128 MiB, ~0.8 GiB at the peak: ~1.4 times a full default
        batch of v2 alerts (2000 of ~45 kB, ~90 MB), which it leaves as it was.
    longitudes : dict of str to float
        East longitude (deg) of each telescope, which sets where its nights change date
        (:func:`night_of`). Default: none; an unlisted telescope uses 0 (Greenwich: its night
        changes date at 12:00 UTC).
    compression : str
        Parquet codec, one of :data:`CODECS`. Default ``zstd``: small and fast to read; the
        cutouts, already gzipped FITS, pass through it nearly unchanged.
    compact_files : int
        Small files of one tier that are merged into one (count, K of
        :meth:`ArchiveWriter.compact`; 0: never). Default 16: a query opens each file (~1 ms a
        file measured by ``bench/archive.py``), so a night of 10 s batches (~3000 files) ends as a
        few; each alert is rewritten at most log_16 of its night's alerts times (3 for 10^5).
    compact_max_bytes : int
        Files of this size or more are left alone (bytes). Default 256 MiB: large enough that a
        query pays for its rows, not its files.
    retain_removed_seconds : float
        Files retired by a compaction stay this long (s) for queries that listed them before.
        Default 3600.
    checkpoint_every : int
        The state of the archive (its files and offsets) is written every this many commits
        (count; 0: never), so that a reader reads it and at most this many records instead of the
        whole log (~90 us a record, measured: 10^4 records would add ~1 s to every query). Default 100.
    """

    path: str = ""
    batch_alerts: int = 2000
    batch_seconds: float = 10.0
    batch_bytes: int = 128 * 1024 * 1024
    longitudes: dict[str, float] = field(default_factory=dict)
    compression: str = "zstd"
    compact_files: int = 16
    compact_max_bytes: int = 256 * 1024 * 1024
    retain_removed_seconds: float = 3600.0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if min(self.compact_files, self.checkpoint_every, self.retain_removed_seconds) < 0 or \
                self.compact_max_bytes < 1:
            raise ConfigError("archive compaction needs compact_files, checkpoint_every and retain_removed_seconds "
                              ">= 0 and compact_max_bytes >= 1")
        if self.batch_alerts < 1 or not self.batch_seconds > 0 or self.batch_bytes < 1:
            raise ConfigError(f"archive batches need batch_alerts >= 1, batch_seconds > 0 and batch_bytes >= 1, not "
                              f"{self.batch_alerts}, {self.batch_seconds} and {self.batch_bytes}")
        if self.compression not in CODECS:
            raise ConfigError(f"unknown Parquet codec {self.compression!r}; one of {list(CODECS)}")
        if not all(isinstance(v, (int, float)) and -360 <= v <= 360 for v in self.longitudes.values()):
            raise ConfigError(f"archive longitudes must be degrees east, not {self.longitudes}")


@dataclass(frozen=True)
class Column:
    """A column of an archive file beside the ``alert`` record.

    Attributes
    ----------
    name : str
    type : pyarrow.DataType
    path : tuple of str
        Field names leading to the value in the alert record; empty for the columns the archive
        sets itself (night, schema version, Kafka coordinates).
    doc : str
        Meaning and unit.
    """

    name: str
    type: pa.DataType
    path: tuple[str, ...]
    doc: str


#: The columns before ``alert``: where and when, the values one filters on, and bookkeeping.
COLUMNS: tuple[Column, ...] = (
    Column("night", pa.date32(), (), "observing night at the telescope: the local date of its evening (night_of)"),
    Column("telescope", pa.string(), ("provenance", "telescope"), "telescope id"),
    Column("object_id", pa.string(), ("objectId",), "object id"),
    Column("alert_id", pa.int64(), ("alertId",), "alert id"),
    Column("candid", pa.string(), ("candid",), "candidate id <frame_id>/<index>"),
    Column("frame_id", pa.string(), ("provenance", "frame_id"), "exposure id"),
    Column("mjd", pa.float64(), ("source", "mjd"), "exposure start (MJD, days UTC)"),
    Column("ra", pa.float64(), ("source", "ra"), "right ascension (deg, ICRS)"),
    Column("dec", pa.float64(), ("source", "dec"), "declination (deg, ICRS)"),
    Column("filter", pa.string(), ("source", "filter"), "band"),
    Column("snr", pa.float64(), ("source", "snr"), "signed S/N of the PSF-fit difference flux"),
    Column("magpsf", pa.float64(), ("source", "magpsf"), "difference magnitude (mag); null without zero point"),
    Column("rb", pa.float64(), ("scores", "rb"), "real/bogus score [0, 1]; null when not scored"),
    Column("anomaly", pa.float64(), ("scores", "anomaly"), "anomaly score [0, 1]"),
    Column("schema_version", pa.int32(), (), "alert schema version the record was written with"),
    Column("kafka_topic", pa.string(), (), "topic the alert was read from"),
    Column("kafka_partition", pa.int32(), (), "its partition"),
    Column("kafka_offset", pa.int64(), (), "its offset"),
)
