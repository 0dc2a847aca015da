"""The runner's side of the virt-server protocol: `Testbed`.

Works with nestbed's servers and autopkgtest's (`/usr/bin/autopkgtest-virt-*`). Every
protocol command has a deadline; a server that does not answer in time is killed, one that
dies is reported with its exit status and last stderr lines. Whatever happens, `release()`
releases the server process and pipes, so a `with Testbed(...)` block never leaks one.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import IO, NamedTuple, Protocol

from nestbed import trace
from nestbed.capabilities import SUGGESTED_NORMAL_USER, Cap, value_of
from nestbed.errors import TestbedFailure, UsageError, VirtServerError
from nestbed.guest.frameclient import Writer
from nestbed.proc import DEVNULL, PIPE, CommandFailed, Process, Stream, TimeoutExpired, spawn, stop
from nestbed.qemu import execclient
from nestbed.testbed.protocol import (
    COPY_TIMEOUT_ENV,
    format_line,
    parse_exec_prefix,
    quote_word,
    shell_script,
    unquote_word,
)

# Seconds a server gets to answer each command. Booting or reverting a VM is slow; the server
# bounds copies itself (300 s by default) and answers `timeout`, so ours are a backstop.
ANSWER_TIMEOUTS: dict[str, float | None] = {
    "banner": 300,
    "open": 3600,
    "revert": 3600,
    "reboot": 3600,
    "close": 600,
    "quit": 600,
    "capabilities": 300,
    "print-execute-command": 300,
    "copydown": 900,
    "copyup": 900,
}

# How long a server gets to exit by itself, then after SIGTERM, before SIGKILL.
_QUIT_GRACE = 10.0
_TERM_GRACE = 30.0

# Exit statuses by which the exec prefix itself says it failed (the protocol spec's rule).
_EXEC_PREFIX_FAILED = (254, 255)

_STDERR_TAIL = 20
# `PROG: failure: ...` (nestbed's servers), `PROG: error: ...`, autopkgtest's `ERROR:`
_SERVER_FAILURE = re.compile(r"\S+: (failure|unexpected error|error|ERROR):? ")
_SUMMARY_LINES = 7


class CommandTimeout(TestbedFailure):
    """A command on the testbed ran past its timeout and was killed."""


def _timed_out(timeout: float | None, argv: Sequence[str]) -> CommandTimeout:
    return CommandTimeout(f"timed out after {timeout:g}s on testbed command {shlex.join(argv)}")


class ExecResult(NamedTuple):
    returncode: int
    stdout: bytes
    stderr: bytes


class StreamedCommand(Protocol):
    """A command started by `Testbed.stream`: its output goes to the caller's writers as it
    comes. `wait` raises TimeoutExpired while it runs; `stop` ends it (SIGTERM, then after
    `grace` seconds it is killed; 0: at once)."""

    def wait(self, timeout: float | None = None) -> int: ...

    def stop(self, grace: float) -> None: ...


class _HereCommand:
    """Streamed through the multiplexer from this process: no helper started."""

    def __init__(self, here: execclient.HereStream, argv: Sequence[str]) -> None:
        self._here = here
        self._argv = list(argv)

    def wait(self, timeout: float | None = None) -> int:
        status = self._here.wait(timeout)
        if status is None:
            raise TimeoutExpired(self._argv, timeout or 0)
        return status

    def stop(self, grace: float) -> None:
        if grace > 0:
            self._here.signal(signal.SIGTERM)
            if self._here.wait(grace) is not None:
                return
        self._here.kill()


class _PrefixCommand:
    """Run by the exec prefix in a process of its own, its pipes pumped by two threads."""

    _PUMP_WAIT = 10.0  # a process that left the group may hold the pipes: do not wait for it

    def __init__(self, proc: Process, stdout: Writer, stderr: Writer) -> None:
        self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        self._pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, stdout), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, stderr), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def wait(self, timeout: float | None = None) -> int:
        returncode = self._proc.wait(timeout)
        for pump in self._pumps:
            pump.join(self._PUMP_WAIT)
        return returncode

    def stop(self, grace: float) -> None:
        stop(self._proc, grace=grace, kill_wait=None)


def _pump(src: IO[bytes], sink: Writer) -> None:
    with contextlib.suppress(OSError, ValueError):
        while chunk := src.read1(65536):  # type: ignore[attr-defined]
            sink(chunk)


# A testbed named without a path: nestbed's server of that name, else autopkgtest's (so
# `-- schroot CHROOT`, `-- lxc ...`, `-- ssh ...` work as with autopkgtest); a name that
# already carries either prefix is taken as it is.
VIRT_PREFIXES = ("nestbed-virt-", "autopkgtest-virt-")


def resolve_virt_server(name: str) -> list[str]:
    """argv of the server for `name`: ``null`` -> nestbed-virt-null, else autopkgtest-virt-null;
    each first from the bin dir of this Python, then from PATH. ``autopkgtest-virt-NAME`` and
    ``nestbed-virt-NAME`` name that program; a value with '/' is a path used as given.

    The bin dir comes first: it is the same installation as the running runner, where PATH
    may hold another checkout's or an older release's script.
    """
    if "/" in name:
        return [name]
    if name.startswith(VIRT_PREFIXES):
        candidates = [name]
    else:
        candidates = [prefix + name for prefix in VIRT_PREFIXES]
    bindir = os.path.dirname(sys.executable)
    for prog in candidates:
        beside = os.path.join(bindir, prog)
        if os.path.isfile(beside) and os.access(beside, os.X_OK):
            return [beside]
        found = shutil.which(prog)
        if found:
            return [found]
    raise UsageError(
        f"unknown virt server '{name}': no {' nor '.join(candidates)} in {bindir} nor in PATH"
    )


class _LineReader:
    """Reads lines from a pipe with a deadline (the stdlib's readline cannot time out)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        self.buf = b""
        self.eof = False

    def readline(self, deadline: float | None) -> bytes | None:
        """A line with its newline; at EOF what is left (maybe b""); None at the deadline."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self.buf:
            if self.eof:
                rest, self.buf = self.buf, b""
                return rest
            if deadline is None:
                wait_ms: int | None = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait_ms = max(1, int(left * 1000))
            if not poller.poll(wait_ms):
                continue  # the loop rechecks the deadline
            chunk = os.read(self.fd, 65536)
            if chunk:
                self.buf += chunk
            else:
                self.eof = True
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


def su_argv(user: str, command: str, *, shell: str = "/bin/sh") -> list[str]:
    """argv that runs the shell command line `command` as `user` on the testbed. The one way
    nestbed switches user there: su, as autopkgtest does, so a test gets a login session (and
    PAM's environment) as root or as the normal user alike."""
    return ["su", "-s", shell, user, "-c", command]


class Testbed:
    """A virt server process and the testbed it gives access to.

    `log` receives debug lines (with `debug`); `server_stderr` every line the server writes
    to stderr (default: `log`, else our stderr). Both are called from a reader thread too.
    `env` adds variables to the server's environment (hints such as NESTBED_WANT_BASEIMAGE).
    `copy_timeout` is the seconds the server gives a copy: it reads them from its
    environment, as autopkgtest's servers do, and so do the exec prefix's commands, as
    under autopkgtest, whose runner exports it to everything it starts.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        debug: bool = False,
        log: Callable[[str], None] | None = None,
        server_stderr: Callable[[str], None] | None = None,
        env: Mapping[str, str] | None = None,
        copy_timeout: int | None = None,
    ) -> None:
        if not argv:
            raise UsageError("no virt server given")
        self.argv = list(argv)
        self._command_env: dict[str, str] = {}
        if copy_timeout is not None:
            self._command_env[COPY_TIMEOUT_ENV] = str(copy_timeout)
        self.env = {**(env or {}), **self._command_env}
        self.debug = debug
        self._log = log
        self._server_stderr = server_stderr or log
        self.caps: frozenset[str] = frozenset()
        self.exec_prefix: list[str] = []
        # the exec prefix is nestbed's own helper: captured commands go through its
        # multiplexer socket from this process (nestbed.qemu.execclient.run_here)
        self._helper_socket: str | None = None
        self.normal_user: str | None = None
        self._scratch: str | None = None
        self._proc: Process | None = None
        self._reader: _LineReader | None = None
        self._stderr_thread: threading.Thread | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        # a command is in flight, or the protocol is out of step: no polite quit possible
        self._busy = False
        self._broken = False

    # ---- state -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0])

    @property
    def is_open(self) -> bool:
        return self._scratch is not None

    @property
    def scratch(self) -> str:
        """The testbed's scratch dir; only while open."""
        if self._scratch is None:
            raise TestbedFailure("the testbed is not open")
        return self._scratch

    def _debug(self, message: str) -> None:
        if self.debug and self._log is not None:
            self._log(message)

    def _server_said(self, line: str) -> None:
        self._stderr_tail.append(line)
        if self._server_stderr is not None:
            self._server_stderr(line)
        else:
            # as autopkgtest lets its server write to the terminal
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line + "\n")

    def _drain_stderr(self, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(stream.readline, b""):
                self._server_said(raw.decode("UTF-8", "replace").rstrip("\n"))

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait for its `ok` banner."""
        if self._proc is not None:
            raise TestbedFailure("the virt server is already started")
        self._debug(f"starting virt server: {shlex.join(self.argv)}")
        try:
            # its own session: a Ctrl-C reaches us, and we shut the server down in order; it
            # outlives us when we are killed, to release the testbed when its stdin closes
            self._proc = spawn(
                self.argv,
                stdin=PIPE,
                stdout=PIPE,
                stderr=PIPE,
                env={**os.environ, **self.env} if self.env else None,
                with_parent=False,
            )
        except CommandFailed as e:
            raise TestbedFailure(f"cannot start virt server {self.argv[0]}: {e.strerror}") from None
        try:
            assert self._proc.stdout is not None and self._proc.stderr is not None
            self._reader = _LineReader(self._proc.stdout)
            self._stderr_thread = threading.Thread(
                target=self._drain_stderr, args=(self._proc.stderr,), daemon=True
            )
            self._stderr_thread.start()
            words = self._read_answer("banner", None, ANSWER_TIMEOUTS["banner"])
            if not words or words[0] != "ok":
                self._broken = True
                raise VirtServerError(
                    f"virt server {self.name}: got banner `{' '.join(words)}', expected `ok'"
                )
        except BaseException:
            self.release()
            raise

    def open(self, timeout: float | None = None) -> str:
        """Open the testbed; return its scratch dir. Then learns the exec prefix and the
        capabilities, which autopkgtest's client also asks for after each open."""
        if self._scratch is not None:
            return self._scratch
        words = self._command("open", (), 1, timeout, ANSWER_TIMEOUTS["open"])
        self._scratch = unquote_word(words[0])
        self._after_open()
        return self._scratch

    def _after_open(self) -> None:
        word = self._command("print-execute-command", (), None, None, None)
        if not word:
            raise VirtServerError(f"virt server {self.name} gave an empty execute command")
        # split before unquoting: an argument may contain a (quoted) ','
        self.exec_prefix = parse_exec_prefix(word[0])
        self._helper_socket = execclient.socket_of(self.exec_prefix)
        words = self._capability_words()
        self.caps = frozenset(words)
        # the first one the server lists is its preferred user
        self.normal_user = value_of(SUGGESTED_NORMAL_USER, words)
        self._debug(f"testbed capabilities: {' '.join(words)}")

    def _capability_words(self, timeout: float | None = None) -> list[str]:
        words = self._command("capabilities", (), None, timeout, None)
        # autopkgtest's servers repeat `ok' once per earlier query: not a capability
        return [unquote_word(w) for w in words if w != "ok"]

    def query_capabilities(self, timeout: float | None = None) -> frozenset[str]:
        """Ask the server for its capabilities (valid open or closed)."""
        return frozenset(self._capability_words(timeout))

    def revert(self, timeout: float | None = None) -> str:
        """Revert the testbed (servers advertising `revert`); returns the scratch dir."""
        self._require_open("revert")
        if Cap.REVERT not in self.caps:
            raise TestbedFailure(f"virt server {self.name} cannot revert the testbed")
        words = self._command("revert", (), 1, timeout, None)
        self._scratch = unquote_word(words[0])
        self._after_open()
        return self._scratch

    def reboot(self, prepare_only: bool = False, timeout: float | None = None) -> None:
        """Reboot the testbed, keeping the scratch dir. With `prepare_only` the server only
        saves state: the test (autopkgtest-reboot-prepare) triggers the reboot itself."""
        self._require_open("reboot")
        if Cap.REBOOT not in self.caps:
            raise TestbedFailure(f"virt server {self.name} cannot reboot the testbed")
        args = ("prepare-only",) if prepare_only else ()
        # VirtSubproc answers a bare `ok' (its doc says `ok SCRATCH'): accept both
        self._command("reboot", args, None, timeout, None)

    def close(self, timeout: float | None = None) -> None:
        """Close the testbed (idempotent)."""
        if self._scratch is None:
            return
        try:
            if self._usable():
                self._command("close", (), 0, timeout, None)
        finally:
            self._scratch = None
            self.exec_prefix = []
            self._helper_socket = None
            self.caps = frozenset()
            self.normal_user = None

    def quit(self, timeout: float | None = None) -> None:
        """Close, tell the server to quit and wait for it; a non-zero exit is a failure."""
        if self._proc is None:
            return
        try:
            self.close()
            status = self._proc.poll()
            if status is not None and status != 0 and not self._broken:
                # it died between commands: nobody has reported that yet
                self._join_stderr()
                raise VirtServerError(
                    f"virt server {self.name} exited unexpectedly with status {status}"
                    + self._stderr_summary()
                )
            if self._usable():
                self._send("quit")  # VirtSubproc exits without answering
                self._close_stdin()
                limit = ANSWER_TIMEOUTS["quit"] if timeout is None else timeout
                try:
                    status = self._proc.wait(limit)
                except TimeoutExpired:
                    raise TestbedFailure(
                        f"virt server {self.name} did not exit within {limit:g}s after quit"
                    ) from None
                if status != 0:
                    self._join_stderr()
                    raise VirtServerError(
                        f"virt server {self.name} gave exit status {status} after quit"
                        + self._stderr_summary()
                    )
        finally:
            self.release()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.quit()
        else:
            self.release()

    def release(self) -> None:
        """Release the server whatever state it is in; never raises."""
        proc, self._proc = self._proc, None
        self._scratch = None
        self.exec_prefix = []
        self._helper_socket = None
        self.caps = frozenset()
        self.normal_user = None
        if proc is None:
            return
        try:
            if proc.poll() is None and not self._busy and not self._broken:
                # our servers and autopkgtest's release the testbed on quit
                with contextlib.suppress(OSError, ValueError):
                    assert proc.stdin is not None
                    proc.stdin.write(b"quit\n")
                    proc.stdin.flush()
                with contextlib.suppress(TimeoutExpired):
                    proc.wait(_QUIT_GRACE)
            if proc.poll() is None:
                # both kinds of server release the testbed on SIGTERM too
                stop(proc, grace=_TERM_GRACE, term="leader", kill_wait=None)
        except Exception as e:  # a cleanup must not hide the error that led to it
            self._debug(f"cleanup of virt server: {e}")
        finally:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()
            self._join_stderr()
            if proc.stderr is not None:
                with contextlib.suppress(OSError, ValueError):
                    proc.stderr.close()
            self._reader = None
            self._busy = False
            self._broken = False

    # ---- protocol --------------------------------------------------------------------------

    def _usable(self) -> bool:
        return (
            self._proc is not None
            and self._proc.poll() is None
            and not self._broken
            and not self._busy
        )

    def _require_open(self, what: str) -> None:
        if self._scratch is None:
            raise TestbedFailure(f"cannot {what}: the testbed is not open")

    def _send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise TestbedFailure(f"virt server {self.name} is not running")
        self._debug(f"virt> {line}")
        try:
            proc.stdin.write((line + "\n").encode("UTF-8", "surrogateescape"))
            proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._died(line.split()[0]) from None

    def _close_stdin(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()

    def _command(
        self,
        cmd: str,
        args: Sequence[str],
        nresults: int | None,
        timeout: float | None,
        default_timeout: float | None,
    ) -> list[str]:
        """Send one command, return its results still quoted. `default_timeout` None means
        the command's entry in ANSWER_TIMEOUTS."""
        if self._proc is None:
            raise TestbedFailure(f"cannot {cmd}: virt server {self.name} is not running")
        if self._broken:
            raise TestbedFailure(f"cannot {cmd}: virt server {self.name} is out of step")
        if timeout is None:
            timeout = default_timeout if default_timeout is not None else ANSWER_TIMEOUTS[cmd]
        line = format_line([cmd, *(quote_word(a) for a in args)])
        self._busy = True
        with trace.span("virt", line):
            self._send(line)
            words = self._read_answer(cmd, line, timeout)
        self._busy = False
        if not words or words[0] != "ok":
            answer = " ".join(words)
            raise VirtServerError(f"virt server {self.name} answered `{line}' with `{answer}'")
        results = words[1:]
        if nresults is not None and len(results) != nresults:
            self._broken = True
            raise VirtServerError(
                f"virt server {self.name} answered `{line}' with `{' '.join(words)}'"
                f" ({len(results)} results, expected {nresults})"
            )
        return results

    def _read_answer(self, cmd: str, sent: str | None, timeout: float | None) -> list[str]:
        assert self._reader is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        raw = self._reader.readline(deadline)
        if raw is None:
            self._broken = True
            self._kill()
            raise TestbedFailure(
                f"virt server {self.name} did not answer `{cmd}' within {timeout:g}s"
                " (stopped it)" + self._stderr_summary()
            )
        if not raw.endswith(b"\n"):
            raise self._died(cmd)
        line = raw.decode("UTF-8", "surrogateescape").rstrip("\n")
        self._debug(f"virt< {line}")
        return line.split()

    def _kill(self) -> None:
        """Stop a server that is out of step: SIGTERM first, as servers release their
        testbed (a VM, a container) on it, then SIGKILL for its whole process group."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        stop(proc, grace=_QUIT_GRACE, term="leader", kill_wait=_QUIT_GRACE)

    def _died(self, cmd: str) -> TestbedFailure:
        """The server closed its stdout: collect how it ended, for the message."""
        self._broken = True
        proc = self._proc
        assert proc is not None
        try:
            status = proc.wait(_QUIT_GRACE)
        except TimeoutExpired:
            self._kill()
            status = proc.wait()
        self._join_stderr()
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return VirtServerError(
            f"virt server {self.name} {how} during `{cmd}'" + self._stderr_summary()
        )

    def _join_stderr(self) -> None:
        if self._stderr_thread is not None:
            # the server may leave a child holding its stderr: do not wait for that
            self._stderr_thread.join(2.0)

    def _stderr_summary(self) -> str:
        """The server's own failure line and what follows it (a console's tail), else its
        last three lines: a long explanation must not push out the line that says why."""
        lines = [line for line in self._stderr_tail if line.strip()]
        starts = [i for i, line in enumerate(lines) if _SERVER_FAILURE.match(line)]
        tail = lines[starts[-1] :][:_SUMMARY_LINES] if starts else lines[-3:]
        return (": " + " | ".join(tail)) if tail else ""

    # ---- using the testbed -----------------------------------------------------------------

    def _exec_env(self) -> dict[str, str] | None:
        return {**os.environ, **self._command_env} if self._command_env else None

    def _wrap(
        self, argv: Sequence[str], env: Mapping[str, str] | None, user: str | None
    ) -> list[str]:
        cmd = list(argv)
        if env:
            cmd = ["env", *(f"{k}={v}" for k, v in env.items()), *cmd]
        if user is not None:
            # su takes a shell command line; the environment goes inside, as su resets some
            cmd = su_argv(user, shlex.join(cmd))
        return [*self.exec_prefix, *cmd]

    def execute(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        capture: bool = True,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run argv on the testbed and wait. Without `capture` its output goes to ours.

        Exit 254/255 is the exec prefix failing, a TestbedFailure; running past `timeout`
        kills the local process group and raises CommandTimeout.
        """
        self._require_open("execute a command")
        real = self._wrap(argv, env, user)
        self._debug(f"execute: {shlex.join(real)}")
        started = time.monotonic()
        if self._helper_socket is not None and capture:
            returncode, out, err = self._execute_here(real, stdin, timeout, argv)
        else:
            returncode, out, err = self._execute_by_prefix(real, stdin, timeout, capture, argv)
        if trace.enabled():
            trace.record("exec", shlex.join(argv), started, time.monotonic())
        if returncode in _EXEC_PREFIX_FAILED:
            detail = err.decode("UTF-8", "replace").strip().splitlines()[-3:]
            raise TestbedFailure(
                f"testbed exec prefix failed with exit status {returncode}"
                f" running {shlex.join(argv)}" + (": " + " | ".join(detail) if detail else "")
            )
        return ExecResult(returncode, out, err)

    def _execute_here(
        self, real: list[str], stdin: bytes | None, timeout: float | None, argv: Sequence[str]
    ) -> tuple[int, bytes, bytes]:
        """The exec helper's work done in this process (saves starting it)."""
        assert self._helper_socket is not None
        out, err = bytearray(), bytearray()
        command = real[len(self.exec_prefix) :]
        try:
            status = execclient.run_here(
                self._helper_socket, command, stdin=stdin, out=out.extend, err=err.extend,
                timeout=timeout,
            )  # fmt: skip
        except TimeoutError:
            raise _timed_out(timeout, argv) from None
        return status, bytes(out), bytes(err)

    def _execute_by_prefix(
        self,
        real: list[str],
        stdin: bytes | None,
        timeout: float | None,
        capture: bool,
        argv: Sequence[str],
    ) -> tuple[int, bytes, bytes]:
        pipe = PIPE if capture else None
        proc = self._spawn_exec(
            real, stdin=PIPE if stdin is not None else DEVNULL, stdout=pipe, stderr=pipe
        )
        try:
            out, err = proc.communicate(stdin, timeout)
        except TimeoutExpired:
            stop(proc, grace=0, kill_wait=None)
            # a process that left our group may still hold the pipes: do not wait for it
            with contextlib.suppress(TimeoutExpired):
                proc.communicate(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            raise _timed_out(timeout, argv) from None
        except BaseException:
            stop(proc, grace=0, kill_wait=None)
            raise
        return proc.returncode, out or b"", err or b""

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdin: Stream = DEVNULL,
        stdout: Stream = None,
        stderr: Stream = None,
    ) -> Process:
        """Start exec prefix + argv in its own process group (end it with nestbed.proc.stop);
        a stream left None is ours."""
        self._require_open("start a command")
        real = [*self.exec_prefix, *argv]
        self._debug(f"popen: {shlex.join(real)}")
        return self._spawn_exec(real, stdin=stdin, stdout=stdout, stderr=stderr)

    def stream(self, argv: Sequence[str], *, stdout: Writer, stderr: Writer) -> StreamedCommand:
        """Start exec prefix + argv with no stdin, its output to `stdout` and `stderr` as it
        comes; through the multiplexer from this process when the prefix is nestbed's helper."""
        self._require_open("start a command")
        real = [*self.exec_prefix, *argv]
        self._debug(f"stream: {shlex.join(real)}")
        if self._helper_socket is not None:
            here = execclient.HereStream(
                self._helper_socket, list(argv), stdin=None, out=stdout, err=stderr
            )
            return _HereCommand(here, argv)
        proc = self._spawn_exec(real, stdin=DEVNULL, stdout=PIPE, stderr=PIPE)
        return _PrefixCommand(proc, stdout, stderr)

    def _spawn_exec(
        self, real: list[str], *, stdin: Stream, stdout: Stream, stderr: Stream
    ) -> Process:
        # not with_parent: when we die, the server ends its commands as it releases the testbed
        try:
            return spawn(
                real,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=self._exec_env(),
                with_parent=False,
            )
        except CommandFailed as e:
            raise TestbedFailure(
                f"cannot run the testbed's exec prefix {self.exec_prefix[0]}: {e.strerror}"
            ) from None

    def shell(self, cwd: str, env: Sequence[str] = ()) -> str | None:
        """An interactive shell in the testbed on the user's terminal, in `cwd` with the
        VAR=value `env`; returns when the user leaves it. None, or why there was no shell.

        Run here, not by the server's `shell` command: the server has a session of its own,
        without our terminal. The shell gets our process group, so the terminal's job control
        (Ctrl-C, Ctrl-Z) is the shell's while it runs.
        """
        self._require_open("run a shell")
        if not sys.stdin.isatty():
            return "stdin is not a terminal"
        script = shell_script(cwd, env)
        try:
            with open("/dev/tty", "rb") as tty_in, open("/dev/tty", "wb") as tty_out:
                proc = spawn(
                    [*self.exec_prefix, "sh", "-c", script],
                    stdin=tty_in,
                    stdout=tty_out,
                    stderr=tty_out,
                    env=self._exec_env(),
                    new_session=False,
                    with_parent=False,
                )
                try:
                    proc.wait()
                except BaseException:
                    # not proc.stop: the shell shares our process group, which must live
                    with contextlib.suppress(OSError):
                        proc.kill()
                    with contextlib.suppress(TimeoutExpired):
                        proc.wait(5)
                    raise
        except (OSError, CommandFailed) as e:
            return f"cannot run a shell: {e}"
        return None

    def copydown(self, host: str, tb: str, timeout: float | None = None) -> None:
        """Copy a host file or tree to the testbed; a tree has '/' at the end of both paths."""
        self._copy("copydown", host, tb, timeout)

    def copyup(self, tb: str, host: str, timeout: float | None = None) -> None:
        """Copy a testbed file or tree to the host; a tree has '/' at the end of both paths."""
        self._copy("copyup", tb, host, timeout)

    def _copy(self, cmd: str, src: str, dst: str, timeout: float | None) -> None:
        self._require_open(cmd)
        if not src or not dst or src.endswith("/") != dst.endswith("/"):
            # the server would treat this as fatal and take the testbed down: catch it here
            raise ValueError(f"{cmd} {src!r} {dst!r}: both paths or neither must end in '/'")
        try:
            self._command(cmd, (src, dst), 0, timeout, None)
        except VirtServerError as e:
            if self._broken:
                raise
            raise VirtServerError(f"{cmd} of {src} to {dst} failed: {e}") from None
