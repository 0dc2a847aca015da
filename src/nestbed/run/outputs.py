"""What a run leaves behind: result lines, the summary file, the output directory's files,
the machine-readable results, and the exit status they add up to."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from nestbed.log import Console, HeldConsole
from nestbed.report.machine import write_json, write_junit
from nestbed.report.results import ExitStatus, TestResult
from nestbed.run.capture import Capture
from nestbed.run.options import RunOptions


@dataclass
class TestbedFacts:
    """What the run learnt about the testbed once it opened (testinfo.json records it)."""

    __test__ = False  # a data class, not a pytest test class

    arch: str = ""
    nproc: str = ""
    kernel: str = ""
    cpu_model: str = ""
    cpu_flags: str = ""


class RunOutputs:
    """The output directory (ours, removed at the end, unless -o named one), the log file,
    the summary file and the exit status; `close()` releases them."""

    def __init__(self, options: RunOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.status = ExitStatus()
        self.started = time.time()
        self._own_dir = options.output_dir is None
        if options.output_dir is None:
            self.dir = tempfile.mkdtemp(prefix="nestbed.output.")
            os.chmod(self.dir, 0o755)
        else:
            os.makedirs(options.output_dir, exist_ok=True)
            self.dir = options.output_dir
        try:
            logfile = options.logfile or (
                os.path.join(options.output_dir, "log") if options.output_dir else None
            )
            if logfile:
                console.open_logfile(logfile)
            summary = options.summary_file or os.path.join(self.dir, "summary")
            self.summary: BinaryIO = open(summary, "w+b", buffering=0)  # noqa: SIM115
        except BaseException:
            # nothing of ours stays behind when the run cannot even start
            console.close()
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    @property
    def keeps_files(self) -> bool:
        """The user asked for an output directory: per-test files are written there."""
        return not self._own_dir

    # -- result lines ---------------------------------------------------------------------
    def summary_line(self, text: str) -> None:
        self.summary.write(text.encode("UTF-8", "replace") + b"\n")

    def result_line(self, text: str) -> None:
        self.console.stdout_line(text)
        self.summary_line(text)

    def report(self, name: str, text: str) -> None:
        self.result_line(f"{name:<20} {text}")

    def record(self, result: TestResult) -> None:
        self.report(result.name, result.text())
        self.status.add(result)

    def blame(self, blamed: Sequence[str], error: str) -> None:
        """autopkgtest's two lines for an erroneous package."""
        self.result_line("blame: " + " ".join(blamed))
        self.result_line(f"badpkg: {error}")

    def show_summary(self) -> None:
        self.summary.seek(0)
        self.console.info("@@@@@@@@@@@@@@@@@@@@ summary")
        self.console.write_stderr(self.summary.read())

    # -- files in the output directory ------------------------------------------------------
    def write_testbed_packages(self, listing: str) -> None:
        with open(os.path.join(self.dir, "testbed-packages"), "w") as f:
            f.write(listing)

    def write_package_version(self, name: str, version: str) -> None:
        if self.keeps_files:
            with open(os.path.join(self.dir, "testpkg-version"), "w") as f:
                f.write(f"{name} {version}\n")

    def write_test_streams(self, test: str, stdout: Capture, stderr: Capture) -> None:
        for suffix, data in (("stdout", stdout), ("stderr", stderr)):
            if data:
                data.save(os.path.join(self.dir, f"{test}-{suffix}"))

    def write_test_packages(self, test: str, listing: str) -> None:
        """The packages new since the testbed opened (by name, as autopkgtest's join -v2)."""
        base_path = os.path.join(self.dir, "testbed-packages")
        base = set()
        if os.path.exists(base_path):
            with open(base_path) as f:
                base = {line.split("\t", 1)[0] for line in f}
        extra = [line for line in listing.splitlines() if line.split("\t", 1)[0] not in base]
        with open(os.path.join(self.dir, f"{test}-packages"), "w") as f:
            f.write("".join(line + "\n" for line in extra))

    @property
    def artifacts_dir(self) -> str:
        return os.path.join(self.dir, "artifacts")

    # -- files at the end -------------------------------------------------------------------
    def write_testinfo(self, facts: TestbedFacts) -> None:
        # as autopkgtest records it: the server program's name, then its arguments
        argv = list(self.options.virt_argv)
        if argv and "/" not in argv[0] and self.options.virt_server:
            argv[0] = os.path.basename(self.options.virt_server[0])
        info: dict[str, object] = {"virt_server": " ".join(shlex.quote(w) for w in argv)}
        if facts.kernel:
            info["kernel_version"] = facts.kernel
        if self.options.env:
            info["custom_environment"] = list(self.options.env)
        if facts.nproc:
            info["nproc"] = facts.nproc
        if facts.cpu_model:
            info["cpu_model"] = facts.cpu_model
        if facts.cpu_flags:
            info["cpu_flags"] = facts.cpu_flags
        try:
            with open(os.path.join(self.dir, "testinfo.json"), "w") as f:
                json.dump(info, f, indent=2)
        except OSError as e:
            self.console.error(f"cannot write testinfo.json: {e}")

    def write_machine_results(self) -> None:
        """--json and --junit; a failure to write them is the run's failure (exit 20)."""
        try:
            write_machine_results(
                self.options.json_file, self.options.junit_file, self.status, self.started
            )
        except OSError as e:
            self.console.error(f"cannot write results: {e}")
            self.status.fail(e)

    def close(self) -> None:
        self.summary.close()
        self.console.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class HeldOutputs(RunOutputs):
    """The run's outputs as one test running beside others sees them: the same directory
    and files, but its result and summary lines and its verdict wait, with its console's
    lines, until `release` (a parallel run's results come in the control file's order)."""

    def __init__(self, run: RunOutputs, console: HeldConsole) -> None:
        # not RunOutputs.__init__: the run's files are open already, and stay the run's
        self.__dict__.update(run.__dict__)
        self.console = self._held = console
        self._run = run
        self._pending: list[Callable[[], None]] = []

    def summary_line(self, text: str) -> None:
        self._pending.append(lambda: self._run.summary_line(text))

    def record(self, result: TestResult) -> None:
        self.report(result.name, result.text())
        self._pending.append(lambda: self._run.status.add(result))

    def release(self) -> None:
        self._held.release()
        for step in self._pending:
            step()
        self._pending.clear()

    def close(self) -> None:
        raise AssertionError("the run's outputs are closed by the run")


def write_machine_results(
    json_file: str | None, junit_file: str | None, status: ExitStatus, started: float
) -> None:
    """--json and --junit as `status` has it: also when an error ended the run, or before
    it started (bad usage: no tests, the error, exit 20). Raises OSError."""
    if json_file:
        write_json(json_file, status.results, status.code, status.error)
    if junit_file:
        write_junit(junit_file, status.results, status.error, started)
