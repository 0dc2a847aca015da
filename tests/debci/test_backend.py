"""The debci backend's scripts as debci runs them (its environment variables, its options),
on the unshare testbed: nestbed's results in the output directory and debci's `exitcode`
and `worker` beside them, the verdicts debci would record, debci's setup commands run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import nestbed
from tests_support import write_package

BACKEND = Path(nestbed.__file__).parent / "debci"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "packages"


def run_test_package(out: Path, package: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # nestbed and its servers as this environment has them, first on PATH
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "debci_suite": "unstable",
        "debci_arch": "amd64",
        "debci_test_package": package.name,
        "debci_test_outputdir": str(out),
        "debci_autopkgtest_args": "",
        "debci_nestbed_testbed": "unshare",
    }
    return subprocess.run(
        [str(BACKEND / "test-package"), *extra, "--output-dir", str(out), f"{package}/"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


SETUP_SEEN = """#!/bin/sh
set -e
test "$(cat /var/tmp/debci.pkg)" = "setup-seen unstable/amd64"
grep -q 'Acquire::Retries "10";' /etc/apt/apt.conf.d/75retry
"""


@pytest.mark.network
@pytest.mark.parametrize(("fixture", "exitcode"), [("setup-seen", 0), ("mixed", 6)])
def test_results_and_debcis_files(tmp_path: Path, fixture: str, exitcode: int) -> None:
    out = tmp_path / "out"
    out.mkdir()  # debci-test makes its parent; nestbed -o fills it
    if fixture == "setup-seen":  # the setup commands debci-autopkgtest passes ran
        package = write_package(tmp_path / fixture, {"seen": SETUP_SEEN}, "Tests: seen\n")
        (package / "debian" / "changelog").write_text(
            (package / "debian" / "changelog").read_text().replace("fixture", fixture, 1)
        )
    else:
        package = FIXTURES / fixture
    proc = run_test_package(out, package)
    assert proc.returncode == exitcode, proc.stderr[-2000:]
    assert (out / "exitcode").read_text() == f"{exitcode}\n"
    assert (out / "worker").read_text().strip() == socket.gethostname().split(".")[0]
    assert (out / "testpkg-version").read_text().split()[0] == fixture
    summary = (out / "summary").read_text()
    assert summary and all(line in proc.stdout for line in summary.splitlines())


def test_files_are_executable_and_the_shell_reads_them() -> None:
    for name in ("test-package", "create-testbed"):
        assert os.access(BACKEND / name, os.X_OK), name
    for name in ("test-package", "create-testbed", "environment.sh"):
        subprocess.run(["sh", "-n", str(BACKEND / name)], check=True)
