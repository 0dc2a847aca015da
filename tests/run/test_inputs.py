"""Every kind of input autopkgtest takes, on the null testbed, as a user passes it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests_support import make_deb, nestbed_argv, write_package

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the null testbed runs tests via su")

RESULT = re.compile(r"^\S+ +(PASS|FAIL|SKIP|FLAKY)\b")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "packages"


def nestbed(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*nestbed_argv(), *args], capture_output=True, text=True, timeout=900, cwd=cwd
    )


def results(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in p.stdout.splitlines() if RESULT.match(line)]


def test_not_a_deb_is_erroneous(tmp_path: Path) -> None:
    deb = tmp_path / "bar_1.0_all.deb"
    deb.write_text("not a deb\n")
    p = nestbed(str(deb), str(FIXTURES / "pass-basic"), "--", "null")
    assert p.returncode == 12, p.stderr
    assert p.stdout.splitlines()[:2] == [
        f"blame: arg:{deb}",
        f"badpkg: failed to parse binary package {deb}: dpkg-deb: error: "
        f"'{deb}' is not a Debian format archive",
    ]
    assert "Traceback" not in p.stderr


def test_dsc_with_missing_files_is_erroneous(tmp_path: Path) -> None:
    dsc = tmp_path / "foo_1.0-1.dsc"
    dsc.write_text(
        "Format: 3.0 (quilt)\nSource: foo\nVersion: 1.0-1\nFiles:\n"
        " 0123456789abcdef0123456789abcdef 100 foo_1.0.orig.tar.gz\n"
    )
    p = nestbed(str(dsc), "--", "null")
    assert p.returncode == 12, p.stderr
    assert f"badpkg: {dsc} names files that are not next to it: foo_1.0.orig.tar.gz" in p.stdout
    assert "Traceback" not in p.stderr


def test_unknown_source_name_is_erroneous() -> None:
    p = nestbed("no-such-source-package-nestbed", "--", "null")
    assert p.returncode == 12, p.stderr
    assert "badpkg: rules extract failed with exit code" in p.stdout


def test_git_url_is_cloned_and_tested(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(FIXTURES / "pass-basic", repo)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    for argv in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "fixture"]):
        subprocess.run([*git, *argv], check=True)
    p = nestbed("-B", f"file://{repo}", "--", "null")
    assert p.returncode == 0, p.stderr
    assert [line.split()[1] for line in results(p)] == ["PASS", "PASS", "PASS"]


def _git_repo_with_branch(tmp_path: Path) -> Path:
    """pass-basic on the default branch; on `wip`, a control file with one other test."""
    repo = tmp_path / "repo"
    shutil.copytree(FIXTURES / "pass-basic", repo)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    for argv in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "fixture"]):
        subprocess.run([*git, *argv], check=True)
    subprocess.run([*git, "checkout", "-q", "-b", "wip"], check=True)
    (repo / "debian" / "tests" / "control").write_text("Test-Command: echo on wip\n")
    subprocess.run([*git, "commit", "-q", "-a", "-m", "wip"], check=True)
    subprocess.run([*git, "checkout", "-q", "main"], check=True)
    return repo


def test_git_url_with_a_branch_tests_that_branch(tmp_path: Path) -> None:
    repo = _git_repo_with_branch(tmp_path)
    p = nestbed("-B", f"file://{repo}#wip", "--", "null")
    assert (p.returncode, results(p)) == (0, ["command1             PASS"]), p.stderr
    # without the branch: the default branch's three tests
    p = nestbed("-B", f"file://{repo}", "--", "null")
    assert p.returncode == 0, p.stderr
    assert [line.split()[0] for line in results(p)] == ["smoke", "named-command", "command1"]


@pytest.mark.autopkgtest
@pytest.mark.skipif(shutil.which("autopkgtest") is None, reason="autopkgtest is not installed")
def test_git_url_with_a_branch_as_autopkgtest(tmp_path: Path) -> None:
    repo = _git_repo_with_branch(tmp_path)
    url = f"file://{repo}#wip"
    ours = nestbed("-B", url, "--", "null")
    theirs = subprocess.run(
        ["autopkgtest", "-B", url, "--", "null"], capture_output=True, text=True, timeout=900
    )
    assert (ours.returncode, results(ours)) == (theirs.returncode, results(theirs)), (
        ours.stderr + theirs.stderr
    )


def test_git_url_with_a_missing_branch_is_erroneous(tmp_path: Path) -> None:
    repo = _git_repo_with_branch(tmp_path)
    p = nestbed("-B", f"file://{repo}#no-such-branch", "--", "null")
    assert p.returncode == 12, p.stderr
    assert "badpkg: rules extract failed with exit code" in p.stdout
    assert "no-such-branch" in p.stderr  # git's own words say which
    assert "Traceback" not in p.stderr


@pytest.fixture
def local_deb(tmp_path: Path) -> Iterator[Path]:
    """A tiny .deb that is in no archive; purged from this host afterwards."""
    yield make_deb(tmp_path)
    subprocess.run(["dpkg", "--purge", "nestbed-fixture-bin"], capture_output=True, check=False)


def test_given_deb_is_installed_instead_of_the_archive(tmp_path: Path, local_deb: Path) -> None:
    tree = write_package(
        tmp_path / "pkg",
        {"uses-deb": "#!/bin/sh\ncat /usr/share/nestbed-fixture-bin/marker\n"},
        "Tests: uses-deb\nDepends: nestbed-fixture-bin\n",
    )
    p = nestbed(str(local_deb), str(tree), "--", "null")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "from the local deb" in p.stdout
    assert results(p)[-1] == "uses-deb             PASS"
    assert p.stdout.count("uses-deb             PASS") == 1
    # the local repository is gone again from this host's apt configuration
    assert not os.path.exists("/etc/apt/sources.list.d/nestbed-binaries.list")
    assert not os.path.exists("/etc/apt/preferences.d/nestbed-binaries")
