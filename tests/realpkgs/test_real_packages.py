"""nestbed against autopkgtest on real Debian source packages (hello, psmisc, less).

Run with -B on the null testbed as root: the tests' dependencies (e.g. the hello
binary package, shunit2) are installed on this host by apt, as autopkgtest does.
Compared: the exit code and the result lines on stdout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from differential.harness import HarnessError, RunCache, RunResult, compare, run_program
from realpkgs.conftest import PACKAGES

pytestmark = [pytest.mark.network, pytest.mark.autopkgtest]

HELLO_FRESH = ["command1             PASS", "upstream-tests       PASS"]
HELLO_BUILT = ["command1             PASS", "upstream-tests       FAIL non-zero exit status 126"]


def _run(runs: RunCache | None, program: str, tree: Path, workdir: Path) -> RunResult:
    try:
        if runs is not None:
            return runs.get(tree, ("-B",))
        return run_program(program, tree, ("-B",), workdir)
    except HarnessError as e:
        pytest.fail(str(e))


def test_hello_fresh_tree_passes_under_autopkgtest(
    fresh_trees: dict[str, Path], autopkgtest_real_runs: RunCache, tmp_path: Path
) -> None:
    run = _run(autopkgtest_real_runs, "autopkgtest", fresh_trees["hello"], tmp_path)
    assert (run.exit_code, run.result_lines()) == (0, HELLO_FRESH), run.describe()


@pytest.mark.parametrize("package", PACKAGES)
def test_nestbed_verdicts_match_autopkgtest(
    package: str,
    fresh_trees: dict[str, Path],
    autopkgtest_real_runs: RunCache,
    tmp_path: Path,
) -> None:
    tree = fresh_trees[package]
    expected = _run(autopkgtest_real_runs, "autopkgtest", tree, tmp_path)
    actual = _run(None, "nestbed", tree, tmp_path / "nestbed")
    problems = compare(expected, actual, verdicts_only=True)
    assert not problems, "\n\n".join(problems) + "\n\n=== nestbed run ===\n" + actual.describe()


@pytest.fixture(scope="module")
def hello_built_tree(
    real_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """hello built in place (dpkg-buildpackage -b): a built tree, debian/files and all."""
    tree = tmp_path_factory.mktemp("hello-built") / "hello"
    shutil.copytree(real_sources["hello"], tree, symlinks=True)
    check = subprocess.run(["dpkg-checkbuilddeps"], cwd=tree, capture_output=True, text=True)
    if check.returncode != 0:
        # as root on a throwaway machine (see conftest): install them, as a maintainer would
        deps = subprocess.run(
            ["apt-get", "build-dep", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "./"],
            cwd=tree,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        assert deps.returncode == 0, deps.stdout[-3000:] + deps.stderr[-3000:]
    build = subprocess.run(
        ["dpkg-buildpackage", "-b", "-uc", "-us"],
        cwd=tree,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert (tree / "debian" / "files").is_file()
    return tree


@pytest.mark.parametrize("program", ["autopkgtest", "nestbed"])
def test_hello_built_tree_upstream_tests_fail_with_126(
    program: str, hello_built_tree: Path, tmp_path: Path
) -> None:
    run = _run(None, program, hello_built_tree, tmp_path)
    assert (run.exit_code, run.result_lines()) == (4, HELLO_BUILT), run.describe()


def _run_input(program: str, package: str, options: tuple[str, ...], tmp_path: Path) -> RunResult:
    try:
        return run_program(program, Path(package), options, tmp_path / program)
    except HarnessError as e:
        pytest.fail(str(e))


@pytest.mark.parametrize("program", ["autopkgtest", "nestbed"])
def test_hello_from_dsc_is_built_in_the_testbed(
    program: str, real_sources: dict[str, Path], tmp_path: Path
) -> None:
    """From the .dsc both build in the testbed, and hello's own defect shows (126)."""
    dsc = next(real_sources["hello"].parent.glob("hello_*.dsc"))
    run = _run_input(program, str(dsc), (), tmp_path)
    assert (run.exit_code, run.result_lines()) == (4, HELLO_BUILT), run.describe()


@pytest.mark.parametrize("program", ["autopkgtest", "nestbed"])
def test_hello_by_source_name_tests_the_archive_binaries(
    program: str, real_sources: dict[str, Path], tmp_path: Path
) -> None:
    """A source package name is fetched with apt-get source in the testbed; no build."""
    run = _run_input(program, "hello", (), tmp_path)
    assert (run.exit_code, run.result_lines()) == (0, HELLO_FRESH), run.describe()
