"""The alert archive: an immutable Parquet dataset partitioned by night and telescope, with a commit log.

Every alert read from an alert topic is kept, cutouts included, as one row::

    <root>/night=2025-03-14/telescope=LSST/part-00000042-000.parquet
    <root>/_commits/00000000000000000042.json
    <root>/_checkpoints/00000000000000000100.json

A batch of alerts becomes one file per (night, telescope, schema version), then one commit record
naming those files and the Kafka offset range the batch covers per partition. The commit record is
written last, atomically and never over another one; only the files named by commit records exist
for a reader (:class:`reader.Archive`), so a batch is visible entirely or not at all. A writer killed
mid-batch leaves files that no record names: :meth:`writer.ArchiveWriter.recover` deletes them, and
the offsets in the log tell its consumer where to resume. Compactions merge small files in commits
of their own; checkpoints summarise the log for readers (``docs/architecture.md``, "The archive").
The archive keeps every message of its topic once, so an alert id the topic carried twice is two
rows; readers show each id once, its first copy (:data:`reader.COPY_ORDER`; every copy in the view
``alerts_all``).

Columns: the convenience and bookkeeping columns of :data:`config.COLUMNS` (night, telescope, object
id, position, time, band, scores, schema version, Kafka coordinates), then the whole alert record as
the struct column ``alert``, its Arrow type derived from the Avro schema of the alert's own version
(:func:`arrow.file_schema`), so that :func:`rows.record_of` rebuilds the exact record. No Kafka here:
the consumer loop is ``streams/archiver.py``.

Modules, one concern each (this package exports nothing: import from them):

- :mod:`~broker.archive.config`: the ``[archive]`` configuration and the archive's columns;
- :mod:`~broker.archive.arrow`: Avro types to Arrow types, the schema of a file of one alert version;
- :mod:`~broker.archive.rows`: alerts in as rows, records out, schema versions, nights and times;
- :mod:`~broker.archive.log`: the commit log: files, offset ranges, commit records, checkpoints;
- :mod:`~broker.archive.reader`: reading: the log's state, file checks, the DuckDB view ``alerts``;
- :mod:`~broker.archive.writer`: writing: files, commits, recovery, compaction, vacuum.
"""
