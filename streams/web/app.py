"""The portal's ASGI application: one :class:`Portal` of shared state, its routers, errors and limits.

The API is described by its OpenAPI document at ``/openapi.json``; FastAPI's ``/docs`` and ``/redoc``
pages are off, as they load their scripts from a CDN and the portal must work offline.

:func:`create_app` builds the FastAPI application ``broker serve`` runs. Every request finds the
shared state at ``request.app.state.portal``; blocking reads (DuckDB over the archive, SQLite of the
history) and predictions run in the portal's thread pool (:meth:`Portal.run`), so that the event loop
keeps answering while they work and the pipeline, which only writes, is never waited on.

Errors: a :class:`~broker.errors.BrokerError` becomes ``{"error": reason, "detail": message}`` with
the status of :data:`STATUS` (400 for the others); anything else is logged and answered
``{"error": "internal"}`` (500) without a traceback. A client that goes away before its body has
arrived is no error of the server: logged at INFO, counted as a 400 (``client_disconnected``).
Request bodies are limited before they are read (:class:`BodyLimit`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import errors
from broker.archive.reader import Archive
from broker.history import ObjectHistory, open_history
from streams.web.config import WebConfig
from streams.web.limits import Limits
from streams.web.queries import ArchiveView
from streams.web.tokens import TokenStore

log = logging.getLogger(__name__)
T = TypeVar("T")

#: HTTP status of each error class (the most specific class listed wins; other BrokerErrors: 400).
STATUS: dict[type[errors.BrokerError], int] = {
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.FrameTooLarge: 413,
    errors.RequestTimeout: 408,
    errors.RateLimited: 429,
    errors.Unavailable: 503,
    errors.ArchiveError: 503,
    errors.Outage: 503,  # the history or the frame store down: try again later
    errors.ModelError: 503,
    errors.TooManyPixels: 413,
    errors.UnsupportedMediaType: 415,
    errors.WatchlistQuota: 409,
    errors.JobQuota: 409,
}
#: Largest body of a request other than an upload (bytes): labels and other small JSON.
SMALL_BODY_BYTES = 64 * 1024
#: Largest watchlist posted to ``/api/v1/crossmatch`` or saved (``PUT /api/v1/watchlists/{name}``) (bytes): its
#: 10,000 entries at ~100 bytes a row, and room.
WATCHLIST_BYTES = 2 * 1024 * 1024
#: Largest body of a TAP query (``POST /api/v1/tap/sync``) (bytes): a form of the longest ADQL read
#: (``streams.web.adql.MAX_QUERY_CHARS``) percent-encoded, with room; a longer query is refused by the
#: service's own error VOTable.
TAP_BODY_BYTES = 1024 * 1024
#: Largest multipart body of a TAP query or job's parameters (bytes): the tables of ``UPLOAD``
#: (``streams.web.tap_upload.MAX_UPLOAD_BYTES`` together) and the form's fields.
TAP_UPLOAD_BODY_BYTES = 16 * 1024 * 1024 + 1024 * 1024
#: Room for the multipart framing and the form fields of an upload beside its frame bytes.
MULTIPART_SLACK_BYTES = 64 * 1024
#: Headers of every answer that does not set its own (the pages set their Content-Security-Policy): no
#: answer of the API (JSON, a PNG, a FITS cutout's bytes, an error) is sniffed into another type, run
#: as a page, framed, or named in a Referer.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'"}


def status_of(exc: errors.BrokerError) -> int:
    """The HTTP status of a broker error (:data:`STATUS`, by the most specific class; else 400)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def error_response(exc: errors.BrokerError) -> JSONResponse:
    """The JSON answer to a broker error: its reason and message, never a traceback.

    An error that knows when to try again (``retry_after_s`` of a 429 or a 503) says it in
    ``Retry-After`` (whole seconds, at least 1).
    """
    retry_after_s = getattr(exc, "retry_after_s", None)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse({"error": exc.reason, "detail": str(exc)}, status_code=status_of(exc), headers=headers)


@dataclass
class Portal:
    """What every request shares: settings, tokens, the archive, the history, a thread pool, metrics.

    Attributes
    ----------
    config : WebConfig
    tokens : TokenStore
    archive : Archive or None
        The alert archive (None when ``config.archive`` is unset).
    pool : ThreadPoolExecutor
        Runs the blocking work of requests (:meth:`run`).
    registry : CollectorRegistry
        The portal's Prometheus metrics (``GET /metrics``).
    limits : Limits
        The limits on costly work: a budget per client, a bound on the work in hand
        (:mod:`streams.web.limits`); made from ``config``.
    extras : dict
        State other modules keep for the life of the application (a Kafka producer, the live stream).
    """

    config: WebConfig
    tokens: TokenStore
    archive: Archive | None
    pool: ThreadPoolExecutor
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    extras: dict[str, Any] = field(default_factory=dict)
    _local: threading.local = field(default_factory=threading.local)
    _view: ArchiveView | None = None

    def __post_init__(self) -> None:
        self.requests = Counter("portal_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("portal_request_seconds", "Time to answer a request (s)", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
                                 registry=self.registry)
        self.limits = Limits(self.config, self.registry)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread pool, awaited (the event loop keeps serving meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def require_archive(self) -> ArchiveView:
        """The archive's view, kept open per thread; Unavailable (HTTP 503) when this server has none.

        Its ``query(sql)`` and ``files()`` are those of :class:`~broker.archive.reader.Archive`
        (:class:`~streams.web.queries.ArchiveView`).
        """
        if self.archive is None:
            raise errors.Unavailable("this server has no alert archive (broker serve --archive)")
        if self._view is None or self._view.archive is not self.archive:
            self._view = ArchiveView(self.archive)
        return self._view

    @contextmanager
    def history(self) -> Iterator[ObjectHistory | None]:
        """The object history, opened once per thread (None when there is none); call in the pool.

        A SQLite history is only read when its file exists (the portal never creates one).
        """
        cfg = self.config
        if cfg.history.dsn is None and (cfg.state_dir is None or not (cfg.state_dir / "history.sqlite").is_file()):
            yield None
            return
        held = getattr(self._local, "history", None)
        if held is None:
            assert cfg.state_dir is not None or cfg.history.dsn is not None
            held = open_history(cfg.state_dir or cfg.tokens_path.parent, cfg.history)
            self._local.history = held
        yield held

    def close(self) -> None:
        """Stop the pools, close what ``extras`` holds (anything with ``close()``) and the token file."""
        for value in self.extras.values():
            if isinstance(value, ThreadPoolExecutor):
                value.shutdown(wait=False, cancel_futures=True)
            elif callable(getattr(value, "close", None)):
                value.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.tokens.close()


class BodyLimit:
    """ASGI middleware: refuse a body over its limit before reading it, and cut off one that grows past it.

    A ``Content-Length`` over the limit is answered 413 at once; a body without one (chunked) is
    counted as it streams, and 413 is answered when it passes the limit (the application then
    sees the client gone). The limit is ``upload_bytes`` for ``POST /api/v1/frames``,
    :data:`WATCHLIST_BYTES` for ``POST /api/v1/crossmatch`` and ``PUT /api/v1/watchlists/{name}``,
    :data:`TAP_BODY_BYTES` for ``POST /api/v1/tap/sync`` and ``/async`` (:data:`TAP_UPLOAD_BODY_BYTES` for a
    multipart form, as a job's ``/parameters``), :data:`SMALL_BODY_BYTES` otherwise.
    """

    def __init__(self, app: ASGIApp, upload_bytes: int) -> None:
        self.app = app
        self.upload_bytes = upload_bytes

    def limit(self, scope: Scope) -> int:
        """The body limit of a request (bytes)."""
        path = scope["path"].rstrip("/") if scope["method"] in ("POST", "PUT") else ""
        if scope["method"] == "POST" and path == "/api/v1/frames":
            return self.upload_bytes + MULTIPART_SLACK_BYTES
        if scope["method"] == "POST" and (path in ("/api/v1/tap/sync", "/api/v1/tap/async") or (
                path.startswith("/api/v1/tap/async/") and path.endswith("/parameters"))):
            multipart = dict(scope.get("headers", ())).get(b"content-type", b"").lower().startswith(b"multipart/")
            return TAP_UPLOAD_BODY_BYTES if multipart else TAP_BODY_BYTES
        if (scope["method"] == "POST" and path == "/api/v1/crossmatch") or (
                scope["method"] == "PUT" and path.startswith("/api/v1/watchlists/")):
            return WATCHLIST_BYTES + MULTIPART_SLACK_BYTES
        return SMALL_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 413 for a declared body over the limit, else pass the request on with its body counted."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            too_big = errors.FrameTooLarge(f"request body of {declared.decode(errors='replace')} bytes; "
                                           f"the limit is {limit} bytes")
            await error_response(too_big)(scope, receive, send)
            return
        await self._counted(scope, receive, send, limit)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        state = {"seen": 0, "refused": False, "started": False}

        async def receive_counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit and not state["started"]:
                    state["refused"] = True
                    too_big = errors.FrameTooLarge(f"request body over the limit of {limit} bytes")
                    await error_response(too_big)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def send_guarded(message: Message) -> None:
            if not state["refused"]:
                state["started"] = True
                await send(message)

        try:
            await self.app(scope, receive_counted, send_guarded)
        except Exception:
            if not state["refused"]:
                raise


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every HTTP answer, those the answer sets itself kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, adding the missing headers to the start of the answer."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_secured)


def _install_errors(app: FastAPI) -> None:
    """The exception handlers: broker errors, bad parameters, HTTP errors, a client gone, and everything else."""

    async def broker_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.BrokerError)
        return error_response(exc)

    async def bad_parameters(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": errors.InvalidQuery.reason, "detail": detail}, status_code=422)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        reason = {404: errors.NotFound.reason, 405: "method_not_allowed"}.get(exc.status_code, "http")
        return JSONResponse({"error": reason, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)

    async def client_gone(request: Request, exc: Exception) -> JSONResponse:
        log.info("%s %s: the client went away before its request's body arrived", request.method, request.url.path)
        return JSONResponse({"error": "client_disconnected", "detail": "the client went away before its request's "
                             "body arrived"}, status_code=400)  # answered to nobody, but counted in the metrics

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal"}, status_code=500)

    async def storage(request: Request, exc: Exception) -> JSONResponse:
        full = errors.storage_full(exc)  # the labels' or tokens' disk full: 503, not a bug
        if full is None:
            return await internal(request, exc)
        log.error("%s %s: %s", request.method, request.url.path, full)
        return error_response(full)

    app.add_exception_handler(errors.BrokerError, broker_error)
    app.add_exception_handler(RequestValidationError, bad_parameters)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(OSError, storage)
    app.add_exception_handler(sqlite3.Error, storage)
    app.add_exception_handler(Exception, internal)


def _install_metrics(app: FastAPI, portal: Portal) -> None:
    """Count and time every request by its route template (not its path: ids would explode the labels)."""

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Any]) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        portal.requests.labels(route, str(response.status_code)).inc()
        portal.latency.labels(route).observe(time.perf_counter() - start)
        return response


def create_portal(config: WebConfig) -> Portal:
    """The shared state of an application over ``config`` (archive opened lazily by its reads)."""
    archive = Archive(config.archive) if config.archive else None
    return Portal(config=config, tokens=TokenStore(config.tokens_path), archive=archive,
                  pool=ThreadPoolExecutor(config.query_threads, thread_name_prefix="portal"))


def create_app(config: WebConfig) -> FastAPI:
    """The portal's application: REST API, upload, pages, live stream and vetting over ``config``."""
    from streams.web import api, lightcurves, saved_watchlists, tap, tap_async, upload, vo, watchlists

    portal = create_portal(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        tap_async.job_store(portal)  # the jobs kept in tap_jobs_dir read back, their destruction timers set
        yield
        portal.close()

    app = FastAPI(title="transient-broker portal", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Alerts, objects, light curves and cone searches over the broker's archive; "
                              "frame uploads for the pipeline or a synchronous prediction.")
    app.state.portal = portal
    _install_errors(app)
    _install_metrics(app, portal)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "PUT", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, upload_bytes=config.max_upload_bytes)
    app.add_middleware(SecurityHeaders)  # outermost: the answers of BodyLimit get them too
    app.include_router(api.router)
    app.include_router(api.metrics_router)
    app.include_router(upload.router)
    app.include_router(vo.router)
    app.include_router(tap_async.router)
    app.include_router(tap.router)
    app.include_router(watchlists.router)
    app.include_router(saved_watchlists.router)
    app.include_router(lightcurves.router)
    # --- pages, live stream, vetting (streams.web.pages/live/vetting) ---
    from streams.web import live, pages, vetting

    app.include_router(live.router)
    app.include_router(vetting.router)
    app.include_router(pages.router)
    # --- end of pages, live stream, vetting ---
    return app
