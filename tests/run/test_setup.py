"""Testbed setup options on the null testbed: what the test then sees, and the exit codes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed.cli import parse_args
from nestbed.run.binaries import inspect, packages_index
from nestbed.run.setup import (
    APT_UPGRADE,
    AUTOPKGTEST_SETUP_COMMANDS,
    OUR_SETUP_COMMANDS,
    locate_command,
)
from tests_support import make_deb, nestbed_argv, write_package

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the null testbed runs tests via su")
RESULT = re.compile(r"^\S+ +(PASS|FAIL|SKIP|FLAKY)\b")
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "packages" / "pass-basic"


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


@pytest.fixture
def apt_cleanup() -> Iterator[None]:
    yield
    for path in Path("/etc/apt/sources.list.d").glob("nestbed-*.list"):
        path.unlink()
    subprocess.run(["dpkg", "--purge", "nestbed-fixture-bin"], capture_output=True, check=False)


def test_add_apt_source_makes_its_packages_installable(
    tmp_path: Path, apt_cleanup: None, request: pytest.FixtureRequest
) -> None:
    # apt reads file: sources as its unprivileged _apt user: the path must be readable
    repo = Path(tempfile.mkdtemp(prefix="nestbed-test-repo."))
    repo.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(repo))
    deb = make_deb(repo)
    (repo / "Packages").write_text(packages_index([inspect(str(deb))]))
    tree = write_package(
        tmp_path / "pkg",
        {"uses": "#!/bin/sh\ncat /usr/share/nestbed-fixture-bin/marker\n"},
        "Tests: uses\nDepends: nestbed-fixture-bin\n",
    )
    source = f"deb [trusted=yes] file://{repo} ./"
    p = nestbed("-B", "--add-apt-source", source, str(tree), "--", "null")
    assert p.returncode == 0, p.stdout + p.stderr
    assert results(p) == ["uses                 PASS"]
    assert "from the local deb" in p.stdout


def test_apt_pocket_adds_the_suite_and_pins(
    tmp_path: Path, apt_cleanup: None, pin_cleanup: None
) -> None:
    tree = write_package(
        tmp_path / "pkg",
        {"show": "#!/bin/sh\ncat /etc/apt/sources.list.d/nestbed-backports.list "
         "/etc/apt/preferences.d/nestbed-*-backports\n"},
        "Tests: show\nDepends:\n",
    )  # fmt: skip
    p = nestbed("-B", "--apt-pocket=backports=hello", str(tree), "--", "null")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^deb \S+ \w+-backports main$", p.stdout, re.M), p.stdout
    assert re.search(r"Package: hello\nPin: release a=\w+-backports\nPin-Priority: 995", p.stdout)


def test_setup_commands_by_name_are_looked_up_like_autopkgtest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare name is a shipped setup command (autopkgtest's directory first, then ours),
    even when a file of that name is in the current directory, as in autopkgtest; a path or
    anything not shipped is a file or else the command line itself."""
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    for directory, names in ((theirs, ["both", "theirs-only"]), (ours, ["both", "ours-only"])):
        directory.mkdir()
        for name in names:
            (directory / name).write_text(f"echo {directory.name} {name}\n")
    dirs = (str(theirs), str(ours))
    assert locate_command("both", dirs) == str(theirs / "both")
    assert locate_command("ours-only", dirs) == str(ours / "ours-only")
    assert locate_command("echo hi", dirs) == "echo hi"
    assert locate_command("./both", dirs) == "./both"
    # the real directories: autopkgtest's enable-sudo when it is installed, else ours
    monkeypatch.chdir(tmp_path)
    (tmp_path / "enable-sudo").write_text("echo a local file\n")
    shipped = os.path.join(AUTOPKGTEST_SETUP_COMMANDS, "enable-sudo")
    if not os.path.exists(shipped):
        shipped = os.path.join(OUR_SETUP_COMMANDS, "enable-sudo")
    options = parse_args(["--setup-commands", "enable-sudo", "--setup-commands", "./enable-sudo",
                          "--setup-commands", "true", str(FIXTURE), "--", "null"])  # fmt: skip
    with open(shipped, encoding="utf-8") as f:
        expected = f.read().strip()
    assert options.setup.setup_commands == (expected, "echo a local file", "true")


@pytest.mark.parametrize("name", ["create-normal-user", "enable-sudo"])
def test_we_ship_our_own_setup_commands(name: str) -> None:
    path = os.path.join(OUR_SETUP_COMMANDS, name)
    assert os.access(path, os.X_OK)
    assert subprocess.run(["sh", "-n", path]).returncode == 0
