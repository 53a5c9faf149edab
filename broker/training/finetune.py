"""Fine-tuning a shipped real/bogus model on new data, guarded against forgetting.

:func:`fine_tune` continues training every member of a model on new triplets (a telescope's
vetted labels, :mod:`broker.labelsfile`, or the stamp-level artifacts of
:mod:`broker.training.artifacts`) mixed with simulated triplets of the original kind, with an
L2-SP penalty (Li et al. 2018: the squared distance of the weights to the shipped ones) that
keeps what the simulation taught. It stops after a fixed number of epochs: no early stopping,
so nothing (least of all ZTF's scores) is chosen on an evaluation set.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from broker.errors import ConfigError, ModelError
from broker.realbogus import RealBogusClassifier, RealBogusEnsemble
from broker.training.augmentation import augment
from broker.training.trainer import bf16_training


@dataclass(frozen=True)
class FineTuneConfig:
    """Settings of :func:`fine_tune`.

    Attributes
    ----------
    epochs : int
        Passes over the new triplets (the simulated ones are drawn afresh each epoch). Default 4.
    lr : float
        AdamW learning rate, constant (the shipped model's peak was 3e-3). Default 3e-4.
    batch_size : int
        Triplets per step, half new and half simulated when ``sim_fraction`` is 0.5. Default 128.
    sim_fraction : float
        Share of each batch drawn from the simulated triplets (the guard against forgetting by
        rehearsal). Default 0.5.
    l2sp : float
        Weight of the L2-SP penalty ``sum((w - w_shipped)**2)`` over all parameters (the guard
        against forgetting by regularisation). Default 1e-2.
    p_truncate, p_mask : float
        Edge truncation and mask augmentation, as :class:`~broker.training.trainer.TrainConfig`.
    threads : int
        torch intra-op threads. Default 1 (the build machine is shared).
    seed : int
        Seeds the batches and the augmentation. Default 0.
    """

    epochs: int = 4
    lr: float = 3e-4
    batch_size: int = 128
    sim_fraction: float = 0.5
    l2sp: float = 1e-2
    p_truncate: float = 0.1
    p_mask: float = 0.05
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ConfigError("FineTuneConfig: epochs >= 1, batch_size >= 2 and lr > 0 needed")
        if not 0 <= self.sim_fraction < 1 or self.l2sp < 0:
            raise ConfigError("FineTuneConfig: sim_fraction in [0, 1) and l2sp >= 0 needed")


def _members(net: nn.Module) -> list[nn.Module]:
    return list(net.members) if isinstance(net, RealBogusEnsemble) else [net]


def fine_tune(clf: RealBogusClassifier, new: dict[str, np.ndarray], sim: dict[str, np.ndarray],
              config: FineTuneConfig = FineTuneConfig(), version: str | None = None
              ) -> tuple[RealBogusClassifier, dict]:
    """A copy of ``clf`` trained further on ``new`` triplets mixed with ``sim`` ones.

    Parameters
    ----------
    clf : RealBogusClassifier
        The shipped model (not modified).
    new, sim : dict of ndarray
        ``x`` (N, 3, 63, 63) normalised triplets (any float dtype) and ``y`` (N,) 0/1, as
        :func:`broker.training.data.load_training_set` and :func:`broker.labelsfile.read_labels`
        return them. ``new`` needs both classes; ``sim`` may be empty when ``sim_fraction`` is 0.
    config : FineTuneConfig
    version : str, optional
        The new model's version (default ``clf.version + "-ft"``).

    Returns
    -------
    classifier : RealBogusClassifier
    report : dict
        ``config``, sizes, ``loss`` per epoch, ``l2sp_distance`` (the final squared distance to
        the shipped weights), ``seconds``, ``threads``.

    Raises
    ------
    ModelError
        ``new`` empty or one-class, or no simulated triplets to mix in.
    """
    y_new = np.asarray(new["y"]).astype(np.float32)
    if len(y_new) < 2 or len(np.unique(y_new)) < 2:
        raise ModelError(f"fine-tuning needs real and bogus examples; got {len(y_new)} with "
                         f"classes {sorted(set(y_new.tolist()))}")
    n_sim = int(round(config.batch_size * config.sim_fraction))
    if n_sim and len(sim.get("y", ())) == 0:
        raise ModelError("fine-tuning with sim_fraction > 0 needs simulated triplets to mix in")
    t0 = time.time()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = copy.deepcopy(clf.net)
    anchor = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    losses = [_epoch(net, anchor, opt, new, sim, n_sim, gen, config) for _ in range(config.epochs)]
    net.eval()
    dist = float(sum(((p.detach() - a) ** 2).sum() for p, a in zip(net.parameters(), anchor,
                                                                    strict=True)))
    report = {"config": asdict(config), "base": clf.version, "n_new": int(len(y_new)),
              "n_new_real": int(y_new.sum()), "n_sim": int(len(sim.get("y", ()))),
              "loss": losses, "l2sp_distance": dist, "threads": config.threads,
              "precision": "bf16" if bf16_training("auto") else "fp32",
              "seconds": round(time.time() - t0, 1)}
    meta = {k: v for k, v in clf.metadata.items() if k not in ("evaluation", "version")}
    meta["fine_tune"] = report
    return RealBogusClassifier(net, version or f"{clf.version}-ft", meta, clf.norm_config,
                               clf.config), report


def _epoch(net: nn.Module, anchor: list[torch.Tensor], opt: torch.optim.Optimizer,
           new: dict[str, np.ndarray], sim: dict[str, np.ndarray], n_sim: int,
           gen: torch.Generator, config: FineTuneConfig) -> float:
    """One pass over ``new`` in batches topped up with ``n_sim`` random simulated rows each.

    Every member gets its own balanced BCE loss on the batch; plus ``config.l2sp`` times the
    squared distance to ``anchor``. Returns the mean loss.
    """
    net.train()
    bf16 = bf16_training("auto")
    n_new = config.batch_size - n_sim
    perm = torch.randperm(len(new["y"]), generator=gen).numpy()
    tot, nb = 0.0, 0
    for b in range(0, len(perm), n_new):
        rows = np.sort(perm[b : b + n_new])
        xs, ys = [new["x"][rows]], [new["y"][rows]]
        if n_sim:
            srows = np.sort(torch.randint(0, len(sim["y"]), (n_sim,), generator=gen).numpy())
            xs.append(sim["x"][srows])
            ys.append(sim["y"][srows])
        xb = augment(torch.from_numpy(np.concatenate(xs).astype(np.float32)), gen,
                     config.p_truncate, config.p_mask)
        yb = torch.from_numpy(np.concatenate(ys).astype(np.float32))
        pos_weight = ((1 - yb).sum() / yb.sum().clamp(min=1)).clamp(0.1, 10)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = [m(xb).float() for m in _members(net)]
        bce = torch.stack([nn.functional.binary_cross_entropy_with_logits(
            lg, yb, pos_weight=pos_weight) for lg in logits]).mean()
        drift = torch.stack([((p - a) ** 2).sum()
                             for p, a in zip(net.parameters(), anchor, strict=True)]).sum()
        loss = bce + config.l2sp * drift
        loss.backward()
        opt.step()
        tot += float(loss.item())
        nb += 1
    return tot / max(nb, 1)


# --- the command: fine-tune, measure before / after, write weights and card ----------------------
def guard_figures(clf: RealBogusClassifier, test: dict[str, np.ndarray] | None,
                  dev: tuple[np.ndarray, dict] | None, holdout: dict[str, np.ndarray] | None,
                  real: dict[str, np.ndarray] | None = None) -> dict:
    """The figures a fine-tuning must not spoil, of one model.

    ``sim``: held-out simulated AUC and FNR = FPR; ``dev``: ZTF dev-set AUC against drb > 0.5
    (with its bootstrap interval) and braai-bogus passed at 0.5; ``labels``: AUC on the labels
    held out by object; ``real_pixels``: the target telescope's real pixels labelled by
    construction (:func:`broker.training.realpixels.real_pixel_check` of ``real``, a
    :func:`~broker.training.realpixels.real_pixel_set`). Each part only where its data is given.
    """
    from broker.training.devset import dev_analysis
    from broker.training.metrics import equal_error, evaluate
    from broker.training.realpixels import real_pixel_check

    out: dict = {}
    if test is not None:
        s = clf.score(test["x"])
        thr, eer = equal_error(s, test["y"])
        out["sim"] = {"n": int(len(s)), "auc": evaluate(s, test["y"])["auc"], "eer": eer,
                      "eer_threshold": thr}
    if dev is not None and len(dev[0]):
        d = dev_analysis(clf.score(dev[0]), dev[1])
        out["dev"] = {"auc_drb": d["auc_drb"], "frac_bogus_passed": d["frac_bogus_passed"],
                      "frac_real_rejected": d["frac_real_rejected"], "n_drb": d["n_drb"]}
    if holdout is not None and len(holdout["y"]):
        s = clf.score(holdout["x"])
        out["labels"] = {"n": int(len(s)), "auc": evaluate(s, holdout["y"])["auc"],
                         "accuracy_at_0.5": float(np.mean((s >= 0.5) == (holdout["y"] == 1)))}
    if real is not None and len(real["y"]):
        out["real_pixels"] = real_pixel_check(clf.score(real["x"]), real)
    return out


def _split_labels(labels: dict[str, np.ndarray], holdout: float, seed: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Labels split by object (``group``) into what is trained on and what is held out."""
    from broker.training.data import split_indices

    if holdout <= 0:
        return labels, None
    tr, va = split_indices(labels["group"], holdout, seed)
    if len(va) == 0 or len(np.unique(labels["y"][tr])) < 2:
        return labels, None  # too few labels to hold any out: all are trained on
    return ({k: labels[k][tr] for k in ("x", "y")}, {k: labels[k][va] for k in ("x", "y")})


def _new_data(labels_path: str | None, n_artifacts: int, sim: dict[str, np.ndarray],
              holdout: float, seed: int) -> tuple[dict | None, dict | None, dict]:
    """The new triplets to fine-tune on (None: none), the labels held out, where they came from."""
    from broker.labelsfile import read_labels
    from broker.training.artifacts import artifact_set

    parts, held, source = [], None, {}
    if labels_path:
        lab = read_labels(labels_path)
        train_part, held = _split_labels(lab, holdout, seed)
        parts.append(train_part)
        source["labels"] = {"file": Path(labels_path).name, "n": int(len(lab["y"])),
                            "n_real": int(lab["y"].sum()),
                            "telescopes": sorted(set(lab["telescope"].tolist())),
                            "n_held_out": int(len(held["y"])) if held else 0}
    if n_artifacts:
        art = artifact_set(sim, n_artifacts, seed)
        # the artifacts are all bogus: as many simulated reals keep the new data two-class
        reals = np.flatnonzero(sim["y"] == 1)
        pick = np.random.default_rng(seed).choice(reals, min(n_artifacts, len(reals)),
                                                  replace=False)
        parts += [{"x": art["x"], "y": art["y"]}, {"x": sim["x"][pick], "y": sim["y"][pick]}]
        source["artifacts"] = {k: int(np.sum(art["kind"] == k))
                               for k in sorted(set(art["kind"].tolist()))}
        source["artifacts"]["simulated_reals"] = int(len(pick))
    if not parts:
        return None, held, source
    new = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in ("x", "y")}
    return new, held, source


def main_finetune(labels: str | Path | None = None, *, base: str | None = None,
                  version: str | None = None, out_dir: str | Path | None = None,
                  n_artifacts: int = 0, holdout: float = 0.2, mix_n: int = 8000,
                  test_n: int = 12000, dev_dir: str | Path | None = None,
                  adapt_dir: str | Path | None = None, mix_dir: str | Path | None = None,
                  test_dir: str | Path | None = None,
                  config: FineTuneConfig = FineTuneConfig(), progress: bool = False) -> dict:
    """Adapt a shipped model to a telescope; measure before / after; write it and a card.

    Fine-tunes on a labels file and / or artifacts (:func:`fine_tune`), then, with
    ``adapt_dir``, re-estimates its batch-norm statistics on that folder's unlabelled alerts
    (:func:`broker.training.adapt.adapt_batchnorm`).

    Parameters
    ----------
    labels : path, optional
        A vetted labels file (:mod:`broker.labelsfile`); ``holdout`` of its objects are kept
        out of training for the before / after figure.
    base, version : str, optional
        The model adapted (default: the default version) and the new one's (``<base>-ft``).
    out_dir : path, optional
        Where weights, sidecar and card go (default ``broker/models/``).
    n_artifacts : int
        Stamp-level artifacts of :func:`broker.training.artifacts.artifact_set` added (with as
        many simulated reals).
    holdout : float
        Fraction of the labels' objects held out.
    mix_n, test_n : int
        Sizes of the rehearsal set (``build/realbogus-mix-0``, seed 0) and of the held-out one
        (``build/realbogus-test-1``, seed 1), generated once (~2.5 min per 10k on one core).
    dev_dir : path, optional
        The ZTF dev set for the before / after figure (default ``../shared/data/ztf_alerts_dev``
        when present); evaluation only.
    adapt_dir : path, optional
        Alerts (``*.avro``, read by :func:`broker.training.ztf.ztf_triplets`) whose pixels, not
        labels, set the batch-norm statistics. Must not be the dev set.
    mix_dir, test_dir : path, optional
        Complete sets used as they are instead of the two above (nothing generated).
    config : FineTuneConfig
    progress : bool
        Progress of the set generation.

    Returns
    -------
    dict
        ``before`` and ``after`` (:func:`guard_figures`), ``report`` (:func:`fine_tune`),
        ``source``, ``weights``, ``card``.
    """
    from broker import MODELS_DIR
    from broker.labelsfile import read_labels
    from broker.realbogus import DEFAULT_VERSION

    if labels:  # a bad file fails here, before the sets are loaded
        read_labels(labels)
    root = Path(__file__).resolve().parent.parent.parent
    sets = _load_sets(root, {"mix": (mix_n, 0, mix_dir), "test": (test_n, 1, test_dir)},
                      progress)
    clf = RealBogusClassifier.load(base or DEFAULT_VERSION)
    new, held, source = _new_data(str(labels) if labels else None, n_artifacts, sets["mix"],
                                  holdout, config.seed)
    if new is None and adapt_dir is None:
        raise ModelError("nothing to adapt on: give a labels file, artifacts > 0 or adapt_dir")
    dev_path = Path(dev_dir) if dev_dir else root.parent / "shared" / "data" / "ztf_alerts_dev"
    dev, real = _real_data(dev_path, adapt_dir)
    before = guard_figures(clf, sets["test"], dev, held, real)
    tuned, report = (fine_tune(clf, new, sets["mix"], config, version) if new is not None
                     else (clf, {}))
    if adapt_dir is not None:
        tuned = _adapt(tuned, Path(adapt_dir), dev_path, version or f"{clf.version}-ft", source)
    after = guard_figures(tuned, sets["test"], dev, held, real)
    cmd = _finetune_command(labels, base, tuned.version, n_artifacts, holdout, config, adapt_dir)
    tuned.metadata.update({"reproduce": cmd, "fine_tune": {**report, "source": source},
                           "evaluation_guard": {"before": before, "after": after}})
    out = Path(out_dir) if out_dir else MODELS_DIR
    wpath = tuned.save(out / tuned.version)
    card = write_finetune_card(out / f"{tuned.version}.md", tuned.version, clf.version, source,
                               report, before, after, cmd)
    return {"before": before, "after": after, "report": report, "source": source,
            "weights": str(wpath), "card": str(card)}


def _real_data(dev_path: Path, adapt_dir: str | Path | None
               ) -> tuple[tuple[np.ndarray, dict] | None, dict[str, np.ndarray] | None]:
    """The guard's real data: the ZTF dev set (where present), and the adapted alerts' pixels.

    The second is :func:`broker.training.realpixels.real_pixel_set` of ``adapt_dir`` (None
    without one).
    """
    from broker.training.realpixels import real_pixel_set
    from broker.training.ztf import ztf_triplets

    dev = ztf_triplets(dev_path)[:2] if dev_path.is_dir() else None
    return dev, real_pixel_set(adapt_dir, "ztf") if adapt_dir is not None else None


def _load_sets(root: Path, sets: dict[str, tuple[int, int, str | Path | None]],
               progress: bool) -> dict[str, dict[str, np.ndarray]]:
    """The simulated sets ``{name: (target_n, seed, folder or None)}``, loaded.

    A folder given is used as it is; else ``build/realbogus-<name>-<seed>``, generated once
    (one process) unless a complete one with these settings is there.
    """
    import dataclasses

    from broker.training.data import load_training_set
    from broker.training.main import _ensure_set
    from broker.training.settings import TrainingSetConfig

    out = {}
    for name, (n, seed, given) in sets.items():
        folder = Path(given) if given else root / "build" / f"realbogus-{name}-{seed}"
        if given is None:
            _ensure_set(folder, dataclasses.replace(TrainingSetConfig(), target_n=n, seed=seed,
                                                    workers=1), progress)
        out[name] = load_training_set(folder, np.float16)
    return out


def _adapt(clf: RealBogusClassifier, folder: Path, dev_path: Path, version: str,
           source: dict) -> RealBogusClassifier:
    """:func:`~broker.training.adapt.adapt_batchnorm` on the alerts of ``folder`` (never the dev set).

    Records the adaptation in ``source["adapt"]``.
    """
    from broker.training.adapt import adapt_batchnorm
    from broker.training.ztf import ztf_triplets

    if folder.resolve() == dev_path.resolve():
        raise ModelError("the dev set is for evaluation only: adapt on other alerts")
    adapted = adapt_batchnorm(clf, ztf_triplets(folder)[0], version)
    source["adapt"] = {"dir": folder.name, **adapted.metadata["adapted"]}
    return adapted


def _finetune_command(labels: str | Path | None, base: str | None, version: str,
                      n_artifacts: int, holdout: float, config: FineTuneConfig,
                      adapt_dir: str | Path | None = None) -> str:
    """The one command that remakes a fine-tuned model (CLI line, plus settings that differ)."""
    args = [f"--labels {Path(labels).name}"] if labels else []
    args += [f"--adapt {_shared_path(adapt_dir)}"] if adapt_dir else []
    args += [f"--base {base}"] if base else []
    args += [f"--artifacts {n_artifacts}"] if n_artifacts else []
    args += [f"--holdout {holdout}"] if holdout != 0.2 else []
    changed = {k: v for k, v in asdict(config).items() if v != asdict(FineTuneConfig())[k]}
    line = f"broker train-realbogus {' '.join(args)} --version {version}"
    return line + (f"  # FineTuneConfig{changed}" if changed else "")


def _shared_path(path: str | Path) -> str:
    """``path`` as recorded: relative to the repository root (``../shared/...``)."""
    import os

    return os.path.relpath(Path(path).resolve(), Path(__file__).resolve().parent.parent.parent)


def _fig(d: dict, *keys: str, digits: int = 3) -> str:
    v: object = d
    for k in keys:
        v = v.get(k) if isinstance(v, dict) else None
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and np.isfinite(v) else "n/a"


def write_finetune_card(path: Path, version: str, base: str, source: dict, report: dict,
                        before: dict, after: dict, command: str) -> Path:
    """Markdown card of a fine-tuned model: what it learnt from, and the guard figures before / after."""
    rows = [("held-out simulated AUC", ("sim", "auc"), 5),
            ("held-out simulated FNR = FPR", ("sim", "eer"), 4),
            ("... at the threshold", ("sim", "eer_threshold"), 3),
            ("ZTF dev set AUC vs drb > 0.5", ("dev", "auc_drb", "auc"), 3),
            ("... its 95 % bootstrap interval, low", ("dev", "auc_drb", "lo"), 3),
            ("... high", ("dev", "auc_drb", "hi"), 3),
            ("ZTF dev set braai-bogus scored >= 0.5", ("dev", "frac_bogus_passed"), 3),
            ("ZTF dev set braai-real scored < 0.5", ("dev", "frac_real_rejected"), 3),
            ("held-out labels AUC", ("labels", "auc"), 3),
            ("adapted alerts' real pixels: injections kept, S/N 5-10",
             ("real_pixels", "injected_kept_by_snr", "5-10"), 3),
            ("... S/N 10-20", ("real_pixels", "injected_kept_by_snr", "10-20"), 3),
            ("... their off-centre residuals passed", ("real_pixels", "residual_passed"), 3),
            ("held-out labels accuracy at 0.5", ("labels", "accuracy_at_0.5"), 3)]
    lines = [f"# Real/bogus classifier `{version}` (adapted from `{base}`)", ""]
    if report:
        cfg = report["config"]
        lines += [
            f"`{base}`'s networks trained further by `broker.training.finetune.fine_tune`: "
            f"{cfg['epochs']} epochs over the new triplets at a constant AdamW lr {cfg['lr']}, "
            f"batch {cfg['batch_size']} of which {cfg['sim_fraction']:.0%} simulated triplets of "
            f"`{base}`'s kind (rehearsal; {report['n_sim']} of them, generator seed 0), and an "
            f"L2-SP penalty {cfg['l2sp']} x the squared distance to `{base}`'s weights (final "
            f"distance {report['l2sp_distance']:.3g}); fixed epochs, no early stopping. "
            f"{report['seconds']} s on {report['threads']} CPU thread(s) in "
            f"{report['precision']}. New data: {report['n_new']} triplets "
            f"({report['n_new_real']} real).", ""]
    if source.get("adapt"):
        ad = source["adapt"]
        lines += [
            f"Batch-norm statistics re-estimated (AdaBN, `broker.training.adapt.adapt_batchnorm`) "
            f"on the pixels of {ad['n_triplets']} unlabelled alerts in `{ad['dir']}`; every "
            "learnt weight is the fine-tuned (or base) model's. The statistics are the target "
            "telescope's, so the held-out simulated figures below are read through another "
            "survey's scaling.", ""]
    lines += ["Input, output and normalisation as `" + base + "`. Sources: "
              f"`{json.dumps(source, sort_keys=True)}`. ZTF's rb / drb were not trained on and "
              "chose nothing (no early stopping, no threshold).", "",
             "## Guard against forgetting (before / after)", "",
             f"| figure | `{base}` | `{version}` |", "|---|---|---|"]
    lines += [f"| {name} | {_fig(before, *keys, digits=d)} | {_fig(after, *keys, digits=d)} |"
              for name, keys, d in rows if _fig(before, *keys) != "n/a"]
    lines += ["", "Held-out simulated set: `build/realbogus-test-1` (generator seed 1); ZTF dev "
              "set: `../shared/data/ztf_alerts_dev` (braai's drb as a reference, not truth)."
              + (" Real pixels: point sources injected into the adapted alerts' stamps and the "
                 "stamps' own off-centre residuals (`broker.training.realpixels`, seed 0), "
                 "scored at 0.5: no labels needed." if "real_pixels" in before else ""), ""]
    if source.get("adapt"):
        lines += ["## Use", "", f"For the telescope of `{source['adapt']['dir']}` only: its "
                  "batch-norm statistics are that telescope's, and the equal-error threshold on "
                  "simulated stamps moves with them (see the table). For another telescope, adapt "
                  f"`{base}` to its own alerts with the same command.", ""]
    lines += ["## Reproduce", "", "```", command, "```", ""]
    path.write_text("\n".join(lines))
    return path
