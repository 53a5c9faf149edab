"""Back-off of the plate solver for a telescope whose frames keep finding no solution.

A frame without a WCS costs the ingest stage up to two solve-field runs of ``cpulimit_s`` when
no solution exists (``broker.astrometry.AstrometryConfig``: ~45 s on the defaults), and a
telescope whose headers carry a wrong scale or pointing hint, or that images through cloud, sends
such frames one after the other, each holding up every frame behind it on its partition.
:class:`SolverBackoff` counts, per telescope, the frames in a row that solve-field ran on and
found no solution; after ``backoff_after`` of them the telescope's next frames are refused
(:class:`~broker.errors.SolverBackingOff`, dead-lettered ``solver_backoff`` with the reason and
the frame's record, so they can be sent again once the cause is fixed) until ``backoff_s`` after
the last failure, when one frame is tried again. A solution ends the back-off; a frame refused
before the solver ran (too few stars, no hint) neither counts nor ends it. The state is the stage
process's own: a restart or another replica starts afresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from broker.errors import SolverBackingOff


@dataclass
class _Streak:
    failures: int  # frames in a row without a solution
    last_failure: float  # clock time of the last one (s)
    reason: str  # the solver's message for it


class SolverBackoff:
    """Per telescope: frames in a row without a solution, and whether the next one is solved.

    Parameters
    ----------
    after : int
        Failures in a row that start the back-off (``AstrometryConfig.backoff_after``; 0: never).
    wait_s : float
        Seconds after the last failure before a frame is tried again (``AstrometryConfig.backoff_s``).
    clock : callable
        Monotonic seconds (``time.monotonic``; a test's own clock).
    """

    def __init__(self, after: int, wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.after = after
        self.wait_s = wait_s
        self.clock = clock
        self._streaks: dict[str, _Streak] = {}

    def check(self, telescope: str) -> None:
        """Raise :class:`~broker.errors.SolverBackingOff` when ``telescope``'s next frame is not to be solved."""
        streak = self._streaks.get(telescope)
        if self.after <= 0 or streak is None or streak.failures < self.after:
            return
        wait = streak.last_failure + self.wait_s - self.clock()
        if wait > 0:
            raise SolverBackingOff(
                f"not plate-solved: the last {streak.failures} frames of telescope {telescope!r} found no solution "
                f"(the last: {streak.reason}); its next frame is solved in {wait:.0f} s. Check its headers' "
                f"pointing and pixel-scale hints (or its telescope profile), then send these frames again "
                f"(broker dead-letters --reason solver_backoff --resend)")

    def failed(self, telescope: str, reason: str) -> None:
        """Record a frame of ``telescope`` that solve-field ran on and found no solution for."""
        streak = self._streaks.setdefault(telescope, _Streak(0, 0.0, ""))
        streak.failures += 1
        streak.last_failure = self.clock()
        streak.reason = reason

    def solved(self, telescope: str) -> None:
        """Record a solution for ``telescope``: its back-off, if any, ends."""
        self._streaks.pop(telescope, None)
