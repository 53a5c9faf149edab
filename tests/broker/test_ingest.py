import numpy as np
import pytest

from broker.errors import BadPixelFraction, BadShape, ConfigError, PoorQuality
from broker.frame import Frame
from broker.ingest import IngestConfig, ingest, measure_quality
from tests.helpers import star_frame, trailed_frame


def test_quality_measures_sky_seeing_and_depth():
    frame = star_frame(fwhm=3.0, sky=500.0)
    q = measure_quality(frame)
    assert q.sky == pytest.approx(500 + 0, rel=0.02)
    assert q.sky_rms == pytest.approx(np.sqrt(500), rel=0.1)  # Poisson in ADU at gain 1 of the builder
    assert q.fwhm == pytest.approx(3.0, rel=0.1)
    assert q.n_stars >= 10 and q.flags == ()
    assert q.limit_mag == pytest.approx(27.0 - 2.5 * np.log10(q.limit_flux))


def test_all_nan_frame_is_rejected_with_the_fraction():
    frame = star_frame()
    frame = Frame(frame.meta, np.full_like(frame.data, np.nan), frame.header)
    with pytest.raises(BadPixelFraction, match="100.0%"):
        ingest(frame)


def test_tiny_frame_and_bad_seeing():
    frame = star_frame()
    with pytest.raises(BadShape):
        ingest(Frame(frame.meta, frame.data[:32, :32], frame.header))
    with pytest.raises(PoorQuality, match="seeing"):
        ingest(star_frame(fwhm=3.0), IngestConfig(fwhm_range=(0.8, 2.0)))


def test_starless_frame_is_flagged_not_rejected():
    q = ingest(star_frame(n_stars=0))
    assert "few_stars" in q.flags and np.isnan(q.fwhm)


def test_a_record_lying_about_its_frame_is_named():
    """Ny = -5, nx = 1e9 on a frames record was copied onto ingested (issue 27)."""
    from broker.errors import RecordMismatch
    from broker.ingest import check_record

    frame = star_frame()
    honest = {"frame_id": frame.meta.frame_id, "telescope": "TEST", "field": "F1", "filter": "r",
              "mjd_start": 60000.5, "exptime": 30.0, "ny": 256, "nx": 256, "size_bytes": 1234}
    check_record(honest, frame, 1234)
    with pytest.raises(RecordMismatch, match=r"ny=-5 \(the FITS says 256\), nx=1000000000 \(the FITS says 256\)") as e:
        check_record(honest | {"ny": -5, "nx": 10 ** 9}, frame, 1234)
    assert e.value.reason == "record_mismatch"
    with pytest.raises(RecordMismatch, match=r"field='F2'.*mjd_start=60001\.5.*size_bytes=99"):
        check_record(honest | {"field": "F2", "mjd_start": 60001.5, "size_bytes": 99}, frame, 1234)


def test_satellite_trails_do_not_set_the_seeing():
    """Trails brighter than most stars filled the brightest detections, and the seeing read their width.

    Their segments are left out of the star list (:func:`broker.streaks.collinear_runs`).
    """
    clean = star_frame(shape=(512, 512), n_stars=60, fwhm=6.0, seed=5)
    lines = [(0.0, 40.0, 511.0, 300.0), (0.0, 480.0, 511.0, 130.0), (60.0, 0.0, 200.0, 511.0)]
    trailed = trailed_frame(clean, 6.0, 30000.0, lines)  # 2,000 ADU above the sky at their centre
    assert measure_quality(clean).fwhm == pytest.approx(6.0, rel=0.05)
    assert measure_quality(trailed).fwhm == pytest.approx(6.0, rel=0.05)  # 11.0 px before


@pytest.mark.parametrize(("settings", "named"), [
    ({"max_stars": 0}, "max_stars must be 1 or more"),
    ({"seeing_window": 0}, "seeing_window must be 64 px or more"),
    ({"seeing_window": 63}, "seeing_window must be 64 px or more"),
    ({"min_side": 4096, "max_side": 2048}, r"min_side \(4096\) must be at most max_side \(2048\)"),
])
def test_a_seeing_measured_on_no_star_is_a_config_error(settings, named):
    """``max_stars = 0`` was a ValueError of every frame; ``seeing_window = 0`` flagged all ``few_stars``."""
    with pytest.raises(ConfigError, match=named):
        IngestConfig(**settings)
    assert measure_quality(star_frame(), IngestConfig(max_stars=1)).n_stars == 1
    assert measure_quality(star_frame(n_stars=300), IngestConfig(seeing_window=64)).n_stars > 0


def test_a_frame_with_nan_borders_is_measured_without_warnings():
    """A registered frame's NaN border made astropy warn in the sky statistics of ingest and calibration."""
    from broker.astrometry import AstrometryConfig
    from broker.calibrate import frame_stars

    frame = star_frame()
    data = frame.data.copy()
    data[:30], data[:, -20:] = np.nan, np.nan
    bordered = Frame(frame.meta, data, frame.header)
    quality = measure_quality(bordered)
    assert quality.n_stars > 5 and quality.sky == pytest.approx(measure_quality(frame).sky, rel=0.01)
    assert len(frame_stars(bordered, AstrometryConfig()).x) > 5


def test_a_sky_without_noise_gives_no_depth_rather_than_a_division_by_zero():
    """An 8-bit frame quantised to one sky value: sky RMS 0, log10(0) warned and limit_mag was inf."""
    frame = star_frame(sky=10.0)
    flat = np.where(frame.data > 40, frame.data, 10.0).astype(np.float32)
    quality = measure_quality(Frame(frame.meta, flat, frame.header))
    assert quality.sky_rms == 0.0 and quality.limit_mag is None
