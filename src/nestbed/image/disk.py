"""The disk an image is: GPT, an EFI system partition that boots it, the root file system.

Layout (512-byte sectors):
- sector 0: the protective MBR with syslinux's gptmbr.bin as its boot code (BIOS);
- partition 1, the EFI system partition (FAT32, marked legacy-BIOS-bootable): systemd-boot as
  the removable-media loader (EFI/BOOT/BOOTX64.EFI), syslinux (ldlinux.sys, BIOS), one boot
  entry for each, and the kernel and initrd they load;
- partition 2, the root (ext4), typed as the Discoverable Partitions Specification's root for
  the architecture, so `systemd-nspawn --image=` and systemd's gpt-auto find it.

So the disk boots by itself under either firmware (a test's own `qemu-system-x86_64
-drive file=/dev/baseimage`), while nestbed keeps booting it directly with the kernel and
initrd kept beside it. Everything is written into the disk file at the partitions' offsets
(sfdisk, `mkfs.fat --offset`, mtools' `-i DISK@@OFFSET`, `syslinux --offset`, `mkfs.ext4 -E
offset=`): no mounts, no loop devices, no root.

Reading the table back (`root_offset`) is plain Python: it runs inside testbeds that may
have no fdisk, on a read-only block device.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nestbed.image.errors import ImageError
from nestbed.proc import CommandFailed, run

MIB = 1 << 20
SECTOR = 512
ESP_START = 1 * MIB
ESP_SIZE = 63 * MIB
ROOT_START = ESP_START + ESP_SIZE
GPT_TAIL = 1 * MIB  # the backup table at the disk's end
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
# the Discoverable Partitions Specification's root partition type, per architecture (images
# are amd64 only: the boot loaders below are x86's)
ROOT_TYPES = {
    "amd64": uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
}
ROOT_LABEL = "root"
# a fixed partition UUID: the boot entries find the root by it (root=PARTUUID=)
ROOT_PARTUUID = uuid.UUID("6e657374-6265-6420-726f-6f7420706172")
# the boot loaders' kernel command line (nestbed's direct boot has its own: contents.CMDLINE)
BOOT_CMDLINE = f"root=PARTUUID={ROOT_PARTUUID} rw console=tty0 console=ttyS0,115200"
GPT_MBR = Path("/usr/lib/syslinux/mbr/gptmbr.bin")  # syslinux-common
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")  # systemd-boot-efi
TOOLS = ("sfdisk", "mkfs.fat", "mcopy", "mmd", "syslinux")
PACKAGES = "fdisk dosfstools mtools syslinux syslinux-common systemd-boot-efi"


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    title: str


def missing_tools() -> list[str]:
    """What writing a disk needs that this machine lacks."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    missing += [str(p) for p in (GPT_MBR, SYSTEMD_BOOT) if not p.exists()]
    return missing




def write_table(disk: Path, size: int, arch: str) -> None:
    """The GPT (and protective MBR with BIOS boot code) on a sparse file of `size` bytes."""
    root_type = ROOT_TYPES.get(arch)
    if root_type is None:
        raise ImageError(f"no partitioned disk layout for architecture {arch}")
    with open(disk, "wb") as f:
        f.truncate(size)
    root_sectors = (size - ROOT_START - GPT_TAIL) // SECTOR
    table = (
        "label: gpt\nunit: sectors\n"
        f"start={ESP_START // SECTOR}, size={ESP_SIZE // SECTOR}, type={ESP_TYPE}, "
        'name="EFI system partition", attrs="LegacyBIOSBootable"\n'
        f"start={ROOT_START // SECTOR}, size={root_sectors}, type={root_type}, "
        f'uuid={ROOT_PARTUUID}, name="{ROOT_LABEL}"\n'
    )
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)], stdin=table)
    with open(disk, "r+b") as f:  # boot code only: bytes 440.. hold the partition table
        f.write(GPT_MBR.read_bytes()[:440])


def root_size(size: int) -> int:
    return size - ROOT_START - GPT_TAIL


def write_esp(disk: Path, boot: BootFiles) -> None:
    """Make the EFI system partition's FAT in place and put both boot loaders on it."""
    start = ESP_START // SECTOR
    # -s 1: sized for the partition, not the disk (clusters of 8 sectors would leave too
    # few for FAT32, and mtools could not read it)
    _run(["mkfs.fat", "-F", "32", "-s", "1", "-n", "ESP", "-h", str(start), f"--offset={start}",
          str(disk), str(ESP_SIZE // 1024)])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nestbed-esp-") as tmp:
        _fill_esp(disk, boot, Path(tmp))
    _run(["syslinux", f"--offset={ESP_START}", "--install", str(disk)])


def _fill_esp(disk: Path, boot: BootFiles, work: Path) -> None:
    fat = f"{disk}@@{ESP_START}"
    loader = work / "loader.conf"
    loader.write_text("default nestbed.conf\ntimeout 0\neditor no\n")
    entry = work / "nestbed.conf"
    entry.write_text(
        f"title {boot.title}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {BOOT_CMDLINE}\n"
    )
    syslinux_cfg = work / "syslinux.cfg"
    syslinux_cfg.write_text(
        "SERIAL 0 115200\nDEFAULT nestbed\nPROMPT 0\nTIMEOUT 0\nLABEL nestbed\n"
        f"  KERNEL /vmlinuz\n  APPEND initrd=/initrd.img {BOOT_CMDLINE}\n"
    )
    _run(["mmd", "-i", fat, "::EFI", "::EFI/BOOT", "::loader", "::loader/entries"])
    for source, name in (
        (SYSTEMD_BOOT, "EFI/BOOT/BOOTX64.EFI"),
        (loader, "loader/loader.conf"),
        (entry, "loader/entries/nestbed.conf"),
        (syslinux_cfg, "syslinux.cfg"),
        (boot.kernel, "vmlinuz"),
        (boot.initrd, "initrd.img"),
    ):
        _run(["mcopy", "-i", fat, str(source), f"::{name}"])


def _run(argv: list[str], stdin: str | None = None) -> None:
    try:
        run(argv, input=None if stdin is None else stdin.encode(), merge_stderr=True)
    except CommandFailed as e:
        last = e.output.strip().splitlines()[-1:] or ["no output"]
        raise ImageError(f"{argv[0]} failed writing the disk: {last[0]}") from e


# ---- reading it back -------------------------------------------------------------------------


def root_offset(disk: Path) -> int | None:
    """Where the root partition starts on `disk`, in bytes; None for a disk with no GPT (a
    bare file system, as nestbed's images were before). The root is the partition typed as
    a DPS root, else the only Linux-data one."""
    try:
        with open(disk, "rb") as f:
            for sector in (512, 4096):
                f.seek(sector)
                header = f.read(92)
                if header[:8] == b"EFI PART":
                    return _root_in_table(f, header, sector)
    except OSError as e:
        raise ImageError(f"{disk}: cannot read its partition table: {e.strerror}") from None
    return None


_LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def _root_in_table(f: BinaryIO, header: bytes, sector: int) -> int | None:
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if not (0 < count <= 1024 and 128 <= entry_size <= 4096):
        return None
    f.seek(entries_lba * sector)
    table = f.read(count * entry_size)
    wanted = set(ROOT_TYPES.values())
    linux: list[int] = []
    for i in range(len(table) // entry_size):
        entry = table[i * entry_size : (i + 1) * entry_size]
        kind = uuid.UUID(bytes_le=entry[:16])
        first = struct.unpack_from("<Q", entry, 32)[0]
        if kind in wanted:
            return int(first * sector)
        if kind == _LINUX_DATA:
            linux.append(first * sector)
    return linux[0] if len(linux) == 1 else None
