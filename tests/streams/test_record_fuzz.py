"""Seeded mutation fuzzing of the records between stages: each mutant is processed or dead-lettered with a reason.

Valid records, made the way the pipeline makes them (a frame through the ingest handler; candidate
batches as the subtract stage writes them; alerts through the alert handler, in each framing, and
the schema's sample alerts; a follow-up request through :func:`broker.followup.request_record`), are
mutated with a seeded numpy generator: Avro bytes (flips, truncation, extension, a foreign
framing), schema-valid but absurd values (NaN, inf, huge, empty or 100 kB strings, control
characters, bytes that are not UTF-8 where a string goes, 10^5 history points, cutouts that are not
FITS or inflate to 100 MB, nulls), Kafka headers (missing, repeated, not UTF-8, huge) and keys
(None, binary, JSON). Each mutant goes through the code its consumer runs per message, in process
(no broker): the runner's own ``_checked`` and ``_handle`` around the real handler for subtract,
classify, score and alert; the archive stage's ``_take`` and ``_rows`` and a Parquet write; the
follow-up listener's ``check``; the subscriber's ``_records``, filters and printing.

A mutant must be processed, or refused with a :class:`~broker.errors.BrokerError` (a dead letter with
its reason; a subscriber skips it). Anything else (an ``unexpected:*`` dead letter, an exception
escaping the runner, an :class:`~broker.errors.Outage` caused by the input, a call over
:data:`HANG_S`) is a finding, listed with its mutation and traceback.
"""

from __future__ import annotations

import copy
import gzip
import io
import os
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fastavro
import numpy as np
import pytest
from confluent_kafka import Message

import schemas
from broker.candidate import CUTOUT_SIZE
from broker.errors import BrokerError, Outage
from broker.followup import FollowupStatus, request_id, request_record
from broker.frame import encode_fits
from streams import serde, topics
from streams.framing import AlertEncoder, FramingConfig, schema_json
from streams.lineage import Lineage
from streams.producer import frame_headers, frame_record
from streams.runner import Handler, InMessage, in_message
from tests.helpers import Hang, candidate, header, star_frame, time_limit

#: Seed of every mutation (the environment variable ``BROKER_FUZZ_SEED`` explores other mutants).
SEED = int(os.environ.get("BROKER_FUZZ_SEED", "20260214"))
#: Longest a mutant may take in one consumer (s) before it counts as a hang.
HANG_S = 10.0
#: Mutants per consumer and run.
N_MUTANTS = {"subtract": 80, "classify": 200, "score": 400, "alert": 300, "archive": 500, "followup": 600,
             "subscriber": 400}
#: Subscriber mutants whose cutouts are drawn as PNG too (matplotlib: ~0.1 s each).
N_PNG = 8
#: Bytes a list-growing mutation may add to a record at most.
GROW_BYTES = 4_000_000

Headers = list[tuple[Any, Any]]


# --- mutants -----------------------------------------------------------------------------------------


@dataclass
class Base:
    """A valid record as its consumer receives it, and how to write it again after a mutation."""

    name: str
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    decode: Callable[[bytes], dict]
    encode: Callable[[dict], bytes]


@dataclass
class Mutant:
    """One mutated message: what was done, key, value and headers (pairs, so a name may repeat)."""

    what: str
    key: Any
    value: bytes | None
    headers: Headers
    unreadable_headers: bool = False


class _UnreadableHeaders(Message):
    """A message whose header names are not UTF-8: confluent-kafka raises on ``headers()``."""

    def headers(self) -> Any:  # noqa: D102
        raise UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte")


def message(topic: str, offset: int, m: Mutant) -> Message:
    """The consumed Kafka message of ``m``."""
    kind = _UnreadableHeaders if m.unreadable_headers else Message
    return kind(topic=topic, partition=0, offset=offset, key=m.key, value=m.value, headers=m.headers or None,
                timestamp=(1, 1_700_000_000_000))


_FLOATS = (float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324, -0.0, 1e20, -1e20, 2.0 ** 53 + 1)
_INTS = (0, -1, -(2 ** 31), 2 ** 31 - 1, 2 ** 63 - 1, -(2 ** 63), 10 ** 9)
_STRINGS = ("", "x" * 100_000, "\x00\x01\x7f\n\r\t\x1b[31m", "é" * 10, "../../../etc/passwd", "a/b\\c", "💥",
            "\u202e\u200b", " ", "NaN", "'; DROP TABLE objects; --", "%s%n{0}")


@contextmanager
def _quiet() -> Iterator[None]:
    """Warnings as a stage process has them (not errors), but for unclosed files and sockets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", ResourceWarning)
        yield


_BOMB: list[bytes] = []


def gzip_bomb() -> bytes:
    """Gzip of 100 MiB of zeros (~100 kB), made once."""
    if not _BOMB:
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        chunk = bytes(1 << 20)
        _BOMB.append(b"".join(packer.compress(chunk) for _ in range(100)) + packer.flush())
    return _BOMB[0]


def _huge_fits_header() -> bytes:
    """A gzipped FITS header announcing 10^5 x 10^5 float32 pixels, with none."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                  -32", "NAXIS   =                    2",
             "NAXIS1  =               100000", "NAXIS2  =               100000", "END"]
    return gzip.compress("".join(c.ljust(80) for c in cards).ljust(2880).encode())


def _bytes_values(rng: np.random.Generator) -> tuple[bytes, ...]:
    return (b"", bytes(1000), rng.bytes(1000), b"\x89PNG\r\n\x1a\n" + rng.bytes(64), b"\x1f\x8b" + rng.bytes(200),
            gzip.compress(b"SIMPLE  =  garbage" + rng.bytes(100)), gzip_bomb(), _huge_fits_header(),
            b"SIMPLE  =" + rng.bytes(3000))


def _cutouts(rng: np.random.Generator) -> bytes:
    """Cutout bytes of the right length whose pixels are absurd."""
    n = 3 * CUTOUT_SIZE * CUTOUT_SIZE
    fill = rng.choice(np.array([np.nan, np.inf, -np.inf, 3.4e38, 1e-45, 0.0], dtype="<f4"))
    pixels = np.full(n, fill, dtype="<f4")
    if rng.random() < 0.5:  # a few normal pixels among them
        pixels[rng.integers(0, n, 50)] = rng.normal(size=50).astype("<f4")
    return pixels.tobytes()


def _leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every value of a decoded record: dict keys and list indices (the containers too)."""
    out = [path] if path else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            out += _leaves(v, (*path, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _size(value: Any) -> int:
    return len(repr(value)) if not isinstance(value, bytes | bytearray) else len(value)


def _absurd(path: tuple, value: Any, rng: np.random.Generator) -> tuple[str, Any]:
    """An absurd value in place of ``value`` (of the same type where that is possible) and what it is."""
    if rng.random() < 0.15:
        return "null", None
    if isinstance(value, bool):
        return "flipped", not value
    if isinstance(value, float):
        v = _FLOATS[rng.integers(len(_FLOATS))]
        return repr(v), v
    if isinstance(value, int):
        v = _INTS[rng.integers(len(_INTS))]
        return repr(v), v
    if isinstance(value, str):
        v = _STRINGS[rng.integers(len(_STRINGS))]
        return repr(v[:20]) + (f"...({len(v)})" if len(v) > 20 else ""), v
    if isinstance(value, bytes):
        if path[-1] == "cutouts" and rng.random() < 0.5:
            return "absurd pixels", _cutouts(rng)
        options = _bytes_values(rng)
        i = int(rng.integers(len(options)))
        return f"bytes #{i}", options[i]
    if isinstance(value, list):
        if not value or rng.random() < 0.3:
            return "empty list", []
        n = max(1, min(100_000, GROW_BYTES // max(1, _size(value[0]))))
        return f"{n} copies of item 0", [copy.deepcopy(value[0]) for _ in range(n)]
    if isinstance(value, dict):
        extra = {"": float("nan"), "\x00": float("inf"), "k" * 10_000: -1e308}
        if value and all(isinstance(v, float) for v in value.values()):
            return "map with absurd keys and values", {**value, **extra}
        if value and all(isinstance(v, str) for v in value.values()):
            return "map with absurd strings", {**value, **{k: "v" * 50_000 for k in extra}}
        return "null", None
    return "null", None


def _record_mutant(base: Base, rng: np.random.Generator) -> tuple[str, bytes] | None:
    """The base record with one to three values made absurd, written again (None: the schema refuses it)."""
    rec = base.decode(base.value)
    what = []
    for _ in range(int(rng.integers(1, 4))):
        paths = _leaves(rec)
        if not paths:
            break
        path = paths[int(rng.integers(len(paths)))]
        desc, value = _absurd(path, _get(rec, path), rng)
        _set(rec, path, value)
        what.append(f"{'.'.join(map(str, path))}={desc}")
    try:
        return "; ".join(what), base.encode(rec)
    except (BrokerError, ValueError, TypeError, OverflowError):
        return None


def _bad_utf8_mutant(base: Base, rng: np.random.Generator) -> tuple[str, bytes] | None:
    """A string of the record replaced, in the Avro bytes, by as many bytes that are not UTF-8."""
    rec = base.decode(base.value)
    paths = [p for p in _leaves(rec) if isinstance(_get(rec, p), str)]
    if not paths:
        return None
    path = paths[int(rng.integers(len(paths)))]
    marker = "\x01Q\x02Z\x03K\x04"
    _set(rec, path, marker)
    try:
        value = base.encode(rec)
    except ValueError:  # an enum symbol
        return None
    bad = (b"\xed\xa0\x80\xff\xfe\xc0\x80", b"\xf4\x90\x80\x80\xc3\x28\x00", b"\xe2\x82\x28\xa0\xa1\xff\xff")
    if value.count(marker.encode()) != 1:
        return None
    return f"{'.'.join(map(str, path))}=<not UTF-8>", value.replace(marker.encode(), bad[int(rng.integers(3))])


def _byte_mutant(value: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """``value`` with bytes flipped, cut, added, or a Confluent/foreign prefix."""
    kind = int(rng.integers(8))
    n = len(value)
    if kind == 0:
        out = bytearray(value)
        for i in rng.integers(0, n, int(rng.integers(1, 9))):
            out[i] ^= int(rng.integers(1, 256))
        return "bytes flipped", bytes(out)
    if kind == 1:
        cut = int(rng.integers(0, n))
        return f"truncated to {cut}", value[:cut]
    if kind == 2:
        return "extended", value + rng.bytes(int(rng.integers(1, 65)))
    if kind == 3:
        at = int(rng.integers(0, n))
        return f"bytes inserted at {at}", value[:at] + rng.bytes(int(rng.integers(1, 17))) + value[at:]
    if kind == 4:
        return "doubled", value + value
    if kind == 5:
        return "Confluent prefix, unknown id", b"\x00" + int(rng.integers(0, 2 ** 31)).to_bytes(4, "big") + value
    if kind == 6:
        return "wrong magic byte", bytes([int(rng.integers(1, 256))]) + value[1:]
    return "random bytes", rng.bytes(int(rng.integers(1, 2048)))


def _header_mutant(headers: dict[str, bytes], rng: np.random.Generator) -> tuple[str, Headers, bool]:
    """``headers`` (pairs) missing, repeated, not UTF-8, huge; the bool: names that are not UTF-8."""
    pairs: Headers = list(headers.items())
    kind = int(rng.integers(9))
    tag = serde.SCHEMA_HEADER
    if kind == 0:
        return "no headers", [], False
    if kind == 1:
        return "schema header repeated, the last foreign", [*pairs, (tag, b"frame/1")], False
    if kind == 2:
        name, _, version = headers.get(tag, b"x/1").decode().partition("/")
        other = f"{name}/{int(rng.integers(1, 5)) if version != '1' else 2}".encode()
        return f"schema header {other.decode()}", [(tag, b"junk/9"), *pairs, (tag, other)], False
    if kind == 3:
        return "schema header not UTF-8", [(k, v) for k, v in pairs if k != tag] + [(tag, b"\xff\xfe/\xc0")], False
    if kind == 4:
        return "schema header of 100 kB", [(k, v) for k, v in pairs if k != tag] + [(tag, b"9" * 100_000)], False
    if kind == 5:
        return "a header name that is not UTF-8", pairs, True
    if kind == 6:
        return "null header values", [(k, None) for k, _ in pairs], False
    if kind == 7:
        junk = [("t.exposure_end", b"\xff"), ("t.subtract.start", b"1e308"), ("src", b"frames:0:99999999999"),
                ("_format", b"avro" * 1000), ("", b""), ("x" * 10_000, b"y")]
        return "junk timing, lineage and other headers", pairs + junk, False
    return "1000 headers", pairs + [(f"h{i}", rng.bytes(int(rng.integers(0, 64)))) for i in range(1000)], False


def _key_mutant(rng: np.random.Generator) -> tuple[str, Any]:
    keys = (None, b"", b"\xff\xfe\x00", rng.bytes(100_000), b"{", b'{"type": "record"', b"{}" + bytes(10),
            schema_json(1).encode(), "a text key")
    i = int(rng.integers(len(keys)))
    return f"key #{i}", keys[i]


def mutants(bases: list[Base], n: int, rng: np.random.Generator) -> list[Mutant]:
    """``n`` mutants of ``bases``: about half of record values, the rest of bytes, headers, keys, UTF-8."""
    out: list[Mutant] = []
    while len(out) < n:
        base = bases[int(rng.integers(len(bases)))]
        m = Mutant(base.name, base.key, base.value, list(base.headers.items()))
        roll = rng.random()
        if roll < 0.5:
            made = _record_mutant(base, rng)
        elif roll < 0.6:
            made = _bad_utf8_mutant(base, rng)
        elif roll < 0.8:
            made = _byte_mutant(base.value, rng)
        else:
            made = ("", base.value)
        if made is None:
            continue
        m.what, m.value = f"{base.name}: {made[0]}", made[1]
        if roll >= 0.8 or rng.random() < 0.1:
            desc, m.headers, m.unreadable_headers = _header_mutant(base.headers, rng)
            m.what += f"; {desc}"
        if roll >= 0.8 and rng.random() < 0.5 or rng.random() < 0.05:
            desc, m.key = _key_mutant(rng)
            m.what += f"; {desc}"
        out.append(m)
    return out


# --- the consumers ----------------------------------------------------------------------------------


@dataclass
class Findings:
    """What went wrong, one entry per mutant: its mutation and the traceback."""

    items: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        """One more mutant with ``outcome`` (``processed``, or a dead letter's reason)."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def add(self, m: Mutant, exc: BaseException) -> None:
        """A finding: ``m`` raised ``exc``."""
        tb = "".join(traceback.format_exception(exc)[-6:])
        self.items.append(f"{m.what[:300]}\n    {type(exc).__name__}: {str(exc)[:300]}\n{tb}")

    def check(self) -> None:
        """Fail with the first ten findings."""
        assert not self.items, f"{len(self.items)} finding(s):\n" + "\n".join(self.items[:10])


def _kafka() -> Any:
    from streams.settings import KafkaSettings

    return KafkaSettings("127.0.0.1:1")  # never connected: the calls below are the per-message ones


def drive_stage(stage: str, topic: str, handler: Handler, ms: list[Mutant], hang_s: float = HANG_S) -> Findings:
    """Each mutant through :meth:`StageRunner._checked` and ``_handle`` around ``handler``, as the runner does."""
    from streams.runner import StageRunner

    found = Findings()
    errors: list[BaseException] = []

    def handle(msg: InMessage) -> list:
        try:
            return handler(msg)
        except BrokerError:
            raise
        except Exception as exc:
            errors.append(exc)
            raise

    runner = StageRunner(stage, topic, handle, _kafka())
    for i, m in enumerate(ms):
        errors.clear()
        try:
            with _quiet(), time_limit(hang_s):
                msg = runner._checked(in_message(message(topic, i, m)))
                outs, unexpected = runner._handle(msg, Lineage(topic, 0, i))
        except (Outage, Hang, Exception) as exc:  # escaped the runner (a dead letter that does not encode...)
            found.add(m, exc)
            continue
        if unexpected:
            found.add(m, errors[0])
            continue
        dead = [serde.decode("dlq", o.value, o.headers) for o in outs if o.topic == topics.dlq(stage)]
        found.count(dead[0]["reason"] if dead else "processed")
        assert all(d["reason"] and d["message"] for d in dead), m.what
    return found


def test_the_harness_reports_unexpected_errors_and_hangs_and_passes_refusals():
    """The oracle itself: a handler's bug and its hang are findings; a BrokerError is a dead letter."""
    from broker.errors import DecodeError

    def buggy(msg: InMessage) -> list:
        if msg.offset % 3 == 0:
            raise DecodeError("refused")
        if msg.offset % 3 == 1:
            return {}["missing"]  # type: ignore[no-any-return]
        time.sleep(1.0)
        return []

    ms = [Mutant(f"m{i}", b"k", b"v", []) for i in range(6)]
    found = drive_stage("classify", topics.CANDIDATES, buggy, ms, hang_s=0.2)
    assert found.outcomes == {"decode": 2} and len(found.items) == 4
    assert sum("KeyError" in f for f in found.items) == 2 and sum("Hang" in f for f in found.items) == 2
    with pytest.raises(AssertionError, match="4 finding"):
        found.check()


# --- valid records -------------------------------------------------------------------------------


def _schemaless(name: str, version: int | None = None) -> tuple[Callable[[bytes], dict], Callable[[dict], bytes]]:
    def decode(value: bytes) -> dict:
        return fastavro.schemaless_reader(io.BytesIO(value), schemas.load(name, version), None)  # type: ignore

    def encode(rec: dict) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schemas.load(name, version), rec)
        return buf.getvalue()

    return decode, encode


def _cands(n: int, seed: int, **fields: Any) -> list:
    out = []
    for i in range(n):
        c = candidate(cand_id=f"FUZZ-F1-r-{seed:04d}/{i}", ra=10.0 + 0.01 * i, dec=10.0, seed=seed * 10 + i)
        for name, value in fields.items():
            setattr(c, name, value)
        out.append(c)
    return out


def _batch(cands: list, seed: int) -> dict:
    from astropy.wcs import WCS

    return {"frame_id": f"FUZZ-F1-r-{seed:04d}", "telescope": "TEST", "field": "F1", "filter": "r",
            "mjd_start": 60000.5 + seed, "exptime": 30.0, "magzp": 27.0, "status": "SUBTRACTED",
            "reference_frames": ["a"], "diagnostics": {"limiting_flux": 100.0}, "model_versions": {"rb": "rb-1"},
            "nx": 256, "ny": 256, "wcs_header": WCS(header()).to_header(relax=True).tostring(),
            "limiting_flux": 100.0, "candidates": [serde.candidate_to_record(c) for c in cands]}


def _forced(seed: int) -> list[dict]:
    """Forced photometry of a candidate on three earlier frames, as the subtract stage measures it."""
    return [{"frame_id": f"FUZZ-F1-r-{seed:04d}-{k}", "mjd": 59990.5 + k, "exptime": 30.0, "filter": "r",
             "flux": 50.0 * k - 20.0, "flux_err": 30.0, "magzp": 27.0, "limiting_flux": 100.0} for k in range(3)]


def candidate_bases(name: str) -> list[Base]:
    """``candidates`` batches as the subtract stage writes them (with forced photometry), real/bogus scored."""
    decode, encode = _schemaless("candidates")
    tag = {serde.SCHEMA_HEADER: serde.schema_tag("candidates").encode(), "t.exposure_end": b"1700000000.0"}
    out = []
    for seed, n in ((1, 1), (2, 3)):
        cands = _cands(n, seed, rb=0.95)
        for c in cands:
            c.forced = _forced(seed)
        out.append(Base(name, b"k", serde.encode("candidates", _batch(cands, seed)), tag, decode, encode))
    for version in schemas.versions("candidates")[:-1]:  # a batch of an older subtract stage
        old_decode, old_encode = _schemaless("candidates", version)
        batch = old_decode(old_encode(_batch(_cands(1, 3 + version, rb=0.9), 3 + version)))
        out.append(Base(f"{name} v{version}", b"k", old_encode(batch),
                        {serde.SCHEMA_HEADER: f"candidates/{version}".encode()}, old_decode, old_encode))
    return out


def scored_bases(config) -> list[Base]:
    """The batches of :func:`candidate_bases` through the score handler (context, features, a follow-up request)."""
    from streams.stages import score_handler

    score = score_handler(config)
    out = []
    for offset, base in enumerate(candidate_bases("scored")[:2]):  # current-version batches
        batch = base.decode(base.value)
        for rec in batch["candidates"]:  # surely real, unusual: the default rule opens a request
            rec["rb"] = 0.99
        value = base.encode(batch)
        for _ in range(2):  # the second time, each object has a history
            (o,) = score(InMessage(topics.CLASSIFIED, 0, offset, base.key, value, base.headers, 0))
        scored = base.decode(o.value)
        first = scored["candidates"][0]  # a catalog match, a host and the request it opened
        first["context"]["matches"].append({"catalog": "OpenNGC", "version": "1", "name": "NGC 1", "kind": "galaxy",
                                            "ra": 10.001, "dec": 10.0, "distance_arcsec": 3.6, "size_arcsec": 20.0,
                                            "mag": 12.5})
        first["context"]["host"] = {"catalog": "OpenNGC", "name": "NGC 1", "ra": 10.001, "dec": 10.0,
                                    "offset_arcsec": 3.6, "offset_norm": 0.4, "nuclear": False, "flux": 1e5}
        opened = request_id(first["object"]["object_id"], first["cand_id"], "anomalous")
        first["followup"] = FollowupStatus(opened, "anomalous", scored["mjd_start"], "requested", 0).to_record()
        out.append(Base(base.name, o.key, base.encode(scored), {**o.headers, **base.headers}, base.decode,
                        base.encode))
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from broker.config import load_config

    root = tmp_path_factory.mktemp("fuzz")
    return load_config(state_dir=str(root / "state"), frame_store=str(root / "frames"))


def ingested_bases(config) -> list[Base]:
    """A frame through the ingest handler, inline and by reference, as the subtract stage receives it."""
    from streams.framestore import FrameStore
    from streams.stages import ingest_handler

    decode, encode = _schemaless("frame")
    ingest = ingest_handler(config)
    out = []
    for i, inline in enumerate((True, False)):
        frame = star_frame(seed=i, FRAMEID=f"FUZZ-F1-r-{i:04d}", **{"MJD-OBS": 60000.5 + i})
        payload = encode_fits(frame)
        uri = None if inline else FrameStore(config.frame_store).put(payload)[0]
        rec = frame_record(frame, payload, inline=inline, uri=uri)
        (o,) = ingest(InMessage(topics.FRAMES, 0, i, b"k", serde.encode("frame", rec), frame_headers(1.7e9), 0))
        out.append(Base("ingested" + ("" if inline else " by reference"), o.key, o.value,
                        {**o.headers, "t.exposure_end": b"1700000000.0"}, decode, encode))
    return out


# --- the stages ---------------------------------------------------------------------------------------


#: Each stage consumer: its input topic, the bases of its mutants, and the offset of its seed.
STAGES = {"subtract": (topics.INGESTED, ingested_bases, 0),
          "classify": (topics.CANDIDATES, lambda config: candidate_bases("candidates"), 1),
          "score": (topics.CLASSIFIED, lambda config: candidate_bases("classified"), 2),
          "alert": (topics.SCORED, scored_bases, 3)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_dead_letters_every_mutant_it_cannot_process(config, stage):
    from streams import stages

    topic, bases, seed_offset = STAGES[stage]
    handler = getattr(stages, f"{stage}_handler")(config)
    found = drive_stage(stage, topic, handler,
                        mutants(bases(config), N_MUTANTS[stage], np.random.default_rng(SEED + seed_offset)))
    assert found.outcomes.get("processed", 0) > 0, found.outcomes  # not every mutant refused
    found.check()


# --- alerts: the archive and subscribers ------------------------------------------------------------


def _ocf_codec(version: int) -> tuple[Callable[[bytes], dict], Callable[[dict], bytes]]:
    def decode(value: bytes) -> dict:
        return next(fastavro.reader(io.BytesIO(value)))  # type: ignore[return-value]

    def encode(rec: dict) -> bytes:
        buf = io.BytesIO()
        fastavro.writer(buf, schemas.load("alert", version), [rec])
        return buf.getvalue()

    return decode, encode


def alert_bases(config) -> list[Base]:
    """Alerts of the alert handler in the ``ocf``, ``fink`` and Confluent framings, and the schema's samples."""
    from streams.stages import alert_handler

    scored = scored_bases(config)[1]
    outs = [o for o in alert_handler(config)(InMessage(topics.SCORED, 0, 0, scored.key, scored.value,
                                                       scored.headers, 0)) if o.topic == topics.ALERTS]
    decode, encode = _ocf_codec(schemas.CURRENT["alert"])
    out = [Base("ocf alert", o.key, o.value, o.headers, decode, encode) for o in outs[:2]]
    body_decode, body_encode = _schemaless("alert")
    record = decode(outs[0].value)
    fink = AlertEncoder(FramingConfig("fink")).encode(record, b"")
    out.append(Base("fink alert", fink.key, fink.value, fink.headers, body_decode, body_encode))
    tag = {serde.SCHEMA_HEADER: serde.schema_tag("alert").encode()}

    def confluent_decode(value: bytes) -> dict:
        return body_decode(value[5:])

    def confluent_encode(rec: dict) -> bytes:
        return b"\x00\x00\x00\x00\x07" + body_encode(rec)

    out.append(Base("confluent alert", outs[0].key, confluent_encode(record), tag, confluent_decode,
                    confluent_encode))
    for version in schemas.versions("alert"):
        sample = (schemas.ROOT / "alert" / "samples" / f"v{version}.avro").read_bytes()
        dec, enc = _ocf_codec(version)
        out.append(Base(f"sample v{version}", None, sample, {"_format": b"avro"}, dec, enc))
    return out


def test_the_archive_dead_letters_every_mutant_it_cannot_archive(config, tmp_path):
    from broker.archive.config import ArchiveConfig
    from streams.archiver import Archiver, _Batch

    archiver = Archiver(ArchiveConfig(), str(tmp_path / "archive"), _kafka())
    found = Findings()
    for i, m in enumerate(mutants(alert_bases(config), N_MUTANTS["archive"], np.random.default_rng(SEED + 4))):
        archiver.batch = _Batch()
        try:
            with _quiet(), time_limit(HANG_S):
                assert archiver._take(message(topics.ALERTS, i, m))
                rows = archiver._rows(archiver.batch.pending)  # what the batch's flush writes
                if rows:
                    archiver.writer.write(rows)
        except (Hang, Exception) as exc:
            found.add(m, exc)
            continue
        dead = [serde.decode("dlq", d.value, d.headers) for d in archiver.batch.dead]
        for d in dead:
            if d["reason"].startswith("unexpected:"):
                found.add(m, RuntimeError(f"dead letter {d['reason']}: {d['message']}"))
        found.count(dead[0]["reason"] if dead else "archived")
    assert found.outcomes.get("archived", 0) > 0, found.outcomes
    found.check()


def test_a_subscriber_skips_every_mutant_that_is_no_alert_and_shows_the_others(config, tmp_path):
    from streams.alert_expr import AlertFilter, FieldSelection, to_json
    from streams.cli import format_alert, png_name
    from streams.subscriber import Subscription
    from streams.triplet_png import save_triplet_png

    skipped: list = []
    sub = Subscription(_kafka(), topics.ALERTS, on_skip=skipped.append)
    filters = [AlertFilter(e) for e in ("snr > 5 and rb > 0.5", "ndet('r') >= 2 and since_first() < 30",
                                        "source.flux * 2 > 1 and latency > 0", "nbands() > 0 or nnondet() > 0",
                                        "'trail' not in context.matches.kind")]
    chosen = FieldSelection("objectId,source.ra,source.dec,prv_sources.mjd,scores.rb")
    found = Findings()
    pngs = 0
    for i, m in enumerate(mutants(alert_bases(config), N_MUTANTS["subscriber"], np.random.default_rng(SEED + 5))):
        sub._seen.clear()  # each mutant is a new alert, whatever its id
        try:
            with _quiet(), time_limit(HANG_S):
                for alert in sub._records(message(topics.ALERTS, i, m)):
                    for keep in filters:
                        try:
                            keep(alert)
                        except BrokerError:
                            pass  # a filter that cannot be evaluated: the subscriber says why
                    format_alert(alert)
                    chosen.text(alert)
                    to_json({k: v for k, v in alert.items() if not k.startswith("cutout")})
                    if pngs < N_PNG:
                        pngs += 1
                        save_triplet_png(alert, tmp_path / png_name(alert["candid"]))
                    found.count("shown")
        except (Hang, Exception) as exc:
            found.add(m, exc)
    assert found.outcomes.get("shown", 0) > 0 and skipped
    found.check()


# --- follow-up requests -------------------------------------------------------------------------------


def followup_bases() -> list[Base]:
    from broker.followup import DEFAULT_RULES

    decode, encode = _schemaless("followup")
    view = {"objectId": "OBJFUZZ000000001", "candid": "FUZZ-F1-r-0001/0",
            "object": {"ra": 150.0, "dec": 2.0}, "source": {"filter": "r", "ra": 150.0, "dec": 2.0},
            "scores": {"rb": 0.95, "anomaly": 0.999},
            "classification": {"label": "SN", "probabilities": {"SN": 0.9}}}
    out = []
    for rule in DEFAULT_RULES:
        status = FollowupStatus(request_id("OBJFUZZ000000001", "FUZZ-F1-r-0001/0", rule.name), rule.name, 60000.5,
                                "requested", 0)
        rec = request_record(status, rule, view, "broker", 1.7e9)
        out.append(Base(f"request {rule.name}", b"OBJFUZZ000000001", serde.encode("followup", rec),
                        {serde.SCHEMA_HEADER: serde.schema_tag("followup").encode()}, decode, encode))
    return out


def test_the_followup_listener_dead_letters_every_mutant_it_cannot_schedule():
    from streams.alert_expr import to_json
    from streams.followup import STAGE, FollowupListener
    from streams.runner import dead_letter

    listener = FollowupListener(_kafka(), filters=("r", "g"), clock=lambda: 60001.0)
    found = Findings()
    for i, m in enumerate(mutants(followup_bases(), N_MUTANTS["followup"], np.random.default_rng(SEED + 6))):
        msg = in_message(message(topics.FOLLOWUP, i, m))
        try:
            with _quiet(), time_limit(HANG_S):
                try:
                    to_json(listener.check(msg))  # what `broker followup` prints
                    found.count("valid")
                except BrokerError as exc:
                    out = dead_letter(STAGE, msg, exc)
                    assert serde.decode("dlq", out.value, out.headers)["reason"] == exc.reason != ""
                    found.count(exc.reason)
        except (Hang, Exception) as exc:
            found.add(m, exc)
    assert found.outcomes.get("valid", 0) > 0, found.outcomes
    found.check()
