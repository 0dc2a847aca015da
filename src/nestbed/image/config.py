"""What to build: the options of `nestbed image build`, validated, as one frozen value."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nestbed.image.errors import ImageError

RELEASES = ("bookworm", "trixie", "sid")
ARCHES = ("amd64",)
DEFAULT_RELEASE = "bookworm"
DEFAULT_SIZE = 4 << 30

# The kernels an image can have. cloud (the default): boots fast, has virtio-serial, NBD,
# NFS, KVM as modules, but no 9p. generic: Debian's standard kernel, bigger and slower to
# boot, with 9p -- the file system autopkgtest-virt-qemu shares files with its guest through.
KERNELS = {"cloud": "linux-image-cloud-amd64", "generic": "linux-image-amd64"}
DEFAULT_KERNEL = "cloud"
# What every image has beside its kernel. python3: the control agent.
BASE_PACKAGES = ("systemd-sysv", "udev", "python3")
# What a test needs to boot the image again inside the VM -- by hand or with nestbed itself,
# which the nested image carries (its dependencies: python3-debian, python3-rich; debugfs
# from e2fsprogs reads a bare base image's /etc/nestbed/image.json).
NESTED_PACKAGES = ("qemu-system-x86", "qemu-utils", "python3-debian", "python3-rich", "e2fsprogs")

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?(=[A-Za-z0-9.+~:-]+)?$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'4G', '512M', '4GiB', '1073741824' → bytes (binary units)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ImageError(f"bad size {text!r} (examples: 4G, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: int) -> str:
    for unit in ("T", "G", "M"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f}{unit}"
    return str(n)


@dataclass(frozen=True)
class BuildOptions:
    release: str = DEFAULT_RELEASE
    arch: str = "amd64"
    mirror: str | None = None  # None: the mirror the machine's apt uses
    nested: bool = False
    kernel: str = DEFAULT_KERNEL
    size: int = DEFAULT_SIZE
    include: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.release not in RELEASES:
            raise ImageError(f"unknown release {self.release!r} (known: {', '.join(RELEASES)})")
        if self.arch not in ARCHES:
            raise ImageError(f"unsupported architecture {self.arch!r} (known: {', '.join(ARCHES)})")
        if self.kernel not in KERNELS:
            raise ImageError(f"unknown kernel {self.kernel!r} (known: {', '.join(KERNELS)})")
        if self.size < 512 << 20:
            raise ImageError(f"image size {format_size(self.size)} is too small (at least 512M)")
        for pkg in self.include:
            if not _PACKAGE_RE.match(pkg):
                raise ImageError(f"bad package name in --include: {pkg!r}")
        if self.mirror is not None and not re.match(r"^(https?|file)://\S+$", self.mirror):
            raise ImageError(f"bad mirror URL {self.mirror!r} (http://, https:// or file://)")

    @property
    def flavour(self) -> str:
        base = "nested" if self.nested else "minimal"
        return base if self.kernel == DEFAULT_KERNEL else f"{base}-{self.kernel}"

    @property
    def kernel_package(self) -> str:
        return KERNELS[self.kernel]

    @property
    def packages(self) -> tuple[str, ...]:
        extra = NESTED_PACKAGES if self.nested else ()
        seen: dict[str, None] = dict.fromkeys(
            (self.kernel_package, *BASE_PACKAGES, *extra, *self.include)
        )
        return tuple(seen)
