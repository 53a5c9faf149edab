"""Context of a candidate: catalogued objects, its host galaxy, a star under it, its motion.

Three sources, no network at run time:

- the telescope's own reference (measured by the subtract stage, :func:`broker.detect.reference_context`):
  the host galaxy (``Detection.host_*``) and whether a point source lies under the candidate
  (``Detection.ref_extended``);
- the OpenNGC catalogue of NGC/IC/Messier objects shipped with ``pyongc`` (:class:`OpenNGC`, loaded
  once at start-up into numpy arrays): large galaxies, clusters and nebulae;
- moving-object linking against recent single detections (:mod:`broker.moving`);
- the frame's own candidates: those in a line along a satellite trail (:func:`trail_matches`).

:func:`build_context` combines them into a :class:`Context`, the alert's ``context`` record
(:meth:`Context.to_record`) and the model inputs :data:`CONTEXT_FEATURE_NAMES` (:meth:`Context.features`).
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from broker.candidate import Detection
from broker.errors import ConfigError
from broker.lightcurve import CONTEXT_FEATURE_NAMES, FEATURE_NAMES, _num, model_inputs
from broker.moving import Tracklet
from broker.sphere import chord, separation_arcsec, unit_vectors
from broker.streaks import find_runs

#: OpenNGC object types (``objTypes``) -> CatalogMatch.kind; types not listed (``Dup`` duplicate
#: records, ``NonEx`` non-existent objects) are left out of the catalogue.
OPENNGC_KINDS = {
    "G": "galaxy", "GPair": "galaxy group", "GTrpl": "galaxy group", "GGroup": "galaxy group",
    "OCl": "cluster", "GCl": "cluster", "*Ass": "cluster", "Cl+N": "cluster",
    "PN": "nebula", "HII": "nebula", "DrkN": "nebula", "EmN": "nebula", "Neb": "nebula", "RfN": "nebula",
    "SNR": "supernova remnant", "*": "star", "**": "star", "Nova": "nova", "Other": "other",
}
#: Columns of the ``objects`` table that :class:`OpenNGC` reads.
OPENNGC_COLUMNS = ("name", "type", "ra", "dec", "majax", "minax", "pa", "bmag", "vmag", "messier")


@dataclass(frozen=True)
class ContextConfig:
    """Settings of the context.

    Attributes
    ----------
    ngc_margin_arcsec : float
        A candidate up to this far outside an OpenNGC object's ellipse still matches it (arcsec);
        5: catalogued diameters (OpenNGC's ``majax``, mostly a D25 isophote) cut off faint outskirts
        where supernovae still occur.
    ngc_point_radius_arcsec : float
        Match radius of OpenNGC objects without a size (arcsec); 10, about their position accuracy.
    ngc_large_arcmin : float
        Objects with a semi-major axis beyond this (arcmin) are matched by brute force, the rest
        through a KD-tree queried with this radius; 30 keeps the tree query small while only ~100
        objects (the LMC, M31, large clusters and nebulae) are brute-forced.
    ngc_host_min_arcsec : float
        An OpenNGC galaxy whose semi-major axis exceeds this (arcsec) is the host even when the
        reference found one: the reference measures hosts on a stamp of at most
        ``DetectConfig.host_stamp_half`` px (48" at 1"/px), so it sees a knot of such a galaxy,
        not the galaxy; 30.
    nuclear_radius_arcsec : float
        A candidate within this distance of its host's centre is nuclear (arcsec); 1, the
        position accuracy of host centres and candidates at 1"/px (ALeRCE and AMPEL's nuclear
        selections use 0.5-1").
    max_matches : int
        Catalogue matches kept per candidate, nearest (in units of the object's radius) first.
    """

    ngc_margin_arcsec: float = 5.0
    ngc_point_radius_arcsec: float = 10.0
    ngc_large_arcmin: float = 30.0
    ngc_host_min_arcsec: float = 30.0
    nuclear_radius_arcsec: float = 1.0
    max_matches: int = 5


def _opt(value: float | None) -> float | None:
    """``value`` as a float, None when it is None or not finite."""
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class CatalogMatch:
    """A catalogued object at the candidate's position.

    Attributes
    ----------
    catalog, version : str
        Catalogue (``"OpenNGC"``) and its data version (OpenNGC: the database date, ``YYYYMMDD``);
        ``"frame"`` and the frame id for a trail of this frame's candidates (:func:`trail_matches`).
    name : str
        Its name in the catalogue, with the Messier number when it has one (``"NGC5194/M51"``).
    kind : str
        ``galaxy``, ``galaxy group``, ``cluster``, ``nebula``, ``supernova remnant``, ``star``,
        ``nova`` or ``other`` (:data:`OPENNGC_KINDS`); ``trail`` for a frame's trail.
    ra, dec : float
        Its catalogued centre (deg).
    distance_arcsec : float
        Candidate-to-centre distance (arcsec).
    size_arcsec : float or None
        Major-axis diameter (arcsec; a trail's length); None when not catalogued.
    mag : float or None
        V magnitude, else B (mag); None when neither is catalogued.
    """

    catalog: str
    version: str
    name: str
    kind: str
    ra: float
    dec: float
    distance_arcsec: float
    size_arcsec: float | None = None
    mag: float | None = None

    def to_record(self) -> dict:
        """The Avro ``CatalogMatch`` record."""
        return {"catalog": self.catalog, "version": self.version, "name": self.name, "kind": self.kind,
                "ra": float(self.ra), "dec": float(self.dec), "distance_arcsec": float(self.distance_arcsec),
                "size_arcsec": _opt(self.size_arcsec), "mag": _opt(self.mag)}

    @classmethod
    def from_record(cls, rec: dict) -> CatalogMatch:
        """Inverse of :meth:`to_record`."""
        return cls(str(rec["catalog"]), str(rec["version"]), str(rec["name"]), str(rec["kind"]), float(rec["ra"]),
                   float(rec["dec"]), float(rec["distance_arcsec"]), _opt(rec.get("size_arcsec")), _opt(rec.get("mag")))


@dataclass(frozen=True)
class Host:
    """The host galaxy of a candidate.

    Attributes
    ----------
    catalog : str
        ``"reference"`` (found on the telescope's reference) or ``"OpenNGC"``.
    name : str
        Catalogue name; ``""`` for a reference host.
    ra, dec : float
        Host centre (deg).
    offset_arcsec : float
        Candidate-to-centre distance (arcsec).
    offset_norm : float or None
        Offset over the host's size in the candidate's direction (dimensionless): reference hosts,
        over their rms radius (``Detection.host_size``); OpenNGC galaxies, over the radius of their
        catalogued ellipse in that direction (1 = on the D25 isophote). None when no size is known.
    nuclear : bool
        Within ``ContextConfig.nuclear_radius_arcsec`` of the centre.
    flux : float or None
        Host flux on the reference (ADU, science scale); None for catalogue hosts.
    """

    catalog: str
    name: str
    ra: float
    dec: float
    offset_arcsec: float
    offset_norm: float | None
    nuclear: bool
    flux: float | None = None

    def to_record(self) -> dict:
        """The Avro ``Host`` record."""
        return {"catalog": self.catalog, "name": self.name, "ra": float(self.ra), "dec": float(self.dec),
                "offset_arcsec": float(self.offset_arcsec), "offset_norm": _opt(self.offset_norm),
                "nuclear": bool(self.nuclear), "flux": _opt(self.flux)}

    @classmethod
    def from_record(cls, rec: dict) -> Host:
        """Inverse of :meth:`to_record`."""
        return cls(str(rec["catalog"]), str(rec["name"]), float(rec["ra"]), float(rec["dec"]),
                   float(rec["offset_arcsec"]), _opt(rec.get("offset_norm")), bool(rec["nuclear"]),
                   _opt(rec.get("flux")))


@dataclass(frozen=True)
class Context:
    """Everything known around a candidate (the alert's ``context`` record).

    Attributes
    ----------
    matches : tuple of CatalogMatch
        Catalogued objects at its position, nearest (in units of their radius) first; then the
        trail of its frame's candidates it lies on, if any.
    host : Host or None
        Its host galaxy.
    on_star : bool or None
        A point source of the reference lies under it (within 1 FWHM); None when unknown.
    moving : bool
        Linked into a moving-object tracklet.
    moving_speed : float or None
        The tracklet's speed (arcsec/day).
    moving_links : tuple of str
        Candidate ids of the earlier detections linked to it, oldest first.
    """

    matches: tuple[CatalogMatch, ...] = ()
    host: Host | None = None
    on_star: bool | None = None
    moving: bool = False
    moving_speed: float | None = None
    moving_links: tuple[str, ...] = ()

    def features(self) -> dict[str, float]:
        """The model inputs, exactly :data:`CONTEXT_FEATURE_NAMES` (float; NaN where unknown)."""
        host = self.host
        norm = host.offset_norm if host is not None and host.offset_norm is not None else math.nan
        values = (float(host is not None), float(norm), float(host is not None and host.nuclear),
                  math.nan if self.on_star is None else float(self.on_star), float(self.moving))
        return dict(zip(CONTEXT_FEATURE_NAMES, values, strict=True))

    def to_record(self) -> dict:
        """The Avro ``Context`` record (None for null)."""
        return {"matches": [m.to_record() for m in self.matches],
                "host": None if self.host is None else self.host.to_record(),
                "on_star": None if self.on_star is None else bool(self.on_star),
                "moving": bool(self.moving), "moving_speed": _opt(self.moving_speed),
                "moving_links": [str(c) for c in self.moving_links]}

    @classmethod
    def from_record(cls, rec: dict) -> Context:
        """Inverse of :meth:`to_record`."""
        on_star = rec.get("on_star")
        return cls(tuple(CatalogMatch.from_record(m) for m in rec.get("matches") or ()),
                   None if rec.get("host") is None else Host.from_record(rec["host"]),
                   None if on_star is None else bool(on_star), bool(rec.get("moving", False)),
                   _opt(rec.get("moving_speed")), tuple(str(c) for c in rec.get("moving_links") or ()))


def alert_inputs(features: Mapping[str, Any] | None, context: dict | None) -> np.ndarray:
    """The light-curve models' row of inputs of an alert (or candidate) from its ``features`` and ``context`` records.

    The same row the score stage built (:func:`broker.lightcurve.model_inputs`): nulls and
    missing features are NaN, a null context gives NaN context features.

    Raises
    ------
    KeyError, TypeError, ValueError
        A malformed ``context`` record.
    """
    known = features or {}
    feats = np.array([_num(known.get(k)) for k in FEATURE_NAMES], dtype=np.float64)
    return model_inputs(feats, Context.from_record(context).features() if context else {})


def trail_matches(detections: Sequence[Detection], shape: tuple[int, int], frame_id: str) -> dict[int, CatalogMatch]:
    """The detections of one frame that lie in a line along a trail, each with the trail as a match.

    A satellite or aircraft trail, a glinting satellite's knots, a bleed or a diffraction spike left
    in the difference image is detected as a row of candidates; :func:`broker.streaks.find_runs`
    finds rows of 8 or more within 1 px of a line, which stars and transients of a frame almost
    never form by chance. On 24 simulated frames with bright and faint trails and glints
    (``python -m bench.trails``), 740 of the 892 candidates on a trail were marked (97 % of those the
    real/bogus model passes), none of the 683 elsewhere, and 1 of 245 transients, which lay on one.

    Parameters
    ----------
    detections : sequence of Detection
        All detections of the frame.
    shape : (int, int)
        The frame's (ny, nx), px.
    frame_id : str

    Returns
    -------
    dict
        Index of a detection on a trail -> the trail as a :class:`CatalogMatch`: catalogue
        ``"frame"`` (version: the frame id), name ``"trail <k>"``, kind ``"trail"``, the position of
        its centre (midway between its end detections), the distance to it and the trail's length
        (``size_arcsec``, between its end detections).
    """
    x = np.array([d.x for d in detections], float)
    y = np.array([d.y for d in detections], float)
    sky = unit_vectors(np.array([d.ra for d in detections], float), np.array([d.dec for d in detections], float))
    out: dict[int, CatalogMatch] = {}
    for k, members in enumerate(find_runs(x, y, float(shape[0] * shape[1])), start=1):
        centre = sky[members[0]] + sky[members[-1]]
        centre /= np.linalg.norm(centre)
        ra, dec = math.degrees(math.atan2(centre[1], centre[0])) % 360.0, math.degrees(math.asin(centre[2]))
        length = float(separation_arcsec(sky[members[0]], sky[members[-1]]))
        for i, dist in zip(members, separation_arcsec(sky[members], centre), strict=True):
            out[int(i)] = CatalogMatch("frame", frame_id, f"trail {k}", "trail", ra, dec, float(dist), length)
    return out


def default_openngc_path() -> tuple[Path, str]:
    """The database shipped with ``pyongc`` and its data version (``DBDATE``, ``YYYYMMDD``).

    Raises
    ------
    ConfigError
        ``pyongc`` is not installed.
    """
    try:
        import pyongc  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ConfigError("the OpenNGC catalogue needs the pyongc package (pip install pyongc)") from exc
    return Path(pyongc.DBPATH), str(getattr(pyongc, "DBDATE", "unknown"))


def _read_openngc(path: Path) -> list[tuple]:
    """Rows of :data:`OPENNGC_COLUMNS` of the ``objects`` table of an OpenNGC SQLite file.

    Raises
    ------
    ConfigError
        Missing file, not a readable SQLite database, no ``objects`` table or a missing column.
    """
    if not path.is_file():
        raise ConfigError(f"OpenNGC catalogue {path}: no such file (reinstall pyongc, or fix the configured path)")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            have = {row[1] for row in db.execute("PRAGMA table_info(objects)")}
            missing = [c for c in OPENNGC_COLUMNS if c not in have]
            if missing:
                raise ConfigError(f"OpenNGC catalogue {path}: table 'objects' missing or without columns {missing}")
            return db.execute(f"SELECT {', '.join(OPENNGC_COLUMNS)} FROM objects").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"OpenNGC catalogue {path} is not a readable SQLite database: {exc}") from exc


def _float(values: list, default: float = math.nan) -> np.ndarray:
    """Floats of a list of SQL values, ``default`` for NULL or non-numbers."""
    out = np.full(len(values), default)
    for i, v in enumerate(values):
        try:
            out[i] = float(v) if v is not None and v != "" else default
        except (TypeError, ValueError):
            pass
    return out


class OpenNGC:
    """The OpenNGC catalogue (NGC, IC and Messier objects), in memory, cross-matched by position.

    Loaded once (about 14,000 objects, ~0.1 s) into numpy arrays and a KD-tree of unit vectors;
    each :meth:`lookup` is a tree query plus an exact ellipse test of the few objects it returns.

    Parameters
    ----------
    path : str or Path, optional
        An OpenNGC SQLite database (the schema of ``pyongc``'s ``ongc.db``); default the one shipped
        with ``pyongc``.
    version : str, optional
        Its data version; default ``pyongc.DBDATE`` for the shipped database, else ``"unknown"``.
    config : ContextConfig

    Raises
    ------
    ConfigError
        The database is missing, unreadable, lacks a column of :data:`OPENNGC_COLUMNS` or holds no
        object with a position; or ``pyongc`` is not installed and no path is given.

    Attributes
    ----------
    names, kinds : ndarray of str, shape (n,)
    ra, dec : ndarray, shape (n,)
        Centres (deg).
    semi_major, semi_minor : ndarray, shape (n,)
        Semi-axes (arcsec); NaN when not catalogued.
    pa : ndarray, shape (n,)
        Position angle of the major axis, east of north (deg); 0 when not catalogued.
    mag : ndarray, shape (n,)
        V, else B magnitude; NaN when neither.
    """

    catalog = "OpenNGC"

    def __init__(self, path: str | Path | None = None, version: str | None = None,
                 config: ContextConfig = ContextConfig()) -> None:
        if path is None:
            path, shipped = default_openngc_path()
            version = shipped if version is None else version
        self.path, self.version, self.config = Path(path), version or "unknown", config
        rows = _read_openngc(self.path)
        cols = dict(zip(OPENNGC_COLUMNS, zip(*rows, strict=True), strict=True)) if rows else {}
        types = [str(t) for t in cols.get("type", ())]
        ra, dec = np.degrees(_float(list(cols.get("ra", ())))), np.degrees(_float(list(cols.get("dec", ()))))
        keep = np.array([t in OPENNGC_KINDS for t in types], bool) & np.isfinite(ra) & np.isfinite(dec)
        if not keep.any():
            raise ConfigError(f"OpenNGC catalogue {self.path} holds no object with a position")
        idx = np.flatnonzero(keep)
        messier = [str(cols["messier"][i] or "").strip() for i in idx]
        self.names = np.array([f"{cols['name'][i]}/M{int(m)}" if m.isdigit() else str(cols["name"][i])
                               for i, m in zip(idx, messier, strict=True)], dtype=object)
        self.kinds = np.array([OPENNGC_KINDS[types[i]] for i in idx], dtype=object)
        self.ra, self.dec = ra[idx], dec[idx]
        self.semi_major = _float(list(cols["majax"]))[idx] * 30.0  # diameter arcmin -> radius arcsec
        minor = _float(list(cols["minax"]))[idx] * 30.0
        self.semi_minor = np.where(np.isfinite(minor) & (minor > 0), minor, self.semi_major)
        self.pa = np.nan_to_num(_float(list(cols["pa"]))[idx])
        vmag, bmag = _float(list(cols["vmag"]))[idx], _float(list(cols["bmag"]))[idx]
        self.mag = np.where(np.isfinite(vmag), vmag, bmag)
        self._build_index()

    def _build_index(self) -> None:
        """KD-tree of the objects up to ``ngc_large_arcmin``; the larger ones apart, brute-forced."""
        c = self.config
        reach = np.where(np.isfinite(self.semi_major) & (self.semi_major > 0),
                         self.semi_major + c.ngc_margin_arcsec, c.ngc_point_radius_arcsec)
        large = reach > c.ngc_large_arcmin * 60.0
        self._small, self._large = np.flatnonzero(~large), np.flatnonzero(large)
        unit = unit_vectors(self.ra, self.dec)
        self._tree = cKDTree(unit[self._small])
        self._small_chord = chord(float(reach[self._small].max()) if len(self._small) else 0.0)
        self._large_unit, self._large_reach = unit[self._large], reach[self._large]

    def __len__(self) -> int:
        return len(self.ra)

    def _near(self, ra: float, dec: float) -> np.ndarray:
        """Indices of the objects whose reach may hold (ra, dec)."""
        u = unit_vectors(np.array([ra]), np.array([dec]))[0]
        near = [self._small[np.asarray(self._tree.query_ball_point(u, self._small_chord), int)]]
        if len(self._large):
            gap = np.linalg.norm(self._large_unit - u, axis=1)
            near.append(self._large[gap <= np.array([chord(r) for r in self._large_reach])])
        return np.concatenate(near).astype(int)

    def _ellipse(self, ra: float, dec: float, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distance (arcsec), directional radius (arcsec, NaN without size) and match flag of each object."""
        a0, d0 = np.radians(self.ra[idx]), np.radians(self.dec[idx])
        a, d = math.radians(ra), math.radians(dec)
        h = np.sin((d - d0) / 2) ** 2 + np.cos(d0) * math.cos(d) * np.sin((a - a0) / 2) ** 2
        dist = np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0
        north = np.cos(d0) * math.sin(d) - np.sin(d0) * math.cos(d) * np.cos(a - a0)
        theta = np.arctan2(np.sin(a - a0) * math.cos(d), north)  # position angle, east of north
        phi = theta - np.radians(self.pa[idx])  # angle from the major axis
        sa, sb = self.semi_major[idx], self.semi_minor[idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            r_dir = 1.0 / np.sqrt((np.cos(phi) / sa) ** 2 + (np.sin(phi) / sb) ** 2)
        sized = np.isfinite(r_dir) & (r_dir > 0)
        ok = np.where(sized, dist <= r_dir + self.config.ngc_margin_arcsec, dist <= self.config.ngc_point_radius_arcsec)
        return dist, np.where(sized, r_dir, np.nan), ok

    def lookup(self, ra: float, dec: float) -> tuple[tuple[CatalogMatch, ...], Host | None]:
        """Objects at (ra, dec) (deg), nearest in units of their radius first, and the galaxy host.

        Returns
        -------
        matches : tuple of CatalogMatch
            At most ``config.max_matches``; empty for non-finite or off-sky coordinates.
        host : Host or None
            The first matched galaxy with a catalogued size.
        """
        if not (math.isfinite(ra) and math.isfinite(dec) and -90.0 <= dec <= 90.0):
            return (), None
        idx = self._near(ra % 360.0, dec)
        if not len(idx):
            return (), None
        dist, r_dir, ok = self._ellipse(ra % 360.0, dec, idx)
        idx, dist, r_dir = idx[ok], dist[ok], r_dir[ok]
        norm = np.where(np.isfinite(r_dir), dist / r_dir, dist / self.config.ngc_point_radius_arcsec)
        order = np.argsort(norm, kind="stable")[: self.config.max_matches]
        matches = tuple(self._match(int(idx[k]), float(dist[k])) for k in order)
        host = None
        for k in order:
            if self.kinds[idx[k]] == "galaxy" and np.isfinite(r_dir[k]):
                host = Host(self.catalog, str(self.names[idx[k]]), float(self.ra[idx[k]]), float(self.dec[idx[k]]),
                            float(dist[k]), float(dist[k] / r_dir[k]),
                            bool(dist[k] <= self.config.nuclear_radius_arcsec))
                break
        return matches, host

    def match(self, ra: float, dec: float) -> tuple[CatalogMatch, ...]:
        """The catalogue matches of (ra, dec) (deg); see :meth:`lookup`."""
        return self.lookup(ra, dec)[0]

    def _match(self, i: int, dist: float) -> CatalogMatch:
        size = 2.0 * self.semi_major[i]
        return CatalogMatch(self.catalog, self.version, str(self.names[i]), str(self.kinds[i]), float(self.ra[i]),
                            float(self.dec[i]), dist, _opt(float(size)), _opt(float(self.mag[i])))


def reference_host(detection: Detection, config: ContextConfig = ContextConfig()) -> Host | None:
    """The host the subtract stage found on the reference (``Detection.host_*``), or None."""
    d = detection
    if not all(math.isfinite(v) for v in (d.host_ra, d.host_dec, d.host_dist)):
        return None
    norm = d.host_dist / d.host_size if math.isfinite(d.host_size) and d.host_size > 0 else None
    return Host("reference", "", float(d.host_ra), float(d.host_dec), float(d.host_dist), norm,
                bool(d.host_dist <= config.nuclear_radius_arcsec), _opt(d.host_flux))


def on_star(detection: Detection) -> bool | None:
    """Whether a point source of the reference lies under the detection (within 1 FWHM).

    ``ref_extended`` 0 -> True, 1 -> False; NaN (no reference source within 1 FWHM) -> False,
    except when the nearest catalogue source is within 1" (``ref_dist``): closer than any FWHM, so
    NaN there means unmeasured (a record from before the measurement) -> None.
    """
    ext = detection.ref_extended
    if math.isfinite(ext):
        return ext == 0.0
    return None if detection.ref_dist <= 1.0 else False


def build_context(detection: Detection, ngc: OpenNGC | None, tracklet: Tracklet | None,
                  config: ContextConfig = ContextConfig()) -> Context:
    """The context of one detection.

    Parameters
    ----------
    detection : Detection
        With the reference measurements of the subtract stage (``ref_extended``, ``host_*``).
    ngc : OpenNGC or None
        The catalogue (None: no catalogue matches).
    tracklet : Tracklet or None
        :func:`broker.moving.link_tracklet`'s result for this detection.
    config : ContextConfig

    Returns
    -------
    Context
        The host is the reference's when it found one: it is measured on this telescope's own
        image, to the depth of the reference. An OpenNGC galaxy is the host when the reference has
        none, or when it is larger (semi-major axis) than ``config.ngc_host_min_arcsec``, beyond
        what the reference stamp measures. Non-finite or off-sky coordinates give no matches.
    """
    matches: tuple[CatalogMatch, ...] = ()
    ngc_host = None
    if ngc is not None:
        matches, ngc_host = ngc.lookup(detection.ra, detection.dec)
    host = reference_host(detection, config)
    if ngc_host is not None:
        radius = max((m.size_arcsec or 0.0) / 2.0 for m in matches if m.name == ngc_host.name)
        if host is None or radius > config.ngc_host_min_arcsec:
            host = ngc_host
    return Context(matches=matches, host=host, on_star=on_star(detection), moving=tracklet is not None,
                   moving_speed=None if tracklet is None else float(tracklet.speed_arcsec_day),
                   moving_links=() if tracklet is None else tuple(tracklet.cand_ids))
