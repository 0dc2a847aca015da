"""Test verdicts and how they combine into autopkgtest's exit code."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from nestbed import errors


class Verdict(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    FLAKY = "FLAKY"
    BADPKG = "BADPKG"  # dependencies not installable: printed as "FAIL badpkg"


@dataclass(frozen=True)
class TestResult:
    """What happened to one test; `line()` is the text autopkgtest prints after the name."""

    __test__ = False  # a data class, not a pytest test class

    name: str
    verdict: Verdict
    reason: str = ""
    package: str = ""
    superficial: bool = False
    duration: float = 0.0
    restrictions: tuple[str, ...] = ()
    stdout: bytes = b""
    stderr: bytes = b""
    # the kernel's problem reports logged while it ran (run.kernlog); None: not watched
    kernel_warnings: tuple[str, ...] | None = None

    def text(self) -> str:
        if self.verdict is Verdict.PASS:
            return "PASS (superficial)" if self.superficial else "PASS"
        if self.verdict is Verdict.BADPKG:
            return "FAIL badpkg"
        return f"{self.verdict.value} {self.reason}"


@dataclass(frozen=True)
class RunError:
    """The error that ended a run, as its summary names it: `kind` is "erroneous package",
    "testbed failure", "usage" or "unexpected error"."""

    kind: str
    message: str


def run_error(error: BaseException) -> RunError:
    """The RunError for what ended a run, from the runner's one exit table."""
    code = errors.exit_code(error)
    if isinstance(error, errors.UsageError):
        return RunError("usage", str(error))
    if code == errors.EXIT_BADPKG:
        return RunError("erroneous package", str(error))
    if code == errors.EXIT_TESTBED_FAILURE:
        return RunError("testbed failure", str(error))
    if isinstance(error, errors.NestbedError):
        return RunError("error", str(error))
    return RunError("unexpected error", f"{type(error).__name__}: {error}")


@dataclass
class ExitStatus:
    """autopkgtest's exit code arithmetic: bits for skipped (2), failed (4), badpkg (12)."""

    code: int = errors.EXIT_OK
    any_positive: bool = False
    results: list[TestResult] = field(default_factory=list)
    error: RunError | None = None  # what ended the run, if anything did

    def add(self, result: TestResult) -> None:
        self.results.append(result)
        if result.verdict in (Verdict.SKIP, Verdict.FLAKY):
            self.code |= errors.EXIT_SKIPPED
        elif result.verdict is Verdict.FAIL:
            self.code |= errors.EXIT_FAILED
        elif result.verdict is Verdict.BADPKG:
            self.code |= errors.EXIT_BADPKG
        elif not result.superficial:
            # a superficial pass is neutral: it does not count as having tested anything
            self.any_positive = True

    def fail(self, error: BaseException) -> None:
        """An error ended the run (or a part it cannot do without): its exit code, from
        the runner's one table."""
        self.code = errors.exit_code(error)
        if self.error is None:
            self.error = run_error(error)

    def finish_package(self, had_tests: bool) -> None:
        """After one package: no tests, or nothing positively tested, is exit 8 (autopkgtest)."""
        if not had_tests or (
            self.code in (errors.EXIT_OK, errors.EXIT_SKIPPED) and not self.any_positive
        ):
            self.code = errors.EXIT_NO_TESTS
        self.any_positive = False
