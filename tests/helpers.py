"""Small seeded builders shared by the tests."""

from __future__ import annotations

import errno
import gzip
import io
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from broker.candidate import CUTOUT_SIZE, Candidate, Detection
from broker.frame import Frame, meta_from_header


def header(shape=(256, 256), ra=150.0, dec=2.0, scale_arcsec=1.0, **cards) -> fits.Header:
    """A TAN-WCS header with the cards a frame needs (overridable)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cdelt = [-scale_arcsec / 3600, scale_arcsec / 3600]
    h = w.to_header()
    h.update({"TELESCOP": "TEST", "FIELD": "F1", "FILTER": "r", "MJD-OBS": 60000.5, "EXPTIME": 30.0,
              "GAIN": 2.0, "RDNOISE": 5.0, "SATURATE": 60000.0, "MAGZP": 27.0, "FRAMEID": "TEST-F1-r-0001"})
    h.update(cards)
    return h


def star_frame(shape=(256, 256), n_stars=40, fwhm=3.0, sky=500.0, seed=0, **cards) -> Frame:
    """Gaussian stars on a flat sky with Poisson noise (ADU = e-/gain)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, sky, dtype=float)
    s = fwhm / 2.3548
    for x, y, f in zip(rng.uniform(10, shape[1] - 10, n_stars), rng.uniform(10, shape[0] - 10, n_stars),
                       10 ** rng.uniform(3.5, 5.0, n_stars), strict=True):
        img += f / (2 * np.pi * s * s) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
    data = rng.poisson(img).astype(np.float32)
    h = header(shape, **cards)
    return Frame(meta_from_header(h), data, h)


def trailed_frame(frame: Frame, fwhm: float, adu_per_px: float, lines, seed=0) -> Frame:
    """``frame`` crossed by satellite trails (x0, y0, x1, y1) of the seeing's width, with their photon noise."""
    from broker.simulate.render import line_profile

    data, rng = frame.data.copy(), np.random.default_rng(seed)
    for x0, y0, x1, y1 in lines:
        flat, values = line_profile(data.shape, x0, y0, x1, y1, fwhm / 2.3548, adu_per_px)
        data.reshape(-1)[flat] += rng.poisson(values).astype(np.float32)
    return Frame(frame.meta, data, frame.header)


def candidate(cand_id="TEST-F1-r-0001/0", ra=150.0, dec=2.0, flux=1000.0, snr=12.0, seed=0) -> Candidate:
    rng = np.random.default_rng(seed)
    det = Detection(x=10.5, y=20.25, ra=ra, dec=dec, flux=flux, flux_err=flux / snr, snr=snr, scorr=snr,
                    fwhm=3.0, elongation=1.1, dipole=0.05, n_bad=0, ref_dist=float("inf"), ref_flux=0.0)
    cut = lambda: rng.normal(size=(CUTOUT_SIZE, CUTOUT_SIZE)).astype(np.float32)  # noqa: E731
    return Candidate(cand_id, det, cut(), cut(), cut())


def gz_fits(a: np.ndarray) -> bytes:
    """Gzipped FITS bytes of an image, as a ZTF alert stamp."""
    buf = io.BytesIO()
    fits.PrimaryHDU(a.astype(np.float32)).writeto(buf)
    return gzip.compress(buf.getvalue())


ZTF_LIKE_SCHEMA = {"type": "record", "name": "alert", "fields": [
    {"name": "objectId", "type": "string"},
    {"name": "candidate", "type": {"type": "record", "name": "cand", "fields": [
        {"name": "candid", "type": "long"}, {"name": "isdiffpos", "type": "string"},
        {"name": "fwhm", "type": ["null", "double"]}]}},
    *({"name": k, "type": ["null", {"type": "record", "name": k + "_t", "fields": [
        {"name": "stampData", "type": "bytes"}]}]}
      for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference"))]}


def ztf_packet(i: int, stamps: list[bytes], fwhm: float | None = 2.5) -> dict:
    """A minimal ZTF-shaped alert packet (:data:`ZTF_LIKE_SCHEMA`) with three stamps."""
    keys = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
    return {"objectId": f"ZTF{i:03d}", "candidate": {"candid": i, "isdiffpos": "t", "fwhm": fwhm},
            **{k: {"stampData": s} for k, s in zip(keys, stamps, strict=True)}}


def write_avro(path: Path, records: list[dict]) -> None:
    """An Avro container file of ZTF-shaped packets."""
    import fastavro

    with open(path, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(ZTF_LIKE_SCHEMA), records)


class Hang(BaseException):
    """Raised by the alarm of :func:`time_limit` (no ``except Exception`` of the code under test catches it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds`` (SIGALRM; an outer alarm is put back after)."""
    def expire(*_: object) -> None:
        raise Hang(f"still running after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # pytest-timeout's alarm, if set: put back after
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001))


def fill_disk(disk: Path) -> None:
    """Write ``disk/ballast`` until the disk refuses another byte (ENOSPC); delete it to free the disk."""
    fd = os.open(disk / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def cpu_seconds(fn, *args) -> float:
    """The least CPU time (s) of three calls of ``fn(*args)``: what a loaded machine adds is left out."""
    runs = []
    for _ in range(3):
        t0 = time.process_time()
        fn(*args)
        runs.append(time.process_time() - t0)
    return min(runs)
