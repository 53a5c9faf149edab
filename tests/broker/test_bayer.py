"""Bayer frames: 2x2 superpixel luminance, saturation and the header."""

import io

import numpy as np
import pytest
from astropy.io import fits

from broker.bayer import bayer_pattern, colour_planes_luminance, superpixel_luminance
from broker.errors import BadShape
from broker.frame import decode_fits
from tests.conftest import shared_data
from tests.helpers import cpu_seconds


def test_superpixels_sum_the_mosaic_and_keep_the_noise_model():
    rng = np.random.default_rng(3)
    raw = rng.poisson(100.0, size=(101, 64)).astype(np.float32)
    raw[10, 10] = 65535.0
    header = fits.Header({"BAYERPAT": "GRBG", "RDNOISE": 1.5, "SATURATE": 65535.0, "XPIXSZ": 2.9,
                          "CTYPE1": "RA---TAN", "CRPIX1": 3.0})
    lum, out = superpixel_luminance(raw, header, 65535.0)
    assert lum.shape == (50, 32)
    assert lum[0, 0] == raw[0:2, 0:2].sum()
    assert lum[5, 5] == 4 * 65535.0 and out["SATURATE"] == 4 * 65535.0
    assert out["RDNOISE"] == 3.0 and out["XPIXSZ"] == 5.8 and out["FILTER"] == "lum"
    assert "CTYPE1" not in out and "BAYERPAT" not in out and bayer_pattern(out) is None
    # variance of a sum of four Poisson(100) pixels is 400: the gain is unchanged
    assert np.var(lum[lum < 1000]) == pytest.approx(400.0, rel=0.15)


@pytest.mark.parametrize("value", ["XYZW", 2, "RGB"])
def test_unknown_patterns_are_refused(value):
    with pytest.raises(BadShape, match="BAYERPAT"):
        bayer_pattern(fits.Header({"BAYERPAT": value}))


def test_monochrome_and_tiny_frames():
    assert bayer_pattern(fits.Header({"BAYERPAT": "NONE"})) is None
    assert bayer_pattern(fits.Header()) is None
    with pytest.raises(BadShape, match="2x2"):
        superpixel_luminance(np.zeros((1, 5), np.float32), fits.Header({"BAYERPAT": "RGGB"}), np.inf)


def _cube_header(planes: int, **cards) -> fits.Header:
    """A 3-axis WCS (celestial TAN plus a colour axis) and the cards a frame needs."""
    from astropy.wcs import WCS

    from tests.helpers import header

    w = WCS(naxis=3)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN", "RGB"]
    w.wcs.crval = [150.0, 2.0, 1.0]
    w.wcs.crpix = [32.0, 24.0, 1.0]
    w.wcs.cdelt = [-1 / 3600, 1 / 3600, 1.0]
    w.wcs.pc = [[0.9, 0.1, 0.0], [-0.1, 0.9, 0.0], [0.0, 0.0, 1.0]]
    h = header((48, 64), **cards)
    for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CDELT1", "CDELT2", "WCSAXES"):
        h.remove(key, ignore_missing=True)
    h.update(w.to_header())
    return h


def _cube_bytes(data: np.ndarray, h: fits.Header) -> bytes:
    import io

    buf = io.BytesIO()
    fits.PrimaryHDU(data, header=h).writeto(buf)
    return buf.getvalue()


def test_a_cube_of_three_colour_planes_is_summed_at_full_resolution_with_its_wcs():
    from astropy.wcs import WCS

    from broker.frame import decode_fits, encode_fits

    rng = np.random.default_rng(5)
    cube = rng.poisson(200.0, size=(3, 48, 64)).astype(np.float32)
    cube[1, 7, 9] = 60000.0  # saturated in green only
    cube[2, 20, 30] = np.nan
    h = _cube_header(3, BAYERPAT="RGGB")  # a pattern left in the header of an interpolated image
    frame = decode_fits(_cube_bytes(cube, h))
    assert frame.data.shape == (48, 64) and frame.meta.filter == "lum"
    assert frame.data[0, 0] == cube[:, 0, 0].sum()
    assert frame.data[7, 9] == 3 * 60000.0 and frame.header["SATURATE"] == 3 * 60000.0
    assert np.isnan(frame.data[20, 30])
    assert frame.header["RDNOISE"] == pytest.approx(5.0 * np.sqrt(3)) and frame.header["BAYERMOD"] == "planes-sum"
    assert "NAXIS3" not in frame.header and "CTYPE3" not in frame.header and "PC1_3" not in frame.header
    sky = WCS(h).celestial.pixel_to_world_values([5.0, 60.0], [3.0, 40.0])
    assert np.allclose(frame.wcs.pixel_to_world_values([5.0, 60.0], [3.0, 40.0]), sky)
    again = decode_fits(encode_fits(frame))  # planes-sum is recorded: never summed or binned twice
    assert again.data.shape == (48, 64) and np.array_equal(again.data, frame.data, equal_nan=True)


def test_a_cube_of_one_plane_is_that_plane():
    from broker.frame import decode_fits

    plane = np.arange(48 * 64, dtype=np.float32).reshape(1, 48, 64)
    frame = decode_fits(_cube_bytes(plane, _cube_header(1)))
    assert np.array_equal(frame.data, plane[0]) and frame.meta.filter == "r" and "BAYERMOD" not in frame.header


@pytest.mark.parametrize("shape", [(2, 16, 16), (5, 16, 16), (2, 3, 16, 16), (16, 16, 3)])
def test_other_cubes_are_refused_with_their_shape(shape):
    from broker.frame import decode_fits
    from tests.helpers import header

    with pytest.raises(BadShape, match="cube|dimensions"):
        decode_fits(_cube_bytes(np.zeros(shape, np.float32), header()))


@pytest.mark.parametrize("read_noise, error", [(" ", None), ("DEC--TAN-SIP", "is not a float"),
                                               (True, "is a logical")])
def test_a_read_noise_that_is_no_number_is_left_for_the_metadata_to_name(read_noise, error):
    """Found by the frame fuzzer: ``RDNOISE = ' '`` raised ValueError out of the binning (``float('')``)."""
    from broker.errors import MissingMetadata
    from broker.frame import decode_fits
    from broker.simulate.amateur import AmateurConfig, amateur_fits, amateur_frame

    data, header = amateur_frame(AmateurConfig(shape=(128, 128)), seed=1)
    header["RDNOISE"] = read_noise
    if error is None:  # blank: no read noise known
        assert decode_fits(amateur_fits(data, header), require_wcs=False).meta.read_noise == 0.0
    else:
        with pytest.raises(MissingMetadata, match=f"RDNOISE={read_noise!r} {error}"):
            decode_fits(amateur_fits(data, header), require_wcs=False)
    lum, out = superpixel_luminance(data, fits.Header({"RDNOISE": read_noise, "XPIXSZ": True}), 65535.0)
    assert out["RDNOISE"] == fits.Header({"RDNOISE": read_noise})["RDNOISE"]  # as it was (astropy strips ' ')
    assert out["XPIXSZ"] is True and lum.shape == (64, 64)


@pytest.mark.filterwarnings("ignore::astropy.io.fits.verify.VerifyWarning")
@pytest.mark.parametrize("card", ["SECPIX", "PIXSCALE", "XPIXSZ", "RDNOISE"])
def test_an_infinite_size_card_of_a_colour_frame_is_left_as_written(card):
    """Found by an exhaustive run of the frame fuzzer's card values: ``SECPIX = 1e999`` reads as inf.

    The binning wrote 2 x inf back, which astropy refuses (ValueError, ``unexpected`` on the dead-letter topic).
    """
    from broker.errors import InvalidFrame
    from broker.frame import decode_fits, encode_fits
    from broker.simulate.amateur import AmateurConfig, amateur_fits, amateur_frame
    from tests.broker.test_frame_fuzz import set_raw

    data, header = amateur_frame(AmateurConfig(shape=(128, 128)), seed=1)
    for value in ("1e999", "-1E999", "1e308"):
        payload = set_raw(amateur_fits(data, header), card, value)
        try:
            frame = decode_fits(payload, require_wcs=False)
        except InvalidFrame as exc:  # an infinite read noise is named by the metadata
            assert card == "RDNOISE" and exc.reason, exc
            continue
        assert decode_fits(encode_fits(frame), require_wcs=False).shape == (64, 64)


@pytest.mark.parametrize("code,pattern", [(0, None), (2, "RGGB")])
def test_colortyp_as_maxim_dl_writes_it_is_ascom_s_sensor_type(code, pattern):
    """MaxIm DL and Celestron AstroFX write ``COLORTYP`` as ASCOM's SensorType code.

    Both were refused as "BAYERPAT=2 is not a 2x2 colour mosaic", a monochrome camera's 0 too.
    """
    assert bayer_pattern(fits.Header({"COLORTYP": code, "XBAYROFF": 1, "YBAYROFF": 0})) == pattern


@pytest.mark.parametrize("code", [1, 3, 5, True])
def test_other_sensor_types_are_refused_naming_the_card(code):
    with pytest.raises(BadShape, match="COLORTYP"):
        bayer_pattern(fits.Header({"COLORTYP": code}))


def test_a_celestron_nightscape_light_frame_is_binned_to_luminance():
    """The real header of a Celestron Nightscape 10100 raw frame (COLORTYP = 2), with pixels of a usable size."""
    path = shared_data("small_telescopes", "msumastro",
                       "msumastro__tests__data__celestron_nightscape_10100_astro_fx_v106.fit")
    header = fits.getheader(path)
    for card in ("BITPIX", "NAXIS1", "NAXIS2", "BZERO", "BSCALE"):
        header.remove(card, ignore_missing=True)
    header["OBJCTRA"], header["OBJCTDEC"] = "12 50 53", "+41 07 14"  # the trimmed header has no pointing
    data = np.random.default_rng(1).poisson(1000, (256, 256)).astype(np.uint16)
    buf = io.BytesIO()
    fits.PrimaryHDU(data, header).writeto(buf)
    frame = decode_fits(buf.getvalue(), require_wcs=False)
    assert frame.shape == (128, 128) and frame.meta.filter == "lum"


def test_a_raw_colour_frame_keeps_its_dropped_wcs_as_the_solver_hints():
    """Its WCS was its only pointing and scale: dropped with the binning, the frame was refused no_wcs at ingest."""
    from broker.frame import decode_fits, encode_fits, has_wcs
    from broker.headers import pixel_scale_hint, pointing_hint
    from tests.helpers import star_frame

    frame = star_frame(shape=(256, 256), BAYERPAT="RGGB", ra=193.0, dec=41.0, scale_arcsec=2.0)
    out = decode_fits(encode_fits(frame), require_wcs=False)
    assert not has_wcs(out.header) and out.meta.filter == "lum"
    ra, dec = pointing_hint(out.header)
    assert abs(ra - 193.0) < 0.01 and abs(dec - 41.0) < 0.01
    assert pixel_scale_hint(out.header) == pytest.approx(4.0, rel=1e-6)
    mount = star_frame(shape=(256, 256), BAYERPAT="RGGB", RA=10.0, DEC=20.0, XPIXSZ=3.0, FOCALLEN=300.0)
    kept = decode_fits(encode_fits(mount), require_wcs=False).header
    assert pointing_hint(kept) == (10.0, 20.0) and "PIXSCALE" not in kept  # the header's own hints win


def test_the_dropped_cards_are_dropped_in_time_linear_in_them():
    """One Header.remove each took 2.6 s for 8,000 ``A_*`` cards of a raw frame (quadratic), 11 s for 16,000."""
    def headers(n):
        cards = [fits.Card("BAYERPAT", "RGGB"), fits.Card("RDNOISE", 3.0), fits.Card("COMMENT", "kept")]
        cards += [fits.Card(f"K{i}", i) for i in range(n // 2)]
        raw = fits.Header(cards + [fits.Card(f"A_{i}", 0.0) for i in range(n // 2)] + [fits.Card("TAIL", 1)])
        cube = fits.Header(cards[1:] + [fits.Card("NAXIS3", 3), fits.Card("CTYPE3", "RGB")] * (n // 4))
        return raw, cube

    raw, cube = headers(100)
    out = superpixel_luminance(np.ones((8, 8), np.float32), raw, 60000.0)[1]
    assert not any(keyword.startswith("A_") for keyword in out) and out["TAIL"] == 1
    assert list(out)[:4] == ["RDNOISE", "COMMENT", "K0", "K1"]  # the others kept in their order
    planes = colour_planes_luminance(np.ones((3, 8, 8), np.float32), cube, 60000.0)[1]
    assert "NAXIS3" not in planes and "CTYPE3" not in planes and planes["K49"] == 49
    seconds = {}
    for n in (4000, 16000):
        raw, cube = headers(n)
        seconds[n] = (cpu_seconds(superpixel_luminance, np.ones((8, 8), np.float32), raw, 60000.0)
                      + cpu_seconds(colour_planes_luminance, np.ones((3, 8, 8), np.float32), cube, 60000.0))
    assert seconds[16000] < 3.0  # quadratic: ~20 s
    assert seconds[16000] < 10 * max(seconds[4000], 0.02)  # linear: 4x, quadratic: 16x
