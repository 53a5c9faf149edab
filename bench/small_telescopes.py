"""Real frames from small telescopes through the broker's science (issue 31): writes docs/small-telescopes-report.md.

    OMP_NUM_THREADS=1 python -m bench.small_telescopes [--data ../shared/data] [--out docs/small-telescopes-report.md]

Every real frame set of ``../shared/data`` that is an image goes through what ``broker produce``
and the ingest and subtract stages run, in the same order and with the default configuration:
decode (header normalisation, Bayer binning, telescope profiles), the producer's validation,
calibration (plate solving or WCS check against Tycho-2, zero point), the ingest quality cuts,
then the reference policy and subtraction (``broker.pipeline.process_frame``) per (telescope,
field, filter). The report gives, per frame, the outcome or the rejection reason, the WCS status
and residual, the zero point with its uncertainty, and the candidates of subtracted frames with
how many the default real/bogus model passes (``rb >= 0.5``, what a subscriber's ``rb > 0.5``
filter lets through; the classify stage's scoring); ``--out`` replaces the tables between the
``<!-- frames -->`` markers of that file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from broker.calibrate import calibrate
from broker.config import PipelineConfig
from broker.errors import BrokerError
from broker.frame import Frame, decode_fits
from broker.ingest import FrameQuality, ingest, validate
from broker.pipeline import process_frame
from broker.realbogus import RealBogusClassifier
from broker.reference import ReferenceStore
from broker.telescopes import TelescopeProfile

#: The profiles the report uses (what `broker telescope add` would write for these telescopes).
PROFILES = (TelescopeProfile("lco-0m4", match=("0m4-03", "0m4-04", "0m4-05")),
            TelescopeProfile("seestar-s50", match=("Seestar S50",), gain=1.0))

SETS = (("small_telescopes/pds110", "*.fz", "LCO 0.4 m, PDS 110 (with WCS)"),
        ("small_telescopes/EXOTIC_sampledata", "*.FITS", "MicroObservatory Cecilia, HAT-P-32 (no WCS)"),
        ("small_telescopes/seestar_m94", "*.fit", "ZWO Seestar S50, M 94, raw Bayer (no WCS)"),
        ("small_telescopes/msumastro", "*.fit", "msumastro header zoo (MaxIm DL, ACP, Apogee, Celestron, SBIG)"),
        ("image_pairs/properimage_toros", "*.fit", "TOROS, ESO 085-030 (no WCS)"),
        ("image_pairs/sfft_decam_i/input_data", "*.mini.fits", "DECam i (SFFT minis, with WCS)"),
        ("image_pairs/lsst_ip_diffim", "*MI.fits", "Rubin ip_diffim pair"))


def _frame_row(frame: Frame) -> list[str]:
    h = frame.header
    resid = h.get("WCSRESID", -1.0)
    zp = (f"{h['MAGZP']:.3f} ± {h['MAGZPERR']:.3f} ({h['MAGZPN']} stars, scatter {h['MAGZPSCT']:.2f})"
          if "MAGZPERR" in h else "–")
    return [frame.meta.telescope, frame.meta.field, frame.meta.filter, f"{frame.shape[1]}×{frame.shape[0]}",
            str(h.get("WCSSTAT", "–")), f"{h.get('WCSNMAT', 0)}/{h.get('WCSNCAT', 0)}",
            f"{resid:.2f}" if resid >= 0 else "–", zp]


def ingested(path: Path, config: PipelineConfig) -> tuple[Frame, FrameQuality]:
    """A FITS file as the producer and the ingest stage leave it: decoded, checked, calibrated, measured."""
    frame = decode_fits(path.read_bytes(), config.ingest.max_pixels, config.ingest.max_expansion,
                        PROFILES, require_wcs=False)
    validate(frame, config.ingest, require_wcs=False)
    frame = calibrate(frame, config.ingest.calibration, PROFILES)
    return frame, ingest(frame, config.ingest)


def _outcome(status: str, cands: list, model: RealBogusClassifier) -> str:
    """A subtracted frame's outcome: its candidates, the five strongest S/N, how many pass rb >= 0.5."""
    if not cands:
        return f"{status}: 0 candidates"
    rb = model.score_candidates(cands)
    snr = ", ".join(f"{c.detection.snr:.0f}" for c in sorted(cands, key=lambda c: -abs(c.detection.snr))[:5])
    return f"{status}: {len(cands)} candidates (S/N {snr}); {int(np.sum(rb >= 0.5))} with rb ≥ 0.5"


def run_set(folder: Path, pattern: str, refs: ReferenceStore, config: PipelineConfig,
            model: RealBogusClassifier) -> list[list[str]]:
    """One row per file of ``folder``: the outcome of the chain."""
    rows = []
    for path in sorted(folder.glob(pattern)):
        t0 = time.perf_counter()
        try:
            frame, quality = ingested(path, config)
            result = process_frame(frame, refs, config.subtract, clean=not quality.flags)
        except BrokerError as exc:
            rows.append([path.name, f"rejected `{exc.reason}`: {str(exc).replace(str(path), '')[:150]}"]
                        + ["–"] * 8 + [f"{time.perf_counter() - t0:.1f}"])
            continue
        except Exception as exc:  # a bug elsewhere in the chain: reported in the row (the stage dead-letters it)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            rows.append([path.name, f"**crashed** `{type(exc).__name__}` in {Path(where.filename).name}:"
                         f"{where.lineno} {where.name}: {str(exc)[:80]}"] + _frame_row(frame)
                        + [f"{time.perf_counter() - t0:.1f}"])
            continue
        outcome = _outcome(result.status, list(result.candidates), model)
        flags = f"; flags {', '.join(quality.flags)}" if quality.flags else ""
        rows.append([path.name, outcome + flags, *_frame_row(frame), f"{time.perf_counter() - t0:.1f}"])
    return rows


def report(data: Path) -> str:
    """The Markdown report of every frame set under ``data``."""
    config = PipelineConfig()
    model = RealBogusClassifier.load()
    lines: list[str] = []
    head = ["file", "outcome", "telescope", "field", "band", "size px", "WCS", "matched/in frame",
            "residual ″", "zero point (mag of 1 ADU)", "s"]
    with tempfile.TemporaryDirectory() as tmp:
        refs = ReferenceStore(Path(tmp) / "refs", config.reference)
        for folder, pattern, title in SETS:
            if not (data / folder).exists():
                continue
            lines += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in run_set(data / folder, pattern, refs, config, model)]
            lines.append("")
    return "\n".join(lines)


MARK, END = "<!-- frames -->", "<!-- /frames -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.seterr(all="ignore")
        text = report(args.data)
    print(text)
    if args.out:  # the tables between the markers; the text around them is kept
        old = args.out.read_text() if args.out.exists() else f"{MARK}\n{END}\n"
        head, rest = old.split(MARK, 1)
        args.out.write_text(f"{head}{MARK}\n{text.strip()}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
