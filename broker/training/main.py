"""End to end: :func:`main_train` (``broker train-realbogus``) and the cards it writes.

:func:`main_train` generates (or reuses) the training and held-out sets, trains, evaluates and
writes the weights; :func:`write_model_card` writes the Markdown card beside them,
:func:`model_cost` counts parameters and FLOPs, :func:`_ensure_set` reuses a complete set with the
same config.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from broker import MODELS_DIR
from broker.candidate import CUTOUT_SIZE
from broker.realbogus import DEFAULT_VERSION, RealBogusClassifier
from broker.training.data import load_training_set
from broker.training.evaluation import _fmt, main_eval
from broker.training.generate import generate_training_set
from broker.training.settings import SET_SETTINGS_ADDED, TrainingSetConfig, config_dict
from broker.training.trainer import TrainConfig, train


# --- model card + end to end ----------------------------------------------------------------------
def write_model_card(path: str | Path, version: str, manifest: dict, report: dict,
                     evaluation: dict, command: str, arch: dict) -> Path:
    """Markdown model card: data, version, training, held-out and ZTF metrics, how to retrain.

    Every number comes from ``manifest`` (:func:`generate_training_set`), ``report``
    (:func:`train`) and ``evaluation`` (:func:`main_eval`).
    """
    lines = _card_model(version, arch, report["config"]) + _card_data(manifest)
    lines += _card_training(report, arch) + _card_evaluation(evaluation)
    lines += ["Full report with per-kind errors, S/N dependence, plots and example triplets: "
              "`broker eval-realbogus` (the shipped one is in `docs/realbogus-report/`).", "",
              "## Reproduce", "", "```", command, "```", ""]
    lines += _card_limits(manifest.get("config", {}))
    p = Path(path)
    p.write_text("\n".join(lines))
    return p


def _card_model(version: str, arch: dict, cfg: dict) -> list[str]:
    """Card lines: title, the network (``arch``: a sidecar's architecture with its cost), its input and output."""
    one = arch.get("members", [arch])[0]
    net = f"`broker.realbogus.{one['name']}` (width {one['width']}, dense {one['dense']}"
    if "members" in arch:
        k = len(arch["members"])
        net = (f"`broker.realbogus.{arch['name']}`: the mean logit of {k} "
               f"`{one['name']}` networks (width {one['width']}, dense {one['dense']}, seeds "
               f"{cfg['seed']}-{cfg['seed'] + k - 1}")
    return [
        f"# Real/bogus classifier `{version}`", "",
        f"{net}; {arch.get('n_params', '?')} parameters, {arch.get('mflops', '?')} MFLOP per triplet) "
        "on (science, reference, difference) 63x63 triplets scaled by "
        "`broker.normalise.normalise_triplet` (median / 1.4826 MAD per channel, asinh beyond 5 "
        "sigma, NaN and padding set to 0). Output: P(real) in [0, 1]; the score is always kept "
        "and any cut is configuration. Loaded by version "
        f"(`RealBogusClassifier.load('{version}')`), which the classify stage writes into every "
        "alert.", ""]


def _card_data(manifest: dict) -> list[str]:
    """Card lines: the training set, from its manifest."""
    return [
        "## Training data", "",
        f"- source: **{manifest.get('source')}** (simulate -> reference -> ZOGY subtraction -> "
        f"detection, labelled from the injection truth), generator seed {manifest.get('seed')}; "
        f"{manifest.get('n')} candidates, {manifest.get('n_real')} real / "
        f"{manifest.get('n_bogus')} bogus (balanced), {len(manifest.get('shards', []))} "
        f".npz shards, generated in {manifest.get('seconds')} s",
        f"- written, by kind: `{json.dumps(manifest.get('counts_by_kind'), sort_keys=True)}`",
        f"- seen before balancing: "
        f"`{json.dumps(manifest.get('counts_by_kind_before_balancing'), sort_keys=True)}`",
        f"- generator config: `{json.dumps(manifest.get('config'), sort_keys=True)}`",
        f"- pipeline code: {manifest.get('pipeline_commit', 'not recorded (made before it was)')}",
        ""]


def _card_training(report: dict, arch: dict) -> list[str]:
    """Card lines: how the network was trained and its validation figures, from the training report."""
    cfg = report["config"]
    own = "members" in arch and cfg.get("member_splits", False)
    split = ", member 0; each member draws its own split" if own else ""
    pooled = " (each member on its own held-out fields, pooled)" if own else ""
    return [
        "## Training", "",
        f"{report['n_train']} training / {report['n_val']} validation candidates (split by "
        f"field{split}); {report['epochs_run']} epochs in all ({report['stopped_by']}), {report['seconds']} s "
        f"on {report['threads']} CPU thread(s) in {report.get('precision', 'fp32')} "
        "(2-core machine shared with other work); "
        f"AdamW one-cycle lr {cfg['lr']}, batch "
        f"{cfg['batch_size']}, flips + 90 degree rotations, edge truncation p={cfg['p_truncate']}"
        f", NaN-like masks p={cfg['p_mask']}; loss weight per kind ~ share^-"
        f"{cfg.get('kind_weight_power', 0)}; seed {cfg['seed']}. Validation split{pooled} (held-out "
        f"fields, same generator run and pipeline code as training): AUC "
        f"{_fmt(report['val']['auc'], 5)}, FNR = FPR {_fmt(report['val'].get('eer'), 4)} at "
        f"threshold {_fmt(report['val'].get('eer_threshold'), 3)}.", ""]


def _card_evaluation(evaluation: dict) -> list[str]:
    """Card lines: the held-out simulated set's and the ZTF alerts' figures of :func:`main_eval`."""
    sim, z = evaluation.get("sim"), evaluation.get("ztf")
    lines: list[str] = []
    if sim:
        a = sim["at_threshold"]
        lines += ["## Held-out simulated set", "",
                  f"{sim['n']} candidates from generator seed {sim['seed']} (other fields, never "
                  "seen in training):", "",
                  "| metric | value |", "|---|---|",
                  f"| ROC AUC | {_fmt(a['auc'], 5)} |",
                  f"| FNR / FPR at {evaluation['threshold']} | {_fmt(a['fnr'], 4)} / "
                  f"{_fmt(a['fpr'], 4)} |",
                  f"| FNR = FPR | {_fmt(sim['eer'], 4)} at threshold "
                  f"{_fmt(sim['eer_threshold'], 3)} |", ""]
    if z:
        lines += ["## Real ZTF alerts (ZTF's scores as a reference, not truth)", "",
                  "| reference | n | n > 0.5 | AUC | Spearman |", "|---|---|---|---|---|"]
        for name in ("drb", "rb"):
            r = z[name]
            lines.append(f"| {name} | {r['n']} | {r['n_real']} | {_fmt(r['auc'])} | "
                         f"{_fmt(r['spearman'])} |")
        lines.append("")
    d = evaluation.get("dev")
    if d:
        a = d["auc_drb"]
        lines += [f"ZTF dev set (`{d['dir']}`, evaluation only): AUC against drb > 0.5 "
                  f"{_fmt(a['auc'])} [{_fmt(a['lo'])}, {_fmt(a['hi'])}] ({a['n_neg']} at <= "
                  f"0.5); braai-bogus scored >= {d['threshold']}: "
                  f"{_fmt(d['frac_bogus_passed'])}.", ""]
    return lines


def _card_limits(gen: dict) -> list[str]:
    """Card lines: the model's limits, with the labelling conventions of its training set.

    ``gen`` is the generator config of its manifest.
    """
    return [
        "## Limits", "",
        "- Trained on simulated frames only; the domain gap to a given telescope is unknown "
        "until labelled real candidates from it are available. ZTF comparisons rest on a few "
        "public sample alerts, almost all real.",
        "- Rare kinds (PSF-mismatch and saturated-star residuals, trails) are learnt from few "
        "examples; see the per-kind counts.",
        "- Changes of a few % of a bright star's flux look like the subtraction residuals of "
        "constant stars and carry most errors, fadings most, in simulation and on ZTF (the "
        "report's by-sign table; BENCHMARKS.md).",
        "- Labels and the bogus mix depend on the subtraction and detection code: a set made "
        "before the detection learnt to reject sharp peaks itself is dominated by cosmic rays, "
        "one made after it by noise peaks and residuals. Regenerate the sets (same command) "
        "after such changes.",
        "- Labels of changes on stars of deliberately misaligned references are a convention: "
        "this set's `TrainingSetConfig` has " + ", ".join(
            f"`{k}={gen.get(k, SET_SETTINGS_ADDED.get(k))}`"
            for k in ("swamped_ratio", "variable_dipole_lobe", "dipole_lobe_kinds",
                      "min_dipole_lobe_snr", "min_dipole_lobe_ratio", "misalign_wavelength_px"))
        + " (see its docstring and docs/notes/training-settings.md). Near that convention's "
        "boundary the same stamp carries either label: the report's \"What limits the targets\" "
        "splits the held-out errors by the state of the frame's reference and by the stamp's "
        "lobes.", ""]


def model_cost(net: nn.Module) -> dict:
    """Parameters and forward FLOPs per triplet (torch's FlopCounterMode: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    net.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, 3, CUTOUT_SIZE, CUTOUT_SIZE))
    return {"n_params": int(sum(p.numel() for p in net.parameters())),
            "mflops": round(fc.get_total_flops() / 1e6, 2)}


def _ensure_set(path: Path, config: TrainingSetConfig, progress: bool) -> dict:
    """Manifest of the set at ``path``, generating it unless a complete one with ``config`` is there.

    ``workers`` is not compared: fields are written in field order whatever the process count.
    A setting that a set's manifest predates counts as :data:`SET_SETTINGS_ADDED`'s value, the
    one that reproduces the code that wrote it.
    """
    mp = path / "manifest.json"
    if mp.is_file():
        man = json.loads(mp.read_text())
        want = {k: v for k, v in config_dict(config).items() if k != "workers"}
        have = {**SET_SETTINGS_ADDED, **(man.get("config") or {})}
        have.pop("workers", None)
        if man.get("complete") and have == want:
            return man
    return generate_training_set(path, config, progress)


def _ensure_sets(base: TrainingSetConfig, workers: int, progress: bool,
                 *sets: tuple[Path, int, int]) -> dict:
    """:func:`_ensure_set` of each ``(folder, target_n, seed)`` with ``base``'s other settings.

    Returns the first set's manifest.
    """
    return [_ensure_set(path, dataclasses.replace(base, target_n=n, seed=s, workers=workers),
                        progress) for path, n, s in sets][0]


def reproduce_command(seed: int, target_n: int, version: str, set_config: TrainingSetConfig,
                      train_config: TrainConfig) -> str:
    """The one command that remakes a model.

    The CLI line when it runs these settings, else the Python call with the settings that differ
    from the defaults.

    The CLI sets the seed of both configs and ``max_seconds`` (``--max-minutes``); the thread
    count is automatic, and the generator's ``target_n``, ``seed`` and ``workers`` are
    arguments.
    """
    default = config_dict(TrainingSetConfig())
    changed = {k: v for k, v in config_dict(set_config).items()
               if v != default[k] and k not in ("target_n", "seed", "workers")}
    plain = dataclasses.asdict(TrainConfig(seed=seed))
    tchanged = {k: v for k, v in dataclasses.asdict(train_config).items()
                if v != plain[k] and k not in ("max_seconds", "threads")}
    if not changed and not tchanged:
        return (f"broker train-realbogus --seed {seed} --target-n {target_n} --version {version}"
                f"  # = broker.training.main_train(seed={seed}, target_n={target_n}, "
                f"version='{version}')")
    tcall = {"seed": train_config.seed, **tchanged}  # main_train's seed does not reach it
    return (f"broker.training.main_train(seed={seed}, target_n={target_n}, version='{version}'"
            + (f", set_config=TrainingSetConfig(**{changed})" if changed else "")
            + (f", train_config=TrainConfig(**{tcall})" if tchanged else "") + ")")


def main_train(
    out_dir: str | Path = MODELS_DIR,
    seed: int = 0,
    *,
    version: str = DEFAULT_VERSION,
    target_n: int = 100_000,
    test_n: int = 12_000,
    data_dir: str | Path | None = None,
    test_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    train_config: TrainConfig | None = None,
    set_config: TrainingSetConfig | None = None,
    workers: int = 1,
    ztf_dir: str | Path | None = None,
    compare: str | None = DEFAULT_VERSION,
    progress: bool = True,
) -> dict:
    """Generate the data, train the real/bogus CNN, evaluate it and write weights + model card.

    Parameters
    ----------
    out_dir : path
        Where ``<version>.pt``, ``.json`` and ``.md`` are written. Default :data:`MODELS_DIR`
        (``broker/models/``, the shipped models).
    seed : int
        Seeds the training set (generator seed ``seed``), the held-out set (``seed + 1``) and
        training: same seed, same model (on the same torch build).
    version : str
    target_n : int
        Balanced training candidates to generate (>= 100k for the shipped model).
    test_n : int
        Held-out candidates (other seed, other fields).
    data_dir, test_dir : path, optional
        Shard folders; default ``build/realbogus-train-<seed>`` and ``build/realbogus-test-<seed+1>``.
        A complete set with the same config is reused, not regenerated.
    report_dir : path, optional
        Evaluation report folder; default ``reports/<version>``.
    train_config : TrainConfig, optional
    set_config : TrainingSetConfig, optional
        Generator settings of both sets (their ``target_n``, ``seed`` and ``workers`` are
        replaced by the arguments above). Default: :class:`TrainingSetConfig`'s defaults.
    workers : int
        Generator processes (2 on an idle 2-core machine).
    ztf_dir : path, optional
        Real ZTF alerts (default ``../shared/data/ztf_alerts`` when present).
    compare : str, optional
        Model evaluated beside the new one in the report (default: the shipped default, when
        it is another version and its weights are in :data:`MODELS_DIR`).
    progress : bool
        Progress bars.

    Returns
    -------
    dict
        ``manifest``, ``report`` (training), ``evaluation`` (:func:`main_eval`), paths, seconds.
    """
    t0 = time.time()
    root = Path(__file__).resolve().parent.parent.parent
    data = Path(data_dir) if data_dir else root / "build" / f"realbogus-train-{seed}"
    test = Path(test_dir) if test_dir else root / "build" / f"realbogus-test-{seed + 1}"
    base = set_config or TrainingSetConfig()
    manifest = _ensure_sets(base, workers, progress, (data, target_n, seed), (test, test_n, seed + 1))
    t_gen = time.time() - t0
    ds = load_training_set(data, np.float16)
    cfg = train_config or TrainConfig(seed=seed)
    clf, report = train(ds, cfg, version, progress)
    cmd = reproduce_command(seed, target_n, version, base, cfg)
    shipped = compare and compare != version and (MODELS_DIR / f"{compare}.pt").exists()
    result = _write_model(clf, report, Path(out_dir), version, manifest, cmd, lambda weights: main_eval(
        weights, report_dir or root / "reports" / version, test, ztf_dir,
        compare=compare if shipped else None))
    result["seconds_generate"] = round(t_gen, 1)
    result["seconds_total"] = round(time.time() - t0, 1)
    return result


def _write_model(clf: RealBogusClassifier, report: dict, out: Path, version: str, manifest: dict,
                 command: str, evaluate: Callable[[Path], dict]) -> dict:
    """Write the trained model (weights, sidecar, card) to ``out``, evaluated by ``evaluate``.

    Returns :func:`main_train`'s result so far (manifest, training report, evaluation, weights).
    """
    out.mkdir(parents=True, exist_ok=True)
    arch = {**clf.net.arch, **model_cost(clf.net)}
    wpath, evaluation = _save_evaluated(clf, out / version, manifest, arch, command, evaluate)
    write_model_card(out / f"{version}.md", version, manifest, report, evaluation, command, arch)
    return {"manifest": manifest, "report": report, "evaluation": evaluation,
            "weights": str(wpath)}


def _save_evaluated(clf: RealBogusClassifier, path: Path, manifest: dict, arch: dict,
                    command: str, evaluate: Callable[[Path], dict]) -> tuple[Path, dict]:
    """Save the trained model, evaluate the saved weights, then save again with the evaluation.

    The first save has the model's data, cost and reproduce command in the sidecar; ``evaluate`` is
    :func:`main_eval` on the saved weights; the second save adds the evaluation to the sidecar.
    Returns the weights' path and the evaluation.
    """
    clf.metadata.update({"data": {k: manifest.get(k) for k in
                                  ("source", "seed", "n", "n_real", "n_bogus", "counts_by_kind",
                                   "config")},
                         "cost": arch, "reproduce": command})
    wpath = clf.save(path)
    evaluation = evaluate(wpath)
    clf.metadata.update({"evaluation": _sidecar_evaluation(evaluation)})
    clf.save(path)
    return wpath, evaluation


def _sidecar_evaluation(evaluation: dict) -> dict:
    """The held-out and ZTF results of :func:`main_eval` as the sidecar keeps them.

    Without the per-example lists (``disagreements``) and the figures at the equal-error threshold.
    """
    out: dict = {}
    for part in ("sim", "ztf"):  # keep the sidecar small: no per-example lists
        d = evaluation.get(part)
        out[part] = {k: v for k, v in d.items() if k not in ("disagreements", "at_eer")} if d else d
    return out
