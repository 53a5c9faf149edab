"""The plate solver's back-off per telescope (no solver needed: a clock of the test's own)."""

import pytest

from broker.errors import SolverBackingOff, UnsolvableField
from broker.solvebackoff import SolverBackoff


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _fail(backoff: SolverBackoff, telescope: str, n: int) -> None:
    for _ in range(n):
        backoff.check(telescope)
        backoff.failed(telescope, "astrometry.net found no solution (blind, any scale, 40 stars, 20 s CPU limit)")


def test_a_telescope_is_backed_off_after_its_failures_in_a_row_and_tried_again_after_the_wait():
    clock = _Clock()
    backoff = SolverBackoff(3, 300.0, clock)
    _fail(backoff, "LCO-1m", 3)
    clock.t += 10
    with pytest.raises(SolverBackingOff, match=r"last 3 frames of telescope 'LCO-1m'.*blind, any scale.*290 s") as err:
        backoff.check("LCO-1m")
    assert err.value.reason == "solver_backoff" and isinstance(err.value, UnsolvableField)
    backoff.check("MicroObservatory")  # another telescope is solved as before
    clock.t += 290
    backoff.check("LCO-1m")  # the wait is over: one frame is tried
    backoff.failed("LCO-1m", "no solution")
    with pytest.raises(SolverBackingOff, match="last 4 frames"):  # and failed: another wait at once
        backoff.check("LCO-1m")
    clock.t += 300
    backoff.solved("LCO-1m")
    _fail(backoff, "LCO-1m", 2)  # a solution started the count afresh
    backoff.check("LCO-1m")


def test_failures_under_the_count_or_a_disabled_back_off_never_refuse():
    clock = _Clock()
    backoff = SolverBackoff(3, 300.0, clock)
    _fail(backoff, "T", 2)
    backoff.check("T")
    never = SolverBackoff(0, 300.0, clock)
    _fail(never, "T", 50)
    never.check("T")
