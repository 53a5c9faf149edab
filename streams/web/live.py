"""The live alert stream: ``GET /api/v1/stream``, server-sent events from a Kafka consumer of ``alerts``.

One :class:`LiveHub` per portal runs one consumer (:class:`streams.subscriber.Subscription`, a group
of its own) in a thread of its own, started by the first viewer and stopped once nobody has watched
for :data:`IDLE_STOP_S`. It reads from the time it started (so nothing published while it joins the
group is missed), decodes each alert, makes its summary (:func:`streams.web.records.summary_of`) and
hands it to every viewer whose filter (the language of ``broker subscribe``) it passes. Hand-over to
the event loop is ``loop.call_soon_threadsafe`` into a bounded queue per viewer: the loop never
waits on Kafka, and a viewer too slow to keep up loses its oldest alerts (counted), never the
server's memory.

Events: ``alert`` (data: an AlertSummary and ``context``, :func:`context_of`), ``status`` (data:
``{"state": "live" | "waiting" | "down", "message": ...}``), and a comment every
:data:`KEEPALIVE_S` so that a dead connection is noticed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge

from broker.errors import BrokerError, RateLimited, Unavailable, UnknownTopic
from streams.alert_expr import AlertFilter, to_json
from streams.settings import KafkaSettings
from streams.subscriber import StartPosition, Subscription
from streams.web.limits import client_key
from streams.web.tokens import Principal, require

log = logging.getLogger(__name__)
router = APIRouter(tags=["live"])

#: Alerts a viewer's queue holds before its oldest are dropped (count).
QUEUE_SIZE = 256
#: Seconds between keep-alive comments on an idle stream (s).
KEEPALIVE_S = 15.0
#: Seconds without any viewer after which the consumer stops (s); the next viewer starts it again.
IDLE_STOP_S = 60.0
#: Most live streams open at once (count): each holds a connection, a queue and a thread's share of
#: the consumer's work; beyond it a new one is answered 429 (``RateLimited``) until one closes.
MAX_VIEWERS = 200
#: Most live streams one client (its token, else its address: :func:`streams.web.limits.client_key`) has open
#: at once (count): a page in each of a few tabs; beyond it 429, so that one client cannot hold every stream.
MAX_VIEWERS_PER_CLIENT = 8
#: When a stream refused for :data:`MAX_VIEWERS` (or its client's share) may ask again (s; its 429's ``Retry-After``).
RETRY_VIEWER_S = 30.0
#: Seconds between attempts to reach Kafka or find the topic again (s).
RETRY_S = 5.0


def context_of(record: dict) -> dict | None:
    """The alert's context in brief, for its card: host, a star under it, motion, catalog object, trail.

    The host with its offset and nuclear flag; the nearest catalogued object; whether it lies on a
    trail of its frame's candidates. None when the alert has none (before the score stage, older schema versions).
    """
    ctx = record.get("context")
    if not isinstance(ctx, dict):
        return None
    host = ctx.get("host")
    host = host if isinstance(host, dict) else {}
    matches = [m for m in ctx.get("matches") or [] if isinstance(m, dict)]
    catalogued = [m for m in matches if m.get("catalog") != "frame"]
    return {"host": host.get("name"), "host_offset_arcsec": host.get("offset_arcsec"), "nuclear": host.get("nuclear"),
            "on_star": ctx.get("on_star"), "moving": bool(ctx.get("moving")),
            "catalog": catalogued[0].get("name") if catalogued else None,
            "trail": any(m.get("kind") == "trail" for m in matches)}


def sse(event: str, data: dict) -> str:
    """One server-sent event: ``event: <name>`` and one ``data:`` line of JSON (no newline inside)."""
    return f"event: {event}\ndata: {to_json(data)}\n\n"


@dataclass(eq=False)
class Viewer:
    """One open stream: its filter, the event loop that serves it, its queue of events and its client."""

    keep: AlertFilter
    loop: asyncio.AbstractEventLoop
    client: str = ""
    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0

    def offer(self, event: str) -> None:
        """Queue an event (on the loop's thread); drop the oldest when full."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)


class LiveHub:
    """One Kafka consumer of the alert topic, fanned out to the open streams.

    Parameters
    ----------
    settings : KafkaSettings
    topic : str
        The alert topic.
    registry : CollectorRegistry
        Where its metrics go (``portal_live_*``).
    keep : callable, optional
        Called with each alert read: the portal's record cache (:meth:`streams.web.queries.RecordCache.put`),
        so that the cutouts of an alert seen live are served before the archive commits it. It
        keeps the first record of an id, and answers an id the archive holds with the archive's
        record: an alert published with an archived id (a faulty or hostile producer) may reach
        the open streams as an event (the subscription drops only the ids it read itself), never
        the alert's page, cutouts or labels. Default None.
    """

    def __init__(self, settings: KafkaSettings, topic: str, registry: CollectorRegistry,
                 keep: Callable[[dict], object] | None = None) -> None:
        self.settings, self.topic, self._keep = settings, topic, keep
        self._viewers: set[Viewer] = set()
        self._per_client: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._empty_since = time.monotonic()
        self.status: dict[str, str] = {"state": "waiting", "message": "connecting to Kafka"}
        self.viewers = Gauge("portal_live_viewers", "Open live streams", registry=registry)
        self.alerts = Counter("portal_live_alerts", "Alerts read by the live stream's consumer", registry=registry)
        self.dropped = Counter("portal_live_dropped", "Alerts dropped for viewers too slow to take them",
                               registry=registry)

    def join(self, keep: AlertFilter, client: str = "") -> Viewer:
        """A new viewer of ``client`` with filter ``keep`` (call on the event loop); starts the consumer if needed.

        Raises
        ------
        RateLimited
            :data:`MAX_VIEWERS` streams are open, or :data:`MAX_VIEWERS_PER_CLIENT` of ``client``'s.
        """
        viewer = Viewer(keep, asyncio.get_running_loop(), client)
        viewer.offer(sse("status", self.status))
        with self._lock:
            if len(self._viewers) >= MAX_VIEWERS:
                raise RateLimited(f"{len(self._viewers)} live streams are open, the most this server keeps; "
                                  "try again when one closes", retry_after_s=RETRY_VIEWER_S)
            if self._per_client[client] >= MAX_VIEWERS_PER_CLIENT:
                raise RateLimited(f"this client has {self._per_client[client]} live streams open, the most one "
                                  "client keeps; close one (another tab?)", retry_after_s=RETRY_VIEWER_S)
            self._viewers.add(viewer)
            self._per_client[client] += 1
            self.viewers.set(len(self._viewers))
            self._start_consumer()
        return viewer

    def _start_consumer(self) -> None:
        """Start the consumer thread unless it runs (called under the lock)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="portal-live", daemon=True)
            self._thread.start()

    def leave(self, viewer: Viewer) -> None:
        """Forget a viewer (its stream closed)."""
        with self._lock:
            if viewer in self._viewers:
                self._viewers.remove(viewer)
                self._per_client -= collections.Counter({viewer.client: 1})  # drops the client at 0
            self.viewers.set(len(self._viewers))
            if not self._viewers:
                self._empty_since = time.monotonic()
        self.dropped.inc(viewer.dropped)

    def close(self) -> None:
        """Stop the consumer (within a poll, ~0.5 s)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(5)

    def _idle(self) -> bool:
        with self._lock:
            return not self._viewers and time.monotonic() - self._empty_since > IDLE_STOP_S

    def _should_stop(self) -> bool:
        return self._stop.is_set() or self._idle()

    def _set_status(self, state: str, message: str) -> None:
        self.status = {"state": state, "message": message}
        self._broadcast(lambda v: True, sse("status", self.status))

    def _broadcast(self, wants: Any, event: str) -> None:
        with self._lock:
            viewers = list(self._viewers)
        for v in viewers:
            if wants(v):
                try:
                    v.loop.call_soon_threadsafe(v.offer, event)
                except RuntimeError:  # its event loop is closed: the server is going away
                    self.leave(v)

    def _run(self) -> None:
        """Consume until stopped, or idle with nobody watching.

        The last check is under the lock, so a viewer that joins meanwhile keeps the thread going.
        """
        while True:
            self._consume()
            with self._lock:
                if self._stop.is_set() or not self._viewers:
                    self._thread = None
                    return

    def _consume(self) -> None:
        """Read from now on until stopped or idle; retry every :data:`RETRY_S` on Kafka trouble."""
        since_ms = int(time.time() * 1000)
        while not self._should_stop():
            try:
                with Subscription(self.settings, self.topic, start=StartPosition("time", time_ms=since_ms),
                                  on_skip=lambda s: log.warning("live stream skipped %s", s)) as sub:
                    self._set_status("live", f"reading {self.topic}")
                    for alert, _ in sub.alerts(stop=self._should_stop):
                        self._deliver(alert)
                return
            except UnknownTopic as exc:
                self._set_status("waiting", str(exc))
            except BrokerError as exc:
                self._set_status("down", f"Kafka: {exc}")
            except Exception as exc:  # noqa: BLE001  (librdkafka errors: keep the server up, retry)
                log.exception("live stream consumer failed")
                self._set_status("down", f"Kafka consumer failed: {type(exc).__name__}")
            self._stop.wait(RETRY_S)

    def _deliver(self, alert: dict) -> None:
        """Send one alert to every viewer whose filter it passes (filters run in this thread)."""
        from streams.web.records import summary_of

        self.alerts.inc()
        try:
            event = sse("alert", {**summary_of(alert), "context": context_of(alert)})
            if self._keep is not None:
                self._keep(alert)
        except (BrokerError, KeyError, TypeError, ValueError) as exc:
            log.warning("live stream: alert %s not summarised: %s", alert.get("alertId"), exc)
            return

        def wants(v: Viewer) -> bool:
            try:
                return v.keep(alert)
            except BrokerError:
                return False

        self._broadcast(wants, event)


def live_hub(request: Request) -> LiveHub:
    """The portal's hub, made on first use; :class:`Unavailable` (503) when the portal has no Kafka."""
    portal = request.app.state.portal
    hub = portal.extras.get("live")
    if hub is None:
        if portal.config.bootstrap is None:
            raise Unavailable("this server reads no Kafka (broker serve --bootstrap): no live stream; "
                              "the latest alerts are at /api/v1/alerts")
        from streams.web.api import record_cache

        settings = KafkaSettings.load(portal.config.bootstrap, portal.config.pipeline, app_id="portal")
        keep = record_cache(portal).put if portal.archive is not None else None
        hub = portal.extras.setdefault("live", LiveHub(settings, portal.config.alerts_topic, portal.registry, keep))
    assert isinstance(hub, LiveHub)
    return hub


async def _events(request: Request, viewer: Viewer, hub: LiveHub) -> AsyncIterator[str]:
    """The events of one viewer until its client goes away (checked every second)."""
    idle = 0.0
    try:
        yield "retry: 3000\n\n"
        while not await request.is_disconnected():
            try:
                yield await asyncio.wait_for(viewer.queue.get(), 1.0)
                idle = 0.0
            except TimeoutError:
                idle += 1.0
                if idle >= KEEPALIVE_S:
                    idle = 0.0
                    yield ": keep-alive\n\n"
    finally:
        hub.leave(viewer)


@router.get("/api/v1/stream")
async def stream(request: Request, principal: Annotated[Principal, Depends(require("read"))],
                 filter: Annotated[str | None, Query(  # noqa: A002  (the name of the CLI's option)
                     max_length=1000, description="Filter expression of `broker subscribe --filter`.")] = None
                 ) -> StreamingResponse:
    """New alerts as server-sent events (``alert``: an AlertSummary), from now on, through ``filter``.

    400 for a filter that does not parse; 429 with :data:`MAX_VIEWERS` streams open, or
    :data:`MAX_VIEWERS_PER_CLIENT` of this client's; 503 when the server reads no Kafka.
    """
    keep = AlertFilter(filter)
    hub = live_hub(request)
    viewer = hub.join(keep, client_key(request))
    return StreamingResponse(_events(request, viewer, hub), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
