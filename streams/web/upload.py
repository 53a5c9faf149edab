"""``POST /api/v1/frames``: upload a FITS frame, published to the pipeline or processed at once (predict).

The body is either the FITS file itself (``Content-Type: application/fits``, ``image/fits`` or
``application/octet-stream``) or a ``multipart/form-data`` form with the part ``frame`` and,
for ``predict``, optional parts ``reference`` (up to :data:`MAX_REFERENCE_FRAMES` FITS frames of the same
telescope, field and band, co-added as the pipeline co-adds its references).
Its size is refused before it is read (:class:`streams.web.app.BodyLimit`, then a streaming cap
here); its pixels before they are decompressed (:func:`broker.frame.decode_fits` with the portal's
``max_upload_pixels`` and ``max_expansion``); then it is validated as ``broker produce`` validates
(:func:`broker.ingest.validate`, with the same errors).

- ``mode=publish`` sends it to the ``frames`` topic (:class:`streams.producer.FrameProducer`):
  the answer is the frame id to poll at ``GET /api/v1/frames/{frame_id}`` once its alerts are archived.
  Only a token bound to the frame's telescope may publish (:func:`streams.web.tokens.check_publish`,
  on the telescope the pipeline will record, after the header is normalised with its profiles); a
  token bound to none is refused before its body is read.
- ``mode=predict`` runs the stages' functions on it in this process, one frame at a time:
  :func:`broker.calibrate.calibrate` and :func:`broker.ingest.ingest` (as the ingest stage),
  :func:`broker.pipeline.process_frame` against the uploaded reference
  or the pipeline's stored one (``<state_dir>/refs``), real/bogus
  (:meth:`broker.realbogus.RealBogusClassifier.score_candidates`), then association and scores
  (:func:`broker.pipeline.associate_and_score`) in an in-memory history that holds a copy of the
  server's objects around the frame (:meth:`broker.history.ObjectHistory.copy_region`), so that
  a prediction sees the objects' light curves and never writes the pipeline's state; each
  candidate comes back with its object, previous detections, scores and cutouts as inline PNGs.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from broker.errors import (
    ConfigError,
    CorruptFrame,
    CutoutError,
    Forbidden,
    FrameTooLarge,
    InvalidQuery,
    MissingMetadata,
    RateLimited,
    ReferenceUnavailable,
    RequestTimeout,
    Unavailable,
    UnsupportedMediaType,
)
from broker.frame import Frame, decode_fits
from streams.web.api import frame_url
from streams.web.app import Portal
from streams.web.limits import RateLimiter  # shared with the limits of costly reads
from streams.web.records import clean
from streams.web.render import image_png
from streams.web.tokens import Principal, check_publish, require, unbound_message

router = APIRouter(prefix="/api/v1", tags=["upload"])
Uploader = Annotated[Principal, Depends(require("upload"))]
#: Content types of a raw FITS body.
FITS_TYPES = ("application/fits", "image/fits", "application/octet-stream")
#: Most ``reference`` parts of one upload: the frames co-added into its reference, as the pipeline's
#: ``[reference] n_frames`` (3 by default) co-adds its own, whose median clipping needs 3 or more.
MAX_REFERENCE_FRAMES = 5
_LOCK = threading.RLock()  # re-entrant: a shared object may be made of others (the publisher of the profiles)


def _shared(portal: Portal, name: str, make: Any) -> Any:
    """``portal.extras[name]``, made once by ``make()``."""
    with _LOCK:
        if name not in portal.extras:
            portal.extras[name] = make()
        return portal.extras[name]


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, read in chunks and refused (FrameTooLarge, HTTP 413) as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FrameTooLarge(f"upload over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


class _WholeForm(MultiPartParser):
    """Starlette's multipart parser, refusing a form that ends inside a part (its closing boundary missing).

    Starlette answered such a form without its last part, and left the part's spooled file open: it
    is added to the form only at the part's end, and closed only on a parse error (a
    ``ResourceWarning``, and a descriptor held until the parser is collected, for every cut form).
    """

    _open: Any = None  # the part begun and not ended (its UploadFile, or True for a field), None between parts

    def on_part_begin(self) -> None:
        """Start a part (Starlette's), noting that it is open."""
        super().on_part_begin()
        self._open = True

    def on_headers_finished(self) -> None:
        """Read a part's headers (Starlette's), noting its file, if it is one, so that it can be closed."""
        super().on_headers_finished()
        self._open = self._current_part.file or True

    def on_part_end(self) -> None:
        """End a part (Starlette's: it joins the form)."""
        super().on_part_end()
        self._open = None

    async def parse(self) -> FormData:
        """The form; :class:`InvalidQuery` when its last part never ends (its spooled file closed)."""
        form = await super().parse()
        if self._open is not None:
            if isinstance(self._open, UploadFile):
                self._open.file.close()
            await form.close()
            raise InvalidQuery("the form ends inside a part: its closing boundary is missing")
        return form


@contextlib.asynccontextmanager
async def read_form(request: Request, max_files: int, max_fields: int) -> AsyncIterator[FormData]:
    """The ``multipart/form-data`` form of ``request`` (:class:`_WholeForm`), closed on leaving.

    Raises
    ------
    InvalidQuery
        A malformed form (no boundary, too many files or fields, a part over 1 MiB that is not a
        file, cut inside a part), HTTP 400.
    """
    async with contextlib.aclosing(request.stream()) as stream:
        try:
            form = await _WholeForm(request.headers, stream, max_files=max_files, max_fields=max_fields).parse()
        except MultiPartException as exc:
            raise InvalidQuery(f"malformed form: {exc.message}") from exc
    try:
        yield form
    finally:
        await form.close()


async def _parts(form: Any, name: str, limit: int, most: int = 1) -> list[bytes]:
    """The bytes of the file parts ``name`` of a form (none when absent), at most ``most`` parts of ``limit`` bytes."""
    parts = form.getlist(name)
    if len(parts) > most:  # which one the caller meant is not ours to guess
        what = "one frame per request" if most == 1 else f"at most {most} frames"
        raise InvalidQuery(f"form field {name!r} given {len(parts)} times: upload {what}")
    out = []
    for part in parts:
        if not isinstance(part, UploadFile):
            raise InvalidQuery(f"form field {name!r} must be a file (a FITS frame)")
        data = await part.read(limit + 1)
        if len(data) > limit:
            raise FrameTooLarge(f"{name}: over the {limit}-byte limit")
        out.append(data)
    return out


async def read_upload(request: Request, limit: int) -> tuple[bytes, list[bytes]]:
    """(frame bytes, the reference frames' bytes, none when not given) of an upload, by its content type.

    Raises
    ------
    UnsupportedMediaType
        Neither FITS nor a multipart form (HTTP 415).
    FrameTooLarge
        A body or part over ``limit`` bytes (HTTP 413).
    CorruptFrame
        An empty frame (0 bytes).
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    frame: bytes | None = None
    references: list[bytes] = []
    if kind in FITS_TYPES:
        frame = await read_body(request, limit)
    elif kind == "multipart/form-data":
        # one file more than allowed, so that one reference too many is answered by _parts with its reason
        async with read_form(request, max_files=2 + MAX_REFERENCE_FRAMES, max_fields=4 + MAX_REFERENCE_FRAMES) as form:
            frames = await _parts(form, "frame", limit)
            references = await _parts(form, "reference", limit, MAX_REFERENCE_FRAMES)
        if not frames:
            raise InvalidQuery("the form needs a file part named 'frame'")
        frame = frames[0]
    else:
        raise UnsupportedMediaType(f"content type {kind or 'none'!r}: send the FITS file as application/fits, "
                                   "or a multipart/form-data form with the parts 'frame' (and 'reference')")
    if not frame:
        raise CorruptFrame("empty payload (0 bytes)")
    return frame, references


def _profiles(portal: Portal) -> tuple:
    """The telescope profiles of the pipeline's ``[ingest] telescopes_dir`` (loaded once)."""
    from broker.telescopes import load_profiles

    return _shared(portal, "profiles", lambda: load_profiles(portal.config.pipeline.ingest.telescopes_dir))


def decode_upload(portal: Portal, payload: bytes, telescope: str | None = None) -> Frame:
    """The frame of an upload, decoded and validated as ``broker produce`` does (the same errors).

    As the producer, a frame without a WCS is accepted when the ingest stage plate-solves
    (``[ingest.calibration] enabled``); one that has a WCS has it checked. ``telescope`` names the
    telescope of a header that names none (``broker produce --telescope``).
    """
    from broker.ingest import validate

    ingest = portal.config.ingest()
    require_wcs = not ingest.calibration.enabled
    try:
        frame = decode_fits(payload, ingest.max_pixels, ingest.max_expansion, _profiles(portal),
                            require_wcs=require_wcs, telescope=telescope)
    except MissingMetadata as exc:  # the portal's user can name it: say how
        if telescope is None and "TELESCOP" in str(exc):
            raise MissingMetadata(f"{exc}: name the telescope with ?telescope=NAME (on the upload page, the "
                                  "field 'telescope')") from exc
        raise
    validate(frame, ingest, require_wcs=require_wcs)
    return frame


def calibrated(portal: Portal, payload: bytes, telescope: str | None = None) -> Frame:
    """An uploaded frame as the ingest stage passes it on: decoded, validated, WCS and zero point calibrated."""
    from broker.calibrate import calibrate

    return calibrate(decode_upload(portal, payload, telescope), portal.config.ingest().calibration, _profiles(portal))


def publish(portal: Portal, who: Principal, payload: bytes, telescope: str | None = None) -> dict:
    """Validate and send an upload to the ``frames`` topic; the frame id to poll.

    The token ``who`` must be bound to the frame's telescope as the pipeline records it
    (``frame.meta.telescope``, decoded with the pipeline's profiles as ingest decodes it), so no
    spelling of a header's ``TELESCOP`` or ``INSTRUME`` can publish under a telescope it is not bound to.

    Raises
    ------
    Forbidden
        ``who`` is not bound to the frame's telescope, or the pipeline refuses it from this server.
    """
    frame = decode_upload(portal, payload, telescope)
    check_publish(who, frame.meta.telescope, _profiles(portal))
    _check_signed_for(portal, frame.meta.telescope)
    publisher = portal.extras.get("publisher") or _shared(portal, "publisher", lambda: _kafka_publisher(portal))
    sent = publisher(frame)
    return {"mode": "publish", "frame_id": sent.frame_id, "size_bytes": sent.size_bytes, "inline": sent.inline,
            "poll": frame_url(sent.frame_id)}


def _check_signed_for(portal: Portal, telescope: str) -> None:
    """Forbidden (HTTP 403) when the ingest stage would dead-letter this server's frames of ``telescope``.

    With ``[kafka.frame_auth] telescopes`` set, ingest refuses (``unauthorised``) a frame that this
    server's signer (``signer``, ``BROKER_FRAME_SIGNER``) may not send: answered 202 with a frame id
    to poll, it would never appear.
    """
    from streams.frame_auth import FrameSigner, may_sign

    kafka = portal.config.pipeline.kafka
    signer = _shared(portal, "signer", lambda: FrameSigner.load(kafka))
    if not may_sign(kafka, signer.principal if signer else None, telescope):
        who = f"as {signer.principal!r}" if signer else "unsigned"
        raise Forbidden(f"this server sends frames {who}, which the pipeline refuses for telescope {telescope!r} "
                        "([kafka.frame_auth] telescopes)")


def _kafka_publisher(portal: Portal) -> Any:
    """``publish(frame) -> Published`` over Kafka, as ``broker produce`` sends (frame store, limits, signing)."""
    from streams.frame_auth import FrameSigner
    from streams.framestore import FrameStore
    from streams.producer import FrameProducer
    from streams.settings import KafkaSettings

    cfg = portal.config
    if cfg.bootstrap is None:
        raise Unavailable("this server publishes no frames: start it with --bootstrap (or use mode=predict)")
    pipe = cfg.pipeline
    producer = FrameProducer(KafkaSettings.load(cfg.bootstrap, pipe), FrameStore(pipe.frame_store),
                             pipe.inline_limit_bytes, pipe.max_frame_bytes, cfg.ingest(), FrameSigner.load(pipe.kafka),
                             _profiles(portal))

    lock = threading.Lock()

    def send(frame: Frame) -> Any:
        with lock:  # one request's flush must not report (or swallow) another's undelivered frame
            sent = producer.publish_frame(frame)
            producer.flush(30.0)
        return sent

    return send


@router.post("/frames", status_code=202, responses={
    202: {"description": "published: the frame id to poll"}, 200: {"description": "predicted: candidates"},
    400: {"description": "not a usable FITS frame (the reason of `broker produce`)"},
    401: {"description": "no or bad token"},
    403: {"description": "token without scope upload; publish: a token bound to no telescope, or not to the "
                         "frame's, or a telescope the pipeline refuses from this server ([kafka.frame_auth])"},
    408: {"description": "the body did not arrive within upload_timeout_s"},
    413: {"description": "body or image too large"}, 415: {"description": "not FITS"},
    429: {"description": "over the token's uploads per minute, or its uploads in hand"}})
async def upload_frame(request: Request, who: Uploader,
                       mode: Annotated[Literal["publish", "predict"], Query(
                           description="publish: to the frames topic; predict: candidates and scores now")] = "predict",
                       telescope: Annotated[str | None, Query(
                           max_length=64, description="telescope (or profile) name of a frame whose header names "
                                                      "none (no TELESCOP, no INSTRUME)")] = None,
                       ) -> Any:
    """Upload one FITS frame: publish it to the pipeline, or predict its candidates with their scores.

    Publishing needs a token bound to the frame's telescope (``broker token add NAME --scope upload
    --telescope TELESCOPE``); any upload token may predict.
    """
    portal: Portal = request.app.state.portal
    named = _telescope(telescope)
    if mode == "publish" and not who.telescopes:  # refused before any byte of the body is read
        raise Forbidden(unbound_message(who.name))
    limiter = _shared(portal, "upload_limiter", lambda: RateLimiter(portal.config.uploads_per_minute))
    limiter.take(who.name)
    in_hand = _shared(portal, "uploads_in_hand", collections.Counter)  # per token; touched on the event loop only
    if in_hand[who.name] >= portal.config.uploads_in_flight:
        raise RateLimited(f"token {who.name!r} has {in_hand[who.name]} uploads in hand, the most one token may; "
                          "retry once one is answered", retry_after_s=10.0)
    in_hand[who.name] += 1
    try:
        return await _received(request, portal, who, mode, named)
    finally:
        in_hand[who.name] -= 1


async def _received(request: Request, portal: Portal, who: Principal, mode: str, named: str | None) -> Any:
    """Read the upload's body (within ``upload_timeout_s``), then publish or predict it."""
    try:
        async with asyncio.timeout(portal.config.upload_timeout_s):
            frame_bytes, references = await read_upload(request, portal.config.max_upload_bytes)
    except TimeoutError:
        raise RequestTimeout(f"the upload's body did not arrive within {portal.config.upload_timeout_s:g} s") from None
    if mode == "publish":
        if references:
            raise InvalidQuery("a reference is only used by mode=predict")
        return clean(await portal.run(publish, portal, who, frame_bytes, named))
    pool = _shared(portal, "predict_pool", lambda: ThreadPoolExecutor(1, thread_name_prefix="predict"))
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(pool, predict, portal, frame_bytes, references, named)
    return JSONResponse(clean(result), status_code=200)


def _telescope(value: str | None) -> str | None:
    """The ``telescope`` parameter as a header value (None when not given); InvalidQuery when it names none."""
    from broker.headers import telescope_name

    if value is None or not value.strip():
        return None
    try:
        return telescope_name(value)
    except ConfigError as exc:
        raise InvalidQuery(str(exc)) from exc


def _reference(portal: Portal, frame: Frame, references: list[bytes],
               telescope: str | None = None) -> tuple[Any, str]:
    """The reference to subtract ``frame`` with, and where it came from (``upload`` or ``stored``).

    Uploaded reference frames are co-added as the pipeline co-adds the frames of its references
    (:func:`broker.reference.build_reference`, with its ``[reference]`` settings).
    """
    from broker.reference import ReferenceStore, build_reference

    key = frame.meta.reference_key
    if references:
        ref_frames: list[Frame] = []
        for i, payload in enumerate(references):
            which = "the reference" if len(references) == 1 else f"reference {i + 1}"
            ref_frames.append(_distinct(frame, _reference_frame(portal, payload, key, which, telescope), ref_frames))
        return build_reference(ref_frames, portal.config.pipeline.reference), "upload"
    root = portal.config.references_dir
    stored = ReferenceStore(root, portal.config.pipeline.reference).get(key) if root and root.is_dir() else None
    if stored is None:
        raise ReferenceUnavailable(f"no stored reference of {key} on this server: upload one as the form part "
                                   "'reference'")
    return stored, "stored"


def _reference_frame(portal: Portal, payload: bytes, key: tuple, which: str, telescope: str | None) -> Frame:
    """An uploaded reference frame, calibrated as the frame is, of the frame's ``key``.

    Its refusals name it (``which``: "the reference", "reference 2"), as the same error of the
    frame would read the same and leave the user to guess which file was refused.

    Raises
    ------
    ReferenceUnavailable
        The reference is of another (telescope, field, band), or too little of it is usable
        (:func:`broker.reference.check_usable`: NaN, saturated, constant).
    BrokerError
        Of :func:`calibrated`, its message prefixed with ``which``.
    """
    from broker.errors import BrokerError
    from broker.reference import check_usable

    try:
        ref_frame = calibrated(portal, payload, telescope)
        check_usable(ref_frame, portal.config.pipeline.reference)
    except BrokerError as exc:
        exc.args = (f"{which}: {exc}", *exc.args[1:])
        raise
    if tuple(ref_frame.meta.reference_key) != tuple(key):
        raise ReferenceUnavailable(f"{which} is of {ref_frame.meta.reference_key}, the frame of {tuple(key)} "
                                   "(telescope, field, band must agree)")
    return ref_frame


def _distinct(frame: Frame, ref_frame: Frame, others: Sequence[Frame] = ()) -> Frame:
    """An uploaded reference frame, under an id of its own when it shares the frame's (or ``others``') id.

    A header without ``FRAMEID`` gets its id from telescope, field, band and MJD
    (:func:`broker.frame.meta_from_header`), so two exposures whose headers claim the same start
    (SFFT's DECam cut-outs all carry the science's ``MJD-OBS``) share an id, and
    :func:`broker.pipeline.process_frame` would take the frame for part of its reference
    (``IN_REFERENCE``) and subtract nothing. Only the same pixels make them one frame.

    Raises
    ------
    ReferenceUnavailable
        The reference is the frame itself, whatever its id: the same pixels up to a gain and a
        pedestal, to within :data:`broker.exposure.SAME_WITHIN_SIGMA` of their noise at every pixel
        (:func:`broker.exposure.same_exposure`; a lossy-compressed copy: fpack's default
        quantisation keeps each pixel to ~1/16 of the noise, and SFFT's DEC-OBS04a against its
        fpacked copy gave 29 candidates).
    """
    from broker.exposure import SAME_WITHIN_SIGMA, pixel_noise, same_exposure

    if same_exposure(frame.data, ref_frame.data, pixel_noise(frame.data)):
        raise ReferenceUnavailable(f"the reference is the frame itself ({frame.meta.frame_id}: the same pixels, up to "
                                   f"a gain and a pedestal, to within {SAME_WITHIN_SIGMA:g} sigma of their noise): "
                                   "upload an earlier exposure of the field as the reference")
    taken = {f.meta.frame_id for f in others}
    if ref_frame.meta.frame_id != frame.meta.frame_id and ref_frame.meta.frame_id not in taken:
        return ref_frame
    taken.add(frame.meta.frame_id)
    names = (f"{ref_frame.meta.frame_id}/reference" + (f"-{n}" if n > 1 else "") for n in range(1, len(taken) + 2))
    name = next(n for n in names if n not in taken)
    return Frame(replace(ref_frame.meta, frame_id=name), ref_frame.data, ref_frame.header)


def predict(portal: Portal, frame_bytes: bytes, references: list[bytes], telescope: str | None = None) -> dict:
    """Candidates of an uploaded frame with real/bogus, class and anomaly scores (the stages' functions)."""
    from broker.ingest import ingest
    from broker.pipeline import SUBTRACTED, FixedReference, process_frame

    t0 = time.perf_counter()
    frame = calibrated(portal, frame_bytes, telescope)
    pipe = portal.config.pipeline
    quality = ingest(frame, portal.config.ingest())
    reference, source = _reference(portal, frame, references, telescope)
    skip = [f for f in quality.flags if f in pipe.ingest.subtract_skip_on]
    result = process_frame(frame, FixedReference(reference), pipe.subtract, not quality.flags, None, skip)
    t1 = time.perf_counter()
    models, known = (_score(portal, frame, result.candidates, result.limiting_flux) if result.status == SUBTRACTED
                     else ({}, 0))
    m = frame.meta
    return {"mode": "predict", "frame_id": m.frame_id, "telescope": m.telescope, "field": m.field, "band": m.filter,
            "mjd": m.mjd_start, "shape": list(frame.shape), "status": result.status, "quality_flags": quality.flags,
            "reference": {"source": source, "frame_ids": list(result.reference_frames),
                          "omitted": [{"frame_id": f, "reason": why} for f, why in reference.omitted]},
            "limiting_flux": result.limiting_flux, "note": _note(result), "models": models, "known_objects": known,
            "candidates": [_candidate(c) for c in result.candidates],
            "timing_s": {"subtract": t1 - t0, "score": time.perf_counter() - t1}}


def _note(result: Any) -> str | None:
    """Why a frame was not subtracted (None when it was): its answer's empty candidates are no measurement."""
    from broker.pipeline import IN_REFERENCE, SUBTRACTED

    if result.status == SUBTRACTED:
        return None
    if result.status == IN_REFERENCE:
        return (f"not subtracted: the frame is one of the reference's frames ({', '.join(result.reference_frames)}), "
                "under its id or as the same exposure under another, so nothing was looked for; upload a later "
                "exposure of the field")
    return f"not subtracted ({result.status}): nothing was looked for"


def _score(portal: Portal, frame: Frame, candidates: list, limiting_flux: float | None) -> tuple[dict, int]:
    """Real/bogus, then association and scores: the model versions used, and the server's objects copied.

    The candidates are associated in a history of the prediction's own, holding a copy of the
    server's objects around them (:func:`_known_objects`): an upload of a field the pipeline
    already watches gets its objects' light curves, features and classes, and the server's
    history is only read.
    """
    from broker.history import ObjectHistory
    from broker.pipeline import ScoreModels, associate_and_score

    pipe = portal.config.pipeline
    versions: dict[str, Any] = {}
    try:
        from broker.realbogus import RealBogusClassifier, ScoreConfig

        clf = _shared(portal, "rb_model", lambda: RealBogusClassifier.load(pipe.rb_model,
                                                                           ScoreConfig(views=pipe.rb_views)))
        clf.score_candidates(candidates)
        versions["rb"] = clf.version
    except ImportError:
        versions["rb"] = None  # no torch: rb stays null, as without the classify stage
    models = _shared(portal, "score_models", lambda: ScoreModels.load(
        pipe.anomaly_model, pipe.lcclass_model, pipe.openngc, pipe.context, pipe.moving))
    history = ObjectHistory(":memory:", pipe.history)
    try:
        known = _known_objects(portal, frame, candidates, history, models.moving.search_radius_deg())
        m = frame.meta
        associate_and_score(history, models, m.frame_id, m.mjd_start, m.filter, candidates, m.magzp, limiting_flux,
                            m.telescope, frame.shape)
    finally:
        history.close()
    versions.update(anomaly=models.anomaly.version, lcclass=models.lcclass.version)
    return versions, known


def _known_objects(portal: Portal, frame: Frame, candidates: list, into: Any, margin_deg: float) -> int:
    """Copy the server's objects within ``margin_deg`` of the candidates into ``into``; how many were copied."""
    import numpy as np
    from astropy.coordinates import SkyCoord

    from broker.headers import wcs_centre

    centre = wcs_centre(frame.header, frame.shape)
    if centre is None or not candidates:
        return 0
    positions = SkyCoord([c.detection.ra for c in candidates], [c.detection.dec for c in candidates], unit="deg")
    spread = float(np.nanmax(SkyCoord(*centre, unit="deg").separation(positions).deg, initial=0.0))
    with portal.history() as known:
        return 0 if known is None else known.copy_region(into, *centre, spread + margin_deg)


def _png_uri(data: Any, diverging: bool) -> str | None:
    try:
        return "data:image/png;base64," + base64.b64encode(image_png(data, diverging)).decode()
    except CutoutError:  # an all-NaN stamp: no picture, the candidate still listed
        return None


def _candidate(cand: Any) -> dict:
    """A predicted candidate: its measurement, scores, context and cutouts (inline PNGs)."""
    det = {k: v for k, v in asdict(cand.detection).items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {"cand_id": cand.cand_id, **det, "object": asdict(cand.obj) if cand.obj else None,
            "history": cand.history, "rb": cand.rb, "anomaly": cand.anomaly,
            "classification": cand.classification, "features": cand.features, "context": cand.context,
            "cutouts": {"science": _png_uri(cand.science, False), "reference": _png_uri(cand.reference, False),
                        "difference": _png_uri(cand.difference, True)}}
