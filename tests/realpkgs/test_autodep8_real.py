"""autodep8's generated tests on a real Debian source package (issue 12 point 4).

pyasn1 (Debian 12) says `Testsuite: autopkgtest-pkg-python` in debian/control and has no
debian/tests: autopkgtest runs autodep8 on it and runs the import test that comes out;
with --no-auto-control it has no tests. nestbed must do the same: run with -B on the null
testbed as root (python3-pyasn1 is installed on this host by apt, as autopkgtest does), and
compared with autopkgtest's run of the same tree: the exit code, the result lines, the
summary, the output directory's files and the log's errors (differential.harness.compare).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from differential.harness import HarnessError, RunCache, RunResult, compare, run_program
from realpkgs.conftest import AUTODEP8_PACKAGE

pytestmark = [pytest.mark.network, pytest.mark.autopkgtest]

# What autopkgtest 5.28 gives; asserted too, so that the comparison cannot pass with both
# programs agreeing on something else (autodep8 missing: both say "no tests").
EXPECTED = {
    # the import test is superficial, and nothing else ran: exit 8
    ("-B",): (8, ["autodep8-python3     PASS (superficial)"]),
    ("-B", "--no-auto-control"): (8, ["*                    SKIP no tests in this package"]),
}


def test_pyasn1_asks_for_autodep8_and_has_no_tests_of_its_own(
    real_sources: dict[str, Path],
) -> None:
    """The premise: a later upload with debian/tests would test something else."""
    tree = real_sources[AUTODEP8_PACKAGE]
    fields = (tree / "debian" / "control").read_text(encoding="utf-8").splitlines()
    assert "Testsuite: autopkgtest-pkg-python" in fields
    assert not (tree / "debian" / "tests").exists()


@pytest.mark.parametrize("options", list(EXPECTED), ids=["auto-control", "no-auto-control"])
def test_autodep8_tests_of_a_real_package_match_autopkgtest(
    options: tuple[str, ...],
    fresh_trees: dict[str, Path],
    autopkgtest_real_runs: RunCache,
    tmp_path: Path,
) -> None:
    tree = fresh_trees[AUTODEP8_PACKAGE]
    try:
        expected: RunResult = autopkgtest_real_runs.get(tree, options)
        actual = run_program("nestbed", tree, options, tmp_path / "nestbed")
    except HarnessError as e:
        pytest.fail(str(e))
    assert (expected.exit_code, expected.result_lines()) == EXPECTED[options], expected.describe()
    problems = compare(expected, actual)
    assert not problems, "\n\n".join(problems) + "\n\n=== nestbed run ===\n" + actual.describe()
    # the generated control file lives in a temporary directory, not in the user's tree
    assert not (tree / "debian" / "tests").exists()
