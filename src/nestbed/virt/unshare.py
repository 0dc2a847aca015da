"""nestbed-virt-unshare: a throwaway container from a root tarball, like autopkgtest-virt-unshare.

The testbed is a container (`nestbed.container`): its own mount, PID, IPC, UTS and cgroup
namespaces (and a user namespace mapped through /etc/subuid when not run as root), the root
pivoted into a tree unpacked from the tarball, a fresh /proc, a minimal /dev of bound device
nodes, devpts, and tmpfs on /tmp and /dev/shm. The network is the host's (apt must reach
the mirror).

Without ``--tarball`` the tarball is built on first use with mmdebstrap (minbase, apt lists
kept) from the machine's apt sources or ``--mirror``, and cached.

Base image (``--baseimage``, or when the runner hints that a test needs it): the disk of the
``--nested`` nestbed image of the same release and architecture (built and cached like the
QEMU testbed's) is bound read-only on /dev/baseimage, /lib/autopkgtest/baseimage links to it,
and, unless ``--tarball`` is given, the container runs on that image's own root tree
(``rootfs.tar`` beside its disk): one bootstrap for level 1 and level 2, with nestbed-vm and
QEMU in it. /dev/kvm is bound in when KVM can run a guest on this host. What is advertised
(``baseimage``, ``nested-kvm``) is what a probe in the started container found.

Revert: by default writes go to an overlay whose upper dir is a tmpfs inside the container,
so a revert (or close) is "kill PID 1, start a new container" on the same cached pristine
tree, and nothing a test wrote ever reaches the host's disk. ``--unpack`` instead unpacks the
tarball into a private temp dir for each open and revert, as autopkgtest does.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NoReturn

from nestbed.capabilities import (
    PARALLEL,
    SUGGESTED_NORMAL_USER,
    WANT_BASEIMAGE,
    Cap,
    with_value,
)
from nestbed.container import rootfs
from nestbed.container.container import Container, ContainerConfig, OverlayUnavailable
from nestbed.container.tarball import ensure_tarball, host_arch, host_release
from nestbed.errors import NestbedError
from nestbed.image import BuildOptions, ImagePaths, ensure_image
from nestbed.image.cache import MANIFEST
from nestbed.image.progress import PlainProgress
from nestbed.qemu.accel import kvm_problem
from nestbed.qemu.baseimage import GUEST_BASEIMAGE, add_export_options
from nestbed.testbed.protocol import ServerFailure, VirtServer, run_server

# the name autopkgtest-virt-unshare gives its normal user, so tests see the same
NORMAL_USER = "unshare"
# what a container holds of the host's memory beside its tests' own: its PID 1, unshare
CONTAINER_MIB = 64
REQUIRED = ("unshare", "nsenter", "tar")

# Run in the started container (its own sh): what a test relying on `baseimage` and
# `nested-kvm` would get. The base image must be readable and not writable (a read-only
# mount: `-w` is false even for root).
PROBE = """
if [ -r /dev/baseimage ] && [ ! -w /dev/baseimage ] && [ -L /lib/autopkgtest/baseimage ]; then
  echo baseimage=ok
fi
if [ -c /dev/kvm ] && true 2>/dev/null <>/dev/kvm; then echo kvm=ok; fi
"""


@dataclass(frozen=True)
class BaseImage:
    disk: Path  # bound read-only on /dev/baseimage
    root_tarball: Path | None  # the image's own root tree, when it has one
    label: str  # for messages


class UnshareServer(VirtServer):
    name: ClassVar[str] = "unshare"
    help_epilog: ClassVar[str] = """\
A throwaway container (Linux namespaces) made from a Debian root tarball: nothing a test
writes or installs reaches the host. Without -t, the first open builds the tarball with
mmdebstrap from this machine's apt sources and caches it.

Examples:
  nestbed ./hello -- unshare                         build and test hello in a container
  nestbed -B hello -- unshare -r trixie              the archive's hello, in trixie
  nestbed . -- unshare -t bookworm.tar.zst           a root tarball of your own
  autopkgtest ./hello -- /usr/bin/nestbed-virt-unshare
                                                     autopkgtest drives it the same way
"""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        missing = [p for p in REQUIRED if shutil.which(p) is None]
        if missing:
            raise ServerFailure(f"{', '.join(missing)} not found (install util-linux, tar)")
        # root needs no id mapping (but may ask for one); anyone else maps through subuid
        self.userns = os.geteuid() != 0 or bool(args.userns)
        if self.userns and not _has_subid_range():
            who = "root" if os.geteuid() == 0 else "not root and"
            raise ServerFailure(
                f"{who} no range for {_user()} in /etc/subuid and /etc/subgid: "
                "add one (usermod --add-subuids/--add-subgids)"
                + ("" if os.geteuid() == 0 else " or run as root")
            )
        self.release: str = args.release or host_release()
        self.arch: str = args.arch or host_arch()
        self.tarball: Path | None = None
        self.user_tarball = args.tarball is not None
        if args.tarball is not None:
            self.tarball = Path(args.tarball).absolute()
            if not self.tarball.is_file():
                raise ServerFailure(f"tarball {args.tarball} does not exist")
        # None: not exported; "": the --nested image of release/arch; else the PATH given
        self.base_request: str | None = _base_request(args, os.environ)
        # only a hint from the runner: a base image that cannot be made skips its tests
        self.base_hinted = args.baseimage is None and self.base_request is not None
        if self.base_request:
            _check_base_path(self.base_request)
        self.base: BaseImage | None = None  # resolved at the first open (may build)
        self.kvm = self.base_request is not None and kvm_problem() is None
        self.probed: frozenset[str] = frozenset()  # what the probe found: baseimage, kvm
        if self.tarball is None and self.base_request is None:
            self.tarball = sbuild_tarball(self.release, self.arch, os.environ)
            if self.tarball is not None:
                self.debug(f"using sbuild's tarball {self.tarball}")
        self.binds: tuple[tuple[str, str], ...] = _check_binds(args.bind or [])
        self.unpack_dir: Path | None = None
        if args.unpack_dir is not None:
            self.unpack_dir = Path(args.unpack_dir).absolute()
            if os.path.lexists(self.unpack_dir):
                raise ServerFailure(f"--unpack-dir {args.unpack_dir}: already exists")
            if not self.unpack_dir.parent.is_dir():
                raise ServerFailure(f"--unpack-dir {args.unpack_dir}: no such parent directory")
        self.container: Container | None = None
        self.private: Path | None = None  # direct mode: the unpacked tree we remove
        # an unpack directory of the user's choice means unpacking, as autopkgtest does
        self.unpack: bool = bool(args.unpack or args.unpack_dir or args.prefix is not None)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-r", "--release", help="Debian release (default: the host's)")
        parser.add_argument("-a", "--arch", help="architecture (default: the host's)")
        parser.add_argument(
            "--mirror", help="Debian mirror URL (default: from the machine's apt sources)"
        )
        parser.add_argument(
            "-t", "--tarball", help="root tarball to use (default: build one and cache it)"
        )
        add_export_options(
            parser,
            f"export a base image read-only (/dev/baseimage, {GUEST_BASEIMAGE}): "
            "PATH, a nestbed image or a disk; without PATH the --nested image of the release "
            "(built once), whose own root tree the container then runs on (nestbed-vm "
            "included) unless -t is given. Default: only when a test needs it",
        )
        parser.add_argument(
            "--userns",
            action="store_true",
            help="as root too, map ids through /etc/subuid and /etc/subgid (the container's "
            "root is then not the host's root; always so when not run as root)",
        )
        parser.add_argument(
            "--unpack",
            action="store_true",
            help="unpack the tarball afresh for every open and revert instead of using an "
            "overlay on a cached tree",
        )
        parser.add_argument(
            "-b",
            "--bind",
            action="append",
            nargs=2,
            metavar=("OUTSIDE", "INSIDE"),
            help="bind-mount the host directory OUTSIDE on INSIDE (an absolute path in the "
            "container, created when missing); may be repeated",
        )
        where = parser.add_mutually_exclusive_group()
        where.add_argument(
            "-p",
            "--prefix",
            help="prefix of the temporary unpack directory (as mkdtemp's; implies --unpack)",
        )
        where.add_argument(
            "-u",
            "--unpack-dir",
            metavar="DIR",
            help="unpack the tarball into DIR (must not exist; created for each open and "
            "removed on close; implies --unpack)",
        )

    def capabilities(self) -> list[str]:
        caps = [
            Cap.REVERT,
            Cap.REVERT_FULL_SYSTEM,
            Cap.ROOT_ON_TESTBED,
            # no isolation-container: PID 1 is nestbed's reaper, not an init system, so a
            # test that starts a service would fail (autopkgtest's unshare does not claim it)
            with_value(SUGGESTED_NORMAL_USER, NORMAL_USER),
        ]
        if "baseimage" in self.probed:
            caps.append(Cap.BASEIMAGE)
        if "kvm" in self.probed:
            caps.append(Cap.NESTED_KVM)
        if self.unpack_dir is None:  # each server unpacks its own root in its own directory
            caps.append(with_value(PARALLEL, str(CONTAINER_MIB)))
        return caps

    # ---- testbed -------------------------------------------------------------------------

    def _base_image(self) -> BaseImage | None:
        if self.base_request is None or self.base is not None:
            return self.base
        if self.base_request:
            self.base = _named_base_image(Path(self.base_request))
        else:
            image = ensure_image(
                BuildOptions(
                    release=self.release, arch=self.arch, mirror=self.args.mirror, nested=True
                ),
                progress=PlainProgress(),
            )
            if image.root_tarball is None:
                raise ServerFailure(
                    f"image {image.directory} has no root tarball (built by an older nestbed):"
                    f" remove it (nestbed image remove {image.name}) to have it rebuilt"
                )
            self.base = BaseImage(image.disk, image.root_tarball, image.name)
        self.debug(f"exporting {self.base.disk} as the base image ({self.base.label})")
        if not self.user_tarball and self.base.root_tarball is not None:
            self.tarball = self.base.root_tarball
            self.debug(f"the container runs on the base image's own root ({self.tarball})")
        return self.base

    def _tarball(self) -> Path:
        if self.tarball is None:
            self.tarball = ensure_tarball(
                self.release, self.arch, self.args.mirror, progress=PlainProgress()
            )
            self.debug(f"tarball {self.tarball}")
        return self.tarball

    def _start(self) -> None:
        try:
            try:
                base = self._base_image()
            except NestbedError as e:
                if not self.base_hinted:
                    raise
                self.warn(f"cannot export a base image, a test that needs it is skipped: {e}")
                self.base_request, self.kvm, base = None, False, None
            tarball = self._tarball()
            disk = base.disk if base is not None else None
            devices = ("kvm",) if self.kvm else ()
            if not self.unpack:
                tree = rootfs.shared_root(tarball, NORMAL_USER, self.userns)
                config = ContainerConfig(
                    tree, True, rootfs.mountpoint(), self.userns, self.binds, disk, devices
                )
                try:
                    self._run(config)
                    return
                except OverlayUnavailable as e:
                    # e.g. a cache on a file system overlayfs cannot use as its lower dir
                    self.warn(f"overlay container failed, unpacking instead from now on: {e}")
                    self.unpack = True
            with self.critical():
                self.private = rootfs.private_root(
                    tarball, NORMAL_USER, self.userns, self.args.prefix, self.unpack_dir
                )
            self._run(
                ContainerConfig(
                    self.private, False, self.private, self.userns, self.binds, disk, devices
                )
            )
        except NestbedError as e:
            raise ServerFailure(str(e)) from None

    def _run(self, config: ContainerConfig) -> None:
        with self.critical():
            self.container = Container(config)
            self.container.start()
        self.debug(f"container PID 1 is {self.container.pid}")
        if config.baseimage is not None:
            self._probe()

    def _probe(self) -> None:
        """Advertise the base image and nested KVM only as a test in this container gets them."""
        result = self.execute(["sh", "-c", PROBE], timeout=60)
        found = frozenset(
            line.partition("=")[0]
            for line in result.stdout.decode(errors="replace").splitlines()
            if line.endswith("=ok")
        )
        if "baseimage" not in found:
            self.warn("the container does not see the base image read-only: not advertising it")
        if self.kvm and "kvm" not in found:
            self.warn("/dev/kvm does not open in the container: not advertising nested-kvm")
        self.probed = found

    def _stop(self) -> None:
        container, self.container = self.container, None
        if container is not None:
            container.stop()
        private, self.private = self.private, None
        if private is not None:
            try:
                rootfs.remove(private, self.userns)
            except NestbedError as e:
                raise ServerFailure(str(e)) from None

    def open_testbed(self, scratch: str | None) -> str:
        self._start()
        return self.make_scratch(scratch)

    def exec_prefix(self) -> list[str]:
        if self.container is None:
            raise ServerFailure("testbed is not open")
        return self.container.exec_prefix()

    def close_testbed(self) -> None:
        self._stop()

    def revert_testbed(self, scratch: str) -> str:
        self._stop()
        self._start()
        return self.make_scratch(scratch)

    def debug_fail(self) -> str | None:
        if self.container is None:
            return "no container"
        alive = "running" if self.container.running() else "gone"
        return f"container PID 1 {self.container.pid} is {alive}"


def sbuild_tarball(release: str, arch: str, env: Mapping[str, str]) -> Path | None:
    """sbuild's (and autopkgtest-virt-unshare's) tarball for release and arch, when there is
    one: ``$XDG_CACHE_HOME/sbuild/RELEASE-ARCH.t*``, else ``~/.cache/sbuild/RELEASE-ARCH.t*``;
    the first in name order."""
    home = env.get("HOME") or os.path.expanduser("~")
    cache = env.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    found = sorted(Path(cache, "sbuild").glob(f"{glob.escape(release)}-{glob.escape(arch)}.t*"))
    return next((p.absolute() for p in found if p.is_file()), None)


def _base_request(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    if args.no_baseimage:
        return None
    if args.baseimage is not None:
        return str(args.baseimage)
    return "" if env.get(WANT_BASEIMAGE) == "1" else None


def _check_base_path(path: str) -> None:
    if not os.path.exists(path):
        raise ServerFailure(f"--baseimage={path}: no such file")
    if not os.path.isdir(path) and not os.access(path, os.R_OK):
        raise ServerFailure(f"--baseimage={path}: not readable")


def _named_base_image(path: Path) -> BaseImage:
    """--baseimage=PATH: a nestbed image (its directory or disk.img), else any disk file."""
    if path.is_dir() or (path.parent / MANIFEST).is_file():
        try:
            image = ImagePaths.load(path)
        except NestbedError as e:
            raise ServerFailure(f"--baseimage={path}: {e}") from None
        return BaseImage(image.disk.absolute(), image.root_tarball, image.name)
    return BaseImage(path.absolute(), None, str(path))


def _check_binds(binds: list[list[str]]) -> tuple[tuple[str, str], ...]:
    out = []
    for outside, inside in binds:
        if not os.path.isdir(outside):
            raise ServerFailure(f"--bind {outside} {inside}: {outside} is not a directory")
        if not os.path.isabs(inside) or "\n" in inside:
            raise ServerFailure(
                f"--bind {outside} {inside}: {inside} must be an absolute path in the container"
            )
        out.append((os.path.abspath(outside), os.path.normpath(inside)))
    return tuple(out)


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _has_subid_range() -> bool:
    names = {_user(), str(os.getuid())}
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                if not any(line.split(":", 1)[0] in names for line in f):
                    return False
        except OSError:
            return False
    return True


def main() -> NoReturn:
    run_server(UnshareServer)


if __name__ == "__main__":
    main()
