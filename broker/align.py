"""Registration of a reference image onto a science frame's pixel grid.

Two steps (:func:`align_reference`):

1. **WCS**: reference stars are predicted on the science grid through both WCSs;
2. **stars**: they are matched to science stars (translation vote, then nearest neighbour with a
   radius that allows for a small rotation) and the science->reference pixel map is fitted as an
   affine transform with sigma clipping.

The image is then resampled **once**: when the WCS pixel->pixel map is affine to better than
``affine_tolerance_px`` (any small field with a linear WCS), the fitted affine map is applied with
:func:`scipy.ndimage.affine_transform` (cubic spline). Otherwise (distorted / wide-field WCS)
``reproject.reproject_interp`` does the WCS resampling and the star-fitted correction is applied as
a second affine resampling. NaN pixels never enter a spline: they are zero-filled and carried by a
separately resampled bad-pixel mask.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from broker.distortion import fit_distortion, undistort
from broker.errors import AlignmentError, ConfigError
from broker.stars import StarList

#: A low match fraction is refused only when the matches are fewer than this many times what
#: the same catalogues give by chance (:func:`_chance_matches`): 2-6 of 55 stars under a wrong
#: WCS (tests/broker/test_align.py), against tens under a true one.
CHANCE_FACTOR = 4


@dataclass(frozen=True)
class AlignConfig:
    """Settings of the registration.

    Attributes
    ----------
    match_radius_px : float
        Largest WCS error searched by the translation vote (px, science grid; above 0 and at most
        1024: the vote's histogram has (2 x radius)^2 bins; 4096 px made a simulated 6-frame field 5x
        slower, 1e308 px was a TypeError and inf an OverflowError). 8 px covers the few-pixel
        pointing errors of plate-solved frames with margin.
    max_rotation_deg : float
        Largest WCS rotation error allowed for in the nearest-neighbour radius (deg): 1.5 widens
        the 2 px radius by 2.6 px per 100 px from the frame centre, up to ``match_radius_px``.
    final_radius_px : float
        Matching radius after the first affine fit (px, above 0); 1.5: ~ a FWHM, >> centroid errors
        (0.1 px).
    min_matches : int
        Matched stars needed for a full affine fit (count; 6 = twice the 3 points an affine needs);
        with 2..min_matches-1 only a translation is fitted, with fewer the WCS alone is used.
    require_stars : bool
        True: fewer than 2 matched stars raise :class:`AlignmentError`; False (default): the WCS
        alone is trusted (``n_matched`` says so).
    max_stars : int
        Brightest stars of each catalogue used for matching (count); 200 is ample for the vote
        and the fit, whose cost grows with it. When too few of them match for the WCS to be
        trusted (``min_match_fraction``), every star of both catalogues is matched before the
        frame is refused: the segments of bright satellite trails and cosmic-ray tracks can take
        most of a true WCS's brightest science detections (a simulated frame at 5.7 px seeing
        with two trails: 8 of 200 matched, 17 of all 255 science and 408 reference stars).
    affine_tolerance_px : float
        Largest deviation (px) of the WCS pixel map from an affine map for the one-resampling
        path; 0.02, well below the centroid errors (0.1 px).
    min_overlap : float
        Smallest fraction of the science frame the reference must cover (dimensionless, 0 to 1;
        raise below); 0.2: less leaves too few stars and pixels to subtract.
    clip_sigma : float
        Outlier rejection in the affine fit (sigma of the residuals); 3, the usual clip.
    min_match_fraction : float
        Smallest fraction of the stars both catalogues could share (the fewer of the reference
        stars predicted inside the frame and the science stars, when at least ``4 * min_matches``)
        that must match (dimensionless, 0 to 1; raise below). 0.2: a science frame whose WCS puts another
        sky under the reference (rotated 180 deg by a meridian flip, 30" off, another field)
        matched 2-6 of 55 stars by chance, and trusting its WCS gave 100-200 false candidates;
        a true WCS matches most of them (49-51 of 55 here, 116-143 on MicroObservatory frames).
    distortion_min_stars : int
        Matched stars needed to fit the residual distortion after the affine correction
        (:mod:`broker.distortion`; count); 30 leaves 3 stars per term of a cubic. 0: never.
    distortion_min_gain : float
        The distortion is removed only if, cross-validated, it cuts the stars' RMS residual by at
        least this fraction (dimensionless); 0.25: centroid noise alone never does.
    """

    match_radius_px: float = 8.0
    max_rotation_deg: float = 1.5
    final_radius_px: float = 1.5
    min_matches: int = 6
    require_stars: bool = False
    max_stars: int = 200
    affine_tolerance_px: float = 0.02
    min_overlap: float = 0.2
    clip_sigma: float = 3.0
    min_match_fraction: float = 0.2
    distortion_min_stars: int = 30
    distortion_min_gain: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 < self.match_radius_px <= 1024.0:
            raise ConfigError(f"match_radius_px must be above 0 and at most 1024 px, not {self.match_radius_px}")
        if not self.final_radius_px > 0.0:  # 0 matched no star: every frame refused
            raise ConfigError(f"final_radius_px must be above 0, not {self.final_radius_px}")
        if not (0.0 <= self.min_overlap <= 1.0 and 0.0 <= self.min_match_fraction <= 1.0):
            raise ConfigError(f"min_overlap and min_match_fraction must be 0 to 1, not {self.min_overlap} and "
                              f"{self.min_match_fraction}")


@dataclass
class Alignment:
    """Result of :func:`align_reference`.

    Attributes
    ----------
    image : ndarray, shape (ny, nx), float32
        Reference resampled onto the science grid (ADU, reference scale), NaN where invalid.
    variance : ndarray, shape (ny, nx), float32
        Its variance (ADU^2), NaN where invalid.
    matrix, offset : ndarray, shapes (2, 2) and (2,)
        Affine map science pixel (x, y) -> reference pixel: ``q = matrix @ p + offset``.
    residual_px : float
        RMS distance of matched stars after the fit (px); NaN when none matched.
    residual_xy : tuple of float
        Per-axis RMS residual (px).
    n_matched : int
        Stars used in the final fit.
    sci_index, ref_index : ndarray of int
        Indices of the matched stars in the science and reference catalogues.
    overlap : float
        Fraction of the science frame with valid reference pixels.
    """

    image: np.ndarray
    variance: np.ndarray
    matrix: np.ndarray
    offset: np.ndarray
    residual_px: float
    residual_xy: tuple[float, float]
    n_matched: int
    sci_index: np.ndarray
    ref_index: np.ndarray
    overlap: float

    def to_science(self, xr: np.ndarray, yr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference-grid pixels -> science-grid pixels (inverse of the affine map)."""
        inv = np.linalg.inv(self.matrix)
        p = inv @ (np.vstack([xr, yr]) - self.offset[:, None])
        return p[0], p[1]


def pixel_map(src_wcs: WCS, dst_wcs: WCS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of ``dst_wcs`` -> pixels of ``src_wcs`` through the sky (0-based)."""
    world = dst_wcs.pixel_to_world_values(x, y)
    return src_wcs.world_to_pixel_values(*world)


def fit_affine(src: np.ndarray, dst: np.ndarray, clip_sigma: float = 3.0, iters: int = 3
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares affine ``dst = M @ src + t`` with iterative sigma clipping.

    Parameters
    ----------
    src, dst : ndarray, shape (n, 2)
        Matched (x, y) positions, n >= 3.

    Returns
    -------
    M : (2, 2), t : (2,), keep : (n,) bool
    """
    keep = np.ones(len(src), bool)
    for _ in range(iters):
        a = np.column_stack([src[keep], np.ones(keep.sum())])
        coef, *_ = np.linalg.lstsq(a, dst[keep], rcond=None)
        pred = np.column_stack([src, np.ones(len(src))]) @ coef
        r = np.hypot(*(pred - dst).T)
        s = 1.4826 * np.median(r[keep]) + 1e-3
        new = r < clip_sigma * s
        if new.sum() < 3 or np.array_equal(new, keep):
            break
        keep = new
    return coef[:2].T.copy(), coef[2].copy(), keep


def _vote_translation(pred: np.ndarray, sci: np.ndarray, radius: float) -> np.ndarray | None:
    """Most common offset sci - pred among all pairs closer than ``radius`` (px), or None."""
    tree = cKDTree(pred)
    pairs = tree.query_ball_point(sci, radius)
    offsets = [sci[i] - pred[j] for i, js in enumerate(pairs) for j in js]
    if not offsets:
        return None
    d = np.asarray(offsets)
    nb = int(np.ceil(radius))
    h, xe, ye = np.histogram2d(d[:, 0], d[:, 1], bins=2 * nb, range=[[-nb, nb], [-nb, nb]])
    # smooth the vote a little so a rotation-smeared peak still wins
    h = ndimage.uniform_filter(h, 3, mode="constant")
    i, j = np.unravel_index(np.argmax(h), h.shape)
    c = np.array([(xe[i] + xe[i + 1]) / 2, (ye[j] + ye[j + 1]) / 2])
    near = np.hypot(*(d - c).T) < 2.0
    return np.median(d[near], axis=0) if near.any() else c


def match_stars(sci_xy: np.ndarray, ref_xy_pred: np.ndarray, shape: tuple[int, int],
                config: AlignConfig = AlignConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Match reference stars (predicted on the science grid) to science stars.

    Returns
    -------
    i_sci, i_ref : ndarray of int
        Indices of matched pairs.
    """
    if len(sci_xy) < 2 or len(ref_xy_pred) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    shift = _vote_translation(ref_xy_pred, sci_xy, config.match_radius_px)
    if shift is None:
        return np.zeros(0, int), np.zeros(0, int)
    centre = np.array([shape[1] / 2, shape[0] / 2])
    moved = ref_xy_pred + shift
    tree = cKDTree(moved)
    rot = np.deg2rad(config.max_rotation_deg) * np.hypot(*(sci_xy - centre).T)
    d, j = tree.query(sci_xy, distance_upper_bound=config.match_radius_px)
    ok = np.isfinite(d) & (d < 2.0 + rot)
    i_sci, i_ref = np.flatnonzero(ok), j[ok]
    if len(i_sci) >= 3:
        # refine with an affine fit and re-match tightly
        m, t, keep = fit_affine(ref_xy_pred[i_ref], sci_xy[i_sci])
        moved = ref_xy_pred @ m.T + t
        d, j = cKDTree(moved).query(sci_xy, distance_upper_bound=config.final_radius_px)
        ok = np.isfinite(d)
        i_sci, i_ref = np.flatnonzero(ok), j[ok]
    # one science star per reference star
    _, first = np.unique(i_ref, return_index=True)
    return i_sci[first], i_ref[first]


@dataclass(frozen=True)
class Resampleable:
    """Reference pixels prepared once for repeated resampling onto science grids.

    Attributes
    ----------
    coefficients : ndarray, shape (my, mx), float32
        Cubic-spline coefficients of the image with invalid pixels set to 0
        (:func:`scipy.ndimage.spline_filter`: ~0.1 s of a 2k x 2k warp, paid once per reference).
    variance : ndarray, shape (my, mx), float32
        Variance (ADU^2), 0 where invalid.
    bad : ndarray of bool, shape (my, mx)
        Invalid pixels (NaN image or variance).
    """

    coefficients: np.ndarray
    variance: np.ndarray
    bad: np.ndarray

    @classmethod
    def from_arrays(cls, image: np.ndarray, variance: np.ndarray) -> "Resampleable":
        """Spline coefficients of ``image`` and ``variance`` (NaN-free copies; NaNs marked bad)."""
        bad = ~np.isfinite(image) | ~np.isfinite(variance)
        img = np.where(bad, 0.0, image).astype(np.float32)
        coefficients = ndimage.spline_filter(img, order=3, output=np.float32, mode="constant")
        return cls(coefficients, np.where(bad, 0.0, variance).astype(np.float32), bad)


#: Output row blocks warped concurrently (``ndimage`` releases the GIL): the build machine's cores.
RESAMPLE_THREADS = 2


def _resample(src: Resampleable, matrix_xy: np.ndarray, offset_xy: np.ndarray,
              shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Affine resampling (cubic image, linear variance) with NaNs carried by a mask.

    Each output is warped in ``RESAMPLE_THREADS`` blocks of rows at once; the invalid pixels,
    usually a few hundred cosmic-ray holes and saturated cores, are mapped one by one
    (:func:`_map_bad`) rather than by resampling a frame-wide mask.
    """
    # ndimage works in (row, col): swap axes of the (x, y) affine map
    m = matrix_xy[::-1, ::-1]
    o = offset_xy[::-1]
    out = np.empty(shape, np.float32)
    vout = np.empty(shape, np.float32)
    rows = np.linspace(0, shape[0], RESAMPLE_THREADS + 1).astype(int)

    def warp(a: np.ndarray, dst: np.ndarray, order: int, r0: int, r1: int) -> None:
        # output rows r0:r1 read the input at m @ (row + r0, col) + o
        ndimage.affine_transform(a, m, o + m[:, 0] * r0, output_shape=(r1 - r0, shape[1]),
                                 output=dst[r0:r1], order=order, mode="constant", cval=0.0,
                                 prefilter=False)

    with ThreadPoolExecutor(RESAMPLE_THREADS) as ex:
        jobs = [ex.submit(warp, a, dst, order, r0, r1)
                for a, dst, order in ((src.coefficients, out, 3), (src.variance, vout, 1))
                for r0, r1 in zip(rows[:-1], rows[1:], strict=True)]
        badout = _map_bad(src.bad, matrix_xy, offset_xy, shape)
        for j in jobs:
            j.result()
    out[badout] = np.nan
    vout[badout] = np.nan
    return out, vout


def _map_bad(bad: np.ndarray, matrix_xy: np.ndarray, offset_xy: np.ndarray, shape: tuple[int, int]
             ) -> np.ndarray:
    """Science pixels whose cubic-spline resampling touches an invalid (or outside) reference pixel.

    A cubic spline at reference position q uses the pixels floor(q)-1 .. floor(q)+2, i.e. within
    2 px; the linear map being close to unit scale, every science pixel within 2.5 px of the mapped
    position of an invalid pixel is flagged (what a frame-wide resampled mask grown by one pixel
    reaches, at a fraction of the cost).
    """
    ny, nx = shape
    my, mx = bad.shape
    out = np.zeros(shape, bool)
    # outside the reference: science pixels mapping more than 1 px beyond its edges, row by row
    px = np.arange(nx, dtype=np.float64)
    for row in range(ny):
        qx = matrix_xy[0, 0] * px + matrix_xy[0, 1] * row + offset_xy[0]
        qy = matrix_xy[1, 0] * px + matrix_xy[1, 1] * row + offset_xy[1]
        out[row] = (qx < -1.0) | (qx > mx) | (qy < -1.0) | (qy > my)
    return out | map_mask(bad, matrix_xy, offset_xy, shape)


def map_mask(mask: np.ndarray, matrix_xy: np.ndarray, offset_xy: np.ndarray, shape: tuple[int, int],
             radius: int = 2) -> np.ndarray:
    """Science pixels near where the set pixels of a reference-grid mask land.

    Science pixels within ``radius`` px of where the set pixels of a reference-grid ``mask``
    land (``q = matrix @ p + offset`` maps science p to reference q).

    Returns
    -------
    ndarray of bool, shape ``shape``
    """
    ny, nx = shape
    out = np.zeros(shape, bool)
    ys, xs = np.nonzero(mask)
    if len(ys):
        p = np.linalg.inv(matrix_xy) @ (np.vstack([xs, ys]).astype(np.float64) - offset_xy[:, None])
        cx, cy = np.round(p[0]).astype(int), np.round(p[1]).astype(int)
        for dy in range(-radius, radius + 1):
            y = cy + dy
            oky = (y >= 0) & (y < ny)
            for dx in range(-radius, radius + 1):
                x = cx + dx
                ok = oky & (x >= 0) & (x < nx)
                out[y[ok], x[ok]] = True
    return out


@dataclass(frozen=True)
class _AffineMap:
    """An affine map ``q = matrix @ p + offset`` of pixel (x, y) positions."""

    matrix: np.ndarray
    offset: np.ndarray


@dataclass(frozen=True)
class _StarFit:
    """The star-fitted correction C (predicted science position -> true science position).

    Attributes
    ----------
    correction : _AffineMap
    keep : ndarray of bool, shape (n,), the matched pairs kept by the fit.
    residual_xy : (float, float), per-axis RMS residual (px), NaN when none matched.
    residual : float, RMS distance (px).
    """

    correction: _AffineMap
    keep: np.ndarray
    residual_xy: tuple[float, float]
    residual: float


def _wcs_affine(w_ref: WCS, w_sci: WCS, sci_shape: tuple[int, int]) -> tuple[_AffineMap, float]:
    """The WCS pixel map science -> reference fitted with an affine map, and its largest deviation.

    The WCS pixel map science -> reference sampled on a 17 x 17 grid and fitted with an affine
    map, and the largest deviation of the WCS map from it (px).

    Raises
    ------
    AlignmentError
        The reference WCS cannot map the science grid.
    """
    ny, nx = sci_shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 17), np.linspace(0, ny - 1, 17))
    with np.errstate(all="ignore"):
        qx, qy = pixel_map(w_ref, w_sci, gx.ravel(), gy.ravel())
    if not (np.all(np.isfinite(qx)) and np.all(np.isfinite(qy))):
        raise AlignmentError("the reference WCS cannot map the science grid")
    src = np.column_stack([gx.ravel(), gy.ravel()])
    dst = np.column_stack([qx, qy])
    a = np.column_stack([src, np.ones(len(src))])
    coef, *_ = np.linalg.lstsq(a, dst, rcond=None)
    nonlinear = float(np.max(np.hypot(*(a @ coef - dst).T)))
    return _AffineMap(coef[:2].T.copy(), coef[2].copy()), nonlinear


def _predict_on_science(stars: StarList, wcs_map: _AffineMap, affine_ok: bool, w_ref: WCS, w_sci: WCS
                        ) -> np.ndarray:
    """Reference star positions predicted on the science grid through the WCSs, shape (n, 2) (px)."""
    if affine_ok:
        inv = np.linalg.inv(wcs_map.matrix)
        return (np.vstack([stars.x, stars.y]) - wcs_map.offset[:, None]).T @ inv.T
    with np.errstate(all="ignore"):
        px, py = pixel_map(w_sci, w_ref, stars.x, stars.y)
    return np.column_stack([px, py])


def _fit_correction(pred: np.ndarray, sci: np.ndarray, config: AlignConfig) -> _StarFit:
    """Correction of the WCS prediction from matched star pairs.

    Correction of the WCS prediction from n matched pairs (``pred``, ``sci``: (n, 2) px): an
    affine fit from ``min_matches`` pairs, a translation from 2, none below.
    """
    n = len(sci)
    c_m, c_t = np.eye(2), np.zeros(2)
    keep = np.ones(n, bool)
    if n >= config.min_matches:
        c_m, c_t, keep = fit_affine(pred, sci, config.clip_sigma)
    elif n >= 2:
        c_t = np.median(sci - pred, axis=0)
    if n:
        res = pred @ c_m.T + c_t - sci
        res = res[keep]
        rx, ry = (float(np.sqrt(np.mean(res[:, k] ** 2))) for k in (0, 1))
        resid = float(np.sqrt(rx * rx + ry * ry))
    else:
        rx = ry = resid = float("nan")
    return _StarFit(_AffineMap(c_m, c_t), keep, (rx, ry), resid)


def _without_distortion(fit: _StarFit, pred: np.ndarray, sci: np.ndarray, image: np.ndarray,
                        variance: np.ndarray, config: AlignConfig) -> tuple[_StarFit, np.ndarray, np.ndarray]:
    """The fit and the aligned image, with the stars' residual distortion removed when it is worth it.

    ``pred``, ``sci`` (n, 2): the matched pairs (WCS prediction, science position, px). The
    distortion is fitted on the pairs the affine fit kept (:func:`broker.distortion.fit_distortion`);
    when it is kept, the image is resampled once more (:func:`broker.distortion.undistort`) and the
    fit's residuals become those after it (they set ZOGY's astrometric noise).
    """
    if config.distortion_min_stars <= 0 or len(sci) == 0:
        return fit, image, variance
    c = fit.correction
    xy, d = sci[fit.keep], (sci - (pred @ c.matrix.T + c.offset))[fit.keep]
    distortion = fit_distortion(xy, d, image.shape, min_stars=config.distortion_min_stars,
                                min_gain=config.distortion_min_gain)
    if distortion is None:
        return fit, image, variance
    image, variance = undistort(image, variance, distortion)
    res = d - np.column_stack(distortion.at(xy[:, 0], xy[:, 1]))
    rx, ry = (float(np.sqrt(np.mean(res[:, k] ** 2))) for k in (0, 1))
    return _StarFit(c, fit.keep, (rx, ry), float(np.hypot(rx, ry))), image, variance


def _resample_onto_science(ref_image: np.ndarray, ref_variance: np.ndarray, w_ref: WCS, w_sci: WCS,
                           sci_shape: tuple[int, int], wcs_map: _AffineMap, affine_ok: bool,
                           correction: _AffineMap, prepared: Resampleable | None
                           ) -> tuple[np.ndarray, np.ndarray, _AffineMap]:
    """Reference image and variance resampled onto the science grid, and the affine map used.

    Reference image and variance on the science grid, and the science -> reference affine map
    ``q = W(C^-1(p))`` (W the WCS map, C the star-fitted correction; an affine approximation of it
    when the WCS map is not affine).
    """
    c_inv = np.linalg.inv(correction.matrix)
    m = wcs_map.matrix @ c_inv
    t = wcs_map.offset - wcs_map.matrix @ c_inv @ correction.offset
    if affine_ok:
        image, variance = _resample(prepared or Resampleable.from_arrays(ref_image, ref_variance),
                                    m, t, sci_shape)
        return image, variance, _AffineMap(m, t)
    from reproject import reproject_interp

    bad = ~np.isfinite(ref_image)
    img, _ = reproject_interp((np.where(bad, 0.0, ref_image), w_ref), w_sci, shape_out=sci_shape,
                              order="bicubic")
    var, _ = reproject_interp((np.nan_to_num(ref_variance), w_ref), w_sci, shape_out=sci_shape,
                              order="bilinear")
    bmask, _ = reproject_interp((bad.astype(float), w_ref), w_sci, shape_out=sci_shape,
                                order="bilinear")
    img[~(bmask < 1e-3)] = np.nan
    ident_t = -c_inv @ correction.offset
    image, variance = _resample(Resampleable.from_arrays(img, var), c_inv, ident_t, sci_shape)
    return image, variance, _AffineMap(m, t)


def _chance_matches(sci_xy: np.ndarray, ref_xy_pred: np.ndarray, shape: tuple[int, int],
                    config: AlignConfig) -> int:
    """Stars matched when the science catalogue is turned 180 deg about the frame centre (count).

    What the matcher finds in these two catalogues by chance: the turn keeps their densities and
    structure (a satellite's knots, a cluster) and destroys any true correspondence.
    """
    turned = np.array([shape[1] - 1.0, shape[0] - 1.0]) - sci_xy
    return len(match_stars(turned, ref_xy_pred, shape, config)[0])


def _check_match_fraction(n_matched: int, n_ref_inside: int, n_sci: int, config: AlignConfig,
                          chance: Callable[[], int]) -> None:
    """Raise :class:`AlignmentError` when rich catalogues share too few stars for the WCS to be true.

    Too few: under ``min_match_fraction`` of the stars both could share, and not clearly more
    than chance gives (under :data:`CHANCE_FACTOR` times ``chance()``, or under twice
    ``min_matches``). The second test keeps a true WCS whose science catalogue is crowded by
    non-stars: a glinting satellite's knots took 90 of a frame's 200 brightest detections and
    left 39 of 200 matched.

    Parameters
    ----------
    n_matched : int
        Stars matched (count).
    n_ref_inside, n_sci : int
        Reference stars the WCS predicts inside the science frame, and science stars (count).
    config : AlignConfig
        ``min_matches`` and ``min_match_fraction``.
    chance : callable
        Stars matched by chance (:func:`_chance_matches`); called only when the fraction is low.
    """
    shared = min(n_ref_inside, n_sci)
    if shared >= 4 * config.min_matches and n_matched < config.min_match_fraction * shared \
            and n_matched < max(CHANCE_FACTOR * chance(), 2 * config.min_matches):
        raise AlignmentError(f"only {n_matched} of {shared} stars matched between reference and science "
                             f"(at least {config.min_match_fraction:.0%} required): the science WCS does not put "
                             "the reference's sky under its stars (wrong, rotated or flipped WCS, another field)")


@dataclass(frozen=True)
class _StarPairs:
    """Reference stars predicted on the science grid, science star positions, and their matches."""

    pred: np.ndarray
    sci_xy: np.ndarray
    i_sci: np.ndarray
    i_ref: np.ndarray

    @classmethod
    def matched(cls, ref_stars: StarList, sci_stars: StarList, n: int | None, wcs_map: _AffineMap,
                affine_ok: bool, w_ref: WCS, w_sci: WCS, sci_shape: tuple[int, int],
                config: AlignConfig) -> _StarPairs:
        """The ``n`` brightest stars of each catalogue (None: all) matched, and checked.

        Raises
        ------
        AlignmentError
            Too few of them match for the WCS to be trusted (:func:`_check_match_fraction`).
        """
        ny, nx = sci_shape
        rs, ss = ref_stars.subset(slice(0, n)), sci_stars.subset(slice(0, n))
        pred = _predict_on_science(rs, wcs_map, affine_ok, w_ref, w_sci)
        inside = np.all(np.isfinite(pred), axis=1) & (pred[:, 0] > -5) & (pred[:, 0] < nx + 5) \
            & (pred[:, 1] > -5) & (pred[:, 1] < ny + 5)
        sci_xy = np.column_stack([ss.x, ss.y])
        i_sci, i_ref_in = match_stars(sci_xy, pred[inside], sci_shape, config)
        _check_match_fraction(len(i_sci), int(inside.sum()), len(ss), config,
                              lambda: _chance_matches(sci_xy, pred[inside], sci_shape, config))
        return cls(pred, sci_xy, i_sci, np.flatnonzero(inside)[i_ref_in])


def align_reference(
    ref_image: np.ndarray,
    ref_variance: np.ndarray,
    ref_header: fits.Header,
    ref_stars: StarList,
    sci_header: fits.Header,
    sci_shape: tuple[int, int],
    sci_stars: StarList,
    config: AlignConfig = AlignConfig(),
    prepared: Resampleable | None = None,
) -> Alignment:
    """Resample a reference onto a science grid: WCS first, refined by matched stars.

    Parameters
    ----------
    ref_image, ref_variance : ndarray, shape (my, mx)
        Reference pixels (ADU) and variance (ADU^2), NaN where invalid.
    ref_header, sci_header : fits.Header
        Headers with celestial WCS.
    ref_stars, sci_stars : StarList
        Catalogues on their own grids (brightest first).
    sci_shape : (ny, nx)
    prepared : Resampleable, optional
        ``ref_image`` and ``ref_variance`` already prepared (a reference used for many frames).

    Raises
    ------
    AlignmentError
        The reference covers less than ``min_overlap`` of the frame, the WCS cannot map one grid onto
        the other, fewer than ``min_match_fraction`` of the stars both could share match (the
        brightest ``max_stars``, then all) and not clearly more than chance, or
        (``require_stars``) no star matches.
    """
    from broker.frame import celestial_wcs  # late import: frame imports nothing from here

    try:
        w_ref, w_sci = celestial_wcs(ref_header), celestial_wcs(sci_header)
    except Exception as exc:
        raise AlignmentError(f"unusable WCS: {exc}") from exc
    wcs_map, nonlinear = _wcs_affine(w_ref, w_sci, sci_shape)
    affine_ok = nonlinear < config.affine_tolerance_px
    try:
        pairs = _StarPairs.matched(ref_stars, sci_stars, config.max_stars, wcs_map, affine_ok, w_ref, w_sci,
                                   sci_shape, config)
    except AlignmentError:
        if len(ref_stars) <= config.max_stars and len(sci_stars) <= config.max_stars:
            raise
        pairs = _StarPairs.matched(ref_stars, sci_stars, None, wcs_map, affine_ok, w_ref, w_sci, sci_shape, config)
    pred, sci_xy, i_sci, i_ref = pairs.pred, pairs.sci_xy, pairs.i_sci, pairs.i_ref
    n = len(i_sci)
    if n < 2 and config.require_stars:
        raise AlignmentError(f"only {n} stars matched between reference and science")
    fit = _fit_correction(pred[i_ref], sci_xy[i_sci], config)
    image, variance, sci_to_ref = _resample_onto_science(ref_image, ref_variance, w_ref, w_sci, sci_shape,
                                                         wcs_map, affine_ok, fit.correction, prepared)
    fit, image, variance = _without_distortion(fit, pred[i_ref], sci_xy[i_sci], image, variance, config)
    overlap = float(np.isfinite(image).mean())
    if overlap < config.min_overlap:
        raise AlignmentError(f"reference covers only {100 * overlap:.1f}% of the frame")
    keep = fit.keep
    return Alignment(image, variance, sci_to_ref.matrix, sci_to_ref.offset, fit.residual, fit.residual_xy,
                     int(keep.sum()) if n else 0, i_sci[keep] if n else i_sci, i_ref[keep] if n else i_ref,
                     overlap)
