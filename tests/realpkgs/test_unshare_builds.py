"""Real Debian sources built in the unshare testbed (a testbed that reverts between tests).

hello 2.10-3 from its .dsc: its tests run in the built tree, so upstream-tests meets the
build's tests/greeting-1.log and fails with 126, as under autopkgtest (issue 12, point 5).
bzip2 1.0.8-5 from its .dsc with -U: its binaries are older than the archive's binNMU
(libbz2-1.0 1.0.8-5+b1); it builds and passes its 6 tests, as under autopkgtest (point 13).
The lines expected are autopkgtest 5.28's for the same input.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nestbed.container.tarball import ensure_tarball, host_arch, host_release
from nestbed.image.progress import PlainProgress
from realpkgs.conftest import FETCH, cache_dir
from tests_support import nestbed_argv

pytestmark = [pytest.mark.network]

RESULT = re.compile(r"^(\S+)\s+(PASS|FAIL|SKIP|FLAKY)\b(.*)$")


def result_lines(stdout: str) -> list[str]:
    matches = [RESULT.match(line) for line in stdout.splitlines()]
    return [" ".join(m.group(1, 2)) + m.group(3) for m in matches if m]


def run_nestbed(dsc: Path, *options: str) -> subprocess.CompletedProcess[str]:
    missing = [p for p in ("unshare", "nsenter", "mmdebstrap") if shutil.which(p) is None]
    if missing or os.geteuid() != 0:
        pytest.skip("the unshare testbed here needs root and " + ", ".join(missing or ["root"]))
    ensure_tarball(host_release(), host_arch(), None, progress=PlainProgress())
    return subprocess.run(
        [*nestbed_argv(), *options, str(dsc), "--", "unshare"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,
    )


BZIP2_TESTS = ("link-with-shared", "bigfile", "bzexe-test", "compare", "compress", "grep")


def _dsc(package: str) -> Path:
    proc = subprocess.run(
        [sys.executable, str(FETCH), "--cache-dir", str(cache_dir()), package],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/fetch-real-sources failed ({proc.returncode}):\n{proc.stderr}")
    tree = Path(proc.stdout.split("\t", 1)[1].strip())
    return next(tree.parent.glob(f"{package}_*.dsc"))


def test_hello_dsc_on_unshare_tests_the_built_tree() -> None:
    proc = run_nestbed(_dsc("hello"))
    assert result_lines(proc.stdout) == [
        "command1 PASS",
        "upstream-tests FAIL non-zero exit status 126",
    ], proc.stderr[-3000:]
    assert proc.returncode == 4


def test_bzip2_dsc_on_unshare_with_upgrade_is_not_downgraded() -> None:
    dsc = _dsc("bzip2")
    proc = run_nestbed(dsc, "-U")
    assert result_lines(proc.stdout) == [f"{t} PASS" for t in BZIP2_TESTS], proc.stderr[-3000:]
    assert proc.returncode == 0
