"""The differential cases: a fixture package, extra options, and what autopkgtest 5.28 gives.

`results` are autopkgtest's result lines on stdout exactly (apt's output and the tests'
own output, which autopkgtest also prints on stdout on the null testbed, left out);
`{arch}` stands for the host's dpkg architecture. `files` are paths that must be in the
output directory. The baseline test checks these against autopkgtest itself, so a
fixture that stops doing what its case says is noticed; the differential test then
holds nestbed to whatever autopkgtest does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

OVERRIDE_CONTROL = Path(__file__).resolve().parents[1] / "fixtures" / "override" / "control"


@dataclass(frozen=True)
class Case:
    id: str
    fixture: str
    options: tuple[str, ...]
    exit_code: int
    results: tuple[str, ...]
    files: tuple[str, ...] = ()
    # False: no --summary-file, so the summary is OUTDIR/summary
    summary_file: bool = True
    marks: tuple[pytest.MarkDecorator, ...] = field(default=())
    # Deliberate differences, each with its reason where the case is defined:
    # (regex, replacement) turning nestbed's wording into autopkgtest's, checked to
    # match first, and OUTDIR paths autopkgtest leaves behind that nestbed does not.
    nestbed_rewrites: tuple[tuple[str, str], ...] = ()
    autopkgtest_leftovers: tuple[str, ...] = ()

    def param(self) -> object:
        return pytest.param(self, id=self.id, marks=self.marks)


_MIXED_PARSE_SKIPS = (
    "unknown-restriction  SKIP unknown restriction needs-magic-unicorn",
    "unknown-field        SKIP unknown field X-nestbed-colour",
    "unknown-field-command SKIP unknown field X-nestbed-colour",
    'breaks-testbed       SKIP Test restriction "breaks-testbed" requires testbed capability'
    ' "revert-full-system"',
)

# what the tests of `mixed` give when run, in the control file's order
MIXED_RUN_RESULTS = (
    "passes               PASS",
    "fails-exit           FAIL non-zero exit status 3",
    "fails-stderr         FAIL stderr: something went wrong",
    "allowed-stderr       PASS",
    "skips                SKIP exit status 77 and marked as skippable",
    "exit77-not-skippable FAIL non-zero exit status 77",
    "flaky-fails          FLAKY non-zero exit status 1",
    "superficial-passes   PASS (superficial)",
)

_ARCH_PARSE_SKIPS = (
    "arch-positive-mismatch SKIP Test lists explicitly supported architectures, but the"
    " current architecture {arch} isn't listed.",
    "arch-negated-match   SKIP Test declares architecture as not supported: {arch}",
    "arch-mixed           SKIP It is not permitted for some archs to be prepended by an"
    " exclamation mark while others aren't",
    "arch-all             SKIP Arch 'all' not allowed in Architecture field",
    "command1             SKIP Test lists explicitly supported architectures, but the"
    " current architecture {arch} isn't listed.",
)

_NEEDS_INTERNET_SKIPS = tuple(
    f'{name:<20} SKIP Test restriction "needs-internet" requires testbed capability "has_internet"'
    for name in ("online-pass", "online-fail", "online-stderr")
)

_STANDARD_FILES = ("log", "testbed-packages", "testinfo.json", "testpkg-version")

CASES = (
    Case(
        # Without -B an unbuilt tree is built for its binaries; a source package with
        # no binary package cannot be built.
        "pass-basic-unbuilt",
        "pass-basic",
        (),
        12,
        (
            "blame: {fixtures}/pass-basic",
            "badpkg: rules build failed with exit code 2",
        ),
    ),
    Case(
        "pass-basic",
        "pass-basic",
        ("-B",),
        0,
        (
            "smoke                PASS",
            "named-command        PASS",
            "command1             PASS",
        ),
        (*_STANDARD_FILES, "smoke-stdout", "smoke-packages", "named-command-stdout"),
    ),
    Case(
        "pass-basic-summary-in-outdir",
        "pass-basic",
        ("-B", "--test-name=smoke"),
        0,
        ("smoke                PASS",),
        (*_STANDARD_FILES, "summary", "smoke-stdout"),
        summary_file=False,
    ),
    Case(
        # fail (exit and stderr) + skip: 4 | 2. Parse-time SKIP lines come twice: once
        # when autopkgtest checks whether a build is needed, once when it runs the tests.
        "mixed",
        "mixed",
        ("-B",),
        6,
        (
            *_MIXED_PARSE_SKIPS,
            *_MIXED_PARSE_SKIPS,
            *MIXED_RUN_RESULTS,
        ),
        (
            *_STANDARD_FILES,
            "fails-stderr-stderr",
            "fails-stderr-stdout",
            "allowed-stderr-stderr",
            "skips-stderr",
        ),
    ),
    Case(
        # With --test-name the second parse reports only the named Tests: skips, and no
        # Test-Command skip at all.
        "mixed-test-name",
        "mixed",
        (
            "-B",
            "--test-name=passes",
            "--test-name=unknown-field",
            "--test-name=unknown-field-command",
        ),
        2,
        (
            *_MIXED_PARSE_SKIPS,
            "unknown-field        SKIP unknown field X-nestbed-colour",
            "passes               PASS",
        ),
    ),
    Case(
        "mixed-skip-test",
        "mixed",
        (
            "-B",
            "--skip-test=fails-exit",
            "--skip-test=fails-stderr",
            "--skip-test=exit77-not-skippable",
            "--skip-test=unknown-restriction",
        ),
        2,
        (
            *_MIXED_PARSE_SKIPS,
            *_MIXED_PARSE_SKIPS,
            "passes               PASS",
            "allowed-stderr       PASS",
            "skips                SKIP exit status 77 and marked as skippable",
            "flaky-fails          FLAKY non-zero exit status 1",
            "superficial-passes   PASS (superficial)",
        ),
    ),
    Case(
        # No test matches: an ERROR on stderr, and "no tests" despite the SKIP lines.
        "mixed-test-name-unknown",
        "mixed",
        ("-B", "--test-name=no-such-test"),
        8,
        (*_MIXED_PARSE_SKIPS, "*                    SKIP no tests in this package"),
    ),
    Case(
        "arch",
        "arch",
        ("-B",),
        2,
        (
            *_ARCH_PARSE_SKIPS,
            *_ARCH_PARSE_SKIPS,
            "arch-matches         PASS",
            "arch-negated-nomatch PASS",
        ),
    ),
    Case(
        "tests-dir",
        "tests-dir",
        ("-B",),
        0,
        ("in-subdir            PASS", "cwd-is-tree-root     PASS"),
        (*_STANDARD_FILES, "in-subdir-stdout", "cwd-is-tree-root-stdout"),
    ),
    Case(
        "timeout",
        "timeout",
        ("-B", "--timeout-test=3"),
        4,
        ("sleeps               FAIL timed out", "quick                PASS"),
        (*_STANDARD_FILES, "sleeps-stdout", "quick-stdout"),
    ),
    Case(
        "environment",
        "environment",
        ("-B", "--env", "FOO=bar"),
        0,
        (
            "env-check            PASS",
            "root-check           PASS",
            "background-leak      PASS",
            "background-gone      PASS",
            "artifacts            PASS",
        ),
        (
            *_STANDARD_FILES,
            "env-check-stdout",
            "artifacts/",
            "artifacts/report.txt",
            "artifacts/sub/",
            "artifacts/sub/nested.log",
        ),
    ),
    Case(
        "environment-no-env",
        "environment",
        ("-B",),
        4,
        (
            "env-check            FAIL non-zero exit status 1",
            "root-check           PASS",
            "background-leak      PASS",
            "background-gone      PASS",
            "artifacts            PASS",
        ),
        ("env-check-stdout", "env-check-stderr"),
    ),
    Case(
        "no-tests",
        "no-tests",
        ("-B",),
        8,
        ("*                    SKIP no tests in this package",),
        _STANDARD_FILES,
    ),
    Case(
        "all-superficial",
        "all-superficial",
        ("-B",),
        8,
        ("shallow-one          PASS (superficial)", "command1             PASS (superficial)"),
    ),
    Case(
        # The debian/ copy autopkgtest parsed is left behind in the output directory.
        "invalid-control",
        "invalid-control",
        ("-B",),
        12,
        (
            "blame: {fixtures}/invalid-control",
            'badpkg: InvalidControl test *: missing "Tests" or "Test-Command" field',
        ),
        (*_STANDARD_FILES, "pkg/debian/tests/control"),
        # nestbed names the file, line and field of the error (autopkgtest names none),
        # and does not leave its temporary copy of debian/ (pkg/) in the output directory
        nestbed_rewrites=(
            (r"\S*/debian/tests/control:4: missing", "InvalidControl test *: missing"),
        ),
        autopkgtest_leftovers=("pkg",),
    ),
    Case(
        "unsatisfiable",
        "unsatisfiable",
        ("-B",),
        12,
        (
            "wants-missing-package FAIL badpkg",
            "blame: {fixtures}/unsatisfiable",
            "badpkg: Test dependencies are unsatisfiable. A common reason is that your testbed"
            " is out of date with respect to the archive, and you need to use a current"
            " testbed or run apt-get update or use -U.",
        ),
    ),
    Case(
        "missing-test",
        "missing-test",
        ("-B",),
        12,
        (
            "present              PASS",
            "blame: {fixtures}/missing-test",
            "badpkg: debian/tests/not-there does not exist",
        ),
    ),
    Case(
        # needs-sudo implies Depends: sudo, which apt installs (from the mirror if it is
        # not installed yet) before the test is skipped at run time.
        "needs-sudo",
        "needs-sudo",
        ("-B",),
        2,
        (
            "before-sudo          PASS",
            "wants-sudo           SKIP Cannot enable needs-sudo restriction: no ordinary user"
            " available",
            "after-sudo           PASS",
        ),
        marks=(pytest.mark.network,),
    ),
    Case(
        # @builddeps@ reduced for the architecture (an [i386] one dropped) and build
        # profiles; build-needed builds the tree in the testbed even with -B
        "builddeps",
        "builddeps",
        ("-B",),
        0,
        ("uses-build           PASS",),
        (*_STANDARD_FILES, "uses-build-stdout"),
    ),
    Case(
        # no debian/tests/control: autodep8 runs on the host and its control file
        # (here debian/tests/control.autodep8, which autodep8 prints first) is tested
        "autodep8-control",
        "autodep8-control",
        ("-B",),
        0,
        ("from-autodep8        PASS", "smoke                PASS"),
        (*_STANDARD_FILES, "from-autodep8-stdout", "smoke-stdout"),
    ),
    Case(
        # --no-auto-control: autodep8 is not run, so no tests
        "autodep8-no-auto-control",
        "autodep8-control",
        ("-B", "--no-auto-control"),
        8,
        ("*                    SKIP no tests in this package",),
    ),
    Case(
        # Testsuite: autopkgtest-pkg-python with a control file of its own: autodep8's
        # control file, the package's own tests first, then the generated import test
        # (of the archive's python3-six, installed from the mirror if it is not yet)
        "autodep8-python",
        "autodep8-python",
        ("-B",),
        0,
        ("own                  PASS", "autodep8-python3     PASS (superficial)"),
        marks=(pytest.mark.network,),
    ),
    Case(
        # lines that are not deb822 (no colon, a continuation before any field): ignored,
        # as python-debian ignores them; nestbed warns on stderr with file:line
        "lenient-control",
        "lenient-control",
        ("-B",),
        0,
        ("first                PASS", "second               PASS"),
    ),
    # --needs-internet: autopkgtest offers has_internet unless "skip"; with "try" a
    # non-zero exit is SKIP (a stderr failure is not)
    Case(
        "needs-internet-run",
        "needs-internet",
        ("-B",),
        4,
        (
            "online-pass          PASS",
            "online-fail          FAIL non-zero exit status 3",
            "online-stderr        FAIL stderr: online-stderr",
            "offline              PASS",
        ),
    ),
    Case(
        "needs-internet-try",
        "needs-internet",
        ("-B", "--needs-internet=try"),
        6,
        (
            "online-pass          PASS",
            "online-fail          SKIP Failed, but test has needs-internet and that's not"
            " guaranteed",
            "online-stderr        FAIL stderr: online-stderr",
            "offline              PASS",
        ),
    ),
    Case(
        "needs-internet-skip",
        "needs-internet",
        ("-B", "--needs-internet=skip"),
        2,
        (
            *_NEEDS_INTERNET_SKIPS,
            *_NEEDS_INTERNET_SKIPS,
            "offline              PASS",
        ),
    ),
    Case(
        # -V: the control file is read (its skips reported once), nothing runs, exit 0
        "validate",
        "mixed",
        ("-B", "-V"),
        0,
        (
            *_MIXED_PARSE_SKIPS,
            *_MIXED_PARSE_SKIPS,
            "*                    Test specification is valid",
        ),
    ),
    Case(
        "validate-invalid-control",
        "invalid-control",
        ("-B", "--validate"),
        12,
        (
            "blame: {fixtures}/invalid-control",
            'badpkg: InvalidControl test *: missing "Tests" or "Test-Command" field',
        ),
        nestbed_rewrites=(
            (r"\S*/debian/tests/control:4: missing", "InvalidControl test *: missing"),
        ),
        autopkgtest_leftovers=("pkg",),
    ),
    Case(
        "override-control",
        "pass-basic",
        ("-B", f"--override-control={OVERRIDE_CONTROL}"),
        0,
        ("command1             PASS",),
        (*_STANDARD_FILES, "command1-stdout"),
    ),
    Case(
        # autopkgtest extracts the tree as USER, which fails: an erroneous package
        "user-does-not-exist",
        "pass-basic",
        ("-B", "--user=nestbed-no-such-user"),
        12,
        (
            "blame: {fixtures}/pass-basic",
            "badpkg: rules extract failed with exit code 1",
        ),
        # nestbed says why (docs/autopkgtest.md)
        nestbed_rewrites=(
            (
                r"-u/--user nestbed-no-such-user: no such user in the testbed",
                "rules extract failed with exit code 1",
            ),
        ),
    ),
    Case(
        # --gain-root: dpkg-buildpackage -rCOMMAND; the build's binary target records it
        "gain-root",
        "gain-root",
        ("-B", "--gain-root=fakeroot"),
        0,
        ("under-fakeroot       PASS",),
    ),
    Case(
        "gain-root-not-given",
        "gain-root",
        ("-B",),
        4,
        ("under-fakeroot       FAIL non-zero exit status 1",),
    ),
    Case(
        # --no-apt-fallback: autopkgtest blames the pinning in its reason
        "unsatisfiable-no-apt-fallback",
        "unsatisfiable",
        ("-B", "--no-apt-fallback"),
        12,
        (
            "wants-missing-package FAIL badpkg",
            "blame: {fixtures}/unsatisfiable",
            "badpkg: Test dependencies are unsatisfiable. A common reason is that the requested"
            " apt pinning prevented dependencies from the non-default suite to be installed."
            " In that case you need to add those dependencies to the pinning list.",
        ),
    ),
)
