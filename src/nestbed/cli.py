"""Command line: autopkgtest's options and argument order, mapped onto RunOptions."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import NoReturn

from nestbed import errors, trace
from nestbed.log import DEBUG, INFO, PLAIN, QUIET, program_name
from nestbed.run.options import DEFAULT_TIMEOUTS, RunOptions, Timeouts
from nestbed.run.setup import APT_UPGRADE, SetupRequest, read_command
from nestbed.sources import classify
from nestbed.testbed.client import resolve_virt_server

_log = logging.getLogger(__name__)
# before the run has a Console: `nestbed: error: ...`, as a bad command line always said
_PLAIN = {"style": PLAIN}

DESCRIPTION = """\
Run the as-installed tests (DEP-8, debian/tests/control) of a Debian source package in a
testbed, exactly as autopkgtest would: same options, result lines, summary file, output
directory and exit codes.

  nestbed [options] PACKAGE... [-- VIRT-SERVER [virt-server options]]

PACKAGE (as autopkgtest takes it): an unbuilt source tree (a directory with debian/control;
built in the testbed unless -B), a built tree, a .dsc, a .changes, .deb files to test instead
of the archive's, a source package name (apt-get source in the testbed), or a git URL.

VIRT-SERVER is the testbed. Without "-- VIRT-SERVER" the tests run in a QEMU virtual
machine of nestbed's default image (Debian bookworm from this machine's apt mirror, built
and cached the first time: see "nestbed image --help"); when a test declares needs-baseimage,
the --nested image (QEMU and nestbed inside), which the VM also gets as /dev/baseimage to boot
VMs of its own from (docs/nested.md).
  qemu IMAGE  a throwaway VM of IMAGE (nestbed-virt-qemu --help); IMAGE is never written
  null        the host itself (nestbed-virt-null). As root, test dependencies are
              INSTALLED ON THIS MACHINE with apt, and tests can change it: use null only
              on a machine you can throw away.
  NAME        nestbed-virt-NAME, else autopkgtest's autopkgtest-virt-NAME (beside nestbed,
              then on PATH): -- schroot CHROOT, -- chroot DIR, -- lxc CONTAINER, -- ssh ...
  autopkgtest-virt-NAME, nestbed-virt-NAME   that program (from PATH)
  /PATH       any virt server program, e.g. /usr/bin/autopkgtest-virt-null

Examples:
  nestbed ./hello                              build and test hello in a fresh VM
  nestbed -B ./hello -- null                   run hello's tests on this host, no build
  nestbed -o out --test-name smoke . -- null   one test, results in ./out
  nestbed @args.txt                            read arguments from a file, one per line
  nestbed image build --nested                 build a VM image (see nestbed image --help)
"""

EPILOG = """\
Result lines (stdout and the summary file): "TEST-NAME  PASS|FAIL reason|SKIP reason|FLAKY reason".

Exit status (as autopkgtest):
  0   all tests passed
  2   at least one test was skipped (or at least one flaky test failed)
  4   at least one test failed
  6   at least one test failed and at least one test skipped
  8   no tests in this package, or all non-superficial tests were skipped
  12  erroneous package (invalid control file, missing test, uninstallable dependencies)
  14  erroneous package and at least one test skipped
  16  testbed failure
  20  other unexpected failures, including bad usage
"""


def expand_argfiles(argv: Sequence[str], depth: int = 0) -> list[str]:
    """autopkgtest's @FILE: each line of FILE is one argument (stripped); files may nest."""
    if depth > 10:
        raise errors.UsageError("@argfiles nested too deeply")
    out: list[str] = []
    for arg in argv:
        if arg.startswith("@") and len(arg) > 1:
            try:
                with open(arg[1:], encoding="UTF-8") as f:
                    lines = [line.strip() for line in f]
            except (OSError, UnicodeDecodeError) as e:
                raise errors.UsageError(f"cannot read argument file {arg[1:]}: {e}") from e
            out += expand_argfiles([line for line in lines if line], depth + 1)
        else:
            out.append(arg)
    return out


class _UsageErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line and map to autopkgtest's usage exit code."""

    def error(self, message: str) -> NoReturn:
        raise errors.UsageError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> _UsageErrorParser:
    p = _UsageErrorParser(
        prog=program_name(),
        usage="%(prog)s [options] PACKAGE... [-- VIRT-SERVER [virt-server options]]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument("packages", nargs="*", metavar="PACKAGE", help="source tree(s) to test")

    _add_selection(p)
    _add_logging(p)
    _add_environment(p)
    _add_setup(p)
    _add_timeouts(p)
    _add_debugging(p)
    p.add_argument("-h", "--help", action="help", help="show this help and exit")
    return p


def _add_selection(p: argparse.ArgumentParser) -> None:
    """Options: which tests run, and with which binaries."""
    g = p.add_argument_group("test selection")
    g.add_argument(
        "--test-name",
        "--testname",
        dest="only_tests",
        action="append",
        default=[],
        metavar="TEST",
        help="run only this test (repeatable)",
    )
    g.add_argument(
        "--skip-test",
        dest="skip_tests",
        action="append",
        default=[],
        metavar="TEST",
        help="do not run this test (repeatable)",
    )
    g.add_argument(
        "-B",
        "--no-built-binaries",
        dest="built_binaries",
        action="store_false",
        default=True,
        help="do not build the package; test with the archive's binaries",
    )
    g.add_argument(
        "--no-auto-control",
        dest="auto_control",
        action="store_false",
        default=True,
        help="do not generate tests with autodep8 (run by default for a package with no"
        " debian/tests/control or with Testsuite: autopkgtest-pkg-*)",
    )
    g.add_argument(
        "--override-control",
        metavar="PATH",
        help="read the (first) package's tests from control file PATH instead of its "
        "debian/tests/control",
    )
    g.add_argument(
        "-V",
        "--validate",
        action="store_true",
        help="check the test control file and exit: '*  Test specification is valid' "
        "(exit 0), or erroneous package (exit 12); no test runs",
    )
    g.add_argument(
        "--needs-internet",
        choices=("run", "try", "skip"),
        default="run",
        help="tests with the needs-internet restriction: run them (default), try them (a "
        "non-zero exit is SKIP, not FAIL) or skip them",
    )
    g.add_argument(
        "--kernel-warnings",
        choices=("report", "fail", "ignore"),
        default="report",
        help="in a testbed with its own kernel (a VM), the kernel's problem reports logged "
        "during a test (Oops, BUG, WARNING, panic, hung task, RCU stall, lockdep, KASAN, "
        "UBSAN) are logged and recorded (--json: kernel_warnings); 'fail' also makes a "
        "test that passed FAIL with the first of them as the reason; 'ignore' does not "
        "read the kernel log (default: report)",
    )


def _add_logging(p: argparse.ArgumentParser) -> None:
    """Options: where logs and results go, and how much is said."""
    g = p.add_argument_group("logging and results")
    g.add_argument("-o", "--output-dir", metavar="DIR", help="write all results and logs to DIR")
    g.add_argument("-l", "--log-file", dest="logfile", metavar="FILE", help="copy the log to FILE")
    g.add_argument(
        "--summary-file",
        "--summary",
        dest="summary",
        metavar="FILE",
        help="write result lines to FILE",
    )
    g.add_argument(
        "--json",
        dest="json_file",
        metavar="FILE",
        help="write one JSON record per test, the exit code and the error that ended the run "
        "(also on exit 12, 16 and 20)",
    )
    g.add_argument(
        "--junit",
        dest="junit_file",
        metavar="FILE",
        help="write JUnit XML (GitLab, Jenkins; each test's output cut to its first MiB; the "
        "error that ended the run is an error case)",
    )
    g.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=QUIET,
        default=INFO,
        help="print only results and errors",
    )
    g.add_argument(
        "-d",
        "--debug",
        dest="verbosity",
        action="store_const",
        const=DEBUG,
        help="print debugging output",
    )


def _add_environment(p: argparse.ArgumentParser) -> None:
    """Options: what a test's environment is, and who runs it."""
    g = p.add_argument_group("test environment")
    g.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="set an environment variable for tests (repeatable)",
    )
    g.add_argument("--set-lang", metavar="LANGVAL", help="set LANG for tests (default C.UTF-8)")
    g.add_argument(
        "--ignore-restrictions",
        action="append",
        default=[],
        metavar="R1,R2",
        help="run tests even if these restrictions would skip them",
    )
    g.add_argument(
        "-u",
        "--user",
        metavar="USER",
        help="run tests without needs-root as USER (default: the testbed's suggested user)",
    )
    g.add_argument("--build-parallel", metavar="N", help="DEB_BUILD_OPTIONS parallel=N")
    g.add_argument(
        "--gain-root",
        metavar="COMMAND",
        help="build with dpkg-buildpackage -rCOMMAND (e.g. fakeroot, sudo) instead of "
        "installing fakeroot for a build as the normal user",
    )


def _add_debugging(p: argparse.ArgumentParser) -> None:
    """Options: a shell in the testbed, to look at what a test left."""
    g = p.add_argument_group("debugging")
    g.add_argument(
        "-s",
        "--shell-fail",
        action="store_true",
        help="run an interactive shell in the testbed after a failed build, dependency "
        "installation or test (needs a terminal on stdin; without one: a note, no shell)",
    )
    g.add_argument(
        "--shell",
        action="store_true",
        help="run an interactive shell in the testbed after every test",
    )


def _add_setup(p: argparse.ArgumentParser) -> None:
    """Options: what is done to the testbed before the tests."""
    g = p.add_argument_group("testbed setup (applied again after every revert)")
    g.add_argument(
        "-j",
        "--jobs",
        type=_jobs,
        default=1,
        metavar="N",
        help="run a package's tests on up to N testbeds at once, each set up as the first"
        " (nestbed's qemu and unshare testbeds; others run one test at a time); results"
        " come in the control file's order, as without -j; N is capped by the memory"
        " free for the testbeds (default 1)",
    )
    g.add_argument(
        "--setup-commands",
        action="append",
        default=[],
        metavar="COMMANDS_OR_FILE",
        help="run these shell commands as root after opening the testbed (exit 100: the "
        "package's fault, exit 12; other failures: testbed failure, exit 16); a file, or a "
        "shipped one by name: setup-testbed, enable-sudo, create-normal-user (autopkgtest's "
        "when it is installed, else nestbed's own copies of the last two)",
    )
    g.add_argument(
        "-U",
        "--apt-upgrade",
        dest="setup_commands",
        action="append_const",
        const=APT_UPGRADE,
        help="apt-get update and dist-upgrade the testbed first",
    )
    g.add_argument(
        "--setup-commands-boot",
        action="append",
        default=[],
        metavar="COMMANDS_OR_FILE",
        help="like --setup-commands, and again after every reboot of the testbed",
    )
    g.add_argument(
        "--add-apt-source",
        action="append",
        default=[],
        metavar="'deb URL SUITE COMPONENT'",
        help="add an apt source line in the testbed",
    )
    g.add_argument(
        "--apt-pocket",
        action="append",
        default=[],
        metavar="POCKET[=PKG,src:SRC,...]",
        help="add the RELEASE-POCKET suite of the testbed's mirror; with packages, take "
        "only those from it (pinned)",
    )
    g.add_argument(
        "--pin-packages",
        action="append",
        default=[],
        metavar="RELEASE=PKG,src:SRC,...",
        help="take these packages from RELEASE (apt pinning, priority 995)",
    )
    g.add_argument(
        "--add-apt-release",
        action="append",
        default=[],
        metavar="RELEASE",
        help="add deb and deb-src lines for RELEASE, from the mirror and components of the "
        "testbed's first apt source",
    )
    g.add_argument(
        "--apt-default-release",
        metavar="SUITE_OR_CODENAME",
        help="apt's default release (pinned at 990), for --apt-pocket and --pin-packages; "
        "default: the first release in the testbed's apt sources",
    )
    g.add_argument(
        "--no-apt-fallback",
        dest="apt_fallback",
        action="store_false",
        default=True,
        help="when pinned packages (--apt-pocket, --pin-packages) make a test's dependencies "
        "unsatisfiable, do not retry without the pinning",
    )
    g.add_argument(
        "--copy",
        action="append",
        default=[],
        metavar="HOSTPATH:TESTBEDPATH",
        help="copy a file or directory into the testbed",
    )


def _add_timeouts(p: argparse.ArgumentParser) -> None:
    """Options: autopkgtest's timeouts and their factor."""
    g = p.add_argument_group("timeouts (seconds)")
    for kind, default in DEFAULT_TIMEOUTS.items():
        g.add_argument(
            f"--timeout-{kind}",
            type=int,
            metavar="T",
            dest=f"timeout_{kind}",
            help=f"{kind} timeout (default {default})",
        )
    g.add_argument(
        "--timeout",
        type=_seconds,
        default=0,
        metavar="T",
        dest="global_timeout",
        help="global timeout: the build and the tests together get T seconds from the "
        "testbed's start; a test that reaches it FAILs (timed out) and the rest are "
        "SKIPped (default 0: none)",
    )
    g.add_argument(
        "--timeout-factor",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="multiply all default timeouts by FACTOR",
    )


def _whole_number(value: str, least: int, of: str, below: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number{of}: {value!r}") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"{below}: {value}")
    return number


def _jobs(value: str) -> int:
    return _whole_number(value, 1, "", "at least 1")


def _seconds(value: str) -> int:
    return _whole_number(value, 0, " of seconds", "a timeout cannot be negative")


def _split_virt(argv: list[str]) -> tuple[list[str], list[str] | None]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, None


def _check_output_paths(ns: argparse.Namespace) -> None:
    """Where results go must be writable before any testbed starts: an error names the
    option. The files are created (empty) here, as autopkgtest empties -l and --summary-file
    before it starts; -o is created as autopkgtest does."""
    if ns.output_dir:
        try:
            os.makedirs(ns.output_dir, exist_ok=True)
        except OSError as e:
            raise errors.UsageError(f"-o/--output-dir {ns.output_dir}: {e.strerror}") from None
        if not os.access(ns.output_dir, os.W_OK | os.X_OK):
            raise errors.UsageError(f"-o/--output-dir {ns.output_dir}: not writable")
    for option, path in (
        ("-l/--log-file", ns.logfile),
        ("--summary-file", ns.summary),
        ("--json", ns.json_file),
        ("--junit", ns.junit_file),
    ):
        if path is None:
            continue
        if os.path.isdir(path):
            raise errors.UsageError(f"{option} {path}: is a directory")
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise errors.UsageError(f"{option} {path}: {e.strerror}") from None


def machine_result_paths(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """--json and --junit from a command line that may not parse: where a usage error is
    written too (the options before a "--", after @argfiles where they can be read)."""
    try:
        args = expand_argfiles(argv)
    except errors.UsageError:
        args = list(argv)
    ours, _ = _split_virt(args)
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--json", dest="json_file")
    p.add_argument("--junit", dest="junit_file")
    try:
        ns, _ = p.parse_known_args(ours)
    except SystemExit:  # e.g. --json without its value
        return None, None
    return ns.json_file, ns.junit_file


def _write_error_results(argv: Sequence[str], error: errors.NestbedError) -> None:
    """A run that ends before it starts still leaves its --json/--junit: no tests, the error."""
    json_file, junit_file = machine_result_paths(argv)
    if not json_file and not junit_file:
        return
    from nestbed.report.results import ExitStatus
    from nestbed.run.outputs import write_machine_results

    status = ExitStatus()
    status.fail(error)
    # a path that cannot be written is (most likely) the usage error just reported
    with contextlib.suppress(OSError):
        write_machine_results(json_file, junit_file, status, time.time())


def parse_args(argv: Sequence[str]) -> RunOptions:
    parser = _build_parser()
    # expand @argfiles first, so a "--" inside one splits like on the command line
    ours, virt = _split_virt(expand_argfiles(argv))
    ns = parser.parse_args(ours)
    if virt is not None and not virt:
        parser.error("no testbed after --: name one, e.g. '-- null' or '-- qemu IMAGE'")
    # an unknown testbed is a usage error, before anything starts
    server = (*resolve_virt_server(virt[0]), *virt[1:]) if virt else ()
    for e in ns.env:
        if "=" not in e:
            parser.error(f"--env must be VAR=value, got {e!r}")
    env = list(ns.env)
    if ns.set_lang:
        env.append("LANG=" + ns.set_lang)
    classified = classify(ns.packages, ns.built_binaries)
    copies = []
    for item in ns.copy:
        host, sep, tb = item.partition(":")
        if not sep or not host or not tb:
            parser.error(f"--copy argument must be HOSTPATH:TESTBEDPATH: {item}")
        if not os.path.exists(host):
            parser.error(f"--copy host path {host} does not exist")
        copies.append((host, tb))
    for item in ns.pin_packages:
        if "=" not in item:
            parser.error(f"--pin-packages must be RELEASE=PACKAGE,...: {item}")
    setup = SetupRequest(
        setup_commands=tuple(read_command(c) for c in ns.setup_commands),
        setup_commands_boot=tuple(read_command(c) for c in ns.setup_commands_boot),
        copies=tuple(copies),
        add_apt_sources=tuple(ns.add_apt_source),
        apt_pockets=tuple(ns.apt_pocket),
        pin_packages=tuple(ns.pin_packages),
        add_apt_releases=tuple(ns.add_apt_release),
        apt_default_release=ns.apt_default_release,
    )
    if ns.override_control is not None and not os.access(ns.override_control, os.R_OK):
        raise errors.UsageError(f"--override-control: cannot read {ns.override_control}")
    if ns.output_dir and os.path.isdir(ns.output_dir) and os.listdir(ns.output_dir):
        raise errors.UsageError(f'--output-dir "{ns.output_dir}" is not empty')
    _check_output_paths(ns)
    timeouts = Timeouts(
        **{
            kind: (
                getattr(ns, f"timeout_{kind}")
                if getattr(ns, f"timeout_{kind}") is not None
                else int(default * ns.timeout_factor)
            )
            for kind, default in DEFAULT_TIMEOUTS.items()
        }
    )
    return RunOptions(
        packages=classified,
        virt_argv=tuple(virt or ()),
        virt_server=server,
        only_tests=tuple(ns.only_tests),
        skip_tests=tuple(ns.skip_tests),
        output_dir=ns.output_dir,
        logfile=ns.logfile,
        summary_file=ns.summary,
        verbosity=ns.verbosity,
        env=tuple(env),
        ignore_restrictions=frozenset(
            r for item in ns.ignore_restrictions for r in item.split(",") if r
        ),
        user=ns.user,
        timeouts=timeouts,
        global_timeout=ns.global_timeout,
        json_file=ns.json_file,
        junit_file=ns.junit_file,
        build_parallel=ns.build_parallel,
        setup=setup,
        auto_control=ns.auto_control,
        needs_internet=ns.needs_internet,
        kernel_warnings=ns.kernel_warnings,
        override_control=ns.override_control,
        validate=ns.validate,
        gain_root=ns.gain_root,
        shell_fail=ns.shell_fail,
        shell=ns.shell,
        apt_fallback=ns.apt_fallback,
        jobs=ns.jobs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    trace.process_ready("nestbed")
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["image"]:
        from nestbed.image.cli import main as image_main

        return image_main(args[1:])
    try:
        options = parse_args(args)
    except errors.NestbedError as e:
        _log.error(str(e), extra=_PLAIN)
        _write_error_results(args, e)
        return errors.exit_code(e)
    from nestbed.run.prescan import declared_restrictions

    # read once on the host: the image to boot, and what the virt server is told
    declared = declared_restrictions(options.packages) - options.ignore_restrictions
    if not options.virt_argv:
        try:
            # a test that boots nested VMs needs an image with QEMU (and nestbed) inside
            image = default_image(nested="needs-baseimage" in declared)
            server = (*resolve_virt_server("qemu"), image)
            options = replace(options, virt_argv=("qemu", image), virt_server=server)
        except errors.NestbedError as e:
            _log.error(str(e), extra=_PLAIN)
            _write_error_results(args, e)
            return errors.exit_code(e)
    from nestbed.run.runner import run

    return run(options, declared)


def default_image(nested: bool = False) -> str:
    """No testbed named: a QEMU VM of the default image (the --nested one when a test needs
    the base image), built (with progress) the first time."""
    from nestbed.image.build import ensure_image
    from nestbed.image.config import BuildOptions
    from nestbed.image.progress import for_stream

    progress = for_stream(sys.stderr)
    try:
        return str(ensure_image(BuildOptions(nested=nested), progress=progress).directory)
    finally:
        progress.close()


def build_parser() -> argparse.ArgumentParser:
    """The parser --help prints; the man page (nestbed.manpage) is made from it too."""
    return _build_parser()


if __name__ == "__main__":
    sys.exit(main())
