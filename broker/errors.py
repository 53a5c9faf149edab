"""The one exception module of the package.

Every error a stage can meet on bad input is a subclass of :class:`BrokerError` and carries a short
machine-readable ``reason`` (used as a Prometheus label and in dead-letter records) next to the
human-readable message. "Nothing found" is never an error: it is an empty result.
"""

from __future__ import annotations

import errno
import sqlite3


class BrokerError(Exception):
    """Base class of every error raised by ``broker`` and ``streams`` on bad input or state."""

    reason: str = "error"


# --- frames -------------------------------------------------------------------------------------
class InvalidFrame(BrokerError):
    """A frame that cannot be processed: the message says what is wrong with it."""

    reason = "invalid_frame"


class NotScience(InvalidFrame):
    """A calibration exposure (dark, flat, bias) by its frame-type card: only light frames give alerts."""

    reason = "not_science"


class CorruptFrame(InvalidFrame):
    """The bytes are not a readable FITS image."""

    reason = "corrupt"


class MissingWCS(InvalidFrame):
    """The header has no usable celestial WCS."""

    reason = "no_wcs"


class MissingMetadata(InvalidFrame):
    """A required header card (exposure time, MJD, filter, ...) is absent or not a number."""

    reason = "missing_metadata"


class BadPixelFraction(InvalidFrame):
    """Too many NaN / non-finite pixels."""

    reason = "nan_fraction"


class BadShape(InvalidFrame):
    """Not a 2-D image, too small, too large, or of a non-numeric dtype."""

    reason = "bad_shape"


class FrameTooLarge(InvalidFrame):
    """The encoded frame exceeds the configured hard limit."""

    reason = "too_large"


class ChecksumMismatch(InvalidFrame):
    """A frame sent by reference whose bytes do not match the announced checksum."""

    reason = "checksum"


class FrameStoreError(BrokerError):
    """A frame-store URI that cannot be read (missing object, unsupported scheme)."""

    reason = "frame_store"


class PoorQuality(InvalidFrame):
    """A readable frame rejected by the quality cuts (e.g. no stars, seeing out of range)."""

    reason = "poor_quality"


class UnparseableHeader(MissingMetadata):
    """A header card whose value FITS cannot parse (``EXPTIME = NaN``, a broken value string)."""

    reason = "unparseable_header"


class ImplausibleHeader(InvalidFrame):
    """Header values outside their physical bounds (GAIN <= 0, MJD outside the window; ``[ingest.plausibility]``)."""

    reason = "implausible_header"


class ImplausiblePixels(InvalidFrame):
    """Pixels no exposure produces: all zero, constant, binary, or one value almost everywhere."""

    reason = "implausible_pixels"


class TooManyPixels(FrameTooLarge):
    """An image whose header announces more pixels than allowed; refused before decompression."""

    reason = "too_many_pixels"


class ImplausibleCompression(InvalidFrame):
    """A compressed image that would expand far beyond any real exposure's ratio (a decompression bomb)."""

    reason = "implausible_compression"


class RecordMismatch(InvalidFrame):
    """A ``frame`` record or its key whose fields (size, ids, times) disagree with its FITS bytes."""

    reason = "record_mismatch"


class UnsolvableField(InvalidFrame):
    """A frame without a usable WCS that astrometry.net could not solve (too few stars, wrong scale, no index)."""

    reason = "unsolvable"


class NoSolution(UnsolvableField):
    """astrometry.net ran (up to two runs of its CPU limit) and found no solution: the costly failure."""


class SolverBackingOff(UnsolvableField):
    """A frame not plate-solved because its telescope's last frames found no solution (:mod:`broker.solvebackoff`)."""

    reason = "solver_backoff"


class PoorAstrometry(InvalidFrame):
    """A plate solution (or a header WCS checked against the catalog) whose residual is too large."""

    reason = "poor_astrometry"


class SolverUnavailable(InvalidFrame):
    """The plate solver (Debian package ``astrometry.net``) or its index files are not installed."""

    reason = "no_solver"


class NotIngested(InvalidFrame):
    """A record on ``ingested`` that the ingest stage did not write (no quality measurements)."""

    reason = "not_ingested"


class DuplicateFrame(BrokerError):
    """A frame already processed (same pixel checksum, or same telescope and frame id) sent again."""

    reason = "duplicate_frame"


class BadCoordinates(BrokerError):
    """A candidate whose RA/Dec is not finite or outside the sphere (a broken WCS or a forged batch)."""

    reason = "bad_coordinates"


class InvalidMeasurement(BrokerError):
    """A candidate whose flux, flux error or S/N is not finite (a forged batch): the history needs all three."""

    reason = "invalid_measurement"


# --- science steps ------------------------------------------------------------------------------
class AlignmentError(BrokerError):
    """The reference could not be registered onto the science frame.

    ``frames``: the ids of the two frames that did not register, when a reference's build names
    them (its grid frame first); empty otherwise.
    """

    reason = "alignment"

    def __init__(self, message: str = "", frames: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.frames = tuple(frames)


class PSFError(BrokerError):
    """No PSF could be estimated (not even the fallback)."""

    reason = "psf"


class ReferenceUnavailable(BrokerError):
    """A reference image that is missing, corrupt or incompatible with the frame.

    ``frames``: the ids of the frames a reference's build refused (one that cannot serve in any
    reference, the later of two copies of one exposure); empty when the refusal names none (the
    co-add's own stars).
    """

    reason = "reference"

    def __init__(self, message: str = "", frames: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.frames = tuple(frames)


class ModelError(BrokerError):
    """Model weights that are missing, corrupt or of an unexpected version."""

    reason = "model"


class DatasetError(BrokerError):
    """A training or held-out set that is missing, unreadable or incomplete (generation stopped)."""

    reason = "dataset"


class CutoutError(BrokerError):
    """A cutout that cannot be normalised (wrong shape, JPEG-era stamp, all NaN)."""

    reason = "cutout"


# --- messages -----------------------------------------------------------------------------------
class DecodeError(BrokerError):
    """A Kafka message whose bytes or headers do not decode with the expected schema."""

    reason = "decode"


class SchemaError(BrokerError):
    """A record that does not fit the schema it is written with."""

    reason = "schema"


class UndeliverableOutput(BrokerError):
    """An output the broker refuses, or would refuse, for good (an unknown or illegal topic, say).

    The runner dead-letters the input instead of its outputs (``docs/architecture.md``, "Errors and
    dead letters"); the message names the topic and the broker's error.
    """

    reason = "undeliverable"


class OutputTooLarge(UndeliverableOutput):
    """An output over the largest message a topic accepts (``streams.topics.MAX_MESSAGE_BYTES``)."""

    reason = "too_large"


class InvalidTopic(UndeliverableOutput):
    """An output to a topic name Kafka does not allow (characters, length)."""

    reason = "invalid_topic"


class FilterExpressionError(BrokerError):
    """A subscriber filter expression that is invalid or uses something not allowed."""

    reason = "filter"


class UnknownTopic(BrokerError):
    """A topic to read that does not exist on the broker: the message names it and the existing ones."""

    reason = "unknown_topic"


class NotResendable(BrokerError):
    """A dead letter whose message cannot be sent again as it was (not a frame, only part of it kept, ...)."""

    reason = "not_resendable"


class ConfigError(BrokerError):
    """An invalid configuration file or value."""

    reason = "config"


class ProfileError(ConfigError):
    """A telescope profile (``broker telescope add``, :mod:`broker.telescopes`) that cannot be read or is invalid."""

    reason = "bad_profile"


class KafkaAuthError(ConfigError):
    """Kafka refused the client's login or TLS handshake (wrong password, unknown user, untrusted certificate)."""

    reason = "kafka_auth"


class Unauthorised(BrokerError):
    """A frame whose telescope its producer may not send (``[kafka.frame_auth]``): missing or bad signature."""

    reason = "unauthorised"


class RegistryError(BrokerError):
    """The schema registry cannot be reached or refuses a schema (at start-up of a ``confluent`` topic)."""

    reason = "registry"


class Outage(BrokerError):
    """A service a stage depends on is down: not the input's fault.

    The stage keeps the message and retries it, waiting longer each time, instead of
    dead-lettering it (``streams.runner.StageRunner``; ``docs/architecture.md``, "Errors and dead
    letters").
    """

    reason = "outage"


class HistoryUnavailable(Outage):
    """The object history's PostgreSQL database stayed unreachable (``[history] connect_timeout_s``)."""

    reason = "history_unavailable"


class KafkaUnavailable(Outage):
    """A request the stage makes of Kafka itself, outside its consumer's loop, found no broker.

    The duplicate guard reads the stage's progress topic and watermarks when it first sees a
    partition (``streams.lineage``); a message handed over from the consumer's queue just as the
    brokers went away is kept and retried, not a reason to exit.
    """

    reason = "kafka_unavailable"


class StorageFull(Outage):
    """The disk (or quota) a stage writes its state to is full.

    The reference and difference stores, the frame ledger, the SQLite history: ``OSError`` ENOSPC or
    EDQUOT, SQLite's ``SQLITE_FULL``, PostgreSQL's ``disk_full`` (:func:`storage_full`).
    Not the frame's fault: the frame is kept and retried until space is freed, as a crash and restart
    would retry it (every store is written so that a retry after a partial write gives the same result).
    """

    reason = "storage_full"


class FrameStoreUnavailable(Outage):
    """The frame store cannot be reached: its root does not answer (an unmounted volume, an object store down).

    A missing object in a store that answers is the input's fault (:class:`FrameStoreError`).
    """

    reason = "frame_store_unavailable"


class RegistryUnavailable(Outage):
    """The schema registry did not answer a schema id's look-up, or answered an error other than "not found".

    Not the message's fault: a reader keeps it and stops, or retries it, instead of skipping it as
    undecodable (an id the registry does not know is a :class:`DecodeError`).
    """

    reason = "registry_unavailable"


# --- archive ------------------------------------------------------------------------------------
class ArchiveError(BrokerError):
    """An archive that cannot be used as asked: no such archive, a query it cannot run, a second writer."""

    reason = "archive"


class ArchiveCorrupt(ArchiveError):
    """A committed archive file or commit record that is missing, truncated or altered (never skipped)."""

    reason = "archive_corrupt"


# --- follow-up ----------------------------------------------------------------------------------
class InvalidRequest(BrokerError):
    """A follow-up request a telescope must not schedule (:func:`broker.followup.validate_request` says why)."""

    reason = "invalid_request"


class InvalidLabel(BrokerError):
    """An operator's label that cannot be recorded (``broker.feedback.FeedbackStore``): unknown, empty, out of range."""

    reason = "invalid_label"


# --- web portal (streams/web) ------------------------------------------------------------------
class Unauthenticated(BrokerError):
    """An API request without a token, or with one that is unknown, malformed or revoked (HTTP 401)."""

    reason = "unauthenticated"


class Forbidden(BrokerError):
    """An API token without the scope an endpoint needs (``read``, ``upload``, ``vet``; HTTP 403).

    Also an upload token publishing a frame of a telescope it is not bound to (or bound to none:
    ``broker token add NAME --scope upload --telescope NAME``, :func:`streams.web.tokens.check_publish`).
    """

    reason = "forbidden"


class RateLimited(BrokerError):
    """A client over its limit: a token's uploads per minute, a client's work per minute (HTTP 429).

    Parameters
    ----------
    message : str
    retry_after_s : float or None
        When the client may try again (s; the answer's ``Retry-After``). None: not known.
    """

    reason = "rate_limited"

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotFound(BrokerError):
    """An alert, object, frame or cutout that the archive or the history does not hold (HTTP 404)."""

    reason = "not_found"


class RequestTimeout(BrokerError):
    """A request body that did not arrive within its time (a slow or stalled upload; HTTP 408)."""

    reason = "request_timeout"


class InvalidQuery(BrokerError):
    """API parameters out of range or malformed (a cursor, a cone radius, a content type; HTTP 400)."""

    reason = "invalid_query"


class InvalidWatchlist(InvalidQuery):
    """A watchlist that cannot be read (``broker.watchlist.read_watchlist``; HTTP 400).

    No ra or dec column, a position or radius out of range, too many entries; the message names the
    row and column.
    """

    reason = "invalid_watchlist"


class InvalidWatchlistName(InvalidQuery):
    """A saved watchlist's name that is not 1-64 ASCII letters, digits, ``.``, ``_``, ``-`` (HTTP 400).

    It must also start with a letter or a digit (``broker.watchlist_store.check_list_name``).
    """

    reason = "invalid_watchlist_name"


class WatchlistQuota(BrokerError):
    """A saved watchlist that would take its owner past the lists or entries they may keep (HTTP 409).

    ``broker.watchlist_store.WatchlistStore``: the message says the limit and how far the owner is;
    deleting a list makes room.
    """

    reason = "watchlist_quota"


class JobQuota(BrokerError):
    """An asynchronous TAP job past the jobs one client, or the server, may keep (HTTP 409).

    ``streams.web.uws.JobStore``: the message says the limit; deleting a job makes room.
    """

    reason = "job_quota"


class UnsupportedMediaType(InvalidQuery):
    """An upload whose content type is not FITS (``application/fits``) or a multipart form (HTTP 415)."""

    reason = "unsupported_media_type"


class Unavailable(BrokerError):
    """Something the request needs that this server lacks: no archive, no Kafka, no torch (HTTP 503).

    Parameters
    ----------
    message : str
    retry_after_s : float or None
        When to try again (s; the answer's ``Retry-After``). None: not known, or not soon.
    """

    reason = "unavailable"

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Busy(Unavailable):
    """The portal is working on as many costly requests as it takes, and holds as many waiting (HTTP 503)."""

    reason = "busy"


class FrameNotDelivered(Unavailable):
    """Frames handed to Kafka that it refused or never acknowledged (the producer's delivery reports; HTTP 503)."""

    reason = "not_delivered"


# --- runtime ------------------------------------------------------------------------------------
class StageFailure(BrokerError):
    """A stage stops itself: too many unexpected (non-:class:`BrokerError`) errors in a row.

    An unexpected error is a bug, not bad input; once it repeats, every message would go to the
    dead-letter topic while the stage looked healthy, so the stage exits non-zero instead and its
    supervisor restarts it (see ``docs/architecture.md``, "Errors and dead letters").
    """

    reason = "stage_failure"


#: ``errno`` values of a full disk or quota.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: PostgreSQL's SQLSTATE ``disk_full`` (psycopg's ``DiskFull``).
_PG_DISK_FULL = "53100"


def storage_full(exc: BaseException) -> StorageFull | None:
    """:class:`StorageFull` when ``exc``, or an exception it was raised from, says a disk or quota is full.

    ``OSError`` with ENOSPC or EDQUOT (a file write), ``sqlite3`` errors with ``SQLITE_FULL`` ("database
    or disk is full"), PostgreSQL's ``disk_full``; None for anything else.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if ((isinstance(cause, OSError) and cause.errno in _FULL_ERRNOS)
                or getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                or getattr(cause, "sqlstate", None) == _PG_DISK_FULL):
            return StorageFull(f"a disk or quota is full: {type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    return None
