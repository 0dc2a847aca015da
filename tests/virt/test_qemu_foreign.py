"""nestbed-virt-qemu on an image from autopkgtest's builders (tests/autopkgtest_image.py): no
nestbed agent, no manifest; booted by its own bootloader, entered through the root shell
autopkgtest's setup-testbed starts on ttyS1, with only python3-minimal inside."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests_support import nestbed_argv, sha256, write_package

pytestmark = pytest.mark.vm

FIXTURES = Path(__file__).parent.parent / "fixtures" / "packages"
SERVER = str(Path(sys.executable).parent / "nestbed-virt-qemu")
RESULT = re.compile(r"^(\S+)\s+(PASS|FAIL|SKIP|FLAKY|ERROR)\b(.*)$", re.M)
RUN_TIMEOUT = 1500


def nestbed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*nestbed_argv(), *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )


def results(text: str) -> list[str]:
    return [f"{m[0]} {m[1]}{m[2].rstrip()}" for m in RESULT.findall(text)]


def test_runner_verdicts_match_null(autopkgtest_image: Path) -> None:
    """The spine's mixed fixture gives the verdicts it gives with null (but for the
    breaks-testbed test, which only a revertible testbed runs), and the image is unchanged."""
    before = sha256(autopkgtest_image)
    mixed = str(FIXTURES / "mixed")
    null = nestbed("-B", mixed, "--", "null")
    vm = nestbed("-B", mixed, "--", "qemu", str(autopkgtest_image))
    expected = [r for r in results(null.stdout) if not r.startswith("breaks-testbed ")]
    got = results(vm.stdout)
    assert "breaks-testbed FAIL non-zero exit status 1" in got, vm.stderr[-3000:]
    assert [r for r in got if not r.startswith("breaks-testbed ")] == expected, vm.stderr[-3000:]
    assert vm.returncode == null.returncode
    assert sha256(autopkgtest_image) == before


# One reboot: what is this image's own is the agent started again through the serial
# shell; both ways to reboot (autopkgtest-reboot, -prepare + reboot) are tests/run/test_reboot.py's.
REBOOT_ONCE = r"""#!/bin/sh
set -e
boot=$(cat /proc/sys/kernel/random/boot_id)
echo "run mark=${AUTOPKGTEST_REBOOT_MARK:-none} boot=$boot"
case "${AUTOPKGTEST_REBOOT_MARK:-}" in
    "")
        echo first > "$AUTOPKGTEST_TMP/kept"
        autopkgtest-reboot one
        echo "not reached" ;;
    one)
        grep -qx first "$AUTOPKGTEST_TMP/kept"
        echo done ;;
esac
"""


def test_reboots_user_and_python3_minimal(autopkgtest_image: Path, tmp_path: Path) -> None:
    """needs-reboot re-runs the test after a real reboot (the agent is started again through
    the serial shell); tests without needs-root run as the image's own user; the
    guest really has no full python3 (so the agent ran on python3-minimal)."""
    pkg = write_package(
        tmp_path / "pkg",
        {
            "rebooter": REBOOT_ONCE,
            "whoami": '#!/bin/sh\nset -e\necho "user=$(id -un) uid=$(id -u)"\n',
            "minimal": "#!/bin/sh\n! python3 -c 'import json' 2>/dev/null\n"
            "ls /usr/lib/python3*/json 2>/dev/null && exit 1\necho python3-minimal\n",
        },
        "Tests: rebooter\nDepends:\nRestrictions: needs-root, needs-reboot\n\n"
        "Tests: whoami\nDepends:\n\nTests: minimal\nDepends:\n",
    )
    r = nestbed("-B", str(pkg), "--", "qemu", str(autopkgtest_image))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert results(r.stdout) == ["rebooter PASS", "whoami PASS", "minimal PASS"], r.stdout
    runs = re.findall(r"^run mark=(\S+) boot=(\S+)$", r.stdout, re.M)
    assert [mark for mark, _ in runs] == ["none", "one"]
    assert len({boot for _, boot in runs}) == 2
    assert "not reached" not in r.stdout and "done" in r.stdout
    assert "user=user uid=1000" in r.stdout
    assert "python3-minimal" in r.stdout


def test_a_file_that_is_no_disk_is_one_clear_line(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a disk image\n" * 100)
    r = subprocess.run(
        [SERVER, str(junk)], input="open\n", capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0
    assert "neither a nestbed image nor a bootable disk" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.autopkgtest
def test_autopkgtest_drives_the_server_on_its_own_kind_of_image(
    autopkgtest_image: Path, tmp_path: Path
) -> None:
    """An existing CI line `autopkgtest ... -- qemu IMAGE` keeps working with nestbed's server
    in place of autopkgtest's: same verdicts as autopkgtest gives with null."""
    if shutil.which("autopkgtest") is None:
        pytest.skip("autopkgtest is not installed")
    mixed = str(FIXTURES / "mixed")

    def autopkgtest(*virt: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["autopkgtest", "-B", mixed, "--", *virt],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
        )  # fmt: skip

    null = autopkgtest("null")
    vm = autopkgtest(SERVER, str(autopkgtest_image))
    got = results(vm.stdout)
    assert "breaks-testbed FAIL non-zero exit status 1" in got, vm.stderr[-3000:]
    expected = [r for r in results(null.stdout) if not r.startswith("breaks-testbed ")]
    assert [r for r in got if not r.startswith("breaks-testbed ")] == expected, vm.stderr[-3000:]
    assert vm.returncode == null.returncode


def test_a_disk_without_a_root_shell_is_a_testbed_failure_in_bounded_time(
    tmp_path: Path,
) -> None:
    """A partitioned disk that never offers the ttyS1 shell (here: nothing bootable at all,
    so no login prompt on the console either, which the server waits for before it types on
    a serial port): `open` fails after --timeout-reboot with the reason, and nothing is left
    behind."""
    disk = tmp_path / "blank.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
        f.seek(446)
        f.write(bytes([0x80, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") * 2)
        f.seek(510)
        f.write(b"\x55\xaa")
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    started = time.monotonic()
    r = subprocess.run(
        [SERVER, "--timeout-reboot", "20", "--overlay-dir", str(overlays), str(disk)],
        input="open\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert "no login prompt on the serial console (ttyS0)" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert not any(overlays.iterdir())


def test_an_efi_only_disk_boots_with_ovmf(autopkgtest_efi_image: Path, tmp_path: Path) -> None:
    """--boot=auto sees a GPT disk with no BIOS boot code and boots it with OVMF (as
    autopkgtest's newer builder makes them); the test runs in an EFI-booted guest."""
    pkg = write_package(
        tmp_path / "pkg",
        {"efi": "#!/bin/sh\nset -e\ntest -d /sys/firmware/efi\necho booted-by-efi\n"},
        "Tests: efi\nDepends:\n",
    )
    r = nestbed("-B", str(pkg), "--", "qemu", str(autopkgtest_efi_image))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert results(r.stdout) == ["efi PASS"]
    assert "booted-by-efi" in r.stdout
