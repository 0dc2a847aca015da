"""The autopkgtest-style images (tests/autopkgtest_image.py): the BIOS one boots from its
own disk (SeaBIOS, syslinux, no -kernel) to setup-testbed's root shell on ttyS1, and
autopkgtest's own QEMU testbed runs a package's test on it; the EFI-only one boots the same
way through OVMF and systemd-boot. TCG only: KVM hangs stock kernels here."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from nestbed.image.foreign import firmware_for, first_sector
from nestbed.qemu.machine import OVMF_CODE, OVMF_VARS
from tests_support import nestbed_argv, sha256, tcg_qemu_wrapper, write_package

pytestmark = pytest.mark.vm

QEMU = "qemu-system-x86_64"
MACHINE = ["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"]
SHELL_DEADLINE = 300.0
AUTOPKGTEST_TIMEOUT = 1200
# autopkgtest-virt-qemu waits 60 s for the login prompt by default: too short under TCG
# on a shared 2-core machine
BOOT_TIMEOUT = 300


class Serial:
    """The host end of the guest's ttyS1 (a unix socket QEMU serves)."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.buffer = b""
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self.sock.close()

    def run(self, command: str, timeout: float = 30) -> str:
        """command's output, through the shell (which echoes its input: the markers are
        split by quotes in what is sent, whole only in what the shell prints)."""
        line = f'echo "@@b""eg@@$({command})@@e""nd@@"'
        m = self.ask(line, r"@@beg@@(.*?)@@end@@", timeout)
        assert m is not None, f"no answer to {command!r}: {self.buffer!r}"
        return m.group(1).decode(errors="replace")

    def ask(self, line: str, pattern: str, timeout: float) -> re.Match[bytes] | None:
        """Send line; the first match of pattern in what comes back within timeout."""
        self.buffer = b""
        self.sock.sendall(line.encode() + b"\n")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.sock.settimeout(max(0.05, end - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            if not data:
                break
            self.buffer += data
            m = re.search(pattern.encode(), self.buffer)
            if m:
                return m
        return None


@contextlib.contextmanager
def _boot(
    image: Path, tmp_path: Path, firmware: list[str], what: str
) -> Iterator[tuple[Serial, Path, str]]:
    """image booted (with firmware's QEMU options) through a fresh overlay: (ttyS1, console
    log, image sha256 before)."""
    before = sha256(image)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image),
         str(overlay)],
        check=True,
    )  # fmt: skip
    console = tmp_path / "console.log"
    sock = tmp_path / "ttyS1.sock"
    start = time.monotonic()
    qemu = subprocess.Popen(
        [QEMU, *MACHINE, *firmware, "-display", "none", "-monitor", "none",
         "-drive", f"file={overlay},format=qcow2,if=virtio",
         "-nic", "user,model=virtio",
         "-serial", f"file:{console}",
         "-serial", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "qemu.stderr").open("wb"),
    )  # fmt: skip
    serial: Serial | None = None
    try:
        deadline = start + SHELL_DEADLINE
        serial = Serial(sock, deadline)
        while True:
            assert qemu.poll() is None, (tmp_path / "qemu.stderr").read_text()
            if serial.ask("echo o''k", r"\bok\b", timeout=5) is not None:
                break
            assert time.monotonic() < deadline, (
                f"no root shell on ttyS1 in {SHELL_DEADLINE:.0f} s; console:\n"
                + console.read_text(errors="replace")[-3000:]
            )
        seconds = time.monotonic() - start
        sys.stderr.write(f"{what}: qemu start -> ttyS1 shell {seconds:.1f} s\n")
        yield serial, console, before
    finally:
        if serial is not None:
            serial.close()
        qemu.kill()
        qemu.wait()


@pytest.fixture
def booted(autopkgtest_image: Path, tmp_path: Path) -> Iterator[tuple[Serial, Path, str]]:
    """The BIOS image booted by SeaBIOS through a fresh overlay."""
    with _boot(autopkgtest_image, tmp_path, [], "autopkgtest-style image") as booted:
        yield booted


@pytest.fixture
def booted_efi(autopkgtest_efi_image: Path, tmp_path: Path) -> Iterator[tuple[Serial, Path, str]]:
    """The EFI-only image booted by OVMF (code read-only, a fresh copy of its variable
    store, machine type pc) through a fresh overlay."""
    if not (OVMF_CODE.exists() and OVMF_VARS.exists()):
        pytest.skip(f"needs {OVMF_CODE} and {OVMF_VARS} (apt-get install ovmf)")
    efi_vars = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, efi_vars)
    firmware = [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={efi_vars}",
    ]  # fmt: skip
    with _boot(autopkgtest_efi_image, tmp_path, firmware, "autopkgtest-style EFI image") as b:
        yield b


def test_boots_by_syslinux_to_a_root_shell_on_ttyS1(
    autopkgtest_image: Path, booted: tuple[Serial, Path, str]
) -> None:
    serial, console, before = booted
    assert serial.run("id -u") == "0"
    # the kernel, its command line and the root file system are the disk's own
    cmdline = serial.run("cat /proc/cmdline")
    assert "initrd=/initrd.img" in cmdline and "root=UUID=" in cmdline
    assert "console=ttyS0" in cmdline
    fstype, options = serial.run("findmnt -no FSTYPE,OPTIONS /").split()
    assert fstype == "ext4" and "rw" in options.split(",")
    assert serial.run("systemctl is-active autopkgtest@ttyS1.service") == "active"
    log = console.read_text(errors="replace")
    assert "SYSLINUX" in log and "Loading /vmlinuz... ok" in log
    assert "Linux version" in log
    assert sha256(autopkgtest_image) == before


def test_efi_image_boots_by_ovmf_and_systemd_boot_to_a_root_shell_on_ttyS1(
    autopkgtest_efi_image: Path, booted_efi: tuple[Serial, Path, str]
) -> None:
    serial, console, before = booted_efi
    assert serial.run("id -u") == "0"
    # booted by the firmware's EFI, and by systemd-boot from its entry: systemd-boot's EFI
    # variables (UTF-16 strings after 4 bytes of attributes: printable characters kept)
    assert serial.run("test -d /sys/firmware/efi && echo efi") == "efi"
    efivars = "/sys/firmware/efi/efivars"
    loader = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
    info = serial.run(f"tr -cd '[:print:]' < {efivars}/LoaderInfo-{loader}")
    assert info.startswith("systemd-boot"), info
    entry = serial.run(f"tr -cd '[:print:]' < {efivars}/LoaderEntrySelected-{loader}")
    assert entry == "debian.conf", entry
    cmdline = serial.run("cat /proc/cmdline")
    # systemd-boot passes the entry's initrd on the command line too
    assert cmdline.startswith("initrd=\\initrd.img ")
    assert "root=UUID=" in cmdline and "console=ttyS0" in cmdline
    fstype, options = serial.run("findmnt -no FSTYPE,OPTIONS /").split()
    assert fstype == "ext4" and "rw" in options.split(",")
    assert serial.run("systemctl is-active autopkgtest@ttyS1.service") == "active"
    assert "Linux version" in console.read_text(errors="replace")
    assert sha256(autopkgtest_efi_image) == before


def test_firmware_for_tells_the_two_images_apart(
    autopkgtest_image: Path, autopkgtest_efi_image: Path
) -> None:
    # what nestbed-virt-qemu --boot=auto decides from the first sector
    assert firmware_for(first_sector(autopkgtest_image, "qcow2")) == "bios"
    assert firmware_for(first_sector(autopkgtest_efi_image, "qcow2")) == "efi"


@pytest.mark.autopkgtest
def test_autopkgtest_qemu_testbed_runs_a_test(autopkgtest_image: Path, tmp_path: Path) -> None:
    if not os.path.exists("/usr/bin/autopkgtest"):
        pytest.skip("needs autopkgtest")
    before = sha256(autopkgtest_image)
    wrapper = tcg_qemu_wrapper(tmp_path)
    pkg = write_package(
        tmp_path / "pkg",
        {"smoke": '#!/bin/sh\nset -e\n[ "$(id -u)" = 0 ]\necho smoke-ran-as-root\n'},
        "Tests: smoke\nDepends:\nRestrictions: needs-root\n",
    )
    start = time.monotonic()
    proc = subprocess.run(
        ["autopkgtest", "--no-built-binaries", "-o", str(tmp_path / "out"), str(pkg), "--",
         "qemu", "--qemu-command", str(wrapper), "--ram-size", "2048", "--cpus", "2",
         "--timeout-reboot", str(BOOT_TIMEOUT), "--show-boot",
         str(autopkgtest_image)],
        capture_output=True, text=True, timeout=AUTOPKGTEST_TIMEOUT, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - start
    sys.stderr.write(f"autopkgtest-style image: autopkgtest qemu run {seconds:.1f} s\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^smoke\s+PASS\b", proc.stdout, re.M), proc.stdout
    assert "smoke-ran-as-root" in (tmp_path / "out" / "log").read_text(errors="replace")
    assert sha256(autopkgtest_image) == before


@pytest.mark.autopkgtest
def test_autopkgtest_qemu_runs_a_test_on_a_nestbed_image(
    generic_kernel_image: ImagePaths, tmp_path: Path
) -> None:
    """Interop the other way round: autopkgtest 5.28's own QEMU testbed boots a nestbed
    image (built with --kernel generic) from its disk, finds the root shell on hvc1 and runs
    a root test in it; nestbed runs the same package on the same image; the disk is
    unchanged after both."""
    if not os.path.exists("/usr/bin/autopkgtest"):
        pytest.skip("needs autopkgtest")
    disk = generic_kernel_image.disk
    before = sha256(disk)
    pkg = write_package(
        tmp_path / "pkg",
        {"smoke": "#!/bin/sh\nset -e\n[ \"$(id -u)\" = 0 ]\n"
                  "echo \"ran as root on $(uname -r)\"\ncat /etc/nestbed/image.json\n"},
        "Tests: smoke\nDepends:\nRestrictions: needs-root\n",
    )  # fmt: skip
    # -U: autopkgtest needs dpkg-dev in the testbed for a source tree, and nestbed's images
    # carry no package lists
    proc = subprocess.run(
        ["autopkgtest", "-U", "--no-built-binaries", "-o", str(tmp_path / "out"), str(pkg), "--",
         "qemu", "--qemu-command", str(tcg_qemu_wrapper(tmp_path)), "--ram-size", "2048",
         "--cpus", "2", "--timeout-reboot", str(BOOT_TIMEOUT), str(disk)],
        capture_output=True, text=True, timeout=AUTOPKGTEST_TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^smoke\s+PASS\b", proc.stdout, re.M), proc.stdout
    log = (tmp_path / "out" / "log").read_text(errors="replace")
    kernel = generic_kernel_image.manifest.kernel_version
    assert f"ran as root on {kernel}" in log and kernel.endswith("-amd64"), log[-2000:]
    assert f'"name": "{generic_kernel_image.name}"' in log, log[-2000:]

    res = subprocess.run(
        [*nestbed_argv(), "--no-built-binaries", str(pkg), "--", "qemu",
         str(generic_kernel_image.directory)],
        capture_output=True, text=True, timeout=AUTOPKGTEST_TIMEOUT, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert re.search(r"^smoke\s+PASS\b", res.stdout, re.M), res.stdout
    assert f"ran as root on {kernel}" in res.stdout + res.stderr
    assert sha256(disk) == before
