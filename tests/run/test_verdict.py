"""The verdict order autopkgtest uses, applied to what a test did."""

from __future__ import annotations

import pytest

from nestbed.report.results import ExitStatus, TestResult, Verdict
from nestbed.run.capture import Capture
from nestbed.run.executor import TestRun, decide
from nestbed.spec.model import TestSpec


def spec(*restrictions: str) -> TestSpec:
    return TestSpec(
        name="t",
        path="debian/tests/t",
        command=None,
        restrictions=frozenset(restrictions),
        features=frozenset(),
        classes=(),
        depends=(),
    )


def ran(rc: int = 0, stderr: bytes = b"", timed_out: bool = False) -> TestRun:
    return TestRun(rc, Capture.of(b"out\n"), Capture.of(stderr), timed_out, 0.5, "")


@pytest.mark.parametrize(
    ("test", "run", "line"),
    [
        (spec(), ran(), "PASS"),
        (spec("superficial"), ran(), "PASS (superficial)"),
        (spec(), ran(3), "FAIL non-zero exit status 3"),
        (spec("flaky"), ran(3), "FLAKY non-zero exit status 3"),
        (spec(), ran(0, b"oops\nmore\n"), "FAIL stderr: oops"),
        (spec(), ran(0, b"  trailing space \t\r\n"), "FAIL stderr:   trailing space"),
        (spec("allow-stderr"), ran(0, b"oops\n"), "PASS"),
        (spec("skippable"), ran(77), "SKIP exit status 77 and marked as skippable"),
        (spec(), ran(77), "FAIL non-zero exit status 77"),
        # timeout beats everything, non-zero exit beats stderr
        (spec("skippable"), ran(77, timed_out=True), "FAIL timed out"),
        (spec("flaky"), ran(0, timed_out=True), "FLAKY timed out"),
        (spec(), ran(1, b"err\n"), "FAIL non-zero exit status 1"),
        (spec("flaky"), ran(0, b"err\n"), "FLAKY stderr: err"),
    ],
)
def test_verdict_order_matches_autopkgtest(test: TestSpec, run: TestRun, line: str) -> None:
    assert decide(test, run).text() == line


def status_of(*results: TestResult, had_tests: bool = True) -> int:
    status = ExitStatus()
    for r in results:
        status.add(r)
    status.finish_package(had_tests=had_tests)
    return status.code


def r(verdict: Verdict, superficial: bool = False) -> TestResult:
    return TestResult("t", verdict, "why", superficial=superficial)


def test_exit_codes_combine_like_autopkgtest() -> None:
    assert status_of(r(Verdict.PASS)) == 0
    assert status_of(r(Verdict.PASS), r(Verdict.SKIP)) == 2
    assert status_of(r(Verdict.PASS), r(Verdict.FLAKY)) == 2
    assert status_of(r(Verdict.FAIL)) == 4
    assert status_of(r(Verdict.FAIL), r(Verdict.SKIP)) == 6
    assert status_of(r(Verdict.PASS), r(Verdict.BADPKG)) == 12
    assert status_of(r(Verdict.BADPKG), r(Verdict.SKIP)) == 14
    # nothing positively tested: as if there were no tests
    assert status_of(r(Verdict.PASS, superficial=True)) == 8
    assert status_of(r(Verdict.SKIP)) == 8
    assert status_of(had_tests=False) == 8
    # a failure is never hidden behind "no tests"
    assert status_of(r(Verdict.FAIL), r(Verdict.PASS, superficial=True)) == 4
