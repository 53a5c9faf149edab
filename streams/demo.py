"""The one-command demo: embedded broker, all stages, a simulated telescope and a subscriber.

The telescope closes the loop: while it observes, a :class:`FollowupDesk` reads the follow-up
requests the alert stage writes on ``followup`` (:class:`streams.followup.FollowupListener`); once
the scheduled frames are through the pipeline it observes the field of each open request in the
requested band as an extra visit (:meth:`broker.simulate.SkySimulator.frame` with ``visit``), and
the pipeline turns those frames into new detections of the requested objects
(:meth:`DemoResult.followup_detections`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.wcs import WCS

from broker.archive.reader import Archive
from broker.config import load_config
from broker.frame import Frame
from broker.simulate import SimConfig, SkySimulator, Truth
from streams import serde, topics
from streams.archiver import archive_url
from streams.embedded import EmbeddedKafka
from streams.followup import FollowupListener
from streams.framestore import FrameStore
from streams.monitor import read_all, stage_backlog
from streams.producer import FrameProducer
from streams.settings import KafkaSettings
from streams.stages import STAGE_NAMES, STAGES, pipeline_topics
from streams.subscriber import alerts

log = logging.getLogger(__name__)

#: S/N bins of the recovery table (lower edges; the last bin is open).
SNR_BINS = (5.0, 7.0, 10.0, 20.0)
#: Match radius between an alert and an injected source (px).
MATCH_PX = 1.5
#: Transients this close (px) to a pixel saturated in their frame or in a frame of its reference
#: lie inside the subtraction's saturated-star masks (science: 2 FWHM + 1.5 x the core radius;
#: reference: the core grown by 3 px, then by 1 FWHM): counted apart from the recovery table.
SATURATION_MASK_PX = 8.0
REAL_KINDS = ("transient", "variable", "moving")
#: The light-curve class each injected real kind should get (:meth:`DemoResult.classes_vs_truth`);
#: an alert on an injected artefact (hot pixel, satellite trail, ...) or on nothing should be
#: ``bogus``.
TRUTH_CLASS = {"transient": "SN", "variable": "variable_star", "moving": "mover"}


@dataclass
class DemoResult:
    """What went in (frames and their truth) and what came out (alerts, dead letters)."""

    truths: dict[str, Truth] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)  # frame_id -> batch status
    candidates: int = 0
    alerts: list[dict] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # s, exposure end -> alert received
    dead_letters: list[dict] = field(default_factory=list)
    saturated: dict[str, np.ndarray] = field(default_factory=dict)  # frame id -> (n, 2) RA/Dec, deg
    wcs: dict[str, WCS] = field(default_factory=dict)  # frame id -> celestial WCS
    archive: str = ""  # the archive the archive stage wrote (directory or URL)
    archived: int = 0  # alerts in it
    followups: list[dict] = field(default_factory=list)  # valid follow-up requests the telescope received
    followup_frames: list[str] = field(default_factory=list)  # frame ids of the visits made for them

    _mask_xy: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def in_saturation_mask(self, frame_id: str, inj) -> bool:
        """Whether ``inj`` lies inside a saturated-star mask.

        Whether ``inj`` lies within :data:`SATURATION_MASK_PX` of a pixel saturated in its
        frame or in any frame of the same field that went into the reference.
        """
        xy = self._mask_xy.get(frame_id)
        if xy is None:  # once per frame, after the statuses are in
            field_ = self.truths[frame_id].field
            parts = [self.saturated[fid] for fid, status in self.statuses.items() if fid in self.saturated
                     and (fid == frame_id or (status in ("REFERENCE_BUILDING", "IN_REFERENCE")
                                              and self.truths[fid].field == field_))]
            sky = np.concatenate(parts) if parts else np.zeros((0, 2))
            xy = np.column_stack(self.wcs[frame_id].wcs_world2pix(sky[:, 0], sky[:, 1], 0))
            self._mask_xy[frame_id] = xy
        return bool(len(xy)) and float(np.min(np.hypot(xy[:, 0] - inj.x, xy[:, 1] - inj.y))) <= SATURATION_MASK_PX

    def _subtracted_transients(self, lo: float, hi: float):
        """(frame id, injection) of transients with lo <= |S/N| < hi in subtracted frames."""
        for frame_id, status in sorted(self.statuses.items()):
            if status == "SUBTRACTED":
                for inj in self.truths[frame_id].injections:
                    if inj.kind == "transient" and lo <= abs(inj.snr) < hi:
                        yield frame_id, inj

    def _by_frame(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for a in self.alerts:
            out.setdefault(a["provenance"]["frame_id"], []).append(a)
        return out

    def recovery(self) -> list[tuple[str, int, int]]:
        """Transients recovered per S/N bin, outside the saturated-star masks.

        (S/N bin, recovered, injected) for transients in subtracted frames outside the
        saturated-star masks (those are in :meth:`masked`).
        """
        edges = (*SNR_BINS, np.inf)
        by_frame = self._by_frame()
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            found = [any(matches(a, inj) for a in by_frame.get(fid, []))
                     for fid, inj in self._subtracted_transients(lo, hi)
                     if not self.in_saturation_mask(fid, inj)]
            rows.append((f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">={lo:g}", sum(found), len(found)))
        return rows

    def masked(self, min_snr: float = 10.0) -> tuple[int, int]:
        """(recovered, injected) transients with S/N >= ``min_snr`` inside saturated-star masks."""
        by_frame = self._by_frame()
        found = [any(matches(a, inj) for a in by_frame.get(fid, []))
                 for fid, inj in self._subtracted_transients(min_snr, np.inf)
                 if self.in_saturation_mask(fid, inj)]
        return sum(found), len(found)

    def missed(self, min_snr: float = 10.0) -> list[tuple[str, str, float, float, bool]]:
        """Bright transients of subtracted frames that got no alert.

        Transients with S/N >= ``min_snr`` in subtracted frames that got no alert: (frame id,
        source id, S/N, distance to the nearest alert of that frame in px, inside a saturated-star
        mask).
        """
        by_frame = self._by_frame()
        out = []
        for frame_id, inj in self._subtracted_transients(min_snr, np.inf):
            mine = by_frame.get(frame_id, [])
            if not any(matches(a, inj) for a in mine):
                d = min((float(np.hypot(a["source"]["x"] - inj.x, a["source"]["y"] - inj.y)) for a in mine),
                        default=float("inf"))
                out.append((frame_id, inj.source_id, float(inj.snr), d, self.in_saturation_mask(frame_id, inj)))
        return out

    def followup_detections(self) -> int:
        """New detections of requested objects in follow-up frames.

        Alerts whose ``provenance.frame_id`` is one of :attr:`followup_frames` and whose
        ``objectId`` is the object of one of :attr:`followups`: the loop closed, a request became
        a measurement.
        """
        frames = set(self.followup_frames)
        wanted = {r["object_id"] for r in self.followups}
        return sum(1 for a in self.alerts if a["provenance"]["frame_id"] in frames and a["objectId"] in wanted)

    def _alerts_above(self, rb_cut: float | None) -> Iterable[dict]:
        """The alerts with rb >= ``rb_cut`` (all with None; an alert without rb fails a cut)."""
        return (a for a in self.alerts
                if rb_cut is None or (a["scores"]["rb"] is not None and a["scores"]["rb"] >= rb_cut))

    def false_alerts(self, rb_cut: float | None = None) -> int:
        """Alerts that match no injected real source (transient, variable star, moving object)."""
        n = 0
        for a in self._alerts_above(rb_cut):
            truth = self.truths.get(a["provenance"]["frame_id"])
            if truth is None or not any(matches(a, i) for i in truth.injections if i.kind in REAL_KINDS):
                n += 1
        return n

    def truth_of(self, alert: dict) -> str:
        """What was injected where ``alert`` is: ``<kind> <source id>`` of the nearest match, else ``bogus``."""
        truth = self.truths.get(alert["provenance"]["frame_id"])
        hits = [i for i in (truth.injections if truth else []) if matches(alert, i)]
        if not hits:
            return "bogus (nothing injected)"
        best = min(hits, key=lambda i: np.hypot(alert["source"]["x"] - i.x, alert["source"]["y"] - i.y))
        return f"{best.kind} {best.source_id}"

    def class_mix(self, rb_cut: float | None = None) -> dict[str, int]:
        """Alerts per most probable light-curve class (``unclassified`` without one), rb below ``rb_cut`` left out."""
        out: dict[str, int] = {}
        for a in self._alerts_above(rb_cut):
            label = (a.get("classification") or {}).get("label", "unclassified")
            out[label] = out.get(label, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def classes_vs_truth(self, rb_cut: float | None = None) -> dict[str, tuple[int, int]]:
        """Per expected class (:data:`TRUTH_CLASS`): (alerts given that class, alerts expected).

        The expected class is that of the injection the alert matches (:meth:`truth_of`),
        ``bogus`` where it matches an artefact or none; alerts with rb below ``rb_cut`` are left
        out.
        """
        out: dict[str, tuple[int, int]] = {}
        for a in self._alerts_above(rb_cut):
            want = TRUTH_CLASS.get(self.truth_of(a).split()[0], "bogus")  # hot pixels, trails: bogus
            got = (a.get("classification") or {}).get("label")
            right, total = out.get(want, (0, 0))
            out[want] = (right + (got == want), total + 1)
        return {k: out[k] for k in (*TRUTH_CLASS.values(), "bogus") if k in out}

    def anomaly_top(self, n: int = 10, rb_cut: float | None = None) -> list[tuple[dict, str]]:
        """The ``n`` alerts of highest anomaly score with what was injected there (:meth:`truth_of`).

        Alerts with rb below ``rb_cut`` are left out, as a subscriber's filter leaves them: the
        anomaly score is not a real/bogus score (``docs/architecture.md``), so a bogus candidate's
        unusual history can rank high on it.
        """
        ranked = sorted(self._alerts_above(rb_cut), key=lambda a: -a["scores"]["anomaly"])[:n]
        return [(a, self.truth_of(a)) for a in ranked]

    def context_counts(self) -> dict[str, int]:
        """Alerts with a host, a nuclear position, a star under them, a moving link, an OpenNGC match, a trail."""
        ctx = [a.get("context") or {} for a in self.alerts]
        catalogs = [{m.get("catalog") for m in c.get("matches") or []} for c in ctx]
        return {"host": sum(c.get("host") is not None for c in ctx),
                "nuclear": sum(bool((c.get("host") or {}).get("nuclear")) for c in ctx),
                "on a star": sum(bool(c.get("on_star")) for c in ctx),
                "moving": sum(bool(c.get("moving")) for c in ctx),
                "OpenNGC match": sum("OpenNGC" in cats for cats in catalogs),
                "on a trail": sum("frame" in cats for cats in catalogs)}


# --- the telescope's follow-up desk ----------------------------------------------------------------


@dataclass(frozen=True)
class FollowupVisit:
    """One follow-up visit the simulated telescope makes: a field in a band, for the requests in it.

    Attributes
    ----------
    field, band : str
    epoch : int
        The field's latest scheduled epoch in that band: the visit repeats it ``visit`` slots later.
    visit : int
        1, 2, ... per (field, band, epoch).
    mjd : float
        Its exposure start (MJD).
    requests : tuple of dict
        The ``followup`` records it serves (highest priority first); the frame's ``FOLLOWUP`` card
        names the first.
    """

    field: str
    band: str
    epoch: int
    visit: int
    mjd: float
    requests: tuple[dict, ...]


def plan_followups(sim: SkySimulator, requests: Iterable[dict], scheduled: dict[tuple[str, str], Truth],
                   visits_made: dict[tuple[str, str, int], int] | None = None) -> list[FollowupVisit]:
    """The visits that serve ``requests``: one per (field, band) holding any, in its next slot.

    A request is served when its target lies in a field of the telescope (``sim.field_at``, at
    least ``edge_margin`` px inside) that it has observed in the requested band (``scheduled``:
    the latest scheduled frame's truth per (field, band)) and it is still open at the visit's time
    (``expiry_mjd`` after it). ``visits_made`` counts the visits already made per (field, band,
    epoch); it is updated.
    """
    made = {} if visits_made is None else visits_made
    groups: dict[tuple[str, str], list[dict]] = {}
    for req in sorted(requests, key=lambda r: (r["priority"], r["created_mjd"], r["request_id"])):
        where = sim.field_at(req["ra"], req["dec"], margin=sim.config.edge_margin)
        if where is not None and (where, req["filter"]) in scheduled:
            groups.setdefault((where, req["filter"]), []).append(req)
    out = []
    for (name, band), reqs in groups.items():
        last = scheduled[(name, band)]
        visit = made.get((name, band, last.epoch), 0) + 1
        mjd = last.mjd + visit * sim.config.followup_gap_days
        still_open = tuple(r for r in reqs if r["expiry_mjd"] > mjd)
        if still_open:
            made[(name, band, last.epoch)] = visit
            out.append(FollowupVisit(name, band, last.epoch, visit, mjd, still_open))
    return out


class FollowupDesk:
    """The simulated telescope's follow-up desk: reads ``followup`` while observing, serves open requests.

    Parameters
    ----------
    settings : KafkaSettings
    sim : SkySimulator
        The telescope: its fields and bands decide what it can serve.
    topic : str
        The request topic (default ``followup``).

    Notes
    -----
    A :class:`streams.followup.FollowupListener` thread (consumer group ``<app_id>.telescope``)
    checks each request against the telescope's bands and clock (:attr:`now_mjd`, the start of
    its latest frame) and dead-letters the others to ``dlq.followup``.
    """

    def __init__(self, settings: KafkaSettings, sim: SkySimulator, topic: str = topics.FOLLOWUP) -> None:
        self.settings, self.sim, self.topic = settings, sim, topic
        self.now_mjd = sim.config.mjd_start
        self.received: list[dict] = []
        self.served: set[str] = set()
        self.visits_made: dict[tuple[str, str, int], int] = {}
        self.listener = FollowupListener(settings, "telescope", sim.config.filters, lambda: self.now_mjd, topic)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True, name="followup-desk")

    def start(self) -> None:
        """Start listening (from the earliest request the group has not handled)."""
        self.listener.open()
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close the consumer."""
        self._stop.set()
        self._thread.join(15)

    def _listen(self) -> None:
        try:
            for req in self.listener.requests(stop=self._stop.is_set):
                with self._lock:
                    self.received.append(req)
        finally:
            self.listener.close()

    def caught_up(self, timeout: float = 30.0) -> bool:
        """Wait until the listener has read every request now on the topic (False: not within ``timeout`` s)."""
        from streams.monitor import read_all

        target = len(read_all(self.settings, [self.topic]))
        deadline = time.monotonic() + timeout
        while self.listener.stats.received < target and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.listener.stats.received >= target

    def serve(self, scheduled: dict[tuple[str, str], Truth],
              publish: Callable[[Frame, Truth], None]) -> list[FollowupVisit]:
        """Observe every open request not served yet, once; ``publish`` each frame. The visits made."""
        with self._lock:
            pending = [r for r in self.received if r["request_id"] not in self.served]
        visits = plan_followups(self.sim, pending, scheduled, self.visits_made)
        for v in visits:
            frame, truth = self.sim.frame(v.field, v.band, v.epoch, v.visit, request_id=v.requests[0]["request_id"])
            self.now_mjd = max(self.now_mjd, truth.mjd)
            publish(frame, truth)
            self.served.update(r["request_id"] for r in v.requests)
        return visits


def _saturated_sky(frame) -> np.ndarray:
    """RA/Dec (deg), shape (n, 2), of the saturated pixels of ``frame``."""
    with np.errstate(invalid="ignore"):
        ys, xs = np.nonzero(frame.data >= frame.meta.saturation)
    ra, dec = frame.wcs.wcs_pix2world(xs, ys, 0)
    return np.column_stack([ra, dec])


def matches(alert: dict, inj) -> bool:
    """Whether ``alert`` lies within :data:`MATCH_PX` of the injection ``inj`` (same frame)."""
    s = alert["source"]
    return bool(np.hypot(s["x"] - inj.x, s["y"] - inj.y) <= MATCH_PX)


def start_stages(bootstrap: str, app_id: str, workdir: Path, config: Path | None = None,
                 stages: tuple[str, ...] = STAGE_NAMES, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """One process per stage (``broker stage NAME``); logs appended to ``workdir/logs/<stage>.log``."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    procs = []
    for stage in stages:
        cmd = [sys.executable, "-m", "streams.cli", "stage", stage, "--bootstrap", bootstrap, "--app-id", app_id,
               "--state-dir", str(workdir / "state"), "--frame-store", str(workdir / "frames"),
               "--metrics-port", "0"]
        if config:
            cmd += ["--config", str(config)]
        with open(workdir / "logs" / f"{stage}.log", "a") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **(env or {})}))
    return procs


def stop_stages(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM every stage (they finish the message in hand), SIGKILL after ``timeout`` s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def _stage_of(proc: subprocess.Popen) -> str:
    """The stage a process of :func:`start_stages` runs (its ``broker stage NAME`` argument)."""
    args = proc.args
    return str(args[4]) if isinstance(args, list) else str(args)


def wait_until_drained(settings: KafkaSettings, procs: list[subprocess.Popen], timeout: float,
                       on_progress: Callable[[int], None] | None = None) -> None:
    """Block until every stage has committed all of its input (raise if a stage died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [_stage_of(p) for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"stage process(es) {dead} exited early; see their logs")
        backlog = sum(stage_backlog(settings, s.name, s.input) for s in STAGES)
        if on_progress:
            on_progress(backlog)
        if backlog == 0:
            return
        time.sleep(1.0)
    raise TimeoutError(f"the pipeline did not drain within {timeout} s")


def run_demo(n_frames: int = 12, bootstrap: str | None = None, workdir: Path = Path("var/demo"),
             sim: SimConfig = SimConfig(), seed: int = 1, interval: float = 0.0, timeout: float = 1800.0,
             on_alert: Callable[[dict], None] | None = None,
             on_progress: Callable[[int, int | None], None] | None = None, followup: bool = True) -> DemoResult:
    """Run the whole chain on ``n_frames`` simulated frames and collect what came out.

    Frames are sent ``interval`` s apart (a telescope's exposure + readout cadence; 0 sends them
    all at once). ``on_alert(alert)`` and ``on_progress(frames_published, backlog_or_None)`` let a
    caller show progress. With ``followup`` the telescope reads the follow-up requests while it
    observes and, once the pipeline has drained, makes one visit per (field, band) holding open
    requests, then the pipeline drains again (:class:`FollowupDesk`; :attr:`DemoResult.followups`,
    :attr:`DemoResult.followup_frames`).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    result = DemoResult()
    app_id = f"demo-{os.getpid()}-{int(time.time())}"
    with ExitStack() as stack:
        if bootstrap is None:
            bootstrap = stack.enter_context(EmbeddedKafka()).bootstrap
        settings = KafkaSettings.load(bootstrap, app_id=app_id)  # BROKER_KAFKA_* for a --bootstrap that needs them
        topics.create_topics(settings, pipeline_topics(sim.filters))
        procs = start_stages(bootstrap, app_id, workdir)
        stack.callback(stop_stages, procs)
        stop = threading.Event()
        subscriber = threading.Thread(target=_subscribe, args=(settings, result, stop, on_alert), daemon=True)
        subscriber.start()
        producer = FrameProducer(settings, FrameStore(str(workdir / "frames")), 8 * 1024 * 1024, 1 << 30)
        telescope = SkySimulator(sim, seed=seed)
        desk = FollowupDesk(settings, telescope) if followup else None
        if desk is not None:
            desk.start()
            stack.callback(desk.stop)

        def publish(frame: Frame, truth: Truth) -> None:
            producer.publish_frame(frame, exposure_end=time.time())  # the simulated shutter closes now
            result.truths[truth.frame_id] = truth
            result.saturated[truth.frame_id] = _saturated_sky(frame)
            result.wcs[truth.frame_id] = frame.wcs
            if desk is not None:
                desk.now_mjd = max(desk.now_mjd, truth.mjd)

        next_shutter = time.monotonic()
        for i, (frame, truth) in enumerate(telescope.frames(n_frames), 1):
            time.sleep(max(0.0, next_shutter - time.monotonic()))
            next_shutter += interval
            publish(frame, truth)
            if on_progress:
                on_progress(i, None)
        producer.flush()
        wait_until_drained(settings, procs, timeout, lambda b: on_progress and on_progress(n_frames, b))
        if desk is not None:
            _follow_up(desk, result, publish, producer.flush)
            wait_until_drained(settings, procs, timeout, lambda b: on_progress and on_progress(n_frames, b))
        _collect(settings, result)
        stop.set()
        subscriber.join(10)
    result.archive = archive_url(load_config(state_dir=workdir / "state"))  # the stages' --state-dir
    result.archived = Archive(result.archive).count()
    return result


def _follow_up(desk: FollowupDesk, result: DemoResult, publish: Callable[[Frame, Truth], None],
               flush: Callable[[], object]) -> None:
    """Serve the requests still open once, after the scheduled frames (the telescope's next slots)."""
    if not desk.caught_up():
        log.warning("the follow-up listener did not catch up with the request topic within 30 s")
    scheduled: dict[tuple[str, str], Truth] = {}
    for truth in result.truths.values():  # the latest scheduled frame per (field, band)
        key = (truth.field, truth.filter)
        if truth.visit == 0 and (key not in scheduled or truth.epoch > scheduled[key].epoch):
            scheduled[key] = truth
    visits = desk.serve(scheduled, publish)
    flush()
    result.followups = list(desk.received)
    result.followup_frames = [t.frame_id for t in result.truths.values() if t.visit > 0]
    log.info("follow-up: %d requests received, %d visits made", len(result.followups), len(visits))


def _collect(settings: KafkaSettings, result: DemoResult) -> None:
    """Batch statuses, candidate count and dead letters from the topics; wait for the alerts."""
    per_frame = {}
    for msg in read_all(settings, [topics.CANDIDATES]):
        batch = serde.decode("candidates", msg.value(), dict(msg.headers() or []))
        result.statuses[batch["frame_id"]] = batch["status"]
        per_frame[batch["frame_id"]] = len(batch["candidates"])  # a frame counts once
    result.candidates = sum(per_frame.values())
    deadline = time.monotonic() + 30.0  # one alert per candidate: let the subscriber catch up
    while len(result.alerts) < result.candidates and time.monotonic() < deadline:
        time.sleep(0.2)
    for msg in read_all(settings, [s.dead_letters for s in STAGES] + [topics.DLQ_FOLLOWUP]):
        result.dead_letters.append(serde.decode("dlq", msg.value(), dict(msg.headers() or [])))


def _subscribe(settings: KafkaSettings, result: DemoResult, stop: threading.Event, on_alert) -> None:
    for alert, received in alerts(settings, topics.ALERTS, timeout=None, stop=stop.is_set):
        result.alerts.append(alert)
        result.latencies.append(received - alert["timing"]["exposure_end"])
        if on_alert:
            on_alert(alert)
