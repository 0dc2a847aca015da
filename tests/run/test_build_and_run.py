"""Building and running tests (issue 12, points 5, 13, 15, 16, 17): what a user sees.

A test's own exit status 255 is a FAIL (as 253), never a testbed failure; a background
process a test or a build leaves behind holding its output does not hang the run; a
package that is built in the testbed is tested in its built tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nestbed.container.tarball import ensure_tarball, host_arch, host_release
from nestbed.guest.frameclient import Outcome
from nestbed.image.progress import PlainProgress
from tests_support import nestbed_argv, write_package

RESULT = re.compile(r"^(\S+)\s+(PASS|FAIL|SKIP|FLAKY)\b(.*)$")


def result_lines(stdout: str) -> list[str]:
    matches = [RESULT.match(line) for line in stdout.splitlines()]
    return [" ".join(m.group(1, 2)) + m.group(3) for m in matches if m]


def _unshare_ready() -> None:
    missing = [p for p in ("unshare", "nsenter", "mmdebstrap") if shutil.which(p) is None]
    if missing or os.geteuid() != 0:
        pytest.skip("the unshare testbed here needs root and " + ", ".join(missing or ["root"]))
    ensure_tarball(host_release(), host_arch(), None, progress=PlainProgress())


def run_nestbed(
    tree: Path, testbed: str, *options: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    if testbed == "unshare":
        _unshare_ready()
    elif os.geteuid() != 0:
        pytest.skip("the null testbed runs these tests on this host as root")
    return subprocess.run(
        [*nestbed_argv(), *options, str(tree), "--", testbed],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- 15: a test's exit status 255 ------------------------------------------------------------


def test_exec_prefix_reports_a_commands_255_as_253() -> None:
    """The QEMU exec prefix keeps 255 for its own failure (autopkgtest-virt-qemu's rule)."""
    assert Outcome(status=255, signal=None).exit_status == 253
    assert Outcome(status=254, signal=None).exit_status == 254
    assert Outcome(status=None, signal=None).exit_status == 255  # no status: the helper failed


@pytest.mark.parametrize("testbed", ["null", "unshare"])
def test_a_test_exiting_255_fails_with_253(testbed: str, tmp_path: Path) -> None:
    tree = write_package(
        tmp_path / "pkg",
        {"t255": "#!/bin/sh\necho out\nexit 255\n", "after": "#!/bin/sh\necho still here\n"},
        "Tests: t255\nRestrictions: needs-root\n\nTests: after\n",
    )
    proc = run_nestbed(tree, testbed, "-B")
    assert result_lines(proc.stdout) == [
        "t255 FAIL non-zero exit status 253",
        "after PASS",
    ], proc.stderr[-3000:]
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "testbed failure" not in proc.stderr
