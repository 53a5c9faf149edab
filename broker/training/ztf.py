"""Real ZTF alerts: their normalised triplets and our scores compared with ZTF's ``drb`` / ``rb``.

:func:`ztf_triplets` reads and normalises the stamps of ``*.avro`` alert files,
:func:`compare_with_ztf` compares scores with ZTF's (a reference, not truth) and
:func:`evaluate_on_ztf` does both for a classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from broker.candidate import CUTOUT_SIZE
from broker.errors import CutoutError
from broker.normalise import alert_triplet, normalise_triplet, ztf_negative_subtraction

if TYPE_CHECKING:
    from broker.realbogus import RealBogusClassifier


# --- real ZTF alerts ------------------------------------------------------------------------------
def ztf_triplets(folder: str | Path, dedupe: bool = True
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Normalised triplets of the real ZTF alerts in ``folder`` with their ZTF scores.

    Parameters
    ----------
    folder : path
        Searched recursively for ``*.avro`` files.
    dedupe : bool
        Keep the first record of each ``candid`` (the sample repositories repeat some alerts).

    Returns
    -------
    x : ndarray, shape (N, 3, 63, 63), float32
    meta : dict of ndarray, shape (N,)
        ``rb``, ``drb`` (NaN where the packet has none, or only a filled-in 0 without a
        ``drbversion``), ``candid``, ``objectId``, ``file``,
        ``n_nan`` (non-finite input pixels, all channels), ``n_pad`` (pixels padded per channel)
        and ``fading`` (``isdiffpos`` false: the difference stamp was negated to science minus
        reference, :func:`broker.normalise.alert_triplet`).
    rejected : list of str
        One reason per record that could not be used (JPEG stamps, unreadable files, ...).
    """
    from broker.training.devset import packets

    xs, rows, seen = [], [], set()
    rejected: list[str] = []
    for name, r in packets(folder, rejected):  # unreadable files and records: in ``rejected``
        cand = r["candidate"] if isinstance(r.get("candidate"), dict) else {}
        cid = cand.get("candid", r.get("candid"))
        if dedupe and cid is not None and cid in seen:
            continue
        try:
            sci, ref, diff = alert_triplet(r)
            x, flags = normalise_triplet(sci, ref, diff)
        except CutoutError as exc:
            rejected.append(f"{name}: {exc}")
            continue
        seen.add(cid)
        xs.append(x)
        rows.append({"rb": cand.get("rb"), "drb": _drb(cand), "candid": cid or 0,
                     "fading": ztf_negative_subtraction(r),
                     "objectId": str(r.get("objectId", "")), "file": name,
                     "n_nan": sum(flags.n_nan), "n_pad": flags.n_pad})
    x = np.stack(xs) if xs else np.zeros((0, 3, CUTOUT_SIZE, CUTOUT_SIZE), np.float32)
    meta = {
        "rb": np.array([np.nan if r["rb"] is None else r["rb"] for r in rows], float),
        "drb": np.array([np.nan if r["drb"] is None else r["drb"] for r in rows], float),
        "candid": np.array([r["candid"] for r in rows], dtype=np.int64),
        "objectId": np.array([r["objectId"] for r in rows], dtype=str),
        "file": np.array([r["file"] for r in rows], dtype=str),
        "n_nan": np.array([r["n_nan"] for r in rows], dtype=int),
        "n_pad": np.array([r["n_pad"] for r in rows], dtype=int),
        "fading": np.array([r["fading"] for r in rows], dtype=bool),
    }
    return x, meta, rejected


def _drb(cand: dict) -> float | None:
    """ZTF's ``drb`` of a candidate, None where the packet has none.

    Some brokers' copies of packets older than schema 3.3 (ALeRCE's) carry ``drb = 0.0`` with an
    empty ``drbversion``: that is a filled-in default, not braai's score (19 of the 701 dev-set
    triplets; read as bogus they were a quarter of the dev set's "braai-bogus").
    """
    return cand.get("drb") if cand.get("drbversion") else None


def compare_with_ztf(scores: np.ndarray, meta: dict[str, np.ndarray]) -> dict:
    """Our scores against ZTF's ``drb`` and ``rb`` (a reference, not truth).

    Returns
    -------
    dict
        Per reference (``drb``, ``rb``): ``n`` with a score, ``n_real`` above 0.5, ``auc`` of our
        score against reference > 0.5 (NaN with one class), ``spearman`` rank correlation with
        its p-value, ``agree_at_0.5``; plus ``n``, ``mean_score``, ``frac_above_0.5``.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, float)
    out: dict = {"n": int(len(s)),
                 "mean_score": float(np.mean(s)) if len(s) else float("nan"),
                 "frac_above_0.5": float(np.mean(s >= 0.5)) if len(s) else float("nan")}
    for name in ("drb", "rb"):
        v = meta[name]
        ok = np.isfinite(v)
        lab = v[ok] > 0.5
        two = 0 < lab.sum() < ok.sum()
        rho = spearmanr(s[ok], v[ok]) if ok.sum() > 2 else None
        out[name] = {"n": int(ok.sum()), "n_real": int(lab.sum()),
                     "auc": float(roc_auc_score(lab, s[ok])) if two else float("nan"),
                     "spearman": float(rho.statistic) if rho is not None else float("nan"),
                     "spearman_p": float(rho.pvalue) if rho is not None else float("nan"),
                     "agree_at_0.5": float(np.mean((s[ok] >= 0.5) == lab)) if ok.any()
                     else float("nan")}
    return out


def evaluate_on_ztf(clf: RealBogusClassifier, folder: str | Path) -> dict:
    """:func:`compare_with_ztf` of ``clf`` on the alerts of ``folder`` (+ ``n_rejected``)."""
    x, meta, rejected = ztf_triplets(folder)
    out = compare_with_ztf(clf.score(x) if len(x) else np.zeros(0), meta)
    out["n_rejected"] = len(rejected)
    return out
