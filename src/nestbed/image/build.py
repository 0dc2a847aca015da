"""Build an image: mmdebstrap into a directory, then a partitioned raw disk from it.

No vmdb2, loop devices or mounts: the root file system is written with `mkfs.ext4 -d` straight
into its partition, the EFI system partition with mtools (`nestbed.image.disk`: GPT, both
firmware kinds boot it), and nestbed itself boots the disk directly with the kernel and initrd
kept next to it. As root mmdebstrap runs in root mode inside a private mount and PID namespace
(`unshare`), so whatever it mounts and starts is gone with it; as another user it runs in
unshare mode (needs /etc/subuid and /etc/subgid entries) and the file system is written from
inside its user namespace so ownership comes out right.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nestbed.image import contents, disk
from nestbed.image.cache import (
    DISK,
    INITRD,
    KERNEL,
    MANIFEST,
    ROOT_TARBALL,
    ImageCache,
    ImagePaths,
    Manifest,
    clean_stale,
    install,
    staging_dir,
)
from nestbed.image.config import BuildOptions, format_size
from nestbed.image.errors import ImageError
from nestbed.image.mirror import AptSource, image_sources, probe
from nestbed.image.progress import Progress, QuietProgress
from nestbed.proc import CommandFailed, remove_tree, run

RECIPE_VERSION = 4  # bump when the image contents change: old cache keys stop matching
IMAGE_JSON_VERSION = 1  # of /etc/nestbed/image.json
EATMYDATA_HOOKS = Path("/usr/share/mmdebstrap/hooks/eatmydata")
MIN_FREE = 256 << 20  # refuse to start with less than this where the image goes
SCRATCH_MIN_FREE = 2 << 30  # use /dev/shm for the root tree when it has this much room


@dataclass(frozen=True)
class Plan:
    """Everything the build decides before it starts, fixed."""

    options: BuildOptions
    sources: tuple[AptSource, ...]
    rootless: bool

    @property
    def key(self) -> str:
        parts: dict[str, object] = {
            "recipe": RECIPE_VERSION,
            "contents": contents.fingerprint(),
            "sources": [line for s in self.sources for line in s.lines()],
            "size": self.options.size,
            "packages": sorted(self.options.packages),
        }
        if self.options.nested:  # it carries nestbed itself: a new nestbed, a new image
            parts["nestbed"] = contents.nestbed_fingerprint()
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
        o = self.options
        return f"{o.release}-{o.arch}-{o.flavour}-{digest}"

    def image_info(self) -> dict[str, object]:
        """What the guest learns about itself, in /etc/nestbed/image.json: also everything a
        testbed needs to boot the bare disk (nestbed.image.bare), with the kernel and initrd
        taken from the disk's own /boot."""
        version = contents.KERNEL_VERSION
        return {
            "image_json_version": IMAGE_JSON_VERSION,
            "name": self.key,
            "release": self.options.release,
            "arch": self.options.arch,
            "flavour": self.options.flavour,
            "kernel_version": version,
            "kernel": f"/boot/vmlinuz-{version}",
            "initrd": f"/boot/initrd.img-{version}",
            "cmdline": contents.CMDLINE,
            "root_serial": contents.ROOT_SERIAL,
            "base_serial": contents.BASE_SERIAL,
            "agent_port": contents.AGENT_PORT,
            "test_user": contents.TEST_USER,
            "format": "raw",
            "layout": "gpt",
            "size": self.options.size,
            "created": contents.CREATED,
            "sources": [line for s in self.sources for line in s.lines()],
            "packages": list(self.options.packages),
        }


def plan(options: BuildOptions) -> Plan:
    sources = tuple(image_sources(options.release, options.mirror))
    return Plan(options, sources, rootless=os.geteuid() != 0)


def mmdebstrap_argv(
    p: Plan, rootfs: Path, hooks: contents.Hooks | None, *, wrap: bool = True
) -> list[str]:
    """The mmdebstrap call the build wraps (hooks=None: without nestbed's own hooks)."""
    o = p.options
    argv = [
        "mmdebstrap",
        f"--mode={'unshare' if p.rootless else 'root'}",
        "--variant=minbase",
        f"--architectures={o.arch}",
        "--format=directory",
        f"--include={','.join(o.packages)}",
        '--aptopt=Acquire::Languages "none"',
    ]
    if EATMYDATA_HOOKS.is_dir():
        argv.append(f"--hook-dir={EATMYDATA_HOOKS}")
    if hooks is not None:
        argv += [f"--setup-hook={hooks.setup}", f"--customize-hook={hooks.customize}"]
    argv += [o.release, str(rootfs)]
    argv += [line for s in p.sources for line in s.lines()]
    if wrap and not p.rootless:
        # a private mount and PID namespace: mounts in the chroot and every process
        # mmdebstrap starts end with it, also when it is killed
        argv = ["unshare", "--mount", "--pid", "--fork", "--kill-child", *argv]
    return argv


def _in_namespace(p: Plan, argv: list[str]) -> list[str]:
    """Run a command where the root tree's ownership looks right (rootless: mmdebstrap's
    user namespace)."""
    return ["mmdebstrap", "--unshare-helper", *argv] if p.rootless else argv


def _scratch_parent(staging: Path) -> Path:
    """Where the root tree is built: $TMPDIR if set, /dev/shm if roomy, else beside the image."""
    if os.environ.get("TMPDIR"):
        return Path(os.environ["TMPDIR"])
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= SCRATCH_MIN_FREE and os.access(shm, os.W_OK):
            return shm
    except OSError:
        pass
    return staging


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _no_space(output: str) -> bool:
    return "No space left on device" in output or "Could not allocate block" in output


class Builder:
    def __init__(self, p: Plan, dest: Path, progress: Progress) -> None:
        self.plan = p
        self.dest = dest
        self.progress = progress

    def build(self) -> ImagePaths:
        start = time.monotonic()
        p, progress = self.plan, self.progress
        clean_stale(self.dest.parent)
        staging = staging_dir(self.dest)
        scratch: Path | None = None
        try:
            if _free(staging) < MIN_FREE:
                raise ImageError(
                    f"not enough space in {staging.parent}: {format_size(_free(staging))} free,"
                    f" an image needs at least {format_size(MIN_FREE)}"
                )
            missing = disk.missing_tools()
            if missing:
                raise ImageError(
                    f"writing the image's disk needs {', '.join(missing)}"
                    f" (apt-get install {disk.PACKAGES})"
                )
            with progress.stage("checking the mirror"):
                probe(p.sources[0], p.options.release)
            scratch = Path(
                tempfile.mkdtemp(
                    prefix=f"nestbed-build-{os.getpid()}-", dir=_scratch_parent(staging)
                )
            )
            scratch.chmod(0o755)
            rootfs = scratch / "root"
            hooks = contents.write_hooks(
                staging / "hooks", p.image_info(), with_nestbed=p.options.nested
            )
            with progress.stage(f"bootstrapping Debian {p.options.release} (mmdebstrap)"):
                self._mmdebstrap(rootfs, hooks)
            with progress.stage("writing the disk image"):
                kernel_version = self._kernel(rootfs, staging)
                self._write_disk(rootfs, staging)
            if p.options.nested:
                with progress.stage("writing the root tarball (the unshare testbed's root)"):
                    self._write_tarball(rootfs, staging)
            remove_tree(staging / "hooks")
            self._remove_rootfs(scratch)
            scratch = None
            manifest = Manifest(
                name=self.dest.name,
                release=p.options.release,
                arch=p.options.arch,
                flavour=p.options.flavour,
                size=p.options.size,
                created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                kernel_version=kernel_version,
                cmdline=contents.CMDLINE,
                root_serial=contents.ROOT_SERIAL,
                base_serial=contents.BASE_SERIAL,
                agent_port=contents.AGENT_PORT,
                sources=tuple(line for s in p.sources for line in s.lines()),
                packages=p.options.packages,
                build_seconds=round(time.monotonic() - start, 1),
                extra={"key": p.key, "rootless": p.rootless},
            )
            try:
                (staging / MANIFEST).write_text(manifest.to_json())
                install(staging, self.dest)
            except OSError as e:
                raise ImageError(f"cannot write to {self.dest.parent}: {e.strerror}") from None
            return ImagePaths.load(self.dest)
        finally:
            if scratch is not None:
                self._remove_rootfs(scratch)
            if staging.exists():
                remove_tree(staging)

    def _mmdebstrap(self, rootfs: Path, hooks: contents.Hooks) -> None:
        lines: list[str] = []

        def on_line(line: str) -> None:
            lines.append(line)
            if line.startswith("I: "):
                self.progress.detail(line[3:])

        argv = mmdebstrap_argv(self.plan, rootfs, hooks)
        try:
            run(argv, on_line=on_line)
        except CommandFailed as e:
            raise ImageError(f"mmdebstrap failed: {_mmdebstrap_reason(e.output)}") from e

    def _kernel(self, rootfs: Path, staging: Path) -> str:
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageError(
                f"no kernel in the image (is {self.plan.options.kernel_package} installable?)"
            )
        version = kernels[-1].name.removeprefix("vmlinuz-")
        try:
            info = json.loads((rootfs / contents.IMAGE_JSON).read_text())
        except (OSError, ValueError) as e:
            raise ImageError(f"the image has no readable /{contents.IMAGE_JSON}: {e}") from None
        if info.get("kernel_version") != version:
            raise ImageError(
                f"/{contents.IMAGE_JSON} names kernel {info.get('kernel_version')!r},"
                f" the image boots {version!r}"
            )
        initrd = rootfs / "boot" / f"initrd.img-{version}"
        try:
            shutil.copyfile(kernels[-1], staging / KERNEL)
            shutil.copyfile(initrd, staging / INITRD)
        except FileNotFoundError:
            raise ImageError(f"no initrd for kernel {version} in the image") from None
        except OSError as e:
            raise self._os_error(e) from None
        return version

    def _write_disk(self, rootfs: Path, staging: Path) -> None:
        p = self.plan
        du = run(_in_namespace(p, ["du", "-s", "-B1", "--one-file-system", str(rootfs)]))
        used = int(du.stdout_text.split()[0])
        need = used + used // 8 + (64 << 20)  # ext4 metadata and journal
        if need > disk.root_size(p.options.size):
            raise ImageError(
                f"image size {format_size(p.options.size)} is too small for"
                f" {format_size(used)} of files (try --size {format_size(2 * need)})"
            )
        free = _free(staging)
        if need + disk.ROOT_START > free:
            raise ImageError(
                f"not enough space in {staging.parent}: {format_size(free)} free,"
                f" the image needs about {format_size(need + disk.ROOT_START)}"
            )
        image = staging / DISK
        boot = disk.BootFiles(
            kernel=staging / KERNEL,
            initrd=staging / INITRD,
            title=f"Debian {p.options.release} ({p.options.flavour}, nestbed)",
        )
        try:
            disk.write_table(image, p.options.size, p.options.arch)
            disk.write_esp(image, boot)
        except OSError as e:
            raise self._os_error(e) from None
        argv = [
            "mkfs.ext4", "-q", "-F", "-L", contents.ROOT_SERIAL,
            "-E", f"offset={disk.ROOT_START},lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            "-d", str(rootfs), str(image), f"{disk.root_size(p.options.size) // 1024}k",
        ]  # fmt: skip
        try:
            run(_in_namespace(p, argv), merge_stderr=True)
        except CommandFailed as e:
            if _no_space(e.output):
                raise ImageError(f"not enough space in {staging.parent} for the image") from e
            raise ImageError(f"mkfs.ext4 failed: {e.output.strip().splitlines()[-1:]}") from e

    def _write_tarball(self, rootfs: Path, staging: Path) -> None:
        """The same tree as the disk's root, for a container (nestbed-virt-unshare exporting
        this image runs on it): level 1 and level 2 are then one bootstrap, nestbed-vm and
        its QEMU included."""
        argv = [
            "tar", "--create", "--file", str(staging / ROOT_TARBALL), "--directory", str(rootfs),
            "--one-file-system", "--numeric-owner", "--xattrs", "--xattrs-include=*", ".",
        ]  # fmt: skip
        try:
            run(_in_namespace(self.plan, argv), merge_stderr=True)
        except CommandFailed as e:
            if _no_space(e.output):
                raise ImageError(f"not enough space in {staging.parent} for the image") from e
            raise ImageError(f"tar failed: {e.output.strip().splitlines()[-1:]}") from e

    def _os_error(self, e: OSError) -> ImageError:
        if e.errno == 28:  # ENOSPC
            return ImageError(f"not enough space in {self.dest.parent} for the image")
        return ImageError(f"cannot write to {self.dest.parent}: {e.strerror}")

    def _remove_rootfs(self, scratch: Path) -> None:
        if self.plan.rootless and scratch.exists():
            run(_in_namespace(self.plan, ["rm", "-rf", "--one-file-system", str(scratch / "root")]))
        remove_tree(scratch)


def _mmdebstrap_reason(output: str) -> str:
    """The line of mmdebstrap's output that says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern in (r"^E: Unable to locate package", r"^E: ", r"^[A-Z]: .*(fail|error)"):
        for line in lines:
            if re.search(pattern, line, re.IGNORECASE):
                return line
    return lines[-1] if lines else "no output"


def build(
    options: BuildOptions,
    *,
    dest: Path | None = None,
    cache: ImageCache | None = None,
    progress: Progress | None = None,
) -> ImagePaths:
    """Build an image into dest (default: its place in the cache), always anew; what was
    there is replaced only once the new image is complete."""
    p = plan(options)
    progress = progress or QuietProgress()
    if dest is None:
        cache = cache or ImageCache()
        with cache.lock(p.key):
            return Builder(p, cache.path(p.key), progress).build()
    return Builder(p, dest, progress).build()


def ensure_image(
    options: BuildOptions | None = None,
    *,
    cache: ImageCache | None = None,
    progress: Progress | None = None,
) -> ImagePaths:
    """The cached image for these options, built first if it is not there (the runner's entry)."""
    p = plan(options or BuildOptions())
    cache = cache or ImageCache()
    found = cache.lookup(p.key)
    if found is not None:
        return found
    with cache.lock(p.key):
        found = cache.lookup(p.key)  # built by someone else while we waited
        if found is not None:
            return found
        progress = progress or QuietProgress()
        progress.info(f"building image {p.key} (once; cached in {cache.root})")
        return Builder(p, cache.path(p.key), progress).build()
