"""Testbeds named as autopkgtest users name them: `-- NAME` is nestbed-virt-NAME, else
autopkgtest-virt-NAME; `-- autopkgtest-virt-NAME` is that program. Run with the servers
autopkgtest really ships that work here: null, and chroot on an unpacked root tarball."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests_support import nestbed_argv

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "packages"
RESULT = re.compile(r"^\S+ +(?:PASS|FAIL|SKIP|FLAKY)\b.*$|^blame: .*|^badpkg: .*")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="null and chroot testbeds run tests as root (su, chroot)"
)


def _run(argv: list[str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _results(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if RESULT.match(line)]


@pytest.mark.parametrize("name", ["autopkgtest-virt-null", "nestbed-virt-null"])
def test_server_named_with_its_prefix(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _run(
        [*nestbed_argv(), "-B", "-o", str(out), "--test-name=command1",
         str(FIXTURES / "pass-basic"), "--", name]
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert _results(p.stdout) == ["command1             PASS"]
    # testinfo.json names the program that ran, as autopkgtest records it
    info = json.loads((out / "testinfo.json").read_text())
    assert info["virt_server"] == name


def test_unknown_name_is_a_usage_error() -> None:
    p = subprocess.run(
        [*nestbed_argv(), str(FIXTURES / "pass-basic"), "--", "no-such-bed"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 20
    assert p.stderr.strip().splitlines() == [
        "nestbed: error: unknown virt server 'no-such-bed': no nestbed-virt-no-such-bed nor"
        f" autopkgtest-virt-no-such-bed in {Path(nestbed_argv()[0]).parent} nor in PATH"
    ]


def _unpack_root(into: Path) -> Path:
    """A Debian root tree for autopkgtest-virt-chroot: the unshare testbed's tarball, unpacked."""
    if shutil.which("autopkgtest-virt-chroot") is None or shutil.which("autopkgtest") is None:
        pytest.skip("needs autopkgtest (scripts/setup installs it)")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("needs mmdebstrap for the root tarball")
    from nestbed.container.tarball import ensure_tarball, host_arch, host_release
    from nestbed.image.progress import PlainProgress

    tarball = ensure_tarball(host_release(), host_arch(), None, progress=PlainProgress())
    into.mkdir()
    subprocess.run(["tar", "-C", str(into), "-xf", str(tarball)], check=True)
    return into


@pytest.fixture
def chroot_dir(tmp_path: Path) -> Iterator[Path]:
    root = _unpack_root(tmp_path / "chroot")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_chroot_by_name_matches_autopkgtest(chroot_dir: Path, tmp_path: Path) -> None:
    """`-- chroot DIR` runs autopkgtest-virt-chroot: the same result lines and exit code as
    autopkgtest gives with it (a built tree: nothing needs installing from the mirror)."""
    tree = tmp_path / "tree"
    shutil.copytree(FIXTURES / "pass-basic", tree)
    (tree / "debian" / "files").write_text("")  # a built tree, as both programs see it
    runs = {}
    for program in (["autopkgtest"], nestbed_argv()):
        p = _run([*program, str(tree), "--", "chroot", str(chroot_dir)])
        runs[Path(program[0]).name] = (p.returncode, _results(p.stdout))
    assert runs["nestbed"] == runs["autopkgtest"]
    assert runs["nestbed"] == (
        0,
        ["smoke                PASS", "named-command        PASS", "command1             PASS"],
    )


@pytest.mark.network
def test_apt_release_options_match_autopkgtest(tmp_path: Path) -> None:
    """--add-apt-release and --apt-default-release in a chroot (never on this host): each
    program in a fresh root, the same result lines and exit code."""
    from tests_support import write_package

    release = subprocess.run(
        ["sh", "-c", ". /etc/os-release; echo $VERSION_CODENAME"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    tree = write_package(
        tmp_path / "tree",
        {},
        f"Test-Command: ls /etc/apt/sources.list.d | grep -q add-apt-release-{release}-backports"
        f" && apt-cache policy | grep -q ' {release}-backports/'\n"
        "Features: test-name=added-release\nDepends:\n\n"
        f"Test-Command: grep -rqx 'Pin: release {release}' /etc/apt/preferences.d\n"
        "Features: test-name=default-release\nDepends:\n",
    )
    (tree / "debian" / "files").write_text("")  # a built tree: nothing to build or install
    runs = {}
    for i, program in enumerate((["autopkgtest"], nestbed_argv())):
        root = _unpack_root(tmp_path / f"root{i}")
        try:
            p = _run(
                [*program, f"--add-apt-release={release}-backports",
                 f"--apt-default-release={release}", str(tree), "--", "chroot", str(root)]
            )  # fmt: skip
        finally:
            shutil.rmtree(root, ignore_errors=True)
        runs[Path(program[0]).name] = (p.returncode, _results(p.stdout))
    assert runs["nestbed"] == runs["autopkgtest"]
    assert runs["nestbed"] == (
        0, ["added-release        PASS", "default-release      PASS"]
    )  # fmt: skip
