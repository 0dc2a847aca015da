"""Session-wide runs of autopkgtest for the differential tests."""

from __future__ import annotations

import os
import shutil

import pytest

from differential.harness import RunCache


@pytest.fixture(scope="session")
def autopkgtest_runs(tmp_path_factory: pytest.TempPathFactory) -> RunCache:
    """autopkgtest's result for each (tree, options), run once per session."""
    if os.geteuid() != 0:
        pytest.skip("the differential tests run autopkgtest and nestbed as root on null")
    if shutil.which("autopkgtest") is None:
        pytest.fail("autopkgtest is not installed (apt-get install autopkgtest)")
    return RunCache("autopkgtest", tmp_path_factory.mktemp("autopkgtest"))
