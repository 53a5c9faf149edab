"""Images the portal serves: display-scaled PNGs of cutouts and frames, FITS cutouts, triplets, attributions.

Blocking (matplotlib, astropy, torch): called in the portal's thread pool. pyplot is not thread-safe,
so the figures of :func:`triplet_png` and :func:`attribution_png` are drawn one at a time.
"""

from __future__ import annotations

import io
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import CutoutError, DecodeError, InvalidFrame, ModelError, NotFound, Unavailable
from broker.frame import inflate
from streams.triplet_png import read_cutout, save_triplet_png
from streams.web.records import CUTOUT_FIELDS

#: Largest side of a frame PNG (pixels): a larger frame is binned down (its candidates' x, y scale with it).
MAX_FRAME_SIDE = 1024
#: Largest decompressed FITS cutout served (bytes): a stamp is ~16 kB; this refuses a forged one.
MAX_CUTOUT_BYTES = 4 * 1024 * 1024
#: Colour of masked (NaN) pixels: dark, distinct from the sky without glaring on a night-time screen.
MASKED_RGB = (70, 30, 40)
_PYPLOT = threading.Lock()
#: A model version as an alert names it (``scores.rb_model``): a bare name of the shipped models, never a path.
MODEL_VERSION = re.compile(r"\w[\w.+-]{0,99}", re.ASCII)


def _scaled(data: np.ndarray, diverging: bool) -> tuple[np.ndarray, float, float]:
    """Pixels in [0, 1] on a dark-sky stretch.

    Sky = median, sigma = 1.4826 MAD of the finite pixels. A science or reference image runs from
    sky - 1 sigma to max(sky + 30 sigma, its 99.5 %), asinh-compressed so that faint sources show
    beside bright ones and the sky stays dark; a difference image runs symmetrically over
    +-max(8 sigma, its 99.5 % |value|), so that noise is a dim grey and sources stand out.
    """
    finite = data[np.isfinite(data)]
    if not finite.size:
        raise CutoutError("every pixel is masked (NaN)")
    sky = float(np.median(finite))
    sigma = 1.4826 * float(np.median(np.abs(finite - sky))) or float(np.std(finite)) or 1.0
    with np.errstate(invalid="ignore"):
        if diverging:
            half = max(8.0 * sigma, float(np.percentile(np.abs(finite - sky), 99.5)))
            return np.clip((data - sky) / (2 * half) + 0.5, 0, 1), 0.0, 1.0
        lo, hi = sky - sigma, max(sky + 30.0 * sigma, float(np.percentile(finite, 99.5)))
        soft = 10.0  # asinh softening: linear over the first tenth of the range, logarithmic beyond
        return np.arcsinh(np.clip((data - lo) / (hi - lo), 0, 1) * soft) / np.arcsinh(soft), 0.0, 1.0


def image_png(data: np.ndarray, diverging: bool) -> bytes:
    """An 8-bit grey-scale PNG of a 2-D image, row 0 at the bottom (as stored); masked (NaN) pixels dark red."""
    from PIL import Image

    arr, lo, hi = _scaled(np.asarray(data, dtype=np.float32), diverging)
    with np.errstate(invalid="ignore"):
        grey = np.clip((arr - lo) / (hi - lo) * 255.0, 0, 255)
    masked = ~np.isfinite(arr)
    pixels = np.where(masked, 0, grey).astype(np.uint8)[::-1]
    if masked.any():
        rgb = np.repeat(pixels[..., None], 3, axis=2)
        rgb[masked[::-1]] = MASKED_RGB
        image = Image.fromarray(rgb, "RGB")
    else:
        image = Image.fromarray(pixels, "L")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def binned(data: np.ndarray, max_side: int = MAX_FRAME_SIDE) -> np.ndarray:
    """``data`` averaged in square blocks so that its longer side is at most ``max_side`` (NaN-aware)."""
    factor = int(np.ceil(max(data.shape) / max_side))
    if factor <= 1:
        return np.asarray(data, dtype=np.float32)
    ny, nx = (s // factor * factor for s in data.shape)
    blocks = np.asarray(data[:ny, :nx], dtype=np.float32).reshape(ny // factor, factor, nx // factor, factor)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(blocks)
        total = np.where(finite, blocks, 0.0).sum(axis=(1, 3))
        count = finite.sum(axis=(1, 3))
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _stamp(record: dict, kind: str) -> bytes:
    """The stamp bytes of cutout ``kind`` of an alert. NotFound for an unknown kind or a missing stamp."""
    field = CUTOUT_FIELDS.get(kind)
    if field is None:
        raise NotFound(f"no cutout {kind!r}; one of {list(CUTOUT_FIELDS)}")
    stamp = (record.get(field) or {}).get("stampData")
    if not stamp:
        raise NotFound(f"alert {record.get('alertId')} has no {kind} cutout")
    return bytes(stamp)


def cutout_png(record: dict, kind: str) -> bytes:
    """The PNG of one cutout of an alert (the difference on a scale symmetric about zero)."""
    try:
        cut = read_cutout(_stamp(record, kind))
    except DecodeError as exc:
        raise CutoutError(f"the {kind} cutout cannot be read: {exc}") from exc
    return image_png(cut.data, diverging=kind == "difference")


def cutout_fits(record: dict, kind: str) -> bytes:
    """The FITS file of one cutout of an alert (decompressed from its gzip)."""
    raw = _stamp(record, kind)
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return inflate(raw, MAX_CUTOUT_BYTES)
    except InvalidFrame as exc:
        raise CutoutError(f"the {kind} cutout cannot be inflated: {exc}") from exc


def triplet_png(record: dict) -> bytes:
    """The science / reference / difference PNG of ``broker subscribe --png`` (:mod:`streams.triplet_png`)."""
    with tempfile.TemporaryDirectory(prefix="portal-") as tmp, _PYPLOT:
        return save_triplet_png(record, Path(tmp) / "triplet.png").path.read_bytes()


def load_classifier(version: str | None) -> Any:
    """The real/bogus classifier of ``version`` (its default without one).

    ``version`` comes from the alert, so it is only looked up by name among the shipped models
    (``broker/models``): :meth:`~broker.realbogus.RealBogusClassifier.load` would also take a path.

    Raises
    ------
    ModelError
        ``version`` is not a bare version name (a path, a file name), or names no model (HTTP 503).
    Unavailable
        No torch.
    """
    if version is not None and (not MODEL_VERSION.fullmatch(version) or version.endswith((".pt", ".json"))):
        raise ModelError(f"the alert's real/bogus model {version[:80]!r} is not a model version name")
    try:
        from broker.realbogus import RealBogusClassifier
    except ImportError as exc:
        raise Unavailable("attribution maps need torch: pip install 'transient-broker[classify]'") from exc
    return RealBogusClassifier.load(version)


def attribution_png(record: dict, classifier: Any, steps: int = 64) -> bytes:
    """The integrated-gradients attribution map of an alert's real/bogus score (``broker explain``)."""
    try:
        from broker.explain import ExplainConfig, explain_cutouts, plot_explanation
        from broker.normalise import alert_triplet
    except ImportError as exc:
        raise Unavailable("attribution maps need torch: pip install 'transient-broker[classify]'") from exc
    sci, ref, diff = alert_triplet(record)
    explanation = explain_cutouts(classifier, sci, ref, diff, ExplainConfig(steps=steps))
    with tempfile.TemporaryDirectory(prefix="portal-") as tmp, _PYPLOT:
        title = f"{record.get('objectId', '')} {record.get('candid', '')}"
        return plot_explanation(explanation, Path(tmp) / "attribution.png", title).read_bytes()
