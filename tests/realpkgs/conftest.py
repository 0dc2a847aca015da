"""Real Debian source packages, fetched once into a cache with scripts/fetch-real-sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from differential.harness import REPO, RunCache

PACKAGES = ("hello", "psmisc", "less")
# Testsuite: autopkgtest-pkg-python and no debian/tests: its only test is the one autodep8
# generates (import pyasn1), a few seconds on null.
AUTODEP8_PACKAGE = "pyasn1"
FETCHED = (*PACKAGES, AUTODEP8_PACKAGE)
FETCH = REPO / "scripts" / "fetch-real-sources"


def cache_dir() -> Path:
    base = os.environ.get("NESTBED_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "nestbed"
    return root / "sources"


@pytest.fixture(scope="session")
def real_sources() -> dict[str, Path]:
    """Unpacked source trees by package name (in the cache: copy before use)."""
    if os.geteuid() != 0:
        pytest.skip("fetching sources (apt) and running tests on null need root")
    proc = subprocess.run(
        [sys.executable, str(FETCH), "--cache-dir", str(cache_dir()), *FETCHED],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/fetch-real-sources failed ({proc.returncode}):\n{proc.stderr}")
    trees = dict(line.split("\t", 1) for line in proc.stdout.splitlines())
    return {name: Path(trees[name]) for name in FETCHED}


@pytest.fixture(scope="session")
def fresh_trees(
    real_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A private copy of each tree, shared by the autopkgtest and nestbed runs."""
    base = tmp_path_factory.mktemp("real-trees")
    copies = {}
    for name, tree in real_sources.items():
        copies[name] = base / name
        shutil.copytree(tree, copies[name], symlinks=True)
    return copies


@pytest.fixture(scope="session")
def autopkgtest_real_runs(tmp_path_factory: pytest.TempPathFactory) -> RunCache:
    if shutil.which("autopkgtest") is None:
        pytest.fail("autopkgtest is not installed (apt-get install autopkgtest)")
    return RunCache("autopkgtest", tmp_path_factory.mktemp("autopkgtest-real"))
