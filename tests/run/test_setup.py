"""Testbed setup options on the null testbed: what the test then sees, and the exit codes."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed.cli import parse_args
from nestbed.run.setup import APT_UPGRADE
from tests_support import nestbed_argv, write_package

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the null testbed runs tests via su")
RESULT = re.compile(r"^\S+ +(PASS|FAIL|SKIP|FLAKY)\b")


def nestbed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*nestbed_argv(), *args], capture_output=True, text=True, timeout=900)


def results(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in p.stdout.splitlines() if RESULT.match(line)]


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    """A package whose one test prints what setup left for it."""
    return write_package(
        tmp_path / "pkg",
        {"probe": f"#!/bin/sh\nset -e\ncat {tmp_path}/made-by-setup {tmp_path}/copied\n"},
        "Tests: probe\nDepends:\n",
    )


def test_setup_commands_and_copy_run_before_the_tests(tmp_path: Path, probe: Path) -> None:
    source = tmp_path / "source-file"
    source.write_text("copied in\n")
    script = tmp_path / "setup.sh"
    made = tmp_path / "made-by-setup"
    script.write_text(f'echo "setup as $(id -un) flag=$AUTOPKGTEST_IS_SETUP_COMMAND" > {made}\n')
    p = nestbed(
        "-B", "--setup-commands", str(script), "--copy", f"{source}:{tmp_path}/copied",
        str(probe), "--", "null",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "setup as root flag=1\ncopied in\n" in p.stdout
    assert results(p) == ["probe                PASS"]


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (100, 12, "erroneous package: testbed setup commands failed with status 100"),
        (3, 16, "testbed failure: testbed setup commands failed with status 3"),
    ],
)
def test_failing_setup_command(probe: Path, status: int, code: int, message: str) -> None:
    p = nestbed("-B", "--setup-commands", f"exit {status}", str(probe), "--", "null")
    assert p.returncode == code, p.stderr
    assert message in p.stderr
    assert results(p) == []


@pytest.fixture
def pin_cleanup() -> Iterator[None]:
    yield
    for path in Path("/etc/apt/preferences.d").glob("nestbed-*"):
        path.unlink()


def test_pin_packages_writes_apt_preferences(tmp_path: Path, pin_cleanup: None) -> None:
    tree = write_package(
        tmp_path / "pkg",
        {"policy": "#!/bin/sh\napt-cache policy coreutils | grep -A1 '^ *\\*\\*\\*' || true\n"
         "cat /etc/apt/preferences.d/nestbed-bookworm\n"},
        "Tests: policy\nDepends:\n",
    )  # fmt: skip
    p = nestbed("-B", "--pin-packages=bookworm=coreutils,src:hello", str(tree), "--", "null")
    assert p.returncode == 0, p.stderr
    assert "Package: coreutils hello\nPin: release a=bookworm\nPin-Priority: 995" in p.stdout


def test_apt_upgrade_and_argument_checks() -> None:
    tree = str(Path(__file__).resolve().parent.parent.parent / "examples" / "smoke")
    options = parse_args(["-U", "--setup-commands", "true", tree, "--", "null"])
    assert options.setup.setup_commands == (APT_UPGRADE, "true")
    p = nestbed("--copy", "/nonexistent:/x", tree, "--", "null")
    assert p.returncode == 20
    assert "--copy host path /nonexistent does not exist" in p.stderr
