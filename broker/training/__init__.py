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

Layout, without torch: :mod:`~broker.training.settings` (:class:`TrainingSetConfig`, kinds,
label settings), :mod:`~broker.training.stress` (wrong references, science artifacts),
:mod:`~broker.training.labels` (labelling rules), :mod:`~broker.training.shards` (shard writer and
manifest), :mod:`~broker.training.generate` (the per-field pipeline run),
:mod:`~broker.training.data` (reading shards, synthetic triplets, split),
:mod:`~broker.training.metrics` and :mod:`~broker.training.ztf` (real ZTF alerts); with torch:
:mod:`~broker.training.augmentation`, :mod:`~broker.training.trainer` (TrainConfig and the
training loop), :mod:`~broker.training.evaluation` (plots, :func:`main_eval`, report) and
:mod:`~broker.training.main` (:func:`main_train`, model and anomaly cards). Import each name from
its module: the package imports nothing, so the generator's worker processes never load torch.
"""
