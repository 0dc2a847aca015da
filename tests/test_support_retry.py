"""The nested tests' one retry after a level-1 fault retries that fault and nothing else."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from nestbed import errors
from tests_support import LEVEL1_RESET, LEVEL1_SILENT, once_more_after_a_level1_fault

Attempt = Callable[[], subprocess.CompletedProcess[str]]


def _attempts(*outcomes: object) -> tuple[list[int], Attempt]:
    calls: list[int] = []

    def attempt() -> subprocess.CompletedProcess[str]:
        calls.append(1)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, subprocess.CompletedProcess)
        return outcome

    return calls, attempt


def _done(rc: int, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["nestbed"], rc, "", stderr)


@pytest.mark.parametrize(
    "first",
    [
        _done(16, f"lost the testbed: the control channel closed (QEMU ended: {LEVEL1_RESET})"),
        errors.TestbedFailure(f"testbed exec prefix failed with exit status 255: {LEVEL1_RESET}"),
        subprocess.TimeoutExpired(["nestbed"], 1500),
        _done(16, f"nestbed-virt-qemu: lost the testbed: {LEVEL1_SILENT} 120 s (the guest hangs"),
        _done(16, "nestbed-virt-qemu: lost the testbed: the control channel closed (QEMU ended:"
              " the guest panicked); console ends: [  52.1] BUG: unable to handle page fault"),
        _done(16, "lost the testbed: the guest kernel panicked: Kernel panic - not syncing: Fatal"),
        _done(4, "nestbed-vm: error: --install failed: testbed exec prefix failed with exit"
              f" status 255: lost the testbed (QEMU ended: {LEVEL1_RESET}, no reboot ...)"),
    ],
)
def test_a_level1_fault_is_run_once_more_with_a_warning(first: object) -> None:
    calls, attempt = _attempts(first, _done(0))
    with pytest.warns(UserWarning, match="level-1 fault in a nested run"):
        result = once_more_after_a_level1_fault(attempt)
    assert len(calls) == 2 and result.returncode == 0


@pytest.mark.parametrize(
    "first",
    [_done(0), _done(4, "FAIL"), _done(16, "qemu: no such file"), _done(4, f"FAIL {LEVEL1_RESET}")],
)
def test_any_other_outcome_is_the_result(first: subprocess.CompletedProcess[str]) -> None:
    calls, attempt = _attempts(first, _done(0))
    assert once_more_after_a_level1_fault(attempt) is first
    assert len(calls) == 1


def test_other_testbed_failures_and_a_second_fault_are_raised() -> None:
    calls, attempt = _attempts(errors.TestbedFailure("the agent said no"))
    with pytest.raises(errors.TestbedFailure, match="the agent said no"):
        once_more_after_a_level1_fault(attempt)
    timeout = subprocess.TimeoutExpired(["nestbed"], 1500)
    calls, attempt = _attempts(timeout, timeout)
    with pytest.warns(UserWarning), pytest.raises(subprocess.TimeoutExpired):
        once_more_after_a_level1_fault(attempt)
    assert len(calls) == 2
