"""nestbed-virt-null: the host itself as the testbed, like autopkgtest-virt-null.

Nothing is isolated or reverted: tests run directly on this machine. The scratch dir is a
host directory (from mkdtemp, mode 1777), advertised as ``downtmp-host=`` so clients may use
it directly; copies are plain host file operations that keep modes, timestamps, symlinks and
hard links within a tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from typing import ClassVar, NoReturn

from nestbed.capabilities import DOWNTMP_HOST, Cap, with_value
from nestbed.testbed.protocol import (
    COPY_FAILED,
    CommandRefused,
    ServerFailure,
    VirtServer,
    run_server,
)

_Links = dict[tuple[int, int], str]


class NullServer(VirtServer):
    name: ClassVar[str] = "null"
    help_epilog: ClassVar[str] = """\
The host itself is the testbed: tests run on this machine, and as root the runner installs
their dependencies here with apt. Use it only on a machine you can throw away.

Examples:
  nestbed -B ./hello -- null                         hello's tests on this host, no build
  nestbed hello_2.10-3.dsc -- null                   build it here, then test it
  autopkgtest -B ./hello -- /usr/bin/nestbed-virt-null
                                                     autopkgtest drives it the same way
"""

    _made: str | None = None  # the scratch dir this process created and must remove

    def capabilities(self) -> list[str]:
        # same words, same order as autopkgtest-virt-null
        caps: list[str] = [Cap.ISOLATION_MACHINE]
        if os.getuid() == 0:
            caps.append(Cap.ROOT_ON_TESTBED)
        if self.scratch is not None:
            caps.append(with_value(DOWNTMP_HOST, self.scratch))
        return caps

    def exec_prefix(self) -> list[str]:
        # a no-op, but the prefix must not be empty
        return ["env"]

    def open_testbed(self, scratch: str | None) -> str:
        with self.critical():
            if scratch:
                # reopen: same path, as built trees may refer to it; never adopt a directory
                # someone else created there meanwhile
                try:
                    os.mkdir(scratch, 0o700)
                except OSError as e:
                    raise ServerFailure(f"cannot recreate scratch dir {scratch}: {e}") from None
                made = scratch
            else:
                made = tempfile.mkdtemp(prefix="nestbed.")
            self._made = made
        os.chmod(made, 0o1777)  # the test user writes there too
        self.debug(f"scratch dir {made}")
        return made

    def close_testbed(self) -> None:
        made, self._made = self._made, None
        if made is not None:
            _remove_all(made, self.warn)

    def copydown(self, host: str, tb: str, is_dir: bool) -> None:
        # autopkgtest-virt-null replaces the destination (rm -rf, then cp -r)
        _guarded(self, lambda: _copy_replacing(host, tb, is_dir), host, tb)

    def copyup(self, tb: str, host: str, is_dir: bool) -> None:
        # autopkgtest-virt-null merges a tree into an existing host directory, and copies a
        # file into a host directory that exists at the destination path
        if is_dir:
            _guarded(self, lambda: _copy_merging(tb, host), tb, host)
        else:
            dst = os.path.join(host, os.path.basename(tb)) if os.path.isdir(host) else host
            _guarded(self, lambda: _copy_replacing(tb, dst, False), tb, host)


def _guarded(server: VirtServer, copy: Callable[[], None], src: str, dst: str) -> None:
    try:
        copy()
    except (OSError, ValueError) as e:
        server.warn(f"cannot copy {src} to {dst}: {e}")
        raise CommandRefused(COPY_FAILED) from None


def _inside(path: str, top: str) -> bool:
    return os.path.commonpath([path, top]) == top


def _check_source(src: str, is_dir: bool) -> None:
    if is_dir and not os.path.isdir(src):
        raise ValueError(f"{src} is not a directory")
    if not is_dir:
        if os.path.isdir(src):
            raise ValueError(f"{src} is a directory")
        if not os.path.exists(src):
            raise ValueError(f"{src} does not exist")


def _copy_replacing(src: str, dst: str, is_dir: bool) -> None:
    _check_source(src, is_dir)
    rsrc, rdst = os.path.realpath(src), os.path.realpath(dst)
    if rsrc == rdst:
        return
    if is_dir and _inside(rdst, rsrc):
        raise ValueError(f"{dst} is inside {src}")
    # build the copy beside the destination and swap it in: a failed copy leaves the old
    # destination, and a source inside the destination is read before that is removed
    tmp = tempfile.mkdtemp(prefix=".nestbed-copy-", dir=os.path.dirname(dst) or ".")
    try:
        staged = os.path.join(tmp, "x")
        if is_dir:
            _copy_dir(src, staged, {})
        else:
            shutil.copy2(src, staged)
        if os.path.lexists(dst):
            _remove(dst)
        os.rename(staged, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_merging(src: str, dst: str) -> None:
    _check_source(src, True)
    rsrc, rdst = os.path.realpath(src), os.path.realpath(dst)
    if rsrc == rdst:
        return
    if _inside(rdst, rsrc):
        raise ValueError(f"{dst} is inside {src}")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    _copy_dir(src, dst, {})


def _copy_dir(src: str, dst: str, links: _Links) -> None:
    """Copy the tree src into dst (created if missing, merged if a directory)."""
    if os.path.lexists(dst) and (os.path.islink(dst) or not os.path.isdir(dst)):
        _remove(dst)
    if not os.path.lexists(dst):
        os.mkdir(dst, 0o700)  # writable while we fill it; its real mode is set last
    with os.scandir(src) as entries:
        for entry in entries:
            _copy_entry(entry.path, os.path.join(dst, entry.name), links)
    shutil.copystat(src, dst)


def _copy_entry(src: str, dst: str, links: _Links) -> None:
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        _copy_dir(src, dst, links)
        return
    if os.path.lexists(dst):
        _remove(dst)
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        os.link(links[key], dst)
        return
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        with contextlib.suppress(OSError):
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    elif stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dst, follow_symlinks=False)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(dst, stat.S_IMODE(st.st_mode))
        shutil.copystat(src, dst, follow_symlinks=False)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        os.mknod(dst, st.st_mode, st.st_rdev)
        shutil.copystat(src, dst, follow_symlinks=False)
    else:
        return  # sockets cannot be copied (tar skips them too)
    if st.st_nlink > 1:
        links[key] = dst


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _remove_all(path: str, warn: Callable[[str], None]) -> None:
    """rm -rf that also gets through directories a test made read-only."""

    def make_writable(func: object, failed: str, exc: object) -> None:
        parent = os.path.dirname(failed)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
                shutil.rmtree(failed, ignore_errors=True)
            else:
                os.unlink(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable)
    else:
        shutil.rmtree(path, onerror=make_writable)
    if os.path.lexists(path):
        warn(f"could not remove scratch dir {path} completely")


def main() -> NoReturn:
    run_server(NullServer)


if __name__ == "__main__":
    main()
