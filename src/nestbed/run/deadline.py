"""The run's global timeout (autopkgtest's `--timeout`, since 5.30): the package's own
commands -- the build and the tests -- share one budget, counted from the testbed's start.

A build that runs into it is a testbed failure; a test that runs into it FAILs "timed
out" and the tests after it are SKIPped ("global timeout exceeded"). The testbed's own
work (boot, apt, copies) keeps its own timeouts, as in autopkgtest.
"""

from __future__ import annotations

import time
from collections.abc import Callable

SKIP_REASON = "global timeout exceeded"


class RunDeadline:
    """`seconds` from now for the package's commands; 0 means no global timeout."""

    def __init__(self, seconds: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds
        # a test ran into the deadline: the remaining tests are not run
        self.exceeded = False

    def limit(self, timeout: int) -> tuple[int, bool]:
        """The timeout a build or test command gets (`timeout`, or what is left of the
        run's if that is shorter: then 0 when nothing is left), and whether the run's
        deadline is the one that applies."""
        if self.seconds <= 0:
            return timeout, False
        left = int(self._end - self._clock())
        if timeout > 0 and left >= timeout:
            return timeout, False
        return max(left, 0), True
