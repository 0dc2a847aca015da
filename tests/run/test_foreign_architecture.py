"""The skip-foreign-architecture restriction (newer autopkgtest) on the null testbed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests_support import nestbed_argv, write_package

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the null testbed runs tests via su")
RESULT = re.compile(r"^\S+ +(PASS|FAIL|SKIP|FLAKY)\b")
CONTROL = (
    "Tests: native-only\nDepends:\nRestrictions: skip-foreign-architecture\n\n"
    "Tests: plain\nDepends:\n"
)


def _run(argv: list[str]) -> tuple[int, list[str]]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    return p.returncode, [line for line in p.stdout.splitlines() if RESULT.match(line)]


@pytest.fixture
def package(tmp_path: Path) -> Path:
    ok = "#!/bin/sh\necho ran\n"
    return write_package(tmp_path / "pkg", {"native-only": ok, "plain": ok}, CONTROL)


def test_runs_on_the_testbeds_own_architecture(package: Path) -> None:
    """nestbed tests the testbed's own architecture, never a foreign one: the test runs."""
    code, results = _run([*nestbed_argv(), "-B", str(package), "--", "null"])
    assert (code, results) == (0, ["native-only          PASS", "plain                PASS"])


@pytest.mark.autopkgtest
@pytest.mark.skipif(shutil.which("autopkgtest") is None, reason="autopkgtest is not installed")
def test_autopkgtest_5_28_does_not_know_it(package: Path) -> None:
    """The intended difference (docs/autopkgtest.md): 5.28 skips it as unknown."""
    code, results = _run(["autopkgtest", "-B", str(package), "--", "null"])
    assert (code, results[0]) == (2, "native-only          SKIP unknown restriction"
                                      " skip-foreign-architecture")  # fmt: skip
