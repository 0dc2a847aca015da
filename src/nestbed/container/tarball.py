"""The root file system tarball container testbeds start from: mmdebstrap, cached.

`ensure_tarball(release, arch, mirror)` returns a complete tarball, building it on first use:
mmdebstrap ``--variant=minbase`` from the machine's apt sources (`nestbed.image.mirror`) or
one ``--mirror``, with ``deb-src`` twins of the ``deb`` entries, keeping the apt lists
(mmdebstrap removes them by default) so a test's dependencies can be installed, and a
source package fetched by name, without an ``apt-get update`` first. The tarball is a plain
sbuild/autopkgtest-style root tarball: nothing nestbed-specific is inside, so
autopkgtest-virt-unshare can use the same file.

Cache: ``$NESTBED_CACHE_DIR/tarballs/`` (else ``$XDG_CACHE_HOME/nestbed/tarballs``, else
``~/.cache/nestbed/tarballs``), one ``RELEASE-ARCH-minbase-HASH.tar`` per set of sources.
mmdebstrap writes into a staging directory beside it, which is renamed into place only when
the tarball is complete; a lock serialises two builds of the same tarball.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

from nestbed.image.cache import ImageCache, clean_stale, default_root, staging_dir
from nestbed.image.errors import ImageError
from nestbed.image.mirror import AptSource, image_sources
from nestbed.image.progress import PlainProgress, Progress
from nestbed.proc import CommandFailed, remove_tree, run

VARIANT = "minbase"
# bumped when what goes into the tarball changes, so old cached ones are not used
RECIPE = "2"
EATMYDATA_HOOKS = Path("/usr/share/mmdebstrap/hooks/eatmydata")


def tarball_root() -> Path:
    """Directory of the cached tarballs (a sibling of the image cache)."""
    return default_root().parent / "tarballs"


def host_arch() -> str:
    try:
        out = run(["dpkg", "--print-architecture"]).stdout_text.strip()
    except CommandFailed:
        out = ""
    return out or "amd64"


def host_release() -> str:
    """The codename of the machine's own Debian mirror entries, else `stable`."""
    from nestbed.image.mirror import host_codename, host_sources

    try:
        return host_codename(host_sources()) or "stable"
    except OSError:
        return "stable"


def source_lines(sources: list[AptSource]) -> list[str]:
    """The tarball's apt sources: each `deb` line and its `deb-src` twin, so a source
    package can be fetched by name (`apt-get source`) without touching the sources first."""
    lines = [line for s in sources for line in s.lines()]
    return lines + ["deb-src" + line[len("deb") :] for line in lines]


def tarball_name(release: str, arch: str, sources: list[AptSource]) -> str:
    digest = hashlib.sha256()
    for line in [RECIPE, VARIANT, *source_lines(sources)]:
        digest.update(line.encode() + b"\n")
    return f"{release}-{arch}-{VARIANT}-{digest.hexdigest()[:12]}.tar"


def mmdebstrap_argv(release: str, arch: str, sources: list[AptSource], out: Path) -> list[str]:
    rootless = os.geteuid() != 0
    argv = [
        "mmdebstrap",
        f"--mode={'unshare' if rootless else 'root'}",
        f"--variant={VARIANT}",
        f"--architectures={arch}",
        "--format=tar",
        # the apt lists stay: dependencies can be installed without an update first
        "--skip=cleanup/apt/lists",
        '--aptopt=Acquire::Languages "none"',
    ]
    if EATMYDATA_HOOKS.is_dir():
        argv.append(f"--hook-dir={EATMYDATA_HOOKS}")
    argv += [release, str(out)]
    argv += source_lines(sources)
    if not rootless:
        # mounts mmdebstrap makes and processes it starts end with this namespace
        argv = ["unshare", "--mount", "--pid", "--fork", "--kill-child", *argv]
    return argv


def _reason(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern in (r"^E: ", r"^[A-Z]: .*(fail|error)"):
        for line in lines:
            if re.search(pattern, line, re.IGNORECASE):
                return line
    return lines[-1] if lines else "no output"


def ensure_tarball(
    release: str,
    arch: str,
    mirror: str | None,
    *,
    root: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """The cached tarball for release/arch from the machine's (or `mirror`'s) sources,
    built first when missing. Raises ImageError with one line on failure."""
    sources = image_sources(release, mirror)
    root = root if root is not None else tarball_root()
    name = tarball_name(release, arch, sources)
    dest = root / name
    if dest.is_file():
        return dest
    progress = progress if progress is not None else PlainProgress()
    cache = ImageCache(root)
    with cache.lock(name):
        if dest.is_file():  # built by another process while we waited
            return dest
        clean_stale(root)
        staging = staging_dir(dest)
        try:
            out = staging / name
            lines: list[str] = []

            def on_line(line: str) -> None:
                lines.append(line)
                if line.startswith("I: "):
                    progress.detail(line[3:])

            start = time.monotonic()
            with progress.stage(f"building {release}/{arch} root tarball (mmdebstrap)"):
                try:
                    run(mmdebstrap_argv(release, arch, sources, out), on_line=on_line)
                except CommandFailed as e:
                    raise ImageError(f"mmdebstrap failed: {_reason(e.output)}") from None
            if not out.is_file():
                raise ImageError(f"mmdebstrap wrote no tarball at {out}")
            os.chmod(out, 0o644)
            os.rename(out, dest)
            progress.info(f"tarball {dest} ({time.monotonic() - start:.0f} s)")
        finally:
            remove_tree(staging)
    return dest
