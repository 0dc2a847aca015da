"""An autopkgtest-style QEMU image for tests: what autopkgtest's own builders make, built here.

autopkgtest-build-qemu (vmdb2: needs device-mapper) and mmdebstrap-autopkgtest-build-qemu
(needs backports) do not run on this project's machines, so this module lays the image out
the way /usr/bin/autopkgtest-build-qemu (autopkgtest 5.28) does, with files only (no loop
devices, no mounts):

- `mmdebstrap --variant=minbase` of bookworm from the machine's own apt mirror (read through
  nestbed's `image_sources`), including what autopkgtest-build-qemu and setup-testbed end up
  installing (linux-image-amd64, ifupdown, dbus, eatmydata, dpkg-dev, python3-minimal, ...)
  so that setup-testbed's own installs are no-ops;
- as a customize hook, autopkgtest-build-qemu's vmdb2 steps (passwordless root and `user`,
  hostname `host`, an fstab naming the root file system by UUID), then autopkgtest's own
  /usr/share/autopkgtest/setup-commands/setup-testbed with AUTOPKGTEST_BUILD_QEMU=1: the
  root shell on ttyS1/hvc1 (autopkgtest@.service), virtio_console in the initramfs;
- a BIOS-bootable disk: msdos label, partition 1 a FAT boot partition with syslinux, the
  kernel and initrd (kernel command line as setup-testbed configures grub on amd64),
  partition 2 the ext4 root made with `mkfs.ext4 -d` straight into the disk file; then
  converted to qcow2, as autopkgtest-build-qemu's output is;
- or, with efi=True, an EFI-only disk from the same root file system, laid out like
  mmdebstrap-autopkgtest-build-qemu's: GPT, partition 1 an EFI system partition (FAT) with
  systemd-boot as the removable-media loader EFI/BOOT/BOOTX64.EFI, its loader entry, the
  kernel and initrd (all written with mtools), partition 2 the ext4 root; sector 0 is
  sfdisk's protective MBR, with no boot code, so SeaBIOS cannot boot it and OVMF must.

The images are cached under nestbed's image cache root, in
`autopkgtest-style/<key>/disk.qcow2`. The key hashes the recipe: the release, the mirror,
the package list, the source of the functions that build the root file system and of the
one that lays out that flavour's disk, the layout constants and setup-testbed itself (an
edit to a recipe function builds a new image; an edit elsewhere here, such as this
docstring, does not). The root file system is kept as a tarball in
`autopkgtest-style/rootfs-<key>/` so that the other flavour's disk is made from it
without running mmdebstrap again. `python3 -m tests.autopkgtest_image [--efi]
[--print-path]` builds one by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import inspect
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from nestbed.image.build import EATMYDATA_HOOKS
from nestbed.image.cache import ImageCache, clean_stale, staging_dir
from nestbed.image.disk import SYSTEMD_BOOT  # from Debian's systemd-boot-efi
from nestbed.image.mirror import image_sources

RELEASE = "bookworm"
SUBDIR = "autopkgtest-style"
DISK_NAME = "disk.qcow2"
SETUP_TESTBED = Path("/usr/share/autopkgtest/setup-commands/setup-testbed")
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
ROOTFS_PREFIX = "rootfs-"
ROOTFS_TARBALL = "rootfs.tar.zst"
# what autopkgtest-build-qemu (kernel, ifupdown) and setup-testbed (the rest) install;
# rng-tools is a virtual package in bookworm, provided by rng-tools-debian alone
PACKAGES = (
    "linux-image-amd64",
    "ifupdown",
    "isc-dhcp-client",
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "login",
    "passwd",
    "eatmydata",
    "rng-tools-debian",
    "dpkg-dev",
    "python3-minimal",
    "initramfs-tools",
    "ca-certificates",
)
# setup-testbed's consoles for amd64 (what it writes to /etc/default/grub.d)
CONSOLES = "console=tty0 console=hvc0 console=ttyS0"
MIB = 1024 * 1024
DISK_SIZE = 3 * 1024 * MIB
BOOT_START = 1 * MIB
BOOT_SIZE = 255 * MIB
ROOT_START = BOOT_START + BOOT_SIZE
# the EFI flavour: GPT, the EFI system partition, the root, and the backup GPT at the end
ESP_START = 1 * MIB
ESP_SIZE = 200 * MIB
EFI_ROOT_START = ESP_START + ESP_SIZE
GPT_TAIL = 1 * MIB
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
_PR_SET_PDEATHSIG = 1
TOOLS = ("mmdebstrap", "mkfs.ext4", "mkfs.vfat", "mcopy", "sfdisk", "qemu-img", "unshare", "tar")
BIOS_TOOLS = ("syslinux",)
EFI_TOOLS = ("mmd",)


def _say(text: str) -> None:
    sys.stderr.write(f"autopkgtest-style image: {text}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    start = time.monotonic()
    _say(f"{name} ...")
    try:
        yield
    except BaseException:
        _say(f"{name}: failed after {time.monotonic() - start:.1f} s")
        raise
    _say(f"{name}: done in {time.monotonic() - start:.1f} s")


def missing_tools(*, efi: bool = False) -> list[str]:
    """Host programs and files the build of that flavour needs that are not installed
    (scripts/setup installs them)."""
    tools = TOOLS + (EFI_TOOLS if efi else BIOS_TOOLS)
    files = (SETUP_TESTBED, SYSTEMD_BOOT if efi else SYSLINUX_MBR)
    missing = [t for t in tools if shutil.which(t) is None]
    missing += [str(p) for p in files if not p.exists()]
    return missing


def source_lines() -> list[str]:
    """The image's apt sources (one-line format), from the machine's apt configuration."""
    return [line for s in image_sources(RELEASE, None) for line in s.lines()]


def _digest(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:12]


def rootfs_key(sources: Sequence[str]) -> str:
    """What the root file system is made of: release, mirror, packages, the build steps."""
    setup_testbed = SETUP_TESTBED.read_bytes() if SETUP_TESTBED.exists() else b""
    return _digest(
        RELEASE,
        list(sources),
        PACKAGES,
        inspect.getsource(_customize_script),
        inspect.getsource(_build_rootfs),
        setup_testbed,
    )


def image_key(sources: Sequence[str], *, efi: bool = False) -> str:
    """The disk's recipe: its root file system's, and how that flavour lays the disk out."""
    layout = _efi_disk if efi else _bios_disk
    constants = (CONSOLES, DISK_SIZE, BOOT_START, BOOT_SIZE, ESP_START, ESP_SIZE, GPT_TAIL)
    return _digest(
        rootfs_key(sources),
        "efi" if efi else "bios",
        inspect.getsource(layout),
        inspect.getsource(_kernel),
        constants,
    )


def cache_parent(cache_root: Path | None = None) -> Path:
    root = cache_root if cache_root is not None else ImageCache().root
    return root / SUBDIR


def ensure_autopkgtest_image(cache_root: Path | None = None, *, efi: bool = False) -> Path:
    """The cached autopkgtest-style qcow2 image, built first when missing: BIOS-booted
    (syslinux, msdos label), or with efi=True EFI-only (systemd-boot, GPT)."""
    sources = source_lines()
    parent = cache_parent(cache_root)
    dest = parent / image_key(sources, efi=efi)
    disk = dest / DISK_NAME
    if disk.is_file():
        return disk
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / ".lock"):
        if disk.is_file():
            return disk
        clean_stale(parent)
        missing = missing_tools(efi=efi)
        if missing:
            raise RuntimeError(f"building the autopkgtest-style image needs {', '.join(missing)}")
        if os.geteuid() != 0:
            raise RuntimeError("building the autopkgtest-style image needs root")
        staging = staging_dir(dest)
        try:
            start = time.monotonic()
            _build(staging, parent, sources, efi=efi)
            staging.chmod(0o755)
            if dest.exists():  # a directory without the disk: a leftover, not an image
                shutil.rmtree(dest)
            os.rename(staging, dest)
            _say(f"{disk} ready, built in {time.monotonic() - start:.1f} s")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return disk


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the building process dies (a killed build stops its
    mmdebstrap too: `unshare --kill-child` takes it along)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _run(argv: Sequence[str], input: str = "") -> None:
    """Run a command (input on its stdin); on failure, the tail of its output raised."""
    result = subprocess.run(
        list(argv),
        input=input,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
        preexec_fn=_die_with_parent,
    )
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-40:])
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}):\n{tail}")


def _customize_script(root_uuid: str, sources: Sequence[str]) -> str:
    """autopkgtest-build-qemu's vmdb2 chroot steps, then setup-testbed, on the tree in $1."""
    apt_sources = "\n".join(sources)
    return f"""set -eu
root="$1"
# autopkgtest-build-qemu's vmdb2 steps
chroot "$root" passwd --delete root
chroot "$root" useradd --home-dir /home/user --create-home user
chroot "$root" passwd --delete user
echo host > "$root/etc/hostname"
grep -qs '^127\\.0\\.0\\.1' "$root/etc/hosts" \\
    || printf '127.0.0.1\\tlocalhost\\n' >> "$root/etc/hosts"
printf '127.0.1.1\\thost\\n' >> "$root/etc/hosts"
echo 'UUID={root_uuid} / ext4 errors=remount-ro 0 1' > "$root/etc/fstab"
# autopkgtest's own guest setup (it regenerates the initramfs at its end)
AUTOPKGTEST_BUILD_QEMU=1 AUTOPKGTEST_SETUP_VM_UPGRADE=false \\
AUTOPKGTEST_APT_SOURCES={shlex.quote(apt_sources)} \\
    {SETUP_TESTBED} "$root"
# setup-testbed's initramfs hook must have taken effect
chroot "$root" sh -c 'lsinitramfs /boot/initrd.img-*' | grep -q virtio_console.ko \\
    || {{ echo "virtio_console is not in the initramfs" >&2; exit 1; }}
"""


def _build(work: Path, parent: Path, sources: Sequence[str], *, efi: bool) -> None:
    """The disk in work, from the root file system cached in parent (made first if need be)."""
    rootfs = work / "rootfs"
    root_uuid = _ensure_rootfs(parent, sources, rootfs)
    layout: Callable[[Path, Path, str], tuple[str, str]] = _efi_disk if efi else _bios_disk
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(DISK_SIZE)
    cmdline, version = layout(work, rootfs, root_uuid)
    shutil.rmtree(rootfs)

    with _stage("qemu-img convert -O qcow2"):
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / DISK_NAME)])
    raw.unlink()
    (work / "cmdline").write_text(cmdline + "\n")
    (work / "kernel-version").write_text(version + "\n")


def _ensure_rootfs(parent: Path, sources: Sequence[str], rootfs: Path) -> str:
    """The root file system unpacked into rootfs (a new directory), and the UUID its fstab
    names: from `rootfs-<key>/` in parent, else built, then packed there for the next disk.
    The caller holds parent's lock."""
    dest = parent / f"{ROOTFS_PREFIX}{rootfs_key(sources)}"
    tarball = dest / ROOTFS_TARBALL
    tar_options = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--zstd"]
    if tarball.is_file():
        rootfs.mkdir()
        with _stage(f"root file system from {tarball}"):
            _run(["tar", "--extract", "--preserve-permissions", *tar_options,
                  "-f", str(tarball), "-C", str(rootfs)])  # fmt: skip
        return (dest / "root-uuid").read_text().strip()
    root_uuid = str(uuid.uuid4())
    _build_rootfs(rootfs, root_uuid, sources)
    staging = staging_dir(dest)
    try:
        with _stage(f"packing the root file system into {tarball}"):
            _run(["tar", "--create", *tar_options, "-f", str(staging / ROOTFS_TARBALL),
                  "-C", str(rootfs), "."])  # fmt: skip
        (staging / "root-uuid").write_text(root_uuid + "\n")
        staging.chmod(0o755)
        if dest.exists():  # a directory without the tarball: a leftover
            shutil.rmtree(dest)
        os.rename(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root_uuid


def _build_rootfs(rootfs: Path, root_uuid: str, sources: Sequence[str]) -> None:
    """mmdebstrap the root file system into rootfs, customized as autopkgtest's builder does."""
    hook = rootfs.parent / "customize.sh"
    hook.write_text(_customize_script(root_uuid, sources))
    argv = [
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        f"--include={','.join(PACKAGES)}",
        '--aptopt=Acquire::Languages "none"',
        # keep the apt lists setup-testbed fetched, as an image built by vmdb2 has them
        "--skip=cleanup/apt/lists",
    ]
    if EATMYDATA_HOOKS.is_dir():
        argv.append(f"--hook-dir={EATMYDATA_HOOKS}")
    argv += [f'--customize-hook=sh {shlex.quote(str(hook))} "$1"', RELEASE, str(rootfs)]
    argv += list(sources)
    with _stage(f"mmdebstrap --variant=minbase {RELEASE} + setup-testbed"):
        _run(argv)


def _kernel(rootfs: Path) -> tuple[Path, Path, str]:
    """The root file system's kernel, its initrd and its version."""
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in {rootfs}/boot, found {kernels}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    return kernels[0], rootfs / "boot" / f"initrd.img-{version}", version


def _mkfs_root(raw: Path, rootfs: Path, root_uuid: str, start: int, size: int) -> None:
    """The ext4 root file system, made from rootfs straight into raw at start."""
    _run(["mkfs.ext4", "-F", "-q", "-U", root_uuid, "-E", f"offset={start}",
          "-d", str(rootfs), str(raw), f"{size // 1024}k"])  # fmt: skip


def _dd_partition(image: Path, raw: Path, start: int) -> None:
    _run(["dd", f"if={image}", f"of={raw}", "bs=1M", f"seek={start // MIB}",
          "conv=notrunc,sparse"])  # fmt: skip


def _bios_disk(work: Path, rootfs: Path, root_uuid: str) -> tuple[str, str]:
    """work/disk.raw as autopkgtest-build-qemu lays it out: msdos label, a FAT boot partition
    with syslinux, the ext4 root. The kernel command line and kernel version."""
    kernel, initrd, version = _kernel(rootfs)
    cmdline = f"root=UUID={root_uuid} ro {CONSOLES}"
    boot = work / "boot.vfat"
    with _stage(f"FAT boot partition with syslinux (kernel {version})"):
        # -h: the partition's start, which syslinux's boot sector adds to its sector numbers
        hidden = str(BOOT_START // 512)
        _run(["mkfs.vfat", "-n", "BOOT", "-h", hidden, "-C", str(boot), str(BOOT_SIZE // 1024)])
        cfg = work / "syslinux.cfg"
        cfg.write_text(
            "SERIAL 0 115200\n"
            "DEFAULT debian\n"
            "PROMPT 0\n"
            "TIMEOUT 0\n"
            "LABEL debian\n"
            "  KERNEL /vmlinuz\n"
            f"  APPEND initrd=/initrd.img {cmdline}\n"
        )
        for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
            _run(["mcopy", "-i", str(boot), str(src), f"::{name}"])
        _run(["syslinux", "--install", str(boot)])

    raw = work / "disk.raw"
    with _stage("disk: msdos label, boot partition, mkfs.ext4 -d root"):
        sector = 512
        table = (
            "label: dos\nunit: sectors\n"
            f"start={BOOT_START // sector}, size={BOOT_SIZE // sector}, type=c, bootable\n"
            f"start={ROOT_START // sector}, type=83\n"
        )
        _run(["sfdisk", "--no-reread", "--no-tell-kernel", str(raw)], input=table)
        _dd_partition(boot, raw, BOOT_START)
        _run(["dd", f"if={SYSLINUX_MBR}", f"of={raw}", "bs=440", "count=1", "conv=notrunc"])
        _mkfs_root(raw, rootfs, root_uuid, ROOT_START, DISK_SIZE - ROOT_START)
    boot.unlink()
    return cmdline, version


def _efi_disk(work: Path, rootfs: Path, root_uuid: str) -> tuple[str, str]:
    """work/disk.raw EFI-only: GPT, an EFI system partition with systemd-boot as the
    removable-media loader (EFI/BOOT/BOOTX64.EFI), its loader entry, kernel and initrd; the
    ext4 root. Sector 0 is sfdisk's protective MBR, without boot code. The kernel command
    line and kernel version."""
    kernel, initrd, version = _kernel(rootfs)
    cmdline = f"root=UUID={root_uuid} ro {CONSOLES}"
    esp = work / "esp.vfat"
    with _stage(f"EFI system partition with systemd-boot (kernel {version})"):
        _run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-C", str(esp), str(ESP_SIZE // 1024)])
        loader = work / "loader.conf"
        loader.write_text("default debian.conf\ntimeout 0\neditor no\n")
        entry = work / "debian.conf"
        entry.write_text(
            f"title Debian GNU/Linux {RELEASE} (autopkgtest-style)\n"
            "linux /vmlinuz\n"
            "initrd /initrd.img\n"
            f"options {cmdline}\n"
        )
        _run(["mmd", "-i", str(esp), "::EFI", "::EFI/BOOT", "::loader", "::loader/entries"])
        for src, name in (
            (SYSTEMD_BOOT, "EFI/BOOT/BOOTX64.EFI"),
            (loader, "loader/loader.conf"),
            (entry, "loader/entries/debian.conf"),
            (kernel, "vmlinuz"),
            (initrd, "initrd.img"),
        ):
            _run(["mcopy", "-i", str(esp), str(src), f"::{name}"])

    raw = work / "disk.raw"
    root_size = DISK_SIZE - EFI_ROOT_START - GPT_TAIL
    with _stage("disk: GPT, EFI system partition, mkfs.ext4 -d root"):
        sector = 512
        table = (
            "label: gpt\nunit: sectors\n"
            f"start={ESP_START // sector}, size={ESP_SIZE // sector}, type={ESP_TYPE}, "
            'name="EFI system partition"\n'
            f"start={EFI_ROOT_START // sector}, size={root_size // sector}, "
            f'type={LINUX_FS_TYPE}, name="root"\n'
        )
        _run(["sfdisk", "--no-reread", "--no-tell-kernel", str(raw)], input=table)
        _dd_partition(esp, raw, ESP_START)
        _mkfs_root(raw, rootfs, root_uuid, EFI_ROOT_START, root_size)
    esp.unlink()
    return cmdline, version


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    efi = "--efi" in args
    args = [a for a in args if a != "--efi"]
    if args not in ([], ["--print-path"]):
        sys.stderr.write("usage: python3 -m tests.autopkgtest_image [--efi] [--print-path]\n")
        return 2
    disk = ensure_autopkgtest_image(efi=efi)
    if args:
        print(disk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
