"""Asynchronous TAP jobs as IVOA's Universal Worker Service (UWS 1.1) has them: the jobs kept, bounded, and their XML.

A job is made by ``POST /api/v1/tap/async`` (:mod:`streams.web.tap_async`), kept by the portal's
:class:`JobStore` in memory and in ``WebConfig.tap_jobs_dir`` (:class:`JobFiles`: the jobs survive a
restart of the portal) and run by it on request (``PHASE=RUN``) through the same path as a
synchronous query (:func:`streams.web.tap.execute`). Its phases: ``PENDING`` (made, not run),
``QUEUED`` (waiting for a slot of costly work), ``EXECUTING``, then ``COMPLETED`` (a result),
``ERROR`` (the ERROR VOTable) or ``ABORTED``. Everything kept is bounded: the jobs of all clients
(``WebConfig.tap_jobs``) and of one (``tap_jobs_per_client``), 409 beyond (:class:`~broker.errors.JobQuota`);
the bytes of the results (``tap_job_results_mb``), a result past them ending its job in ``ERROR``;
each parameter's length, and its uploaded tables (``UPLOAD``: at most
:data:`~streams.web.tap_upload.MAX_UPLOAD_BYTES`, counted with the results); and each job's life,
destroyed at its destruction time (``tap_job_destruction_s`` after its creation by default) by a
timer of the event loop, and checked again at every use of the store.

A job's folder holds ``job.json`` (its parameters, phase, times, owner and error), its result's
bytes and its uploaded tables, written as they change (each file replaced whole). When the portal
starts it reads them back: a job past its destruction time is deleted, one ``QUEUED`` or
``EXECUTING`` when the portal stopped (its query was not finished) comes back in ``ERROR`` saying
so (it is not run again: the client runs a new job), the others as they were, within the bounds
above (the oldest dropped beyond them). A folder that cannot be read is logged and left out.

Only the event loop touches the store (no lock): the work runs in the portal's pool and its
outcome is recorded when the loop resumes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from broker.errors import InvalidQuery, JobQuota, NotFound
from streams.web.adql import MAX_QUERY_CHARS
from streams.web.config import WebConfig
from streams.web.tap import VOTABLE_TYPE, Stop, TapAnswer, error_votable
from streams.web.tap_upload import MAX_UPLOAD_BYTES, MAX_UPLOADS

log = logging.getLogger(__name__)

#: The phases of UWS 1.1; a job here is in one of the first six.
PHASES = ("PENDING", "QUEUED", "EXECUTING", "COMPLETED", "ERROR", "ABORTED", "UNKNOWN", "HELD", "SUSPENDED",
          "ARCHIVED")
#: Phases a job leaves no more.
FINAL = frozenset({"COMPLETED", "ERROR", "ABORTED"})
#: Phases a blocking GET (``WAIT``) waits in.
ACTIVE = frozenset({"PENDING", "QUEUED", "EXECUTING"})
#: The TAP parameters a job keeps (names upper-cased, DALI); others are ignored, as DALI asks.
KEPT = ("REQUEST", "LANG", "QUERY", "MAXREC", "FORMAT", "RESPONSEFORMAT", "UPLOAD", "RUNID")
#: Longest value of a kept parameter other than ``QUERY`` (characters).
MAX_VALUE_CHARS = 256
#: A job's id: 16 hex digits (64 random bits).
ID_CHARS = 16
_ID = re.compile(f"[0-9a-f]{{{ID_CHARS}}}")
UWS_NS = "http://www.ivoa.net/xml/UWS/v1.0"
_XMLNS = f'xmlns:uws="{UWS_NS}" xmlns:xlink="http://www.w3.org/1999/xlink" ' \
         'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'


def iso(t: float | None) -> str | None:
    """A Unix time (s) as UWS writes it (ISO 8601, UTC, milliseconds); None stays None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(text: str) -> float:
    """A Unix time (s) of an ISO 8601 time (``Z``, an offset or none: UTC); InvalidQuery otherwise."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidQuery(f"{text[:60]!r} is not an ISO 8601 time (e.g. 2026-12-07T15:00:00Z)") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def kept_parameters(params: dict[str, list[str]]) -> dict[str, str]:
    """The TAP parameters of a job's request (the first value of each of :data:`KEPT`), checked for length.

    Raises
    ------
    InvalidQuery
        A ``QUERY`` over :data:`~streams.web.adql.MAX_QUERY_CHARS` characters or another value over
        :data:`MAX_VALUE_CHARS` (HTTP 400: a job keeps its parameters for its whole life).
    """
    kept = {name: params[name][0] for name in KEPT if params.get(name)}
    for name, value in kept.items():
        most = MAX_QUERY_CHARS if name == "QUERY" else MAX_VALUE_CHARS
        if len(value) > most:
            raise InvalidQuery(f"{name} is {len(value)} characters; a job keeps at most {most}")
    return kept


@dataclass
class Job:
    """One asynchronous query: who made it, its parameters, its phase and times (Unix s), its outcome."""

    job_id: str
    owner: str
    owner_name: str
    parameters: dict[str, str]
    created: float
    destruction: float
    execution_s: float
    phase: str = "PENDING"
    started: float | None = None
    ended: float | None = None
    answer: TapAnswer | None = None
    uploads: dict[str, bytes] = field(default_factory=dict)
    stop: Stop = field(default_factory=Stop)
    task: asyncio.Task[None] | None = None
    reaper: asyncio.TimerHandle | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    saved: Callable[[Job], None] | None = None

    def move(self, phase: str, now: float | None = None) -> None:
        """Enter ``phase`` (its start or end time set, the job saved), waking the requests waiting for a change."""
        now = time.time() if now is None else now
        self.phase = phase
        if phase == "EXECUTING":
            self.started = now
        elif phase in FINAL:
            self.ended = now
        if self.saved is not None:
            self.saved(self)
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def result_bytes(self) -> int:
        """Bytes the job's outcome holds."""
        return len(self.answer.body) if self.answer is not None else 0

    @property
    def held_bytes(self) -> int:
        """Bytes the job keeps: its outcome and its uploaded tables."""
        return self.result_bytes + sum(len(data) for data in self.uploads.values())


class JobFiles:
    """The jobs' folders in ``directory`` (see the module's notes): each job's state, result and uploads.

    Parameters
    ----------
    directory : Path
        ``WebConfig.tap_jobs_dir``; made when the first job is saved.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _replace(self, path: Path, data: bytes) -> None:
        """Write ``path`` whole (a temporary file renamed over it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)

    def save(self, job: Job, answer: bool = False, uploads: bool = False, state: bool = True) -> None:
        """Write ``job.json`` (and its result's bytes, its uploaded tables); an OSError is logged, the job kept."""
        folder = self.directory / job.job_id
        try:
            if uploads:
                for index, data in enumerate(job.uploads.values()):
                    self._replace(folder / f"upload-{index}", data)
            if answer and job.answer is not None:
                self._replace(folder / "result", job.answer.body)
            if state:
                self._replace(folder / "job.json", json.dumps(_state(job)).encode())
        except OSError as exc:
            log.warning("TAP job %s not saved in %s: %s", job.job_id, folder, exc)

    def remove(self, job_id: str) -> None:
        """Delete a job's folder (nothing when it has none)."""
        shutil.rmtree(self.directory / job_id, ignore_errors=True)

    def load(self) -> list[Job]:
        """The jobs saved, oldest first; a folder that cannot be read is logged and left out."""
        if not self.directory.is_dir():
            return []
        jobs = []
        for folder in sorted(self.directory.iterdir()):
            if not (_ID.fullmatch(folder.name) and folder.is_dir()):
                continue
            if not (folder / "job.json").is_file():  # a job made as the portal stopped, before its state was written
                self.remove(folder.name)
                continue
            try:
                jobs.append(_job_of(folder))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("TAP job folder %s not read, left out: %s", folder, exc)
        return sorted(jobs, key=lambda j: j.created)


def _state(job: Job) -> dict[str, Any]:
    """What ``job.json`` keeps of a job."""
    return {"job_id": job.job_id, "owner": job.owner, "owner_name": job.owner_name, "parameters": job.parameters,
            "created": job.created, "destruction": job.destruction, "execution_s": job.execution_s,
            "phase": job.phase, "started": job.started, "ended": job.ended,
            "answer": None if job.answer is None else {"media_type": job.answer.media_type, "error": job.answer.error},
            "uploads": list(job.uploads)}


def _job_of(folder: Path) -> Job:
    """The job saved in ``folder`` (ValueError, KeyError, TypeError or OSError when it is not one)."""
    state = json.loads((folder / "job.json").read_text())
    if state["job_id"] != folder.name or state["phase"] not in PHASES[:6] or len(state["uploads"]) > MAX_UPLOADS:
        raise ValueError("job.json does not describe this folder's job")
    parameters = {str(k): str(v) for k, v in state["parameters"].items() if k in KEPT}
    uploads = {str(part): (folder / f"upload-{i}").read_bytes()[:MAX_UPLOAD_BYTES]
               for i, part in enumerate(state["uploads"])}
    job = Job(folder.name, str(state["owner"]), str(state["owner_name"]), parameters, float(state["created"]),
              float(state["destruction"]), float(state["execution_s"]), str(state["phase"]),
              _time(state["started"]), _time(state["ended"]), uploads=uploads)
    if state["answer"] is not None and job.phase in ("COMPLETED", "ERROR"):
        media_type, error = str(state["answer"]["media_type"]), state["answer"]["error"]
        if (folder / "result").is_file():
            job.answer = TapAnswer((folder / "result").read_bytes(), media_type, None if error is None else str(error))
        else:  # the portal stopped before the result was written
            message = "the result of this job was not kept when the portal stopped; run it again as a new job"
            job.answer, job.phase = TapAnswer(error_votable(InvalidQuery(message)), VOTABLE_TYPE, message), "ERROR"
    return job


def _time(value: Any) -> float | None:
    return None if value is None else float(value)

class JobStore:
    """The portal's jobs, bounded in number (in all and per client), in result bytes and in life.

    Parameters
    ----------
    config : WebConfig
        ``tap_jobs``, ``tap_jobs_per_client``, ``tap_job_results_mb``, ``tap_job_destruction_s``,
        ``tap_job_max_destruction_s``, ``tap_timeout_s`` (a job's execution duration) and
        ``tap_jobs_dir`` (the jobs saved there are read back now; None: kept in memory only).
    clock : callable
        The time now (Unix s); ``time.time`` by default.
    """

    def __init__(self, config: WebConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.files = JobFiles(config.tap_jobs_dir) if config.tap_jobs_dir is not None else None
        self._restore()

    def _restore(self) -> None:
        """Take back the jobs saved (see the module's notes), newest first while within the bounds."""
        if self.files is None:
            return
        now, held = self.clock(), 0
        owners: dict[str, int] = {}
        for job in reversed(self.files.load()):
            within = (len(self.jobs) < self.config.tap_jobs and held + job.held_bytes <= self.config.tap_job_results_mb
                      * 2**20 and owners.get(job.owner, 0) < self.config.tap_jobs_per_client)
            if job.destruction <= now or not within:
                self.files.remove(job.job_id)
                continue
            if job.phase in ("QUEUED", "EXECUTING"):
                message = (f"the portal stopped while this job was {job.phase}: its query did not finish; "
                           "run it again as a new job")
                job.answer = TapAnswer(error_votable(InvalidQuery(message)), VOTABLE_TYPE, message)
                job.phase, job.ended = "ERROR", now
                self.files.save(job, answer=True)
            owners[job.owner] = owners.get(job.owner, 0) + 1
            held += job.held_bytes
            job.saved = self._save
            self.jobs[job.job_id] = job
        self.jobs = dict(sorted(self.jobs.items(), key=lambda item: item[1].created))
        for job in self.jobs.values():
            self._reap_at(job)

    def _save(self, job: Job) -> None:
        """Write the job's state (with its result once ended, if not yet written)."""
        if self.files is not None:
            self.files.save(job, answer=job.phase in FINAL and job.answer is not None
                            and not (self.files.directory / job.job_id / "result").is_file())

    def keep_answer(self, job: Job, answer: TapAnswer) -> None:
        """Hold ``answer`` as the job's, its bytes written to its folder (in the pool: a result is megabytes).

        Its state is written when it enters its phase, on the event loop (:meth:`Job.move`).
        """
        job.answer = answer
        if self.files is not None:
            self.files.save(job, answer=True, state=False)

    def drop_answer(self, job: Job) -> None:
        """Forget the answer of a job aborted or deleted while it was kept (its bytes on disk with it)."""
        job.answer = None
        if self.files is not None:
            if self.jobs.get(job.job_id) is job:
                (self.files.directory / job.job_id / "result").unlink(missing_ok=True)
                self.files.save(job)
            else:
                self.files.remove(job.job_id)

    def create(self, owner: str, owner_name: str, params: dict[str, list[str]],
               uploads: dict[str, bytes] | None = None) -> Job:
        """A new ``PENDING`` job of ``owner`` (a client key) with the request's TAP parameters and uploaded tables.

        ``uploads`` are the request's parts by name (those ``UPLOAD`` names are kept, read when it runs).

        Raises
        ------
        JobQuota
            The owner, or the server, keeps the most jobs it may, or the uploads would take the
            bytes kept for jobs past ``tap_job_results_mb`` (HTTP 409).
        InvalidQuery
            A parameter too long (:func:`kept_parameters`), uploads over their bound.
        """
        kept = kept_parameters(params)
        tables = named_uploads(kept.get("UPLOAD"), uploads or {})
        self.expire()
        mine = sum(1 for job in self.jobs.values() if job.owner == owner)
        if mine >= self.config.tap_jobs_per_client:
            raise JobQuota(f"you keep {mine} TAP jobs, the most one client may (tap_jobs_per_client); delete one "
                           "(DELETE /api/v1/tap/async/{id}) or wait for its destruction")
        if len(self.jobs) >= self.config.tap_jobs:
            raise JobQuota(f"this server keeps {len(self.jobs)} TAP jobs, the most it takes (tap_jobs); retry "
                           "once some are deleted or destroyed, or query synchronously (/api/v1/tap/sync)")
        self._room_for_uploads(None, tables)
        now = self.clock()
        job = Job(secrets.token_hex(ID_CHARS // 2), owner, owner_name, kept, now,
                  now + self.config.tap_job_destruction_s, self.config.tap_timeout_s, uploads=tables)
        job.saved = self._save
        self.jobs[job.job_id] = job
        if self.files is not None:
            self.files.save(job, uploads=True)
        self._reap_at(job)
        return job

    def _room_for_uploads(self, job: Job | None, tables: dict[str, bytes]) -> None:
        """JobQuota unless ``tables`` (``job``'s new uploads) keep the bytes held within ``tap_job_results_mb``."""
        held = sum(j.held_bytes for j in self.jobs.values() if j is not job)
        size = sum(len(data) for data in tables.values())
        if size and held + size > self.config.tap_job_results_mb * 2**20:
            raise JobQuota(f"the uploaded tables ({size / 2**20:.1f} MiB) would take the bytes kept for jobs past "
                           f"this service's {self.config.tap_job_results_mb} MiB (tap_job_results_mb): delete "
                           "finished jobs, or query synchronously (/api/v1/tap/sync)")

    def _reap_at(self, job: Job) -> None:
        """Have the event loop destroy the store's expired jobs at ``job``'s destruction (none without a loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # used outside the application: destroyed at the next use of the store
        if job.reaper is not None:
            job.reaper.cancel()
        job.reaper = loop.call_later(max(job.destruction - self.clock(), 0.0), self.expire)

    def update(self, job: Job, params: dict[str, list[str]], uploads: dict[str, bytes] | None = None) -> None:
        """Change a PENDING job's TAP parameters (and ``RUNID``) to those given; others are kept.

        ``uploads`` are the request's parts: with the tables sent before, those its ``UPLOAD`` names are kept.

        Raises
        ------
        InvalidQuery
            The job no longer PENDING, or a parameter too long (HTTP 400).
        JobQuota
            The uploads past the bytes kept for jobs (HTTP 409).
        """
        kept = kept_parameters(params)
        if job.phase != "PENDING":
            raise InvalidQuery(f"the job is {job.phase}: its parameters are set only while PENDING")
        tables = named_uploads({**job.parameters, **kept}.get("UPLOAD"), {**job.uploads, **(uploads or {})})
        self._room_for_uploads(job, tables)
        job.parameters.update(kept)
        job.uploads = tables
        if self.files is not None:
            self.files.save(job, uploads=True)

    def get(self, job_id: str, owner: str) -> Job:
        """The job ``job_id`` of ``owner``: NotFound (HTTP 404) for an unknown id, a destroyed job, or another's."""
        self.expire()
        job = self.jobs.get(job_id)
        if job is None or job.owner != owner:
            raise NotFound(f"no TAP job {job_id[:40]!r} of yours (unknown, deleted or destroyed)")
        return job

    def owned(self, owner: str) -> list[Job]:
        """The jobs of ``owner``, oldest first."""
        self.expire()
        return [job for job in self.jobs.values() if job.owner == owner]

    def delete(self, job: Job) -> None:
        """Abort ``job`` if it runs, and forget it and its result."""
        if job.phase not in FINAL:
            self.abort(job)
        if job.reaper is not None:
            job.reaper.cancel()
        self.jobs.pop(job.job_id, None)
        if self.files is not None:
            self.files.remove(job.job_id)

    def abort(self, job: Job) -> None:
        """End a job not yet ended in ``ABORTED``, interrupting its query (a finished job is left as it is)."""
        if job.phase in FINAL:
            return
        job.stop.request()
        if job.task is not None and job.phase in ("PENDING", "QUEUED"):
            job.task.cancel()  # waiting for a slot: no query of it runs
        job.move("ABORTED", self.clock())

    def expire(self) -> None:
        """Destroy the jobs whose destruction time has passed."""
        now = self.clock()
        for job in [j for j in self.jobs.values() if j.destruction <= now]:
            self.delete(job)

    def set_destruction(self, job: Job, text: str) -> None:
        """Move ``job``'s destruction to the ISO 8601 time ``text``, between now and the longest allowed.

        Raises
        ------
        InvalidQuery
            Not a time, or a time past (HTTP 400); a time later than ``tap_job_max_destruction_s``
            after its creation is cut to it, as UWS lets a server do.
        """
        when = parse_iso(text)
        if when <= self.clock():
            raise InvalidQuery(f"DESTRUCTION={text[:60]!r} is past; delete the job instead "
                               "(DELETE /api/v1/tap/async/{id})")
        job.destruction = min(when, job.created + self.config.tap_job_max_destruction_s)
        self._save(job)
        self._reap_at(job)

    def set_execution(self, job: Job, text: str) -> None:
        """Set ``job``'s execution duration (s) before it runs: at most ``tap_timeout_s`` (0 or more: that).

        Raises
        ------
        InvalidQuery
            Not a whole number of seconds, or the job no longer ``PENDING`` (HTTP 400).
        """
        if not text.strip().isdigit() or len(text.strip()) > 12:
            raise InvalidQuery(f"EXECUTIONDURATION={text[:40]!r} is not a whole number of seconds >= 0")
        if job.phase != "PENDING":
            raise InvalidQuery(f"the job is {job.phase}: its execution duration is set only while PENDING")
        seconds = int(text.strip())
        job.execution_s = min(seconds, self.config.tap_timeout_s) if seconds > 0 else self.config.tap_timeout_s
        self._save(job)

    def room_for(self, job: Job, size: int) -> bool:
        """Whether a result of ``size`` bytes for ``job`` keeps the results within ``tap_job_results_mb``."""
        held = sum(j.held_bytes for j in self.jobs.values() if j is not job) + job.held_bytes - job.result_bytes
        return held + size <= self.config.tap_job_results_mb * 1024 * 1024

    def close(self) -> None:
        """Cancel the jobs' tasks and timers (the application stops): a job queued or running ends in ERROR, saved."""
        for job in self.jobs.values():
            for pending in (job.task, job.reaper):
                if pending is not None:
                    pending.cancel()
            if job.phase in ("QUEUED", "EXECUTING"):
                job.stop.request()
                message = (f"the portal stopped while this job was {job.phase}: its query did not finish; "
                           "run it again as a new job")
                job.answer = TapAnswer(error_votable(InvalidQuery(message)), VOTABLE_TYPE, message)
                job.move("ERROR", self.clock())


def named_uploads(upload: str | None, parts: dict[str, bytes]) -> dict[str, bytes]:
    """The parts of ``parts`` that the ``UPLOAD`` value names (none without one; a malformed one is refused when run).

    Raises
    ------
    InvalidQuery
        More than :data:`~streams.web.tap_upload.MAX_UPLOAD_BYTES` together.
    """
    from streams.web.tap_upload import upload_pairs

    try:
        named = {part for _, part in upload_pairs(upload)} if upload else set()
    except InvalidQuery:
        named = set()
    tables = {part: data for part, data in parts.items() if part in named}
    if sum(len(data) for data in tables.values()) > MAX_UPLOAD_BYTES:
        raise InvalidQuery(f"the uploaded tables are over {MAX_UPLOAD_BYTES >> 20} MiB together")
    return tables


def _el(name: str, value: str | None) -> str:
    if value is None:
        return f'<uws:{name} xsi:nil="true"/>'
    return f"<uws:{name}>{escape(value)}</uws:{name}>"


def parameters_xml(job: Job, inner: bool = False) -> str:
    """The job's ``uws:parameters`` element (``inner``: without the XML declaration and namespaces)."""
    params = "".join(f"<uws:parameter id={quoteattr(name.lower())}>{escape(value)}</uws:parameter>"
                     for name, value in job.parameters.items() if name != "RUNID")
    return f"<uws:parameters>{params}</uws:parameters>" if inner else \
        f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:parameters {_XMLNS}>{params}</uws:parameters>'


def results_xml(job: Job, url: str, inner: bool = False) -> str:
    """The job's ``uws:results``: ``result`` (its VOTable or CSV at ``url/results/result``) once COMPLETED."""
    result = ""
    if job.phase == "COMPLETED" and job.answer is not None:
        result = (f'<uws:result id="result" xlink:type="simple" xlink:href={quoteattr(url + "/results/result")} '
                  f"mime-type={quoteattr(job.answer.media_type)} size=\"{job.result_bytes}\"/>")
    return f"<uws:results>{result}</uws:results>" if inner else \
        f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:results {_XMLNS}>{result}</uws:results>'


def job_xml(job: Job, url: str) -> bytes:
    """The UWS 1.1 job document of ``job``, whose URL is ``url``."""
    error = ""
    if job.phase == "ERROR" and job.answer is not None:
        error = (f'<uws:errorSummary type="fatal" hasDetail="true">'
                 f"<uws:message>{escape(job.answer.error or '')}</uws:message></uws:errorSummary>")
    run_id = _el("runId", job.parameters["RUNID"]) if "RUNID" in job.parameters else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:job version="1.1" {_XMLNS}>'
            f"{_el('jobId', job.job_id)}{run_id}{_el('ownerId', job.owner_name)}{_el('phase', job.phase)}"
            f"{_el('quote', None)}{_el('creationTime', iso(job.created))}{_el('startTime', iso(job.started))}"
            f"{_el('endTime', iso(job.ended))}{_el('executionDuration', f'{job.execution_s:.0f}')}"
            f"{_el('destruction', iso(job.destruction))}{parameters_xml(job, True)}{results_xml(job, url, True)}"
            f"{error}</uws:job>").encode()


def jobs_xml(jobs: Iterable[Job], base: str) -> bytes:
    """The UWS 1.1 job list of ``jobs``, each a ``jobref`` to ``base/{id}`` with its phase and creation time."""
    refs = "".join(f"<uws:jobref id={quoteattr(job.job_id)} xlink:type=\"simple\" "
                   f"xlink:href={quoteattr(f'{base}/{job.job_id}')}>{_el('phase', job.phase)}"
                   + (_el("runId", job.parameters["RUNID"]) if "RUNID" in job.parameters else "")
                   + f"{_el('ownerId', job.owner_name)}{_el('creationTime', iso(job.created))}</uws:jobref>"
                   for job in jobs)
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:jobs version="1.1" {_XMLNS}>{refs}</uws:jobs>'.encode()
