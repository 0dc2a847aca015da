"""Where images live and how they get there: one directory per image, complete or absent.

An image directory holds `disk.img` (a raw partitioned disk, nestbed.image.disk; older
images hold one ext4 file system without a table, and still work), `vmlinuz`,
`initrd.img` and `manifest.json`. The manifest is written last, into a staging directory
beside the destination, which is then renamed into place: a directory without a manifest
is a half-built image and is never used. Replacing an image renames the old one aside
first, so a reader sees the old image or the new one, never a mixture.

The cache is `$NESTBED_CACHE_DIR/images/`, else `$XDG_CACHE_HOME/nestbed/images/`, else
`~/.cache/nestbed/images/`, with one directory per key (release-arch-flavour-hash).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nestbed.image.errors import ImageError
from nestbed.proc import remove_tree

MANIFEST = "manifest.json"
DISK = "disk.img"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
# a --nested image's root tree as a tarball: the unshare testbed's root when it exports the image
ROOT_TARBALL = "rootfs.tar"
MANIFEST_VERSION = 1
_STAGING_PREFIX = ".build-"
_TRASH_PREFIX = ".old-"


@dataclass(frozen=True)
class Manifest:
    name: str
    release: str
    arch: str
    flavour: str
    size: int  # virtual size of the disk, bytes
    created: str  # ISO 8601, UTC
    kernel_version: str
    cmdline: str  # kernel command line for direct kernel boot
    root_serial: str  # disk serial the root (overlay) disk must carry
    base_serial: str  # disk serial of the read-only base image in nested use
    agent_port: str  # virtio-serial port name of the control agent
    sources: tuple[str, ...]  # the image's apt sources (one-line format)
    packages: tuple[str, ...]  # what was asked for (plus their dependencies)
    build_seconds: float
    format: str = "raw"
    manifest_version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {data.get('manifest_version')!r}")
        data["sources"] = tuple(data["sources"])
        data["packages"] = tuple(data["packages"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ImagePaths:
    """A complete image: what a testbed needs to boot it.

    disk_path: where the disk is when it is not `directory/disk.img` -- a bare disk (a block
    device or a raw file, nestbed.image.bare) whose kernel and initrd were put into directory.
    """

    directory: Path
    manifest: Manifest
    disk_path: Path | None = None

    @property
    def disk(self) -> Path:
        return self.disk_path if self.disk_path is not None else self.directory / DISK

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD

    @property
    def root_tarball(self) -> Path | None:
        """The tree the disk was written from, as a tarball (--nested images), else None."""
        path = self.directory / ROOT_TARBALL
        return path if path.is_file() else None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def cmdline(self) -> str:
        return self.manifest.cmdline

    @classmethod
    def load(cls, path: Path) -> ImagePaths:
        """An image directory, or the disk.img inside one."""
        directory = path.parent if path.is_file() else path
        try:
            manifest = Manifest.from_json((directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise ImageError(f"{path}: not a complete nestbed image (no {MANIFEST})") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ImageError(f"{directory / MANIFEST}: unreadable manifest: {e}") from None
        paths = cls(directory, manifest)
        for part in (paths.disk, paths.kernel, paths.initrd):
            if not part.is_file():
                raise ImageError(f"{directory}: incomplete image, {part.name} is missing")
        return paths

    def disk_usage(self) -> int:
        """Bytes allocated on the host (the disk is sparse)."""
        return sum(p.stat().st_blocks * 512 for p in (self.disk, self.kernel, self.initrd))


def default_root() -> Path:
    env = os.environ.get("NESTBED_CACHE_DIR")
    if env:
        return Path(env) / "images"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "nestbed" / "images"


def staging_dir(dest: Path) -> Path:
    """A fresh directory beside dest (same file system, so it can be renamed into place)."""
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=parent))
    except OSError as e:
        raise ImageError(f"cannot write to {parent}: {e.strerror}") from None


def install(staging: Path, dest: Path) -> None:
    """Rename a complete staging directory to dest, replacing an older image there."""
    if not (staging / MANIFEST).is_file():
        raise ImageError(f"internal error: {staging} has no manifest")
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        if dest.exists() and not (dest / MANIFEST).exists() and any(dest.iterdir()):
            raise ImageError(f"{dest} exists and is not a nestbed image: not replacing it")
        old = Path(tempfile.mkdtemp(prefix=f"{_TRASH_PREFIX}{os.getpid()}-", dir=dest.parent))
        os.rename(dest, old / "image")
    os.rename(staging, dest)
    if old is not None:
        remove_tree(old)


def clean_stale(parent: Path) -> None:
    """Remove staging/trash directories whose building process is gone."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        for prefix in (_STAGING_PREFIX, _TRASH_PREFIX):
            if entry.name.startswith(prefix):
                pid = entry.name[len(prefix) :].split("-", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    with contextlib.suppress(Exception):
                        remove_tree(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ImageCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else default_root()

    def path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ImageError(f"bad image name {name!r}")
        return self.root / name

    def lookup(self, name: str) -> ImagePaths | None:
        path = self.path(name)
        if not (path / MANIFEST).is_file():
            return None
        try:
            return ImagePaths.load(path)
        except ImageError:
            return None

    def entries(self) -> list[ImagePaths]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            image = self.lookup(entry.name)
            if image is not None:
                found.append(image)
        return found

    def remove(self, name: str) -> None:
        path = self.path(name)
        if not path.exists():
            raise ImageError(f"no image named {name!r} in {self.root} (see: nestbed image list)")
        with self.lock(name):
            trash = Path(tempfile.mkdtemp(prefix=f"{_TRASH_PREFIX}{os.getpid()}-", dir=self.root))
            os.rename(path, trash / "image")
            remove_tree(trash)

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 3600.0) -> Iterator[None]:
        """Serialise builds of one image (two test workers asking for it at once)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ImageError(f"cannot write to {self.root}: {e.strerror}") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ImageError(f"image {name} is locked by another build") from None
                    time.sleep(0.5)
            yield
        finally:
            os.close(fd)
