"""Training-set generator: the simulated pipeline run per field, labelled and written as shards.

Per field (:func:`field_candidates`): simulator settings drawn from the seed
(:func:`field_sim_config`), a reference co-added from the first epochs, then each science epoch
with its stress (:mod:`broker.training.stress`) through the pipeline's one path for a frame
(:func:`broker.pipeline.process_frame`), its candidates labelled (:mod:`broker.training.labels`)
and normalised. Fields are iterated in one or several processes (:func:`iter_pipeline_candidates`,
:func:`default_workers`) and written as balanced shards (:mod:`broker.training.shards`) by
:func:`generate_training_set`. Settings: :class:`~broker.training.settings.TrainingSetConfig`.

Importing this module does not import torch: it runs in the generator's worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker.candidate import Candidate
from broker.errors import CutoutError
from broker.frame import Frame
from broker.normalise import NormaliseConfig, normalise_triplet
from broker.pipeline import SUBTRACTED, FixedReference, process_frame
from broker.reference import Reference, ReferenceConfig, build_reference
from broker.simulate import SimConfig, SkySimulator
from broker.subtract import SubtractConfig
from broker.training.labels import (
    FrameStress,
    LabelledCandidate,
    label_candidates,
    relative_to_reference,
    stress_label,
)
from broker.training.settings import REFERENCE_STATES, TrainingSetConfig
from broker.training.shards import write_training_set
from broker.training.stress import add_science_artifacts, reference_gap, reference_variant

#: Peak resident memory of one generator process (bytes): 0.8 GB measured for a field of the
#: default config (``/usr/bin/time -v`` of ``field_candidates``), rounded up.
WORKER_MEMORY = 1 << 30
#: Default settings (frozen, shared).
_DEFAULT = TrainingSetConfig()
_NORMALISE = NormaliseConfig()


def _pair(values: Any) -> tuple[Any, Any]:
    """A two-element setting as a tuple (a config read from JSON holds lists)."""
    a, b = values
    return a, b


def field_sim_config(config: TrainingSetConfig, rng: np.random.Generator) -> SimConfig:
    """Simulator settings of one field, drawn from ``rng`` within the ranges of ``config``."""
    lo = rng.uniform(*config.fwhm_range)
    spike_strength = spike_angle = 0.0
    if config.spike_strength_range[1] > 0:  # drawn only when asked for (older sets' stream)
        spike_strength = float(np.exp(rng.uniform(*np.log(config.spike_strength_range))))
        spike_angle = float(rng.uniform(0.0, 90.0))
    return SimConfig(
        shape=_pair(config.shape),
        filters=tuple(config.filters),
        n_transients=config.n_transients,
        n_cosmic_rays=config.n_cosmic_rays,
        transient_snr_range=_pair(config.transient_snr_range),
        transient_on_galaxy=config.transient_on_galaxy,
        n_variables=config.n_variables,
        variable_mag_range=_pair(config.variable_mag_range),
        variable_amplitude_range=_pair(config.variable_amplitude_range),
        variable_bright_cap=(None if config.variable_bright_cap is None
                             else _pair(config.variable_bright_cap)),
        reference_epochs=int(rng.integers(config.reference_epochs_range[0],
                                          config.reference_epochs_range[1] + 1)),
        fwhm_range=(lo, lo * rng.uniform(1.1, 1.8)),
        sky_level=float(np.exp(rng.uniform(*np.log(config.sky_range)))),
        star_mag_range=(float(rng.uniform(*config.bright_star_mag_range)), 22.5),
        n_stars=int(rng.integers(1500, 5000)),
        saturation=float(rng.uniform(*config.saturation_range)),
        satellite_probability=0.3,
        spike_strength=spike_strength,
        spike_angle=spike_angle,
    )


@dataclass
class _Field:
    """One simulated field: its simulator, its reference and what the reference epochs held."""

    name: str
    filt: str
    sim: SkySimulator
    n_ref: int
    reference: Reference
    ref_injections: list


def field_candidates(config: TrainingSetConfig, f: int,
                     norm: NormaliseConfig = _NORMALISE) -> list[LabelledCandidate]:
    """Labelled candidates of field ``f``: reference from the first epochs, then the science epochs.

    A field whose reference cannot be built gives no candidates, a frame whose subtraction fails
    none of its own (both reported on stdout).
    """
    rng = np.random.default_rng([config.seed, f])
    field = _field(config, f, rng)
    if field is None:
        return []
    out: list[LabelledCandidate] = []
    for e in range(field.n_ref, field.n_ref + config.epochs_per_field):
        out += _epoch_candidates(config, field, e, rng, norm)
    return out


def _field(config: TrainingSetConfig, f: int, rng: np.random.Generator) -> _Field | None:
    """Field ``f``'s simulator and its reference co-added from its reference epochs.

    None, with a message, when the reference cannot be built.
    """
    sim_cfg = field_sim_config(config, rng)
    name = f"F{config.seed:03d}-{f:04d}"
    filt = config.filters[f % len(config.filters)]
    sim = SkySimulator(sim_cfg, seed=config.seed * 100_003 + f)
    n_ref = int(sim_cfg.reference_epochs)
    ref_frames = [sim.frame(name, filt, e) for e in range(n_ref)]
    ref_injections = [i for _, t in ref_frames for i in t.injections]
    try:
        reference = build_reference([fr for fr, _ in ref_frames], ReferenceConfig(n_frames=n_ref))
    except Exception as exc:  # a field without a reference is skipped, not fatal
        print(f"[training] {name} {filt}: reference failed: {exc!r}")
        return None
    # the pixels of the reference epochs are in the reference now; only their truth is kept
    return _Field(name, filt, sim, n_ref, reference, ref_injections)


def _epoch_candidates(config: TrainingSetConfig, field: _Field, e: int, rng: np.random.Generator,
                      norm: NormaliseConfig) -> list[LabelledCandidate]:
    """Labelled candidates of science epoch ``e``.

    Its stress is drawn, the frame goes through the pipeline, and each candidate is labelled by
    position and then by the stress.
    """
    frame, truth = field.sim.frame(field.name, field.filt, e)
    ref_e, residual_kind, shift_at = reference_variant(field.reference, config, rng)
    ref_e = reference_gap(ref_e, config, rng)
    extra = add_science_artifacts(frame, truth.fwhm, truth.sky, config, rng)
    cands = _subtracted(frame, ref_e, config, rng, f"{field.name} {field.filt} epoch {e}")
    if cands is None:
        return []
    injections = relative_to_reference(truth.injections, field.ref_injections) + extra
    trails = [i for i in injections if i.kind == "satellite" and i.x0 is not None]
    # a lobe of a star shifted by r px peaks up to ~r/2 + sigma from it (1"/px simulator)
    residual_radius = 2.0 + (config.misalign_px[1] if shift_at is not None
                             and config.misalign_wavelength_px[1] > 0 else 0.0)
    labels = label_candidates(cands, injections, config.match_radius, config.real_kinds,
                              residual_kind, frame.data.shape, config.edge_px,
                              config.min_real_snr, residual_radius)
    stress = FrameStress(shift_at, trails, truth.fwhm, frame.meta.saturation)
    out = []
    for c, (lab, kind, inj) in zip(cands, labels, strict=True):
        lab, kind = stress_label(c, lab, kind, inj, stress, config)
        item = _labelled(c, lab, kind, field, norm, REFERENCE_STATES[residual_kind])
        if item is not None:
            out.append(item)
    return out


def _subtracted(frame: Frame, reference: Reference, config: TrainingSetConfig,
                rng: np.random.Generator, where: str) -> list[Candidate] | None:
    """Candidates of one science frame from :func:`broker.pipeline.process_frame` with this reference.

    Cosmic rays are left uncleaned with probability ``p_uncleaned``; None (with a message) when the
    subtraction fails.
    """
    try:
        cleaned = rng.uniform() >= config.p_uncleaned
        sub_cfg = SubtractConfig() if cleaned else SubtractConfig(cosmic_ray_sigma=0.0)
        result = process_frame(frame, FixedReference(reference), sub_cfg)
    except Exception as exc:  # a failed subtraction only costs that frame
        print(f"[training] {where}: subtraction failed: {exc!r}")
        return None
    if result.status != SUBTRACTED:  # cannot happen with the field's own reference
        print(f"[training] {where}: not subtracted ({result.status})")
        return None
    return result.candidates


def _labelled(c: Candidate, lab: int, kind: str, field: _Field, norm: NormaliseConfig,
              reference: str) -> LabelledCandidate | None:
    """The candidate normalised; None when its cutouts cannot be normalised."""
    try:
        x, _ = normalise_triplet(c.science, c.reference, c.difference, norm)
    except CutoutError:
        return None
    return LabelledCandidate(x.astype(np.float16), lab, kind, field.name, float(c.detection.snr), reference)


def _field_job(args: tuple[TrainingSetConfig, int]) -> list[LabelledCandidate]:
    return field_candidates(*args)


def default_workers() -> int:
    """Generator processes for this machine: one per CPU core, at most one per GiB of free memory.

    The memory per process is :data:`WORKER_MEMORY`. The set does not depend on it (fields are
    written in field order).
    """
    cores = os.cpu_count() or 1
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return cores
    return max(1, min(cores, free // WORKER_MEMORY))


def iter_pipeline_candidates(config: TrainingSetConfig) -> Iterator[LabelledCandidate]:
    """Labelled candidates of fields 0, 1, 2, ... (``config.workers`` processes), in field order.

    Stops after ``max_frames`` science frames; the caller stops earlier once it has enough.
    """
    n_fields = -(-config.max_frames // config.epochs_per_field)
    jobs = ((config, f) for f in range(n_fields))
    if config.workers <= 1:
        for job in jobs:
            yield from _field_job(job)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(config.workers) as pool:
        for items in pool.imap(_field_job, jobs):
            yield from items


def generate_training_set(
    out_dir: str | Path, config: TrainingSetConfig = _DEFAULT, progress: bool = True
) -> dict:
    """Run the simulated pipeline and write the labelled, balanced training set (see module doc).

    Returns the manifest (also written to ``out_dir/manifest.json``) with the wall time.
    """
    return write_training_set(out_dir, iter_pipeline_candidates(config), config, "pipeline",
                              progress)
