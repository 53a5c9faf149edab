"""Flux ratios from measured zero points (broker/fluxratio.py)."""

from dataclasses import dataclass

import pytest

from broker.fluxratio import zero_point_ratio


@dataclass(frozen=True)
class _ZeroPoint:
    magzp: float | None
    magzp_err: float | None


@pytest.mark.parametrize("err, measured", [(0.01, True), (0.0, True), (-0.01, False), (-99.0, False),
                                           (float("nan"), False), (None, False)])
def test_only_a_zero_point_with_an_uncertainty_of_at_least_zero_gives_a_ratio(err, measured):
    """MAGZPERR = -99 (a pipeline's "none") was taken as measured: F from a zero point nothing vouched for.

    0 is an uncertainty Pan-STARRS writes (``ZPCALERR``: zero for ubercal exposures) and is kept.
    """
    ratio = zero_point_ratio(_ZeroPoint(25.0, 0.01), _ZeroPoint(25.5, err))
    assert ratio.measured is measured
    if measured:
        assert ratio.value == pytest.approx(10 ** 0.2)
