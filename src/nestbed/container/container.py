"""One running unshare container: its PID 1, and the command that runs things inside it.

`Container` is used like QEMU's `QEMUMachine`: `start()` either returns a container that
is set up and ready or raises one `ContainerError` with the command line and the setup's own
message; `stop()` releases everything, also after a failed start, and is idempotent.

The container is one set of namespaces (mount, PID, IPC, UTS, cgroup; plus a user namespace
when not root) created once by ``unshare --fork``; its PID 1 is `nestbed.container.init`.
Every command then joins it with ``nsenter --target PID1``: starting one costs a fork and an
exec, not a new set of namespaces and mounts, and everything a test leaves running stays in
the one PID namespace, so killing PID 1 ends it all. PID 1 dies with us: unshare runs with
PR_SET_PDEATHSIG (`nestbed.proc.spawn`) and ``--kill-child`` passes that on.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from nestbed.errors import EXIT_TESTBED_FAILURE, NestbedError
from nestbed.proc import PIPE, Process, cmdline, spawn, stop

INIT = Path(__file__).with_name("init.py")
# what autopkgtest's unshare-helper gives every command: a clean environment
EXEC_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SHELL=/bin/sh")
NAMESPACES = ("--mount", "--pid", "--ipc", "--uts", "--cgroup")


class ContainerError(NestbedError):
    """The container cannot be set up; the message is one line."""

    exit_code = EXIT_TESTBED_FAILURE


class OverlayUnavailable(ContainerError):
    """The overlay on the pristine tree cannot be mounted (direct mode may still work)."""


OVERLAY_FAILED = 3  # init.py's exit status for that


@dataclass(frozen=True)
class ContainerConfig:
    rootdir: Path  # overlay: the pristine lower tree; direct: the private writable root
    overlay: bool
    mountpoint: Path  # an empty directory the container mounts its tmpfs on (overlay)
    userns: bool  # map ids through /etc/subuid (needed when not root)
    # (OUTSIDE, INSIDE): host directories bind-mounted into the container (--bind)
    binds: tuple[tuple[str, str], ...] = ()
    # a disk file the container sees read-only as /dev/baseimage (the exported base image)
    baseimage: Path | None = None
    # host device nodes bound into the container's /dev besides the minimal set (e.g. kvm)
    devices: tuple[str, ...] = ()

    def mode(self) -> str:
        if not self.overlay:
            return "direct"
        return "overlay-userxattr" if self.userns else "overlay"


def userns_argv() -> list[str]:
    """unshare options for a user namespace: root is us, the rest comes from /etc/subuid."""
    return ["--user", "--map-auto", "--map-root-user"]


class Container:
    def __init__(self, config: ContainerConfig) -> None:
        self.config = config
        self.pid: int | None = None  # PID 1 of the container, as the host sees it
        self._pidfd: int | None = None
        self._proc: Process | None = None

    def argv(self) -> list[str]:
        c = self.config
        return [
            "unshare",
            *(userns_argv() if c.userns else []),
            *NAMESPACES,
            "--propagation=private",
            "--fork",
            "--kill-child",
            "--",
            sys.executable,
            "-I",
            "-S",
            str(INIT),
            c.mode(),
            str(c.rootdir),
            str(c.mountpoint),
            str(c.baseimage) if c.baseimage is not None else "",
            ",".join(c.devices),
            *(word for pair in c.binds for word in pair),
        ]

    def start(self, timeout: float = 60.0) -> None:
        argv = self.argv()
        with tempfile.TemporaryFile() as errors:
            try:
                self._proc = spawn(argv, stdout=PIPE, stderr=errors)
                line = self._read_ready(timeout)
            except BaseException:
                self.stop()
                raise
            if line is None:
                status = self._proc.wait(timeout) if self._proc is not None else None
                self.stop()
                errors.seek(0)
                text = errors.read().decode("utf-8", "replace").strip().splitlines()
                why = text[-1] if text else "no message"
                error = OverlayUnavailable if status == OVERLAY_FAILED else ContainerError
                raise error(f"cannot start the container ({cmdline(argv)}): {why}")
        words = line.split()
        self.pid = int(words[1])
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError as e:
            self.stop()
            raise ContainerError(f"container PID 1 ({self.pid}) is gone: {e.strerror}") from None

    def _read_ready(self, timeout: float) -> str | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ContainerError(f"container not ready after {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
        line = buf.split(b"\n", 1)[0].decode("ascii", "replace")
        words = line.split()
        if len(words) != 2 or words[0] != "ready" or not words[1].isdigit():
            return None
        return line

    def exec_prefix(self) -> list[str]:
        """Host argv prefix running the appended command as root in the container, in /,
        with a clean environment; stdin/stdout/stderr and the exit status pass through."""
        if self.pid is None:
            raise ContainerError("container is not running")
        return [
            "nsenter",
            f"--target={self.pid}",
            *(["--user"] if self.config.userns else []),
            *NAMESPACES,
            "--root",  # without a value: PID 1's root, i.e. the container's
            "--wd",  # likewise: PID 1's working directory, the container's /
            "--",
            "env",
            "-i",
            *EXEC_ENV,
        ]

    def running(self) -> bool:
        if self._pidfd is None:
            return False
        ready, _, _ = select.select([self._pidfd], [], [], 0)
        return not ready

    def stop(self, timeout: float = 30.0) -> None:
        """Kill PID 1 (the kernel then kills every process of the container) and wait
        until it is gone; the container's mounts go with its last process."""
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], timeout)
            finally:
                os.close(pidfd)
        proc, self._proc = self._proc, None
        if proc is not None:
            # unshare exits with its child; kill it in case PID 1 never got that far
            stop(proc, grace=0, kill_wait=timeout)
            if proc.stdout is not None:
                proc.stdout.close()
        self.pid = None

    def __enter__(self) -> Container:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
