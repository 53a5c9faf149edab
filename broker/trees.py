"""Forests of decision trees fitted with scikit-learn, evaluated with numpy alone.

scikit-learn is only needed to *fit* (the ``[train]`` extra); the score stage loads a
:class:`Forest` from plain arrays (``.npz``, ``allow_pickle=False``) and evaluates it here:

- :func:`predict_proba`: ``RandomForestClassifier.predict_proba`` (mean of the trees' leaf class
  fractions);
- :func:`contributions`: the per-sample, per-feature decomposition of those probabilities along
  the decision paths (Saabas): ``proba = bias + contributions.sum(axis=1)``;
- :func:`isolation_score`: ``IsolationForest.score_samples`` (the opposite of the anomaly score of
  Liu et al. 2008, in [-1, 0), lower = more anomalous).

scikit-learn compares features as float32 with the (float64) thresholds; the inputs are cast the
same way so the results are equal to scikit-learn's to float rounding. NaN inputs must be imputed
by the caller (the forests here are fitted on imputed data; a NaN goes right at every split).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BIG", "Forest", "average_path_length", "contributions", "export_forest", "impute",
           "isolation_score", "leaves", "missing_fill", "model_path", "predict_proba", "read_model"]

#: The arrays of a forest, as stored (key prefix + name).
_ARRAYS = ("left", "right", "feature", "threshold", "value", "n_node_samples", "depth", "roots")
#: Rows evaluated at once (memory: rows x trees x 8 bytes per array).
_CHUNK = 8192


@dataclass(frozen=True)
class Forest:
    """Trees concatenated into flat node arrays.

    Attributes
    ----------
    left, right : (M,) int32 ndarray
        Absolute index of each node's children; -1 for leaves.
    feature : (M,) int32 ndarray
        Feature tested at each node (-2 at leaves, as scikit-learn).
    threshold : (M,) float64 ndarray
        Go left when ``float32(x[feature]) <= threshold``.
    value : (M, C) float32 ndarray
        Class fractions of the training samples at each node (classifier; C = 1 for regressors
        and isolation trees).
    n_node_samples : (M,) int32 ndarray
        Training samples that reached each node.
    depth : (M,) int32 ndarray
        Edges from the tree's root.
    roots : (T,) int32 ndarray
        Index of each tree's root.
    """

    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    value: np.ndarray
    n_node_samples: np.ndarray
    depth: np.ndarray
    roots: np.ndarray

    @property
    def n_trees(self) -> int:
        """T, the number of trees."""
        return len(self.roots)

    @property
    def max_depth(self) -> int:
        """Largest depth of any node (edges)."""
        return int(self.depth.max()) if len(self.depth) else 0

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The arrays to store, keyed ``prefix + name``."""
        return {prefix + k: getattr(self, k) for k in _ARRAYS}

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str = "") -> Forest:
        """Rebuild from :meth:`to_arrays` output (a dict or an open ``npz``).

        Raises
        ------
        KeyError
            An array is missing.
        ValueError
            Arrays of inconsistent shapes or out-of-range node indices.
        """
        a = {k: np.asarray(arrays[prefix + k]) for k in _ARRAYS}
        m = len(a["left"])
        if any(len(a[k]) != m for k in _ARRAYS if k != "roots") or a["value"].ndim != 2:
            raise ValueError("inconsistent forest arrays")
        for k in ("left", "right", "roots"):
            if len(a[k]) and (a[k].min() < -1 or a[k].max() >= m):
                raise ValueError(f"forest array {k!r} points outside the nodes")
        if len(a["roots"]) == 0 or ((a["left"] < 0) != (a["right"] < 0)).any():
            raise ValueError("forest without trees or with half leaves")
        return cls(left=a["left"].astype(np.int32), right=a["right"].astype(np.int32),
                   feature=a["feature"].astype(np.int32),
                   threshold=a["threshold"].astype(np.float64),
                   value=a["value"].astype(np.float32),
                   n_node_samples=a["n_node_samples"].astype(np.int32),
                   depth=a["depth"].astype(np.int32), roots=a["roots"].astype(np.int32))


def _node_depths(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Depth (edges from the root, node 0) of every node of one tree."""
    depth = np.zeros(len(left), dtype=np.int32)
    for i in range(len(left)):  # scikit-learn numbers children after their parent
        if left[i] >= 0:
            depth[left[i]] = depth[right[i]] = depth[i] + 1
    return depth


def export_forest(estimator: Any) -> Forest:
    """Arrays of a fitted scikit-learn forest (``RandomForestClassifier``, ``IsolationForest``, ...).

    Class values are normalised to fractions per node; the estimator's ``classes_`` order is kept.
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS}
    offset = 0
    for est in estimator.estimators_:
        t = est.tree_
        n = t.node_count
        left, right = t.children_left.copy(), t.children_right.copy()
        depth = _node_depths(left, right)
        left[left >= 0] += offset
        right[right >= 0] += offset
        value = np.asarray(t.value, dtype=np.float64)[:, 0, :]
        tot = value.sum(axis=1, keepdims=True)
        value = np.divide(value, tot, out=np.zeros_like(value), where=tot > 0)
        for k, v in (("left", left), ("right", right), ("feature", t.feature),
                     ("threshold", t.threshold), ("value", value),
                     ("n_node_samples", t.n_node_samples), ("depth", depth),
                     ("roots", np.array([offset]))):
            parts[k].append(np.asarray(v))
        offset += n
    return Forest.from_arrays({k: np.concatenate(v) for k, v in parts.items()})


def _as_input(x: np.ndarray) -> np.ndarray:
    """Rows as scikit-learn sees them: float32 values (compared as float64)."""
    a = np.atleast_2d(np.asarray(x, dtype=np.float64))
    with np.errstate(over="ignore"):
        return a.astype(np.float32).astype(np.float64)


def _walk(forest: Forest, x: np.ndarray, record: Any = None) -> np.ndarray:
    """Leaf reached by each row in each tree, (N, T); ``record(node, child)`` sees every step."""
    node = np.broadcast_to(forest.roots, (len(x), forest.n_trees)).copy()
    rows = np.arange(len(x))[:, None]
    for _ in range(forest.max_depth):
        inner = forest.left[node] >= 0
        if not inner.any():
            break
        feat = np.where(inner, forest.feature[node], 0)
        go_left = x[rows, feat] <= forest.threshold[node]
        child = np.where(inner, np.where(go_left, forest.left[node], forest.right[node]), node)
        if record is not None:
            record(node, child, inner)
        node = child
    return node


def leaves(forest: Forest, x: np.ndarray) -> np.ndarray:
    """Index of the leaf reached by each row of ``x`` (N, F) in each tree: (N, T) int."""
    xs = _as_input(x)
    return np.concatenate([_walk(forest, xs[i:i + _CHUNK]) for i in range(0, len(xs), _CHUNK)]) \
        if len(xs) else np.zeros((0, forest.n_trees), dtype=np.int32)


def predict_proba(forest: Forest, x: np.ndarray) -> np.ndarray:
    """Class probabilities, (N, C): the mean over trees of the leaf class fractions."""
    leaf = leaves(forest, x)
    return forest.value[leaf].astype(np.float64).mean(axis=1)


def contributions(forest: Forest, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Saabas decomposition of :func:`predict_proba` along the decision paths.

    Parameters
    ----------
    forest : Forest
    x : (N, F) array

    Returns
    -------
    bias : (C,) float64 ndarray
        Mean of the trees' root class fractions (the training class frequencies).
    contrib : (N, F, C) float64 ndarray
        Change of each class probability attributed to each feature: at every split on the
        path, value(child) - value(node) goes to the split's feature; averaged over trees.
        ``bias + contrib.sum(axis=1)`` equals :func:`predict_proba`.
    """
    xs = _as_input(x)
    n, f = xs.shape
    c = forest.value.shape[1]
    out = np.zeros((n, f, c))
    for start in range(0, n, _CHUNK):
        chunk = xs[start:start + _CHUNK]
        acc = np.zeros((len(chunk) * f, c))
        base = (np.arange(len(chunk)) * f)[:, None]

        def record(node: np.ndarray, child: np.ndarray, inner: np.ndarray,
                   acc: np.ndarray = acc, base: np.ndarray = base) -> None:
            delta = (forest.value[child].astype(np.float64) - forest.value[node]) * inner[..., None]
            idx = (base + np.where(inner, forest.feature[node], 0)).ravel()
            for k in range(c):
                acc[:, k] += np.bincount(idx, weights=delta[..., k].ravel(), minlength=len(acc))

        _walk(forest, chunk, record)
        out[start:start + len(chunk)] = acc.reshape(len(chunk), f, c) / forest.n_trees
    bias = forest.value[forest.roots].astype(np.float64).mean(axis=0)
    return bias, out


def average_path_length(n: np.ndarray) -> np.ndarray:
    """Mean path length of an unsuccessful search in a binary tree of ``n`` samples (Liu 2008)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    big = n > 2
    out[n == 2] = 1.0
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def isolation_score(forest: Forest, x: np.ndarray, max_samples: int) -> np.ndarray:
    """``IsolationForest.score_samples`` of the rows of ``x``: (N,) in [-1, 0), lower = rarer.

    Parameters
    ----------
    forest : Forest
        Exported isolation forest (fitted on all features: ``max_features=1.0``).
    x : (N, F) array
    max_samples : int
        The estimator's ``max_samples_`` (sub-sample size of each tree).
    """
    leaf = leaves(forest, x)
    path = forest.depth[leaf] + average_path_length(forest.n_node_samples[leaf])
    denom = forest.n_trees * float(average_path_length(np.array([max_samples]))[0])
    mean = path.sum(axis=1) / denom if denom > 0 else np.ones(len(leaf))
    return -np.power(2.0, -mean)


# --- inputs and persistence shared by the forest models -------------------------------------------
#: Stand-in for +-inf inputs (finite, beyond any threshold a forest can learn from real features).
BIG = 1e30


def missing_fill(x: np.ndarray) -> np.ndarray:
    """Per-column value that stands for NaN: the minimum minus one inter-quartile range (>= 1).

    Below every valid training value, so one split separates "undefined" from any defined value;
    not so far below that an isolation tree spends all its random splits in the gap. Columns
    without any finite value get -1.
    """
    a = np.where(np.isfinite(x), x, np.nan)
    fill = np.full(a.shape[1], -1.0)
    for j in range(a.shape[1]):
        col = a[:, j][np.isfinite(a[:, j])]
        if len(col):
            q1, q3 = np.percentile(col, [25, 75])
            fill[j] = float(col.min()) - max(float(q3 - q1), 1.0)
    return fill


def impute(x: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Copy of ``x`` (N, F) with NaN -> ``fill`` (F,) and +-inf -> +-:data:`BIG`."""
    a = np.atleast_2d(np.asarray(x, dtype=np.float64)).copy()
    if a.shape[1] != len(fill):
        raise ValueError(f"expected {len(fill)} features, got {a.shape[1]}")
    nan = np.isnan(a)
    a[nan] = np.broadcast_to(fill, a.shape)[nan]
    return np.clip(a, -BIG, BIG)


def model_path(path_or_version: str | Path | None, default: str, models_dir: Path) -> Path:
    """The ``.npz`` of a model given by path, by version name in ``models_dir``, or by default."""
    p = Path(path_or_version) if path_or_version is not None else models_dir / default
    if p.suffix not in (".npz", ".json") and not p.exists() and p.parent == Path("."):
        p = models_dir / p.name
    return p.with_name(p.name.removesuffix(".json").removesuffix(".npz") + ".npz")


def write_model(path: str | Path, arrays: dict[str, Any], meta: dict) -> Path:
    """Write a model as ``<path>.npz`` (``arrays``, compressed, no pickle) and ``<path>.json`` (``meta``)."""
    p = Path(path).with_suffix(".npz")
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(p, **arrays)
    p.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return p


def read_model(p: Path, what: str, expect: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays (``allow_pickle=False``) and JSON sidecar of a stored model, checked.

    Parameters
    ----------
    p : Path
        The ``.npz``; the sidecar is the same name with ``.json``.
    what : str
        Model kind for messages ("anomaly model", ...).
    expect : dict
        Sidecar keys whose values must be equal (e.g. the feature names).

    Raises
    ------
    ModelError
        Missing or unreadable files, or a sidecar that does not match ``expect``.
    """
    from broker.errors import ModelError

    if not p.is_file():
        raise ModelError(f"{what} not found: {p}")
    try:
        meta = json.loads(p.with_suffix(".json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("sidecar is not a JSON object")
        with open(p, "rb") as fh, np.load(fh, allow_pickle=False) as a:  # our handle: numpy leaks its own on a bad zip
            arrays = {k: a[k] for k in a.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"corrupt {what} {p}: {exc}") from exc
    for key, value in expect.items():
        if meta.get(key) != value:
            raise ModelError(f"{what} {p} does not match this code: its {key} is "
                             f"{meta.get(key)!r}, expected {value!r}")
    return arrays, meta
