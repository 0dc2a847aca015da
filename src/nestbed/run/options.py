"""The run as the user asked for it: every command-line choice, parsed and validated."""

from __future__ import annotations

from dataclasses import dataclass, field

from nestbed.log import INFO
from nestbed.run.setup import SetupRequest

# autopkgtest's default timeouts in seconds (adt_testbed.timeouts)
DEFAULT_TIMEOUTS: dict[str, int] = {
    "short": 100,
    "copy": 300,
    "install": 3000,
    "test": 10000,
    "build": 100000,
}


@dataclass(frozen=True)
class Timeouts:
    short: int = DEFAULT_TIMEOUTS["short"]
    copy: int = DEFAULT_TIMEOUTS["copy"]
    install: int = DEFAULT_TIMEOUTS["install"]
    test: int = DEFAULT_TIMEOUTS["test"]
    build: int = DEFAULT_TIMEOUTS["build"]


@dataclass(frozen=True)
class PackageArg:
    """One positional argument, classified as autopkgtest classifies it."""

    kind: str  # "unbuilt-tree" | "built-tree" (more kinds come with the sources issue)
    path: str
    built_binaries: bool


@dataclass(frozen=True)
class RunOptions:
    packages: tuple[PackageArg, ...]
    virt_argv: tuple[str, ...]  # the testbed as named: `qemu IMAGE`, `null`, `/PATH ARGS`
    virt_server: tuple[str, ...] = ()  # the same with the program's path, resolved once
    only_tests: tuple[str, ...] = ()
    skip_tests: tuple[str, ...] = ()
    output_dir: str | None = None
    logfile: str | None = None
    summary_file: str | None = None
    verbosity: int = INFO
    env: tuple[str, ...] = ()
    ignore_restrictions: frozenset[str] = frozenset()
    user: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    global_timeout: int = 0  # --timeout: the build and the tests together (run.deadline)
    json_file: str | None = None
    junit_file: str | None = None
    build_parallel: str | None = None
    setup: SetupRequest = field(default_factory=SetupRequest)
    auto_control: bool = True  # --no-auto-control: False, autodep8 is never run
    # autopkgtest's --needs-internet: run (the default), try (a failure is SKIP), skip
    needs_internet: str = "run"
    # --kernel-warnings: report the kernel's problem reports during a test, fail it, or
    # ignore them (the log is not read)
    kernel_warnings: str = "report"
    override_control: str | None = None  # the first package's control file instead of its own
    validate: bool = False  # -V: check the control file, run nothing
    gain_root: str | None = None  # dpkg-buildpackage -r
    shell_fail: bool = False  # -s: a shell after a failed build, install or test
    shell: bool = False  # a shell after every test
    apt_fallback: bool = True  # --no-apt-fallback: keep the pinning when deps fail
    jobs: int = 1  # -j: a package's tests on up to this many testbeds at once (run.parallel)
