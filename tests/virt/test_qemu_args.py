"""nestbed-virt-qemu's command line: bad input is one clear line, no traceback (no VM)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests_support import fake_image

SERVER = str(Path(sys.executable).parent / "nestbed-virt-qemu")


def server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SERVER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_not_an_image(tmp_path: Path) -> None:
    res = server(str(tmp_path))
    assert res.returncode != 0
    assert "not a complete nestbed image" in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_options(tmp_path: Path) -> None:
    assert server("--accel", "hvf", str(tmp_path)).returncode == 2
    res = server("--overlay-dir", str(tmp_path / "missing"), str(tmp_path))
    assert res.returncode != 0 and "Traceback" not in res.stderr


def test_help_lists_the_options() -> None:
    out = server("--help").stdout
    options = "--cpus --ram-size --accel --qemu-cpu --qemu-command --qemu-options -q -o"
    options += " --qemu-architecture --dpkg-architecture"
    more = ("--timeout-reboot", "--show-boot", "--overlay-dir", "--baseimage", "--no-baseimage")
    for option in (*options.split(), *more):
        assert option in out


def test_default_memory_fits_a_small_machine(tmp_path: Path) -> None:
    """A level-1 testbed has 2 GiB: a level-2 guest asking for all of it cannot start."""
    from nestbed.virt.qemu import default_ram_mb

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1 kB\n")
    assert default_ram_mb(meminfo) == 2048
    meminfo.write_text("MemTotal:        2010000 kB\n")
    assert default_ram_mb(meminfo) == 960
    assert default_ram_mb(tmp_path / "missing") == 2048


# ---- autopkgtest-virt-qemu's options, by their effect on the QEMU command line ----------
# A fake QEMU records how it was started and exits: open then fails in one line, and the
# record shows which program ran, with which firmware, where the overlay went.

FAKE_QEMU = '#!/bin/sh\necho "$0 $*" >> "$FAKE_QEMU_LOG"\nexit 1\n'


def efi_only_disk(path: Path) -> Path:
    """A disk from another builder that `--boot=auto` boots with EFI: a protective MBR
    (type 0xee), no boot code."""
    sector = bytearray(512)
    sector[446 + 4] = 0xEE
    sector[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(sector) + b"\0" * (1 << 20))
    return path


def started_qemu(tmp_path: Path, *args: str, programs: tuple[str, ...] = ()) -> list[str]:
    """Open with the fake QEMU (as -q, or as PROGRAMS on PATH); the command lines it got."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "qemu.log"
    for name in ("fake-qemu", *programs):
        (bindir / name).write_text(FAKE_QEMU)
        (bindir / name).chmod(0o755)
    env = {**os.environ, "FAKE_QEMU_LOG": str(log), "PATH": f"{bindir}:{os.environ['PATH']}"}
    res = subprocess.run(
        [SERVER, "--cold-boot", *args], input="open\n", capture_output=True, text=True,
        timeout=120, check=False, env=env,
    )  # fmt: skip
    assert res.returncode == 12, res.stderr
    assert "Traceback" not in res.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_q_and_o_short_forms(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "image")
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    runs = started_qemu(tmp_path, "-q", str(tmp_path / "bin" / "fake-qemu"),
                        "-o", str(overlays), str(image))  # fmt: skip
    assert len(runs) == 1
    assert runs[0].startswith(f"{tmp_path / 'bin' / 'fake-qemu'} ")
    assert f"file={overlays}/nestbed-qemu-" in runs[0]  # the overlay went to -o's directory
    assert os.listdir(overlays) == []  # and went with the machine


def test_architecture_chooses_the_qemu_program(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "image")
    runs = started_qemu(tmp_path, "--dpkg-architecture", "i386", str(image),
                        programs=("qemu-system-i386", "qemu-system-x86_64"))  # fmt: skip
    assert [r.split()[0] for r in runs] == [str(tmp_path / "bin" / "qemu-system-i386")]
    (tmp_path / "qemu.log").unlink()
    # --qemu-architecture wins over --dpkg-architecture
    runs = started_qemu(tmp_path, "--qemu-architecture", "x86_64",
                        "--dpkg-architecture", "i386", str(image))  # fmt: skip
    assert [r.split()[0] for r in runs] == [str(tmp_path / "bin" / "qemu-system-x86_64")]


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["--dpkg-architecture", "arm64"], "--dpkg-architecture arm64"),
        (["--qemu-architecture", "ppc64le"], "--qemu-architecture ppc64le"),
        (["-q", "qemu-system-aarch64"], "--qemu-command qemu-system-aarch64"),
    ],
)
def test_an_architecture_nestbed_cannot_run_is_one_line(
    tmp_path: Path, args: list[str], what: str
) -> None:
    res = server(*args, str(fake_image(tmp_path / "image")))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nestbed-virt-qemu: {what}: "), lines
    assert "x86_64 and i386 guests only" in lines[0]


@pytest.mark.parametrize("boot", ["none", "ieee1275", "bios"])
def test_boot_modes_without_firmware(tmp_path: Path, boot: str) -> None:
    """autopkgtest's bios, ieee1275 and none: QEMU's default firmware, no OVMF, even for a
    disk that auto would boot with EFI."""
    disk = efi_only_disk(tmp_path / "disk.raw")
    qemu = str(tmp_path / "bin" / "fake-qemu")
    auto = started_qemu(tmp_path, "-q", qemu, str(disk))
    assert "if=pflash" in auto[0]
    (tmp_path / "qemu.log").unlink()
    runs = started_qemu(tmp_path, "-q", qemu, f"--boot={boot}", str(disk))
    assert runs and "if=pflash" not in runs[0] and "bootindex=0" in runs[0]


def test_boot_mode_on_a_nestbed_image_is_one_line(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "image")
    res = server("--boot=none", str(image))
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"nestbed-virt-qemu: --boot=none: {image} is a nestbed image, which boots its kernel"
        " directly"
    )
