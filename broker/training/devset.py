"""Real data the model was never trained on: the ZTF dev set's failures and other surveys' stamps.

:func:`bootstrap_auc` (an AUC with its stratified bootstrap interval), :func:`dev_analysis`
(our scores against ZTF's ``drb`` and ``rb`` on ``../shared/data/ztf_alerts_dev``: AUCs with
intervals, the fraction of braai-bogus we pass, the bogus we score highest and the reals we
score lowest) and :func:`other_survey_triplets` / :func:`score_other_surveys` (DECam, ATLAS,
Palomar Gattini-IR and WINTER alert stamps scored, a check of behaviour: their scores are not
labels). ZTF's scores are for evaluation only: nothing here trains on them or picks a threshold
with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from broker.avrofile import read_records
from broker.candidate import CUTOUT_SIZE
from broker.errors import CutoutError, DecodeError
from broker.normalise import decode_stamp, normalise_triplet

if TYPE_CHECKING:
    from broker.realbogus import RealBogusClassifier

#: Stamp keys of each other survey's packets: (science, reference, difference), dotted paths,
#: ``a|b`` where the survey's packets use either (WINTER's differ from Gattini-IR's); a reference
#: of None means the packets carry none (ATLAS): it is rebuilt as science - difference.
SURVEY_STAMPS: dict[str, tuple[str, str | None, str]] = {
    "decam_desirt": ("triggersource.scicutout", "triggersource.refcutout",
                     "triggersource.diffcutout"),
    "atlas": ("cutoutScience.stampData", None, "cutoutDifference.stampData"),
    "pgir_winter": ("cutoutScience|cutout_science", "cutoutTemplate|cutout_template",
                    "cutoutDifference|cutout_difference"),
}
#: Folder of each survey under ``../shared/data/other_surveys``.
SURVEY_FOLDERS = {"decam_desirt": "decam_desirt_alerts_avro", "atlas": "atlas_alerts_avro",
                  "pgir_winter": "other_survey_alerts_avro"}


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> dict[str, float]:
    """ROC AUC with a stratified percentile bootstrap interval.

    Positives and negatives are resampled separately, so every resample has the observed class
    sizes (66 negatives on the dev set: the interval is wide, ~+-0.04).

    Returns
    -------
    dict
        ``auc``, ``lo``, ``hi``, ``n_pos``, ``n_neg``; NaN figures without both classes.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, float)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    out = {"n_pos": int(len(pos)), "n_neg": int(len(neg))}
    if not len(pos) or not len(neg):
        return {**out, "auc": float("nan"), "lo": float("nan"), "hi": float("nan")}
    rng = np.random.default_rng(seed)
    # Mann-Whitney on the ranks of one resample: fast enough for 2000 resamples of ~700 items
    boot = []
    for _ in range(n_boot):
        p, n = s[rng.choice(pos, len(pos))], s[rng.choice(neg, len(neg))]
        boot.append(_auc_mw(p, n))
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {**out, "auc": float(roc_auc_score(y, s)), "lo": float(lo), "hi": float(hi)}


def _auc_mw(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC of positive scores ``pos`` against negative ``neg`` (ties count half)."""
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([pos, neg]))[: len(pos)]
    return float((r.sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def dev_analysis(scores: np.ndarray, meta: dict[str, np.ndarray], threshold: float = 0.5,
                 n_examples: int = 20) -> dict:
    """Our scores against ZTF's on the dev set: AUCs, pass rates and the worst of each class.

    Parameters
    ----------
    scores : ndarray, shape (N,)
        Our scores of :func:`broker.training.ztf.ztf_triplets`'s triplets.
    meta : dict of ndarray
        Its metadata (``drb``, ``rb``, ``fading``, ``objectId``, ``candid``).
    threshold : float
        Our operating threshold (the pass rates are at it; not tuned on ZTF's scores).
    n_examples : int
        Braai-bogus scored highest and braai-real scored lowest listed (``high_bogus``,
        ``low_real``: indices into the triplets, best first).

    Returns
    -------
    dict
        ``auc_drb`` and ``auc_rb`` (:func:`bootstrap_auc` against drb / rb > 0.5),
        ``frac_bogus_passed`` (drb <= 0.5 scored >= threshold), ``frac_real_rejected``,
        the same for fadings and brightenings (``by_sign``), ``high_bogus``, ``low_real``.
    """
    s, drb, rb = np.asarray(scores, float), meta["drb"], meta["rb"]
    ok, okr = np.isfinite(drb), np.isfinite(rb)
    neg, pos = np.flatnonzero(ok & (drb <= 0.5)), np.flatnonzero(ok & (drb > 0.5))
    out: dict = {"n": int(len(s)), "n_drb": int(ok.sum()), "n_drb_bogus": int(len(neg)),
                 "threshold": threshold,
                 "auc_drb": bootstrap_auc(drb[ok] > 0.5, s[ok]),
                 "auc_rb": bootstrap_auc(rb[okr] > 0.5, s[okr]),
                 "frac_bogus_passed": _frac(s[neg] >= threshold),
                 "frac_real_rejected": _frac(s[pos] < threshold), "by_sign": {}}
    for name, m in (("fading", meta["fading"]), ("brightening", ~meta["fading"])):
        out["by_sign"][name] = {
            "n_bogus": int(np.sum(m[neg])), "n_real": int(np.sum(m[pos])),
            "frac_bogus_passed": _frac(s[neg][m[neg]] >= threshold),
            "frac_real_rejected": _frac(s[pos][m[pos]] < threshold)}
    out["high_bogus"] = [int(i) for i in neg[np.argsort(-s[neg], kind="stable")][:n_examples]]
    out["low_real"] = [int(i) for i in pos[np.argsort(s[pos], kind="stable")][:n_examples]]
    return out


def _frac(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if len(mask) else float("nan")


def _field(record: dict, dotted: str) -> object:
    """A nested field of a packet by its dotted path (None where absent)."""
    value: object = record
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def survey_stamps(record: dict, keys: tuple[str, str | None, str]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(science, reference, difference) pixels of one other survey's packet.

    ``keys``: :data:`SURVEY_STAMPS`'s entry. Without a reference stamp the reference is
    science - difference (what the survey subtracted, up to its PSF matching). Stamps larger
    than 63 px are cut to their central 63 x 63 px.

    Raises
    ------
    CutoutError
        Missing or unreadable stamps, or stamps of different shapes.
    """
    sci = decode_stamp(_bytes(record, keys[0]))
    diff = decode_stamp(_bytes(record, keys[2]))
    if sci.shape != diff.shape:
        raise CutoutError(f"science {sci.shape} and difference {diff.shape} differ")
    ref = sci - diff if keys[1] is None else decode_stamp(_bytes(record, keys[1]))
    return centre_crop(sci), centre_crop(ref), centre_crop(diff)


def survey_triplet(record: dict, keys: tuple[str, str | None, str]) -> np.ndarray:
    """Normalised triplet of one other survey's packet (:func:`survey_stamps`).

    Raises
    ------
    CutoutError
        Missing or unreadable stamps, or stamps of different shapes.
    """
    try:
        return normalise_triplet(*survey_stamps(record, keys))[0]
    except ValueError as exc:
        raise CutoutError(f"unusable stamps: {exc}") from exc


def centre_crop(a: np.ndarray) -> np.ndarray:
    """The central 63 x 63 px of a larger stamp (WINTER's are 81 x 81), else the stamp.

    Parameters
    ----------
    a : ndarray, shape (ny, nx)

    Returns
    -------
    ndarray, shape (min(ny, 63), min(nx, 63)), a view of ``a``
    """
    y0, x0 = (max(0, n // 2 - CUTOUT_SIZE // 2) for n in a.shape[:2])  # pixel n // 2 lands at 31
    return a[y0 : y0 + CUTOUT_SIZE, x0 : x0 + CUTOUT_SIZE]


def _bytes(record: dict, keys: str) -> bytes:
    """The stamp bytes at the first of the ``|``-separated paths ``keys`` that holds some."""
    for key in keys.split("|"):
        v = _field(record, key)
        if isinstance(v, dict):  # ZTF-style {"fileName", "stampData"}
            v = v.get("stampData")
        if isinstance(v, bytes) and v:
            return v
    return b""


def packets(folder: str | Path, rejected: list[str]) -> Iterator[tuple[str, dict]]:
    """(file name, packet) of the ``*.avro`` files under ``folder``, in file-name order.

    A file that cannot be read (:func:`broker.avrofile.read_records`: not a container, blocks
    inflating past its bound, unreadable) adds its reason to ``rejected``, as does a record that
    is not a packet; the others are still read.
    """
    for f in sorted(p for p in Path(folder).rglob("*.avro") if p.is_file()):
        try:
            recs = read_records(f)
        except DecodeError as exc:
            rejected.append(str(exc))
            continue
        for r in recs:
            if isinstance(r, dict):
                yield f.name, r
            else:
                rejected.append(f"{f.name}: not an alert packet")


def other_survey_triplets(folder: str | Path, survey: str) -> tuple[np.ndarray, list[str]]:
    """Normalised triplets of one survey's ``*.avro`` packets under ``folder``.

    Returns
    -------
    x : ndarray, shape (N, 3, 63, 63), float32
    rejected : list of str
        One reason per packet that could not be used.
    """
    keys, xs = SURVEY_STAMPS[survey], []
    rejected: list[str] = []
    for name, r in packets(folder, rejected):
        try:
            xs.append(survey_triplet(r, keys))
        except CutoutError as exc:
            rejected.append(f"{name}: {exc}")
    x = np.stack(xs) if xs else np.zeros((0, 3, CUTOUT_SIZE, CUTOUT_SIZE), np.float32)
    return x, rejected


def score_other_surveys(clf: RealBogusClassifier, root: str | Path,
                        threshold: float = 0.5) -> dict[str, dict]:
    """Score distribution of each other survey's stamps (behaviour, not accuracy).

    Returns
    -------
    dict
        Per survey found under ``root``: ``n``, ``n_rejected``, ``frac_passed`` (scored >=
        ``threshold``), ``quartiles`` of the scores, and ``scores`` (list, for the histograms).
    """
    out: dict[str, dict] = {}
    for survey, sub in SURVEY_FOLDERS.items():
        folder = Path(root) / sub
        if not folder.is_dir():
            continue
        x, rejected = other_survey_triplets(folder, survey)
        s = clf.score(x) if len(x) else np.zeros(0, np.float32)
        out[survey] = {"n": int(len(s)), "n_rejected": len(rejected),
                       "frac_passed": _frac(s >= threshold),
                       "quartiles": [float(q) for q in np.quantile(s, [0.25, 0.5, 0.75])]
                       if len(s) else [], "scores": [float(v) for v in s]}
    return out
