"""The portal's settings (``broker serve``): where it reads, who may write, and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from broker.config import PipelineConfig
from broker.errors import ConfigError
from broker.history import HistoryConfig
from broker.ingest import IngestConfig

#: Where ``broker demo`` keeps its state: the folder ``broker serve`` reads by default.
DEMO_STATE_DIR = Path("var/demo/state")


@dataclass(frozen=True)
class WebConfig:
    """Settings of the web portal, frozen at start-up.

    Attributes
    ----------
    host : str
        Interface to listen on. Default ``127.0.0.1``: only this machine; serve further through a
        reverse proxy with TLS.
    port : int
        TCP port. Default 8000.
    archive : str or None
        Directory or fsspec URL of the alert archive (``<state_dir>/archive`` for the pipeline's
        default). Default None: no archive; the alert endpoints answer 503.
    state_dir : Path or None
        The pipeline's state folder: ``history.sqlite`` (the object history) and ``diffs/`` (the
        kept difference images). Default None: no history.
    history : HistoryConfig
        The object history's settings (its PostgreSQL ``dsn``, if any). Default: SQLite in ``state_dir``.
    tokens_path : Path
        SQLite file of the API tokens (salted hashes only). Default ``var/portal/tokens.sqlite``;
        :meth:`for_state_dir` puts it in the state folder.
    labels_path : Path
        SQLite file of the vetting labels. Default ``var/portal/labels.sqlite``.
    watchlists_path : Path
        SQLite file of the watchlists tokens save (:mod:`broker.watchlist_store`). Default
        ``var/portal/watchlists.sqlite``; :meth:`for_state_dir` puts it in the state folder.
    bootstrap : str or None
        Kafka bootstrap servers, for uploads published to ``frames_topic`` and the live stream of
        ``alerts_topic``. Default None: no Kafka; publishing uploads answers 503.
    alerts_topic, frames_topic : str
        The topics read live and written by uploads. Defaults ``alerts`` and ``frames``.
    cors_origins : tuple of str
        Origins allowed to call the API from a browser page of theirs. Default none: CORS closed.
    public_read : bool
        Whether the read endpoints answer without a token. Default True: the demo serves public alerts.
    max_upload_bytes : int
        Largest upload body (bytes), refused from its ``Content-Length`` before it is read and cut
        off while streaming otherwise. Default 64 MiB: a 4k x 4k float32 frame is 64 MiB uncompressed.
    max_upload_pixels : int
        Largest image an upload's header may announce (pixels), refused before decompression.
        Default 2**25 (a 5.8k x 5.8k frame; the pipeline's own limit is ``IngestConfig.max_pixels``).
    max_expansion : float
        Largest ratio of decompressed to compressed size of a tile-compressed upload (the
        decompression-bomb guard of :func:`broker.frame.decode_fits`). Default 64, as the ingest stage.
    uploads_per_minute : int
        Uploads one token may make per minute (count, a sliding 60 s window). Default 10:
        ``predict`` runs the pipeline synchronously (~1 s to tens of s per frame).
    uploads_in_flight : int
        Uploads of one token in hand at once, from the first byte of the body to the answer
        (count); 429 beyond. Default 2: each holds up to ``max_upload_bytes`` of memory, and a
        slow sender would otherwise hold ``uploads_per_minute`` of them per minute of its timeout.
    upload_timeout_s : float
        Longest time to receive an upload's body (s); 408 beyond. Default 600: 64 MiB over a
        1 Mbit/s uplink takes ~540 s; a stalled or deliberately slow sender is cut off then.
    references_dir : Path or None
        Folder of stored references (``<state_dir>/refs`` by :meth:`for_state_dir`, the pipeline's) that
        ``predict`` uses when the upload brings none. Default None.
    pipeline : PipelineConfig
        The pipeline's configuration (``broker serve --config``): the models, subtraction and
        validation settings ``predict`` runs with, and the frame store, limits and Kafka security
        ``publish`` sends with. Default: the pipeline's defaults.
    query_threads : int
        Threads that run blocking reads (DuckDB, SQLite) and predictions off the event loop (count).
        Default 4.
    client_work_s_per_minute : float
        Seconds of costly work (the time its costly requests hold a slot of ``max_costly``) one
        client may use in any sliding minute (s per 60 s); a client is its token's id, else its
        address (:func:`streams.web.limits.client_key`). Beyond it, 429 with ``Retry-After``.
        Default 120: two of the three default slots on average, so one client cannot hold all
        three for more than 40 s of any minute, while a person may reload the live page four times a minute
        over 100,000 alerts (about 23 s of work a load there on two cores, 1 s over the tests' portal;
        ``docs/portal.md``, "Limits"). Clients waiting meanwhile are served in turn.
    client_concurrency : int
        Costly requests one client may have in hand at once, at work or waiting (count); beyond,
        429. Default 16: a browser opens at most 6 connections to a server over HTTP/1.1, and
        lazily loaded pictures over HTTP/2 some more; the limit bounds a client's share of the
        queue and how far a burst overruns the budget, which is charged as each request ends.
    max_costly : int
        Costly requests at work at once (count), each holding a thread of ``query_threads``;
        must be below ``query_threads``, so that a thread is always left to the cheap reads (the
        health probe). Default 3, with the default 4 threads.
    max_costly_queued : int
        Costly requests that may wait for a slot (count); beyond, 503 with ``Retry-After`` at
        once, so a flood is answered instead of queued. Default 64: ten browsers' connections.
    costly_wait_s : float
        Longest a costly request waits for a slot (s); then 503 with ``Retry-After``, as at once
        when the requests before it would keep it longer. Default 5: a page's pictures try again
        3 s after a failure, and a probe or a person should not wait longer.
    tap_maxrec : int
        Rows a TAP query answers without ``MAXREC`` (count; ``/api/v1/tap``). Default 10,000: a
        7.7 MB VOTable of the alerts' 24 columns, written in 1.3 s (astropy's writer, measured).
    tap_max_maxrec : int
        Most rows a TAP query answers whatever its ``MAXREC`` (count); more are cut, with
        ``QUERY_STATUS`` ``OVERFLOW``. Default 50,000: a ~40 MB VOTable made in memory in ~6.5 s
        (a CSV in a sixth of the time), which the time limit below does not bound.
    tap_timeout_s : float
        Longest a TAP query runs (s): DuckDB is interrupted then and the query answered with an
        error. Default 30, within a client's 120 s of costly work a minute (``client_work_s_per_minute``).
    tap_memory_mb : int
        Memory DuckDB may use for one thread's TAP queries (MiB, its ``memory_limit``; nothing is
        spilled to disk); a query that needs more is answered with an error. Default 1024.
    tap_jobs : int
        Asynchronous TAP jobs (``/api/v1/tap/async``, UWS) kept at once, of all clients (count),
        whatever their phase; a new one beyond is refused (409) until one is deleted or destroyed.
        Default 100.
    tap_jobs_per_client : int
        Jobs one client (its token, else its address) may keep at once (count); 409 beyond.
        Default 10: a TOPCAT session's queries of an hour.
    tap_job_results_mb : int
        Most memory the results of all kept jobs may hold (MiB): a job whose result would pass it
        ends in phase ERROR saying so. Default 256: six results of ``tap_max_maxrec`` rows (~40 MB).
    tap_job_destruction_s : float
        Time from a job's creation to its destruction (s), the job and its result deleted then.
        Default 3600 (1 h); a client may set it earlier, or later up to ``tap_job_max_destruction_s``.
    tap_job_max_destruction_s : float
        Longest time from a job's creation to its destruction a client may set (s). Default 86,400 (1 day).
    tap_job_wait_s : float
        Longest a blocking ``GET`` of a job (UWS 1.1 ``WAIT``) waits for its phase to change (s).
        Default 60: within a proxy's usual read timeout.
    tap_jobs_dir : Path or None
        Folder where the asynchronous TAP jobs are kept (a folder per job: its state, result and
        uploaded tables), read back when the portal starts (``streams.web.uws``). Default
        ``var/portal/tap-jobs``; :meth:`for_state_dir` puts it in the state folder; None: jobs are
        kept in memory only and lost with the process.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    archive: str | None = None
    state_dir: Path | None = None
    history: HistoryConfig = field(default_factory=HistoryConfig)
    tokens_path: Path = Path("var/portal/tokens.sqlite")
    labels_path: Path = Path("var/portal/labels.sqlite")
    watchlists_path: Path = Path("var/portal/watchlists.sqlite")
    bootstrap: str | None = None
    alerts_topic: str = "alerts"
    frames_topic: str = "frames"
    cors_origins: tuple[str, ...] = ()
    public_read: bool = True
    max_upload_bytes: int = 64 * 1024 * 1024
    max_upload_pixels: int = 2 ** 25
    max_expansion: float = 64.0
    uploads_per_minute: int = 10
    uploads_in_flight: int = 2
    upload_timeout_s: float = 600.0
    references_dir: Path | None = None
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    query_threads: int = 4
    client_work_s_per_minute: float = 120.0
    client_concurrency: int = 16
    max_costly: int = 3
    max_costly_queued: int = 64
    costly_wait_s: float = 5.0
    tap_maxrec: int = 10_000
    tap_max_maxrec: int = 50_000
    tap_timeout_s: float = 30.0
    tap_memory_mb: int = 1024
    tap_jobs: int = 100
    tap_jobs_per_client: int = 10
    tap_job_results_mb: int = 256
    tap_job_destruction_s: float = 3600.0
    tap_job_max_destruction_s: float = 86_400.0
    tap_job_wait_s: float = 60.0
    tap_jobs_dir: Path | None = Path("var/portal/tap-jobs")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be within 1..65535, not {self.port}")
        if min(self.max_upload_bytes, self.max_upload_pixels, self.uploads_per_minute, self.uploads_in_flight,
               self.query_threads) < 1:
            raise ConfigError("max_upload_bytes, max_upload_pixels, uploads_per_minute, uploads_in_flight and "
                              "query_threads must be >= 1")
        if not self.upload_timeout_s > 0:
            raise ConfigError(f"upload_timeout_s must be > 0 s, not {self.upload_timeout_s}")
        self._check_limits()
        if not (0 <= self.tap_maxrec <= self.tap_max_maxrec and self.tap_timeout_s > 0 and self.tap_memory_mb >= 16):
            raise ConfigError("TAP limits need 0 <= tap_maxrec <= tap_max_maxrec, tap_timeout_s > 0 and "
                              "tap_memory_mb >= 16")
        if not (1 <= self.tap_jobs_per_client <= self.tap_jobs and self.tap_job_results_mb >= 1
                and 0 < self.tap_job_destruction_s <= self.tap_job_max_destruction_s and self.tap_job_wait_s > 0):
            raise ConfigError("TAP jobs need 1 <= tap_jobs_per_client <= tap_jobs, tap_job_results_mb >= 1, "
                              "0 < tap_job_destruction_s <= tap_job_max_destruction_s and tap_job_wait_s > 0")
        if not self.max_expansion > 1:
            raise ConfigError(f"max_expansion must be > 1, not {self.max_expansion}")
        if "*" in self.cors_origins:
            raise ConfigError("cors_origins must name origins; '*' would open the API to every page")

    def _check_limits(self) -> None:
        """ConfigError for limits of costly work that cannot hold (``streams.web.limits``)."""
        if min(self.client_concurrency, self.max_costly) < 1 or self.max_costly_queued < 0:
            raise ConfigError("client_concurrency and max_costly must be >= 1, max_costly_queued >= 0")
        if not (self.client_work_s_per_minute > 0 and self.costly_wait_s > 0):
            raise ConfigError("client_work_s_per_minute and costly_wait_s must be > 0 s")
        if self.max_costly >= self.query_threads:
            raise ConfigError(f"max_costly ({self.max_costly}) must be below query_threads ({self.query_threads}): "
                              "a thread is kept for the cheap reads (health)")

    @classmethod
    def for_state_dir(cls, state_dir: Path, **overrides: object) -> WebConfig:
        """The settings of a pipeline's state folder: its archive, history, references, tokens, labels, lists, jobs."""
        state_dir = Path(state_dir)
        base = cls(archive=str(state_dir / "archive"), state_dir=state_dir,
                   tokens_path=state_dir / "tokens.sqlite", labels_path=state_dir / "labels.sqlite",
                   watchlists_path=state_dir / "watchlists.sqlite", references_dir=state_dir / "refs",
                   tap_jobs_dir=state_dir / "tap-jobs")
        return replace(base, **overrides)  # type: ignore[arg-type]

    def ingest(self) -> IngestConfig:
        """The ingest validation applied to uploads, with the portal's pixel and expansion limits."""
        return replace(self.pipeline.ingest, max_pixels=min(self.max_upload_pixels, self.pipeline.ingest.max_pixels),
                       max_expansion=min(self.max_expansion, self.pipeline.ingest.max_expansion))
