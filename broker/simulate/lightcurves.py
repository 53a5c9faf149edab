"""Seeded light curves of the classes the light-curve models know, and rare ones they never see.

Each simulated object is what the score stage would have for it: its detections (dicts with the
keys of ``Candidate.history`` entries, fluxes in ADU of their frame, each with its zero point), the
forced photometry of every frame that covered it (``Candidate.forced``) and its context features
(:data:`broker.lightcurve.CONTEXT_FEATURE_NAMES`). :meth:`SimObject.alerts` replays it as an alert
stream: every detection is an alert whose history and forced photometry stop at its time.

Surveys
-------
Each object is observed by a survey drawn for it (:attr:`LCSimConfig.surveys`), so that the models
see what any telescope feeding the broker produces:

- ``season`` (a wide-field survey): two telescopes observe a season of ``season_days`` from MJD
  ``mjd_start``: ``simcam-a`` (AB zero point ~26.2, 5-sigma limit ~20.7 mag) every
  ``cadence_days`` nights, g then r about 40 min apart, and ``simcam-b`` (zero point ~24.8, limit
  ~21.3 mag) every third night in one band, covering half of the objects. Nights are lost to
  weather (``weather_loss``) and to a 6-day bright-time gap every 29.5 days. The reference is
  the object's mean flux (variables: over a cycle).
- ``nightly`` (a small robotic telescope, or a new field of any survey): 1-3 reference frames
  (the nights just before the survey start, or, for half of the objects, 30-300 days before),
  then 2-40 science nights from the survey start, every 1-3 nights, in one band (60%) or
  in 2-3 of g, r, i; one telescope (75%) or two, each with its own zero point (24-29 mag of 1 ADU)
  and 5-sigma limit (19.5-22 mag); each night is revisited 0.01-0.1 day later with a probability
  drawn per survey (0-0.7: follow-up or a second visit of a field). The difference flux is
  relative to the mean of the reference frames (a variable star is then seen positive or
  negative, a transient already present in the reference is partly subtracted), only the science
  frames are difference images (forced photometry), so an object can be detected at the first
  science epoch with no earlier upper limit, and its history stays short.

A frame detects the object when |difference flux| >= 5 sigma (both signs).

Classes
-------
Ordinary (:data:`ORDINARY_CLASSES` = ``broker.lcclass.CLASS_NAMES``): ``SN`` (Bazin rise and
decline, redder with time: g declines faster; on a host at an offset), ``variable_star`` (periods
0.2-100 d, sinusoidal / sawtooth / eclipsing; difference flux of both signs; on a point source),
``AGN`` (damped random walk, nuclear), ``nuclear_flare`` (Gaussian rise, t^-5/3 decline, blue and
constant colour, nuclear), ``mover`` (one detection, linked with probability 0.85), ``bogus``
(:data:`BOGUS_KINDS`: recurring at a fixed position with random sign and flux near threshold,
often on a star; a residual of the reference, e.g. an artefact or a moving object in one of its
frames: a constant negative difference flux of 5-15 sigma, seen in most frames; or a one-off:
one detection at 5-12 sigma anywhere, negative in 40 %, as noise peaks of either sign, cosmic
rays and glints give).

Rare (:data:`RARE_CLASSES`, never used in training): ``fast_riser`` (rises 3-6 mag within hours,
declines > 0.3 mag/day), ``extreme_amplitude`` (outbursts of >= 5 mag from a faint point source),
``long_plateau`` (SN-like rise then flat for 150-300 days), ``colour_inverted`` (an SN-like
transient that gets bluer with time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from broker.lcclass import CLASS_NAMES
from broker.lightcurve import CONTEXT_FEATURE_NAMES

__all__ = ["ORDINARY_CLASSES", "RARE_CLASSES", "LCSimConfig", "SimAlert", "SimObject",
           "alert_stream", "simulate_object", "simulate_objects"]

ORDINARY_CLASSES: tuple[str, ...] = CLASS_NAMES
RARE_CLASSES: tuple[str, ...] = ("fast_riser", "extreme_amplitude", "long_plateau",
                                 "colour_inverted")
#: Kinds of bogus object and their shares. The one-offs (35 %) are what a subtraction pipeline
#: mostly makes: a noise peak, a cosmic ray or a glint is detected once and never again (most
#: false alerts of the pixel pipeline in ``bench/lightcurves.py`` have one detection). Without
#: them, movers were the only one-detection class, and ``lcclass-v1`` called such alerts movers.
BOGUS_KINDS: tuple[str, ...] = ("recurring", "residual", "one_off")
BOGUS_SHARES: tuple[float, ...] = (0.35, 0.30, 0.35)
#: AB magnitude of 1 uJy.
_UJY_ZP = 23.9
#: Flux model: (mjd array, band) -> true difference flux, uJy.
FluxModel = Callable[[np.ndarray, str], np.ndarray]


@dataclass(frozen=True)
class LCSimConfig:
    """The simulated surveys.

    Attributes
    ----------
    mjd_start : float
        First night (of the science frames), MJD.
    season_days : float
        Length of the ``season`` survey, days.
    cadence_days : int
        Nights between visits of ``simcam-a`` in the ``season`` survey (2: a typical wide-field
        survey).
    weather_loss : float
        Fraction of planned nights lost. 0.3: a mid-latitude site.
    detection_snr : float
        |flux| / error of a detection. 5: the usual difference-imaging threshold.
    bands : tuple of str
        Bands of the ``season`` survey (bluest first).
    surveys : tuple of (str, float)
        Survey kinds (``"season"``, ``"nightly"``, see the module notes) and the probability of
        each, drawn per object. Default: 40% season, 60% nightly (a nightly object gives fewer
        alerts, so that both weigh alike in an alert stream).
    """

    mjd_start: float = 60000.0
    season_days: float = 240.0
    cadence_days: int = 2
    weather_loss: float = 0.3
    detection_snr: float = 5.0
    bands: tuple[str, ...] = ("g", "r")
    surveys: tuple[tuple[str, float], ...] = (("season", 0.4), ("nightly", 0.6))


#: Bands of the ``nightly`` surveys (bluest first).
_NIGHTLY_BANDS = ("g", "r", "i")


@dataclass(frozen=True)
class SimAlert:
    """One alert of the stream: what the score stage has, plus the truth."""

    object_id: str
    kind: str
    current: dict
    history: list[dict]
    forced: list[dict]
    context: dict[str, float]


@dataclass(frozen=True)
class SimObject:
    """A simulated object: detections and forced photometry (time order) and context."""

    object_id: str
    kind: str
    detections: tuple[dict, ...]
    frames: tuple[dict, ...]
    context: dict[str, float] = field(default_factory=dict)

    def alerts(self) -> Iterator[SimAlert]:
        """Every detection as an alert; its forced photometry holds the earlier frames only."""
        for k, cur in enumerate(self.detections):
            forced = [f for f in self.frames if f["mjd"] < cur["mjd"]]
            yield SimAlert(self.object_id, self.kind, cur, list(self.detections[:k]), forced,
                           self.context)


# --- survey ---------------------------------------------------------------------------------------
def _columns(rows: list[tuple[float, str, str, float, float]]) -> dict[str, np.ndarray]:
    rows.sort()
    return {"mjd": np.array([r[0] for r in rows]), "band": np.array([r[1] for r in rows], dtype=str),
            "telescope": np.array([r[2] for r in rows], dtype=str),
            "magzp": np.array([r[3] for r in rows]), "lim": np.array([r[4] for r in rows])}


def _season(rng: np.random.Generator, cfg: LCSimConfig) -> dict[str, np.ndarray]:
    """Frames of the ``season`` survey covering one position: mjd, band, telescope, magzp, lim."""
    nights = np.arange(0, int(cfg.season_days))
    bright = ((nights + rng.uniform(0, 29.5)) % 29.5) < 6.0
    rows: list[tuple[float, str, str, float, float]] = []
    for n in nights[(nights % cfg.cadence_days == 0) & ~bright]:
        if rng.random() < cfg.weather_loss:
            continue
        t = cfg.mjd_start + n + rng.uniform(0.1, 0.3)
        lim = rng.normal(20.7, 0.4)
        for j, band in enumerate(cfg.bands):
            if j == 0 or rng.random() < 0.85:
                rows.append((t + 0.028 * j, band, "simcam-a", rng.normal(26.2, 0.15),
                             lim + rng.normal(0, 0.1)))
    if rng.random() < 0.5:
        for n in nights[(nights % 3 == 1) & ~bright]:
            if rng.random() < 0.7:
                rows.append((cfg.mjd_start + n + rng.uniform(0.3, 0.4),
                             str(rng.choice(cfg.bands)), "simcam-b", rng.normal(24.8, 0.1),
                             rng.normal(21.3, 0.3)))
    return _columns(rows)


def _nightly(rng: np.random.Generator, cfg: LCSimConfig) -> tuple[dict[str, np.ndarray],
                                                                 dict[str, np.ndarray]]:
    """Science frames and reference frames of a ``nightly`` survey (see the module notes)."""
    n_bands = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
    bands = sorted(rng.choice(_NIGHTLY_BANDS, n_bands, replace=False).tolist(),
                   key=_NIGHTLY_BANDS.index)
    telescopes = [(f"nightly-{k}", rng.uniform(24.0, 29.0), rng.uniform(19.5, 22.0))
                  for k in range(1 if rng.random() < 0.75 else 2)]
    cadence = int(rng.choice([1, 1, 1, 2, 3]))
    n_nights = int(round(math.exp(rng.uniform(math.log(2), math.log(40)))))
    n_ref = int(rng.integers(1, 4))
    revisit, gap = rng.uniform(0.0, 0.7), rng.uniform(0.01, 0.1)
    loss = rng.uniform(0.0, 0.3)
    sci: list[tuple[float, str, str, float, float]] = []
    ref: list[tuple[float, str, str, float, float]] = []
    # the reference: the nights just before the first science night, or (half of the surveys)
    # frames taken long before, in another season
    ref_offset = 0.0 if rng.random() < 0.5 else -rng.uniform(30.0, 300.0)
    for night in range(-n_ref * cadence, n_nights * cadence, cadence):
        if night > 0 and rng.random() < loss:
            continue  # the first science night is kept: the survey starts with it
        tel, zp, lim = telescopes[int(rng.integers(len(telescopes)))]
        t = cfg.mjd_start + night + rng.uniform(-0.1, 0.1) + (ref_offset if night < 0 else 0.0)
        visits = 2 if night >= 0 and rng.random() < revisit else 1
        for v in range(visits):
            for j, band in enumerate(bands):
                row = (t + v * gap + 0.005 * j, band, tel, zp + rng.normal(0, 0.05),
                       lim + rng.normal(0, 0.3))
                (sci if night >= 0 else ref).append(row)
    return _columns(sci), _columns(ref)


def _visits(rng: np.random.Generator, cfg: LCSimConfig) -> tuple[dict[str, np.ndarray],
                                                                dict[str, np.ndarray] | None]:
    """Frames covering one position and the reference frames (None: the mean flux) of its survey."""
    names = [k for k, _ in cfg.surveys]
    p = np.array([w for _, w in cfg.surveys], dtype=np.float64)
    survey = str(rng.choice(names, p=p / p.sum()))
    if survey == "season":
        return _season(rng, cfg), None
    if survey == "nightly":
        return _nightly(rng, cfg)
    raise ValueError(f"unknown survey {survey!r}")


def _ujy(mag: np.ndarray | float) -> np.ndarray:
    """Flux in uJy of an AB magnitude."""
    return np.asarray(10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - _UJY_ZP)))


def _bazin(t: np.ndarray, t0: float, rise: float, fall: float) -> np.ndarray:
    """Bazin et al. (2009) shape, normalised to a maximum of 1 near t0."""
    x = np.clip(t - t0, -50 * rise, 50 * fall)
    f = np.exp(-x / fall) / (1.0 + np.exp(-x / rise))
    tm = rise * math.log(max(fall / rise - 1.0, 1e-3))
    fm = math.exp(-tm / fall) / (1.0 + math.exp(-tm / rise))
    return np.asarray(f / fm)


# --- ordinary classes -----------------------------------------------------------------------------
def _sn(rng: np.random.Generator, t_ref: float, inverted: bool = False) -> FluxModel:
    peak = _ujy(rng.uniform(17.5, 20.5))
    t0, rise, fall = t_ref, rng.uniform(1.5, 5.0), rng.uniform(15.0, 40.0)
    g_fall = fall * (rng.uniform(1.4, 2.2) if inverted else rng.uniform(0.5, 0.75))
    g_peak = peak * 10 ** (-0.4 * rng.uniform(-0.15, 0.15))

    def flux(t: np.ndarray, band: str) -> np.ndarray:
        if band == "g":
            return g_peak * _bazin(t, t0, rise, g_fall)
        return peak * _bazin(t, t0, rise, fall)
    return flux


def _variable(rng: np.random.Generator, t_ref: float) -> FluxModel:
    m0 = rng.uniform(14.5, 19.5)
    period = math.exp(rng.uniform(math.log(0.2), math.log(100.0)))
    amp = math.exp(rng.uniform(math.log(0.1), math.log(1.5)))
    shape = rng.choice(["sine", "sawtooth", "eclipse"], p=[0.5, 0.3, 0.2])
    colour = rng.uniform(0.2, 1.0)

    def dmag(phase: np.ndarray) -> np.ndarray:
        if shape == "sine":
            return 0.5 * amp * np.sin(2 * np.pi * phase)
        if shape == "sawtooth":  # fast rise, slow decline (RR Lyrae-like)
            return amp * np.where(phase < 0.15, 0.5 - phase / 0.15, -0.5 + (phase - 0.15) / 0.85)
        return amp * np.exp(-0.5 * ((phase - 0.5) / 0.04) ** 2)  # eclipse: dimming

    grid = (np.arange(200) + 0.5) / 200
    def flux(t: np.ndarray, band: str) -> np.ndarray:
        m = m0 + (colour if band == "g" else 0.0)
        k = 1.2 if band == "g" else 1.0
        ref = np.mean(_ujy(m + k * dmag(grid)))  # the reference: mean flux over a cycle
        return _ujy(m + k * dmag(((t - t_ref) / period) % 1.0)) - ref
    return flux


def _agn(rng: np.random.Generator, t_ref: float) -> FluxModel:
    m0 = rng.uniform(17.5, 20.5)
    tau = math.exp(rng.uniform(math.log(30.0), math.log(500.0)))
    sf = rng.uniform(0.15, 0.4) / math.sqrt(2.0)
    seed = int(rng.integers(2**31))

    def flux(t: np.ndarray, band: str) -> np.ndarray:
        # One latent walk (same seed for every band, on a fixed daily grid), interpolated.
        r = np.random.default_rng(seed)
        grid = np.arange(t_ref - 50.0, t_ref + 400.0, 1.0)
        x = np.empty(len(grid))
        x[0] = r.normal(0, sf)
        a = math.exp(-1.0 / tau)
        steps = r.normal(0, sf * math.sqrt(1 - a * a), len(grid))
        for i in range(1, len(grid)):
            x[i] = a * x[i - 1] + steps[i]
        k = 1.3 if band == "g" else 1.0
        return _ujy(m0 + k * np.interp(t, grid, x)) - _ujy(m0)
    return flux


def _flare(rng: np.random.Generator, t_ref: float) -> FluxModel:
    peak = _ujy(rng.uniform(17.5, 20.0))
    sig, tau = rng.uniform(8.0, 25.0), rng.uniform(20.0, 60.0)
    colour = rng.uniform(-0.5, -0.2)

    def flux(t: np.ndarray, band: str) -> np.ndarray:
        dt = t - t_ref
        shape = np.where(dt < 0, np.exp(-0.5 * (dt / sig) ** 2),
                         (1.0 + np.maximum(dt, 0) / tau) ** (-5.0 / 3.0))
        return peak * shape * (10 ** (-0.4 * colour) if band == "g" else 1.0)
    return flux


# --- rare classes ---------------------------------------------------------------------------------
def _fast_riser(rng: np.random.Generator, t_ref: float) -> FluxModel:
    peak = _ujy(rng.uniform(17.0, 19.5))
    rise, decline = rng.uniform(0.04, 0.25), rng.uniform(0.3, 1.2)  # days; mag/day

    def flux(t: np.ndarray, band: str) -> np.ndarray:
        dt = t - t_ref
        mag = np.where(dt < 0, 6.0 * np.clip(-dt / rise, 0, 1), decline * dt)
        return peak * 10 ** (-0.4 * mag) * np.where(dt < -rise, 0.0, 1.0)
    return flux


def _extreme(rng: np.random.Generator, t_ref: float) -> FluxModel:
    peak_mag = rng.uniform(14.0, 16.0)
    width, decline = rng.uniform(5.0, 15.0), rng.uniform(0.2, 0.5)

    def flux(t: np.ndarray, band: str) -> np.ndarray:
        dt = t - t_ref
        mag = np.where(dt < 0, 8.0 * np.clip(-dt, 0, 1), np.maximum(dt - width, 0) * decline)
        return _ujy(peak_mag + mag + (0.1 if band == "g" else 0.0))
    return flux


def _plateau(rng: np.random.Generator, t_ref: float) -> FluxModel:
    level = _ujy(rng.uniform(18.0, 19.8))
    length = rng.uniform(150.0, 300.0)

    def flux(t: np.ndarray, band: str) -> np.ndarray:
        dt = t - t_ref
        shape = np.where(dt < 0, np.exp(-0.5 * (dt / 5.0) ** 2),
                         np.where(dt < length, 1.0 - 0.0005 * dt, 0.9 * np.exp(-(dt - length) / 20)))
        return level * shape * (0.9 if band == "g" else 1.0)
    return flux


_MODELS: dict[str, Callable[[np.random.Generator, float], FluxModel]] = {
    "SN": _sn, "variable_star": _variable, "AGN": _agn, "nuclear_flare": _flare,
    "fast_riser": _fast_riser, "extreme_amplitude": _extreme, "long_plateau": _plateau,
    "colour_inverted": lambda rng, t: _sn(rng, t, inverted=True),
}


# --- context --------------------------------------------------------------------------------------
def _context(kind: str, rng: np.random.Generator, bogus: str | None = None) -> dict[str, float]:
    """Context features of an object of ``kind`` (with realistic confusions).

    ``bogus``: the kind of a bogus object; a one-off lands anywhere, the others are often on
    stars (subtraction residuals) or galaxies.
    """
    c = {"host": 0.0, "host_offset_norm": math.nan, "nuclear": 0.0, "on_star": 0.0, "moving": 0.0}

    def host(offset: float) -> None:
        c.update(host=1.0, host_offset_norm=offset, nuclear=float(offset < 0.1))

    if kind in ("SN", "fast_riser", "long_plateau", "colour_inverted"):
        if rng.random() < 0.75:  # the others: a host too faint for the reference
            host(abs(rng.normal(0, 1)) * 1.0 + 0.05)
        c["on_star"] = float(rng.random() < 0.03)
    elif kind in ("variable_star", "extreme_amplitude"):
        c["on_star"] = float(rng.random() < (0.95 if kind == "variable_star" else 0.6))
        if rng.random() < 0.08:  # a galaxy within the host search radius, by chance
            host(rng.uniform(1.0, 12.0))
    elif kind in ("AGN", "nuclear_flare"):
        if rng.random() < 0.9:
            host(rng.uniform(0.0, 0.08))
        else:
            c["on_star"] = 1.0  # a compact nucleus looks point-like
    elif kind == "mover":
        c["moving"] = float(rng.random() < 0.85)
        if rng.random() < 0.1:
            host(rng.uniform(0.3, 12.0))
        c["on_star"] = float(rng.random() < 0.05)
    elif bogus == "one_off":
        c["on_star"] = float(rng.random() < 0.05)
        if rng.random() < 0.1:  # a galaxy within the host search radius, by chance
            host(rng.uniform(0.3, 12.0))
        c["moving"] = float(rng.random() < 0.02)
    else:  # bogus that recurs: residuals of stars and galaxies
        c["on_star"] = float(rng.random() < 0.6)
        if rng.random() < 0.25:
            host(rng.uniform(0.0, 3.0))
        c["moving"] = float(rng.random() < 0.02)
    assert tuple(c) == CONTEXT_FEATURE_NAMES
    return c


# --- objects --------------------------------------------------------------------------------------
def _true_and_observed(kind: str, v: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None,
                       rng: np.random.Generator, cfg: LCSimConfig, bogus: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed difference flux (uJy), its error (uJy) and the detection mask of every frame.

    The difference is relative to the mean model flux of the reference frames ``ref`` in the
    same band (None: to the model's own baseline). ``bogus``: the kind of a bogus object
    (:data:`BOGUS_KINDS`).
    """
    n = len(v["mjd"])
    sky = _ujy(v["lim"]) / 5.0
    true = np.zeros(n)
    if kind in _MODELS:
        if ref is None:  # a season: the event anywhere from 30 days before to 10 days before its end
            t_event = rng.uniform(-30.0, cfg.season_days - 10.0)
        else:  # a short survey: from 10 days before its start to its end
            t_event = rng.uniform(-10.0, float(np.ptp(v["mjd"])) + 1.0 if n else 1.0)
        model = _MODELS[kind](rng, cfg.mjd_start + t_event)
        for band in set(v["band"].tolist()):
            m = v["band"] == band
            true[m] = model(v["mjd"][m], band)
            if ref is not None and (ref["band"] == band).any():
                true[m] -= float(np.mean(model(ref["mjd"][ref["band"] == band], band)))
    err = np.sqrt(sky**2 + (0.02 * true) ** 2)
    obs = true + rng.normal(0.0, 1.0, n) * err
    det = np.abs(obs / err) >= cfg.detection_snr
    if kind == "mover":
        det[:] = False
        if n:
            i = int(rng.integers(n))
            obs[i], det[i] = rng.uniform(5.5, 40.0) * err[i], True
    elif bogus == "one_off":
        det[:] = False
        if n:
            i = int(rng.integers(n))
            one_sign = -1.0 if rng.random() < 0.4 else 1.0  # noise peaks either way; CRs positive
            obs[i], det[i] = one_sign * rng.uniform(5.0, 12.0) * err[i], True
    elif bogus == "residual":
        level = -rng.uniform(5.0, 15.0) * float(np.median(err))
        obs = level * rng.normal(1.0, 0.15, n) + rng.normal(0.0, 1.0, n) * err
        det = np.abs(obs / err) >= cfg.detection_snr
    elif bogus == "recurring":
        hit = rng.random(n) < rng.uniform(0.02, 0.25)
        sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        obs = np.where(hit, sign * rng.uniform(5.0, 8.0, n) * err, obs)
        det = hit | det
    return obs, err, det


def simulate_object(kind: str, rng: np.random.Generator, cfg: LCSimConfig = LCSimConfig(),
                    object_id: str = "obj") -> SimObject:
    """One object of ``kind`` (an ordinary or a rare class name); may have no detection.

    Raises
    ------
    ValueError
        Unknown ``kind``.
    """
    if kind not in ORDINARY_CLASSES + RARE_CLASSES:
        raise ValueError(f"unknown light-curve class {kind!r}")
    v, ref = _visits(rng, cfg)
    bogus = str(rng.choice(BOGUS_KINDS, p=BOGUS_SHARES)) if kind == "bogus" else None
    obs, err, det = _true_and_observed(kind, v, ref, rng, cfg, bogus)
    ra, dec = rng.uniform(0.0, 360.0), rng.uniform(-30.0, 60.0)
    k = _ujy(v["magzp"])  # uJy per ADU
    rb_a, rb_b = (2.0, 3.0) if kind == "bogus" else (8.0, 2.0)
    frames, detections = [], []
    for i in range(len(obs)):
        fid = f"{v['telescope'][i]}-{v['mjd'][i]:.5f}-{v['band'][i]}"
        base = {"mjd": float(v["mjd"][i]), "filter": str(v["band"][i]),
                "flux": float(obs[i] / k[i]), "flux_err": float(err[i] / k[i]),
                "magzp": float(v["magzp"][i]), "limiting_flux": float(5.0 * err[i] / k[i])}
        frames.append({"frame_id": fid, "exptime": 30.0, **base})
        if det[i]:
            detections.append({"cand_id": f"{fid}/{int(rng.integers(1000))}", **base,
                               "ra": ra + rng.normal(0, 1e-5), "dec": dec + rng.normal(0, 1e-5),
                               "snr": float(obs[i] / err[i]), "rb": float(rng.beta(rb_a, rb_b)),
                               "telescope": str(v["telescope"][i])})
    return SimObject(object_id, kind, tuple(detections), tuple(frames),
                     _context(kind, rng, bogus))


def simulate_objects(n: int, seed: int, classes: Sequence[str] = ORDINARY_CLASSES,
                     cfg: LCSimConfig = LCSimConfig(), prefix: str = "obj") -> list[SimObject]:
    """``n`` objects with at least one detection, classes drawn uniformly from ``classes``.

    Object ``i`` depends only on (seed, i), so a larger ``n`` extends a smaller one.
    """
    out: list[SimObject] = []
    i = 0
    while len(out) < n and i < 50 * n + 50:
        rng = np.random.default_rng([seed, i])
        obj = simulate_object(str(rng.choice(list(classes))), rng, cfg, f"{prefix}{seed}-{i}")
        i += 1
        if obj.detections:
            out.append(obj)
    return out


def alert_stream(objects: Sequence[SimObject]) -> list[SimAlert]:
    """Every detection of every object as an alert, in time order."""
    alerts = [a for o in objects for a in o.alerts()]
    alerts.sort(key=lambda a: a.current["mjd"])
    return alerts
