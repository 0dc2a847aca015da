"""Error types and the runner's exit table: the one place that maps them to autopkgtest's
exit codes. (The virt servers, `nestbed image` and `nestbed-vm` have tables of their own,
each in its entry point, as their users read other numbers.)"""

from __future__ import annotations

# autopkgtest(1), EXIT STATUS
EXIT_OK = 0
EXIT_SKIPPED = 2
EXIT_FAILED = 4
EXIT_NO_TESTS = 8
EXIT_BADPKG = 12
EXIT_TESTBED_FAILURE = 16
EXIT_UNEXPECTED = 20


class NestbedError(Exception):
    """Base of every error a user may see as one line; `exit_code` says how the run ends."""

    exit_code = EXIT_UNEXPECTED


class UsageError(NestbedError):
    """Bad command line (autopkgtest exits 20 for these too)."""

    exit_code = EXIT_UNEXPECTED


class BadPackage(NestbedError):
    """The package under test is erroneous: invalid control file, missing test, uninstallable."""

    exit_code = EXIT_BADPKG


class InvalidControl(BadPackage):
    """debian/tests/control cannot be parsed; the message names file, line and field."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        where = path if line is None else f"{path}:{line}"
        what = f"field {field}: " if field else ""
        super().__init__(f"{where}: {what}{message}")


class TestbedFailure(NestbedError):
    """The testbed broke (virt server died, exec prefix exited 254/255, timeout in setup)."""

    exit_code = EXIT_TESTBED_FAILURE


class VirtServerError(TestbedFailure):
    """The virt server answered a command with an error or exited."""


def exit_code(error: BaseException) -> int:
    """What an error that ends the run makes it exit with: a NestbedError's class says
    (12 erroneous package, 16 testbed failure, 20 bad usage); anything else is 20."""
    return error.exit_code if isinstance(error, NestbedError) else EXIT_UNEXPECTED
