import numpy as np
import pytest

from broker.errors import BadShape, CorruptFrame, MissingMetadata, MissingWCS
from broker.frame import Frame, decode_fits, encode_fits
from tests.helpers import header, star_frame


def test_round_trip_is_lossless_for_integer_and_float_pixels():
    frame = star_frame()
    back = decode_fits(encode_fits(frame))
    assert np.array_equal(back.data, frame.data)
    assert back.meta == frame.meta
    noisy = Frame(frame.meta, frame.data + 0.25, frame.header)
    assert np.array_equal(decode_fits(encode_fits(noisy)).data, noisy.data)


@pytest.mark.parametrize("payload", [b"", b"garbage" * 100, b"SIMPLE  =                    T" + b" " * 2850])
def test_garbage_is_a_corrupt_frame(payload):
    with pytest.raises(CorruptFrame):
        decode_fits(payload)


def test_missing_wcs_and_metadata_are_named():
    frame = star_frame()
    for key in ("CTYPE1", "CTYPE2"):
        frame.header.remove(key)
    with pytest.raises(MissingWCS):
        decode_fits(encode_fits(frame, compress=False))
    frame = star_frame()
    del frame.header["EXPTIME"]
    with pytest.raises(MissingMetadata, match="EXPTIME"):
        decode_fits(encode_fits(frame))
    frame = star_frame()
    frame.header["MJD-OBS"] = "yesterday"
    with pytest.raises(MissingMetadata, match="MJD-OBS"):
        decode_fits(encode_fits(frame))


def test_cube_is_rejected():
    import io

    from astropy.io import fits

    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((2, 8, 8), np.float32), header=header()).writeto(buf)
    with pytest.raises(BadShape):
        decode_fits(buf.getvalue())
