"""The difference store, and forced photometry on the difference images of earlier frames.

After a frame is subtracted, :class:`DifferenceStore` keeps what a later measurement needs of it:
its difference image (science ADU), the noise of that image as :func:`broker.detect.measure_candidates`
uses it, the PSF of D per tile and the frame's metadata. For each candidate of a later frame,
:meth:`DifferenceStore.forced_photometry` PSF-fits the flux at the candidate's RA/Dec on every
earlier difference image of the same (telescope, field, filter) whose footprint contains it, with the
photometry of the detections themselves (:func:`broker.detect.forced_flux`). "Earlier" is by exposure
start (MJD), not by arrival, so a replayed frame gets the same answer.

Layout: ``root/<telescope>/<field>/<filter>/<frame_id>/`` holding ``diff.npy`` (float32, ADU, NaN
where masked), ``noise.npy`` (float16), ``psf.npy`` (float32, one P_D per tile) and ``meta.json``.
The arrays are opened memory-mapped, so a forced measurement reads a stamp, not the frame. A frame
is written to a hidden temporary directory and renamed into place, so a crash leaves it whole or
absent; it is keyed by frame id, so a re-delivered frame is stored once. Beyond
``max_frames`` frames per key the oldest (by MJD) are dropped. Disk: 6 bytes per pixel, 24 MiB for a
2048^2 frame, 720 MiB per key with the default 30 frames. Meant for one writer per key (the Kafka
stage partitions by telescope/field), as :class:`broker.reference.ReferenceStore`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from broker.detect import ShiftedPSF, fit_half_size, forced_flux
from broker.errors import BrokerError, ConfigError
from broker.frame import Frame, FrameMeta, celestial_wcs
from broker.reference import path_component

#: Version of the on-disk layout, in each ``meta.json``.
FORMAT = 1
#: Largest finite float16: the noise scale is clipped to it (it is ~1e2 at most next to a mask).
_F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class DiffStoreConfig:
    """Settings of the difference store and forced photometry.

    Attributes
    ----------
    max_frames : int
        Difference images kept per (telescope, field, filter) (count); the oldest by exposure start
        are dropped beyond it. Default 30: a month of nightly visits, as ZTF's 30 days of
        history in an alert, at 720 MiB per key for 2048^2 frames. 0 stores nothing (and so no
        forced photometry).
    min_psf_fraction : float
        Least fraction of sum P_D^2 on unmasked pixels for a forced measurement (dimensionless);
        0.5, as ``detect.max_bad_fraction``: below it the fit measures a mask edge.
    cache_frames : int
        Opened (memory-mapped) frames kept open between calls (count); default 64, two keys' worth.
    """

    max_frames: int = 30
    min_psf_fraction: float = 0.5
    cache_frames: int = 64

    def __post_init__(self) -> None:
        if self.max_frames < 0 or self.cache_frames < 0:
            raise ConfigError(f"[differences] max_frames and cache_frames must be 0 or more, not "
                              f"{self.max_frames} and {self.cache_frames}")
        if not 0.0 < self.min_psf_fraction <= 1.0:
            raise ConfigError(f"[differences] min_psf_fraction must be in (0, 1], not {self.min_psf_fraction}")


@dataclass(frozen=True)
class DifferenceImage:
    """A frame's difference image as the store keeps it (built by :func:`broker.subtract.subtract_and_detect`).

    Attributes
    ----------
    diff : ndarray, shape (ny, nx), float32
        D in science ADU, NaN where masked.
    noise_scale : ndarray, shape (ny, nx), float16 or float32
        Pixel noise of D over its blank-sky value, ``sqrt(max(V_S / V_S,sky, 1))`` (dimensionless,
        >= 1): source noise near sources, huge at masks.
    psfs : ndarray, shape (n_tiles, k, k), float32
        P_D of each PSF tile (sum 1).
    tiles : ndarray, shape (n_tiles, 4), int
        Tile boxes ``y0, y1, x0, x1`` (px).
    F_D : ndarray, shape (n_tiles,)
        Flux zero point of D per tile: the blank-sky pixel noise of ``diff`` is ``1 / F_D`` (ADU).
    fwhm : ndarray, shape (n_tiles,)
        FWHM of each P_D (px).
    limiting_flux : float
        5-sigma point-source limit on blank sky (science ADU; :func:`broker.subtract.limiting_flux`).
    """

    diff: np.ndarray
    noise_scale: np.ndarray
    psfs: np.ndarray
    tiles: np.ndarray
    F_D: np.ndarray
    fwhm: np.ndarray
    limiting_flux: float

    def tile_at(self, x: int, y: int) -> int:
        """Index of the tile holding pixel (x, y); -1 when none does."""
        t = self.tiles
        hit = np.flatnonzero((t[:, 0] <= y) & (y < t[:, 1]) & (t[:, 2] <= x) & (x < t[:, 3]))
        return int(hit[0]) if len(hit) else -1


@dataclass(frozen=True)
class StoredFrame:
    """One frame of the store, its arrays memory-mapped.

    Attributes
    ----------
    frame_id, filter : str
    mjd : float
        Exposure start, MJD (days).
    exptime : float
        s.
    magzp : float or None
        Zero point (mag of 1 ADU).
    wcs_header : str
        Celestial WCS as FITS header text (:func:`celestial_header`).
    image : DifferenceImage
    wcs : astropy.wcs.WCS
    psf_models : list of ShiftedPSF
        P_D of each tile at the stamp size of the PSF fit, their sub-pixel shifts cached.
    telescope, field : str
        Of the frame's key (the store's folders escape them; ``meta.json`` keeps them).
    """

    frame_id: str
    filter: str
    mjd: float
    exptime: float
    magzp: float | None
    wcs_header: str
    image: DifferenceImage
    wcs: WCS
    psf_models: list[ShiftedPSF] = field(default_factory=list)
    telescope: str = ""
    field: str = ""

    def pixels(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel positions (x, y) of (``ra``, ``dec``) (deg) on this frame, and the indices of those on it."""
        x, y = self.wcs.world_to_pixel_values(ra, dec)
        x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        ny, nx = self.image.diff.shape
        return x, y, np.flatnonzero((x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5))

    def measure(self, x: float, y: float, min_psf_fraction: float) -> dict | None:
        """Forced photometry at pixel (x, y): a ``ForcedPhotometry`` record, or None (off the image, masked)."""
        img = self.image
        t = img.tile_at(int(np.floor(x + 0.5)), int(np.floor(y + 0.5)))
        if t < 0:
            return None
        found = forced_flux(img.diff, img.noise_scale, float(img.F_D[t]), self.psf_models[t], x, y,
                            min_psf_fraction)
        if found is None:
            return None
        return {"frame_id": self.frame_id, "mjd": self.mjd, "exptime": self.exptime, "filter": self.filter,
                "flux": found[0], "flux_err": found[1], "magzp": self.magzp,
                "limiting_flux": float(img.limiting_flux)}


def celestial_header(frame: Frame) -> str:
    """The frame's celestial WCS as FITS header cards text (``astropy.io.fits.Header.tostring()``)."""
    return frame.wcs.to_header(relax=True).tostring()


class DifferenceStore:
    """Difference images of recent frames on local disk, per (telescope, field, filter).

    See the module docstring for the layout, atomicity and retention.
    """

    def __init__(self, root: Path | str, config: DiffStoreConfig = DiffStoreConfig()) -> None:
        self.root = Path(root)
        self.config = config
        self._open: OrderedDict[Path, StoredFrame] = OrderedDict()
        self._footprints: dict[Path, tuple[float, float, float]] = {}  # per key folder (:meth:`_footprint`)

    def _dir(self, key: tuple[str, str, str]) -> Path:
        return self.root.joinpath(*(path_component(k) for k in key))

    def frame_ids(self, key: tuple[str, str, str]) -> list[str]:
        """Ids of the frames kept for ``key``, oldest (by MJD, then id) first."""
        return [f.frame_id for f in self._frames(self._dir(key))]

    def put(self, meta: FrameMeta, wcs_header: str, image: DifferenceImage) -> bool:
        """Keep a frame's difference image; False when it is kept already (or nothing is stored).

        Written to a temporary directory renamed into place, then the oldest frames beyond
        ``max_frames`` are dropped.
        """
        if self.config.max_frames <= 0:
            return False
        d = self._dir(meta.reference_key)
        target = d / path_component(meta.frame_id)
        if target.exists():
            return False
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{target.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.save(tmp / "diff.npy", np.asarray(image.diff, np.float32))
        np.save(tmp / "noise.npy", np.minimum(image.noise_scale, _F16_MAX).astype(np.float16))
        np.save(tmp / "psf.npy", np.asarray(image.psfs, np.float32))
        (tmp / "meta.json").write_text(json.dumps(_meta_record(meta, wcs_header, image)))
        try:
            os.rename(tmp, target)
        except OSError:  # another writer renamed the same frame into place first
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        self._prune(d)
        return True

    def forced_photometry(self, key: tuple[str, str, str], mjd: float, ra: np.ndarray, dec: np.ndarray
                          ) -> list[list[dict]]:
        """Forced photometry at each (ra, dec) on the frames of ``key`` that started before ``mjd``.

        Parameters
        ----------
        key : (telescope, field, filter)
        mjd : float
            Exposure start of the frame of the positions (MJD, days): only frames that started
            strictly earlier are measured, whatever arrived since.
        ra, dec : ndarray, shape (n,)
            Positions (deg, ICRS).

        Returns
        -------
        list of list of dict
            Per position, the ``ForcedPhotometry`` records (``Candidate.forced``) of the earlier
            frames whose footprint contains it, oldest first.
        """
        ra, dec = np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float))
        out: list[list[dict]] = [[] for _ in range(len(ra))]
        if not len(ra):
            return out
        for frame in self._frames(self._dir(key)):
            if not frame.mjd < mjd:
                continue
            x, y, inside = frame.pixels(ra, dec)
            for i in inside:
                rec = frame.measure(float(x[i]), float(y[i]), self.config.min_psf_fraction)
                if rec is not None:
                    out[i].append(rec)
        return out

    def forced_at(self, ra: float, dec: float, start_mjd: float = -np.inf, end_mjd: float = np.inf) -> list[dict]:
        """Forced photometry at one position on every kept frame of any key whose footprint holds it.

        Parameters
        ----------
        ra, dec : float
            The position (deg, ICRS).
        start_mjd, end_mjd : float
            Frames whose exposure started in [``start_mjd``, ``end_mjd``) (MJD, days); default all.

        Returns
        -------
        list of dict
            ``ForcedPhotometry`` records (as :meth:`forced_photometry`) with the frame's
            ``telescope`` and ``field``, by exposure start, then telescope and frame id. A frame
            masked there (or with too few good pixels, ``min_psf_fraction``) gives none.
        """
        out = []
        for d in sorted(p for p in self.root.glob("*/*/*") if p.is_dir() and not p.name.startswith(".")):
            footprint = self._footprint(d)
            if footprint is not None and _separation_deg(ra, dec, *footprint[:2]) > 2.0 * footprint[2]:
                continue  # a field elsewhere on the sky: none of its frames is opened
            for frame in self._frames(d):
                if not start_mjd <= frame.mjd < end_mjd:
                    continue
                x, y, inside = frame.pixels(np.array([ra]), np.array([dec]))
                rec = frame.measure(float(x[0]), float(y[0]), self.config.min_psf_fraction) if len(inside) else None
                if rec is not None:
                    out.append({**rec, "telescope": frame.telescope, "field": frame.field})
        return sorted(out, key=lambda r: (r["mjd"], r["telescope"], r["frame_id"]))

    def _footprint(self, d: Path) -> tuple[float, float, float] | None:
        """(ra, dec, radius) (deg) of a key's sky: the circle about one of its frames' centre through its corners.

        Read once per key from one ``meta.json`` and kept (a field's frames point at it, within
        :meth:`forced_at`'s margin of one more radius). None when no frame of the key is readable.
        """
        if d in self._footprints:
            return self._footprints[d]
        for p in sorted(q for q in d.iterdir() if q.is_dir() and not q.name.startswith(".")):
            try:
                meta = json.loads((p / "meta.json").read_text())
                wcs = celestial_wcs(fits.Header.fromstring(meta["wcs_header"]))
                nx, ny = float(meta["nx"]), float(meta["ny"])
                ra, dec = wcs.pixel_to_world_values([(nx - 1) / 2, -0.5, nx - 0.5, -0.5, nx - 0.5],
                                                    [(ny - 1) / 2, -0.5, -0.5, ny - 0.5, ny - 0.5])
            except (OSError, ValueError, KeyError, TypeError, BrokerError):
                continue
            radius = max(_separation_deg(float(ra[0]), float(dec[0]), float(r), float(c))
                         for r, c in zip(ra[1:], dec[1:], strict=True))
            if np.isfinite(radius):
                self._footprints[d] = (float(ra[0]), float(dec[0]), radius)
                return self._footprints[d]
        return None

    def _frames(self, d: Path) -> list[StoredFrame]:
        """The readable frames under ``d``, oldest first (an unreadable one is skipped with a warning)."""
        if not d.is_dir():
            return []
        frames = []
        for p in sorted(d.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            try:
                frames.append(self._load(p))
            except (OSError, ValueError, KeyError, TypeError, BrokerError) as exc:
                warnings.warn(f"skipping unreadable stored difference image {p}: {exc}", stacklevel=2)
        return sorted(frames, key=lambda f: (f.mjd, f.frame_id))

    def _load(self, p: Path) -> StoredFrame:
        """The frame stored in directory ``p`` (cached, memory-mapped)."""
        frame = self._open.get(p)
        if frame is not None:
            self._open.move_to_end(p)
            return frame
        meta = json.loads((p / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r} is not {FORMAT}")
        psfs = np.load(p / "psf.npy")
        tiles = np.asarray(meta["tiles"], float).reshape(-1, 6)
        image = DifferenceImage(np.load(p / "diff.npy", mmap_mode="r"), np.load(p / "noise.npy", mmap_mode="r"),
                                psfs, tiles[:, :4].astype(int), tiles[:, 4], tiles[:, 5],
                                float(meta["limiting_flux"]))
        if psfs.ndim != 3 or len(psfs) != len(tiles) or image.diff.shape != image.noise_scale.shape:
            raise ValueError("arrays and tiles disagree")
        models = [ShiftedPSF(psf, fit_half_size(fw, psf.shape[0] // 2)) for psf, fw in zip(psfs, image.fwhm,
                                                                                           strict=True)]
        frame = StoredFrame(meta["frame_id"], meta["filter"], float(meta["mjd"]), float(meta["exptime"]),
                            meta["magzp"], meta["wcs_header"], image,
                            celestial_wcs(fits.Header.fromstring(meta["wcs_header"])), models,
                            str(meta.get("telescope", "")), str(meta.get("field", "")))
        self._open[p] = frame
        while len(self._open) > self.config.cache_frames:
            self._open.popitem(last=False)
        return frame

    def _prune(self, d: Path) -> None:
        """Drop the oldest frames of a key beyond ``max_frames``, and leftovers of crashed writes."""
        for p in d.glob(".*.tmp"):  # one writer per key: any such directory is a crash's leftover
            shutil.rmtree(p, ignore_errors=True)
        frames = self._frames(d)
        for frame in frames[:max(0, len(frames) - self.config.max_frames)]:
            p = d / path_component(frame.frame_id)
            self._open.pop(p, None)
            trash = d / f".{p.name}.{os.getpid()}.tmp"
            os.rename(p, trash)  # gone from listings at once; a crash leaves only a hidden leftover
            shutil.rmtree(trash, ignore_errors=True)


def _separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Angle between two directions (deg; haversine)."""
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return float(np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))))


def _meta_record(meta: FrameMeta, wcs_header: str, image: DifferenceImage) -> dict:
    """``meta.json`` of a stored frame."""
    tiles = np.column_stack([np.asarray(image.tiles, float), image.F_D, image.fwhm])
    return {"format": FORMAT, "frame_id": meta.frame_id, "telescope": meta.telescope, "field": meta.field,
            "filter": meta.filter, "mjd": meta.mjd_start, "exptime": meta.exptime, "magzp": meta.magzp,
            "limiting_flux": float(image.limiting_flux), "nx": int(image.diff.shape[1]),
            "ny": int(image.diff.shape[0]), "wcs_header": wcs_header, "tiles": tiles.tolist()}
