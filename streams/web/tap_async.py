"""Asynchronous TAP queries at ``/api/v1/tap/async``: the UWS 1.1 job resources of TAP 1.1.

TOPCAT's TAP window (asynchronous by default), pyvo (``TAPService.run_async``, ``submit_job``) and
STILTS (``tapquery`` without ``sync=true``) post a query as a job, run it, poll or block on its
phase (``WAIT``) and fetch its result:

- ``POST /async`` (the parameters of ``/sync``, and ``PHASE=RUN`` to run it at once): 303 to the
  job; ``GET /async``: the caller's jobs (``PHASE``, ``AFTER``, ``LAST`` filter them);
- ``GET /async/{id}``: the job document (``WAIT`` seconds, and ``PHASE``, block while it is in that
  phase, at most ``WebConfig.tap_job_wait_s``); ``DELETE``, or ``POST ACTION=DELETE``: 303 to the list;
- ``/phase`` (``POST PHASE=RUN`` or ``ABORT``), ``/executionduration``, ``/destruction``,
  ``/owner``, ``/parameters``, ``/results``, ``/results/result`` (the VOTable or CSV), ``/error``
  (the ERROR VOTable).

A job's uploaded tables (``UPLOAD``, in the multipart form of ``POST /async`` or of
``/parameters``, as pyvo's ``run_async(query, uploads=...)`` and ``job.upload`` send them) are
kept with it and read when it runs. Jobs are kept on disk and survive a restart of the portal
(:class:`streams.web.uws.JobFiles`: one queued or running then comes back in ``ERROR``).

A job runs as the synchronous query does (:func:`streams.web.tap.execute`: the same parsing,
check, translation, time and memory limits and VOTable), in the portal's pool, holding a slot of
costly work charged to its client (:mod:`streams.web.limits`), for which it waits ``QUEUED``. A
job is its client's (its token, else its address; :func:`streams.web.limits.client_key`): another
client's is 404, as an unknown one. The bounds on jobs are :class:`streams.web.uws.JobStore`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from broker.errors import Busy, InvalidQuery, NotFound, RateLimited
from streams.web import tap, uws
from streams.web.api import Reader, portal_of
from streams.web.app import Portal
from streams.web.limits import client_key
from streams.web.uws import Job, JobStore

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/tap/async", tags=["virtual observatory"])
TEXT_TYPE = "text/plain; charset=utf-8"
_XML: dict[int | str, dict[str, Any]] = {200: {"content": {tap.XML_TYPE: {}}}}


def job_store(portal: Portal) -> JobStore:
    """The portal's :class:`~streams.web.uws.JobStore`, made at first use (closed with the portal)."""
    store = portal.extras.get("tap_jobs")
    if store is None:
        store = portal.extras["tap_jobs"] = JobStore(portal.config)
    return store


def start(portal: Portal, store: JobStore, job: Job) -> None:
    """Queue a ``PENDING`` job to run (any other is left as it is: a second RUN runs nothing more)."""
    if job.phase != "PENDING":
        return
    job.move("QUEUED")
    job.task = asyncio.get_running_loop().create_task(_run(portal, store, job))


async def _run(portal: Portal, store: JobStore, job: Job) -> None:
    """Run ``job`` in a slot of costly work (waiting for one, ``QUEUED``), and record its outcome.

    A fault of ours ends it in ``ERROR`` (logged), never leaves it ``EXECUTING``.
    """
    try:
        await _work(portal, store, job)
    except Exception as exc:
        log.exception("TAP job %s failed", job.job_id)
        if job.phase not in uws.FINAL:
            message = f"internal error of the service ({type(exc).__name__}); it is logged"
            job.answer = tap.TapAnswer(tap.error_votable(InvalidQuery(message)), tap.VOTABLE_TYPE, message)
            job.move("ERROR")


async def _work(portal: Portal, store: JobStore, job: Job) -> None:
    params = {name: [value] for name, value in job.parameters.items()}
    while True:
        try:
            async with portal.limits.hold(job.owner):
                if job.phase != "QUEUED":  # aborted or deleted meanwhile
                    return
                job.move("EXECUTING")
                answer = await portal.run(tap.execute, portal, params, job.stop, job.execution_s, job.uploads)
            break
        except (RateLimited, Busy) as exc:  # the client's budget, or the server's slots: wait, as a request would
            await asyncio.sleep(exc.retry_after_s or 1.0)
    if job.phase != "EXECUTING":  # aborted or destroyed while its query ran: nothing is kept
        return
    if answer.error is None and not store.room_for(job, len(answer.body)):
        mb = portal.config.tap_job_results_mb
        message = (f"the result ({len(answer.body) / 2**20:.1f} MiB) would take the results kept for jobs past this "
                   f"service's {mb} MiB: delete finished jobs, or ask fewer rows (MAXREC) or columns")
        answer = tap.TapAnswer(tap.error_votable(InvalidQuery(message)), tap.VOTABLE_TYPE, message)
    await portal.run(store.keep_answer, job, answer)  # its bytes written to the job's folder
    if job.phase != "EXECUTING" or store.jobs.get(job.job_id) is not job:  # aborted or deleted meanwhile
        store.drop_answer(job)
        return
    job.move("ERROR" if answer.error is not None else "COMPLETED")


def _job_url(request: Request, job: Job) -> str:
    return str(request.url_for("async_job", job_id=job.job_id))


def _job(request: Request, job_id: str) -> Job:
    """The caller's job ``job_id`` (NotFound: unknown, destroyed or another client's)."""
    return job_store(portal_of(request)).get(job_id, client_key(request))


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


async def _set_value(request: Request, job_id: str, name: str,
                     setter: Callable[[JobStore, Job, str], None]) -> RedirectResponse:
    """Set the job's parameter ``name`` (its one value in the request) with ``setter``: 303 to the job."""
    found = _job(request, job_id)
    setter(job_store(portal_of(request)), found, _only(await tap.request_params(request), name))
    return _see_other(_job_url(request, found))


def _only(params: dict[str, list[str]], name: str) -> str:
    """The one value of a required parameter (InvalidQuery without it)."""
    value = tap._one(params, name)
    if value is None:
        raise InvalidQuery(f"{name} is required")
    return value


@router.post("", response_class=RedirectResponse, status_code=303, responses={
    303: {"description": "the job made: its URL"}, 409: {"description": "over the jobs kept"}})
async def create(request: Request, who: Reader) -> RedirectResponse:
    """Make a TAP job of the query's parameters (those of ``/sync``); ``PHASE=RUN`` runs it at once."""
    portal = portal_of(request)
    params, parts = await tap.request_form(request)
    phase = tap._one(params, "PHASE")
    if phase is not None and phase.upper() != "RUN":
        raise InvalidQuery(f"PHASE={phase[:40]!r}: a new job takes only PHASE=RUN")
    store = job_store(portal)
    job = store.create(client_key(request), who.name, params, parts)
    if phase is not None:
        start(portal, store, job)
    return _see_other(_job_url(request, job))


@router.get("", name="async_jobs", response_class=Response, responses=_XML)
async def jobs(request: Request, who: Reader) -> Response:
    """The caller's jobs, oldest first (UWS 1.1: ``PHASE`` any number of times, ``AFTER`` a time, ``LAST`` n)."""
    params = await tap.request_params(request)
    listed = job_store(portal_of(request)).owned(client_key(request))
    phases = {p.upper() for p in params.get("PHASE", [])}
    if phases - set(uws.PHASES):
        raise InvalidQuery(f"PHASE={sorted(phases - set(uws.PHASES))[0][:40]!r} is not a UWS phase")
    listed = [j for j in listed if not phases or j.phase in phases]
    if (after := tap._one(params, "AFTER")) is not None:
        listed = [j for j in listed if j.created > uws.parse_iso(after)]
    if (last := tap._one(params, "LAST")) is not None:
        if not last.isdigit() or len(last) > 9:
            raise InvalidQuery(f"LAST={last[:40]!r} is not a whole number >= 0")
        listed = sorted(listed, key=lambda j: j.created)[-int(last):] if int(last) else []
    return Response(uws.jobs_xml(listed, str(request.url_for("async_jobs"))), media_type=tap.XML_TYPE)


def _wait_s(text: str, most: float) -> float:
    """The seconds of a ``WAIT`` (-1: the most), at most ``most``."""
    try:
        wait = float(text)
    except ValueError:
        raise InvalidQuery(f"WAIT={text[:40]!r} is not a number of seconds") from None
    return most if wait < 0 or wait != wait else min(wait, most)


@router.get("/{job_id}", name="async_job", response_class=Response, responses=_XML)
async def job(request: Request, who: Reader, job_id: str) -> Response:
    """The UWS job document; with ``WAIT`` (and ``PHASE``), answered once the phase changes or the wait ends."""
    params = await tap.request_params(request)
    found = _job(request, job_id)
    wait = tap._one(params, "WAIT")
    phase = tap._one(params, "PHASE")
    if wait is not None and found.phase in uws.ACTIVE and (phase is None or phase.upper() == found.phase):
        changed = found.changed
        try:
            async with asyncio.timeout(_wait_s(wait, portal_of(request).config.tap_job_wait_s)):
                await changed.wait()
        except TimeoutError:
            pass
        found = _job(request, job_id)  # destroyed meanwhile: 404
    return Response(uws.job_xml(found, _job_url(request, found)), media_type=tap.XML_TYPE)


@router.delete("/{job_id}", response_class=RedirectResponse, status_code=303)
async def delete(request: Request, who: Reader, job_id: str) -> RedirectResponse:
    """Delete the job (aborted if it runs) and its result: 303 to the job list."""
    job_store(portal_of(request)).delete(_job(request, job_id))
    return _see_other(str(request.url_for("async_jobs")))


@router.post("/{job_id}", response_class=RedirectResponse, status_code=303)
async def post_job(request: Request, who: Reader, job_id: str) -> RedirectResponse:
    """``ACTION=DELETE``: delete the job, as ``DELETE`` does (303 to the list); nothing else is taken."""
    found = _job(request, job_id)
    action = _only(await tap.request_params(request), "ACTION")
    if action.upper() != "DELETE":
        raise InvalidQuery(f"ACTION={action[:40]!r}: a job takes ACTION=DELETE")
    return await delete(request, who, found.job_id)


@router.get("/{job_id}/phase", response_class=Response)
async def phase(request: Request, who: Reader, job_id: str) -> Response:
    """The job's phase, as text."""
    return Response(_job(request, job_id).phase, media_type=TEXT_TYPE)


@router.post("/{job_id}/phase", response_class=RedirectResponse, status_code=303)
async def set_phase(request: Request, who: Reader, job_id: str) -> RedirectResponse:
    """``PHASE=RUN`` (a PENDING job queued to run; else nothing) or ``ABORT``: 303 to the job."""
    found = _job(request, job_id)
    value = _only(await tap.request_params(request), "PHASE").upper()
    portal = portal_of(request)
    if value == "RUN":
        start(portal, job_store(portal), found)
    elif value == "ABORT":
        job_store(portal).abort(found)
    else:
        raise InvalidQuery(f"PHASE={value[:40]!r}: a job's phase is set to RUN or ABORT")
    return _see_other(_job_url(request, found))


@router.get("/{job_id}/executionduration", response_class=Response)
async def execution(request: Request, who: Reader, job_id: str) -> Response:
    """The longest the job's query runs (whole s; at most the service's ``tap_timeout_s``), as text."""
    return Response(f"{_job(request, job_id).execution_s:.0f}", media_type=TEXT_TYPE)


@router.post("/{job_id}/executionduration", response_class=RedirectResponse, status_code=303)
async def set_execution(request: Request, who: Reader, job_id: str) -> RedirectResponse:
    """``EXECUTIONDURATION`` (s) of a PENDING job, cut to the service's limit (0: the limit): 303 to the job."""
    return await _set_value(request, job_id, "EXECUTIONDURATION", JobStore.set_execution)


@router.get("/{job_id}/destruction", response_class=Response)
async def destruction(request: Request, who: Reader, job_id: str) -> Response:
    """When the job and its result are deleted (ISO 8601, UTC), as text."""
    return Response(uws.iso(_job(request, job_id).destruction), media_type=TEXT_TYPE)


@router.post("/{job_id}/destruction", response_class=RedirectResponse, status_code=303)
async def set_destruction(request: Request, who: Reader, job_id: str) -> RedirectResponse:
    """``DESTRUCTION`` (ISO 8601): not past, cut to ``tap_job_max_destruction_s`` after creation; 303 to the job."""
    return await _set_value(request, job_id, "DESTRUCTION", JobStore.set_destruction)


@router.get("/{job_id}/owner", response_class=Response)
async def owner(request: Request, who: Reader, job_id: str) -> Response:
    """The name of the token that made the job (``public`` without one), as text."""
    return Response(_job(request, job_id).owner_name, media_type=TEXT_TYPE)


@router.get("/{job_id}/quote", response_class=Response)
async def quote(request: Request, who: Reader, job_id: str) -> Response:
    """No estimate of when the job ends (UWS lets it be empty)."""
    _job(request, job_id)
    return Response("", media_type=TEXT_TYPE)


@router.get("/{job_id}/parameters", response_class=Response, responses=_XML)
async def parameters(request: Request, who: Reader, job_id: str) -> Response:
    """The job's TAP parameters (UWS ``parameters``)."""
    return Response(uws.parameters_xml(_job(request, job_id)), media_type=tap.XML_TYPE)


@router.post("/{job_id}/parameters", response_class=RedirectResponse, status_code=303)
async def set_parameters(request: Request, who: Reader, job_id: str) -> RedirectResponse:
    """Change a PENDING job's TAP parameters (``QUERY``, ``MAXREC``, ``FORMAT``, ``UPLOAD`` and its tables...): 303."""
    found = _job(request, job_id)
    params, parts = await tap.request_form(request)
    job_store(portal_of(request)).update(found, params, parts)
    return _see_other(_job_url(request, found))


@router.get("/{job_id}/results", response_class=Response, responses=_XML)
async def results(request: Request, who: Reader, job_id: str) -> Response:
    """The job's results (UWS ``results``): ``result`` once COMPLETED, none before."""
    found = _job(request, job_id)
    return Response(uws.results_xml(found, _job_url(request, found)), media_type=tap.XML_TYPE)


@router.get("/{job_id}/results/result", response_class=Response,
            responses={200: {"content": {tap.VOTABLE_TYPE: {}, tap.CSV_TYPE: {}}}})
async def result(request: Request, who: Reader, job_id: str) -> Response:
    """The COMPLETED job's result, the VOTable (or CSV) the synchronous query answers; 404 before."""
    found = _job(request, job_id)
    if found.phase != "COMPLETED" or found.answer is None:
        raise NotFound(f"job {job_id!r} is {found.phase}: it has a result once COMPLETED")
    return Response(found.answer.body, media_type=found.answer.media_type)


@router.get("/{job_id}/error", response_class=Response, responses={200: {"content": {tap.VOTABLE_TYPE: {}}}})
async def error(request: Request, who: Reader, job_id: str) -> Response:
    """The ERROR job's error: the VOTable with ``QUERY_STATUS`` ``ERROR`` and its reason; 404 in another phase."""
    found = _job(request, job_id)
    if found.phase != "ERROR" or found.answer is None:
        raise NotFound(f"job {job_id!r} is {found.phase}: it has an error document in phase ERROR")
    return Response(found.answer.body, media_type=found.answer.media_type)
