"""Root trees unpacked from a tarball: a cached pristine one, or a private throwaway one.

A container in overlay mode starts from a pristine tree that is never written (the writes
go to a tmpfs in the container's own mount namespace): it is unpacked once per tarball into
``<tarball cache>/rootfs/KEY`` (written aside, then renamed into place) and shared by
every container after that. In direct mode each container gets a fresh private copy in a
temp dir, removed when the container is done.

The tree gets the suggested normal user at unpack time (autopkgtest-virt-unshare does the
same), never in the tarball itself, so autopkgtest can use the same tarball unchanged.
Not root, the tree is written inside a user namespace mapped through /etc/subuid, so the
files carry the ids the container will see.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from nestbed.container.container import ContainerError, userns_argv
from nestbed.container.tarball import tarball_root
from nestbed.image.cache import ROOT_TARBALL, ImageCache, clean_stale
from nestbed.proc import CommandFailed, remove_tree, run

# bumped when what unpacking does to a tree changes
RECIPE = "1"
_READY = ".nestbed-unpacked"


def _in_userns(userns: bool, argv: list[str]) -> list[str]:
    return ["unshare", *userns_argv(), *argv] if userns else argv


def _fail(what: str, e: CommandFailed) -> ContainerError:
    tail = e.output.strip().splitlines()
    return ContainerError(f"{what}: {tail[-1] if tail else f'exit status {e.returncode}'}")


def unpack(tarball: Path, dest: Path, user: str, userns: bool) -> None:
    """Extract tarball into the existing empty dir dest (without /dev: the container
    mounts its own), and add the normal user unless the tree has it already."""
    script = (
        'PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"\n'  # useradd, for users without sbin
        'tar --exclude=./dev --directory "$1" --extract --file "$2"\n'
        'mkdir -p "$1/dev"\n'
        'if ! grep -q "^$3:" "$1/etc/passwd"; then\n'
        '  useradd --create-home --root "$1" "$3"\n'
        "fi\n"
    )
    argv = _in_userns(userns, ["sh", "-ec", script, "sh", str(dest), str(tarball), user])
    try:
        run(argv, merge_stderr=True)
    except CommandFailed as e:
        raise _fail(f"cannot unpack {tarball}", e) from None


def remove(path: Path, userns: bool) -> None:
    """rm -rf a tree, from the user namespace that owns its files when not root."""
    if not path.exists():
        return
    try:
        if userns:
            run(_in_userns(True, ["rm", "-rf", "--one-file-system", "--", str(path)]))
        else:
            remove_tree(path)
    except CommandFailed as e:
        raise _fail(f"cannot remove {path}", e) from None


def private_root(
    tarball: Path, user: str, userns: bool, prefix: str | None = None, dest: Path | None = None
) -> Path:
    """A fresh private tree (direct mode): in dest, created here (its parent must exist),
    else in a temp dir made as ``mkdtemp(prefix=prefix)`` (autopkgtest's --prefix); the
    caller removes it."""
    if dest is not None:
        try:
            dest.mkdir(mode=0o755)
        except OSError as e:
            raise ContainerError(f"cannot create {dest}: {e.strerror}") from None
        made = dest
    else:
        made = Path(tempfile.mkdtemp(prefix=prefix or "nestbed-unshare.")).absolute()
    try:
        made.chmod(0o755)
        unpack(tarball, made, user, userns)
    except BaseException:
        with contextlib.suppress(ContainerError):
            remove(made, userns)
        raise
    return made


def _key(tarball: Path, user: str, userns: bool) -> str:
    st = tarball.stat()
    real = os.path.realpath(tarball)
    ids = f"userns-{os.geteuid()}" if userns else "root"
    text = f"{RECIPE}\n{real}\n{st.st_size}\n{st.st_mtime_ns}\n{st.st_ino}\n{user}\n{ids}"
    name = tarball.name.split(".")[0]
    if tarball.name == ROOT_TARBALL:  # an image's: the tree is named after the image
        name = tarball.parent.name
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def shared_root(tarball: Path, user: str, userns: bool, root: Path | None = None) -> Path:
    """The cached pristine tree of tarball (overlay mode), unpacked first when missing.
    A changed tarball (size, mtime, inode) gets a new tree."""
    base = root if root is not None else tarball_root() / "rootfs"
    try:
        key = _key(tarball, user, userns)
    except OSError as e:
        raise ContainerError(f"cannot read tarball {tarball}: {e.strerror}") from None
    dest = base / key
    if (dest / _READY).exists():
        return dest
    with ImageCache(base).lock(key):
        if (dest / _READY).exists():
            return dest
        clean_stale(base)
        staging = Path(tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=base))
        try:
            tree = staging / "tree"
            tree.mkdir(mode=0o755)
            unpack(tarball, tree, user, userns)
            (tree / _READY).touch()
            if dest.exists():  # a half-made tree of a process that died: not ours to use
                remove(dest, userns)
            os.rename(tree, dest)
        finally:
            remove(staging, userns)
    return dest


def mountpoint(root: Path | None = None) -> Path:
    """The empty directory containers mount their private tmpfs on (one for all: each
    container mounts in its own namespace, so they never see each other's)."""
    base = root if root is not None else tarball_root() / "rootfs"
    path = base / ".mnt"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ContainerError(f"cannot create {path}: {e.strerror}") from None
    return path
