"""The one way nestbed starts and stops programs (all but code running inside a guest or as
a container's PID 1, which cannot import it).

    run(argv, ...) -> Result      start, wait, capture; CommandFailed on a non-zero exit
    spawn(argv, ...) -> Process   start a long-running program (a Popen); end it with stop()
    stop(proc, grace)             SIGTERM -> wait `grace` -> SIGKILL, for its process group
    die_with_parent(sig)          PR_SET_PDEATHSIG for the calling process itself
    cmdline(argv) -> str          a command line as a shell would read it, for messages

Every child gets its own process group (so it and whatever it starts can be signalled at
once) and, unless told otherwise, dies with us (PR_SET_PDEATHSIG SIGKILL), also when we are
killed without a chance to clean up. Errors carry the command line and the tail of the
output. Each command line is logged at debug level on the `nestbed.proc` logger, so `-d`
shows what ran.

Callers need no `subprocess` import: PIPE, DEVNULL, STDOUT, TimeoutExpired and the Process
type are here.
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
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, TypeAlias

from nestbed import trace
from nestbed.errors import NestbedError

log = logging.getLogger(__name__)

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
TimeoutExpired = subprocess.TimeoutExpired
Process: TypeAlias = "subprocess.Popen[bytes]"
# what a child's stdin/stdout/stderr may be: PIPE, DEVNULL, STDOUT, a file, or None (ours)
Stream: TypeAlias = "int | IO[bytes] | None"
Argv: TypeAlias = "Sequence[str | os.PathLike[str]]"

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent ends (even by SIGKILL).

    `spawn()` and `run()` call it in each child between fork and exec (SIGKILL); a program
    that must clean up first calls it for itself with SIGTERM (the QEMU server does).
    """
    if _libc is None:
        return
    parent = os.getppid()
    _libc.prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died before prctl: nobody will send it
        os.kill(os.getpid(), sig)


class CommandFailed(NestbedError):
    """A command exited non-zero (or could not be started)."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        output: str,
        oserror: OSError | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        self.oserror = oserror  # why it could not be started
        status = "could not be started" if returncode is None else f"exited {returncode}"
        tail = output.strip().splitlines()[-1:] if output.strip() else []
        detail = f": {tail[0]}" if tail else ""
        super().__init__(f"{cmdline(argv)} {status}{detail}")

    @property
    def strerror(self) -> str:
        """The reason in a few words (`No such file or directory`), else the whole output."""
        return (self.oserror.strerror if self.oserror else None) or self.output


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes  # with stderr merged in when run(merge_stderr=True) or on_line was given
    stderr: bytes

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


def cmdline(argv: Argv) -> str:
    return shlex.join(os.fspath(a) for a in argv)


def spawn(
    argv: Argv,
    *,
    stdin: Stream = DEVNULL,
    stdout: Stream = DEVNULL,
    stderr: Stream = STDOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pass_fds: Collection[int] = (),
    new_session: bool = True,
    with_parent: bool = True,
) -> Process:
    """Start a program and return at once; end it with `stop()`.

    `new_session`: its own session and process group (False only for a program that needs
    our controlling terminal, an interactive shell). `with_parent`: it dies when we do
    (False for a program that must outlive us long enough to clean up after itself, as a
    virt server releasing its testbed when its stdin closes).
    """
    args = [os.fspath(a) for a in argv]
    log.debug("running %s", cmdline(args))
    if trace.enabled():
        trace.record("spawn", cmdline(args), time.monotonic())
    try:
        return subprocess.Popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            start_new_session=new_session,
            preexec_fn=die_with_parent if with_parent else None,
        )
    except OSError as e:
        raise CommandFailed(args, None, str(e), e) from None


def stop(
    proc: Process,
    grace: float = 10.0,
    *,
    term: Literal["group", "leader"] = "group",
    kill_wait: float | None = 30.0,
) -> int | None:
    """End `proc` and everything in its process group; returns its exit status (None when
    it outlived `kill_wait` seconds after SIGKILL, a process stuck in the kernel).

    SIGTERM first (to the whole group, or with `term="leader"` to `proc` only, for a
    program that ends its own children in order), SIGKILL to the group after `grace`
    seconds; `grace=0` kills at once.
    """
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if term == "group":
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutExpired):
            proc.wait(timeout=grace)
    # the group even when the leader is gone: what it started may still be there
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutExpired):
        proc.wait(timeout=kill_wait)
    return proc.poll()


def run(
    argv: Argv,
    *,
    check: bool = True,
    on_line: Callable[[str], None] | None = None,
    merge_stderr: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
) -> Result:
    """Run a command to completion and capture its output. With `on_line`, each line of its
    (merged) output is passed on as it arrives. Interrupted (Ctrl-C, a signal turned into an
    exception, `timeout`: TimeoutExpired), the whole process group is stopped before the
    exception goes on."""
    merged = merge_stderr or on_line is not None
    proc = spawn(
        argv,
        stdin=PIPE if input is not None else DEVNULL,
        stdout=PIPE,
        stderr=STDOUT if merged else PIPE,
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
        _close_pipes(proc)
        raise
    result = Result(tuple(os.fspath(a) for a in argv), proc.returncode, out, err or b"")
    if check and proc.returncode != 0:
        output = result.stdout_text + result.stderr_text
        raise CommandFailed(result.argv, proc.returncode, output)
    return result


def _close_pipes(proc: Process) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _follow(proc: Process, on_line: Callable[[str], None], timeout: float | None) -> bytes:
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
        proc.stdout.close()  # read to its end: nothing is left for anyone
    if expired.is_set():
        raise TimeoutExpired(cmdline(proc.args), timeout or 0.0)  # type: ignore[arg-type]
    return b"".join(chunks)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into another file system (a mount left in a chroot)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        run(["rm", "-rf", "--one-file-system", "--", path])
