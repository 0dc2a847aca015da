"""needs-baseimage as a user meets it: SKIP with the reason where the testbed cannot give
the base image, the real thing on QEMU without any flag, and the early look at the control
file that decides whether the QEMU testbed exports it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from nestbed.run.options import PackageArg
from nestbed.run.prescan import declared_restrictions
from tests_support import nestbed_argv, sha256, write_package

NEEDS_BASEIMAGE = (
    "Test-Command: echo got base image\nFeatures: test-name=nested\n"
    "Restrictions: needs-baseimage\n\n"
    "Test-Command: echo AUTOPKGTEST_BASEIMAGE=${AUTOPKGTEST_BASEIMAGE-unset}\n"
    "Features: test-name=plain\n"
)
SKIP_LINE = re.compile(
    r'^nested\s+SKIP Test restriction "needs-baseimage" requires testbed capability "baseimage": '
    r"only a QEMU testbed exports its base image",
    re.M,
)


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*nestbed_argv(), *args], capture_output=True, text=True, timeout=timeout)


# -- the early look at the control file ----------------------------------------------------
def test_prescan_reads_trees_with_comments_and_continuations(tmp_path: Path) -> None:
    control = (
        "# Restrictions: breaks-testbed (a comment)\n"
        "Tests: a\nRestrictions: needs-root,\n  needs-baseimage\n\n"
        "Test-Command: true\nrestrictions: allow-stderr\n"
    )
    tree = write_package(tmp_path / "pkg", {"a": "#!/bin/sh\n"}, control)
    found = declared_restrictions([PackageArg("unbuilt-tree", str(tree), False)])
    assert found == {"needs-root", "needs-baseimage", "allow-stderr"}


def test_prescan_reads_a_dsc_native_and_quilt(tmp_path: Path) -> None:
    if shutil.which("dpkg-source") is None:
        pytest.skip("needs dpkg-source (dpkg-dev)")
    control = "Test-Command: true\nRestrictions: needs-baseimage\n"
    for fmt in ("3.0 (native)", "3.0 (quilt)"):
        work = tmp_path / fmt[5:-1]
        tree = write_package(work / "fixture-1.0", {}, control)
        (tree / "debian" / "control").write_text(
            "Source: fixture\nMaintainer: t <t@localhost>\n\n"
            "Package: fixture\nArchitecture: all\nDescription: d\n"
        )
        (tree / "debian" / "source").mkdir()
        (tree / "debian" / "source" / "format").write_text(fmt + "\n")
        version = "1.0" if "native" in fmt else "1.0-1"
        changelog = (tree / "debian" / "changelog").read_text().replace("(1.0)", f"({version})")
        (tree / "debian" / "changelog").write_text(changelog)
        if "quilt" in fmt:
            subprocess.run(
                ["tar", "-C", str(work), "-czf", str(work / "fixture_1.0.orig.tar.gz"),
                 "--exclude=debian", "fixture-1.0"],
                check=True,
            )  # fmt: skip
        subprocess.run(
            ["dpkg-source", "-b", "fixture-1.0"], cwd=work, check=True, capture_output=True
        )
        dsc = work / f"fixture_{version}.dsc"
        assert declared_restrictions([PackageArg("source", str(dsc), False)]) == {
            "needs-baseimage"
        }, fmt


def test_prescan_is_quiet_about_what_it_cannot_see(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "debian" / "tests").mkdir(parents=True)
    (broken / "debian" / "tests" / "control").write_bytes(b"\xff\xfe not text")
    packages = [
        PackageArg("apt-source", "hello", False),
        PackageArg("git-source", "https://example.invalid/x.git", False),
        PackageArg("unbuilt-tree", str(tmp_path / "missing"), False),
        PackageArg("built-tree", str(broken), False),
        PackageArg("source", str(tmp_path / "missing.dsc"), False),
    ]
    assert declared_restrictions(packages) == frozenset()


# -- testbeds that cannot give the base image ------------------------------------------------
@pytest.mark.autopkgtest  # null runs on this host
def test_null_skips_needs_baseimage_with_the_reason(tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "pkg", {}, NEEDS_BASEIMAGE)
    r = _run(["-B", str(pkg), "--", "null"], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert SKIP_LINE.search(r.stdout), r.stdout
    assert re.search(r"^plain\s+PASS$", r.stdout, re.M), r.stdout
    assert "AUTOPKGTEST_BASEIMAGE=unset" in r.stdout
    assert "got base image" not in r.stdout


# -- QEMU: exported without a flag, refused with --no-baseimage ----------------------------------
BASEIMAGE_CHECK = r"""#!/bin/sh
# what the guest sees of the base image (after a reboot too: tests/virt/test_qemu_baseimage.py)
set -e
[ "$AUTOPKGTEST_BASEIMAGE" = /lib/autopkgtest/baseimage ]
[ "$(readlink -f /lib/autopkgtest/baseimage)" = "$(readlink -f /dev/baseimage)" ]
test -b /dev/baseimage
echo "mark=${AUTOPKGTEST_REBOOT_MARK:-none} nested_kvm=$AUTOPKGTEST_NESTED_KVM"
head -c 4096 /dev/baseimage | od -An -tx1 | head -n 1
if dd if=/dev/zero of=/lib/autopkgtest/baseimage bs=4096 count=1 conv=fsync 2>/dev/null; then
    echo "base image is writable"; exit 1
fi
echo checked
"""


@pytest.mark.vm
def test_qemu_exports_the_base_image_without_a_flag(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    before = sha256(nestbed_image.disk)
    control = (
        "Tests: check\nRestrictions: needs-baseimage, needs-root\n\n"
        "Test-Command: true\nFeatures: test-name=plain\n"
    )
    pkg = write_package(tmp_path / "pkg", {"check": BASEIMAGE_CHECK}, control)
    r = _run(["-B", str(pkg), "--", "qemu", str(nestbed_image.directory)], timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^check\s+PASS$", r.stdout, re.M), r.stdout
    assert re.search(r"^plain\s+PASS$", r.stdout, re.M), r.stdout
    assert "mark=none" in r.stdout and "checked" in r.stdout
    assert "nested_kvm=1" in r.stdout  # TCG -cpu max emulates SVM: KVM works in the guest
    assert sha256(nestbed_image.disk) == before

    refused = _run(
        ["-B", str(pkg), "--", "qemu", "--no-baseimage", str(nestbed_image.directory)],
        timeout=1200,
    )
    # 2: a test was skipped (a package whose only test is skipped exits 8, as in autopkgtest)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert re.search(
        r'^check\s+SKIP Test restriction "needs-baseimage" requires testbed capability',
        refused.stdout,
        re.M,
    ), refused.stdout
