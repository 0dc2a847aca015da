"""autopkgtest's own runner driving nestbed-virt-null: the strongest compatibility check."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import nestbed_null_argv

pytestmark = pytest.mark.autopkgtest

CHANGELOG = """\
nbtest (1.0) unstable; urgency=medium

  * Test package.

 -- Nestbed Tests <tests@example.com>  Mon, 01 Jan 2024 00:00:00 +0000
"""


def make_package(top: Path, tests_control: str) -> Path:
    debian = top / "debian"
    (debian / "tests").mkdir(parents=True)
    # a Source stanza and no binary package: nothing to build or install
    (debian / "control").write_text("Source: nbtest\nMaintainer: Nestbed Tests <t@example.com>\n")
    # autopkgtest reads the version from the changelog even for an unbuilt tree
    (debian / "changelog").write_text(CHANGELOG)
    (debian / "tests" / "control").write_text(tests_control)
    return top


def server_path(tmp_path: Path) -> str:
    """autopkgtest takes the server as one path: wrap `python -m` when not installed."""
    argv = nestbed_null_argv()
    if len(argv) == 1:
        return argv[0]
    wrapper = tmp_path / "nestbed-virt-null"
    env = f"PYTHONPATH={shlex.quote(os.pathsep.join(sys.path))}"
    wrapper.write_text(f'#!/bin/sh\nexport {env}\nexec {shlex.join(argv)} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def run_autopkgtest(tmp_path: Path, tree: Path, out: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("autopkgtest") is None:
        pytest.skip("autopkgtest is not installed")
    if os.getuid() != 0:
        pytest.skip("autopkgtest with a null testbed needs root here")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    proc = subprocess.run(
        ["autopkgtest", "-B", str(tree), "-o", str(out), "--", server_path(tmp_path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    # our scratch dirs are gone (autopkgtest's own temporary dirs are its business)
    assert not [p for p in tmpdir.iterdir() if p.name.startswith("nestbed.")]
    return proc


def test_autopkgtest_passes_with_our_server(tmp_path: Path) -> None:
    tree = make_package(tmp_path / "pkg", "Test-Command: echo hi\nDepends:\n")
    proc = run_autopkgtest(tmp_path, tree, tmp_path / "out")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"^command1\s+PASS$", output, re.MULTILINE), output
    assert "hi" in (tmp_path / "out" / "log").read_text()


def test_autopkgtest_failure_and_artifacts(tmp_path: Path) -> None:
    tree = make_package(
        tmp_path / "pkg",
        'Test-Command: mkdir -p "$AUTOPKGTEST_ARTIFACTS/d";'
        ' echo art > "$AUTOPKGTEST_ARTIFACTS/d/a b"\n'
        "Depends:\n"
        "\n"
        "Test-Command: echo oops >&2\n"
        "Depends:\n",
    )
    out = tmp_path / "out"
    proc = run_autopkgtest(tmp_path, tree, out)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output
    assert re.search(r"^command1\s+PASS$", output, re.MULTILINE), output
    assert re.search(r"^command2\s+FAIL stderr: oops$", output, re.MULTILINE), output
    # copied up from the scratch dir by the server
    assert (out / "artifacts" / "d" / "a b").read_text() == "art\n"
