"""-j N (nestbed.run.parallel): tests that end out of order still give their lines, result
lines, summary and verdicts in the control file's order; an error ends the run after the
results before it, as serially; N is what the testbed and the host's memory allow."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from nestbed import errors, log
from nestbed.capabilities import PARALLEL, with_value
from nestbed.log import Console, HeldConsole
from nestbed.report.results import TestResult, Verdict
from nestbed.run import parallel
from nestbed.run.lifecycle import TestbedLifecycle
from nestbed.run.options import RunOptions
from nestbed.run.outputs import HeldOutputs, RunOutputs
from nestbed.run.parallel import ParallelRun, Worker, available_mib
from nestbed.run.testcase import TestCaseRunner
from nestbed.run.tree import SourceTree
from nestbed.spec.model import TestSpec


@pytest.fixture(autouse=True)
def _restore_setup() -> Iterator[None]:
    yield
    log.setup(log.program_name())


RELEASED: list[int] = []  # the fake testbeds released, by number


def fake_worker(number: int) -> Worker:
    # a Worker's testbed and test runner are only handed to run_test (faked here) and given
    # the console and outputs of each test; its testbed may be released
    testbed = SimpleNamespace(release=lambda: RELEASED.append(number))
    life = cast(TestbedLifecycle, SimpleNamespace(console=None, testbed=testbed))
    runner = cast(TestCaseRunner, SimpleNamespace(console=None, outputs=None))
    return Worker(life, runner, SourceTree("/host", "/testbed", "pkg", "1"), number)


def spec(name: str) -> TestSpec:
    return TestSpec(name, name, None, frozenset(), frozenset(), (), ())


def run_parallel(
    names: list[str],
    seconds: dict[str, float],
    count: int = 3,
    fail: str | None = None,
) -> tuple[RunOutputs, list[str]]:
    console = Console()
    outputs = RunOutputs(RunOptions(packages=(), virt_argv=()), console)
    on_testbed: list[str] = []

    def open_more(number: int, opening: HeldConsole, register: object) -> Worker:
        opening.info(f"testbed {number} opened")
        return fake_worker(number)

    def run_test(worker: Worker, test: TestSpec, c: HeldConsole, out: HeldOutputs) -> None:
        on_testbed.append(f"{test.name}@{worker.number}")
        c.info(f"test {test.name}: starts")
        time.sleep(seconds.get(test.name, 0.0))
        c.write_stdout(f"{test.name} output\n".encode())
        if test.name == fail:
            raise errors.TestbedFailure(f"lost the testbed in {test.name}")
        out.record(TestResult(test.name, Verdict.PASS))

    run = ParallelRun(console, outputs, fake_worker(1), count, open_more, run_test)
    try:
        run.run([spec(n) for n in names])
    except BaseException:
        outputs.close()
        raise
    outputs.summary.seek(0)
    return outputs, on_testbed


def test_results_come_in_the_control_files_order(capsys: pytest.CaptureFixture[str]) -> None:
    # the first test is the slowest: the others end before it
    outputs, on_testbed = run_parallel(
        ["slow", "quick-1", "quick-2", "quick-3"], {"slow": 1.0, "quick-1": 0.2}
    )
    seen = capsys.readouterr()
    assert seen.out.splitlines() == [
        "slow output", "slow                 PASS",
        "quick-1 output", "quick-1              PASS",
        "quick-2 output", "quick-2              PASS",
        "quick-3 output", "quick-3              PASS",
    ]  # fmt: skip
    assert [r.name for r in outputs.status.results] == ["slow", "quick-1", "quick-2", "quick-3"]
    assert outputs.summary.read().decode().split() == [
        "slow", "PASS", "quick-1", "PASS", "quick-2", "PASS", "quick-3", "PASS",
    ]  # fmt: skip
    # each test's lines together; a testbed's opening lines come with its first test
    lines = [re.sub(r" \[[\d:]+\]", "", line) for line in seen.err.splitlines()]
    starts = [line.split(": ", 1)[1] for line in lines if "starts" in line or "opened" in line]
    assert [line for line in starts if "starts" in line] == [
        f"test {name}: starts" for name in ("slow", "quick-1", "quick-2", "quick-3")
    ]
    used = {t.split("@")[1] for t in on_testbed}
    assert len(on_testbed) == 4 and len(used) >= 2 and used <= {"1", "2", "3"}  # at once
    for number in used - {"1"}:
        first_there = next(t.split("@")[0] for t in on_testbed if t.endswith("@" + number))
        at = starts.index(f"testbed {number} opened")
        assert starts[at + 1] == f"test {first_there}: starts"
    outputs.close()


def test_an_error_ends_the_run_after_the_results_before_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    RELEASED.clear()
    with pytest.raises(errors.TestbedFailure, match="lost the testbed in second"):
        run_parallel(
            ["first", "second", "third", "fourth", "fifth"],
            {"first": 1.0, "second": 0.3, "third": 0.6},
            fail="second",
        )
    out = capsys.readouterr().out.splitlines()
    # first's result although second failed before first ended; nothing after second
    assert out == ["first output", "first                PASS", "second output"]
    # third was running: its testbed went at once (first's, still running, was kept)
    assert len(RELEASED) == 1


def test_a_testbed_that_does_not_open_leaves_its_tests_to_the_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    console = Console()
    outputs = RunOutputs(RunOptions(packages=(), virt_argv=()), console)
    ran: list[str] = []
    lock = threading.Lock()

    def open_more(number: int, opening: HeldConsole, register: object) -> Worker:
        raise errors.TestbedFailure("no memory for another guest")

    def run_test(worker: Worker, test: TestSpec, c: HeldConsole, out: HeldOutputs) -> None:
        with lock:
            ran.append(test.name)
        out.record(TestResult(test.name, Verdict.PASS))

    ParallelRun(console, outputs, fake_worker(1), 3, open_more, run_test).run(
        [spec("a"), spec("b"), spec("c")]
    )
    assert ran == ["a", "b", "c"]
    err = capsys.readouterr().err
    assert "WARNING: testbed 2 could not be opened (no memory for another guest): not used" in err
    outputs.close()


def test_how_many_testbeds(capsys: pytest.CaptureFixture[str]) -> None:
    console = Console()
    qemu = frozenset({"revert", with_value(PARALLEL, "2432")})
    assert parallel.testbeds_for(1, 6, qemu, "qemu", console, 100_000) == 1
    assert parallel.testbeds_for(4, 6, qemu, "qemu", console, 100_000) == 4
    assert parallel.testbeds_for(4, 2, qemu, "qemu", console, 100_000) == 2  # no more than tests
    assert capsys.readouterr().err == ""
    # 5000 MiB free, 512 kept for the host: one more beside the running one
    assert parallel.testbeds_for(4, 6, qemu, "qemu", console, 5000) == 2
    err = capsys.readouterr().err
    assert "WARNING: -j 4: 5000 MiB of memory free holds 2 testbeds of 2432 MiB" in err
    assert parallel.testbeds_for(3, 6, frozenset({"revert"}), "ssh", console, 100_000) == 1
    assert "-j 3: ssh cannot run beside itself: one test at a time" in capsys.readouterr().err


def test_available_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  24000000 kB\nMemAvailable:   8388608 kB\n")
    assert available_mib(meminfo) == 8192
    assert available_mib(tmp_path / "none") == 0
    assert available_mib() > 0
