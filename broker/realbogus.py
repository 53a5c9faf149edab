"""Real/bogus classification of candidate cutout triplets with a small braai-class CNN.

:class:`RealBogusClassifier` wraps the network (:class:`RealBogusNet`, braai's layout, or
:class:`RealBogusNetV2`, the shipped one, alone or as a :class:`RealBogusEnsemble`; the sidecar
names the class) with loading of versioned weights (``torch.save(state_dict)`` + a JSON sidecar;
loaded with ``weights_only=True``, so no pickle is executed) and batched scoring
(:class:`ScoreConfig`). Its input comes from :func:`~broker.normalise.normalise_triplet`
(:mod:`broker.normalise`, torch-free; it and the alert-stamp readers are re-exported here).

The score is always kept on the candidate (``Candidate.rb``); any cut (e.g. ``rb > 0.5``) is
configuration of a later stage, never applied here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from broker import MODELS_DIR
from broker.candidate import CUTOUT_SIZE, Candidate
from broker.errors import ConfigError, CutoutError, ModelError
from broker.normalise import NormaliseConfig, normalise_triplet

#: Version loaded when none is given: an ensemble of three networks, each trained on its own
#: fields of candidates of the current subtraction, with two-lobed dipoles from locally wrong
#: alignments and satellite trails at the detection limit among the bogus, on inputs that keep
#: the brightness of bright reference sources (clip 60); see its card
#: ``broker/models/realbogus-v11.md`` and ``docs/realbogus-report/``.
DEFAULT_VERSION = "realbogus-v11"
#: Default normalisation of a classifier built in code (a loaded one takes its sidecar's).
_NORMALISE = NormaliseConfig()


# --- network ------------------------------------------------------------------------------------
def _head(n_in: int, dense: int, dropout: float) -> nn.Sequential:
    """Classifier head shared by the networks: flatten -> dense -> ReLU -> 1 logit, with dropout."""
    return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(n_in, dense), nn.ReLU(inplace=True),
                         nn.Dropout(dropout), nn.Linear(dense, 1))


class RealBogusNet(nn.Module):
    """A braai-class CNN, the first shipped model (``realbogus-v1``).

    Three conv blocks (2 convs + max-pool each) + dense head.

    Input ``(N, 3, 63, 63)`` -> logits ``(N,)``. With the defaults 1.19e5 parameters (0.48 MB as
    float32) and 19.4 MFLOP per triplet (2 FLOP per multiply-add); braai (Duev et al. 2019) has
    the same layout with more filters.
    """

    arch_name = "RealBogusNet"

    def __init__(self, width: int = 8, dense: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        w = width
        self.arch = {"name": self.arch_name, "width": width, "dense": dense}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w))
        # 63 -> 31 -> 15 -> 7
        self.head = _head(4 * w * 7 * 7, dense, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.features(x)).squeeze(1)


class RealBogusNetV2(nn.Module):
    """The CNN of the shipped models (each member of ``realbogus-v10`` and ``-v11``).

    It has strided convolutions instead of full-resolution conv pairs.

    Layers (shapes for one triplet): conv 3x3 stride 2, 3 -> w (63 -> 31); conv 3x3 stride 2,
    w -> 2w (31 -> 15); conv 3x3, 2w -> 2w + max-pool (15 -> 7); conv 3x3, 2w -> 4w (7x7);
    flatten, dense, 1 logit. Each conv is followed by batch norm and ReLU. The first layer still
    sees every pixel at full resolution (a learnt 3x3 filter, not a pooling), so a one-pixel
    cosmic ray and a PSF-wide star stay distinguishable, while the later layers work on 4x fewer
    pixels than braai's: with width 16 about half the FLOPs of ``RealBogusNet(width=8)``.
    The 3x3 stride-2 stem without padding is centred: output pixel 15 covers input 30..32.
    """

    arch_name = "RealBogusNetV2"

    def __init__(self, width: int = 16, dense: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        w = width
        self.arch = {"name": self.arch_name, "width": width, "dense": dense}

        def conv(cin: int, cout: int, stride: int, pad: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=pad, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(3, w, 2, 0), *conv(w, 2 * w, 2, 0), *conv(2 * w, 2 * w, 1, 1), nn.MaxPool2d(2),
            *conv(2 * w, 4 * w, 1, 1),
        )
        self.head = _head(4 * w * 7 * 7, dense, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.features(x)).squeeze(1)


class RealBogusEnsemble(nn.Module):
    """Members of one architecture trained from different seeds; the logit is their mean.

    Input ``(N, 3, 63, 63)`` -> logits ``(N,)``. Seeds of one recipe differ by 0.1 % in held-out
    FNR = FPR and by 0.04 in ZTF AUC (``docs/notes/realbogus-experiments.md``, the
    ``realbogus-v4`` ensemble); the mean of three cuts the first and
    steadies the second, at three times the FLOPs. The mean logit, not the mean probability,
    keeps the output a logit for the sigmoid and for integrated gradients (the two give the
    same equal error rate to 0.02 %).
    """

    arch_name = "RealBogusEnsemble"

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ModelError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.arch = {"name": self.arch_name, "members": [m.arch for m in members]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.stack([m(x) for m in self.members]).mean(0)


#: Network classes by the ``architecture.name`` of a model's sidecar.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    RealBogusNet.arch_name: RealBogusNet,
    RealBogusNetV2.arch_name: RealBogusNetV2,
}


def build_net(arch: dict) -> nn.Module:
    """The (untrained) network an ``architecture`` dict of a sidecar describes."""
    name = arch.get("name", RealBogusNet.arch_name)
    if name == RealBogusEnsemble.arch_name:
        return RealBogusEnsemble([build_net(a) for a in arch.get("members", [])])
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown real/bogus architecture {name!r} (known: {list(ARCHITECTURES)})")
    return ARCHITECTURES[name](width=int(arch.get("width", 8)), dense=int(arch.get("dense", 64)))


@dataclass(frozen=True)
class ScoreConfig:
    """Inference settings.

    Attributes
    ----------
    batch_size : int
        Triplets per forward pass; longer inputs are scored in chunks of this size. Default 64:
        the activations of 64 triplets stay in the CPU caches; 256 at once was ~1.6x slower
        per triplet on the 2-core build machine (``python -m bench.realbogus``).
    views : int
        Dihedral views of each triplet whose logits are averaged: 1 (as is), 2 (+ the 180 deg
        rotation), 4 (the four 90 deg rotations) or 8 (+ their mirror images). The network was
        trained on flips and rotations, so each view is an equally valid look at the stamp;
        averaging them lowers the error rate at ``views`` times the cost (measured by
        ``python -m bench.realbogus_accuracy --views 1 8``). Default 1: one view per triplet.
    """

    batch_size: int = 64
    views: int = 1

    def __post_init__(self) -> None:
        if self.views not in _VIEWS:
            raise ConfigError(f"ScoreConfig.views must be one of {sorted(_VIEWS)}, got {self.views}")


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0-7) of (N, C, H, W) stamps: rotation by ``k % 4`` x 90 deg, mirrored if k >= 4."""
    x = torch.flip(x, dims=(3,)) if k >= 4 else x
    return torch.rot90(x, k % 4, dims=(2, 3)) if k % 4 else x  # rot90 by 0 would copy


#: Views averaged for ``ScoreConfig.views``: as is; + 180 deg; all four 90 deg rotations; + mirrors.
_VIEWS = {1: (0,), 2: (0, 2), 4: (0, 1, 2, 3), 8: tuple(range(8))}


def _resolve(path_or_version: str | Path | None) -> tuple[Path, Path]:
    """Weights path and JSON sidecar path for a version name or a ``.pt`` path."""
    if path_or_version is None:
        path_or_version = DEFAULT_VERSION
    p = Path(path_or_version)
    if p.suffix not in (".pt", ".json"):
        # a bare version name lives in MODELS_DIR; a path without suffix gets ".pt"
        p = MODELS_DIR / f"{p.name}.pt" if p.parent == Path(".") else p.with_name(p.name + ".pt")
    if p.suffix == ".json":
        p = p.with_suffix(".pt")
    return p, p.with_suffix(".json")


class RealBogusClassifier:
    """A loaded real/bogus model: scores triplets in [0, 1] (1 = real).

    Use :meth:`load`; the constructor takes an already built network.

    Attributes
    ----------
    version : str
        Model version, e.g. ``"realbogus-v11"`` (from the JSON sidecar).
    metadata : dict
        The JSON sidecar (architecture, training data, metrics).
    """

    def __init__(
        self,
        net: nn.Module,
        version: str,
        metadata: dict | None = None,
        norm_config: NormaliseConfig = _NORMALISE,
        config: ScoreConfig = ScoreConfig(),
    ) -> None:
        # channels-last: oneDNN's fast convolution layout on CPUs (~1.3x at batch 256 here)
        self.net = net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in torch's stubs
        self.version = version
        self.metadata = dict(metadata or {})
        self.norm_config = norm_config
        self.config = config

    @classmethod
    def load(
        cls, path_or_version: str | Path | None = None, config: ScoreConfig = ScoreConfig()
    ) -> RealBogusClassifier:
        """Load weights and sidecar.

        Parameters
        ----------
        path_or_version : str or Path, optional
            A version name found in :data:`MODELS_DIR` (``"realbogus-v11"``), or a path to the
            ``.pt`` weights (the sidecar is the same path with ``.json``). Default:
            :data:`DEFAULT_VERSION`.
        config : ScoreConfig

        Raises
        ------
        ModelError
            Weights or sidecar missing, unreadable, or not matching the architecture.
        """
        wpath, jpath = _resolve(path_or_version)
        if not wpath.is_file():
            raise ModelError(f"real/bogus weights not found: {wpath} (train them with "
                             "`broker train-realbogus` or broker.training.main_train)")
        if not jpath.is_file():
            raise ModelError(f"real/bogus sidecar not found: {jpath}")
        try:
            meta = json.loads(jpath.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"corrupt real/bogus sidecar {jpath}: {exc}") from exc
        arch = meta.get("architecture", {})
        try:
            net = build_net(arch)
            state = torch.load(wpath, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as exc:  # torch raises many types for bad files; all mean "corrupt"
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"corrupt or incompatible real/bogus weights {wpath}: {exc}") from exc
        try:
            norm = NormaliseConfig(**meta.get("normalise", {}))
        except (TypeError, ConfigError) as exc:  # unknown key or a bad value in the sidecar
            raise ModelError(f"bad 'normalise' settings in {jpath}: {exc}") from exc
        return cls(net, str(meta.get("version", wpath.stem)), meta, norm, config)

    def model_input(self, x: np.ndarray) -> np.ndarray:
        """Normalised triplets (any clip) clamped to this model's own clip.

        The clip is monotonic, so a triplet normalised with a larger one becomes exactly the input the
        model was trained on.
        """
        return np.clip(x, -self.norm_config.clip, self.norm_config.clip)

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write ``<path>.pt`` (state_dict) and ``<path>.json`` (version + metadata).

        Floating-point weights are stored as float16 and loaded back into float32: half the
        size; measured on a three-member ensemble, scores moved by at most 1.1e-3 with the same
        held-out FNR = FPR and ZTF AUC.
        """
        wpath = Path(path).with_suffix(".pt")
        wpath.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.half() if v.is_floating_point() else v
                    for k, v in self.net.state_dict().items()}, wpath)
        meta = {**self.metadata, **(metadata or {})}
        meta["version"] = self.version
        meta.setdefault("architecture", {})
        meta["architecture"].update({**self.net.arch, "input": [3, CUTOUT_SIZE, CUTOUT_SIZE]})
        meta["normalise"] = self.norm_config.__dict__.copy()
        wpath.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return wpath

    def score(self, triplets: np.ndarray) -> np.ndarray:
        """Real/bogus scores of normalised triplets.

        Parameters
        ----------
        triplets : ndarray, shape (N, 3, 63, 63)
            Output of :func:`normalise_triplet`, stacked.

        Returns
        -------
        ndarray, shape (N,), float32, in [0, 1]

        Raises
        ------
        CutoutError
            Not of shape (N, 3, 63, 63), or a NaN or inf pixel (raw cutouts, not normalised
            ones: the network would score them NaN).
        """
        x = np.asarray(triplets, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (3, CUTOUT_SIZE, CUTOUT_SIZE):
            raise CutoutError(f"triplets must be (N, 3, 63, 63), got {x.shape}")
        bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if bad.any():
            raise CutoutError(f"{int(bad.sum())} triplet(s) with NaN or inf pixels (the first: number "
                              f"{int(np.argmax(bad))}): normalise them first (broker.normalise.normalise_triplet)")
        x = self.model_input(x)
        out = np.empty(len(x), dtype=np.float32)
        views = _VIEWS[self.config.views]
        with torch.inference_mode():
            for i in range(0, len(x), self.config.batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(x[i : i + self.config.batch_size]))
                logit = sum(self.net(_dihedral(xb, k).contiguous(memory_format=torch.channels_last))
                            for k in views) / len(views)
                out[i : i + len(xb)] = torch.sigmoid(logit).numpy()
        return out

    def score_cutouts(self, sci: np.ndarray, ref: np.ndarray, diff: np.ndarray) -> float:
        """Score one raw triplet (normalised here)."""
        x, _ = normalise_triplet(sci, ref, diff, self.norm_config)
        return float(self.score(x[None])[0])

    def score_candidates(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """Score candidates and store the score in ``Candidate.rb``.

        A candidate whose cutouts cannot be normalised gets ``rb = NaN`` (score unknown) rather
        than failing the whole frame; everything else is scored in batches.

        Returns
        -------
        ndarray, shape (len(candidates),), float32, NaN where not scorable
        """
        scores = np.full(len(candidates), np.nan, dtype=np.float32)
        xs, idx = [], []
        for i, c in enumerate(candidates):
            try:
                x, _ = normalise_triplet(c.science, c.reference, c.difference, self.norm_config)
            except CutoutError:
                continue
            xs.append(x)
            idx.append(i)
        if xs:
            scores[idx] = self.score(np.stack(xs))
        for i, c in enumerate(candidates):
            c.rb = None if np.isnan(scores[i]) else float(scores[i])
        return scores
