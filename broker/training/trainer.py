"""Training of the real/bogus CNN: :class:`TrainConfig` and the training loop :func:`train`.

Also the per-kind loss weights (:func:`kind_weights`), the thread count for a shared machine
(:func:`auto_threads`) and batched sigmoid scoring of a network (:func:`_scores`, also used by
the evaluation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from broker.errors import ConfigError, ModelError
from broker.realbogus import RealBogusClassifier, RealBogusEnsemble, build_net
from broker.training.augmentation import augment
from broker.training.data import split_indices
from broker.training.metrics import equal_error, evaluate


# --- training -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Training of the real/bogus CNN (:mod:`broker.realbogus`).

    The defaults are the recipe of both shipped models (``realbogus-v10`` and ``-v11``, whose
    sidecars record the settings used; ``realbogus-v10`` ran before ``precision`` existed, in
    fp32, with ``threads=2``). What other values did is in ``docs/notes/training-settings.md``.

    Attributes
    ----------
    arch : str
        Network class name in :data:`broker.realbogus.ARCHITECTURES`. Default
        ``"RealBogusNetV2"``.
    max_epochs : int
        Upper bound on passes over the training split; the learning rate follows a one-cycle
        schedule over this many epochs. Default 12: ~13 min on one core for 100k triplets.
    patience : int
        Stop after this many epochs without a lower validation loss; keep the best weights.
        Default 12 (= ``max_epochs``): the one-cycle schedule does its best in its last,
        low-rate epochs, and a short patience stops a run on a noisy validation loss at a high
        rate.
    batch_size : int
        Triplets per step. Default 256: ~25% more triplets/s than 128 on 2 CPU cores.
    lr : float
        Peak AdamW learning rate of the one-cycle schedule. Default 3e-3: batch-normalised net.
    weight_decay : float
        Decoupled weight decay (AdamW). Default 1e-4.
    val_fraction : float
        Fraction held out for validation (early stopping). Split by ``group`` (field) when there
        are at least 5 groups, so that the same source at several epochs is not on both sides.
        Default 0.15.
    width, dense : int
        Network size (see the network classes). Default 16 and 64.
    threads : int
        torch intra-op threads; 0 = automatic (:func:`auto_threads`): up to 2 (the build
        machine's cores), as many as are idle. Default 0. On an oversubscribed 2-core machine
        two threads spin against the other work: measured 155 vs 419 triplets/s (forward +
        backward, batch 256, load average 8). The count used is in the report (results can
        differ in the last bits between thread counts).
    max_seconds : float
        Wall-clock budget of the training loop (s) for all members together, each getting an
        equal share, checked after every batch. Default 1680 s (28 min, as the CLI's
        ``--max-minutes``): the issue's ~30 min on 2 CPU cores minus loading and evaluation;
        ``realbogus-v11``'s 3 x 12 epochs took 1,022 s within it. When the budget stops a
        member its one-cycle schedule is cut short (reported) and the weights then depend on
        the machine's speed.
    p_truncate : float
        Probability that a training triplet has 1-24 rows at one side set to 0, as the
        normaliser pads a ZTF stamp cut at a CCD edge (domain augmentation). Default 0.1.
    p_mask : float
        Probability of a random 2-12 px rectangle set to 0 in all channels, as the normaliser
        fills NaN pixels (domain augmentation). Default 0.05.
    members : int
        Networks trained from seeds ``seed .. seed + members - 1`` and averaged
        (:class:`broker.realbogus.RealBogusEnsemble`); 1 = a single network. Default 3: the mean
        of three seeds has a lower held-out FNR = FPR than any single one, and three fit the
        time budget and the 2,000 triplets/s target.
    member_splits : bool
        Each member draws its own train / validation split (by field, from its own seed), so
        that each trains on partly different fields (bagging by field); False: all share the
        split of ``seed``. Default True: lower held-out FNR = FPR and a higher AUC against
        ZTF's ``rb`` than a shared split.
    kind_weight_power : float
        Loss weight of a candidate ~ (share of its kind within its class) ** -power, normalised
        to mean 1 per class: 0 = plain, 1 = every kind counts equally. Default 0.5: the rare
        bogus kinds that look most like reals (dipoles, PSF-mismatch and saturated-star
        residuals on a reference source, 0.1-0.5% of the set each) weigh ~10x a cosmic ray; with
        0 they caused most errors on the held-out set.
    precision : str
        Arithmetic of the training forward and backward passes: ``"fp32"``, ``"bf16"``
        (``torch.autocast`` to bfloat16; weights, optimiser and loss stay float32) or ``"auto"``
        (default): bf16 where the CPU has bfloat16 instructions (``avx512_bf16`` / ``amx_bf16``
        in ``/proc/cpuinfo``), else fp32, where bf16 is emulated and slower. Measured on the
        build machine (AMD EPYC, avx512_bf16, 2 threads, batch 256): 58 against 95 ms per step.
        Validation and inference stay float32. The precision used is in the report.
    seed : int
        Seeds member 0's initialisation, shuffling, augmentation and split (member ``i`` uses
        ``seed + i``). Default 0.
    """

    arch: str = "RealBogusNetV2"
    max_epochs: int = 12
    patience: int = 12
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    width: int = 16
    dense: int = 64
    threads: int = 0
    max_seconds: float = 1680.0
    p_truncate: float = 0.1
    p_mask: float = 0.05
    kind_weight_power: float = 0.5
    members: int = 3
    member_splits: bool = True
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"TrainConfig.precision must be 'auto', 'fp32' or 'bf16', "
                              f"got {self.precision!r}")


def kind_weights(labels: np.ndarray, kinds: np.ndarray, power: float) -> np.ndarray:
    """Per-candidate loss weights ``(share of kind in its class) ** -power``, mean 1 per class.

    Returns
    -------
    ndarray, shape (N,), float32
    """
    y = np.asarray(labels).astype(int)
    k = np.asarray(kinds).astype(str)
    w = np.ones(len(y), np.float64)
    if power:
        for cls in (0, 1):
            m = y == cls
            uk, inv, cnt = np.unique(k[m], return_inverse=True, return_counts=True)
            wc = (cnt[inv] / m.sum()) ** -power
            w[m] = wc / wc.mean()
    return w.astype(np.float32)


def bf16_training(precision: str) -> bool:
    """Whether :class:`TrainConfig` ``precision`` means bfloat16 autocast on this machine."""
    if precision != "auto":
        return precision == "bf16"
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln for ln in fh if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_threads(max_threads: int = 2, sample_s: float = 1.0) -> int:
    """Intra-op threads for this machine now: up to ``max_threads`` cores not already busy.

    Busy cores are measured over ``sample_s`` seconds from ``/proc/stat``, not from the 1-min
    load average, which still counts the generator's workers for a minute after they exit
    (and once made a training run use one thread). Elsewhere: all cores.
    """
    import os
    import time

    cores = os.cpu_count() or 1

    def idle_total() -> tuple[float, float]:
        with open("/proc/stat") as fh:
            v = [float(t) for t in fh.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, all

    try:
        i0, t0 = idle_total()
        time.sleep(sample_s)
        i1, t1 = idle_total()
    except (OSError, ValueError, IndexError):
        return int(max(1, min(max_threads, cores)))
    free = cores * (i1 - i0) / max(t1 - t0, 1e-9)
    return int(max(1, min(max_threads, cores, np.floor(free + 0.5))))


def _scores(net: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Sigmoid scores of (N, 3, 63, 63) triplets (any float dtype), in batches, eval mode."""
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch], dtype=np.float32))
            xb = xb.contiguous(memory_format=torch.channels_last)  # the layout nets train in
            out.append(torch.sigmoid(net(xb)).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def train(
    data: dict[str, np.ndarray],
    config: TrainConfig = TrainConfig(),
    version: str = "realbogus-v1",
    progress: bool = True,
) -> tuple[RealBogusClassifier, dict]:
    """Train the CNN (``config.members`` > 1: an ensemble) on a loaded training set (:func:`load_training_set`).

    Member ``i`` is initialised, shuffled and augmented from seed ``config.seed + i``, gets
    ``1/members`` of ``config.max_seconds`` and, with ``config.member_splits``, its own train /
    validation split by field (else all use the split of ``config.seed``).

    Returns
    -------
    classifier : RealBogusClassifier
        With the best (lowest validation loss) weights of each member.
    report : dict
        ``val`` metrics (:func:`evaluate`, per kind): of the model on the shared validation
        split, or with ``member_splits`` of each member on its own split, pooled (no row is
        held out from every member); ``history`` per epoch (per member in ``members``), sizes
        (of member 0's split), seconds.
    """
    t0 = time.time()
    threads = config.threads or auto_threads()
    torch.set_num_threads(threads)
    y = data["y"].astype(np.float32)
    groups = data.get("group", np.zeros(len(y), dtype=str))
    splits = [split_indices(groups, config.val_fraction,
                            config.seed + (i if config.member_splits else 0))
              for i in range(config.members)]
    for tr, va in splits:
        if len(tr) == 0 or len(va) == 0 or len(np.unique(y[tr])) < 2:
            raise ModelError(f"training set too small or one-class: {len(tr)} train, "
                             f"{len(va)} val")
    runs = [_train_member(data, tr, va, replace(config, seed=config.seed + i,
                                                 max_seconds=config.max_seconds / config.members),
                          progress) for i, (tr, va) in enumerate(splits)]
    net = runs[0][0] if config.members == 1 else RealBogusEnsemble([n for n, _ in runs])
    if config.member_splits:
        va = np.concatenate([v for _, v in splits])
        sv = np.concatenate([_scores(n, data["x"][v]) for (n, _), (_, v) in zip(runs, splits, strict=True)])
    else:
        va = splits[0][1]
        sv = _scores(net, data["x"][va])
    kinds = data.get("kind")
    val = evaluate(sv, y[va], 0.5, kinds[va] if kinds is not None else None)
    val["eer_threshold"], val["eer"] = equal_error(sv, y[va])
    stops = sorted({r["stopped_by"] for _, r in runs})
    report = {
        "val": val,
        "history": [h for _, r in runs for h in r["history"]],
        "n_train": int(len(splits[0][0])),
        "n_val": int(len(splits[0][1])),
        "epochs_run": sum(r["epochs_run"] for _, r in runs),
        "threads": threads,
        "precision": runs[0][1]["precision"],
        "stopped_by": " / ".join(stops),
        "seconds": round(time.time() - t0, 1),
        "config": asdict(config),
    }
    if config.members > 1:
        report["members"] = [{k: v for k, v in r.items() if k != "history"} for _, r in runs]
    clf = RealBogusClassifier(net, version, {"training": {k: v for k, v in report.items()
                                                          if k != "history"}})
    return clf, report


@dataclass
class _Step:
    """One network's optimisation step.

    The network, its optimiser and schedule, the loss with its per-row weights, and the arithmetic
    (``bf16``: autocast to bfloat16).
    """

    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    weights: torch.Tensor
    bf16: bool


def _step_for(data: dict[str, np.ndarray], tr: np.ndarray, n_batches: int,
              config: TrainConfig) -> _Step:
    """A fresh network with AdamW on a one-cycle schedule, and its weighted loss.

    The network is initialised from torch's global seed; the schedule runs over
    ``config.max_epochs * n_batches`` steps; the loss is weighted for the class balance of rows
    ``tr`` and by kind (:func:`kind_weights`).
    """
    y = data["y"].astype(np.float32)
    yt = torch.from_numpy(y[tr])
    # channels-last: oneDNN's fast convolution layout on CPUs, as in inference (measured
    # ~1.18x forward + backward at batch 256 on the build machine)
    net = build_net({"name": config.arch, "width": config.width, "dense": config.dense})
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # valid; not in torch's stubs
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr,
                                                total_steps=config.max_epochs * n_batches)
    pos_weight = torch.tensor(float((1 - yt).sum() / yt.sum().clamp(min=1)))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")
    kinds_all = data.get("kind")
    w_all = torch.from_numpy(kind_weights(y, kinds_all, config.kind_weight_power)
                             if kinds_all is not None else np.ones(len(y), np.float32))
    return _Step(net, opt, sched, loss_fn, w_all, bf16_training(config.precision))


#: Columns of the training progress bar.
_BAR = ("[bold]real/bogus[/] epoch {task.fields[epoch]}",
        "{task.completed}/{task.total} batches  loss {task.fields[loss]:.4f}  "
        "val {task.fields[val]:.4f}")


def _train_member(data: dict[str, np.ndarray], tr: np.ndarray, va: np.ndarray,
                  config: TrainConfig, progress: bool) -> tuple[nn.Module, dict]:
    """One network trained on rows ``tr``, early-stopped on rows ``va``: (best net, report)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.time()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x, y = data["x"], data["y"].astype(np.float32)  # x may stay float16: batches are cast
    xv, yv = x[va], y[va]
    nb = (len(tr) + config.batch_size - 1) // config.batch_size
    step = _step_for(data, tr, nb, config)
    hist: list[dict] = []
    best, best_loss, bad, out_of_time = None, float("inf"), 0, False
    cols = (TextColumn(_BAR[0]), BarColumn(), TextColumn(_BAR[1]), TimeElapsedColumn())
    with Progress(*cols, disable=not progress) as bar:
        task = bar.add_task("train", total=nb, epoch=0, loss=float("nan"), val=float("nan"))
        for ep in range(config.max_epochs):
            step.net.train()
            perm = torch.randperm(len(tr), generator=gen)
            bar.reset(task, total=nb, epoch=ep + 1, loss=float("nan"),
                      val=hist[-1]["val_loss"] if hist else float("nan"))
            train_loss, batches, out_of_time = _train_epoch(
                step, x, y, tr, perm, gen, config, t0,
                lambda loss: bar.update(task, advance=1, loss=loss))
            sv = np.clip(_scores(step.net, xv), 1e-7, 1 - 1e-7)
            vloss = float(-np.mean(yv * np.log(sv) + (1 - yv) * np.log(1 - sv)))
            bar.update(task, val=vloss)
            hist.append({"epoch": ep + 1, "train_loss": train_loss, "val_loss": vloss,
                         "val_auc": evaluate(sv, yv)["auc"], "batches": batches,
                         "seconds": round(time.time() - t0, 1)})
            if progress:
                bar.console.print(f"epoch {ep + 1}: " + ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in hist[-1].items() if k != "epoch"))
            if vloss < best_loss - 1e-4:
                best_loss, bad = vloss, 0
                best = {k: v.detach().clone() for k, v in step.net.state_dict().items()}
            else:
                bad += 1
            if bad >= config.patience or out_of_time:
                break
    if best is None:  # no epoch ran, or none gave a finite validation loss
        raise ModelError("training kept no network: no epoch gave a finite validation loss")
    step.net.load_state_dict(best)
    return step.net, {"history": hist, "epochs_run": len(hist), "seed": config.seed,
                      "n_val": len(va), "precision": "bf16" if step.bf16 else "fp32",
                      "stopped_by": "time budget" if out_of_time else
                      ("early stopping" if bad >= config.patience else "max_epochs"),
                      "val_loss": best_loss, "seconds": round(time.time() - t0, 1)}


def _train_epoch(step: _Step, x: np.ndarray, y: np.ndarray, tr: np.ndarray, perm: torch.Tensor,
                 gen: torch.Generator, config: TrainConfig, t0: float,
                 on_batch: Callable[[float], object]) -> tuple[float, int, bool]:
    """One pass over rows ``tr`` in the order ``perm``, in batches of ``config.batch_size``.

    The batches are augmented from ``gen``; the pass stops early once ``config.max_seconds`` have
    passed since ``t0``. ``on_batch`` gets the mean loss so far after each batch.

    Returns
    -------
    train_loss : float
        Mean (weighted) loss over the rows seen.
    batches : int
        Batches run.
    out_of_time : bool
        Whether the time budget stopped the pass.
    """
    tot, seen = 0.0, 0
    nb = (len(tr) + config.batch_size - 1) // config.batch_size
    for b in range(nb):
        idx = perm[b * config.batch_size : (b + 1) * config.batch_size]
        rows = tr[np.sort(idx.numpy())]  # sorted: faster gather from the big array
        # torch converts float16 ~4x faster than numpy's astype
        xb = augment(torch.from_numpy(x[rows]).float(), gen, config.p_truncate, config.p_mask)
        step.opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step.bf16):
            logits = step.net(xb)
        loss = (step.loss_fn(logits.float(), torch.from_numpy(y[rows])) * step.weights[rows]).mean()
        loss.backward()
        step.opt.step()
        step.sched.step()
        tot += loss.item() * len(idx)
        seen += len(idx)
        on_batch(tot / seen)
        if time.time() - t0 > config.max_seconds:
            return tot / max(seen, 1), b + 1, True
    return tot / max(seen, 1), nb, False
