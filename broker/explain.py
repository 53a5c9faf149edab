"""Why the real/bogus CNN scored a candidate as it did: integrated-gradients attribution maps.

For a normalised triplet ``x`` (``(3, 63, 63)``, see :func:`broker.normalise.normalise_triplet`)
and a baseline ``x0`` (all zeros: every channel at its median, i.e. empty sky, which is also what
the normaliser puts in NaN and padded pixels), integrated gradients (Sundararajan et al. 2017)

    A = (x - x0) * mean_{a in (0, 1]} d f(x0 + a (x - x0)) / dx

attributes the change of the network's logit ``f(x) - f(x0)`` to each pixel of each channel
(completeness: ``A.sum()`` equals that change up to the quadrature error, which is reported).
Positive attribution pushes towards *real*, negative towards *bogus*. Implemented with torch
autograd (no extra dependency); the path integral uses the midpoint rule.

From Python: :func:`explain_triplet` / :func:`explain_cutouts` and :func:`plot_explanation`;
from the command line: :func:`main_explain` (``broker explain``), which writes a PNG of the
triplet with its attribution maps.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from broker.candidate import CUTOUT_SIZE
from broker.errors import ConfigError, CutoutError, DecodeError
from broker.normalise import alert_triplet, normalise_triplet
from broker.realbogus import RealBogusClassifier

#: Channel names, in input order.
CHANNELS = ("science", "reference", "difference")


@dataclass(frozen=True)
class ExplainConfig:
    """Integrated-gradients settings.

    Attributes
    ----------
    steps : int
        Points on the straight path from the baseline to the input (midpoint rule). Default 64:
        the completeness error is then a few percent of ``f(x) - f(x0)`` for this network.
    batch_size : int
        Path points per forward/backward pass. Default 64: one pass for the default ``steps``.
    """

    steps: int = 64
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and v >= 1 for v in (self.steps, self.batch_size)):
            raise ConfigError(f"ExplainConfig: steps and batch_size must be integers >= 1, got {self}")


@dataclass(frozen=True)
class Explanation:
    """An attribution map and the numbers that go with it.

    Attributes
    ----------
    triplet : ndarray, shape (3, 63, 63), float32
        The normalised input.
    attribution : ndarray, shape (3, 63, 63), float32
        Integrated gradients of the logit, per channel and pixel (logit units; positive = towards
        real).
    score : float
        Real/bogus score of the input, in [0, 1].
    baseline_score : float
        Score of the baseline (all-zero triplet).
    completeness_error : float
        ``attribution.sum() - (logit(x) - logit(x0))``, logit units (quadrature error).
    """

    triplet: np.ndarray
    attribution: np.ndarray
    score: float
    baseline_score: float
    completeness_error: float

    def channel_share(self) -> dict[str, float]:
        """Fraction of the total absolute attribution in each channel."""
        a = np.abs(self.attribution).reshape(3, -1).sum(axis=1)
        tot = float(a.sum()) or 1.0
        return {c: float(v / tot) for c, v in zip(CHANNELS, a, strict=True)}


def explain_triplet(clf: RealBogusClassifier, triplet: np.ndarray,
                    config: ExplainConfig = ExplainConfig()) -> Explanation:
    """Integrated gradients of one normalised triplet.

    Parameters
    ----------
    clf : RealBogusClassifier
    triplet : ndarray, shape (3, 63, 63)
        Output of :func:`~broker.normalise.normalise_triplet` (any clip; clamped to the model's).
    config : ExplainConfig

    Returns
    -------
    Explanation
    """
    x = np.asarray(triplet, dtype=np.float32)
    if x.shape != (3, CUTOUT_SIZE, CUTOUT_SIZE):
        raise CutoutError(f"triplet must be (3, 63, 63), got {x.shape}")
    if not np.isfinite(x).all():
        raise CutoutError("a normalised triplet is finite everywhere: this one has NaN or inf pixels")
    x = clf.model_input(x)
    net = clf.net.eval()
    xt = torch.from_numpy(x)
    base = torch.zeros_like(xt)
    alphas = (torch.arange(config.steps, dtype=torch.float32) + 0.5) / config.steps
    grad_sum = torch.zeros_like(xt)
    for i in range(0, config.steps, config.batch_size):
        a = alphas[i : i + config.batch_size, None, None, None]
        path = (base + a * (xt - base)).requires_grad_(True)
        logits = net(path)
        (g,) = torch.autograd.grad(logits.sum(), path)
        grad_sum += g.sum(dim=0)
    attr = ((xt - base) * grad_sum / config.steps).numpy()
    with torch.no_grad():
        lx, l0 = net(torch.stack([xt, base])).tolist()
    return Explanation(
        triplet=x,
        attribution=attr.astype(np.float32),
        score=float(1 / (1 + np.exp(-lx))),
        baseline_score=float(1 / (1 + np.exp(-l0))),
        completeness_error=float(attr.sum() - (lx - l0)),
    )


def explain_cutouts(clf: RealBogusClassifier, sci: np.ndarray, ref: np.ndarray, diff: np.ndarray,
                    config: ExplainConfig = ExplainConfig()) -> Explanation:
    """Normalise raw cutouts (as the classifier does) and explain them; see :func:`explain_triplet`."""
    x, _ = normalise_triplet(sci, ref, diff, clf.norm_config)
    return explain_triplet(clf, x, config)


def plot_explanation(exp: Explanation, path: str | Path, title: str = "") -> Path:
    """PNG with the triplet (top row) and its attribution maps (bottom row), ~60 KB.

    The triplet is shown in normalised units (asinh-compressed robust sigmas, -5..+20); the
    attribution with a symmetric colour scale (red: towards real, blue: towards bogus), with
    each channel's share of the total absolute attribution in its title. ``path`` is written as
    named (:class:`~broker.errors.ConfigError` when it cannot be).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = exp.channel_share()
    lim = float(np.abs(exp.attribution).max()) or 1.0
    fig, axes = plt.subplots(2, 3, figsize=(7.2, 5.0), dpi=80)
    for i, name in enumerate(CHANNELS):
        axes[0, i].imshow(exp.triplet[i], origin="lower", cmap="gray", vmin=-5, vmax=20)
        axes[0, i].set_title(name, fontsize=9)
        im = axes[1, i].imshow(exp.attribution[i], origin="lower", cmap="RdBu_r", vmin=-lim,
                               vmax=lim)
        axes[1, i].set_title(f"attribution ({share[name]:.0%})", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="logit attribution")
    fig.suptitle(f"{title}  score {exp.score:.3f}".strip(), fontsize=10, parse_math=False)  # ids are not TeX
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, format="png")  # the file named, whatever its suffix (savefig would add ".png" to none)
    except OSError as exc:  # a folder, a file's subfolder, out of reach
        raise ConfigError(f"cannot write {p}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
    return p


def load_triplet(path: str | Path, index: int = 0) -> tuple[np.ndarray, str]:
    """Raw or normalised triplet number ``index`` of a file, and a label for it.

    Parameters
    ----------
    path : path
        An Avro alert file (ZTF's, Rubin's or ours: ``cutoutScience/Template/Difference`` stamps), or an
        ``.npz`` holding either ``science``, ``reference``, ``difference`` arrays (raw, (ny, nx)
        or (N, ny, nx)) or ``x`` (normalised, (N, 3, 63, 63): a training shard).
    index : int
        Record of the Avro file or row of the ``.npz``, from 0.

    Returns
    -------
    triplet : ndarray, shape (3, ny, nx) raw, or (3, 63, 63) normalised
    label : str
        objectId/candid of an alert (Rubin's: ``diaSourceId``), or ``file[index]`` (with kind
        and label of a shard row).

    Raises
    ------
    DecodeError
        No such file, or not a readable Avro container file or ``.npz``.
    CutoutError
        No record or row ``index``, no stamps or arrays of a triplet, stamps of different shapes.
    """
    p = Path(path)
    if not p.is_file():
        raise DecodeError(f"{p}: no such file")
    if p.suffix == ".avro":
        return _avro_triplet(p, index)
    try:
        with _npz(p) as a:
            if "x" in a.files:
                x = a["x"]
                _check_index(p, index, len(x) if x.ndim else 0)
                extra = "".join(f" {k}={a[k][index]}" for k in ("kind", "y") if k in a.files)
                return np.asarray(x[index], dtype=np.float32), f"{p.name}[{index}]{extra}"
            missing = [k for k in CHANNELS if k not in a.files]
            if missing:
                raise CutoutError(f"{p.name} holds {a.files}: no {missing} (science, reference, difference or x)")
            chans = [np.asarray(a[k]) for k in CHANNELS]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # a damaged member
        raise DecodeError(f"{p.name} is not a readable .npz of arrays: {exc}") from exc
    if chans[0].ndim == 3:
        _check_index(p, index, min(len(c) for c in chans))
        chans = [c[index] if c.ndim == 3 else c for c in chans]
    return _stacked(p, chans), f"{p.name}[{index}]"


def _npz(p: Path) -> np.lib.npyio.NpzFile:
    """The arrays of the ``.npz`` file ``p`` (no pickles).

    Raises
    ------
    DecodeError
        Not an ``.npz``: another format, a pickle, a single ``.npy`` array.
    """
    try:
        loaded = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DecodeError(f"{p.name} is not an Avro alert file or a readable .npz: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DecodeError(f"{p.name} holds one array, not an .npz of science, reference and difference (or x)")
    return loaded


def _avro_triplet(p: Path, index: int) -> tuple[np.ndarray, str]:
    """Raw triplet and label of record ``index`` of an Avro alert file (:func:`load_triplet`)."""
    from broker.avrofile import read_records

    recs = read_records(p)  # DecodeError, naming the file
    _check_index(p, index, len(recs))
    r = recs[index]
    if not isinstance(r, dict):
        raise CutoutError(f"{p.name}: record {index} is not an alert packet")
    trip = _stacked(p, alert_triplet(r))
    cand = r["candidate"] if isinstance(r.get("candidate"), dict) else {}
    if "diaSourceId" in r:  # Rubin's packets name their source, not an object and a candidate
        return trip, str(r["diaSourceId"])
    return trip, f"{r.get('objectId', p.stem)} {cand.get('candid', '')}".strip()


def _check_index(p: Path, index: int, n: int) -> None:
    """CutoutError unless ``0 <= index < n`` (records or rows of ``p``)."""
    if not 0 <= index < n:
        raise CutoutError(f"{p.name} has {n} records, no index {index}")


def _stacked(p: Path, chans: list[np.ndarray]) -> np.ndarray:
    """Science, reference and difference of one shape as one (3, ny, nx) float32 array."""
    shapes = [c.shape for c in chans]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise CutoutError(f"{p.name}: the three cutouts are not 2-D images of one shape: {shapes}")
    try:
        return np.stack(chans).astype(np.float32)
    except (TypeError, ValueError) as exc:
        raise CutoutError(f"{p.name}: the cutouts are not numeric: {exc}") from exc


def _is_shard(path: str | Path) -> bool:
    """Whether an ``.npz`` holds normalised triplets ``x`` (a training shard)."""
    with _npz(Path(path)) as a:
        return "x" in a.files


def main_explain(path: str | Path, index: int = 0, out: str | Path | None = None,
                 model: str | Path | None = None, steps: int = 64) -> Path:
    """Explain one triplet of a file and write the PNG (``broker explain``).

    Parameters
    ----------
    path : path
        Avro alert file or ``.npz`` (see :func:`load_triplet`).
    index : int
        Which record / row.
    out : path, optional
        PNG to write; default next to the input: ``<stem>-<index>-explain.png``.
    model : str or path, optional
        Model version or weights path (default: the classifier's default version).
    steps : int
        Integrated-gradients path points.

    Returns
    -------
    Path of the PNG.
    """
    cfg = ExplainConfig(steps=steps)
    clf = RealBogusClassifier.load(model)
    trip, label = load_triplet(path, index)
    if trip.shape == (3, CUTOUT_SIZE, CUTOUT_SIZE) and Path(path).suffix != ".avro" and _is_shard(path):
        exp = explain_triplet(clf, trip, cfg)
    else:
        sci, ref, diff = trip
        exp = explain_cutouts(clf, sci, ref, diff, config=cfg)
    p = Path(path)
    out = Path(out) if out else p.with_name(f"{p.stem}-{index}-explain.png")
    return plot_explanation(exp, out, f"{label}  [{clf.version}]")
