"""The five stages as message handlers: decode -> call the ``broker`` science -> encode.

Each handler is built once (loading models, opening stores) and called per message by
:class:`~streams.runner.StageRunner`; any exception it raises dead-letters the message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from broker.alert import FrameContext, build_alert
from broker.anomaly import AnomalyModel, features_from
from broker.config import PipelineConfig
from broker.errors import ChecksumMismatch, FrameTooLarge, InvalidFrame
from broker.frame import Frame, decode_fits, sha256
from broker.history import ObjectHistory
from broker.ingest import ingest
from broker.realbogus import RealBogusClassifier, ScoreConfig
from broker.reference import ReferenceStore
from broker.runtime import retain_freed_memory
from broker.subtract import subtract_and_detect
from streams import serde, topics
from streams.framestore import FrameStore
from streams.runner import EXPOSURE_END, TIMING_PREFIX, Handler, InMessage, OutMessage

#: Pipeline order: (stage, input topic).
STAGES: dict[str, str] = {
    "ingest": topics.FRAMES,
    "subtract": topics.INGESTED,
    "classify": topics.CANDIDATES,
    "score": topics.CLASSIFIED,
    "alert": topics.SCORED,
}
#: Topic every output of a stage goes to (the alert stage also copies each alert to
#: ``alerts.<filter>``); with the stage's dead-letter topic, what its restart guard reads back
#: (:class:`streams.lineage.Deduplicator`).
OUTPUTS: dict[str, str] = {
    "ingest": topics.INGESTED,
    "subtract": topics.CANDIDATES,
    "classify": topics.CLASSIFIED,
    "score": topics.SCORED,
    "alert": topics.ALERTS,
}


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


def _frame_of(msg: InMessage, store: FrameStore, config: PipelineConfig) -> tuple[dict, Frame]:
    rec = serde.decode("frame", msg.value, msg.headers)
    return rec, decode_fits(frame_payload(rec, store, config.max_frame_bytes))


def ingest_handler(config: PipelineConfig) -> Handler:
    store = FrameStore(config.frame_store)

    def handle(msg: InMessage) -> list[OutMessage]:
        rec, frame = _frame_of(msg, store, config)
        quality = ingest(frame, config.ingest)
        m = frame.meta
        rec.update(frame_id=m.frame_id, telescope=m.telescope, field=m.field, filter=m.filter,
                   mjd_start=m.mjd_start, exptime=m.exptime, quality=quality.to_record())
        return [OutMessage(topics.INGESTED, serde.encode("frame", rec), msg.key, _headers("frame"))]

    return handle


def _batch(frame: Frame, status: str, reference_frames=(), diagnostics=None, candidates=()) -> dict:
    m = frame.meta
    return {
        "frame_id": m.frame_id, "telescope": m.telescope, "field": m.field, "filter": m.filter,
        "mjd_start": m.mjd_start, "exptime": m.exptime, "magzp": m.magzp, "status": status,
        "reference_frames": list(reference_frames), "diagnostics": diagnostics or {}, "model_versions": {},
        "candidates": [serde.candidate_to_record(c) for c in candidates],
    }


def subtract_handler(config: PipelineConfig) -> Handler:
    if config.retain_freed_memory:
        retain_freed_memory()
    store = FrameStore(config.frame_store)
    refs = ReferenceStore(config.state_dir / "refs", config.reference)

    def handle(msg: InMessage) -> list[OutMessage]:
        rec, frame = _frame_of(msg, store, config)
        reference = refs.get(frame.meta.reference_key)
        if reference is None:
            if rec["quality"] and rec["quality"]["flags"]:
                batch = _batch(frame, "NO_REFERENCE")  # only clean frames build a reference
            else:
                reference = refs.offer(frame)
                batch = _batch(frame, "IN_REFERENCE" if reference else "REFERENCE_BUILDING",
                               reference.frame_ids if reference else ())
        elif frame.meta.frame_id in reference.frame_ids:
            batch = _batch(frame, "IN_REFERENCE", reference.frame_ids)
        else:
            result = subtract_and_detect(frame, reference, config.subtract)
            batch = _batch(frame, "SUBTRACTED", reference.frame_ids,
                           {k: float(v) for k, v in result.diagnostics.items()}, result.candidates)
        return [OutMessage(topics.CANDIDATES, serde.encode("candidates", batch), msg.key,
                           _headers("candidates"), candidates=len(batch["candidates"]))]

    return handle


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
    import torch

    torch.set_num_threads(config.torch_threads)
    model = RealBogusClassifier.load(config.rb_model, ScoreConfig(views=config.rb_views))

    def score(batch: dict, cands: list) -> None:
        model.score_candidates(cands)  # sets cand.rb; None where the cutouts cannot be normalised
        batch["model_versions"]["rb"] = model.version

    return _rescore(topics.CLASSIFIED, score)


def score_handler(config: PipelineConfig) -> Handler:
    history = ObjectHistory(config.state_dir / "history.sqlite", config.history)
    model = AnomalyModel.load(config.anomaly_model)

    def score(batch: dict, cands: list) -> None:
        history.associate(batch["frame_id"], batch["mjd_start"], batch["filter"], cands)
        feats = np.stack([features_from(c, c.history, batch["mjd_start"]) for c in cands])
        for cand, a in zip(cands, model.score(feats)):
            cand.anomaly = float(a)
        batch["model_versions"]["anomaly"] = model.version

    return _rescore(topics.SCORED, score)


def _timing(headers: dict[str, bytes], start: float) -> dict:
    stages = []
    for stage in STAGES:
        s, e = headers.get(f"{TIMING_PREFIX}{stage}.start"), headers.get(f"{TIMING_PREFIX}{stage}.end")
        if s and e:
            stages.append({"stage": stage, "start": float(s), "end": float(e)})
    stages.append({"stage": "alert", "start": start, "end": time.time()})
    end = headers.get(EXPOSURE_END)
    return {"exposure_end": float(end) if end else float("nan"), "stages": stages}


def alert_handler(config: PipelineConfig) -> Handler:
    def handle(msg: InMessage) -> list[OutMessage]:
        start = time.time()
        batch = serde.decode("candidates", msg.value, msg.headers)
        ctx = FrameContext(batch["frame_id"], batch["telescope"], batch["field"], batch["filter"],
                           batch["mjd_start"], batch["exptime"], batch["magzp"], tuple(batch["reference_frames"]))
        outs = []
        for rec in batch["candidates"]:
            cand = serde.record_to_candidate(rec)
            alert = build_alert(ctx, cand, batch["model_versions"], _timing(msg.headers, start), time.time())
            body = serde.encode_ocf("alert", alert)
            headers = {"_format": b"avro", serde.SCHEMA_HEADER: serde.schema_tag("alert").encode()}
            key = cand.obj.object_id.encode()
            outs.append(OutMessage(topics.ALERTS, body, key, headers))
            outs.append(OutMessage(topics.alerts_for_filter(ctx.filter), body, key, headers))
        return outs

    return handle


HANDLERS: dict[str, Callable[[PipelineConfig], Handler]] = {
    "ingest": ingest_handler,
    "subtract": subtract_handler,
    "classify": classify_handler,
    "score": score_handler,
    "alert": alert_handler,
}
