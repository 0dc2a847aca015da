"""A nestbed image known only by its disk: the base image inside a testbed, for example.

Inside a nested testbed the base image is a read-only block device (`/dev/baseimage`, also
`/lib/autopkgtest/baseimage`) with no manifest.json, kernel or initrd beside it. Every
nestbed image describes itself in `/etc/nestbed/image.json` on its root file system, and
carries the kernel and initrd it boots in `/boot`: `load_bare_image()` reads all three with
`debugfs` (read-only, without mounting, so the device may be open elsewhere, e.g. by a
running VM), puts kernel and initrd into a work directory and returns an `ImagePaths` whose
disk is the given path (format raw) and whose manifest is made from image.json.

`load_image()` is what a testbed calls with whatever path the user gave: an image directory
or a disk with manifest.json beside it goes through `ImagePaths.load`, anything else here.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from nestbed.image import disk as disk_mod
from nestbed.image.cache import INITRD, KERNEL, MANIFEST, ImagePaths, Manifest
from nestbed.image.errors import ImageError
from nestbed.proc import CommandFailed, TimeoutExpired, run

IMAGE_JSON = "/etc/nestbed/image.json"
DEBUGFS_TIMEOUT = 300.0  # reading a kernel off a device under a loaded, emulated machine

# what image.json must give (besides these, anything is kept in the manifest's extra)
_REQUIRED = ("name", "release", "arch", "flavour", "kernel_version", "kernel", "initrd",
             "cmdline", "root_serial", "base_serial", "agent_port")  # fmt: skip
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+~-][A-Za-z0-9._+~/-]*$")
# debugfs's stderr lines that are not errors
_BENIGN = re.compile(r"^(debugfs \d[^ ]* \(|catastrophic mode)")


def load_image(path: Path, workdir: Path) -> ImagePaths:
    """An image directory, a disk with manifest.json beside it, or a bare nestbed disk (a raw
    file or a block device; kernel and initrd are extracted into workdir)."""
    if path.is_dir() or (path.is_file() and (path.parent / MANIFEST).is_file()):
        return ImagePaths.load(path)
    return load_bare_image(path, workdir)


def load_bare_image(disk: Path, workdir: Path) -> ImagePaths:
    """The nestbed image on `disk` (no manifest.json beside it needed), booted with the kernel
    and initrd from its own /boot, copied into `workdir` (created if missing)."""
    try:
        st = disk.stat()
    except FileNotFoundError:
        raise ImageError(f"{disk}: no such file or device") from None
    except OSError as e:
        raise ImageError(f"{disk}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(f"{disk}: not a disk image (neither a file nor a block device)")
    if not os.access(disk, os.R_OK):
        raise ImageError(f"{disk}: permission denied (cannot read the disk)")
    root = _root_file_system(disk)
    info = _image_json(disk, root)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError(f"cannot write to {workdir}: {e.strerror}") from None
    for source, name in ((info["kernel"], KERNEL), (info["initrd"], INITRD)):
        _dump(disk, root, source, workdir, name)
    manifest = Manifest(
        name=info["name"],
        release=info["release"],
        arch=info["arch"],
        flavour=info["flavour"],
        size=disk_size(disk),
        created=str(info.get("created", "")),
        kernel_version=info["kernel_version"],
        cmdline=info["cmdline"],
        root_serial=info["root_serial"],
        base_serial=info["base_serial"],
        agent_port=info["agent_port"],
        sources=tuple(info.get("sources", ())),
        packages=tuple(info.get("packages", ())),
        build_seconds=0.0,
        format="raw",
        extra={"bare": True, "image_json": info},
    )
    return ImagePaths(workdir, manifest, disk_path=disk)


class NotNestbedImage(ImageError):
    """The disk is readable but holds no nestbed image (it may still be a bootable disk)."""


def _not_nestbed(disk: Path) -> ImageError:
    return NotNestbedImage(
        f"{disk}: not a nestbed image (no {MANIFEST} beside it and no {IMAGE_JSON} inside)"
    )


def _root_file_system(disk: Path) -> str:
    """What debugfs opens: the disk itself (an image from before partitioned disks), else its
    root partition, as e2fsprogs' `DISK?offset=BYTES`."""
    offset = disk_mod.root_offset(disk)
    return str(disk) if offset is None else f"{disk}?offset={offset}"


def _debugfs(disk: Path, root: str, request: str, cwd: Path | None = None) -> str:
    """Run one read-only debugfs request on the file system `root` of `disk`; its stdout.
    debugfs exits 0 whatever happens, so anything on stderr beyond its banner is the error."""
    # -c: catastrophic mode, read-only and without reading the allocation bitmaps
    argv = ["debugfs", "-c", "-R", request, root]
    try:
        res = run(argv, check=False, cwd=cwd, timeout=DEBUGFS_TIMEOUT)
    except CommandFailed:  # not installed
        raise ImageError(f"{disk}: reading it needs debugfs (apt-get install e2fsprogs)") from None
    except TimeoutExpired:
        raise ImageError(f"{disk}: debugfs did not finish in {DEBUGFS_TIMEOUT:.0f} s") from None
    errors = [
        line.strip()
        for line in res.stderr_text.splitlines()
        if line.strip() and not _BENIGN.match(line.strip())
    ]
    if errors or res.returncode != 0:
        raise _DebugfsError(errors[0] if errors else f"debugfs exited {res.returncode}")
    return res.stdout_text


class _DebugfsError(Exception):
    pass


def _image_json(disk: Path, root: str) -> dict[str, Any]:
    try:
        text = _debugfs(disk, root, f"cat {IMAGE_JSON}")
    except _DebugfsError as e:
        msg = str(e)
        if "Permission denied" in msg:
            raise ImageError(f"{disk}: permission denied (cannot read the disk)") from None
        # "Bad magic number in super-block", "File not found by ext2_lookup", short read...
        raise _not_nestbed(disk) from None
    try:
        info = json.loads(text)
    except ValueError:
        raise ImageError(f"{disk}: {IMAGE_JSON} inside is not valid JSON") from None
    if not isinstance(info, dict):
        raise ImageError(f"{disk}: {IMAGE_JSON} inside is not a JSON object")
    missing = [k for k in _REQUIRED if not isinstance(info.get(k), str) or not info[k]]
    if missing:
        raise ImageError(f"{disk}: {IMAGE_JSON} inside lacks {', '.join(missing)}")
    if info.get("format", "raw") != "raw":
        raise ImageError(f"{disk}: {IMAGE_JSON} says format {info['format']!r}, not raw")
    for key in ("kernel", "initrd"):
        if not _SAFE_PATH.match(info[key]) or "/../" in f"{info[key]}/":
            raise ImageError(f"{disk}: {IMAGE_JSON} inside has a bad {key} path {info[key]!r}")
    return info


def _dump(disk: Path, root: str, source: str, workdir: Path, name: str) -> None:
    target = workdir / name
    target.unlink(missing_ok=True)
    try:
        # relative target with cwd=workdir: debugfs's request parser and odd workdir names
        _debugfs(disk, root, f"dump {source} {name}", cwd=workdir)
    except _DebugfsError as e:
        target.unlink(missing_ok=True)
        raise ImageError(f"{disk}: cannot read {source} from it: {e}") from None
    if not target.is_file() or target.stat().st_size == 0:
        target.unlink(missing_ok=True)
        raise ImageError(f"{disk}: {source} inside is missing or empty")


def disk_size(disk: Path) -> int:
    """Size in bytes of a file or block device."""
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
