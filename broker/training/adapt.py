"""Unsupervised adaptation of a real/bogus model to a telescope: batch-norm statistics (AdaBN).

:func:`adapt_batchnorm` re-estimates the running means and variances of every batch-norm layer
of a model from a telescope's unlabelled triplets (Li et al. 2016, "Revisiting batch
normalization for practical domain adaptation"), leaving every learnt weight as it was. The
network then sees that telescope's stamps with the feature scaling it learnt on simulated
ones. It needs no labels: for ZTF it uses the pixels of public alerts (never their rb / drb).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from broker.errors import ModelError
from broker.realbogus import RealBogusClassifier

#: Fewest unlabelled triplets accepted: the statistics of a few hundred stamps are stable to a
#: few % per channel; fewer would fit the statistics to a handful of objects.
MIN_TRIPLETS = 200


def adapt_batchnorm(clf: RealBogusClassifier, x: np.ndarray, version: str | None = None,
                    batch_size: int = 256, seed: int = 0) -> RealBogusClassifier:
    """A copy of ``clf`` whose batch-norm statistics are those of the triplets ``x``.

    Parameters
    ----------
    clf : RealBogusClassifier
        Not modified.
    x : ndarray, shape (N, 3, 63, 63)
        Normalised unlabelled triplets of the target telescope (N >= :data:`MIN_TRIPLETS`).
    version : str, optional
        Default ``clf.version + "-adabn"``.
    batch_size : int
        Triplets per forward pass; the statistics are the cumulative average over all of them.
    seed : int
        Order of the triplets.

    Raises
    ------
    ModelError
        Fewer than :data:`MIN_TRIPLETS` triplets, or a model without batch-norm layers.
    """
    if len(x) < MIN_TRIPLETS:
        raise ModelError(f"batch-norm adaptation needs >= {MIN_TRIPLETS} triplets, got {len(x)}")
    net = copy.deepcopy(clf.net)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ModelError("the model has no batch-norm layers to adapt")
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
    net.train()
    xs = clf.model_input(np.asarray(x, np.float32)[np.random.default_rng(seed).permutation(len(x))])
    with torch.no_grad():
        for i in range(0, len(xs), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(xs[i : i + batch_size]))
            net(xb.contiguous(memory_format=torch.channels_last))
    for m in norms:
        m.momentum = 0.1  # torch's default, as the model was built
    net.eval()
    meta = {k: v for k, v in clf.metadata.items() if k not in ("evaluation", "version")}
    meta["adapted"] = {"method": "AdaBN (batch-norm statistics re-estimated)", "base": clf.version,
                       "n_triplets": int(len(x))}
    return RealBogusClassifier(net, version or f"{clf.version}-adabn", meta, clf.norm_config,
                               clf.config)
