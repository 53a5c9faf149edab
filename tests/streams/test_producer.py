"""The telescope side: file validation, size routing, directory watching (against the embedded broker)."""

from __future__ import annotations

import bz2
import functools
import gzip
import os
import socket
import time

import pytest

from broker.calibrate import CalibrationConfig
from broker.errors import CorruptFrame, FrameStoreUnavailable, FrameTooLarge, InvalidFrame, MissingWCS
from broker.frame import encode_fits
from broker.ingest import IngestConfig
from streams import serde, topics
from streams.framestore import FrameStore
from streams.monitor import read_all
from streams.producer import FrameProducer, watch
from tests.helpers import star_frame

pytestmark = pytest.mark.kafka


@pytest.fixture
def producer(settings, tmp_path):
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(topics.FRAMES)])
    return FrameProducer(settings, FrameStore(str(tmp_path / "store")), inline_limit_bytes=200_000,
                         max_frame_bytes=50_000_000)


def test_files_are_validated_with_clear_errors(producer, settings, tmp_path):
    (tmp_path / "empty.fits").write_bytes(b"")
    with pytest.raises(CorruptFrame, match="empty.fits: empty payload"):
        producer.publish_file(tmp_path / "empty.fits")
    with pytest.raises(InvalidFrame, match="cannot read"):
        producer.publish_file(tmp_path / "missing.fits")
    frame = star_frame()
    for key in ("CTYPE1", "CTYPE2"):
        frame.header.remove(key)
    (tmp_path / "nowcs.fits").write_bytes(encode_fits(frame, compress=False))
    strict = FrameProducer(settings, producer.store, inline_limit_bytes=200_000, max_frame_bytes=50_000_000,
                           validation=IngestConfig(calibration=CalibrationConfig(enabled=False)))
    with pytest.raises(MissingWCS, match="nowcs.fits"):
        strict.publish_file(tmp_path / "nowcs.fits")
    assert producer.publish_file(tmp_path / "nowcs.fits")[0].frame_id  # accepted: the ingest stage plate-solves it
    tiny_limit = FrameProducer(settings, producer.store, inline_limit_bytes=10, max_frame_bytes=1000)
    (tmp_path / "big.fits").write_bytes(encode_fits(star_frame()))
    with pytest.raises(FrameTooLarge):
        tiny_limit.publish_file(tmp_path / "big.fits")


def test_large_frames_go_by_reference_small_ones_inline(producer, settings):
    small = star_frame(shape=(64, 64), n_stars=3)
    big = star_frame(shape=(512, 512), n_stars=50, seed=1, FRAMEID="TEST-F1-r-0002")
    assert producer.publish_frame(small).inline
    sent = producer.publish_frame(big)
    assert not sent.inline and sent.size_bytes > 200_000
    producer.flush()
    recs = [serde.decode("frame", m.value(), dict(m.headers())) for m in read_all(settings, [topics.FRAMES])]
    mine = {r["frame_id"]: r for r in recs}
    assert mine["TEST-F1-r-0001"]["fits"] and mine["TEST-F1-r-0001"]["uri"] is None
    assert mine["TEST-F1-r-0002"]["fits"] is None and mine["TEST-F1-r-0002"]["uri"].endswith(".fits")


def test_watch_publishes_new_files_once_and_reports_bad_ones(producer, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.fits").write_bytes(encode_fits(star_frame()))
    (incoming / "bad.fits").write_bytes(b"not fits at all")
    gzipped = encode_fits(star_frame(seed=1, FRAMEID="TEST-F1-r-0002"), compress=False)
    (incoming / "b.fits.gz").write_bytes(gzip.compress(gzipped))  # all were refused as corrupt until 2026-12-06
    bzipped = encode_fits(star_frame(seed=2, FRAMEID="TEST-F1-r-0003"), compress=False)
    (incoming / "c.fits.bz2").write_bytes(bz2.compress(bzipped))  # SDSS's frames; refused as "a bzip2 file"
    polls = iter(range(4))
    results = dict(watch(incoming, producer.publish_file, lambda: next(polls, None) is None, poll_s=0.01))
    assert [p.frame_id for p in results[incoming / "a.fits"]] == ["TEST-F1-r-0001"]
    assert [p.frame_id for p in results[incoming / "b.fits.gz"]] == ["TEST-F1-r-0002"]
    assert [p.frame_id for p in results[incoming / "c.fits.bz2"]] == ["TEST-F1-r-0003"]
    assert isinstance(results[incoming / "bad.fits"], CorruptFrame)
    producer.flush()
    polls = iter(range(4))  # a restart: the ledger remembers what was sent
    assert dict(watch(incoming, producer.publish_file, lambda: next(polls, None) is None, poll_s=0.01)) == {}


def test_a_bad_file_never_stops_a_batch_nor_the_watch(producer, settings, tmp_path):
    """``EXPTIME = NaN`` aborted ``broker produce`` and killed ``--watch`` at every restart (issue 27)."""
    from typer.testing import CliRunner

    from streams.cli import app
    from tests.broker.test_frame import _with_raw_card

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a_nan.fits").write_bytes(_with_raw_card(encode_fits(star_frame()), "EXPTIME", "NaN"))
    (incoming / "b_gain.fits").write_bytes(encode_fits(star_frame(GAIN=-1.5, FRAMEID="TEST-F1-r-0010")))
    (incoming / "c_good.fits").write_bytes(encode_fits(star_frame(seed=2, FRAMEID="TEST-F1-r-0011")))
    res = CliRunner().invoke(app, ["produce", "--bootstrap", settings.bootstrap, *map(str, sorted(incoming.iterdir()))])
    assert res.exit_code == 1, res.output  # some files were rejected ...
    assert "unparseable_header" in res.output and "implausible_header" in res.output
    sent = {serde.decode("frame", m.value(), dict(m.headers()))["frame_id"] for m in read_all(settings, ["frames"])}
    assert "TEST-F1-r-0011" in sent and "TEST-F1-r-0010" not in sent  # ... and the good one after them was sent

    def failing(path):
        if path.name.startswith("c"):
            raise RuntimeError("a bug in the producer")  # anything but Kafka's errors: reported, not fatal
        return producer.publish_file(path)

    polls = iter(range(4))
    results = dict(watch(incoming, failing, lambda: next(polls, None) is None, poll_s=0.01))
    assert [type(results[incoming / n]).__name__ for n in ("a_nan.fits", "b_gain.fits", "c_good.fits")] == [
        "UnparseableHeader", "ImplausibleHeader", "RuntimeError"]
    polls = iter(range(4))  # a restart: none of them is tried again
    assert dict(watch(incoming, failing, lambda: next(polls, None) is None, poll_s=0.01)) == {}


def test_watch_finds_fits_names_in_any_case_and_subfolders_when_asked(tmp_path):
    """Capture software writes `.fit`, `.FITS`, `.fts` into dated or per-target folders."""
    for name in ("a.FITS", "b.fit", "c.fits.fz", "d.FTS", "notes.txt", ".hidden.fits", "night1/e.fits",
                 "night1/LIGHT/f.Fit", ".git/g.fits"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    def sent(**kwargs) -> set[str]:
        polls = iter(range(3))
        return {p.relative_to(tmp_path).as_posix() for p, _ in
                watch(tmp_path, lambda path: path, lambda: next(polls, None) is None, poll_s=0.01, **kwargs)}

    assert sent(pattern="*.fit") == {"b.fit"}
    assert sent() == {"a.FITS", "c.fits.fz", "d.FTS"}  # b.fit is in the ledger; no text, hidden or subfolder file
    assert sent(recursive=True) == {"night1/e.fits", "night1/LIGHT/f.Fit"}  # the rest is in the ledger
    (tmp_path / "night2").mkdir()
    (tmp_path / "night2" / "h.fits").write_bytes(b"y")
    assert sent(recursive=True) == {"night2/h.fits"}


def test_a_header_that_names_no_telescope_is_sent_under_the_name_given(producer, settings, tmp_path):
    """``broker produce --telescope``: a camera that writes neither TELESCOP nor INSTRUME can still publish."""
    from broker.errors import MissingMetadata

    frame = star_frame(seed=3, FRAMEID="TEST-F1-r-0020")
    for card in ("TELESCOP", "INSTRUME"):
        frame.header.remove(card, ignore_missing=True)
    path = tmp_path / "anonymous.fits"
    path.write_bytes(encode_fits(frame))
    with pytest.raises(MissingMetadata, match="TELESCOP"):
        producer.publish_file(path)
    named = FrameProducer(settings, FrameStore(str(tmp_path / "store")), inline_limit_bytes=200_000,
                          max_frame_bytes=50_000_000, telescope="backyard-20cm")
    (sent,) = named.publish_file(path)
    named.flush()
    records = [serde.decode("frame", m.value(), dict(m.headers())) for m in read_all(settings, ["frames"])]
    (record,) = [r for r in records if r["frame_id"] == sent.frame_id]
    assert record["telescope"] == "backyard-20cm"


def test_a_frame_kafka_never_takes_is_reported_by_flush_not_lost(tmp_path):
    """A frame whose delivery failed (broker unreachable, refused) was dropped while ``flush`` returned."""
    from broker.errors import FrameNotDelivered
    from streams.settings import KafkaSettings

    class Impatient(KafkaSettings):
        def producer(self, transactional_id=None):
            return {**super().producer(transactional_id), "message.timeout.ms": 300}

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    producer = FrameProducer(Impatient(f"127.0.0.1:{port}", app_id="unreachable"),
                             FrameStore(str(tmp_path / "store")), inline_limit_bytes=200_000,
                             max_frame_bytes=50_000_000)
    assert producer.publish_frame(star_frame()).frame_id == "TEST-F1-r-0001"  # queued, not yet delivered
    with pytest.raises(FrameNotDelivered, match=r"TEST-F1-r-0001 \(.*timed out\)") as exc:
        producer.flush(10)
    assert exc.value.reason == "not_delivered"
    producer.flush(1)  # reported once


def test_watch_sends_again_after_a_restart_a_file_whose_delivery_failed(tmp_path):
    """The file was recorded as sent before the caller could flush it: a failed delivery lost it for good."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.fits").write_bytes(b"x")
    polls = iter(range(4))
    with pytest.raises(TimeoutError):  # the caller's flush after the first file fails; the watch dies
        for _ in watch(incoming, lambda path: path, lambda: next(polls, None) is None, poll_s=0.01):
            raise TimeoutError("1 frames not delivered within 30 s")
    polls = iter(range(4))  # a restart sends it again
    assert list(dict(watch(incoming, lambda path: path, lambda: next(polls, None) is None, poll_s=0.01))) == [
        incoming / "a.fits"]


def test_watch_sends_a_file_whose_name_holds_a_line_break_once_across_restarts(tmp_path):
    """``.published`` keeps one entry a line: such a name split its entry and was sent at every restart."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    names = ["night\n1.fits", "night\u20282.fits", "plain.fits"]
    for name in names:
        (incoming / name).write_bytes(b"x")
    for expected in (sorted(names), []):  # a first run sends all three, a restart none
        polls = iter(range(4))
        stop = functools.partial(lambda it: next(it, None) is None, polls)
        sent = [p.name for p, _ in watch(incoming, lambda path: path, stop, poll_s=0.01)]
        assert sorted(sent) == expected


def test_watch_waits_for_a_file_written_in_place_at_its_final_size(tmp_path):
    """A file allocated at its final size, then filled, was sent half-written: its size did not change."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    path, final = incoming / "a.fits", encode_fits(star_frame())
    path.write_bytes(bytes(len(final)))  # allocated, not yet written
    polls = iter(range(6))

    def stop() -> bool:
        poll = next(polls, None)
        if poll in (1, 2):  # the writer fills it, half by half: same size, newer mtime
            half = len(final) // 2 * poll
            with path.open("r+b") as fh:
                fh.write(final[:half])
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns + 1_000_000))
        return poll is None

    results = list(watch(incoming, lambda p: p.read_bytes(), stop, poll_s=0.01))
    assert results == [(path, final)]


def test_a_path_that_is_no_readable_file_is_reported_and_the_batch_goes_on(tmp_path):
    """A folder among the files (``broker produce frames/*``) raised IsADirectoryError and aborted the batch."""
    from streams.settings import KafkaSettings

    producer = FrameProducer(KafkaSettings("127.0.0.1:1", app_id="unused"), FrameStore(str(tmp_path / "store")),
                             inline_limit_bytes=200_000, max_frame_bytes=50_000_000)
    (tmp_path / "night1").mkdir()
    with pytest.raises(InvalidFrame, match="night1: not a regular file"):
        producer.publish_file(tmp_path / "night1")
    os.mkfifo(tmp_path / "pipe.fits")  # would block the producer for ever
    with pytest.raises(InvalidFrame, match="pipe.fits: not a regular file"):
        producer.publish_file(tmp_path / "pipe.fits")


def test_watch_stops_on_a_frame_store_outage_and_sends_the_file_after_a_restart(tmp_path):
    """A store that cannot be written was an unforeseen error: the file was recorded as sent, and lost."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.fits").write_bytes(b"x")

    def store_down(path):
        raise FrameStoreUnavailable("frame store s3://frames cannot be written: ConnectionRefusedError")

    polls = iter(range(4))
    with pytest.raises(FrameStoreUnavailable):
        list(watch(incoming, store_down, lambda: next(polls, None) is None, poll_s=0.01))
    polls = iter(range(4))
    assert list(dict(watch(incoming, lambda path: path, lambda: next(polls, None) is None, poll_s=0.01))) == [
        incoming / "a.fits"]


def test_watch_stops_with_a_clear_error_when_its_ledger_disk_is_full(small_disk):
    """An ``OSError`` traceback ended ``broker produce --watch`` when its ``.published`` could not be written."""
    from broker.errors import StorageFull
    from tests.helpers import fill_disk

    incoming = small_disk / "incoming"
    incoming.mkdir()
    (incoming / "a.fits").write_bytes(b"x")
    fill_disk(small_disk)
    sent = []
    polls = iter(range(4))
    with pytest.raises(StorageFull, match=r"cannot record a sent file in .*\.published; free space"):
        for path, _ in watch(incoming, lambda path: path, lambda: next(polls, None) is None, poll_s=0.01):
            sent.append(path)
    assert sent == [incoming / "a.fits"]
    (small_disk / "ballast").unlink()
    polls = iter(range(4))
    assert list(dict(watch(incoming, lambda path: path, lambda: next(polls, None) is None, poll_s=0.01))) == [
        incoming / "a.fits"]  # not recorded: sent again after the restart


def test_a_mosaic_file_is_sent_as_a_frame_per_ccd_and_a_dead_ccd_is_reported_alone(producer, settings, tmp_path):
    """A mosaic camera's file (DECam: a CCD per extension) was refused whole, "send one image per file".

    Each CCD is now a frame of its own field; one the pipeline refuses (a dead CCD, all NaN) is
    reported with its name, and the others are sent; ``broker produce`` exits 1 and says which.
    """
    import io

    import numpy as np
    from astropy.io import fits
    from typer.testing import CliRunner

    from streams.cli import app
    from tests.helpers import header

    frame = star_frame()
    primary = fits.PrimaryHDU()
    for key in ("TELESCOP", "FILTER", "MJD-OBS", "EXPTIME", "FIELD"):
        primary.header[key] = frame.header[key]
    ccds = [fits.ImageHDU(frame.data, header=header(), name=n) for n in ("S29", "N4")]
    ccds.insert(1, fits.ImageHDU(np.full(frame.shape, np.nan, np.float32), header=header(), name="S30"))
    for ccd in ccds:
        for key in ("TELESCOP", "FILTER", "MJD-OBS", "EXPTIME", "FIELD", "FRAMEID"):
            ccd.header.remove(key, ignore_missing=True)
    buf = io.BytesIO()
    fits.HDUList([primary, *ccds]).writeto(buf)
    path = tmp_path / "c4d_mosaic.fits"
    path.write_bytes(buf.getvalue())
    sent = producer.publish_file(path)
    assert not isinstance(sent[0], InvalidFrame) and isinstance(sent[1], InvalidFrame)
    assert not isinstance(sent[2], InvalidFrame) and len(sent) == 3
    assert str(sent[1]).startswith(f"{path}: image S30: ")
    (tmp_path / "c4d_mosaic.fits.gz").write_bytes(gzip.compress(buf.getvalue()))
    assert [isinstance(s, InvalidFrame) for s in producer.publish_file(tmp_path / "c4d_mosaic.fits.gz")] == [
        False, True, False]
    producer.flush()
    keys = {m.key().decode() for m in read_all(settings, [topics.FRAMES])}
    field = frame.meta.field
    assert {f"{frame.meta.telescope}/{field}.S29", f"{frame.meta.telescope}/{field}.N4"} <= keys
    assert not any(k.endswith(".S30") for k in keys)
    res = CliRunner().invoke(app, ["produce", "--bootstrap", settings.bootstrap, str(path)])
    lines = res.output.splitlines()
    assert res.exit_code == 1 and sum(line.startswith("sent ") for line in lines) == 2, res.output
    assert any(line.startswith("rejected ") and "image S30" in line for line in lines), res.output
