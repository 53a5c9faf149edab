"""Training triplets cut from unlabelled real alert stamps, labelled by how they are made.

A survey's alert stamp is 63 px across, and its candidate sits at the centre; the rest of the
stamp is real sky, subtracted by the survey's own pipeline. Two kinds of triplet are cut from it,
each re-centred on a point away from the candidate (:func:`recentre`):

- **bogus**: a detection of the difference stamp away from the candidate that has an opposite
  lobe next to its peak (:func:`residual_peaks`): the rings and dipoles that bright stars and
  misalignments leave, with the survey's real PSF, noise, masks and saturation;
- **real**: a point source injected into the science and difference stamps at a random place
  (:func:`inject_point_source`), on whatever sky is there (empty, a galaxy, a star), with the
  PSF width measured on the science stamp (:func:`stamp_fwhm`) and an S/N counted against the
  stamp's own PSF-flux noise (:func:`psf_flux_sigma`: DECam's and WINTER's difference noise is
  correlated, and their PSF-flux noise is ~3 times what the pixel sigma says).

No score of the survey is read: the labels come from these two rules. The off-centre residuals
are not vetted one by one; looked at on a grid of 40 ZTF ones, nearly all are star residuals,
dipoles and mask edges. :func:`real_pixel_check` reads a model's scores of such a set: a check
of its behaviour on a telescope's real pixels that needs no labels (``broker eval-realbogus``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from broker.candidate import CUTOUT_SIZE
from broker.errors import ConfigError, CutoutError
from broker.normalise import alert_triplet, normalise_triplet
from broker.simulate.render import moffat_alpha

_C = CUTOUT_SIZE // 2  # the centre pixel of a 63x63 triplet
#: Smallest stamp side (px) cut from: DECam's alert stamps are 51 px, ZTF's 63 px. Stamps that
#: are not square are skipped: a CCD edge cut them, and their centre is not the candidate's.
MIN_SIDE = 31


@dataclass(frozen=True)
class RealPixelConfig:
    """How triplets are cut from real stamps.

    Attributes
    ----------
    min_peak : float
        Peak of an off-centre residual, robust sigmas of the difference stamp. Default 5 (a
        survey's detection threshold).
    min_lobe : float
        Depth of the opposite lobe within ``lobe_radius`` of that peak, sigmas. Default 3: a
        point source has none, a subtraction residual of a star (ring, dipole) has one.
    lobe_radius : float
        px. Default 5 (about twice a ZTF FWHM).
    min_offset : float
        Smallest distance of a cut's centre from the stamp's centre, px. Default 6: the
        candidate's own footprint is never cut.
    max_shift : int
        Largest offset along either axis, px. Default 22, so a re-centred triplet keeps at least
        41 of 63 px per axis (the rest is padded, as a stamp cut at a CCD edge).
    snr : tuple of float
        Range of the injected sources' S/N, against the stamp's PSF-flux noise
        (:func:`psf_flux_sigma`), log-uniform. Default (5, 100): from the detection threshold
        to bright transients.
    fwhm : float
        Injected PSF FWHM (px) where the science stamp has no star to measure
        (:func:`stamp_fwhm`) and the packet gives none (ZTF's ``candidate.fwhm``). Default 2.5,
        the median ``candidate.fwhm`` of the public ZTF alerts.
    gain : float
        e-/DN of the shot noise added with an injected source. Default 6.2 (ZTF's cameras).
    n_inject : int
        Injected sources per stamp. Default 2.
    """

    min_peak: float = 5.0
    min_lobe: float = 3.0
    lobe_radius: float = 5.0
    min_offset: float = 6.0
    max_shift: int = 22
    snr: tuple[float, float] = (5.0, 100.0)
    fwhm: float = 2.5
    gain: float = 6.2
    n_inject: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.min_offset < self.max_shift <= _C or not 0 < self.snr[0] < self.snr[1]:
            raise ConfigError(f"RealPixelConfig: 0 < min_offset < max_shift <= {_C} and "
                              f"0 < snr[0] < snr[1] needed, got {self}")
        if min(self.min_peak, self.min_lobe, self.lobe_radius, self.fwhm, self.gain) <= 0:
            raise ConfigError(f"RealPixelConfig values must be > 0, got {self}")


def _robust_z(a: np.ndarray) -> np.ndarray:
    """``a`` in robust sigmas about its median; NaN pixels become 0."""
    v = a[np.isfinite(a)]
    med = float(np.median(v))
    sigma = max(1.4826 * float(np.median(np.abs(v - med))), 1e-12)
    return np.nan_to_num((a - med) / sigma, nan=0.0)


def residual_peaks(diff: np.ndarray, config: RealPixelConfig = RealPixelConfig()
                   ) -> list[tuple[int, int, int]]:
    """Off-centre subtraction residuals of a difference stamp centred on its candidate.

    Every connected region above 3 sigma (of either sign) that does not touch the central 5x5
    px, with a peak of at least ``min_peak`` inside the ``max_shift`` box and at least
    ``min_offset`` from the centre, and an opposite lobe of ``min_lobe`` near the peak.

    Returns
    -------
    list of (y, x, sign)
        The peak pixel and the sign of the residual (-1: a negative one, cut with the difference
        negated, as a survey's negative subtraction would show it).
    """
    z = _robust_z(diff)
    cy, cx = z.shape[0] // 2, z.shape[1] // 2
    yy, xx = np.mgrid[: z.shape[0], : z.shape[1]]
    out = []
    for sign in (1, -1):
        lab, _ = ndimage.label(sign * z > 3)
        centre = set(np.unique(lab[cy - 2 : cy + 3, cx - 2 : cx + 3]).tolist())
        for i, sl in enumerate(ndimage.find_objects(lab), 1):
            if i in centre or sl is None:
                continue
            part = np.where(lab[sl] == i, sign * z[sl], 0.0)
            dy, dx = np.unravel_index(int(part.argmax()), part.shape)
            py, px = int(dy + sl[0].start), int(dx + sl[1].start)
            if (part.max() < config.min_peak or max(abs(py - cy), abs(px - cx)) > config.max_shift
                    or np.hypot(py - cy, px - cx) < config.min_offset):
                continue
            near = np.hypot(yy - py, xx - px) <= config.lobe_radius
            if float((-sign * z[near]).max()) >= config.min_lobe:
                out.append((py, px, sign))
    return out


def moffat(shape: tuple[int, int], y: float, x: float, fwhm: float, beta: float = 3.0
           ) -> np.ndarray:
    """A Moffat profile of unit sum centred on (y, x) px, shape ``shape``."""
    alpha = moffat_alpha(fwhm, beta)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    p = (1 + ((yy - y) ** 2 + (xx - x) ** 2) / alpha**2) ** -beta
    return p / p.sum()


def psf_flux_sigma(diff: np.ndarray, fwhm: float) -> float:
    """Noise of a PSF-fitted flux on a difference stamp, measured on the stamp itself.

    The stamp (NaN as 0) is correlated with a unit-sum Moffat PSF (:func:`moffat`); the robust
    sigma of that map over the stamp, divided by ``sum(psf**2)``, is the standard deviation of
    the flux PSF photometry measures at a random place: ``sigma / sqrt(sum(psf**2))`` for white
    pixel noise ``sigma``, and larger where the survey's resampling correlates neighbouring
    pixels.
    """
    h = int(np.ceil(2 * fwhm))
    psf = moffat((2 * h + 1, 2 * h + 1), h, h, fwhm)
    d = np.nan_to_num(diff - np.nanmedian(diff), nan=0.0)
    m = ndimage.correlate(d, psf, mode="constant")[h:-h, h:-h]
    return 1.4826 * float(np.median(np.abs(m - np.median(m)))) / float(np.sum(psf**2))


def inject_point_source(sci: np.ndarray, diff: np.ndarray, y: float, x: float, flux: float,
                        fwhm: float, gain: float, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Science and difference stamps with a point source of ``flux`` (DN) added at (y, x).

    A Moffat PSF (:func:`moffat`) of FWHM ``fwhm`` px. One shot-noise draw (``gain`` e-/DN)
    is added to both stamps, as the source is in the science image only.
    """
    psf = moffat(sci.shape, y, x, fwhm)
    src = flux * psf
    src = src + rng.normal(0.0, 1.0, src.shape) * np.sqrt(src / gain)
    return sci + src, diff + src


def recentre(stamps: list[np.ndarray], y: int, x: int) -> list[np.ndarray]:
    """63x63 stamps centred on pixel (y, x) of ``stamps``, NaN where these have no pixels."""
    n = CUTOUT_SIZE
    out = []
    for a in stamps:
        w = np.full((n, n), np.nan, np.float32)
        y0, x0 = max(y - _C, 0), max(x - _C, 0)
        y1, x1 = min(y + _C + 1, a.shape[0]), min(x + _C + 1, a.shape[1])
        w[y0 - y + _C : y1 - y + _C, x0 - x + _C : x1 - x + _C] = a[y0:y1, x0:x1]
        out.append(w)
    return out


def _random_place(shape: tuple[int, ...], rng: np.random.Generator, config: RealPixelConfig
                  ) -> tuple[int, int]:
    """A pixel ``min_offset`` to ``max_shift`` px from the stamp's centre, 3 px inside it."""
    cy, cx = shape[0] // 2, shape[1] // 2
    while True:
        dy, dx = (int(rng.integers(max(-m, 3 - c), min(m, n - 4 - c) + 1))
                  for m, c, n in ((config.max_shift, cy, shape[0]), (config.max_shift, cx, shape[1])))
        if np.hypot(dy, dx) >= config.min_offset:
            return cy + dy, cx + dx


def triplets_of_stamp(sci: np.ndarray, ref: np.ndarray, diff: np.ndarray, fwhm: float,
                      rng: np.random.Generator, config: RealPixelConfig = RealPixelConfig()
                      ) -> tuple[list[np.ndarray], list[int], list[str], list[float]]:
    """The normalised bogus and real triplets cut from one alert's stamps.

    ``sci``, ``ref`` and ``diff`` have one shape, at least 31 px and at most 63 px a side, and
    are centred on the alert's candidate.

    Returns
    -------
    x : list of ndarray, shape (3, 63, 63)
    y : list of int
        0 bogus (a residual), 1 real (an injection).
    kind : list of str
        ``residual`` or ``injected``.
    snr : list of float
        The injected S/N (NaN for a residual).
    """
    xs, ys, kinds, snrs = [], [], [], []
    noise = psf_flux_sigma(diff, fwhm)  # 0 on a constant stamp: nothing can be injected
    for py, px, sign in residual_peaks(diff, config):
        s, r, d = recentre([sci, ref, sign * diff], py, px)
        xs.append(normalise_triplet(s, r, d)[0])
        ys.append(0)
        kinds.append("residual")
        snrs.append(float("nan"))
    for _ in range(config.n_inject if noise > 0 else 0):
        py, px = _random_place(diff.shape, rng, config)
        if not np.isfinite(diff[py, px]):
            continue
        snr = float(np.exp(rng.uniform(*np.log(config.snr))))
        s2, d2 = inject_point_source(sci, diff, py + rng.uniform(-0.5, 0.5),
                                     px + rng.uniform(-0.5, 0.5), snr * noise, fwhm,
                                     config.gain, rng)
        s, r, d = recentre([s2, ref, d2], py, px)
        xs.append(normalise_triplet(s, r, d)[0])
        ys.append(1)
        kinds.append("injected")
        snrs.append(snr)
    return xs, ys, kinds, snrs


def stamp_fwhm(sci: np.ndarray, default: float) -> float:
    """PSF FWHM (px) of a science stamp, from Gaussian fits to its peaks over 20 sigma.

    :func:`broker.stars.fit_fwhms` on every local maximum at least 6 px inside the stamp; fits
    outside 1-10 px (saturated cores, galaxies) are dropped, and of the rest the 25th
    percentile is taken (stars are the narrowest sources). ``default`` where none is left.
    """
    from broker.stars import fit_fwhms, local_peaks

    z = _robust_z(sci)
    xy = local_peaks(z, 20.0)
    n = sci.shape[0]
    xy = xy[np.all((xy >= 6) & (xy < n - 6), axis=1)]
    if not len(xy):
        return default
    fw = fit_fwhms(np.where(np.isfinite(sci), sci - np.nanmedian(sci), 0.0), xy[:, 0].astype(float),
                   xy[:, 1].astype(float), fwhm_guess=3.0)
    fw = fw[np.isfinite(fw) & (fw > 1) & (fw < 10)]
    return float(np.percentile(fw, 25)) if len(fw) else default


def survey_stamps(folder: str | Path, survey: str, rejected: list[str] | None = None
                  ) -> Iterator[tuple[list[np.ndarray], float | None, str]]:
    """Square stamps of the alerts under ``folder``, one set per alert.

    Parameters
    ----------
    folder : path
        Searched recursively for ``*.avro`` packets.
    survey : str
        ``ztf`` (ZTF-shaped packets, read by :func:`broker.normalise.alert_triplet`, one per
        ``candid``; Rubin's too) or a key of :data:`broker.training.devset.SURVEY_STAMPS`.
    rejected : list of str, optional
        Gets one reason per file, record or stamp set skipped.

    Yields
    ------
    stamps : list of ndarray
        Science, reference, difference (science minus reference), one square shape (a side
        of :data:`MIN_SIDE` to 63 px), centred on the candidate.
    fwhm : float or None
        The packet's ``candidate.fwhm`` (px) where it has one.
    group : str
        The alert's object (``objectId``, else ``candid``), for splits by object.

    Stamps of a side under :data:`MIN_SIDE`, not square, of different shapes or without a
    finite pixel, JPEG stamps and unreadable files or records are skipped.
    """
    from broker.training.devset import SURVEY_STAMPS, centre_crop, packets
    from broker.training.devset import survey_stamps as other_stamps

    rejected = [] if rejected is None else rejected
    seen: set = set()
    for name, r in packets(folder, rejected):
        cand: dict = r["candidate"] if isinstance(r.get("candidate"), dict) else {}
        key = cand.get("candid", r.get("candid"))
        if survey == "ztf" and key is not None and key in seen:
            continue
        seen.add(key)
        try:
            trip = ([centre_crop(a) for a in alert_triplet(r)] if survey == "ztf"
                    else list(other_stamps(r, SURVEY_STAMPS[survey])))
            _check_square(trip)
        except CutoutError as exc:
            rejected.append(f"{name}: {exc}")
            continue
        fwhm = cand.get("fwhm")
        yield trip, float(fwhm) if isinstance(fwhm, (int, float)) else None, \
            str(r.get("objectId") or key or "")


def _check_square(trip: list[np.ndarray]) -> None:
    """Check that science, reference and difference can be cut from.

    Raises
    ------
    CutoutError
        Unless the three share one square 2-D shape of :data:`MIN_SIDE` px or more and each
        has a finite pixel.
    """
    shapes = {a.shape for a in trip}
    if len(shapes) != 1:
        raise CutoutError(f"stamps of different shapes {[a.shape for a in trip]}")
    shape = shapes.pop()
    if len(shape) != 2 or shape[0] != shape[1]:
        raise CutoutError(f"stamps of {shape} px are not square (cut at a CCD edge): the centre is not the candidate")
    if shape[0] < MIN_SIDE:
        raise CutoutError(f"stamps of {shape} px, under {MIN_SIDE} px a side: too little sky to cut from")
    if not all(np.isfinite(a).any() for a in trip):
        raise CutoutError("a stamp without a finite pixel")


def real_pixel_set(folder: str | Path, survey: str = "ztf", seed: int = 0,
                   config: RealPixelConfig = RealPixelConfig()) -> dict[str, np.ndarray]:
    """Bogus and real triplets cut from the stamps of the alerts in ``folder``.

    Parameters
    ----------
    folder : path
        The alerts, read by :func:`survey_stamps`.
    survey : str
        Their packet shape (:func:`survey_stamps`).
    seed : int
        Seeds the injections.
    config : RealPixelConfig

    Returns
    -------
    dict of ndarray
        ``x`` (N, 3, 63, 63) float32, ``y`` (N,) 0/1, ``kind`` (N,) str, ``snr`` (N,) the
        injected S/N (NaN for residuals), ``group`` (N,) the alert's object; ``n_stamps``, the
        stamps read (a 0-d array); ``rejected`` (M,) str, why each file, record or stamp set
        skipped was (:func:`survey_stamps`).
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"x": [], "y": [], "kind": [], "snr": [], "group": []}
    n_stamps = 0
    rejected: list[str] = []
    for (sci, ref, diff), fwhm, group in survey_stamps(folder, survey, rejected):
        n_stamps += 1
        fw = stamp_fwhm(sci, float(np.clip(fwhm or config.fwhm, 1.2, 8.0)))
        x, y, kind, snr = triplets_of_stamp(sci, ref, diff, fw, rng, config)
        for k, v in (("x", x), ("y", y), ("kind", kind), ("snr", snr), ("group", [group] * len(y))):
            parts[k] += v
    n = CUTOUT_SIZE
    return {"x": np.stack(parts["x"]) if parts["x"] else np.zeros((0, 3, n, n), np.float32),
            "y": np.array(parts["y"], dtype=np.int64), "kind": np.array(parts["kind"], dtype=str),
            "snr": np.array(parts["snr"], dtype=float), "group": np.array(parts["group"], dtype=str),
            "n_stamps": np.array(n_stamps), "rejected": np.array(rejected, dtype=str)}


#: Injected S/N bins of :func:`real_pixel_check` (edges), and their names.
SNR_BINS = (5.0, 10.0, 20.0, 100.0)
SNR_BIN_NAMES = tuple(f"{lo:g}-{hi:g}" for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:], strict=True))


def real_pixel_check(scores: np.ndarray, data: dict[str, np.ndarray], threshold: float = 0.5
                     ) -> dict:
    """How a model treats one survey's real pixels: its residuals and sources injected there.

    A check without labels from the survey: it shows whether the model rejects that telescope's
    own subtraction residuals and keeps point sources on its real backgrounds, not its accuracy
    on the survey's candidates (which sit at the stamp centre and are harder).

    Parameters
    ----------
    scores : ndarray, shape (N,)
        The model's scores of ``data["x"]``.
    data : dict
        :func:`real_pixel_set`'s output.
    threshold : float
        The operating threshold.

    Returns
    -------
    dict
        ``n_stamps``, ``n_residual``, ``n_injected``, ``residual_passed`` (fraction of residuals
        scored >= threshold), ``injected_kept`` (fraction of injections scored >= threshold)
        overall and ``injected_kept_by_snr`` (one per :data:`SNR_BINS` interval), ``auc``
        (injected against residual; NaN without both).
    """
    s = np.asarray(scores, float)
    res, inj = data["y"] == 0, data["y"] == 1
    passed = s >= threshold
    by_snr: dict[str, float] = {}
    out = {"n_stamps": int(data["n_stamps"]), "n_residual": int(res.sum()),
           "n_injected": int(inj.sum()), "residual_passed": _mean(passed[res]),
           "injected_kept": _mean(passed[inj]), "injected_kept_by_snr": by_snr, "auc": float("nan")}
    for name, lo, hi in zip(SNR_BIN_NAMES, SNR_BINS[:-1], SNR_BINS[1:], strict=True):
        by_snr[name] = _mean(passed[inj & (data["snr"] >= lo) & (data["snr"] < hi)])
    if res.any() and inj.any():
        from sklearn.metrics import roc_auc_score

        out["auc"] = float(roc_auc_score(data["y"], s))
    return out


def _mean(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if len(mask) else float("nan")
