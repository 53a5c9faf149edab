"""Vetted labels file: a telescope's own real/bogus labels, in the training set's shard format.

The portal's vetting page stores who labelled which candidate how; ``broker labels export`` writes
them with :func:`write_labels` and ``broker train-realbogus --labels FILE`` fine-tunes on them
with :func:`read_labels`. The file is one ``.npz`` (no pickle) holding the arrays of a training
shard (:mod:`broker.training.shards`: ``x``, ``y``, ``kind``, ``group``, ``snr``, ``reference``)
plus the provenance of every label, so that the training code reads it like any shard:

=============== ================ ==============================================================
array           dtype, shape     meaning
=============== ================ ==============================================================
``x``           float16 (N,3,63,63) normalised triplet (science, reference, difference;
                                 :func:`broker.normalise.normalise_triplet`)
``y``           uint8 (N,)       1 real, 0 bogus
``kind``        str (N,)         ``"vetted"`` (the shard's kind column)
``group``       str (N,)         object id: a validation split by group keeps an object on one side
``snr``         float32 (N,)     the candidate's S/N (NaN when unknown)
``reference``   str (N,)         ``"unknown"`` (the shard's reference-state column)
``candidate_id`` str (N,)        the alert / candidate id that was labelled
``labeller``    str (N,)         who labelled it
``labelled_at`` float64 (N,)     when [Unix s, UTC]
``model_version`` str (N,)       real/bogus model that scored the candidate when it was shown
``score``       float32 (N,)     its score then (NaN when unknown)
``telescope``   str (N,)         the telescope of the frame
``format``      str ()           :data:`FORMAT`
=============== ================ ==============================================================
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker.candidate import CUTOUT_SIZE
from broker.errors import InvalidLabel
from broker.normalise import normalise_triplet

__all__ = ["FORMAT", "VettedLabel", "write_labels", "read_labels"]

#: Format tag written into every file; :func:`read_labels` refuses any other.
FORMAT = "vetted-labels-v1"

_STR_KEYS = ("kind", "group", "reference", "candidate_id", "labeller", "model_version", "telescope")


@dataclass(frozen=True)
class VettedLabel:
    """One operator's real/bogus label of one candidate.

    Attributes
    ----------
    candidate_id, object_id : str
        The labelled alert / candidate and its object.
    label : int
        1 real, 0 bogus.
    science, reference, difference : ndarray, shape (ny, nx)
        The raw cutouts (any float dtype, NaN outside the frame), as in the alert.
    labeller : str
        Who labelled it (non-empty).
    labelled_at : float
        When [Unix s].
    model_version : str
        Real/bogus model whose score was shown.
    score : float
        That score (NaN when unknown).
    snr : float
        The candidate's S/N (NaN when unknown).
    telescope : str
        The frame's telescope.
    """

    candidate_id: str
    object_id: str
    label: int
    science: np.ndarray
    reference: np.ndarray
    difference: np.ndarray
    labeller: str
    labelled_at: float
    model_version: str = "unknown"
    score: float = float("nan")
    snr: float = float("nan")
    telescope: str = "unknown"


def write_labels(path: str | Path, labels: Iterable[VettedLabel]) -> int:
    """Write vetted labels to ``path`` (``.npz``); returns how many were written.

    Raises
    ------
    InvalidLabel
        A label other than 0/1, an empty labeller, or cutouts of mismatched or oversized shapes.
    """
    rows = list(labels)
    x = np.zeros((len(rows), 3, CUTOUT_SIZE, CUTOUT_SIZE), np.float16)
    for i, lab in enumerate(rows):
        _check(lab)
        try:
            x[i] = normalise_triplet(lab.science, lab.reference, lab.difference)[0]
        except ValueError as exc:
            raise InvalidLabel(f"candidate {lab.candidate_id}: unusable cutouts ({exc})") from exc
    n = len(rows)
    arrays: dict[str, Any] = {
        "x": x,
        "y": np.array([r.label for r in rows], np.uint8),
        "kind": np.array(["vetted"] * n, dtype=str),
        "group": np.array([r.object_id for r in rows], dtype=str),
        "snr": np.array([r.snr for r in rows], np.float32),
        "reference": np.array(["unknown"] * n, dtype=str),
        "candidate_id": np.array([r.candidate_id for r in rows], dtype=str),
        "labeller": np.array([r.labeller for r in rows], dtype=str),
        "labelled_at": np.array([r.labelled_at for r in rows], np.float64),
        "model_version": np.array([r.model_version for r in rows], dtype=str),
        "score": np.array([r.score for r in rows], np.float32),
        "telescope": np.array([r.telescope for r in rows], dtype=str),
        "format": np.array(FORMAT),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return n


def _check(lab: VettedLabel) -> None:
    if lab.label not in (0, 1):
        raise InvalidLabel(f"candidate {lab.candidate_id}: label must be 0 or 1, not {lab.label!r}")
    if not lab.labeller.strip():
        raise InvalidLabel(f"candidate {lab.candidate_id}: empty labeller")
    shapes = {np.shape(a) for a in (lab.science, lab.reference, lab.difference)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InvalidLabel(f"candidate {lab.candidate_id}: cutouts of shapes {sorted(shapes)}")


#: Each array of a labels file: the dtype kinds it may have and its number of dimensions.
_LAYOUT = {"x": ("f", 4), "y": ("iub", 1), "snr": ("fiu", 1), "labelled_at": ("fiu", 1), "score": ("fiu", 1),
           "format": ("U", 0), **{k: ("U", 1) for k in _STR_KEYS}}
#: Largest file read, in bytes of its arrays as their headers declare them (before any is loaded):
#: 8 GiB, about 340,000 labels; a header announcing more (a 1 kB member can announce 7 TiB) is refused.
MAX_ARRAY_BYTES = 8 << 30


def read_labels(path: str | Path) -> dict[str, np.ndarray]:
    """Read a vetted labels file into the arrays of a training shard (and the provenance).

    Every array's header is checked against :data:`_LAYOUT` and :data:`MAX_ARRAY_BYTES` before any
    array is loaded.

    Raises
    ------
    InvalidLabel
        Not a readable ``.npz``, another format, missing arrays, arrays of another type, shape or
        unequal length, arrays too large, labels other than 0/1, or non-finite pixels.
    """
    try:
        _check_headers(path)
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as a:
            data = {k: a[k] for k in _LAYOUT}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
        raise InvalidLabel(f"{path}: not a readable labels file ({type(exc).__name__}: {exc})") from exc
    if str(data["format"]) != FORMAT:
        raise InvalidLabel(f"{path}: format {str(data['format'])!r}, expected {FORMAT!r}")
    n = len(data["y"])
    if data["x"].shape != (n, 3, CUTOUT_SIZE, CUTOUT_SIZE):
        raise InvalidLabel(f"{path}: x has shape {data['x'].shape} for {n} labels")
    if any(len(data[k]) != n for k in ("snr", "labelled_at", "score", *_STR_KEYS)):
        raise InvalidLabel(f"{path}: arrays of unequal length")
    if not np.isin(data["y"], (0, 1)).all():
        raise InvalidLabel(f"{path}: labels other than 0/1")
    if not np.isfinite(data["x"]).all():
        raise InvalidLabel(f"{path}: non-finite pixels in x")
    return data


def _check_headers(path: str | Path) -> None:
    """Refuse a file whose arrays, as their ``.npy`` headers declare them, are missing, mistyped or too large."""
    declared: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member)
            declared[name.removesuffix(".npy")] = (shape, dtype)
    missing = set(_LAYOUT) - set(declared)
    if missing:
        raise InvalidLabel(f"{path}: missing arrays {sorted(missing)}")
    for key, (kinds, ndim) in _LAYOUT.items():
        shape, dtype = declared[key]
        if dtype.kind not in kinds or len(shape) != ndim:
            raise InvalidLabel(f"{path}: array {key} is {dtype} of shape {shape}, expected {ndim} dimensions "
                               f"of kind {kinds!r}")
    size = sum(int(np.prod(shape, dtype=object)) * dtype.itemsize for shape, dtype in declared.values())
    if size > MAX_ARRAY_BYTES:
        raise InvalidLabel(f"{path}: its arrays declare {size / 2**30:.1f} GiB, over {MAX_ARRAY_BYTES / 2**30:.0f} GiB")
