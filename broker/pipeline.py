"""One path for a frame: the reference policy, subtraction and detection, then scoring.

The subtract stage, the pipeline benchmark (through the stage handlers) and the training-set
generator all call :func:`process_frame`; the score stage calls :func:`associate_and_score`.
Nothing else chains these steps. See ``docs/architecture.md`` ("Batch statuses").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from broker.anomaly import AnomalyModel
from broker.candidate import Candidate
from broker.frame import Frame
from broker.history import ObjectHistory
from broker.reference import Reference
from broker.subtract import SubtractConfig, subtract_and_detect

#: Candidates come from a difference image.
SUBTRACTED = "SUBTRACTED"
#: No reference yet; the frame was kept to build one (no candidates).
REFERENCE_BUILDING = "REFERENCE_BUILDING"
#: The frame is part of the reference (no candidates).
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
        Subtraction diagnostics (:class:`~broker.subtract.SubtractionResult`); empty unless
        subtracted.
    """

    status: str
    reference_frames: tuple[str, ...] = ()
    candidates: list[Candidate] = field(default_factory=list)
    diagnostics: dict[str, float] = field(default_factory=dict)


def process_frame(frame: Frame, references: References, config: SubtractConfig = SubtractConfig(),
                  clean: bool = True) -> FrameResult:
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

    Returns
    -------
    FrameResult
        :data:`NO_REFERENCE` (no reference, frame not clean), :data:`REFERENCE_BUILDING` (kept),
        :data:`IN_REFERENCE` (part of the reference, possibly the one that completed it) or
        :data:`SUBTRACTED` with the candidates.

    Raises
    ------
    BrokerError
        From :func:`~broker.subtract.subtract_and_detect` or the store (bad reference, no PSF,
        alignment failure).
    """
    reference = references.get(frame.meta.reference_key)
    if reference is None:
        if not clean:
            return FrameResult(NO_REFERENCE)
        reference = references.offer(frame)
        if reference is None:
            return FrameResult(REFERENCE_BUILDING)
        return FrameResult(IN_REFERENCE, tuple(reference.frame_ids))
    if frame.meta.frame_id in reference.frame_ids:
        return FrameResult(IN_REFERENCE, tuple(reference.frame_ids))
    result = subtract_and_detect(frame, reference, config)
    diagnostics = {k: float(v) for k, v in result.diagnostics.items()}
    return FrameResult(SUBTRACTED, tuple(reference.frame_ids), list(result.candidates), diagnostics)


def associate_and_score(history: ObjectHistory, model: AnomalyModel, frame_id: str, mjd: float,
                        band: str, candidates: Sequence[Candidate]) -> None:
    """Associate ``candidates`` with known objects, then set their anomaly scores.

    Sets ``obj``, ``history`` and ``anomaly`` on each candidate (the score stage's work);
    ``mjd`` (MJD, days) is the frame's exposure start, from which the history's ages are taken.
    """
    if not candidates:
        return
    history.associate(frame_id, mjd, band, list(candidates))
    model.score_candidates(candidates, mjd)
