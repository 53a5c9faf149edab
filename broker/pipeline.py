"""One path for a frame: the reference policy, subtraction and detection, then scoring.

The subtract stage, the pipeline benchmark (through the stage handlers) and the training-set
generator all call :func:`process_frame`; the subtract stage also searches, through it, the frames
a field's new reference left out (:func:`search_left_out`); the score stage calls
:func:`associate_and_score` with its :class:`ScoreModels`.
Nothing else chains these steps. See ``docs/architecture.md`` ("Batch statuses").
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from broker.anomaly import AnomalyModel
from broker.candidate import Candidate
from broker.context import ContextConfig, OpenNGC, build_context, trail_matches
from broker.diffstore import DifferenceStore, celestial_header
from broker.errors import BadCoordinates, BrokerError, Outage, PoorQuality
from broker.frame import Frame
from broker.history import ObjectHistory
from broker.lcclass import LightCurveClassifier
from broker.ledger import FrameLedger
from broker.lightcurve import FEATURE_NAMES, lc_features, light_curve, model_inputs
from broker.moving import MovingConfig, link_from_history
from broker.reference import Reference, ReferenceStore
from broker.subtract import SubtractConfig, SubtractionResult, subtract_and_detect

#: Candidates come from a difference image.
SUBTRACTED = "SUBTRACTED"
#: No reference yet; the frame was kept to build one (no candidates).
REFERENCE_BUILDING = "REFERENCE_BUILDING"
#: The frame is part of the reference, under its id or as the same exposure under another (no candidates).
IN_REFERENCE = "IN_REFERENCE"
#: No reference yet and the frame is not clean enough to help build one (no candidates).
NO_REFERENCE = "NO_REFERENCE"
#: Every status a frame can end with, in the order of the ``BatchStatus`` Avro enum.
STATUSES = (SUBTRACTED, REFERENCE_BUILDING, IN_REFERENCE, NO_REFERENCE)


class References(Protocol):
    """Where :func:`process_frame` finds and builds references (:class:`~broker.reference.ReferenceStore`)."""

    def get(self, key: tuple[str, str, str]) -> Reference | None:
        """The reference of ``(telescope, field, filter)``, or None when there is none yet."""

    def offer(self, frame: Frame) -> Reference | None:
        """Keep a frame of a key without reference; return the reference once it is built."""


@dataclass(frozen=True)
class FixedReference:
    """One reference, given: :func:`process_frame` subtracts every frame of its key with it.

    For the training-set generator and benchmarks, which build (or alter) a reference
    themselves; a frame of another key finds none and is offered nowhere.
    """

    reference: Reference

    def get(self, key: tuple[str, str, str]) -> Reference | None:
        """The reference when ``key`` is its key, else None."""
        return self.reference if tuple(key) == tuple(self.reference.key) else None

    def offer(self, frame: Frame) -> Reference | None:
        """Nothing is built: None."""
        return None


@dataclass(frozen=True)
class FrameResult:
    """What became of one frame.

    Attributes
    ----------
    status : str
        One of :data:`STATUSES`.
    reference_frames : tuple of str
        Frame ids co-added into the reference used (or being built); empty when none.
    candidates : list of Candidate
        In order of decreasing |S_corr|; empty unless ``status`` is :data:`SUBTRACTED`.
    diagnostics : dict of str -> float
        Subtraction diagnostics (:class:`~broker.subtract.SubtractionResult`), with
        ``t_forced_s`` and ``t_diffstore_s`` (s) when a difference store was given; empty unless
        subtracted.
    """

    status: str
    reference_frames: tuple[str, ...] = ()
    candidates: list[Candidate] = field(default_factory=list)
    diagnostics: dict[str, float] = field(default_factory=dict)

    @property
    def limiting_flux(self) -> float | None:
        """5-sigma limiting flux of the difference image (science ADU); None unless subtracted (or unknown)."""
        value = self.diagnostics.get("limiting_flux")
        return value if self.status == SUBTRACTED and value is not None and math.isfinite(value) else None


def process_frame(frame: Frame, references: References, config: SubtractConfig = SubtractConfig(),
                  clean: bool = True, differences: DifferenceStore | None = None,
                  skip: Sequence[str] = ()) -> FrameResult:
    """Subtract ``frame``'s reference and detect, or keep the frame to build that reference.

    Parameters
    ----------
    frame : Frame
        A validated science exposure.
    references : References
        The reference store (or a :class:`FixedReference`).
    config : SubtractConfig
    clean : bool
        Whether ingest raised no quality flag: only clean frames help build a reference.
    differences : DifferenceStore, optional
        Where subtracted frames keep their difference images: each candidate then gets forced
        photometry on the earlier ones (``Candidate.forced``), and the frame's is kept for later
        frames. None (training, benchmarks): neither.
    skip : sequence of str
        The frame's quality flags that forbid subtracting it (``IngestConfig.subtract_skip_on``):
        when any is given and the field has a reference, the frame is refused (:class:`PoorQuality`)
        instead of subtracted. A flagged frame never helps build a reference either way.

    Returns
    -------
    FrameResult
        :data:`NO_REFERENCE` (no reference, frame not clean), :data:`REFERENCE_BUILDING` (kept),
        :data:`IN_REFERENCE` (part of the reference, possibly the one that completed it, or the
        exposure of one of its frames re-sent under another id, re-compressed, offset or scaled:
        :meth:`~broker.reference.Reference.exposure_of`) or :data:`SUBTRACTED` with the candidates
        (also a frame that completed a reference but was left out of its co-add:
        :attr:`~broker.reference.Reference.omitted`).

    Raises
    ------
    PoorQuality
        The field has a reference and ``skip`` names a flag of the frame, or nothing measured the
        subtraction's flux ratio F_r of the reference to the frame (no 3 matched stars measure it and
        the two have no measured zero points: :func:`broker.fluxratio.measure_flux_ratio`); the
        latter right after F_r is measured, before ZOGY (:func:`broker.subtract.check_flux_ratio`).
    BrokerError
        From :func:`~broker.subtract.subtract_and_detect` or the store (bad reference, no PSF,
        alignment failure).
    """
    reference = references.get(frame.meta.reference_key)
    if reference is None:
        if not clean or skip:
            return FrameResult(NO_REFERENCE)
        reference = references.offer(frame)
        if reference is None:
            return FrameResult(REFERENCE_BUILDING)
        # a frame the co-add it completed left out (its flux ratio unmeasured) is subtracted from it
    if frame.meta.frame_id in reference.frame_ids or reference.exposure_of(frame.data) is not None:
        return FrameResult(IN_REFERENCE, tuple(reference.frame_ids))
    if skip:
        raise PoorQuality(f"frame {frame.meta.frame_id} not subtracted: quality flags {sorted(skip)} "
                          "(ingest.subtract_skip_on)")
    result = subtract_and_detect(frame, reference, config, keep_difference=differences is not None,
                                 require_flux_ratio=True)  # refused before ZOGY when nothing measures F_r
    diagnostics = {k: float(v) for k, v in result.diagnostics.items()}
    if differences is not None:
        diagnostics.update(_forced_and_kept(frame, result, differences))
    return FrameResult(SUBTRACTED, tuple(reference.frame_ids), list(result.candidates), diagnostics)


@dataclass(frozen=True)
class LeftOutSearch:
    """A frame its field's reference left out, searched against it (:func:`search_left_out`).

    Attributes
    ----------
    frame : Frame
    outcome : FrameResult or BrokerError
        What :func:`process_frame` made of it, or why it refused it (its dead letter's reason).
    source : str or None
        ``topic:partition:offset`` of the message it first came from (the ledger's), None when unknown.
    """

    frame: Frame
    outcome: FrameResult | BrokerError
    source: str | None

    @property
    def status(self) -> str:
        """The batch status of its search, or its error's reason."""
        return self.outcome.status if isinstance(self.outcome, FrameResult) else self.outcome.reason


def search_left_out(store: ReferenceStore, ledger: FrameLedger, key: tuple[str, str, str], source: str,
                    config: SubtractConfig = SubtractConfig(), differences: DifferenceStore | None = None,
                    exclude: str = "") -> list[LeftOutSearch]:
    """Search the frames of ``key`` its reference left out (:meth:`ReferenceStore.left_out`) with :func:`process_frame`.

    Such a frame was answered :data:`REFERENCE_BUILDING` while the reference was being built, and the
    co-add then left it out (no measured flux ratio): nothing was looked for in it. It is searched
    once, in the transaction of the message at ``source`` (``topic:partition:offset``): the first
    message of the key to find the reference after it exists, the one that completed it as a rule.
    It is owed while the ledger holds it as :data:`REFERENCE_BUILDING` (or not at all) and has no
    search of it, or one from ``source`` itself (a redelivery: searched again, as exactly-once
    requires); any other frame is dropped from the store (searched in an earlier transaction, or
    answered otherwise). ``exclude``: the frame of the message in hand, which its own
    :func:`process_frame` answers. The caller records each search (:meth:`FrameLedger.record_search`)
    once its own frame succeeded, and emits a batch or a dead letter for each.

    Raises
    ------
    Outage
        From the stores: the whole message is kept and retried.
    """
    searches = []
    for frame in store.left_out(key):
        meta = frame.meta
        if meta.frame_id == exclude:
            continue
        entry = ledger.entry(meta)
        if entry.status not in (None, REFERENCE_BUILDING) or entry.searched_from not in (None, source):
            store.drop_left_out(key, meta.frame_id)
            continue
        outcome: FrameResult | BrokerError
        try:
            outcome = process_frame(frame, store, config, True, differences)
        except Outage:
            raise
        except BrokerError as exc:
            outcome = exc
        searches.append(LeftOutSearch(frame, outcome, entry.source))
    return searches


def _forced_and_kept(frame: Frame, result: SubtractionResult, differences: DifferenceStore) -> dict[str, float]:
    """Forced photometry of the candidates on the earlier difference images, then this one kept.

    Sets ``forced`` on each candidate; returns the time of each part (``t_forced_s``,
    ``t_diffstore_s``, s). Measuring first means a crash between the two leaves the frame
    unstored, and its replay stores it; earlier frames are those that started before it
    (:meth:`~broker.diffstore.DifferenceStore.forced_photometry`), so the answer is the same.
    """
    meta, cands = frame.meta, result.candidates
    t0 = time.perf_counter()
    ra = np.array([c.detection.ra for c in cands])
    dec = np.array([c.detection.dec for c in cands])
    for cand, forced in zip(cands, differences.forced_photometry(meta.reference_key, meta.mjd_start, ra, dec),
                            strict=True):
        cand.forced = forced
    t1 = time.perf_counter()
    if result.difference is not None:
        differences.put(meta, celestial_header(frame), result.difference)
    return {"t_forced_s": t1 - t0, "t_diffstore_s": time.perf_counter() - t1}


@dataclass(frozen=True)
class ScoreModels:
    """What the score stage judges a candidate with, loaded once at start-up ("Scoring").

    Attributes
    ----------
    anomaly : AnomalyModel
        Anomaly score over light-curve and context features (:mod:`broker.anomaly`).
    lcclass : LightCurveClassifier
        Light-curve class probabilities (:mod:`broker.lcclass`).
    catalog : OpenNGC or None
        Deep-sky catalog of the context (None: no catalog matches).
    context : ContextConfig
    moving : MovingConfig
    """

    anomaly: AnomalyModel
    lcclass: LightCurveClassifier
    catalog: OpenNGC | None = None
    context: ContextConfig = ContextConfig()
    moving: MovingConfig = MovingConfig()

    @classmethod
    def load(cls, anomaly_model: str | None = None, lcclass_model: str | None = None, openngc: str | None = None,
             context: ContextConfig = ContextConfig(), moving: MovingConfig = MovingConfig()) -> ScoreModels:
        """Load the models (a version in ``broker/models/`` or a path; None: the defaults) and the catalog.

        ``openngc`` is an OpenNGC database (None: the one ``pyongc`` ships; ``""``: no catalog).

        Raises
        ------
        ModelError, ConfigError
            A model or the catalog is missing or corrupt: the stage does not start.
        """
        catalog = None if openngc == "" else OpenNGC(openngc, config=context)
        return cls(AnomalyModel.load(anomaly_model), LightCurveClassifier.load(lcclass_model), catalog, context, moving)


def associate_and_score(history: ObjectHistory, models: ScoreModels, frame_id: str, mjd: float, band: str,
                        candidates: Sequence[Candidate], magzp: float | None = None,
                        limiting_flux: float | None = None, telescope: str | None = None,
                        shape: tuple[int, int] | None = None) -> None:
    """Associate ``candidates`` with known objects, then describe and score them.

    Sets ``obj``, ``history``, ``context``, ``features``, ``classification`` and ``anomaly`` on each
    candidate (the score stage's work), after checking every position
    (:class:`~broker.errors.BadCoordinates`: a NaN or off-sky RA/Dec, or a non-finite MJD, would
    otherwise reach the history's NOT NULL columns as NULL); ``mjd`` (MJD, days) is the frame's
    exposure start, from which the history's ages are taken. The frame's zero point ``magzp`` (mag
    of 1 ADU), ``limiting_flux`` (ADU) and ``telescope`` are kept with each detection for later
    light curves (None when unknown); each object keeps its latest features and classification.
    With the frame's ``shape`` (ny, nx), candidates in a line along a trail get the trail among
    their context's matches (:func:`broker.context.trail_matches`; not a model input).
    """
    if not candidates:
        return
    if not math.isfinite(mjd):
        raise BadCoordinates(f"frame {frame_id}: MJD {mjd} is not finite; nothing written to the history")
    for cand in candidates:
        ra, dec = cand.detection.ra, cand.detection.dec
        if not (math.isfinite(ra) and math.isfinite(dec) and -90.0 <= dec <= 90.0):
            raise BadCoordinates(f"candidate {cand.cand_id}: RA, Dec = ({ra}, {dec}) is not a position on the sky; "
                                 "nothing of the frame written to the history")
    history.associate(frame_id, mjd, band, list(candidates), magzp, limiting_flux, telescope)
    rows = [_describe(history, models, cand, mjd, band, magzp, limiting_flux, telescope) for cand in candidates]
    trails = trail_matches([c.detection for c in candidates], shape, frame_id) if shape else {}
    for i, trail in trails.items():
        context = candidates[i].context
        if context is not None:  # set by _describe
            context["matches"].append(trail.to_record())
    x = np.stack(rows)
    for cand, classification, anomaly in zip(candidates, models.lcclass.classify(x), models.anomaly.score(x),
                                             strict=True):
        cand.classification = classification.to_record()
        cand.anomaly = float(anomaly)
    history.keep_summaries([(c.obj.object_id, mjd, c.features, c.classification) for c in candidates if c.obj])


def _describe(history: ObjectHistory, models: ScoreModels, cand: Candidate, mjd: float, band: str,
              magzp: float | None, limiting_flux: float | None, telescope: str | None) -> np.ndarray:
    """Set ``context`` and ``features`` on an associated candidate; its row of model inputs."""
    det = cand.detection
    new = cand.obj is not None and cand.obj.ndet == 1  # a new object: perhaps a moving one seen before
    tracklet = link_from_history(history, det.ra, det.dec, mjd, models.moving) if new else None
    context = build_context(det, models.catalog, tracklet, models.context)
    current = {"cand_id": cand.cand_id, "mjd": mjd, "filter": band, "flux": det.flux, "flux_err": det.flux_err,
               "magzp": magzp, "limiting_flux": limiting_flux, "telescope": telescope}
    features = lc_features(light_curve(current, cand.history, cand.forced))
    cand.context = context.to_record()
    cand.features = {name: float(v) if math.isfinite(v) else None
                     for name, v in zip(FEATURE_NAMES, features, strict=True)}
    return model_inputs(features, context.features())
