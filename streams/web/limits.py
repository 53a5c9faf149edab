"""Limits on the portal's costly work: a budget of work per client, and a bound on the work in hand.

An endpoint is *costly* when it reads the archive (DuckDB) or the history, or draws an image
(matplotlib, a frame, the real/bogus model's attribution map): it takes :func:`costly` instead of
the bare :func:`~streams.web.tokens.require` (``docs/portal.md``, "Limits", has the table of what
each costs). The pages, static files, ``/openapi.json``, health, metrics, the live stream (its own
cap) and uploads (their own rate per token, :class:`RateLimiter`) are not costly.

- **Per client.** A client is its token's id when the request carries a token (verified first),
  else its address (:func:`client_key`). It may use ``WebConfig.client_work_s_per_minute``
  seconds of costly work in any sliding minute (:class:`RateLimiter`, the work charged as each
  request ends) and have at most ``client_concurrency`` costly requests in hand at once; beyond
  either, 429 (:class:`~broker.errors.RateLimited`) with ``Retry-After``.
- **Whole server.** At most ``max_costly`` costly requests work at once (each holds a thread of
  the portal's pool; one thread is always left to the cheap reads), at most
  ``max_costly_queued`` more wait, served in turn by client, each at most ``costly_wait_s``
  (:class:`WorkGate`); beyond, or when the requests that would go first would hold a new one
  longer, 503 (:class:`~broker.errors.Busy`) with ``Retry-After``, at once.

Refusals are counted in the portal's metrics (``portal_refused_total{limit}``), with the costly
requests at work and waiting (``portal_costly_running``, ``portal_costly_queued``).
"""

# No ``from __future__ import annotations``: FastAPI reads the annotations of :func:`costly`'s
# dependency, whose ``Depends`` names a local.
import asyncio
import collections
import ipaddress
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter, Gauge

from broker.errors import Busy, RateLimited
from streams.web.config import WebConfig
from streams.web.tokens import Principal, bearer, require

#: The window of every rate limit (s).
RATE_WINDOW_S = 60.0
#: Most clients a :class:`RateLimiter` remembers (count); beyond, the least recently seen is forgotten.
MAX_KEYS = 100_000
#: ``Retry-After`` of a refusal for being busy, or for a client's requests in hand (s).
BUSY_RETRY_S = 2.0
#: Weight of the latest request in the mean time a slot is held (:attr:`WorkGate.mean_s`).
SMOOTHING = 0.2
#: The limits a refusal is counted under (``portal_refused_total{limit}``).
REFUSALS = ("client_budget", "client_concurrency", "busy")


@dataclass
class _Window:
    """One key's events within the window: (time, cost) oldest first, their total, the last time it was seen."""

    events: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    total: float = 0.0
    seen: float = 0.0

    def expire(self, before: float) -> None:
        """Drop the events at or before ``before``."""
        while self.events and self.events[0][0] <= before:
            self.total -= self.events.popleft()[1]
        if not self.events:
            self.total = 0.0  # no rounding left over

    def add(self, now: float, cost: float) -> None:
        """Count an event of ``cost`` at ``now``."""
        if cost > 0:
            self.events.append((now, cost))
            self.total += cost

    def wait(self, now: float, room: float) -> float:
        """Seconds until the events within the window total at most ``room``."""
        excess = self.total - room
        for at, cost in self.events:
            excess -= cost
            if excess <= 0:
                return max(at + RATE_WINDOW_S - now, 0.0)
        return RATE_WINDOW_S


class RateLimiter:
    """At most ``per_minute`` of cost per key in any sliding :data:`RATE_WINDOW_S` window; thread-safe.

    A cost is a count (an upload: 1) or an amount (seconds of work). A key not seen for a window
    is forgotten, and at most :data:`MAX_KEYS` are remembered (the least recently seen goes
    first), so that clients that come and go cannot grow the memory without bound.

    Parameters
    ----------
    per_minute : float
        The most a key's events may cost within any window.
    what : str
        What the cost counts, for the refusal's message (``uploads``, ``s of work``).
    """

    def __init__(self, per_minute: float, what: str = "uploads") -> None:
        self.per_minute = per_minute
        self.what = what
        self._windows: collections.OrderedDict[str, _Window] = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, cost: float = 1.0, now: float | None = None) -> None:
        """Count an event of ``key`` costing ``cost``.

        Raises
        ------
        RateLimited
            It would take ``key`` over the limit (then it is not counted); ``retry_after_s`` says
            when it would not (HTTP 429 with ``Retry-After``).
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            window = self._window(key, now)
            if window.total + cost > self.per_minute:
                wait = window.wait(now, self.per_minute - cost)
                raise RateLimited(f"{key!r} is over its {self.per_minute:g} {self.what} a minute ({window.total:.3g} "
                                  f"in the last {RATE_WINDOW_S:.0f} s); retry in {math.ceil(wait)} s",
                                  retry_after_s=wait)
            window.add(now, cost)

    def add(self, key: str, cost: float, now: float | None = None) -> None:
        """Count ``cost`` against ``key`` without a check: work measured once it was done."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._window(key, now).add(now, cost)

    def __len__(self) -> int:
        return len(self._windows)

    def _window(self, key: str, now: float) -> _Window:
        """The window of ``key``, its old events dropped, marked seen; keys not seen for a window forgotten."""
        while self._windows:
            oldest = next(iter(self._windows.values()))
            if oldest.seen > now - RATE_WINDOW_S:
                break
            self._windows.popitem(last=False)
        window = self._windows.pop(key, None) or _Window()
        self._windows[key] = window
        if len(self._windows) > MAX_KEYS:
            self._windows.popitem(last=False)
        window.expire(now - RATE_WINDOW_S)
        window.seen = now
        return window


class WorkGate:
    """At most ``running`` requests at work, ``queued`` more waiting (each up to ``wait_s`` s); the rest refused.

    It lives on the event loop (no lock): :meth:`acquire` answers at once, or waits for a slot
    that :meth:`release` hands over. Waiting requests are served in turn by client (round robin;
    first come first served within a client), so a client with many requests waiting delays
    another's by one of its own at most. A request is refused at once, not after ``wait_s``,
    when the queue is full, or when the requests that would go before it would, at the mean time
    a slot has been held lately (``mean_s``), keep it waiting longer than ``wait_s``.

    Parameters
    ----------
    running : int
        Requests at work at once (count).
    queued : int
        Requests waiting for a slot at once (count).
    wait_s : float
        Longest wait for a slot (s).
    """

    def __init__(self, running: int, queued: int, wait_s: float) -> None:
        self.limit, self.max_queued, self.wait_s = running, queued, wait_s
        self.running = 0
        self.queued = 0
        self.mean_s = 0.0
        self._lines: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = \
            collections.OrderedDict()  # client -> its waiting requests, in the order of their turns

    def expected_wait_s(self, key: str = "") -> float:
        """How long a request of client ``key`` coming now would wait for a slot, at ``mean_s`` a request (s)."""
        mine = len(self._lines.get(key, ()))
        before = sum(min(len(line), mine + 1) for other, line in self._lines.items() if other != key)
        return (before + mine + 1) * self.mean_s / self.limit

    async def acquire(self, key: str = "") -> None:
        """Take a slot for client ``key``, waiting for one if there is room to wait.

        Raises
        ------
        Busy
            No slot and no room to wait, or none came within ``wait_s`` (HTTP 503 with ``Retry-After``).
        """
        if self.running < self.limit and not self.queued:
            self.running += 1
            return
        expected = self.expected_wait_s(key)
        if self.queued >= self.max_queued or expected > self.wait_s:
            raise Busy(f"{self.running} costly requests at work and {self.queued} waiting, the most this server "
                       f"takes; retry in {math.ceil(expected)} s",
                       retry_after_s=min(max(expected, BUSY_RETRY_S), RATE_WINDOW_S))
        slot = asyncio.get_running_loop().create_future()
        self._lines.setdefault(key, collections.deque()).append(slot)
        self.queued += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await slot
        except BaseException as exc:  # timed out or cancelled: a slot handed over meanwhile goes on
            if slot.done() and not slot.cancelled():
                self.release()
            if isinstance(exc, TimeoutError):
                raise Busy(f"no costly request ended within {self.wait_s:g} s; retry in {BUSY_RETRY_S:.0f} s",
                           retry_after_s=BUSY_RETRY_S) from None
            raise
        finally:
            self._forget(key, slot)

    def _forget(self, key: str, slot: asyncio.Future[None]) -> None:
        """Take ``slot`` out of the line of ``key`` if it is still there."""
        line = self._lines.get(key)
        if line is not None and slot in line:
            line.remove(slot)
            self.queued -= 1
            if not line:
                del self._lines[key]

    def release(self, held_s: float | None = None) -> None:
        """Give a slot back, held ``held_s`` seconds (None: unused): to the next client's turn, else free."""
        if held_s is not None:
            self.mean_s += SMOOTHING * (held_s - self.mean_s)
        while self._lines:
            key, line = next(iter(self._lines.items()))
            slot = line.popleft()
            self.queued -= 1
            if line:
                self._lines.move_to_end(key)
            else:
                del self._lines[key]
            if not slot.done():
                slot.set_result(None)
                return
        self.running -= 1


class Limits:
    """The portal's limits on costly work (:func:`costly`) and their metrics.

    Parameters
    ----------
    config : WebConfig
        ``client_work_s_per_minute``, ``client_concurrency``, ``max_costly``, ``max_costly_queued``
        and ``costly_wait_s``.
    registry : CollectorRegistry
        The portal's metrics.
    """

    def __init__(self, config: WebConfig, registry: CollectorRegistry) -> None:
        self.budget = RateLimiter(config.client_work_s_per_minute, what="s of costly work")
        self.gate = WorkGate(config.max_costly, config.max_costly_queued, config.costly_wait_s)
        self.per_client = config.client_concurrency
        self.in_hand: dict[str, int] = {}
        self.refused = Counter("portal_refused", "Costly requests refused, by the limit that refused them "
                               "(client_budget, client_concurrency: 429; busy: 503)", ["limit"], registry=registry)
        for name in REFUSALS:
            self.refused.labels(name)
        Gauge("portal_costly_running", "Costly requests at work", registry=registry).set_function(
            lambda: self.gate.running)
        Gauge("portal_costly_queued", "Costly requests waiting for a slot", registry=registry).set_function(
            lambda: self.gate.queued)

    def _admit(self, key: str) -> None:
        """RateLimited (counted) when ``key`` is over its budget or has its most requests in hand."""
        try:
            self.budget.take(key, 0.0)
        except RateLimited:
            self.refused.labels("client_budget").inc()
            raise
        held = self.in_hand.get(key, 0)
        if held >= self.per_client:
            self.refused.labels("client_concurrency").inc()
            raise RateLimited(f"{key!r} has {held} costly requests in hand, the most one client may; retry once one "
                              "is answered", retry_after_s=BUSY_RETRY_S)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Admit one costly request of client ``key``, hold a slot while it works, and charge its time.

        Raises
        ------
        RateLimited
            ``key`` over its budget or its requests in hand (HTTP 429).
        Busy
            No slot (HTTP 503).
        """
        self._admit(key)
        self.in_hand[key] = self.in_hand.get(key, 0) + 1
        try:
            try:
                await self.gate.acquire(key)
            except Busy:
                self.refused.labels("busy").inc()
                raise
            start = time.monotonic()
            try:
                yield
            finally:
                held_s = time.monotonic() - start
                self.gate.release(held_s)
                self.budget.add(key, held_s)
        finally:
            self.in_hand[key] -= 1
            if not self.in_hand[key]:
                del self.in_hand[key]


def client_key(request: Request) -> str:
    """Who a request's work is charged to: ``token:<id>`` with a token, else ``addr:<address>``.

    The token must have been verified (:func:`costly` does so first). The address is the ASGI
    server's client: uvicorn replaces it with ``X-Forwarded-For`` only when the connection comes
    from an address of its ``--forwarded-allow-ips`` (``FORWARDED_ALLOW_IPS``; default the local
    host), so a header from anyone else is never believed. An IPv6 address counts by its /64, the
    network one subscriber is given.
    """
    token = bearer(request)
    if token is not None:
        return "token:" + token.partition(".")[0]
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"addr:{host or 'unknown'}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"addr:{address.ipv4_mapped}"
        return f"addr:{ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"addr:{address}"


def costly(scope: str = "read") -> Callable[..., AsyncIterator[Principal]]:
    """A FastAPI dependency for costly endpoints: the principal of :func:`require` (``scope``), held to the limits.

    Use it with ``Depends(costly(scope), scope="function")``, so that the slot is given back
    when the endpoint returns, before its answer is sent (a slow reader holds no slot).
    """
    auth = require(scope)

    async def dependency(request: Request, who: Annotated[Principal, Depends(auth)]) -> AsyncIterator[Principal]:
        async with request.app.state.portal.limits.hold(client_key(request)):
            yield who

    return dependency
