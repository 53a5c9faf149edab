"""Cutout triplets as PNG: science, reference and difference with colour bars, scale and compass.

Masked (NaN) pixels are drawn in :data:`MASKED_COLOUR`; a stamp that cannot be read gets a note in
its panel instead of an error (``docs/architecture.md``, "Subscribing").
"""

from __future__ import annotations

import io
import logging
import math
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import DecodeError
from streams.alert_expr import is_num

log = logging.getLogger(__name__)


# --- cutout triplets as PNG ---------------------------------------------------------------------------

#: Largest decompressed cutout read for a PNG (bytes): a 63×63 float32 stamp is ~20 kB.
_MAX_STAMP_BYTES = 16 * 1024 * 1024
#: Colour of masked (NaN) pixels: not a grey, so never mistaken for sky.
MASKED_COLOUR = "#e6007e"


def _outline() -> list[Any]:
    """A dark outline that keeps an annotation readable on any pixels."""
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=2.5, foreground="black")]


@dataclass(frozen=True)
class Cutout:
    """A decoded cutout: pixels (NaN where masked), its celestial WCS (None without one) and unit."""

    data: np.ndarray
    wcs: Any
    unit: str


def read_cutout(stamp_data: bytes) -> Cutout:
    """Pixels, WCS and ``BUNIT`` of a gzipped (or plain) FITS cutout.

    Raises
    ------
    DecodeError
        Bytes that are not a FITS image of two axes (garbage, truncated, too large).
    """
    from astropy.utils.exceptions import AstropyWarning

    try:
        with warnings.catch_warnings():  # astropy warns on odd cards (FITSFixedWarning, VerifyWarning)
            warnings.simplefilter("ignore", AstropyWarning)
            return _read_cutout(stamp_data)
    except DecodeError:
        raise
    except Exception as exc:  # astropy raises many kinds on garbage
        raise DecodeError(f"unreadable cutout: {type(exc).__name__}: {exc}") from exc


def _read_cutout(stamp_data: bytes) -> Cutout:
    """:func:`read_cutout` without the translation of astropy's errors."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from broker.frame import check_structure, inflate

    raw = inflate(stamp_data, _MAX_STAMP_BYTES) if stamp_data[:2] == b"\x1f\x8b" else stamp_data
    check_structure(raw)
    with fits.open(io.BytesIO(raw)) as hdul:
        hdu = next((h for h in hdul if getattr(h, "data", None) is not None), None)
        if hdu is None or hdu.data.ndim != 2:
            raise DecodeError("cutout is not a 2-D image")
        data, header = np.asarray(hdu.data, dtype=np.float32), hdu.header
        wcs = WCS(header).celestial if header.get("CTYPE1") else None
    return Cutout(data, wcs if wcs is not None and wcs.has_celestial else None, str(header.get("BUNIT", "")))


def _fmt(x: object, spec: str, none: str = "-") -> str:
    return format(x, spec) if is_num(x) else none


def _title(alert: dict) -> str:
    """objectId, band, magnitude (or flux), scores and position, robust to missing values."""
    s, sc = alert.get("source") or {}, alert.get("scores") or {}
    if is_num(s.get("magpsf")):
        phot = f"mag {s['magpsf']:.2f} ± {_fmt(s.get('sigmapsf'), '.2f')}"
    else:
        phot = f"flux {_fmt(s.get('flux'), '.0f')} ADU (no zero point)"
    return (f"{printable(alert.get('objectId', '?'))}   band {printable(s.get('filter', '?'))}   {phot}\n"
            f"{printable(alert.get('candid', '?'))}   rb {_fmt(sc.get('rb'), '.2f')}   "
            f"S/N {_fmt(s.get('snr'), '.1f')}   RA {_fmt(s.get('ra'), '.5f')}  Dec {_fmt(s.get('dec'), '+.5f')}")


def printable(value: object) -> str:
    r"""``value`` as text with every non-printable character as its escape (``\x1b``, ``\n``).

    An alert's strings come from whoever produced it: an escape sequence in an ``objectId`` would
    otherwise reach a terminal (clear it, hide lines) or a figure title (a glyph it has not).
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))


def _scale_bar(ax: Any, cut: Cutout) -> None:
    """A bar of a round number of arcsec, about a quarter of the cutout wide, bottom left."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    arcsec_per_px = float(np.mean(proj_plane_pixel_scales(cut.wcs))) * 3600.0
    if not math.isfinite(arcsec_per_px) or arcsec_per_px <= 0:
        return
    ny, nx = cut.data.shape
    want = nx * arcsec_per_px / 4
    length = max((v for v in (0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600) if v <= want), default=want)
    x0, y0 = 0.06 * nx, 0.07 * ny
    ax.plot([x0, x0 + length / arcsec_per_px], [y0, y0], color="yellow", lw=2.5, solid_capstyle="butt",
            path_effects=_outline())
    ax.text(x0, y0 + 0.03 * ny, f'{length:g}"', color="yellow", fontsize=9, va="bottom", path_effects=_outline())


def north_east(wcs: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """Unit vectors (dx, dy) in pixels towards north and east at the cutout's centre (None if degenerate)."""
    ny, nx = shape
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    ra, dec = wcs.wcs_pix2world([[cx, cy]], 0)[0]
    step = 1.0 / 3600
    pts = wcs.wcs_world2pix([[ra, dec + step], [ra + step / max(math.cos(math.radians(dec)), 1e-6), dec]], 0)
    out = []
    for px, py in pts:
        d = np.array([px - cx, py - cy])
        norm = float(np.hypot(*d))
        if not math.isfinite(norm) or norm == 0:
            return None
        out.append(d / norm)
    return out[0], out[1]


def _compass(ax: Any, cut: Cutout) -> None:
    """N and E arrows from the WCS, top right."""
    dirs = north_east(cut.wcs, cut.data.shape)
    if dirs is None:
        return
    ny, nx = cut.data.shape
    base = np.array([0.80 * nx, 0.68 * ny])
    for d, label in zip(dirs, ("N", "E"), strict=True):
        tip = base + d * 0.16 * nx
        ax.annotate("", xy=tip, xytext=base, arrowprops={"arrowstyle": "->", "color": "cyan", "lw": 1.5,
                                                         "path_effects": _outline()})
        ax.text(*(base + (tip - base) * 1.4), label, color="cyan", fontsize=9, fontweight="bold", ha="center",
                va="center", path_effects=_outline())


def _panel(fig: Any, ax: Any, stamp: object, title: str, diverging: bool) -> str | None:
    """Draw one cutout with colour bar, scale and compass; a note instead when it cannot be drawn."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    try:
        cut = read_cutout(stamp if isinstance(stamp, bytes) else b"")
        finite = cut.data[np.isfinite(cut.data)]
        if not finite.size:
            raise DecodeError("every pixel is masked (NaN)")
    except DecodeError as exc:
        ax.set_facecolor("#dddddd")
        note = textwrap.fill(str(exc), 36, max_lines=4, placeholder=" ...")
        ax.text(0.5, 0.5, f"not shown:\n{note}", ha="center", va="center", fontsize=7, transform=ax.transAxes)
        return f"{title}: {exc}"
    cmap = plt.get_cmap("gray").with_extremes(bad=MASKED_COLOUR)
    if diverging:
        hi = float(np.percentile(np.abs(finite), 99.5)) or 1.0
        lo = -hi
    else:
        lo, hi = (float(v) for v in np.percentile(finite, [1, 99.5]))
        hi = hi if hi > lo else lo + 1.0
    im = ax.imshow(np.ma.masked_invalid(cut.data), origin="lower", cmap=cmap, vmin=lo, vmax=hi,
                   interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(cut.unit or "pixel value", fontsize=7)
    if cut.wcs is not None:
        _scale_bar(ax, cut)
        _compass(ax, cut)
    else:
        ax.text(0.03, 0.03, "no WCS: no scale", color="yellow", fontsize=7, transform=ax.transAxes,
                path_effects=_outline())
    return None


@dataclass(frozen=True)
class TripletPNG:
    """A written triplet PNG and the panels that could not be drawn (with why)."""

    path: Path
    problems: tuple[str, ...]


def save_triplet_png(alert: dict, path: str | Path) -> TripletPNG:
    """Write the science / reference / difference cutouts of ``alert`` side by side as a PNG.

    Each panel has a colour bar (in the cutout's ``BUNIT``), a scale bar in arcsec and N/E arrows
    when the cutout has a celestial WCS, and masked (NaN) pixels in :data:`MASKED_COLOUR`; the
    difference is shown on a scale symmetric about zero. The title gives objectId, band,
    magnitude, candidate id, scores and position. A cutout that cannot be read or is all NaN is
    replaced by a note, never an exception.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.0))
    problems = []
    try:
        for ax, key, title in zip(axes, ("cutoutScience", "cutoutTemplate", "cutoutDifference"),
                                  ("science", "reference", "difference"), strict=True):
            cutout = alert.get(key)
            stamp = cutout.get("stampData") if isinstance(cutout, dict) else None
            problem = _panel(fig, ax, stamp, title, diverging=key == "cutoutDifference")
            if problem:
                problems.append(problem)
        fig.suptitle(_title(alert), fontsize=10, parse_math=False)  # '$' in an id is text, not TeX
        fig.text(0.995, 0.01, "masked pixels", color=MASKED_COLOUR, fontsize=7, ha="right", va="bottom")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return TripletPNG(path, tuple(problems))
