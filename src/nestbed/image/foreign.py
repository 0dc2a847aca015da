"""A disk image from another builder (autopkgtest-build-qemu, ...): boots with its own bootloader.

nestbed cannot read such a disk's kernel or manifest, so it boots it as a PC does -- firmware,
bootloader, kernel -- and gets in through the root shell autopkgtest's setup-testbed starts on
the second serial port (`nestbed.qemu.shellboot`). `load_foreign_image()` checks that the disk
at least looks bootable (a partition table), so a wrong path is one clear line instead of a
boot that waits minutes for a shell, and guesses the firmware the disk wants: BIOS when the
master boot record carries boot code, EFI when it is only GPT's protective MBR with none.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nestbed.guest.agent import PORT_NAME
from nestbed.image.bare import disk_size
from nestbed.image.cache import ImagePaths, Manifest
from nestbed.image.contents import BASE_SERIAL, ROOT_SERIAL
from nestbed.image.errors import ImageError
from nestbed.proc import CommandFailed, TimeoutExpired, run

SECTOR = 512
_BOOT_CODE = slice(0, 440)  # the MBR's boot code area
_PARTITION_TYPES = tuple(446 + 16 * i + 4 for i in range(4))  # type byte of each MBR entry
_GPT_PROTECTIVE = 0xEE


def disk_format(disk: Path) -> str:
    """qcow2 or raw, from the file's magic."""
    try:
        with open(disk, "rb") as f:
            return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError as e:
        raise ImageError(f"{disk}: cannot read: {e.strerror}") from None


def first_sector(disk: Path, fmt: str) -> bytes:
    """The disk's first sector as the guest sees it (read through qemu-img for qcow2)."""
    if fmt == "raw":
        with open(disk, "rb") as f:
            return f.read(SECTOR)
    with tempfile.TemporaryDirectory(prefix="nestbed-mbr-") as tmp:
        out = Path(tmp) / "mbr"
        try:
            run(["qemu-img", "dd", "-U", "-f", fmt, "-O", "raw", f"bs={SECTOR}", "count=1",
                 f"if={disk}", f"of={out}"], timeout=60)  # fmt: skip
            return out.read_bytes()[:SECTOR]
        except (CommandFailed, TimeoutExpired, OSError) as e:
            raise ImageError(f"{disk}: cannot read its first sector: {e}") from None


def firmware_for(sector: bytes) -> str | None:
    """ "bios" or "efi" for a disk whose first sector is `sector`; None when it has no
    partition table at all (not a bootable disk)."""
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        return None
    gpt_only = all(sector[i] in (0, _GPT_PROTECTIVE) for i in _PARTITION_TYPES) and any(
        sector[i] == _GPT_PROTECTIVE for i in _PARTITION_TYPES
    )
    if gpt_only and not any(sector[_BOOT_CODE]):
        return "efi"
    return "bios"


def load_foreign_image(disk: Path) -> tuple[ImagePaths, str]:
    """The disk as an image nestbed boots through its bootloader, and the firmware it wants."""
    fmt = disk_format(disk)
    firmware = firmware_for(first_sector(disk, fmt))
    if firmware is None:
        raise ImageError(
            f"{disk}: neither a nestbed image nor a bootable disk (no partition table); "
            "build one with `nestbed image build`"
        )
    manifest = Manifest(
        name=disk.name,
        release="",
        arch="",
        flavour="foreign",
        size=disk_size(disk),
        created="",
        kernel_version="",
        cmdline="",
        root_serial=ROOT_SERIAL,
        base_serial=BASE_SERIAL,
        agent_port=PORT_NAME,
        sources=(),
        packages=(),
        build_seconds=0.0,
        format=fmt,
        extra={"foreign": True, "firmware": firmware},
    )
    return ImagePaths(disk.parent, manifest, disk_path=disk), firmware
