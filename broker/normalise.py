"""Cutout triplets as the real/bogus network sees them, without torch.

:func:`normalise_triplet` turns a science/reference/difference triplet (ours, or a real ZTF one,
possibly cut short at a CCD edge or holding NaNs) into the fixed ``(3, 63, 63)`` float32 input of
the network (:class:`NormaliseConfig`, :class:`NormFlags`). The same function is used for
training, inference and for real ZTF stamps, so a model never sees data scaled differently from
what it was trained on. :func:`decode_stamp` and :func:`alert_triplet` read the stamps of an
alert packet (ZTF's or ours) into such a triplet.

Only numpy (and astropy for FITS stamps): the training-set generator, which runs in worker
processes, and the stream stages import this without loading torch
(:mod:`broker.realbogus` holds the network).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from broker.candidate import CUTOUT_SIZE
from broker.errors import ConfigError, CutoutError, InvalidFrame

#: Largest decompressed stamp read (bytes): a 63 x 63 float32 stamp is ~20 kB, a Rubin one with its
#: variance and PSF planes ~50 kB; this refuses a decompression bomb before it takes the memory.
MAX_STAMP_BYTES = 16 * 1024 * 1024
#: Pixel values at least this large in magnitude are fill sentinels, not data (:func:`fill_pixels`).
FILL_MAGNITUDE = 1e30
#: The cutout fields of an alert packet, in the order (science, reference, difference).
STAMP_FIELDS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


@dataclass(frozen=True)
class NormaliseConfig:
    """How a triplet is scaled before the network sees it.

    Attributes
    ----------
    min_side : int
        Smallest accepted side of a cutout, px. Default 16: ZTF stamps cut at a CCD edge go down
        to ~40 px in the sample alerts; below ~16 px the candidate's neighbourhood is mostly gone.
    soft_knee : float
        Scaled value ``k`` (robust sigma) beyond which the response becomes logarithmic:
        ``y = k * asinh(z / k)``. Default 5: linear around the detection threshold, so noise and
        faint sources keep their shape, while a 1e4-sigma star does not saturate the inputs.
    clip : float
        Final clip of the scaled values (units of ``y``; ``z = k sinh(clip / k)``). Default 60
        (``realbogus-v11``; ``realbogus-v10`` was trained with 30), i.e. ``z`` = 4e5 sigma with
        ``soft_knee = 5``: above every star of the simulated frames and of the public ZTF
        stamps, so the brightness of a reference source, which tells a change of a few % of a
        star from a subtraction residual, is kept (why 30 was raised:
        ``docs/notes/training-settings.md``). A model clamps its input to its own ``clip``
        (:meth:`~broker.realbogus.RealBogusClassifier.model_input`), so triplets normalised with
        a larger one give it exactly its own input.
    min_sigma : float
        Floor of the robust sigma (input units) to avoid dividing by 0 on constant cutouts.
        Default 1e-6.
    blank_fill : bool
        Read fill values as missing, like NaN (:func:`fill_pixels`: sentinels such as -3.4e38,
        blocks of exact zeros): scaled as data they become a block far below the sky that no
        training stamp has (our pipeline leaves such pixels NaN). A channel that would keep
        under a quarter of its pixels is left as it is. Default True.
    """

    min_side: int = 16
    soft_knee: float = 5.0
    clip: float = 60.0
    min_sigma: float = 1e-6
    blank_fill: bool = True

    def __post_init__(self) -> None:
        vals = (self.min_side, self.soft_knee, self.clip, self.min_sigma)
        if not all(isinstance(v, (int, float)) and np.isfinite(v) and v > 0 for v in vals):
            raise ConfigError(f"NormaliseConfig values must be finite and > 0, got {self}")


@dataclass(frozen=True)
class NormFlags:
    """What :func:`normalise_triplet` had to repair.

    Attributes
    ----------
    n_nan : tuple of int
        Non-finite (or masked) pixels per channel (science, reference, difference) in the input,
        before padding.
    n_pad : int
        Pixels added per channel to pad a short cutout to 63x63.
    input_shape : tuple of int
        Shape (ny, nx) of the input cutouts.
    n_clipped : int
        Pixels clipped at ``NormaliseConfig.clip`` (all channels).
    """

    n_nan: tuple[int, int, int]
    n_pad: int
    input_shape: tuple[int, int]
    n_clipped: int

    @property
    def repaired(self) -> bool:
        """True when NaNs were filled or padding was added."""
        return self.n_pad > 0 or any(self.n_nan)


def _pad_offsets(shape: tuple[int, int], absdiff: np.ndarray) -> tuple[int, int]:
    """Pixels to pad before (y, x) so that the candidate lands at the centre of 63x63.

    A square stamp is centred on its candidate (pixel ``n // 2``): every survey cuts its stamps
    around the candidate, smaller than ours where it chose so (DECam's 51 px, ATLAS's and Palomar
    Gattini-IR's 61 px, Rubin's 30-41 px); that pixel lands at 31.

    A stamp with a short side was cut at a CCD edge (ZTF): it keeps the candidate where it is in
    the nominal 63 px stamp, so the missing pixels of each short axis are either all before or
    all after it: the candidate is at index 31 or at 31 - missing. Of these (up to 4) placements
    we take the one with the strongest |difference| within 2 px, i.e. where a source was detected.
    """
    if shape[0] == shape[1]:
        y0 = CUTOUT_SIZE // 2 - shape[0] // 2
        return y0, y0
    opts = [[0] if n >= CUTOUT_SIZE else [0, CUTOUT_SIZE - n] for n in shape]
    c = CUTOUT_SIZE // 2
    best, best_v = (opts[0][0], opts[1][0]), -np.inf
    for y0 in opts[0]:
        for x0 in opts[1]:
            cy, cx = c - y0, c - x0  # candidate index inside the short stamp
            box = absdiff[max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3]
            v = np.nanmax(box) if box.size and np.isfinite(box).any() else -np.inf
            if v > best_v:
                best, best_v = (y0, x0), v
    return best


#: dtype kinds a cutout may have: bool, signed and unsigned integers, floats, and objects holding
#: numbers (a list of lists); complex, date, time and string stamps are refused.
_NUMERIC_KINDS = "biufO"


def _checked(name: str, a: object) -> np.ndarray:
    """``a`` as an array, not yet converted (no copy of an array), after its kind and rank are checked.

    Raises
    ------
    CutoutError
        Not 2-D, or of a dtype whose values are not real numbers.
    """
    try:
        arr = a if isinstance(a, np.ndarray) else np.asarray(a)
    except (TypeError, ValueError) as exc:
        raise CutoutError(f"{name} cutout is not an array: {exc}") from exc
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise CutoutError(f"{name} cutout is not real numbers (dtype {arr.dtype})")
    if arr.ndim != 2:
        raise CutoutError(f"{name} cutout must be 2-D, got shape {arr.shape}")
    return arr


def _as_float(name: str, arr: np.ndarray) -> np.ndarray:
    """A checked cutout (:func:`_checked`) as float64, NaN at the masked pixels of a masked array.

    Returns
    -------
    ndarray, shape (ny, nx), float64
    """
    try:
        if isinstance(arr, np.ma.MaskedArray):  # np.asarray would keep the values under the mask
            return np.ma.filled(arr.astype(np.float64), np.nan)
        return np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CutoutError(f"{name} cutout is not numeric: {exc}") from exc


def normalise_triplet(
    sci: np.ndarray,
    ref: np.ndarray,
    diff: np.ndarray,
    config: NormaliseConfig = NormaliseConfig(),
) -> tuple[np.ndarray, NormFlags]:
    """Scale a cutout triplet robustly, per channel, into the network's input.

    Each channel is centred on its median and divided by its robust sigma (1.4826 * MAD), then
    compressed softly (``k * asinh(z / k)``) and clipped. NaNs (pixels outside the frame), fill
    values (:func:`fill_pixels`) and padding become 0, i.e. the channel's median. A short cutout
    (e.g. 48x63 from a ZTF CCD edge) is padded to 63x63 with the candidate kept at the centre; a
    smaller square one (another survey's stamp, e.g. DECam's 51x51) is centred
    (:func:`_pad_offsets`).

    Parameters
    ----------
    sci, ref, diff : ndarray, shape (ny, nx), ny and nx in [min_side, 63]
        Science, reference and difference cutouts, same shape, any float/int dtype, centred on the
        candidate.
    config : NormaliseConfig

    Returns
    -------
    triplet : ndarray, shape (3, 63, 63), float32
        Scaled channels: science, reference, difference. Finite, in [-clip, clip].
    flags : NormFlags

    Raises
    ------
    CutoutError
        Not 2-D, shapes differ, a side over 63 or under ``min_side``, not real numbers (strings,
        complex, dates), or a channel entirely non-finite. The shape is checked before any pixel
        is converted, so a huge stamp costs no memory.
    """
    raw = [_checked(name, a) for name, a in (("science", sci), ("reference", ref), ("difference", diff))]
    shape = raw[0].shape
    if any(c.shape != shape for c in raw):
        raise CutoutError(f"cutout shapes differ: {[c.shape for c in raw]}")
    ny, nx = shape
    if max(ny, nx) > CUTOUT_SIZE:
        raise CutoutError(f"cutout {ny}x{nx} has a side over {CUTOUT_SIZE} px")
    if min(ny, nx) < config.min_side:
        raise CutoutError(f"cutout {ny}x{nx} has a side under {config.min_side} px")
    chans = [_as_float(name, a) for name, a in zip(("science", "reference", "difference"), raw, strict=True)]

    finite = [np.isfinite(c) for c in chans]
    if config.blank_fill:
        finite = [f & ~fill_pixels(c) for c, f in zip(chans, finite, strict=True)]
    n_nan = tuple(int(c.size - f.sum()) for c, f in zip(chans, finite, strict=True))
    for name, f in zip(("science", "reference", "difference"), finite, strict=True):
        if not f.any():
            raise CutoutError(f"{name} cutout is entirely NaN/non-finite")

    out = np.zeros((3, CUTOUT_SIZE, CUTOUT_SIZE), dtype=np.float64)
    n_clipped = 0
    y0, x0 = _pad_offsets(shape, np.where(finite[2], np.abs(chans[2]), np.nan))
    k = config.soft_knee
    for i, (c, f) in enumerate(zip(chans, finite, strict=True)):
        vals = c[f]
        med = float(np.median(vals))
        sigma = 1.4826 * float(np.median(np.abs(vals - med)))
        if not sigma > config.min_sigma:
            # Mostly-constant cutout (e.g. saturated core, zeroed template): fall back to the std.
            sigma = max(float(np.std(vals)), config.min_sigma)
        z = np.where(f, (c - med) / sigma, 0.0)
        y = k * np.arcsinh(z / k)
        n_clipped += int(np.count_nonzero(np.abs(y) > config.clip))
        out[i, y0 : y0 + ny, x0 : x0 + nx] = np.clip(y, -config.clip, config.clip)
    flags = NormFlags(
        n_nan=n_nan,  # type: ignore[arg-type]
        n_pad=CUTOUT_SIZE * CUTOUT_SIZE - ny * nx,
        input_shape=(ny, nx),
        n_clipped=n_clipped,
    )
    return out.astype(np.float32), flags


def fill_pixels(channel: np.ndarray) -> np.ndarray:
    """Pixels of ``channel`` that are fill, not data.

    Fill is a sentinel of magnitude at least :data:`FILL_MAGNITUDE` (ZTF fills some masked
    reference strips with -3.4e38, float32's lowest value) or an exact zero in a block of at
    least 3 x 3 (scattered zeros, an integer stamp's noise, never fill such a box). A fill that
    would leave under a quarter of the finite pixels (an all-zero template) is not reported.

    Parameters
    ----------
    channel : ndarray, shape (ny, nx), float

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    fill = np.abs(channel) >= FILL_MAGNITUDE  # NaN compares False
    zero = channel == 0
    n_zero = np.count_nonzero(zero)
    if n_zero < 9 and not fill.any():  # the usual stamp: nothing more to look at (~5 us)
        return fill
    if n_zero >= 9:
        from scipy import ndimage

        box = np.ones((3, 3), bool)
        fill |= ndimage.binary_dilation(ndimage.binary_erosion(zero, box, border_value=1), box) & zero
    if np.isfinite(channel).sum() - fill.sum() < 0.25 * channel.size:
        return np.zeros(channel.shape, bool)
    return fill


def decode_stamp(data: bytes) -> np.ndarray:
    """Pixels of one ZTF-style cutout ``stampData``: gzipped FITS or plain FITS.

    Parameters
    ----------
    data : bytes
        The stamp bytes of an alert packet.

    Returns
    -------
    ndarray, shape (ny, nx), float32

    Raises
    ------
    CutoutError
        JPEG-era stamps (early ZTF packets), empty or unreadable bytes, no image HDU, a gzip
        stream that is corrupt, cut short or inflates beyond :data:`MAX_STAMP_BYTES`.
    """
    from astropy.io import fits

    from broker.frame import check_structure

    if not data:
        raise CutoutError("empty stamp")
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data)
    if data[:3] == b"\xff\xd8\xff":
        raise CutoutError("JPEG stamp (early ZTF packets): pixel values are lost, not usable")
    if data[:6] != b"SIMPLE":
        raise CutoutError(f"stamp is not FITS (starts with {data[:8]!r})")
    try:
        # ZTF stamps have a slightly non-standard SIMPLE card: astropy warns on every read.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_structure(data)
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                image = next((d for d in (getattr(hdu, "data", None) for hdu in hdul) if d is not None), None)
                pixels = None if image is None else np.asarray(image, dtype=np.float32)
    except Exception as exc:  # astropy raises many kinds on a corrupt header (KeyError, AttributeError, ...)
        raise CutoutError(f"unreadable FITS stamp: {type(exc).__name__}: {exc}") from exc
    if pixels is None:
        raise CutoutError("FITS stamp has no image data")
    if pixels.ndim != 2:
        raise CutoutError(f"FITS stamp is not a 2-D image (shape {pixels.shape})")
    return pixels


def _gunzip(data: bytes) -> bytes:
    """The content of a gzip stamp, at most :data:`MAX_STAMP_BYTES` (:func:`broker.frame.inflate`).

    Raises
    ------
    CutoutError
        Corrupt or truncated gzip, or content over :data:`MAX_STAMP_BYTES` (a decompression bomb).
    """
    from broker.frame import inflate

    try:
        return inflate(data, MAX_STAMP_BYTES)
    except InvalidFrame as exc:
        raise CutoutError(f"gzip stamp: {exc}") from exc


def stamp_bytes(record: dict, field: str) -> bytes:
    """The stamp bytes of cutout ``field`` of a packet; ``b""`` where it has none.

    ZTF's packets and ours hold a record ``{"fileName", "stampData"}``; Rubin's, Palomar
    Gattini-IR's and WINTER's hold the bytes themselves.

    Raises
    ------
    CutoutError
        The field holds something else (a string, a number).
    """
    value = record.get(field)
    if isinstance(value, dict):
        value = value.get("stampData")
    if value is None:
        return b""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CutoutError(f"{field} is a {type(value).__name__}, not stamp bytes")
    return bytes(value)


def alert_triplet(record: dict) -> list[np.ndarray]:
    """(science, reference, difference) pixels of an alert packet (ZTF's, Rubin's or ours).

    The difference is science minus reference, the convention of our pipeline and training set.

    ZTF makes a fading candidate on the negative subtraction (reference minus science), flags it
    ``isdiffpos = 'f'`` (``'0'`` in old packets) and cuts its difference stamp from that image:
    the source is positive there. Such a stamp is negated here; scored as it comes, a fading
    looks like a brightening to a model trained on science minus reference (all 321 ZTF
    fadings in ``../shared/data/ztf_alerts`` have a positive centre). Our packets' ``isdiffpos``
    is a boolean and their difference is always science minus reference, as is Rubin's (a fading
    is a negative source there, ``diaSource.isNegative``).

    Raises
    ------
    CutoutError
        A stamp :func:`decode_stamp` cannot use.
    """
    trip = []
    for field in STAMP_FIELDS:
        data = stamp_bytes(record, field)
        if not data:
            raise CutoutError(f"no {field} stamp in the packet (empty stamp)")
        trip.append(decode_stamp(data))
    if ztf_negative_subtraction(record):
        trip[2] = -trip[2]
    return trip


def ztf_negative_subtraction(record: dict) -> bool:
    """Whether an alert packet is a ZTF fading: ``isdiffpos`` the string ``'f'`` or ``'0'``."""
    cand = record.get("candidate")
    flag = cand.get("isdiffpos") if isinstance(cand, dict) else None
    return isinstance(flag, str) and flag.strip().lower() in ("f", "0")
