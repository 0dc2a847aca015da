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
from nestbed.image import ImagePaths
from nestbed.image.progress import PlainProgress
from tests_support import nestbed_argv, sleepers, write_package

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


# -- 5 and 17: the built tree, and background processes left behind ------------------------

BUILDDEPS = Path(__file__).parent.parent / "fixtures" / "packages" / "builddeps"


def built_fixture(root: Path, control: str, tests: dict[str, str], build_extra: str = "") -> Path:
    """The builddeps fixture (a plain debian/rules) with its own tests and build step."""
    tree = root / "builddeps"
    shutil.copytree(BUILDDEPS, tree)
    rules = tree / "debian" / "rules"
    text = rules.read_text().replace(
        "\techo built > built-marker\n", f"\techo built > built-marker\n{build_extra}"
    )
    rules.write_text(text)
    (tree / "debian" / "tests" / "control").write_text(control)
    for name, body in tests.items():
        (tree / "debian" / "tests" / name).write_text(body)
        (tree / "debian" / "tests" / name).chmod(0o755)
    return tree


@pytest.mark.parametrize("testbed", ["null", "unshare"])
def test_every_test_runs_in_the_built_tree(testbed: str, tmp_path: Path) -> None:
    """The second test needs a revert where the testbed has one (other dependencies): it
    still finds the build's product, as under autopkgtest, which copies its built tree
    into each reverted testbed."""
    tree = built_fixture(
        tmp_path,
        "Tests: first\nDepends: make\nRestrictions: build-needed\n\n"
        "Tests: second\nDepends: diffutils\n",
        {"first": "#!/bin/sh\ncat built-marker\n", "second": "#!/bin/sh\ncat built-marker\n"},
    )
    proc = run_nestbed(tree, testbed, "-B", "-d")
    assert result_lines(proc.stdout) == ["first PASS", "second PASS"], proc.stderr[-3000:]
    assert proc.returncode == 0
    assert proc.stdout.count("built\n") == 2
    if testbed == "unshare":
        assert "reverting the testbed" in proc.stderr  # what the second test's run shows


@pytest.mark.parametrize("testbed", ["null", "unshare"])
def test_background_processes_do_not_hang_a_build_or_a_test(testbed: str, tmp_path: Path) -> None:
    """debian/rules and a test each leave `(sleep N &)` holding their output: the build and
    the test end with their main process (and the sleepers are gone), well before the
    timeout that would otherwise end them as a testbed failure."""
    tree = built_fixture(
        tmp_path,
        "Tests: uses-build\nDepends: make\nRestrictions: build-needed\n\n"
        "Tests: leaves-one\nDepends: make\n",
        {"leaves-one": "#!/bin/sh\n(sleep 291 &)\necho started one\n"},
        build_extra="\t(sleep 293 &)\n",
    )
    limits = ("--timeout-build=120", "--timeout-test=120")
    proc = run_nestbed(tree, testbed, "-B", *limits, timeout=400)
    assert result_lines(proc.stdout) == ["uses-build PASS", "leaves-one PASS"], proc.stderr[-3000:]
    assert proc.returncode == 0
    assert "build: killing leaked background processes" in proc.stderr
    assert "test leaves-one: killing leaked background processes" in proc.stderr
    assert sleepers("291") == [] and sleepers("293") == []


# -- 13: a package under test older than the testbed's ---------------------------------------


def fixture_deb(directory: Path, name: str, version: str, depends: str = "") -> Path:
    root = directory / f"{name}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr" / "share" / name).mkdir(parents=True)
    (root / "usr" / "share" / name / "version").write_text(version + "\n")
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        + (f"Depends: {depends}\n" if depends else "")
        + "Maintainer: t <t@localhost>\nDescription: nestbed test fixture\n"
    )
    deb = directory / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "-b", str(root), str(deb)], check=True, capture_output=True)
    return deb


def test_binaries_below_the_installed_version_are_tested_not_refused(tmp_path: Path) -> None:
    """The class of bzip2 1.0.8-5 against the archive's libbz2-1.0 1.0.8-5+b1: the testbed
    has a package of ours at a newer version than the one under test. The one under test
    is installed when it is offered (as autopkgtest's reinstall does), so a test depending
    on its sibling (Depends: lib (= 0.9)) installs without a downgrade apt refuses."""
    newer = fixture_deb(tmp_path, "nestbed-fixture-lib", "1.0")
    lib = fixture_deb(tmp_path, "nestbed-fixture-lib", "0.9")
    tool = fixture_deb(tmp_path, "nestbed-fixture-tool", "0.9", "nestbed-fixture-lib (= 0.9)")
    tree = write_package(
        tmp_path / "pkg",
        {"uses-tool": "#!/bin/sh\ncat /usr/share/nestbed-fixture-lib/version\n"},
        "Tests: uses-tool\nDepends: nestbed-fixture-tool\n",
    )
    proc = run_nestbed(
        tree,
        "unshare",
        "-B",
        f"--copy={newer}:/root/newer.deb",
        "--setup-commands=dpkg -i /root/newer.deb",
        str(lib),
        str(tool),
    )
    assert result_lines(proc.stdout) == ["uses-tool PASS"], proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0
    assert "0.9\n" in proc.stdout


@pytest.mark.vm
def test_leftover_process_and_exit_255_on_the_qemu_testbed(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    """On QEMU, where the guest agent runs the commands: a test's leftover sleeper does not
    keep it open, and a test exiting 255 is FAIL 253 there too; the run goes on. (The
    build runs under the same wrapper; building needs dpkg-dev, which the minimal image
    lacks, so the build's case is shown on null and unshare.)"""
    tree = write_package(
        tmp_path / "pkg",
        {
            "leaves-one": "#!/bin/sh\n(sleep 291 &)\necho started one\n",
            "t255": "#!/bin/sh\nexit 255\n",
            "after": "#!/bin/sh\necho after\n",
        },
        "Tests: leaves-one t255 after\nDepends:\n",
    )
    proc = subprocess.run(
        [*nestbed_argv(), "-B", "--timeout-test=240", str(tree), "--", "qemu",
         str(nestbed_image.directory)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result_lines(proc.stdout) == [
        "leaves-one PASS",
        "t255 FAIL non-zero exit status 253",
        "after PASS",
    ], proc.stderr[-3000:]
    assert proc.returncode == 4
    assert "test leaves-one: killing leaked background processes" in proc.stderr


# -- 9: where apt's and the build's output go ---------------------------------------------


@pytest.mark.autopkgtest
@pytest.mark.parametrize("program", ["autopkgtest", "nestbed"])
def test_apt_and_build_output_go_where_autopkgtest_puts_them(program: str, tmp_path: Path) -> None:
    """Null testbed, -d: apt's lines of the dependency installation on stdout, before the
    result line; the build's output on stderr; both in the log; -d reports the steps."""
    if os.geteuid() != 0:
        pytest.skip("the null testbed installs dependencies on this host as root")
    exe = shutil.which("autopkgtest") if program == "autopkgtest" else nestbed_argv()[0]
    if exe is None:
        pytest.skip("autopkgtest is not installed")
    out = tmp_path / "out"
    proc = subprocess.run(
        [exe, "-d", "-B", "-o", str(out), str(BUILDDEPS), "--", "null"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    apt_line = "Reading package lists..."
    build_line = "dpkg-buildpackage: info: source package builddeps"
    assert apt_line in proc.stdout and apt_line not in proc.stderr
    assert proc.stdout.index(apt_line) < proc.stdout.index("uses-build           PASS")
    assert build_line in proc.stderr and build_line not in proc.stdout
    log = (out / "log").read_text()
    assert apt_line in log and build_line in log
    for step in (
        f"{BUILDDEPS}: satisfying make",
        "install-deps: satisfying make",
        "can use apt-get on testbed: True",
    ):
        assert step in proc.stderr, step


# -- an unbuilt tree's quilt patches ----------------------------------------------------------


def _quilt_tree(root: Path, series: str) -> Path:
    tree = write_package(
        root,
        {"patched": "#!/bin/sh\nset -e\ngrep -x patched greeting\n"},
        "Tests: patched\nDepends:\n",
    )
    (tree / "greeting").write_text("unpatched\n")
    with (tree / "debian" / "control").open("a") as control:
        control.write("\nPackage: fixture\nArchitecture: all\nDescription: patched\n d\n")
    (tree / "debian" / "rules").write_text("#!/usr/bin/make -f\n%:\n\ttrue\n")
    (tree / "debian" / "rules").chmod(0o755)
    (tree / "debian" / "source").mkdir()
    (tree / "debian" / "source" / "format").write_text("3.0 (quilt)\n")
    patches = tree / "debian" / "patches"
    patches.mkdir()
    (patches / "greeting.patch").write_text(
        "--- a/greeting\n+++ b/greeting\n@@ -1 +1 @@\n-unpatched\n+patched\n"
    )
    (patches / "series").write_text(series)
    return tree


def test_a_tree_with_patches_is_tested_patched_where_the_testbed_lacks_dpkg_dev(
    tmp_path: Path,
) -> None:
    """As autopkgtest: dpkg-source --before-build applies the quilt patches, dpkg-dev
    installed first (the minimal Debian of the unshare testbed has no dpkg-source)."""
    tree = _quilt_tree(tmp_path / "pkg", "# the one patch\ngreeting.patch\n")
    proc = run_nestbed(tree, "unshare", "-B")
    assert result_lines(proc.stdout) == ["patched PASS"], proc.stderr[-3000:]
    assert proc.returncode == 0
    assert "dpkg-source not available in the testbed, installing dpkg-dev" in proc.stderr
    assert (tree / "greeting").read_text() == "unpatched\n"  # the user's tree is untouched


def test_patches_to_apply_only_where_dpkg_source_would_change_the_tree(tmp_path: Path) -> None:
    from nestbed.run.tree import has_patches_to_apply

    assert has_patches_to_apply(str(_quilt_tree(tmp_path / "a", "greeting.patch\n")))
    assert not has_patches_to_apply(str(_quilt_tree(tmp_path / "b", "# none yet\n\n")))
    native = _quilt_tree(tmp_path / "c", "greeting.patch\n")
    (native / "debian" / "source" / "format").write_text("3.0 (native)\n")
    assert not has_patches_to_apply(str(native))
