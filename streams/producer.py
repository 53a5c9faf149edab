"""The telescope side: publish frames (from files, a watched directory, or the simulator).

Every frame is validated before it is sent (a clear :class:`~broker.errors.InvalidFrame` names what
is wrong with a file), re-encoded as lossless tile-compressed FITS, and sent inline or, over the
inline limit, by reference to the frame store.
"""

from __future__ import annotations

import functools
import json
import logging
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from astropy.time import Time
from confluent_kafka import KafkaError, KafkaException, Producer

from broker.errors import FrameNotDelivered, FrameTooLarge, InvalidFrame, Outage, StorageFull, storage_full
from broker.frame import (
    Frame,
    decode_fits,
    decode_mosaic,
    encode_fits,
    is_compressed,
    science_images,
    sha256,
    uncompressed,
)
from broker.ingest import IngestConfig, validate
from broker.telescopes import TelescopeProfile
from streams import serde, topics
from streams.frame_auth import FrameSigner
from streams.framestore import FrameStore
from streams.runner import EXPOSURE_END
from streams.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    """A frame sent: its id, encoded size (bytes) and whether it went inline."""

    frame_id: str
    size_bytes: int
    inline: bool


class FrameProducer:
    """Publish frames to the ``frames`` topic, keyed ``telescope/field``.

    Parameters
    ----------
    settings : KafkaSettings
    store : FrameStore
        Where frames over ``inline_limit_bytes`` go.
    inline_limit_bytes, max_frame_bytes : int
        See :class:`broker.config.PipelineConfig`.
    signer : FrameSigner or None
        Signs each frame (header ``frame-auth``) for the ingest stage's telescope -> principal
        check (:mod:`streams.frame_auth`); None: unsigned.
    profiles : tuple of TelescopeProfile
        Telescope profiles that fill what headers lack (:func:`broker.headers.normalise_header`);
        frames without a WCS are accepted (the ingest stage plate-solves them).
    telescope : str or None
        Telescope (or profile) name given to files whose header names none (``TELESCOP`` and
        ``INSTRUME`` absent or blank; :func:`broker.frame.decode_fits`); None: such files are refused.
    """

    def __init__(self, settings: KafkaSettings, store: FrameStore, inline_limit_bytes: int,
                 max_frame_bytes: int, validation: IngestConfig = IngestConfig(),
                 signer: FrameSigner | None = None, profiles: tuple[TelescopeProfile, ...] = (),
                 telescope: str | None = None) -> None:
        self.profiles = profiles
        self.telescope = telescope
        self.producer = Producer(settings.producer())
        self.signer = signer  # signs each frame for the ingest stage's [kafka.frame_auth] check
        self.store = store
        self.inline_limit = inline_limit_bytes
        self.max_bytes = max_frame_bytes
        self.validation = validation
        self._undelivered: list[str] = []  # frames Kafka refused or timed out, until flush() reports them

    def publish_frame(self, frame: Frame, exposure_end: float | None = None) -> Published:
        """Validate, encode and send ``frame``; ``exposure_end`` (Unix s) defaults to MJD-OBS + EXPTIME."""
        validate(frame, self.validation, require_wcs=not self.validation.calibration.enabled)
        payload = encode_fits(frame)
        if len(payload) > self.max_bytes:
            raise FrameTooLarge(f"frame {frame.meta.frame_id} encodes to {len(payload)} bytes, over {self.max_bytes}")
        m = frame.meta
        inline = len(payload) <= self.inline_limit
        uri = None if inline else self.store.put(payload)[0]
        if exposure_end is None:
            exposure_end = float(Time(m.mjd_end, format="mjd", scale="utc").unix)
        headers: dict[str, str | bytes | None] = {**frame_headers(exposure_end)}
        value = serde.encode("frame", frame_record(frame, payload, inline, uri))
        key = f"{m.telescope}/{m.field}".encode()
        if self.signer is not None:
            headers.update(self.signer.header(key, value))
        self.producer.produce(topics.FRAMES, value, key, headers=headers,
                              on_delivery=functools.partial(self._delivered, m.frame_id))
        self.producer.poll(0)
        return Published(m.frame_id, len(payload), inline)

    def publish_file(self, path: str | Path) -> list[Published | InvalidFrame]:
        """Read, validate and send one FITS file: its frame, or a frame per image of a mosaic file.

        A file of one image is sent, or refused with an :class:`InvalidFrame` naming the file. A
        mosaic camera's file (several science images: DECam's CCDs, HST's two chips) is sent as a
        frame per image, each with a field of its own (:func:`broker.frame.science_images`); an image
        refused (a dead CCD) is in the list in place of its frame, naming the file and the image,
        and the others are sent.
        """
        path = Path(path)
        payload = self._read(path)  # its errors name the file
        try:
            images = science_images(payload, self.validation.max_pixels, self.validation.max_expansion)
        except InvalidFrame as exc:
            raise type(exc)(f"{path}: {exc}") from exc
        if len(images) == 1:
            return [self._publish_one(path, payload)]
        if is_compressed(payload):  # inflated once, its bounds checked by science_images
            payload = uncompressed(payload)
        out: list[Published | InvalidFrame] = []
        for image, frame in decode_mosaic(payload, self.validation.max_pixels, self.validation.max_expansion,
                                          self.profiles, require_wcs=not self.validation.calibration.enabled,
                                          telescope=self.telescope):
            try:
                if isinstance(frame, InvalidFrame):
                    raise frame
                out.append(self.publish_frame(frame))
            except InvalidFrame as exc:
                out.append(type(exc)(f"{path}: image {image}: {exc}"))
        return out

    def _publish_one(self, path: Path, payload: bytes) -> Published:
        """Decode the one image of a file and send it; a refusal names the file."""
        try:
            frame = decode_fits(payload, self.validation.max_pixels, self.validation.max_expansion, self.profiles,
                                require_wcs=not self.validation.calibration.enabled, telescope=self.telescope)
            return self.publish_frame(frame)
        except InvalidFrame as exc:
            raise type(exc)(f"{path}: {exc}") from exc

    def _read(self, path: Path) -> bytes:
        """The bytes of a regular file of at most ``max_bytes`` (:class:`InvalidFrame` naming the file otherwise)."""
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO or a device: nothing to read, or never done
                raise InvalidFrame(f"{path}: not a regular file")
            if info.st_size > self.max_bytes:
                raise FrameTooLarge(f"{path}: {info.st_size} bytes, over the {self.max_bytes}-byte limit")
            with path.open("rb") as fh:
                payload = fh.read(self.max_bytes + 1)  # it may have grown since
        except OSError as exc:  # absent, unreadable, removed meanwhile
            raise InvalidFrame(f"{path}: cannot read: {exc.strerror}") from exc
        if len(payload) > self.max_bytes:
            raise FrameTooLarge(f"{path}: over the {self.max_bytes}-byte limit")
        return payload

    def _delivered(self, frame_id: str, err: KafkaError | None, _msg: object) -> None:
        """Delivery report of one frame: one that Kafka refused or never acknowledged is kept for :meth:`flush`."""
        if err is not None:
            self._undelivered.append(f"{frame_id} ({err.str()})")

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every frame is delivered.

        Raises
        ------
        FrameNotDelivered
            Kafka refused frames (too large for the topic, not authorised) or did not acknowledge
            them within the producer's message timeout: they were not sent; the frames are named.
        TimeoutError
            Frames still queued after ``timeout`` s.
        """
        queued = self.producer.flush(timeout)
        failed, self._undelivered = self._undelivered, []
        if failed:
            raise FrameNotDelivered(f"{len(failed)} frame(s) not delivered to Kafka: {'; '.join(failed)}")
        if queued > 0:
            raise TimeoutError(f"{queued} frames not delivered within {timeout} s")


def _ledger_name(relative: str) -> str:
    r"""How ``.published``, one entry a line, names a file: as it is, or ``/`` and its JSON string.

    The second for a name with a line break (``\n``, ``\x85``, ``\u2028``, ...), which would split its
    entry and have the file sent again at every restart. A relative path never starts with ``/``.
    """
    return relative if relative.splitlines() == [relative] else "/" + json.dumps(relative)


def frame_record(frame: Frame, payload: bytes, inline: bool = True, uri: str | None = None) -> dict:
    """The ``frame/v1`` record of ``frame`` whose FITS bytes are ``payload``."""
    m = frame.meta
    return {"frame_id": m.frame_id, "telescope": m.telescope, "field": m.field, "filter": m.filter,
            "mjd_start": m.mjd_start, "exptime": m.exptime, "ny": frame.shape[0], "nx": frame.shape[1],
            "fits": payload if inline else None, "uri": uri, "sha256": sha256(payload),
            "size_bytes": len(payload), "quality": None}


def frame_headers(exposure_end: float) -> dict[str, bytes]:
    """Headers of a frames-topic message: schema version and shutter-close time (Unix s)."""
    return {serde.SCHEMA_HEADER: serde.schema_tag("frame").encode(), EXPOSURE_END: repr(exposure_end).encode()}


#: Names of FITS files as capture software writes them, compared in lower case (``.FITS``, ``.fit``,
#: ``.fts``; tile-compressed ``.fz``; gzipped; bzip2 as SDSS distributes its frames).
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".fits.gz", ".fit.gz", ".fts.gz", ".fits.bz2", ".fit.bz2", ".fts.bz2")


def _candidates(directory: Path, pattern: str | None, recursive: bool) -> list[Path]:
    """The files to consider: ``pattern`` (a glob), else FITS names in any case; never hidden ones."""
    found = (directory.rglob if recursive else directory.glob)(pattern or "*")
    return sorted(p for p in found
                  if not any(part.startswith(".") for part in p.relative_to(directory).parts)
                  and (pattern or p.name.lower().endswith(FITS_SUFFIXES)) and p.is_file())


def watch(directory: Path, publish: Callable[[Path], list[Published | InvalidFrame]], stop: Callable[[], bool],
          pattern: str | None = None, poll_s: float = 1.0,
          recursive: bool = False) -> Iterator[tuple[Path, list[Published | InvalidFrame] | Exception]]:
    """Publish files that appear in ``directory``; yield (path, result or the error) for each.

    The files are those whose names end as :data:`FITS_SUFFIXES` (any case: ``.FITS``, ``.fit``,
    ``.fits.fz``, ...), or those matching the glob ``pattern``; with ``recursive`` those of every
    subfolder too (capture software files lights by date or target). Hidden files and folders are
    skipped. A file is sent once its size and modification time have stayed the same for one poll
    (so half-written files wait, those written in place at their final size included); sent paths
    (relative to ``directory``) are recorded in ``.published`` so a restart does not send them
    again. A file is recorded when the caller asks for the next one, so a caller that confirms the
    delivery first (:meth:`FrameProducer.flush`) and fails there leaves it to be sent again after a
    restart. A file that fails (an :class:`InvalidFrame`, a calibration frame among them, or any
    other error but Kafka's) is reported, recorded and not retried until it changes, so one bad
    file can never stop the watch nor make it fail again at every restart. Kafka errors (the broker
    unreachable, the queue full) and outages (the frame store down) propagate: the file was not sent
    and is tried again after a restart. A disk too full to record a sent file stops the watch with
    :class:`StorageFull` (``broker produce`` exits 2 saying so).
    """
    ledger = directory / ".published"
    done = set(ledger.read_text().splitlines()) if ledger.exists() else set()
    seen: dict[Path, tuple[int, int]] = {}  # size and mtime of each file at the last poll
    while not stop():
        for path in _candidates(directory, pattern, recursive):
            try:
                info = path.stat()
            except OSError:  # removed or renamed since the listing
                continue
            tag = f"{_ledger_name(path.relative_to(directory).as_posix())}:{info.st_size}:{info.st_mtime_ns}"
            if tag in done:
                continue
            if seen.get(path) != (info.st_size, info.st_mtime_ns):  # still being written
                seen[path] = (info.st_size, info.st_mtime_ns)
                continue
            yield path, _publish_one(publish, path)
            done.add(tag)  # only now: the caller has had the result (and flushed it)
            _record(ledger, tag)
        time.sleep(poll_s)


def _record(ledger: Path, tag: str) -> None:
    """Append ``tag`` to the watch's ledger; :class:`StorageFull` (an outage: the watch stops) on a full disk."""
    try:
        with ledger.open("a") as fh:
            fh.write(tag + "\n")
    except OSError as exc:
        full = storage_full(exc)
        if full is None:
            raise
        raise StorageFull(f"{full}: cannot record a sent file in {ledger}; free space and start again (the "
                          "file is sent again, and the pipeline refuses the copy as duplicate_frame)") from exc


def _publish_one(publish: Callable[[Path], list[Published | InvalidFrame]],
                 path: Path) -> list[Published | InvalidFrame] | Exception:
    """``publish(path)``, or the error that refused the file (Kafka's errors propagate)."""
    try:
        return publish(path)
    except InvalidFrame as exc:
        return exc
    except (KafkaException, BufferError, Outage):
        raise  # not the file's fault: the watch stops, the file is not recorded, a restart sends it
    except Exception as exc:  # a bug or an unforeseen file: reported and logged, the watch goes on
        log.exception("unexpected error publishing %s", path)
        return exc
