"""-j N: a package's tests on up to N testbeds at once, what the run prints and records
still what a serial run gives, in the control file's order.

Only a server that says it can run beside itself does (`parallel=MIB`: nestbed's QEMU and
unshare servers): the first testbed is the run's own, the others are more servers started
with the same arguments, each its own testbed (from the same saved ready state on QEMU).
Each test's lines, result line and verdict are held (`HeldConsole`, `HeldOutputs`) and let
out when every test before it has been; a test that ends the run (a testbed failure, an
erroneous package) ends it after the results before it, as it would serially.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nestbed.capabilities import PARALLEL, value_of
from nestbed.errors import NestbedError
from nestbed.log import Console, HeldConsole
from nestbed.run.lifecycle import TestbedLifecycle
from nestbed.run.outputs import HeldOutputs, RunOutputs
from nestbed.run.testcase import TestCaseRunner
from nestbed.run.tree import SourceTree
from nestbed.spec.model import TestSpec

# what the host keeps for itself when it counts how many testbeds its memory holds
_RESERVE_MIB = 512


@dataclass
class Worker:
    """One testbed of the run and the state its tests carry from one to the next."""

    life: TestbedLifecycle
    testcases: TestCaseRunner
    tree: SourceTree
    number: int

    def use(self, console: Console, outputs: RunOutputs) -> None:
        """Where the next test's lines and results go."""
        self.life.console = console
        self.testcases.console = console
        self.testcases.outputs = outputs


def available_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def testbeds_for(
    jobs: int, tests: int, caps: frozenset[str], server: str, console: Console, free_mib: int
) -> int:
    """How many testbeds the tests get: -j, no more than there are tests, no more than the
    host's free memory holds beside the one running (said in one line when fewer)."""
    wanted = min(jobs, tests)
    if wanted <= 1:
        return 1
    size = value_of(PARALLEL, caps)
    if size is None:
        console.warning(f"-j {jobs}: {server} cannot run beside itself: one test at a time")
        return 1
    each = max(int(size), 1) if size.isdigit() else 1
    room = 1 + max(free_mib - _RESERVE_MIB, 0) // each
    if room < wanted:
        console.warning(
            f"-j {jobs}: {free_mib} MiB of memory free holds {room} testbeds of {each} MiB:"
            f" running {room} at a time"
        )
        return max(room, 1)
    return wanted


RunTest = Callable[[Worker, TestSpec, HeldConsole, HeldOutputs], None]
OpenMore = Callable[[int, HeldConsole, Callable[[TestbedLifecycle], None]], Worker]


class ParallelRun:
    """The tests of one package on `count` testbeds: `first` (the run's) and the ones
    `open_more` opens, each taking the next test when it is free."""

    def __init__(
        self,
        console: Console,
        outputs: RunOutputs,
        first: Worker,
        count: int,
        open_more: OpenMore,
        run_test: RunTest,
    ) -> None:
        self.console = console
        self.outputs = outputs
        self.first = first
        self.count = count
        self._open_more = open_more
        self._run_test = run_test
        # reentrant: an interrupt may come while the main thread (testbed 1's) holds it
        self._lock = threading.RLock()
        self._tests: list[TestSpec] = []
        self._next = 0
        self._done: list[tuple[HeldOutputs, Exception | None] | None] = []
        self._released = 0
        self._stop = False
        self._abandoned = False  # interrupted: nothing more is let out
        self._failure: Exception | None = None
        self._lives: list[TestbedLifecycle] = []  # the testbeds opened here, to close
        self._running: dict[int, TestbedLifecycle] = {}  # test index -> its testbed

    def run(self, tests: list[TestSpec]) -> None:
        self._tests = tests
        self._done = [None] * len(tests)
        self.console.info(f"running up to {self.count} tests at once, on {self.count} testbeds")
        threads = [
            threading.Thread(target=self._more, args=(n,), name=f"testbed-{n}", daemon=True)
            for n in range(2, self.count + 1)
        ]
        for thread in threads:
            thread.start()
        try:
            self._work(self.first, None)
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)
        except BaseException:  # interrupted: the other testbeds go now, their tests with them
            self._stop = self._abandoned = True
            for life in self._opened():
                life.testbed.release()
            for thread in threads:
                thread.join(30)
            raise
        finally:
            self._close_more()
            self.first.use(self.console, self.outputs)
        if self._failure is not None:
            raise self._failure

    def _opened(self) -> list[TestbedLifecycle]:
        with self._lock:
            return list(self._lives)

    def _register(self, life: TestbedLifecycle) -> None:
        with self._lock:
            self._lives.append(life)

    def _more(self, number: int) -> None:
        opening = HeldConsole(self.console)
        try:
            worker = self._open_more(number, opening, self._register)
        except NestbedError as e:
            if not self._stop:
                self.console.warning(f"testbed {number} could not be opened ({e}): not used")
            return
        self._work(worker, opening)

    def _work(self, worker: Worker, opening: HeldConsole | None) -> None:
        while True:
            with self._lock:
                if self._stop or self._next >= len(self._tests):
                    return
                index = self._next
                self._next += 1
                self._running[index] = worker.life
            console = HeldConsole(self.console)
            if opening is not None:  # the testbed's opening lines come with its first test
                opening.release(console)
                opening = None
            outputs = HeldOutputs(self.outputs, console)
            error: Exception | None = None
            try:
                self._run_test(worker, self._tests[index], console, outputs)
            except Exception as e:
                error = e
            self._finish(index, outputs, error)
            if error is not None:
                return

    def _finish(self, index: int, outputs: HeldOutputs, error: Exception | None) -> None:
        """Let out every test's results whose turn it is; stop at the first error."""
        with self._lock:
            self._done[index] = (outputs, error)
            self._running.pop(index, None)
            if error is not None:
                self._stop = True
                # tests after this one would not be reported: end them now, not at their end
                for later, life in self._running.items():
                    if later > index:
                        life.testbed.release()
            while not self._abandoned and self._failure is None:
                if self._released == len(self._done):
                    break
                ready = self._done[self._released]
                if ready is None:
                    break
                ready[0].release()
                self._failure = ready[1]
                self._released += 1

    def _close_more(self) -> None:
        for life in self._opened():
            try:
                life.close()
            except NestbedError as e:
                self.console.warning(f"closing a testbed: {e}")
