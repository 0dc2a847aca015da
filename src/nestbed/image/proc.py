"""The one way nestbed's image and QEMU code start programs.

`run()` waits for a command; `spawn()`/`stop()` manage a long-running one. Every child gets
its own process group (so it and everything it starts can be signalled at once) and dies
with us (PR_SET_PDEATHSIG), also when we are killed without a chance to clean up. Errors
carry the command line and the tail of its output.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nestbed.errors import NestbedError

log = logging.getLogger("nestbed.proc")

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)


class CommandFailed(NestbedError):
    """A command exited non-zero (or could not be started)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, output: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        status = "could not be started" if returncode is None else f"exited {returncode}"
        tail = output.strip().splitlines()[-1:] if output.strip() else []
        detail = f": {tail[0]}" if tail else ""
        super().__init__(f"{cmdline(argv)} {status}{detail}")


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str  # with stderr merged in when run(merge_stderr=True) or on_line was given
    stderr: str


def cmdline(argv: Sequence[str | os.PathLike[str]]) -> str:
    return shlex.join(os.fspath(a) for a in argv)


def _popen(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: int | IO[bytes] | None,
    stdout: int | IO[bytes] | None,
    stderr: int | IO[bytes] | None,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
) -> subprocess.Popen[bytes]:
    args = [os.fspath(a) for a in argv]
    log.debug("running %s", cmdline(args))
    try:
        return subprocess.Popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except OSError as e:
        raise CommandFailed(args, None, str(e)) from None


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
    """SIGTERM the process group, SIGKILL it after `grace` seconds; returns the exit status."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    # whatever is left in the group (the leader may be gone already)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.STDOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running program in its own process group; end it with `stop()`."""
    return _popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env, cwd=cwd)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    on_line: Callable[[str], None] | None = None,
    merge_stderr: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
) -> Result:
    """Run a command to completion. With `on_line`, each line of its (merged) output is
    passed on as it arrives. Interrupted (Ctrl-C, SIGTERM turned into KeyboardInterrupt,
    timeout), the whole process group is stopped before the exception goes on."""
    merged = merge_stderr or on_line is not None
    proc = _popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    try:
        if on_line is None:
            out, err = proc.communicate(input, timeout=timeout)
        else:
            out, err = _follow(proc, on_line, timeout), b""
    except BaseException:
        stop(proc, grace=5.0)
        raise
    stdout = out.decode("utf-8", "replace")
    stderr = (err or b"").decode("utf-8", "replace")
    result = Result(tuple(os.fspath(a) for a in argv), proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise CommandFailed(result.argv, proc.returncode, stdout + stderr)
    return result


def _follow(
    proc: subprocess.Popen[bytes], on_line: Callable[[str], None], timeout: float | None
) -> bytes:
    assert proc.stdout is not None
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        stop(proc, grace=5.0)

    timer = threading.Timer(timeout, expire) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    chunks: list[bytes] = []
    try:
        for raw in proc.stdout:
            chunks.append(raw)
            on_line(raw.decode("utf-8", "replace").rstrip("\n"))
        proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
    if expired.is_set():
        raise subprocess.TimeoutExpired(cmdline(proc.args), timeout or 0.0)  # type: ignore[arg-type]
    return b"".join(chunks)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into another file system (a mount left in a chroot)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        run(["rm", "-rf", "--one-file-system", "--", path])
