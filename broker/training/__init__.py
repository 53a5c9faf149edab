"""Training data, training, evaluation and model card of the real/bogus CNN (and the anomaly data).

Data (:func:`generate_training_set`): the sky simulator makes fields of several epochs with
per-field conditions drawn from the seed (:class:`TrainingSetConfig`); the first epochs are
co-added into a reference, every later frame goes through the project's own subtraction and
detection, with deliberately wrong references (sub-pixel shifts, extra blur) and extra science
artifacts (hot pixels, bad columns, bleeds, trails) on some frames, and each candidate is labelled
from the injection truth by position (:func:`label_candidates`). Candidates are streamed into
balanced, compressed ``.npz`` shards of normalised triplets with a JSON manifest
(:class:`ShardWriter`), so memory stays bounded whatever the size.

Training (:func:`train`): fixed seed, validation split by field, early stopping, flips and 90
degree rotations plus edge-truncation and NaN-mask augmentation, a rich progress bar.

Evaluation (:func:`main_eval`): held-out simulated set (other seed, other fields) and real ZTF
alerts, written as Markdown + PNG. One command does everything: :func:`main_train`
(``broker train-realbogus``); :func:`synth_triplets` is a stamp-level generator for tests only.

Layout: :mod:`~broker.training.generate` (config, labelling, per-field pipeline run, shard
writer and manifest), :mod:`~broker.training.data` (reading shards, synthetic triplets, split,
augmentation), :mod:`~broker.training.metrics`, :mod:`~broker.training.trainer` (TrainConfig and
the training loop), :mod:`~broker.training.ztf` (real ZTF alerts),
:mod:`~broker.training.evaluation` (plots, :func:`main_eval`, report) and
:mod:`~broker.training.main` (:func:`main_train`, model and anomaly cards). Every name is
re-exported here.
"""

from __future__ import annotations

from broker.training.data import (
    _augment as _augment,
)
from broker.training.data import (
    _gauss as _gauss,
)
from broker.training.data import (
    iter_synthetic_candidates,
    load_training_set,
    split_indices,
    synth_triplets,
)
from broker.training.evaluation import (
    PROMOTION_LEVEL,
    TARGETS,
    main_eval,
    plot_histograms,
    plot_roc,
    plot_triplet_grid,
    promotion_check,
    write_eval_report,
)
from broker.training.evaluation import (
    _examples as _examples,
)
from broker.training.evaluation import (
    _fmt as _fmt,
)
from broker.training.evaluation import (
    _plt as _plt,
)
from broker.training.generate import (
    ARTIFACT_KINDS,
    REAL_KINDS,
    REFERENCE_STATES,
    SCIENCE_ARTIFACT_KINDS,
    ArtifactInjection,
    LabelledCandidate,
    ShardWriter,
    TrainingSetConfig,
    add_science_artifacts,
    field_candidates,
    field_sim_config,
    generate_training_set,
    iter_pipeline_candidates,
    label_candidates,
    label_settings_differ,
    lobe_snrs,
    opposite_lobe_snr,
    relative_to_reference,
    residual_flux,
    trail_flux,
    write_training_set,
)
from broker.training.generate import (
    _config_dict as _config_dict,
)
from broker.training.generate import (
    _field_job as _field_job,
)
from broker.training.generate import (
    _git_commit as _git_commit,
)
from broker.training.generate import (
    _reference_variant as _reference_variant,
)
from broker.training.generate import (
    _write_manifest as _write_manifest,
)
from broker.training.main import (
    _ensure_set as _ensure_set,
)
from broker.training.main import (
    main_train,
    model_cost,
    reproduce_command,
    write_anomaly_card,
    write_model_card,
)
from broker.training.metrics import (
    _auc_se as _auc_se,
)
from broker.training.metrics import (
    by_lobe_ratio,
    by_reference_brightness,
    by_sign,
    by_subset,
    domain_stats,
    equal_error,
    evaluate,
    evaluate_simulated,
    paired_auc_difference,
)
from broker.training.trainer import (
    TrainConfig,
    auto_threads,
    kind_weights,
    train,
)
from broker.training.trainer import (
    _scores as _scores,
)
from broker.training.ztf import (
    compare_with_ztf,
    evaluate_on_ztf,
    ztf_triplets,
)

__all__ = [
    "ARTIFACT_KINDS",
    "ArtifactInjection",
    "LabelledCandidate",
    "PROMOTION_LEVEL",
    "REAL_KINDS",
    "REFERENCE_STATES",
    "SCIENCE_ARTIFACT_KINDS",
    "ShardWriter",
    "TARGETS",
    "TrainConfig",
    "TrainingSetConfig",
    "add_science_artifacts",
    "auto_threads",
    "by_reference_brightness",
    "by_lobe_ratio",
    "by_sign",
    "by_subset",
    "compare_with_ztf",
    "domain_stats",
    "equal_error",
    "evaluate",
    "evaluate_on_ztf",
    "evaluate_simulated",
    "field_candidates",
    "field_sim_config",
    "generate_training_set",
    "iter_pipeline_candidates",
    "iter_synthetic_candidates",
    "kind_weights",
    "label_candidates",
    "label_settings_differ",
    "lobe_snrs",
    "opposite_lobe_snr",
    "paired_auc_difference",
    "relative_to_reference",
    "reproduce_command",
    "residual_flux",
    "trail_flux",
    "load_training_set",
    "main_eval",
    "main_train",
    "model_cost",
    "plot_histograms",
    "plot_roc",
    "plot_triplet_grid",
    "promotion_check",
    "split_indices",
    "synth_triplets",
    "train",
    "write_anomaly_card",
    "write_eval_report",
    "write_model_card",
    "write_training_set",
    "ztf_triplets",
]
