"""The Tycho-2 star catalogue, read offline from astrometry.net's index files.

The Debian package ``astrometry-data-tycho2`` installs ``index-tycho2-NN.littleendian.fits`` (NN =
07..19, quads for fields from ~22' to ~33 deg). Each file holds a subset of Tycho-2 (brightest
stars per sky cell, uniformised) as a kd-tree of unit vectors stored as unsigned 32-bit integers
(``kdtree_data_stars``, scaled by ``kdtree_range_stars``: value = min + int / scale) and a tag-along
column ``MAG_VT``, the Tycho V_T magnitude. Nothing else is carried: no B_T, no colours, no proper
motions (epoch ~J2000), so calibration against it has no colour term (``docs/telescopes.md``).
:func:`cone` returns the stars of the densest index file present within a radius.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from broker.errors import SolverUnavailable


@dataclass(frozen=True)
class CatalogStars:
    """Catalogue stars (arrays of equal length n): ``ra``, ``dec`` (deg, ~J2000) and ``mag`` (Tycho V_T, mag)."""

    ra: np.ndarray
    dec: np.ndarray
    mag: np.ndarray

    def __len__(self) -> int:
        return len(self.ra)


def index_files(index_dir: str | Path) -> list[Path]:
    """The Tycho-2 index files of ``index_dir``, densest (lowest scale number) first."""
    return sorted(Path(index_dir).glob("index-tycho2-*.fits"))


def _column_bytes(hdu: fits.BinTableHDU) -> bytes:
    """The raw bytes of a one-column binary table (astropy cannot type the kd-tree's ``12A`` columns)."""
    size = int(hdu.header["NAXIS1"]) * int(hdu.header["NAXIS2"])
    return bytes(hdu._get_raw_data(size, "u1", hdu._data_offset))


@functools.lru_cache(maxsize=2)
def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors (n, 3) float32, V_T magnitudes (n,) float32) of one index file."""
    with fits.open(path, memmap=True) as hdul:
        named = {h.columns.names[0]: h for h in hdul[1:] if isinstance(h, fits.BinTableHDU) and h.columns.names}
        try:
            data, ranges, mags = named["kdtree_data_stars"], named["kdtree_range_stars"], named["MAG_VT"]
        except KeyError as exc:
            raise SolverUnavailable(f"{path} is not an astrometry.net Tycho-2 index (no {exc} table)") from exc
        if str(named["kdtree_header_stars"].header.get("KDT_DATA", "")).strip() != "u32":
            raise SolverUnavailable(f"{path}: kd-tree data type is not u32")
        raw = np.frombuffer(_column_bytes(data), dtype="<u4").reshape(-1, 3)
        rng = np.frombuffer(_column_bytes(ranges), dtype="<f8")
        mag = np.asarray(mags.data["MAG_VT"], dtype=np.float32)
    xyz = (rng[:3] + raw / rng[6]).astype(np.float32)
    return xyz, mag


def _unit(ra: float, dec: float) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.array([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def cone(ra: float, dec: float, radius_deg: float, index_dir: str | Path = "/usr/share/astrometry") -> CatalogStars:
    """Tycho-2 stars within ``radius_deg`` of (``ra``, ``dec``) (deg), from the densest index file present.

    Raises
    ------
    SolverUnavailable
        No Tycho-2 index file in ``index_dir`` (the Debian package ``astrometry-data-tycho2``).
    """
    files = index_files(index_dir)
    if not files:
        raise SolverUnavailable(f"no Tycho-2 index files (index-tycho2-*.fits) in {index_dir}: install the "
                                "Debian package astrometry-data-tycho2")
    xyz, mag = _load(files[0])
    near = xyz @ _unit(ra, dec).astype(np.float32) >= np.cos(np.radians(radius_deg))
    v = xyz[near].astype(np.float64)
    ra_out = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    dec_out = np.degrees(np.arcsin(np.clip(v[:, 2] / np.linalg.norm(v, axis=1), -1.0, 1.0)))
    return CatalogStars(ra_out, dec_out, mag[near].astype(np.float64))
