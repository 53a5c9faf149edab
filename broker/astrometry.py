"""Astrometry: plate-solve frames without a WCS, and check every WCS against the Tycho-2 catalogue.

* :func:`plate_solve` runs astrometry.net's ``solve-field`` (Debian package ``astrometry.net``,
  index files ``astrometry-data-tycho2``) on the frame's own star list, never on its pixels: our
  detections (:func:`broker.stars.find_stars`) go in as an xy-list, with the pointing (RA/DEC,
  OBJCTRA/OBJCTDEC) and pixel-scale hints of the header or telescope profile; each run is bounded
  (``cpulimit`` and a wall-clock timeout). A hinted search that fails is retried once without the
  position (a wrong pointing hint), keeping the scale hint.
* :func:`check_wcs` projects the catalogue stars through a WCS, matches them to the detected stars
  and measures the residual (RMS, arcsec) and the number matched; a solution or a header WCS with
  too large a residual is refused, and a header WCS that matches is refined (its reference pixel
  moved by the median offset).

The result (:class:`Astrometry`) is stored with the frame as header cards (``WCSSTAT``, ``WCSRESID``,
``WCSNMAT``, ``WCSHOFF``; :func:`astrometry_cards`).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from broker.catalog import CatalogStars, cone, index_files
from broker.errors import ConfigError, NoSolution, PoorAstrometry, SolverUnavailable, UnsolvableField
from broker.stars import StarList

#: WCS statuses written to ``WCSSTAT``.
STATUSES = ("solved", "verified", "unconfirmed")


@dataclass(frozen=True)
class AstrometryConfig:
    """Plate solving and WCS checking (``[ingest.astrometry]``).

    Attributes
    ----------
    solver : str
        The solve-field executable (name on PATH or path).
    index_dir : str
        Directory of the Tycho-2 index files (Debian: ``/usr/share/astrometry``).
    cpulimit_s : float
        CPU seconds solve-field may spend on one frame (its ``--cpulimit``, enforced by searching
        the index files in parallel). 20 s: a hinted Tycho-2 solve of a 0.5-1 deg field takes ~1 s
        on one core; a search that finds nothing stops after it (5 s: 6 s wall). Searching in
        parallel holds all Tycho-2 index files in memory during a run (~270 MB resident).
    timeout_s : float
        Wall-clock limit of one solve-field run (s); its process group is killed after that. 30 s:
        a hinted solve takes 1-3 s; a blind one of a 56'x43' MicroObservatory frame (scale hint
        kept) took 29 and 62 s in two runs on the shared 2-core machine before ``cpulimit_s`` was
        enforced, so with the defaults a frame with a wrong pointing hint is solved blind or refused
        ``unsolvable`` after at most ~45 s (two runs of 20 s of CPU).
    max_sources : int
        Brightest detected stars given to the solver (count, 1 or more). 150: quads of the brightest stars
        match Tycho-2 (V < ~12) best, fainter ones only add distractors.
    detect_sigma : float
        Detection threshold of that star list: a star's fitted peak amplitude in units of the sky's
        per-pixel sigma (``broker.stars.find_stars``). 5: with the 3 px detection kernel the fitted
        amplitude's noise is 1.29 pixel sigmas, so this is a ~3.9-sigma detection, and pure noise
        gives ~180 peaks per 512x512 px (measured). They are among the faintest entries of the list
        (brightest first), so they fill it only behind a frame's real stars; the solver gets the
        first ``max_sources``.
    hint_radius_deg : float
        Search radius around the header's pointing hint (deg). 2 deg: amateur mounts point to
        a few arcmin, a plate-solved goto to arcsec.
    scale_tolerance : float
        Relative width of the pixel-scale hint (0.15: the hint x 0.85..1.15; focal lengths and
        binning cards are often approximate).
    blind_retry : bool
        Retry once without the position hint when the hinted search fails (a wrong RA/DEC).
    match_radius_px : float
        Catalogue-to-detection match radius after the offset is removed (px).
    search_radius_px : float
        Radius of the first, offset-finding match (px): how wrong a header WCS may be and still
        be refined rather than refused.
    max_residual_px : float
        Largest accepted RMS residual of catalogue stars against detections (px). Default 1.5 px: a
        right solution matches to about a pixel (0.5-1.15 px measured on LCO 0.4 m and MicroObservatory
        5.2"/px frames, where Tycho-2's J2000 positions lack ~17 yr of proper motion and bright
        stars are near saturation); a wrong one matches nothing.
    min_matches : int
        Fewest matched catalogue stars for a WCS to count as verified (count).
    backoff_after : int
        Frames of one telescope in a row that solve-field ran on and found no solution, after which
        its frames are dead-lettered ``solver_backoff`` without a solve for ``backoff_s``
        (:mod:`broker.solvebackoff`); 0: never. 5: a wrong scale or pointing hint in a telescope's
        headers, or a night of cloud with a few stars, costs five frames of up to ~45 s each
        (above) before the stage stops spending them on that telescope.
    backoff_s : float
        Seconds after the last failed solve before one frame of that telescope is tried again; a
        solution ends the back-off. 300 s: a few frames of a telescope taking exposures every
        30-60 s, so a fixed configuration or a clear sky is noticed within ~5 minutes.
    """

    solver: str = "solve-field"
    index_dir: str = "/usr/share/astrometry"
    cpulimit_s: float = 20.0
    timeout_s: float = 30.0
    max_sources: int = 150
    detect_sigma: float = 5.0
    hint_radius_deg: float = 2.0
    scale_tolerance: float = 0.15
    blind_retry: bool = True
    match_radius_px: float = 2.5
    search_radius_px: float = 12.0
    max_residual_px: float = 1.5
    min_matches: int = 5
    backoff_after: int = 5
    backoff_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_sources < 1:  # 0 was a ValueError of the star finder on every frame
            raise ConfigError(f"max_sources must be 1 or more, not {self.max_sources}")


@dataclass(frozen=True)
class WCSCheck:
    """Catalogue stars matched to detections through one WCS.

    Attributes
    ----------
    n_catalog : int
        Catalogue stars projected inside the frame (count).
    n_matched : int
        Of those, matched to a detected star (count).
    residual_arcsec : float
        RMS distance of the matched pairs after the median offset is removed (arcsec); NaN when
        fewer than 3 matched.
    scale_arcsec : float
        Pixel scale of the WCS (arcsec/px).
    offset_px : tuple of float
        Median (dx, dy) of detection minus catalogue position (px).
    star_index, catalog_index : ndarray of int
        The matched pairs: indices into the star list and into the catalogue.
    """

    n_catalog: int
    n_matched: int
    residual_arcsec: float
    offset_px: tuple[float, float]
    scale_arcsec: float
    star_index: np.ndarray
    catalog_index: np.ndarray


@dataclass(frozen=True)
class Astrometry:
    """The astrometric solution of a frame: its WCS header, status and residual (stored as header cards)."""

    wcs_header: fits.Header
    status: str
    check: WCSCheck
    catalog: CatalogStars
    hint_offset_deg: float | None = None


def _wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, naxis=2).celestial


def _nearest(x: np.ndarray, y: np.ndarray, sx: np.ndarray, sy: np.ndarray, radius: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """(star index, catalogue index) of each catalogue point's nearest star within ``radius`` px."""
    if len(sx) == 0 or len(x) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    d2 = (x[:, None] - sx[None, :]) ** 2 + (y[:, None] - sy[None, :]) ** 2
    best = np.argmin(d2, axis=1)
    ok = d2[np.arange(len(x)), best] <= radius ** 2
    return best[ok], np.flatnonzero(ok)


def check_wcs(header: fits.Header, shape: tuple[int, int], stars: StarList, catalog: CatalogStars,
              config: AstrometryConfig = AstrometryConfig()) -> WCSCheck:
    """Match ``catalog`` projected through the header's WCS to ``stars`` and measure the residual.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Holds the celestial WCS to check.
    shape : tuple of int
        (ny, nx) of the frame (px).
    stars : StarList
        Detected stars (0-based px).
    catalog : CatalogStars
        Catalogue stars around the frame.
    """
    wcs = _wcs(header)
    with np.errstate(invalid="ignore"):
        cx, cy = wcs.world_to_pixel_values(catalog.ra, catalog.dec)
    ny, nx = shape
    inside = np.flatnonzero(np.isfinite(cx) & np.isfinite(cy) & (cx > 2) & (cy > 2) & (cx < nx - 3) & (cy < ny - 3))
    n_inside = len(inside)
    inside = _brightest(inside, catalog.mag, _CATALOG_PER_SOURCE * config.max_sources)
    cx, cy = cx[inside], cy[inside]
    si, ci = _nearest(cx, cy, stars.x, stars.y, config.search_radius_px)
    dx = float(np.median(stars.x[si] - cx[ci])) if len(si) else 0.0
    dy = float(np.median(stars.y[si] - cy[ci])) if len(si) else 0.0
    si, ci = _nearest(cx + dx, cy + dy, stars.x, stars.y, config.match_radius_px)
    scale = float(np.mean(proj_plane_pixel_scales(wcs))) * 3600.0
    residual = float("nan")
    if len(si) >= 3:
        sep = np.hypot(stars.x[si] - cx[ci] - dx, stars.y[si] - cy[ci] - dy)
        residual = float(np.sqrt(np.mean(sep ** 2))) * scale
    return WCSCheck(n_inside, len(si), residual, (dx, dy), scale, si, inside[ci])


#: Catalogue stars matched per detected source, at most (:func:`check_wcs`): the detections are the
#: brightest ``max_sources``, so fainter catalogue stars only add distractors. Without a bound a
#: header WCS of 1 deg/px (CTYPE cards alone) put 190,000 Tycho-2 stars inside a 650 x 500 frame:
#: 8 s and 1.2 GB per check, more on a larger frame.
_CATALOG_PER_SOURCE = 20


def _brightest(index: np.ndarray, mag: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` entries of ``index`` with the smallest ``mag[index]`` (all of them when there are fewer)."""
    if len(index) <= n:
        return index
    return np.sort(index[np.argpartition(mag[index], n)[:n]])


def verified(check: WCSCheck, config: AstrometryConfig) -> bool:
    """Whether a check confirms its WCS: enough matches and a residual within the limit."""
    return (check.n_matched >= config.min_matches
            and check.residual_arcsec <= config.max_residual_px * check.scale_arcsec)


def solver_path(config: AstrometryConfig) -> str:
    """The solve-field executable, or :class:`SolverUnavailable` naming the Debian packages to install."""
    path = shutil.which(config.solver)
    if path is None:
        raise SolverUnavailable(f"plate solver {config.solver!r} not found: install the Debian package "
                                "astrometry.net (apt-get install astrometry.net astrometry-data-tycho2)")
    if not index_files(config.index_dir):
        raise SolverUnavailable(f"no Tycho-2 index files in {config.index_dir}: install the Debian package "
                                "astrometry-data-tycho2")
    return path


def _solve_args(stars: StarList, shape: tuple[int, int], hint: tuple[float, float] | None,
                scale: float | None, config: AstrometryConfig, work: Path) -> list[str]:
    """The solve-field command line for the star list written to ``work/xy.fits``."""
    n = min(len(stars), config.max_sources)
    columns = [fits.Column("X", "D", array=stars.x[:n] + 1.0), fits.Column("Y", "D", array=stars.y[:n] + 1.0),
               fits.Column("FLUX", "D", array=stars.flux[:n])]
    fits.BinTableHDU.from_columns(columns).writeto(work / "xy.fits", overwrite=True)
    # inparallel: astrometry-engine enforces cpulimit only when it searches the index files in parallel
    # (astrometry.net issue #6); sequentially, an unsolvable frame ran until timeout_s
    (work / "backend.cfg").write_text(f"inparallel\ncpulimit {config.cpulimit_s:g}\nadd_path {config.index_dir}\n"
                                      "autoindex\n")
    args = [solver_path(config), str(work / "xy.fits"), "--width", str(shape[1]), "--height", str(shape[0]),
            "--x-column", "X", "--y-column", "Y", "--sort-column", "FLUX", "--no-plots", "--overwrite",
            "--dir", str(work), "--backend-config", str(work / "backend.cfg"), "--cpulimit", f"{config.cpulimit_s:g}",
            "--crpix-center", "--wcs", str(work / "solution.wcs"), "--new-fits", "none", "--index-xyls", "none",
            "--rdls", "none", "--corr", "none", "--match", "none", "--solved", "none", "--temp-axy"]
    if scale is not None:
        lo, hi = scale * (1.0 - config.scale_tolerance), scale * (1.0 + config.scale_tolerance)
        args += ["--scale-units", "arcsecperpix", "--scale-low", f"{lo:.4f}", "--scale-high", f"{hi:.4f}"]
    if hint is not None:
        args += ["--ra", f"{hint[0]:.6f}", "--dec", f"{hint[1]:.6f}", "--radius", f"{config.hint_radius_deg:g}"]
    return args


def _run_bounded(args: list[str], cwd: Path, timeout_s: float) -> bool:
    """Run ``args`` in a process group of its own; kill the whole group after ``timeout_s`` (False then).

    solve-field starts ``astrometry-engine``: killing solve-field alone would leave the engine running.
    """
    try:
        proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as exc:
        raise SolverUnavailable(f"plate solver {args[0]} cannot run: {exc}") from exc
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False
    return True


def run_solver(stars: StarList, shape: tuple[int, int], hint: tuple[float, float] | None, scale: float | None,
               config: AstrometryConfig = AstrometryConfig()) -> fits.Header | None:
    """The WCS header solve-field finds for ``stars`` (0-based px) on a (ny, nx) frame; None when it finds none.

    Raises
    ------
    SolverUnavailable
        solve-field or the index files are not installed.
    """
    with tempfile.TemporaryDirectory(prefix="broker-solve-") as tmp:
        work = Path(tmp)
        args = _solve_args(stars, shape, hint, scale, config, work)
        if not _run_bounded(args, work, config.timeout_s):
            return None
        solution = work / "solution.wcs"
        if not solution.exists():
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            header = fits.getheader(solution)
    keep = fits.Header()
    for card in header.cards:
        if card.keyword not in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "IMAGEW", "IMAGEH", "DATE", "", "COMMENT",
                                "HISTORY") and not card.keyword.startswith("ANET"):
            keep.append(card)
    return keep


def _centre(header: fits.Header, shape: tuple[int, int]) -> tuple[float, float, float]:
    """(RA, Dec, radius) in deg: the frame's centre under ``header`` and the radius of its corners."""
    wcs = _wcs(header)
    ny, nx = shape
    ra, dec = wcs.pixel_to_world_values(np.array([(nx - 1) / 2, 0, nx - 1]), np.array([(ny - 1) / 2, 0, ny - 1]))
    c = np.radians([ra[0], dec[0]])
    corners = np.radians([ra[1:], dec[1:]])
    cos_sep = np.sin(c[1]) * np.sin(corners[1]) + np.cos(c[1]) * np.cos(corners[1]) * np.cos(corners[0] - c[0])
    return float(ra[0]) % 360.0, float(dec[0]), float(np.degrees(np.arccos(np.clip(cos_sep, -1, 1)).max()))


def _separation_deg(a: tuple[float, float], b: tuple[float, float]) -> float:
    ra1, dec1, ra2, dec2 = map(math.radians, (*a, *b))
    cos_sep = math.sin(dec1) * math.sin(dec2) + math.cos(dec1) * math.cos(dec2) * math.cos(ra1 - ra2)
    return math.degrees(math.acos(max(-1.0, min(1.0, cos_sep))))


def plate_solve(stars: StarList, shape: tuple[int, int], hint: tuple[float, float] | None, scale: float | None,
                config: AstrometryConfig = AstrometryConfig()) -> Astrometry:
    """Solve a frame without a WCS from its stars, then check the solution against Tycho-2.

    Parameters
    ----------
    stars : StarList
        Detected stars, brightest first (0-based px).
    shape : tuple of int
        (ny, nx) of the frame (px).
    hint : tuple of float or None
        Pointing (RA, Dec) in deg from the header; None: a blind search.
    scale : float or None
        Pixel scale hint (arcsec/px); None: any scale the index files cover.

    Raises
    ------
    UnsolvableField
        No solution (too few stars, a scale outside 22'-33 deg fields, a wrong scale hint, not a star field).
    PoorAstrometry
        A solution whose residual against the catalogue exceeds ``config.max_residual_arcsec``.
    SolverUnavailable
        solve-field or the index files are not installed.
    """
    if len(stars) < config.min_matches:
        raise UnsolvableField(f"only {len(stars)} stars detected (>= {config.min_matches} needed to plate-solve)")
    header = run_solver(stars, shape, hint, scale, config)
    tried = "around the header's pointing" if hint is not None else "blind"
    if header is None and hint is not None and config.blind_retry:
        header, tried = run_solver(stars, shape, None, scale, config), "around the pointing hint and blind"
    if header is None:
        scale_text = f"{scale:.3g}\"/px" if scale is not None else "any scale"
        used = min(len(stars), config.max_sources)
        raise NoSolution(f"astrometry.net found no solution ({tried}, {scale_text}, {used}"
                         f" stars, {config.cpulimit_s:g} s CPU limit)")
    ra, dec, radius = _centre(header, shape)
    catalog = cone(ra, dec, radius * 1.05, config.index_dir)
    check = check_wcs(header, shape, stars, catalog, config)
    if not check.residual_arcsec <= config.max_residual_px * check.scale_arcsec:
        raise PoorAstrometry(f"plate solution residual {check.residual_arcsec:.2f}\" over {check.n_matched} Tycho-2 "
                             f"stars exceeds {config.max_residual_px:g} px = "
                             f"{config.max_residual_px * check.scale_arcsec:.2f}\"")
    offset = _separation_deg(hint, (ra, dec)) if hint is not None else None
    return Astrometry(header, "solved", check, catalog, offset)


def verify_wcs(header: fits.Header, stars: StarList, shape: tuple[int, int],
               config: AstrometryConfig = AstrometryConfig()) -> Astrometry:
    """Check a header WCS against Tycho-2; refine its reference pixel when it is confirmed.

    A WCS that too few catalogue stars confirm (a small or sparse field, a simulated sky, a wrong
    WCS) is kept with status ``unconfirmed`` and its check; confirmed ones are ``verified`` and
    their ``CRPIX`` moved by the median offset of the matches. Raises :class:`SolverUnavailable`
    only when the index files are missing.
    """
    ra, dec, radius = _centre(header, shape)
    catalog = cone(ra, dec, radius * 1.05, config.index_dir)
    check = check_wcs(header, shape, stars, catalog, config)
    if not verified(check, config):
        return Astrometry(header, "unconfirmed", check, catalog)
    refined = header.copy()
    refined["CRPIX1"] = float(header["CRPIX1"]) + check.offset_px[0]
    refined["CRPIX2"] = float(header["CRPIX2"]) + check.offset_px[1]
    return Astrometry(refined, "verified", check_wcs(refined, shape, stars, catalog, config), catalog)


def astrometry_cards(result: Astrometry) -> list[tuple[str, object, str]]:
    """Header cards that store the astrometric result with the frame."""
    residual = result.check.residual_arcsec
    cards: list[tuple[str, object, str]] = [
        ("WCSSTAT", result.status, "solved / verified / unconfirmed"),
        ("WCSNMAT", result.check.n_matched, "Tycho-2 stars matched to detections"),
        ("WCSNCAT", result.check.n_catalog, "Tycho-2 stars inside the frame"),
        ("WCSRESID", round(residual, 4) if math.isfinite(residual) else -1.0,
         "[arcsec] RMS residual vs Tycho-2 (-1: n/a)"),
    ]
    if result.hint_offset_deg is not None:
        cards.append(("WCSHOFF", round(result.hint_offset_deg, 5), "[deg] solved centre - header pointing hint"))
    return cards
