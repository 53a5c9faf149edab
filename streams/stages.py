"""The stage table: one declaration per stage, and the handlers it names.

Each handler is built once per process (loading models, opening stores) and called per message by
:class:`~streams.runner.StageRunner`: decode -> call the ``broker`` science -> encode. The runner,
topic creation (:func:`pipeline_topics`), the demo, the CLI and the stage table of
``docs/architecture.md`` (:func:`stage_table_markdown`) are all derived from :data:`STAGES`.
Only the classify stage imports torch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.alert import PUBLISHER, alert_fields, build_alert, frame_context
from broker.calibrate import calibrate
from broker.candidate import CUTOUT_SIZE
from broker.config import AlertTopicConfig, PipelineConfig
from broker.diffstore import DifferenceStore, celestial_header
from broker.errors import (
    BrokerError,
    ChecksumMismatch,
    ConfigError,
    FrameTooLarge,
    ImplausibleHeader,
    InvalidFrame,
    InvalidMeasurement,
    NoSolution,
    NotIngested,
    PoorQuality,
)
from broker.followup import FollowupStatus, FollowupStore, opened_by, request_record, validate_request
from broker.frame import Frame, FrameMeta, decode_fits, encode_fits, has_wcs, sha256
from broker.history import open_history
from broker.ingest import check_record, check_size_and_header, ingest, validate
from broker.ledger import FrameLedger, pixel_checksum
from broker.pipeline import (
    IN_REFERENCE,
    SUBTRACTED,
    FrameResult,
    LeftOutSearch,
    ScoreModels,
    associate_and_score,
    process_frame,
    search_left_out,
)
from broker.plausibility import PlausibilityConfig, header_problems
from broker.reference import ReferenceStore
from broker.runtime import retain_freed_memory
from broker.solvebackoff import SolverBackoff
from broker.telescopes import TelescopeProfile, load_profiles
from broker.watchlist import WatchlistFile
from streams import serde, topics
from streams.alert_expr import AlertFilter
from streams.followup import FollowupRules, request_message
from streams.frame_auth import FrameAuthoriser
from streams.framestore import FrameStore
from streams.framing import AlertEncoder, FramingConfig
from streams.runner import (
    EXPOSURE_END,
    SEARCHED_LATE,
    TIMING_PREFIX,
    Handler,
    InMessage,
    OutMessage,
    dead_letter,
    parse_time,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes
    ----------
    name : str
        Stage name: the consumer group ``<app-id>.<name>``, the dead-letter topic
        ``dlq.<name>``, the metrics label and the ``broker stage NAME`` argument.
    input : str
        Topic it consumes.
    output : str or None
        Topic every output goes to; None for a stage that writes no topic (the archive).
    make_handler : callable or None
        ``PipelineConfig -> Handler``, called once per process by the per-message runner; None for
        a stage that runs a loop of its own (``kind``).
    summary : str
        What the stage does, one line (CLI help and docs).
    alert_outputs : bool
        Whether the outputs go to the configured alert topics (``PipelineConfig.alert_topics``, each
        in its framing, with its ``<topic>.<filter>`` copies) instead of ``output`` (the alert stage;
        ``output`` is then the default alert topic).
    kind : str
        How ``broker stage NAME`` runs it: ``transform`` (default; :class:`streams.runner.StageRunner`
        calls ``make_handler``'s handler, one transaction per input message) or ``archive``
        (:class:`streams.archiver.Archiver`: batches of alerts into the Parquet archive).
    state : callable or None
        ``PipelineConfig -> Path | None``: the local folder the stage writes besides Kafka, whose
        disk's free space it exports (``StageMetrics.watch_disk``); None (default) or a None
        result: nothing on a local disk.
    references : callable or None
        ``PipelineConfig -> Path``: the root of the reference store the stage builds, whose frames
        waiting in ``omitted/`` it exports (``StageMetrics.watch_references``); None (default): none.
    """

    name: str
    input: str
    output: str | None
    make_handler: Callable[[PipelineConfig], Handler] | None
    summary: str
    alert_outputs: bool = False
    kind: str = "transform"
    state: Callable[[PipelineConfig], Path | None] | None = None
    references: Callable[[PipelineConfig], Path] | None = None

    @property
    def dead_letters(self) -> str:
        """The stage's dead-letter topic."""
        return topics.dlq(self.name)

    def outputs(self, config: PipelineConfig | None = None) -> tuple[str, ...]:
        """Topics every output of the stage goes to under ``config`` (default config), per-filter copies left out."""
        if self.alert_outputs:
            return tuple(t.name for t in (config or PipelineConfig()).alert_topics) + (topics.FOLLOWUP,)
        return (self.output,) if self.output else ()

    def writes_for(self, config: PipelineConfig | None = None) -> tuple[str, ...]:
        """Topics the stage writes outputs to under ``config``: every configured output topic and the dead letters.

        Per-filter copies are left out (their outputs commit with the others), and so is the
        progress topic (:attr:`progress`).
        """
        return (*self.outputs(config), self.dead_letters)

    @property
    def progress(self) -> str | None:
        """The stage's progress topic (its duplicate guard's state, :mod:`streams.lineage`); None for the archive.

        Only per-message (``transform``) stages have one; the archive keeps its own commit log.
        """
        return topics.progress(self.name) if self.kind == "transform" else None


def _headers(name: str) -> dict[str, bytes]:
    return {serde.SCHEMA_HEADER: serde.schema_tag(name).encode()}


def frame_payload(rec: dict, store: FrameStore, max_bytes: int) -> bytes:
    """The FITS bytes of a ``frame`` record, inline or from the frame store, checksum verified."""
    if rec["fits"] is not None:
        if len(rec["fits"]) > max_bytes:
            raise FrameTooLarge(f"inline frame of {len(rec['fits'])} bytes exceeds {max_bytes}")
        if sha256(rec["fits"]) != rec["sha256"]:
            raise ChecksumMismatch(f"inline frame bytes do not match their SHA-256 {rec['sha256'][:12]}...")
        return rec["fits"]
    if not rec["uri"]:
        raise InvalidFrame("frame record has neither inline FITS bytes nor a URI")
    return store.get(rec["uri"], rec["sha256"], max_bytes)


def _frame_of(msg: InMessage, store: FrameStore, config: PipelineConfig,
              profiles: tuple[TelescopeProfile, ...] = (), require_wcs: bool = True) -> tuple[dict, Frame]:
    """The ``frame`` record and its decoded frame, refused when too large or when the record lies about it."""
    rec = serde.decode("frame", msg.value, msg.headers)
    payload = frame_payload(rec, store, config.max_frame_bytes)
    frame = decode_fits(payload, config.ingest.max_pixels, config.ingest.max_expansion, profiles, require_wcs)
    check_record(rec, frame, len(payload))
    return rec, frame


def _store_calibrated(rec: dict, frame: Frame, store: FrameStore, config: PipelineConfig) -> None:
    """Point ``rec`` at the calibrated frame's FITS bytes.

    Inline, or in the frame store when the frame came by reference or is over the inline limit.
    """
    payload = encode_fits(frame)
    if len(payload) > config.max_frame_bytes:
        raise FrameTooLarge(f"calibrated frame {frame.meta.frame_id} encodes to {len(payload)} bytes, "
                            f"over {config.max_frame_bytes}")
    inline = rec["fits"] is not None and len(payload) <= config.inline_limit_bytes
    rec.update(fits=payload if inline else None, uri=None if inline else store.put(payload)[0],
               sha256=sha256(payload), size_bytes=len(payload))


def ingest_handler(config: PipelineConfig) -> Handler:
    """Fetch and decode the frame, calibrate it (WCS solved or checked, zero point), validate it, measure its quality.

    ``frame`` -> ``frame``: the record then carries the calibrated FITS (the header holds the WCS,
    ``WCSSTAT``/``WCSRESID`` and ``MAGZP``/``MAGZPERR``; :func:`broker.calibrate.calibrate`). A frame
    that cannot be solved is dead-lettered ``unsolvable`` (``no_solver`` without astrometry.net).
    """
    store = FrameStore(config.frame_store)
    auth = FrameAuthoriser.load(config.kafka)  # [kafka.frame_auth]: who may send which telescope's frames
    profiles = load_profiles(config.ingest.telescopes_dir)
    astrometry = config.ingest.calibration.astrometry
    backoff = SolverBackoff(astrometry.backoff_after, astrometry.backoff_s)

    def handle(msg: InMessage) -> list[OutMessage]:
        signed = auth.check(msg.key, msg.value, msg.headers) if auth.enabled else None  # before any decoding
        rec, frame = _frame_of(msg, store, config, profiles, require_wcs=not config.ingest.calibration.enabled)
        if signed is not None:
            auth.check_telescope(signed, frame.meta.telescope)
        check_size_and_header(frame, config.ingest, with_magzp=False)  # before a plate solve spends seconds on it
        calibrated = _calibrated(frame, config, profiles, backoff)
        quality = ingest(calibrated, config.ingest)
        if calibrated is not frame:
            _store_calibrated(rec, calibrated, store, config)
        m = calibrated.meta
        rec.update(frame_id=m.frame_id, telescope=m.telescope, field=m.field, filter=m.filter,
                   mjd_start=m.mjd_start, exptime=m.exptime, quality=quality.to_record())
        return [OutMessage(topics.INGESTED, serde.encode("frame", rec), msg.key, _headers("frame"))]

    return handle


def _calibrated(frame: Frame, config: PipelineConfig, profiles: tuple[TelescopeProfile, ...],
                backoff: SolverBackoff) -> Frame:
    """:func:`broker.calibrate.calibrate`, the plate solver backing off a telescope whose frames find no solution."""
    telescope = frame.meta.telescope
    solving = config.ingest.calibration.enabled and not has_wcs(frame.header)
    if solving:
        backoff.check(telescope)  # SolverBackingOff: dead-lettered, replayable
    try:
        calibrated = calibrate(frame, config.ingest.calibration, profiles)
    except NoSolution as exc:
        backoff.failed(telescope, str(exc))
        raise
    if solving:
        backoff.solved(telescope)
    return calibrated


def _batch(frame: Frame, result: FrameResult) -> dict:
    """The ``candidates`` record of a frame's result (scores unset)."""
    m = frame.meta
    ny, nx = frame.shape
    return {
        "frame_id": m.frame_id, "telescope": m.telescope, "field": m.field, "filter": m.filter,
        "mjd_start": m.mjd_start, "exptime": m.exptime, "magzp": m.magzp, "status": result.status,
        "nx": nx, "ny": ny, "wcs_header": celestial_header(frame), "limiting_flux": result.limiting_flux,
        "reference_frames": list(result.reference_frames), "diagnostics": _diagnostics(frame, result),
        "model_versions": {}, "candidates": [serde.candidate_to_record(c) for c in result.candidates],
    }


def _diagnostics(frame: Frame, result: FrameResult) -> dict[str, float]:
    """The batch's diagnostics: the subtraction's, and ``magzp_err`` (mag) when the frame was calibrated."""
    diag = dict(result.diagnostics)
    if frame.meta.magzp_err is not None:
        diag["magzp_err"] = float(frame.meta.magzp_err)
    return diag


def _ingested_flags(rec: dict, frame: Frame, config: PipelineConfig) -> tuple[str, ...]:
    """The quality flags of a record on ``ingested``, after checking it as ingest did (anyone may write a topic).

    Raises
    ------
    NotIngested
        The record has no quality measurements: the ingest stage did not write it.
    InvalidFrame
        The frame fails :func:`broker.ingest.validate` (size, plausibility, WCS, NaN fraction),
        or carries a flag of ``IngestConfig.reject_on`` (:class:`PoorQuality`).
    """
    if rec["quality"] is None:
        raise NotIngested(f"frame {frame.meta.frame_id} has no quality measurements: not written by ingest")
    validate(frame, config.ingest)
    flags = tuple(rec["quality"]["flags"])
    rejected = [f for f in flags if f in config.ingest.reject_on]
    if rejected:
        raise PoorQuality(f"frame {frame.meta.frame_id} carries the rejecting quality flags {rejected}")
    return flags


def subtract_handler(config: PipelineConfig) -> Handler:
    """Reference policy, subtraction and detection (``frame`` -> ``candidates``).

    Each record is checked again as ingest checked it (:func:`_ingested_flags`), then against the
    frame ledger (:class:`broker.ledger.FrameLedger`: ``<state_dir>/frames.sqlite``, or the history's
    PostgreSQL with ``[history] dsn``): a frame sent again is dead-lettered ``duplicate_frame``.
    Flags of ``IngestConfig.subtract_skip_on`` keep a frame from being subtracted (``poor_quality``).
    Once the frame's key has a reference, the frames its co-add left out are searched against it in
    the same transaction (:func:`broker.pipeline.search_left_out`): a batch for each before the
    frame's own, or a dead letter naming the left-out frame's first position (:func:`_left_out_outputs`).
    """
    if config.retain_freed_memory:
        retain_freed_memory()
    store = FrameStore(config.frame_store)
    aside: list[str] = []  # reasons of the frames the store set aside since the last output
    refs = ReferenceStore(_references(config), config.reference,
                          on_set_aside=lambda _key, _frame_id, reason: aside.append(reason))
    diffs = DifferenceStore(config.state_dir / "diffs", config.differences)
    ledger = FrameLedger.open(config.state_dir, config.history)

    def handle(msg: InMessage) -> list[OutMessage]:
        rec, frame = _frame_of(msg, store, config)
        flags = _ingested_flags(rec, frame, config)
        checksum, source = pixel_checksum(frame.data), f"{msg.topic}:{msg.partition}:{msg.offset}"
        ledger.check(frame.meta, checksum, source)  # a re-sent frame: DuplicateFrame, no new alerts
        skip = [f for f in flags if f in config.ingest.subtract_skip_on]
        result = process_frame(frame, refs, config.subtract, not flags, diffs, skip)
        late = search_left_out(refs, ledger, frame.meta.reference_key, source, config.subtract, diffs,
                               exclude=frame.meta.frame_id) if result.status in (SUBTRACTED, IN_REFERENCE) else []
        own = _candidates(frame, result, msg.key)
        own.set_aside, aside[:] = tuple(aside), []  # counted by the runner (broker_reference_frames_set_aside_total)
        outs = [*_left_out_outputs(late, msg), own]
        ledger.record(frame.meta, checksum, source, result.status)  # once its outputs exist: a failure before
        for search in late:  # leaves the frame free to be sent again
            ledger.record_search(search.frame.meta, source, search.status)
        return outs

    return handle


def _candidates(frame: Frame, result: FrameResult, key: bytes | None) -> OutMessage:
    """The ``candidates`` output of a frame's result."""
    batch = _batch(frame, result)
    return OutMessage(topics.CANDIDATES, serde.encode("candidates", batch), key, _headers("candidates"),
                      candidates=len(batch["candidates"]))


#: The header of the dead letter of a left-out frame's failed search (:func:`_left_out_outputs`): the frame's id.
LEFT_OUT_HEADER = "left_out_frame"
#: The ``outcome`` of ``broker_left_out_searched_total`` for a search dead-lettered; the others are batch statuses.
LEFT_OUT_DEAD_LETTERED = "dead_lettered"


def _left_out_outputs(searches: list[LeftOutSearch], msg: InMessage) -> list[OutMessage]:
    """A batch for each searched left-out frame, or the dead letter of its error (:func:`_left_out_letter`).

    A batch carries timing headers of its own (:func:`_late_timing`), not ``msg``'s. Each output
    carries, as ``if_refused``, its dead letter for the case where the runner dead-letters ``msg``
    instead of committing its outputs (one refused for good, by the runner's size check or by the
    broker at commit): the ledger already holds the frame as searched, so its batch would otherwise
    be lost with no trace.
    """
    outs = []
    for search in searches:
        result = search.outcome
        if isinstance(result, FrameResult):
            out = _candidates(search.frame, result, msg.key)
            out.left_out = result.status  # broker_left_out_searched_total{outcome}
            out.if_refused = _refused_batch(search, result, msg)
            out.own_timing = _late_timing(search.frame.meta)  # not the shutter close of msg's frame
        else:
            out = _left_out_letter(search, msg, result)
            out.if_refused = lambda _exc, letter=out: letter  # kept as it is
        outs.append(out)
    return outs


def _late_timing(meta: FrameMeta) -> dict[str, bytes]:
    """The timing headers of a left-out frame's batch: its own shutter close, and when it was searched.

    ``t.exposure_end`` is MJD-OBS + EXPTIME (Unix s), as the producer sets it by default (the
    frame's own message, whose header may say otherwise, is not read again); left off when not
    valid (:func:`streams.runner.parse_time`). :data:`streams.runner.SEARCHED_LATE` keeps its
    messages out of the latency histograms, while its alerts' ``timing.exposure_end`` gives their
    real delay.
    """
    from astropy.time import Time

    now = time.time()
    end = parse_time(repr(float(Time(meta.mjd_end, format="mjd", scale="utc").unix)).encode(), now)
    timing = {SEARCHED_LATE: repr(now).encode()}
    if end is not None:
        timing[EXPOSURE_END] = repr(end).encode()
    return timing


def _refused_batch(search: LeftOutSearch, result: FrameResult, msg: InMessage) -> Callable[[BrokerError], OutMessage]:
    """The dead letter of a left-out frame's batch committed in no transaction: ``msg``'s outputs were refused."""

    def letter(exc: BrokerError) -> OutMessage:
        refused = type(exc)(f"its batch ({result.status}, {len(result.candidates)} candidates) was not committed: "
                            f"the outputs of {msg.topic}:{msg.partition}:{msg.offset} were refused, {exc}")
        return _left_out_letter(search, msg, refused)

    return letter


def _left_out_letter(search: LeftOutSearch, msg: InMessage, exc: BrokerError) -> OutMessage:
    """The dead letter of a left-out frame searched in ``msg``'s transaction, for ``exc``.

    It names the frame's first message (topic, partition and offset from the ledger; the message in
    hand's when unknown), whose value stays on ``ingested`` for its retention; it carries no value
    of its own, and the header :data:`LEFT_OUT_HEADER` (the frame's id), by which ``broker
    dead-letters --resend`` tells why it is not sent again (:func:`streams.deadletters.resend`).
    """
    topic, partition, offset = _position(search.source, msg)
    refused = type(exc)(f"frame {search.frame.meta.frame_id}, left out of its reference's co-add, searched "
                        f"against it in the transaction of {msg.topic}:{msg.partition}:{msg.offset}: {exc}")
    log.warning("subtract: dead-lettering left-out frame %s (%s): %.1000s", search.frame.meta.frame_id,
                refused.reason, refused)
    headers = {LEFT_OUT_HEADER: search.frame.meta.frame_id.encode(errors="surrogatepass")}
    out = dead_letter("subtract", InMessage(topic, partition, offset, msg.key, None, headers, 0), refused)
    out.left_out = LEFT_OUT_DEAD_LETTERED
    return out


def _position(source: str | None, msg: InMessage) -> tuple[str, int, int]:
    """Topic, partition and offset of a ledger ``source`` (``topic:partition:offset``); ``msg``'s when it has none."""
    try:
        topic, partition, offset = (source or "").rsplit(":", 2)
        return topic, int(partition), int(offset)
    except ValueError:
        return msg.topic, msg.partition, msg.offset


def _rescore(topic: str, score: Callable[[dict, list], None]) -> Handler:
    """A handler that decodes a batch, lets ``score`` update it and its candidates, re-encodes."""

    def handle(msg: InMessage) -> list[OutMessage]:
        batch = serde.decode("candidates", msg.value, msg.headers)
        cands = [serde.record_to_candidate(r) for r in batch["candidates"]]
        if cands:
            score(batch, cands)
        batch["candidates"] = [serde.candidate_to_record(c) for c in cands]
        return [OutMessage(topic, serde.encode("candidates", batch), msg.key, _headers("candidates"),
                           candidates=len(cands))]

    return handle


def classify_handler(config: PipelineConfig) -> Handler:
    """Real/bogus scores (``candidates`` -> ``candidates``); the one stage that loads torch."""
    try:
        import torch

        from broker.realbogus import RealBogusClassifier, ScoreConfig
    except ImportError as exc:
        raise ConfigError(f"the classify stage needs torch ({exc}): "
                          "pip install 'transient-broker[classify]'") from exc

    torch.set_num_threads(config.torch_threads)
    model = RealBogusClassifier.load(config.rb_model, ScoreConfig(views=config.rb_views))

    def score(batch: dict, cands: list) -> None:
        model.score_candidates(cands)  # sets cand.rb; None where the cutouts cannot be normalised
        batch["model_versions"]["rb"] = model.version

    return _rescore(topics.CLASSIFIED, score)


def score_handler(config: PipelineConfig) -> Handler:
    """Association, history, context, light-curve class, anomaly, follow-up (``candidates`` -> ``candidates``).

    Models, the catalog and the follow-up rules are loaded and checked here, once: a missing or
    corrupt file or a bad rule stops the stage at start-up (``ModelError``/``ConfigError``). Each
    batch is checked before anything of it is written to the history (:func:`check_scorable`).
    """
    history = open_history(config.state_dir, config.history)  # PostgreSQL with [history] dsn, else SQLite
    models = ScoreModels.load(config.anomaly_model, config.lcclass_model, config.openngc, config.context,
                              config.moving)
    rules = FollowupRules(config.followup)
    followups = FollowupStore(history.store)

    def score(batch: dict, cands: list) -> None:
        check_scorable(batch, cands, config.ingest.plausibility)  # before anything is written
        associate_and_score(history, models, batch["frame_id"], batch["mjd_start"], batch["filter"], cands,
                            batch["magzp"], batch["limiting_flux"], batch["telescope"], (batch["ny"], batch["nx"]))
        versions = batch["model_versions"]
        versions["anomaly"], versions["lcclass"] = models.anomaly.version, models.lcclass.version
        ctx = frame_context(batch)
        for cand in cands:
            rule = rules.first_match(alert_fields(ctx, cand, versions))
            status = followups.for_candidate(cand.obj.object_id, cand.cand_id, batch["mjd_start"], cand.history,
                                             rule)
            cand.followup = None if status is None else status.to_record()

    return _rescore(topics.SCORED, score)


#: Measurements of a candidate the history keeps (NOT NULL) and light curves compute with.
_MEASURED = ("flux", "flux_err", "snr")
#: How far off its frame a candidate's position may lie (px): half a cutout. A PSF fit moves a peak
#: on an edge pixel a few pixels at most.
_OFF_FRAME_PX = CUTOUT_SIZE / 2


def check_scorable(batch: dict, cands: list, bounds: PlausibilityConfig) -> None:
    """Refuse a batch whose values the score stage must not write to the history (anyone may write a topic).

    The frame-level values are checked as ingest checked the frame's header
    (:func:`broker.plausibility.header_problems`: the MJD window, the exposure, the zero point), and
    every candidate's flux, flux error and S/N must be finite, and its position (x, y) on the frame
    (:func:`_position_problem`). A zero point of -800 mag was written to the history and then
    overflowed every later light curve of its object (each of its alerts
    ``unexpected:OverflowError``); an MJD of -1e300 became its objects' ``first_mjd``; a NaN flux
    was ``unexpected:IntegrityError``; one of eight candidates at x = 1e200 overflowed the trail
    search's k-d tree (``unexpected:ValueError``) after the history was written.

    Parameters
    ----------
    batch : dict
        The decoded ``candidates`` record.
    cands : list of Candidate
        Its candidates.
    bounds : PlausibilityConfig
        The ingest stage's bounds (``[ingest.plausibility]``).

    Raises
    ------
    ImplausibleHeader
        The batch's MJD, exposure or zero point is outside its bounds (or not a number).
    InvalidMeasurement
        A candidate's flux, flux error or S/N is not a finite number, or its position is not on the frame.
    """
    meta = FrameMeta(batch["frame_id"], batch["telescope"], batch["field"], batch["filter"], batch["mjd_start"],
                     batch["exptime"], magzp=batch["magzp"])
    problems = header_problems(meta, bounds)
    if problems:
        raise ImplausibleHeader(f"batch of frame {batch['frame_id'][:80]!r}: {'; '.join(problems)}; "
                                "nothing written to the history")
    for cand in cands:
        bad = [f"{name}={getattr(cand.detection, name)}" for name in _MEASURED
               if not math.isfinite(getattr(cand.detection, name))]
        if bad:
            raise InvalidMeasurement(f"candidate {cand.cand_id[:80]!r}: {', '.join(bad)} not finite; nothing of the "
                                     "frame written to the history")
        off = _position_problem(cand.detection.x, cand.detection.y, batch["nx"], batch["ny"])
        if off:
            raise InvalidMeasurement(f"candidate {cand.cand_id[:80]!r}: {off}; nothing of the frame written to the "
                                     "history")


def _position_problem(x: float, y: float, nx: int, ny: int) -> str | None:
    """Why the position (x, y) (px, 0-based) is not on a frame of ``nx`` x ``ny`` px; None when it is.

    The position must be finite and, when the batch gives the frame's size (``candidates/v2`` on;
    v1 batches have 0 x 0), within the frame grown by :data:`_OFF_FRAME_PX`.
    """
    if not (math.isfinite(x) and math.isfinite(y)):
        return f"position x, y = ({x}, {y}) is not finite"
    if (nx or ny) and not (-_OFF_FRAME_PX <= x <= nx - 1 + _OFF_FRAME_PX
                           and -_OFF_FRAME_PX <= y <= ny - 1 + _OFF_FRAME_PX):
        return f"position x, y = ({x:.6g}, {y:.6g}) is off its {nx} x {ny} px frame"
    return None


def _timing(headers: dict[str, bytes], start: float) -> dict:
    """The alert's ``timing`` record from the (validated, ``StageRunner._checked``) timing headers; NaN: unknown."""
    stages = []
    chain = [s for s in STAGES if s.kind == "transform"]  # the stages an alert passed, the alert stage last
    for stage in chain[:-1]:
        s = parse_time(headers.get(f"{TIMING_PREFIX}{stage.name}.start"))
        e = parse_time(headers.get(f"{TIMING_PREFIX}{stage.name}.end"))
        if s is not None and e is not None:
            stages.append({"stage": stage.name, "start": s, "end": e})
    stages.append({"stage": chain[-1].name, "start": start, "end": time.time()})
    end = parse_time(headers.get(EXPOSURE_END))
    return {"exposure_end": float("nan") if end is None else end, "stages": stages}


def alert_handler(config: PipelineConfig) -> Handler:
    """One Avro alert per candidate (``candidates`` -> ``alert``) on every configured alert topic, in its framing.

    Each topic gets its own :class:`~streams.framing.AlertEncoder` (a ``confluent`` one registers the
    schema now: an unreachable registry stops the stage at start-up); per-filter copies
    (``<topic>.<filter>``) carry the same bytes.
    """
    encoders = [(t, AlertEncoder(FramingConfig(t.framing, t.codec, config.schema_registry_url), t.name),
                 topic_selector(t)) for t in config.alert_topics]

    def handle(msg: InMessage) -> list[OutMessage]:
        start = time.time()
        batch = serde.decode("candidates", msg.value, msg.headers)
        ctx = frame_context(batch)
        outs = []
        for rec in batch["candidates"]:
            cand = serde.record_to_candidate(rec)
            alert = build_alert(ctx, cand, batch["model_versions"], _timing(msg.headers, start), time.time())
            key = str(alert["objectId"]).encode()
            outs += _followup_request(config, alert)
            for spec, encoder, select in encoders:
                extra = select(alert)
                if extra is None:
                    continue
                out = encoder.encode(alert, key)
                headers = out.headers | extra if extra else out.headers
                outs.append(OutMessage(spec.name, out.value, out.key, headers))
                if spec.per_filter:
                    outs.append(OutMessage(topics.filter_topic(spec.name, ctx.filter), out.value, out.key, headers))
        return outs

    return handle


#: Header of an alert on a watchlist's topic: the JSON list of the entries it matched (name, distance in arcsec).
WATCHLIST_HEADER = "watchlist"


def topic_selector(spec: AlertTopicConfig) -> Callable[[dict], dict[str, bytes] | None]:
    """Which alerts go to the topic of ``spec``: None for an alert left out, else the headers it adds.

    ``spec.filter`` is compiled and ``spec.watchlist`` read now, when the alert stage starts: a
    filter that does not parse (FilterExpressionError) or a watchlist that cannot be read
    (InvalidWatchlist) stops it there, naming the topic. The watchlist file is read again when it
    changes (:class:`broker.watchlist.WatchlistFile`, looked at every ``watchlist_check_s``). An
    alert in a watchlist's radius gets the header ``watchlist``: the JSON list of the entries it
    matched (name, distance in arcsec). An alert whose values take the filter past the language's
    bounds (``source.snr ** source.snr ** source.snr``, a bright one) is left out of the topic with a
    warning: it raised out of the handler, and the batch's alerts were dead-lettered from every topic.
    """
    try:
        keep = AlertFilter(spec.filter)
        watched = WatchlistFile(spec.watchlist, spec.watchlist_radius_arcsec, spec.watchlist_check_s) \
            if spec.watchlist else None
    except BrokerError as exc:
        raise type(exc)(f"alert topic {spec.name}: {exc}") from None

    def select(alert: dict) -> dict[str, bytes] | None:
        if not keep.passes(alert, lambda exc: log.warning("alert topic %s: filter not evaluated on alert %s, left "
                                                          "out: %s", spec.name, alert.get("alertId"), str(exc)[:300])):
            return None
        if watched is None:
            return {}
        near = watched.current().near(alert["source"]["ra"], alert["source"]["dec"])
        return {WATCHLIST_HEADER: json.dumps(near).encode()} if near else None

    return select


def _followup_request(config: PipelineConfig, alert: dict) -> list[OutMessage]:
    """The ``followup`` message of the request ``alert``'s candidate opened, if it opened one (else none).

    Made again when the alert is made again (a replay after a crash), in the same transaction as
    the alert, so a request is published exactly once with its alert. A request that no telescope
    may schedule (:func:`broker.followup.validate_request`: a band of no characters, a Dec of 1e6,
    a NaN request time, all from a ``scored`` record anyone may write) is not published: each
    telescope's listener would dead-letter it. The alerts go out all the same.
    """
    status = None if alert["followup"] is None else FollowupStatus.from_record(alert["followup"])
    if status is None or not opened_by(status, alert["objectId"], alert["candid"]):
        return []
    rule = config.followup.rule(status.rule)
    if rule is None:  # the rule was removed from the configuration since the score stage applied it
        log.warning("follow-up request %s: rule %r is no longer configured; not published", status.request_id,
                    status.rule)
        return []
    record = request_record(status, rule, alert, PUBLISHER)
    problems = validate_request(record)
    if problems:
        log.warning("follow-up request %s: no telescope may schedule it (%s); not published", status.request_id,
                    "; ".join(problems)[:400])
        return []
    return [request_message(record)]


def _sqlite_history(config: PipelineConfig) -> Path | None:
    """The score stage's state folder: the SQLite history's, None when the history is PostgreSQL's."""
    return None if config.history.dsn else config.state_dir


def _references(config: PipelineConfig) -> Path:
    """The subtract stage's reference store: ``<state_dir>/refs``."""
    return config.state_dir / "refs"


def _local_archive(config: PipelineConfig) -> Path | None:
    """The archive's folder, None when it lives in an object store (an fsspec URL)."""
    path = config.archive.path or str(config.state_dir / "archive")
    return None if "://" in path else Path(path)


#: The pipeline, in order: each stage consumes the previous stage's output.
STAGES: tuple[Stage, ...] = (
    Stage("ingest", topics.FRAMES, topics.INGESTED, ingest_handler,
          "fetch and decode the frame, validate it, measure its quality"),
    Stage("subtract", topics.INGESTED, topics.CANDIDATES, subtract_handler,
          "reference policy, ZOGY subtraction, >= 5 sigma detection, cutouts", state=lambda c: c.state_dir,
          references=_references),
    Stage("classify", topics.CANDIDATES, topics.CLASSIFIED, classify_handler,
          "real/bogus CNN score of each candidate"),
    Stage("score", topics.CLASSIFIED, topics.SCORED, score_handler,
          "object association, history, context, light-curve features and class, anomaly score, follow-up rules",
          state=_sqlite_history),
    Stage("alert", topics.SCORED, topics.ALERTS, alert_handler,
          "one Avro alert per candidate, in each alert topic's framing; the follow-up requests", alert_outputs=True),
    Stage("archive", topics.ALERTS, None, None,
          "every alert, cutouts included, into the Parquet archive, exactly once", kind="archive",
          state=_local_archive),
)
#: Stage names, in pipeline order.
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The stage called ``name``.

    Raises
    ------
    ConfigError
        No such stage.
    """
    for s in STAGES:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage {name!r}; one of {list(STAGE_NAMES)}")


def pipeline_topics(filters: tuple[str, ...], partitions: int = 1,
                    config: PipelineConfig | None = None) -> list[topics.TopicSpec]:
    """Every topic the pipeline reads or writes, for the given bands.

    Parameters
    ----------
    filters : tuple of str
        Bands of the per-filter alert topics (``<alert topic>.<filter>``).
    partitions : int
        Partitions of each topic.
    config : PipelineConfig, optional
        Gives the alert topics (default: the default configuration's, ``alerts``).
    """
    cfg = config or PipelineConfig()
    names = [STAGES[0].input] + [t for s in STAGES for t in s.outputs(cfg)]
    names += [topics.filter_topic(t.name, band) for s in STAGES if s.alert_outputs for t in cfg.alert_topics
              if t.per_filter for band in filters]
    names += [s.dead_letters for s in STAGES] + [topics.DLQ_FOLLOWUP]  # the telescopes' refused follow-up requests
    progress = [topics.TopicSpec(s.progress, partitions, config=topics.PROGRESS_CONFIG) for s in STAGES if s.progress]
    return [topics.TopicSpec(n, partitions) for n in names] + progress


def upstream_of(spec: Stage, config: PipelineConfig | None = None) -> tuple[str, ...]:
    """Topics a trusted lineage header on ``spec``'s input may name (:class:`streams.lineage.Deduplicator`).

    The inputs of the stages whose outputs ``spec`` consumes: ``("frames",)`` for subtract, ``()``
    for ingest, whose input comes from telescopes (no ``src`` is trusted there).
    """
    return tuple(s.input for s in STAGES if spec.input in s.outputs(config))


def stage_table_markdown() -> str:
    """The stage table of ``docs/architecture.md`` (a test checks that the document holds it)."""
    rows = ["| stage | consumes | produces | dead letters | what it does |", "|---|---|---|---|---|"]
    for s in STAGES:
        out = f"`{s.output}`, `{s.output}.<filter>` (default; `[[alert_topics]]`), `{topics.FOLLOWUP}`" \
            if s.alert_outputs \
            else f"`{s.output}`" if s.output else "Parquet archive (`[archive] path`, default `<state_dir>/archive`)"
        rows.append(f"| `{s.name}` | `{s.input}` | {out} | `{s.dead_letters}` | {s.summary} |")
    return "\n".join(rows)
