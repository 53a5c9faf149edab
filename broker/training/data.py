"""Training data as the training loop sees it: reading shards, synthetic triplets, split.

:func:`load_training_set` reads the shards written by :mod:`broker.training.shards` into
arrays; :func:`synth_triplets` / :func:`iter_synthetic_candidates` make stamp-level synthetic
triplets (tests and quick checks only); :func:`split_indices` makes the train / validation
split by field. No torch here (the augmentation is :mod:`broker.training.augmentation`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from broker.candidate import CUTOUT_SIZE
from broker.errors import DatasetError
from broker.normalise import normalise_triplet
from broker.training.labels import LabelledCandidate


def load_training_set(data_dir: str | Path, dtype=np.float32) -> dict[str, np.ndarray]:
    """All shards of a training set: x (N,3,63,63) as ``dtype``, y, kind, group, snr, reference.

    ``dtype=np.float16`` halves the memory (100k triplets: 2.4 GB instead of 4.8 GB).

    Raises
    ------
    DatasetError
        No readable manifest, or one of a generation that did not finish: its shards are an
        unbalanced prefix of the set, and a model trained on them silently sees less data.
    """
    d = Path(data_dir)
    try:
        man = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"no readable manifest.json in {d}: {exc}") from exc
    if not man.get("complete"):
        raise DatasetError(f"the set in {d} is incomplete ({man.get('n', 0)} of "
                           f"{man.get('config', {}).get('target_n', '?')} candidates written); "
                           "regenerate it (same command)")
    parts: dict[str, list] = {}
    for name in man["shards"]:
        with np.load(d / name, allow_pickle=False) as a:
            for k in a.files:
                parts.setdefault(k, []).append(a[k])
    data = {k: np.concatenate(v) for k, v in parts.items()}
    data["x"] = data["x"].astype(dtype, copy=False)
    return data


# --- stamp-level synthetic triplets ---------------------------------------------------------------
def _gauss(n: int, x0: float, y0: float, fwhm: float, flux: float) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    s = fwhm / 2.3548
    return flux / (2 * np.pi * s * s) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))


def synth_triplets(
    n: int, seed: int = 0, real_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Raw (un-normalised) synthetic cutout triplets, for tests and quick checks.

    Real: a point source (PSF) at the centre, brightening (80%) or fading, on a host galaxy in a
    third of cases. Bogus: cosmic ray (1-3 sharp px), hot pixel, hot column, satellite trail,
    subtraction residual of a star (dipole / PSF mismatch) or a pure noise peak.

    Returns
    -------
    triplets : ndarray, shape (n, 3, 63, 63), float32
        science, reference, difference in ADU with sky removed from the difference only.
    labels : ndarray, shape (n,), int
    kinds : list of str
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, CUTOUT_SIZE, CUTOUT_SIZE), dtype=np.float32)
    labels = (rng.random(n) < real_fraction).astype(int)
    kinds = []
    for i in range(n):
        out[i], kind = _synth_one(rng, bool(labels[i]))
        kinds.append(kind)
    return out, labels, kinds


#: Bogus kinds of :func:`synth_triplets`, drawn uniformly.
_SYNTH_BOGUS = ("cosmic_ray", "hot_pixel", "hot_column", "satellite", "residual", "noise")


def _synth_one(rng: np.random.Generator, real: bool) -> tuple[np.ndarray, str]:
    """One raw synthetic triplet (3, 63, 63) and its kind.

    Made of the scene of both epochs, the real change or the artifact at the centre, then the noise.
    """
    c = CUTOUT_SIZE // 2
    sky = rng.uniform(100, 2000)
    sig = np.sqrt(sky)
    fw_s, fw_r = rng.uniform(2.0, 4.5), rng.uniform(1.8, 3.5)
    scene_s, scene_r = _synth_scene(rng, fw_s, fw_r)
    x0, y0 = c + rng.uniform(-0.7, 0.7), c + rng.uniform(-0.7, 0.7)
    zero = np.zeros((CUTOUT_SIZE, CUTOUT_SIZE))
    if real:
        area = 4 * np.pi * (fw_s / 2.3548) ** 2
        kind, new = _synth_change(rng, scene_s, scene_r, (x0, y0), (fw_s, fw_r), sig, area)
        art = zero
    else:
        kind, art = _synth_artifact(rng, scene_s, scene_r, (x0, y0), (fw_s, fw_r), sig)
        new = zero
    noise_s = rng.normal(0, sig, (CUTOUT_SIZE, CUTOUT_SIZE))
    noise_r = rng.normal(0, sig / rng.uniform(2, 5), (CUTOUT_SIZE, CUTOUT_SIZE))
    sci = sky + scene_s + new + noise_s
    if kind in ("cosmic_ray", "hot_pixel", "hot_column", "satellite", "noise"):
        sci = sci + art
    ref = sky * rng.uniform(0.5, 2) + scene_r + noise_r
    diff = new + art + noise_s + rng.normal(0, sig / 3, (CUTOUT_SIZE, CUTOUT_SIZE))
    return np.stack([sci, ref, diff]).astype(np.float32), kind


def _synth_scene(rng: np.random.Generator, fw_s: float, fw_r: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Static sky of the science and reference stamps (seeing ``fw_s`` / ``fw_r`` px).

    A few field stars and, in a third of cases, a galaxy near the centre.
    """
    n, c = CUTOUT_SIZE, CUTOUT_SIZE // 2
    scene_s = np.zeros((n, n))
    scene_r = np.zeros((n, n))
    for _ in range(rng.poisson(3)):  # field stars
        sx, sy, sf = rng.uniform(0, n), rng.uniform(0, n), 10 ** rng.uniform(2.5, 5)
        scene_s += _gauss(n, sx, sy, fw_s, sf)
        scene_r += _gauss(n, sx, sy, fw_r, sf)
    if rng.random() < 0.33:  # host galaxy
        yy, xx = np.mgrid[:n, :n]
        gx, gy = c + rng.normal(0, 3, 2)
        gs = rng.uniform(3, 8)
        g = 10 ** rng.uniform(3, 4.5) / (2 * np.pi * gs * gs) * np.exp(
            -((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * gs * gs))
        scene_s += g
        scene_r += g
    return scene_s, scene_r


def _synth_change(rng: np.random.Generator, scene_s: np.ndarray, scene_r: np.ndarray,
                  pos: tuple[float, float], fwhm: tuple[float, float], sig: float, area: float
                  ) -> tuple[str, np.ndarray]:
    """A real change at ``pos``: a transient or a variable star, brightening or fading.

    It has 5-80 sky sigma ``sig`` over the PSF's ``area`` (px); a variable's star is added to both
    scenes in place. Returns its kind and difference image (ADU).
    """
    (x0, y0), (fw_s, fw_r), n = pos, fwhm, CUTOUT_SIZE
    kind = "transient" if rng.random() < 0.7 else "variable"
    flux = rng.uniform(5, 80) * sig * np.sqrt(area)
    if kind == "variable" and rng.random() < 0.5:  # fading known star
        scene_r += _gauss(n, x0, y0, fw_r, 2 * flux)
        scene_s += _gauss(n, x0, y0, fw_s, flux)
        return kind, _gauss(n, x0, y0, fw_s, -flux)
    if kind == "variable":
        scene_r += _gauss(n, x0, y0, fw_r, flux)
        scene_s += _gauss(n, x0, y0, fw_s, flux)
    return kind, _gauss(n, x0, y0, fw_s, flux)


def _synth_artifact(rng: np.random.Generator, scene_s: np.ndarray, scene_r: np.ndarray,
                    pos: tuple[float, float], fwhm: tuple[float, float], sig: float
                    ) -> tuple[str, np.ndarray]:
    """A bogus kind of :data:`_SYNTH_BOGUS` at ``pos``; returns its kind and its image (ADU).

    A residual's star is added to both scenes in place; ``sig`` is the sky sigma.
    """
    (x0, y0), (fw_s, fw_r), n, c = pos, fwhm, CUTOUT_SIZE, CUTOUT_SIZE // 2
    art = np.zeros((n, n))
    kind = _SYNTH_BOGUS[rng.integers(len(_SYNTH_BOGUS))]
    amp = rng.uniform(8, 200) * sig
    if kind == "cosmic_ray":
        for _ in range(rng.integers(1, 4)):
            art[c + rng.integers(-1, 2), c + rng.integers(-1, 2)] += amp * rng.uniform(.5, 1)
    elif kind == "hot_pixel":
        art[c, c] += amp
    elif kind == "hot_column":
        art[:, c] += rng.uniform(5, 30) * sig
    elif kind == "satellite":
        yy, xx = np.mgrid[:n, :n]
        th = rng.uniform(0, np.pi)
        d = np.abs((xx - x0) * np.sin(th) - (yy - y0) * np.cos(th))
        art += rng.uniform(5, 50) * sig * np.exp(-d ** 2 / (2 * (fw_s / 2.3548) ** 2))
    elif kind == "residual":  # bright star misaligned or with the wrong PSF
        sf = 10 ** rng.uniform(4, 6)
        dx, dy = rng.normal(0, 0.6, 2)
        fw_m = fw_s * rng.uniform(0.85, 1.15)
        art += _gauss(n, x0, y0, fw_s, sf) - _gauss(n, x0 + dx, y0 + dy, fw_m, sf)
        scene_s += _gauss(n, x0, y0, fw_s, sf)
        scene_r += _gauss(n, x0, y0, fw_r, sf)
    else:  # noise peak: a 1-px-wide fluctuation at the threshold
        art[c, c] += rng.uniform(3, 6) * sig
    return kind, art


def iter_synthetic_candidates(n: int, seed: int = 0) -> Iterator[LabelledCandidate]:
    """Normalised :func:`synth_triplets` as labelled candidates (group = seed block of 256)."""
    raw, labels, kinds = synth_triplets(n, seed)
    for i in range(n):
        x, _ = normalise_triplet(*raw[i])
        yield LabelledCandidate(x, int(labels[i]), kinds[i], f"S{i // 256}", 0.0)


def split_indices(groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices, by group when there are >= 5 groups, else by row."""
    rng = np.random.default_rng(seed)
    ug = np.unique(groups)
    if len(ug) >= 5:
        rng.shuffle(ug)
        n_val = max(1, int(round(val_fraction * len(ug))))
        val = np.isin(groups, ug[:n_val])
    else:
        val = rng.random(len(groups)) < val_fraction
    return np.flatnonzero(~val), np.flatnonzero(val)
