"""nestbed against autopkgtest 5.28 on the fixture packages, null testbed, as root.

test_autopkgtest_baseline pins what autopkgtest itself prints for each case (so the
fixtures keep covering what they claim); test_nestbed_matches_autopkgtest requires
nestbed to give the same exit code, result lines, summary file, output directory
listing and per-test output files (see harness.py for what is normalised).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from differential.cases import CASES, Case
from differential.harness import (
    FIXTURES,
    HarnessError,
    RunCache,
    RunResult,
    compare,
    fixture_tree,
    host_arch,
    run_program,
)

pytestmark = pytest.mark.autopkgtest


def _expected_lines(case: Case) -> list[str]:
    arch = host_arch()
    return [
        line.replace("{arch}", arch).replace("{fixtures}", str(FIXTURES)) for line in case.results
    ]


def _autopkgtest(runs: RunCache, case: Case) -> RunResult:
    try:
        return runs.get(fixture_tree(case.fixture), case.options, summary_file=case.summary_file)
    except HarnessError as e:
        pytest.fail(str(e))


def _nestbed(case: Case, workdir: Path) -> RunResult:
    try:
        return run_program(
            "nestbed",
            fixture_tree(case.fixture),
            case.options,
            workdir,
            summary_file=case.summary_file,
        )
    except HarnessError as e:
        pytest.fail(str(e))


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_autopkgtest_baseline(autopkgtest_runs: RunCache, case: Case) -> None:
    run = _autopkgtest(autopkgtest_runs, case)
    assert (run.exit_code, run.result_lines()) == (case.exit_code, _expected_lines(case)), (
        run.describe()
    )
    # The summary file holds the same result lines (plus "erroneous package: ..." when
    # an error ends the run).
    assert run.summary is not None
    summary_lines = run.summary.decode().splitlines()
    assert [line for line in summary_lines if not line.startswith("erroneous package: ")] == (
        _expected_lines(case)
    )
    missing = sorted(set(case.files) - set(run.files()))
    assert not missing, f"not in autopkgtest's output directory: {missing}\n{run.files()}"


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_nestbed_matches_autopkgtest(
    autopkgtest_runs: RunCache, case: Case, tmp_path: Path
) -> None:
    expected = _autopkgtest(autopkgtest_runs, case)
    actual = _nestbed(case, tmp_path)
    for pattern, _ in case.nestbed_rewrites:
        # a deliberate difference must really be there, not just tolerated
        assert re.search(pattern, actual.stdout), (pattern, actual.stdout)
    expected = replace(expected, ignored_files=case.autopkgtest_leftovers)
    actual = replace(actual, rewrites=case.nestbed_rewrites)
    problems = compare(expected, actual)
    assert not problems, "\n\n".join(problems) + "\n\n=== nestbed run ===\n" + actual.describe()


def test_environment_artifacts_are_copied_up(autopkgtest_runs: RunCache, tmp_path: Path) -> None:
    """What the artifacts test wrote is in OUTDIR/artifacts, for both programs."""
    case = next(c for c in CASES if c.id == "environment")
    for run in (
        _autopkgtest(autopkgtest_runs, case),
        _nestbed(case, tmp_path),
    ):
        assert run.read("artifacts/report.txt") == b"report from the artifacts test\n", run.program
        assert run.read("artifacts/sub/nested.log") == b"nested line 1\nnested line 2\n"
        assert b"FOO=bar\n" in run.read("env-check-stdout"), run.program


def test_compare_notices_a_different_verdict(autopkgtest_runs: RunCache, tmp_path: Path) -> None:
    """The harness is not blind: two runs that differ in one verdict are told apart."""
    pass_case = next(c for c in CASES if c.id == "environment")
    fail_case = next(c for c in CASES if c.id == "environment-no-env")
    problems = compare(
        _autopkgtest(autopkgtest_runs, pass_case), _autopkgtest(autopkgtest_runs, fail_case)
    )
    joined = "\n".join(problems)
    assert "exit code: autopkgtest 0, autopkgtest 4" in joined
    assert "-env-check            PASS" in joined
    assert "+env-check            FAIL non-zero exit status 1" in joined
    assert "+env-check-stderr" in joined
    # and the same run compared with itself agrees
    run = _autopkgtest(autopkgtest_runs, pass_case)
    assert compare(run, run) == []
