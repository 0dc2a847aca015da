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
  converted to qcow2, as autopkgtest-build-qemu's output is.

The image is cached under nestbed's image cache root, in
`autopkgtest-style/<key>/disk.qcow2`, where key hashes this file, the release and the
mirror: an edit here builds a new one. `python3 -m tests.autopkgtest_image [--print-path]`
builds it by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from nestbed.image.build import EATMYDATA_HOOKS
from nestbed.image.cache import ImageCache, clean_stale, staging_dir
from nestbed.image.mirror import image_sources

RELEASE = "bookworm"
SUBDIR = "autopkgtest-style"
DISK_NAME = "disk.qcow2"
SETUP_TESTBED = Path("/usr/share/autopkgtest/setup-commands/setup-testbed")
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
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
_PR_SET_PDEATHSIG = 1
TOOLS = (
    "mmdebstrap",
    "mkfs.ext4",
    "mkfs.vfat",
    "mcopy",
    "syslinux",
    "sfdisk",
    "qemu-img",
    "unshare",
)


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


def missing_tools() -> list[str]:
    """Host programs the build needs that are not installed (scripts/setup installs them)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    missing += [str(p) for p in (SETUP_TESTBED, SYSLINUX_MBR) if not p.exists()]
    return missing


def source_lines() -> list[str]:
    """The image's apt sources (one-line format), from the machine's apt configuration."""
    return [line for s in image_sources(RELEASE, None) for line in s.lines()]


def image_key(sources: Sequence[str]) -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(RELEASE.encode())
    for line in sources:
        digest.update(b"\0" + line.encode())
    return digest.hexdigest()[:12]


def cache_parent(cache_root: Path | None = None) -> Path:
    root = cache_root if cache_root is not None else ImageCache().root
    return root / SUBDIR


def ensure_autopkgtest_image(cache_root: Path | None = None) -> Path:
    """The cached autopkgtest-style qcow2 image, built first when missing."""
    sources = source_lines()
    parent = cache_parent(cache_root)
    dest = parent / image_key(sources)
    disk = dest / DISK_NAME
    if disk.is_file():
        return disk
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / ".lock"):
        if disk.is_file():
            return disk
        clean_stale(parent)
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"building the autopkgtest-style image needs {', '.join(missing)}")
        if os.geteuid() != 0:
            raise RuntimeError("building the autopkgtest-style image needs root")
        staging = staging_dir(dest)
        try:
            start = time.monotonic()
            _build(staging, sources)
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


def _build(work: Path, sources: Sequence[str]) -> None:
    root_uuid = str(uuid.uuid4())
    rootfs = work / "rootfs"
    hook = work / "customize.sh"
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

    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in {rootfs}/boot, found {kernels}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{version}"
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
        for src, name in ((kernels[0], "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
            _run(["mcopy", "-i", str(boot), str(src), f"::{name}"])
        _run(["syslinux", "--install", str(boot)])

    raw = work / "disk.raw"
    with _stage("disk: msdos label, boot partition, mkfs.ext4 -d root"):
        with open(raw, "wb") as f:
            f.truncate(DISK_SIZE)
        sector = 512
        table = (
            "label: dos\nunit: sectors\n"
            f"start={BOOT_START // sector}, size={BOOT_SIZE // sector}, type=c, bootable\n"
            f"start={ROOT_START // sector}, type=83\n"
        )
        _run(["sfdisk", "--no-reread", "--no-tell-kernel", str(raw)], input=table)
        _run(
            [
                "dd",
                f"if={boot}",
                f"of={raw}",
                "bs=1M",
                f"seek={BOOT_START // MIB}",
                "conv=notrunc,sparse",
            ]
        )
        _run(["dd", f"if={SYSLINUX_MBR}", f"of={raw}", "bs=440", "count=1", "conv=notrunc"])
        _run(
            [
                "mkfs.ext4",
                "-F",
                "-q",
                "-U",
                root_uuid,
                "-E",
                f"offset={ROOT_START}",
                "-d",
                str(rootfs),
                str(raw),
                f"{(DISK_SIZE - ROOT_START) // 1024}k",
            ]
        )
    shutil.rmtree(rootfs)
    boot.unlink()

    with _stage("qemu-img convert -O qcow2"):
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / DISK_NAME)])
    raw.unlink()
    (work / "cmdline").write_text(cmdline + "\n")
    (work / "kernel-version").write_text(version + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--print-path"]):
        sys.stderr.write("usage: python3 -m tests.autopkgtest_image [--print-path]\n")
        return 2
    disk = ensure_autopkgtest_image()
    if args:
        print(disk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
