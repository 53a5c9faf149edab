"""Difference store and forced photometry: their cost per frame, and the limiting flux against injections.

    python -m bench.diffstore [--size 2048] [--science 5] [--stored 30] [--seed 7]

Simulated ``--size``^2 frames of one field: the first 3 build the reference, the next ``--science``
go through :func:`broker.pipeline.process_frame` with a :class:`~broker.diffstore.DifferenceStore`
(forced photometry on the frames before, then the frame kept). Reported per frame: the subtraction,
the difference image handed to the store (``t_difference_s``), the write and the forced photometry,
and the disk taken. The worst case of forced photometry, every candidate measured on ``--stored``
earlier frames (the default retention), is timed on a store filled with copies of a real difference
image (warm page cache, as for frames written minutes to days before on a busy node).

Then the limiting flux: Moffat point sources of each frame's own PSF at its 5-sigma limiting flux
are added on blank sky to the simulator's noise-free frame, noise drawn as the simulator does; the
PSF flux at the true position on the difference image (the forced photometry), its S/N, S_corr at
the nearest pixel and the detected fraction are reported. Writes the section ``diffstore`` of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from bench.common import git_rev, machine, write_section
from broker.detect import ShiftedPSF, fit_half_size, forced_flux
from broker.diffstore import DifferenceImage, DifferenceStore, celestial_header
from broker.frame import Frame
from broker.pipeline import FixedReference, process_frame
from broker.reference import ReferenceConfig, build_reference
from broker.simulate import SimConfig, SkySimulator, render
from broker.subtract import subtract_and_detect


def _store_run(frames: list[Frame], fixed: FixedReference, root: Path) -> list[dict]:
    """Process each science frame with a store; per frame its times (s), counts and bytes."""
    store = DifferenceStore(root)
    rows = []
    for frame in frames:
        res = process_frame(frame, fixed, differences=store)
        d = res.diagnostics
        kept = store._dir(frame.meta.reference_key) / frame.meta.frame_id
        rows.append({"subtract": d["t_total_s"] - d["t_difference_s"], "difference": d["t_difference_s"],
                     "write": d["t_diffstore_s"], "forced": d["t_forced_s"], "n_cand": len(res.candidates),
                     "n_forced": sum(len(c.forced) for c in res.candidates),
                     "bytes": sum(p.stat().st_size for p in kept.iterdir()), "limit": d["limiting_flux"]})
    return rows


def _worst_case(frame: Frame, fixed: FixedReference, n_stored: int, root: Path) -> tuple[int, int, float]:
    """Candidates, measurements and seconds of forced photometry on ``n_stored`` earlier frames (warm)."""
    res = subtract_and_detect(frame, fixed.reference, keep_difference=True)
    assert res.difference is not None
    store = DifferenceStore(root)
    header = celestial_header(frame)
    for i in range(n_stored):
        meta = replace(frame.meta, frame_id=f"copy{i:03d}", mjd_start=frame.meta.mjd_start - 1.0 - i)
        store.put(meta, header, res.difference)
    ra = np.array([c.detection.ra for c in res.candidates])
    dec = np.array([c.detection.dec for c in res.candidates])
    key, mjd = frame.meta.reference_key, frame.meta.mjd_start
    store.forced_photometry(key, mjd, ra, dec)  # opens the frames: the stage keeps them open
    t = time.perf_counter()
    out = store.forced_photometry(key, mjd, ra, dec)
    return len(ra), sum(len(f) for f in out), time.perf_counter() - t


def _blank_positions(diff: DifferenceImage, step: int, box: int = 8, most: int = 300) -> np.ndarray:
    """Up to ``most`` positions (px) ``step`` px apart whose neighbourhood is blank: no source noise, no mask."""
    noise = np.where(np.isfinite(diff.diff), np.asarray(diff.noise_scale, np.float32), np.inf)
    blank = ndimage.maximum_filter(noise, 2 * box + 1) < 1.02
    ny, nx = blank.shape
    yy, xx = np.mgrid[box + step // 2:ny - box:step, box + step // 2:nx - box:step]
    ok = blank[yy, xx]
    xy = np.column_stack([xx[ok] + 0.37, yy[ok] - 0.21])  # off the pixel centres
    return xy[np.random.default_rng(0).permutation(len(xy))[:most]]


def _injected(sim: SkySimulator, frame: Frame, epoch: int, xy: np.ndarray, flux: float, seed: int) -> Frame:
    """The frame drawn again by the simulator's noise model with point sources of its PSF added (ADU)."""
    c, truth = sim.config, sim.frame(frame.meta.field, frame.meta.filter, epoch)[1]
    model = sim.model(frame.meta.field, frame.meta.filter, epoch).astype(np.float64)
    size = 2 * int(np.ceil(4 * truth.fwhm)) + 1
    dx, dy, flat, inside = render.stamp_indices(xy[:, 0], xy[:, 1], size, c.shape)
    stamps = render.moffat_stamps(dx, dy, size, truth.fwhm, truth.beta, truth.psf_ellip, truth.psf_theta)
    render.add_stamps(model, flux * stamps, flat, inside)
    data = render.add_noise(model, c.gain, c.read_noise, c.saturation, np.random.default_rng(seed))
    return Frame(frame.meta, data, frame.header)


def _limit_check(sim: SkySimulator, frames: list[tuple[int, Frame]], fixed: FixedReference, seed: int) -> dict:
    """Sources at the limiting flux: mean flux / limit, PSF S/N and S_corr at the truth, detected fraction."""
    ratio, snr, scorr, found, blank = [], [], [], [], []
    for epoch, frame in frames:
        base = subtract_and_detect(frame, fixed.reference, keep_difference=True)
        assert base.difference is not None
        limit, xy = base.diagnostics["limiting_flux"], _blank_positions(base.difference, 24)
        res = subtract_and_detect(_injected(sim, frame, epoch, xy, limit, seed + epoch), fixed.reference,
                                  keep_images=True, keep_difference=True)
        assert res.difference is not None
        det = np.array([[c.detection.x, c.detection.y] for c in res.candidates]).reshape(-1, 2)
        for r, out in ((res.difference, True), (base.difference, False)):
            for x, y in xy:
                t = r.tile_at(int(round(x)), int(round(y)))
                psf = ShiftedPSF(r.psfs[t], fit_half_size(r.fwhm[t], r.psfs.shape[1] // 2))
                f = forced_flux(r.diff, r.noise_scale, float(r.F_D[t]), psf, x, y)
                if f is None:
                    continue
                if out:
                    ratio.append(f[0] / limit)
                    snr.append(f[0] / f[1])
                    scorr.append(float(res.images["S_corr"][int(round(y)), int(round(x))]))
                    found.append(bool(len(det)) and float(np.min(np.hypot(*(det - (x, y)).T))) < 1.5)
                else:
                    blank.append(f[0] / f[1])
    return {"n": len(ratio), "ratio": float(np.mean(ratio)), "ratio_err": float(np.std(ratio) / np.sqrt(len(ratio))),
            "snr": float(np.mean(snr)), "scorr": float(np.mean(scorr)), "found": float(np.mean(found)),
            "blank_mean": float(np.mean(blank)), "blank_std": float(np.std(blank))}


def _table(rows: list[dict], worst: tuple[int, int, float], n_stored: int) -> str:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    n_cand, n_meas, t_worst = worst
    per_meas = t_worst / max(n_meas, 1)
    lines = ["| figure | median per frame |", "|---|---|",
             f"| subtraction and detection (s) | {med['subtract']:.3f} |",
             f"| difference image for the store: noise scale, P_D per tile (s) | {med['difference']:.3f} |",
             f"| write to the store, atomic rename, retention (s) | {med['write']:.3f} |",
             f"| forced photometry, all candidates on the frames before (s) | {med['forced']:.4f} |",
             f"| candidates / forced measurements per frame | {med['n_cand']:.0f} / {med['n_forced']:.0f} |",
             f"| store cost relative to the subtraction | "
             f"{(med['difference'] + med['write'] + med['forced']) / med['subtract']:.1%} |",
             f"| disk per frame (MiB) / per key at {n_stored} frames (MiB) | {med['bytes'] / 2**20:.1f} / "
             f"{n_stored * med['bytes'] / 2**20:.0f} |",
             f"| worst case: {n_cand} candidates x {n_stored} earlier frames ({n_meas} measurements) (s) | "
             f"{t_worst:.3f} |",
             f"| per forced measurement (ms) / per candidate on {n_stored} frames (ms) | {1e3 * per_meas:.3f} / "
             f"{1e3 * t_worst / max(n_cand, 1):.2f} |"]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and write its section of BENCHMARKS.md."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--science", type=int, default=5)
    ap.add_argument("--stored", type=int, default=30)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    start_machine = machine()
    sim = SkySimulator(SimConfig(shape=(args.size, args.size), fields=("F001",)), seed=args.seed)
    band = sim.config.filters[0]
    frames = [sim.frame("F001", band, e)[0] for e in range(3 + args.science)]
    fixed = FixedReference(build_reference(frames[:3], ReferenceConfig()))
    science = frames[3:]
    with tempfile.TemporaryDirectory() as tmp:
        rows = _store_run(science, fixed, Path(tmp) / "run")
        worst = _worst_case(science[-1], fixed, args.stored, Path(tmp) / "worst")
    check = _limit_check(sim, list(enumerate(science, start=3))[:3], fixed, args.seed)
    cmd = f"python -m bench.diffstore --size {args.size} --science {args.science} --stored {args.stored}"
    limit = statistics.median(r["limit"] for r in rows)
    body = (f"## Difference store and forced photometry\n\nMachine: {start_machine}. "
            f"Date {datetime.date.today()}, commit {git_rev()}. Command: `{cmd}`.\n\n"
            f"Per {args.size}x{args.size} simulated science frame ({len(rows)} frames after the 3 of the "
            f"reference; `process_frame` with a store; warm page cache):\n\n{_table(rows, worst, args.stored)}\n\n"
            f"Limiting flux (5 sigma, blank sky; median over frames {limit:.0f} ADU) "
            f"against {check['n']} point sources of the frames' own PSF injected at it on blank sky (3 frames): "
            f"PSF flux at the true position / limit {check['ratio']:.3f} +- {check['ratio_err']:.3f}, "
            f"its S/N {check['snr']:.2f}, S_corr at the nearest pixel {check['scorr']:.2f}, detected "
            f"{check['found']:.0%}; the same positions without sources: S/N {check['blank_mean']:+.2f} +- "
            f"{check['blank_std']:.2f} (std).")
    write_section("diffstore", body)
    print(body)


if __name__ == "__main__":
    main()
