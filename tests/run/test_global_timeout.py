"""--timeout (autopkgtest 5.30's global timeout): the build and the tests share one budget;
the test that runs into it FAILs "timed out" and the tests after it are SKIPped; a build
that runs into it is a testbed failure. On the null testbed, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests_support import nestbed_argv, write_package

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the null testbed runs tests via su")

CONTROL = """\
Test-Command: sleep 1
Features: test-name=quick
Depends:

Test-Command: sleep 120
Features: test-name=slow
Depends:

Test-Command: true
Features: test-name=after
Depends:
"""


def _nestbed(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    res = subprocess.run([*nestbed_argv(), *args], capture_output=True, text=True, timeout=300)
    return res, time.monotonic() - started


def _lines(stdout: str) -> list[str]:
    return [re.sub(r" +", " ", line) for line in stdout.splitlines()]


def test_the_test_that_reaches_it_fails_and_the_rest_skip(tmp_path: Path) -> None:
    tree = write_package(tmp_path / "pkg", {}, CONTROL)
    out = tmp_path / "out"
    res, took = _nestbed("-B", "--timeout", "12", "-o", str(out), str(tree), "--", "null")
    assert res.returncode == 6, res.stderr  # a test failed (4) and one skipped (2)
    assert _lines(res.stdout) == [
        "quick PASS",
        "slow FAIL timed out",
        "after SKIP global timeout exceeded",
    ], res.stdout
    assert "global timeout reached on command" in res.stderr
    assert took < 100, f"the slow test was not cut at the global timeout ({took:.0f} s)"
    summary = _lines((out / "summary").read_text())
    assert summary == ["quick PASS", "slow FAIL timed out", "after SKIP global timeout exceeded"]


def test_without_it_the_test_timeout_alone_applies(tmp_path: Path) -> None:
    tree = write_package(tmp_path / "pkg", {}, CONTROL)
    res, _ = _nestbed("-B", "--timeout-test", "3", str(tree), "--", "null")
    assert res.returncode == 4, res.stderr
    # each test gets its own 3 s: the one after the slow one still runs
    assert _lines(res.stdout) == ["quick PASS", "slow FAIL timed out", "after PASS"]
    assert "global timeout" not in res.stderr


def test_a_build_that_reaches_it_is_a_testbed_failure(tmp_path: Path) -> None:
    tree = write_package(tmp_path / "pkg", {}, "Test-Command: true\nDepends:\n")
    debian = tree / "debian"
    (debian / "control").write_text(
        "Source: fixture\nMaintainer: t <t@localhost>\n\n"
        "Package: fixture\nArchitecture: all\nDescription: slow to build\n d\n"
    )
    (debian / "rules").write_text(
        "#!/usr/bin/make -f\nbuild build-arch build-indep:\n\tsleep 120\n"
        "clean binary binary-arch binary-indep:\n\ttrue\n"
    )
    (debian / "rules").chmod(0o755)
    (debian / "source").mkdir()
    (debian / "source" / "format").write_text("3.0 (native)\n")
    res, took = _nestbed("--timeout", "15", str(tree), "--", "null")
    assert res.returncode == 16, (res.stdout, res.stderr)
    assert "testbed failure: global timeout reached" in res.stderr
    assert "kind: build" in res.stderr
    assert took < 100, f"the build was not cut at the global timeout ({took:.0f} s)"


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_a_bad_value_is_a_usage_error(value: str) -> None:
    res, _ = _nestbed("--timeout", value, ".", "--", "null")
    assert res.returncode == 20
    assert "--timeout" in res.stderr
    assert "Traceback" not in res.stderr
