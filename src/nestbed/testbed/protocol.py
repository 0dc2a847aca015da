"""The virt-server wire protocol: word quoting and the server framework.

The protocol is autopkgtest's (README.virtualisation-server): one command per line on the
server's stdin, one answer line on its stdout, words separated by whitespace and URL-quoted.
A server prints ``ok`` when it starts, answers ``ok [RESULT...]`` to a command that succeeded,
answers other words (``copy-failed``, ``timeout``) to a copy that failed while staying up, and
on any other error prints ``PROG: failure: MESSAGE`` on stderr, releases the testbed and exits
12.

A virt server is a subclass of `VirtServer` that fills in the hooks (`capabilities`,
`open_testbed`, `exec_prefix`, `close_testbed`, and optionally `revert_testbed`,
`reboot_testbed`, `copydown`, `copyup`, `shell`), plus a ``main`` that calls `run_server`.
Virt servers import nothing of the runner: only this module, `nestbed.errors`,
`nestbed.signals`, `nestbed.proc` and `nestbed.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO, ClassVar, NoReturn
from urllib.parse import quote, unquote

from nestbed import log, proc, trace
from nestbed.capabilities import Cap
from nestbed.signals import Interrupted, ShutdownOnSignals, die_of

# A server's exit table (VirtSubproc's): a protocol or testbed error, an internal error, and
# death by the signal it got. The numbers match the runner's 12 and 16 by autopkgtest's
# choice, not by meaning, so they are not the runner's constants.
EXIT_SERVER_FAILURE = 12
EXIT_SERVER_UNEXPECTED = 16

# Answers a server gives instead of `ok` when a copy fails but the testbed is still usable.
COPY_FAILED = "copy-failed"
COPY_TIMEOUT = "timeout"

# autopkgtest's servers read this; ours honour it so the one knob works for both.
COPY_TIMEOUT_ENV = "AUTOPKGTEST_VIRT_COPY_TIMEOUT"
DEFAULT_COPY_TIMEOUT = 300

_log = logging.getLogger(__name__)

# Signals after which a server releases its testbed and dies of the same signal.
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE)


def quote_word(word: str, safe: str = "/") -> str:
    """Quote one protocol word as autopkgtest does (`urllib.parse.quote`, '/' left alone).

    Undecodable file-name bytes (surrogate escapes) are quoted as the original bytes.
    """
    return quote(word, safe=safe, errors="surrogateescape")


def unquote_word(word: str) -> str:
    """Undo `quote_word`; bytes that are not UTF-8 come back as surrogate escapes (file names)."""
    return unquote(word, errors="surrogateescape")


def shell_script(cwd: str, env: Sequence[str]) -> str:
    """The `sh -c` script of an interactive shell in the testbed: bash in `cwd` (none when
    `cwd` is missing: cd says why), with the VAR=value `env` and the user's TERM."""
    script = f"cd {shlex.quote(cwd)} || exit; "
    for assignment in env:
        script += f"export {shlex.quote(assignment)}; "
    if "TERM" in os.environ:
        script += f"export TERM={shlex.quote(os.environ['TERM'])}; "
    return script + "exec bash -i"


def format_line(words: Sequence[str]) -> str:
    """A command or answer line from already-quoted words (no newline)."""
    return " ".join(words)


def parse_line(line: str) -> list[str]:
    """Split a line on whitespace and unquote every word, as VirtSubproc reads commands."""
    return [unquote_word(w) for w in line.split()]


def format_exec_prefix(argv: Sequence[str]) -> str:
    """The one word of a `print-execute-command` answer: quoted argv joined with ','."""
    return ",".join(quote_word(a) for a in argv)


def parse_exec_prefix(word: str) -> list[str]:
    """Inverse of `format_exec_prefix` (the word as read from the line, still quoted)."""
    return [unquote_word(a) for a in word.split(",")]


class ServerFailure(Exception):
    """Fatal for the server: the message goes to stderr, the testbed is released, exit 12."""


class CommandRefused(Exception):
    """A command failed but the server stays up; its answer line is `words` instead of `ok`."""

    def __init__(self, *words: str) -> None:
        super().__init__(" ".join(words))
        self.words = list(words)


class _CopyTimedOut(BaseException):
    """SIGALRM during a copy: a BaseException, to unwind through hooks' `except Exception`."""


class VirtServer:
    """Base of every virt server: the hooks, plus helpers that run things on the testbed.

    The framework keeps the protocol state; hooks may read `scratch` (None while closed).
    """

    #: name in messages: ``nestbed-virt-NAME: failure: ...``
    name: ClassVar[str] = "base"
    #: after the options in --help and the man page: what it is, and examples a user types
    help_epilog: ClassVar[str] = ""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.debug_enabled: bool = bool(getattr(args, "debug", False))
        self.scratch: str | None = None
        self._signals = ShutdownOnSignals(HANDLED_SIGNALS)

    # ---- options -------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this server's own options to the common parser."""

    # ---- hooks ---------------------------------------------------------------------------

    def capabilities(self) -> list[str]:
        """Capability words; may depend on whether the testbed is open (`scratch`)."""
        return []

    def open_testbed(self, scratch: str | None) -> str:
        """Start/reserve the testbed and create the scratch dir; return its testbed path.

        `scratch` is the path of the first open's scratch dir on a reopen: it must be reused,
        as built trees may refer to absolute paths (autopkgtest's rule).
        """
        raise NotImplementedError

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command on the open testbed (never empty)."""
        raise NotImplementedError

    def close_testbed(self) -> None:
        """Release everything the testbed holds, even after an `open_testbed` that failed
        half-way. Called at most once per open, also on quit, EOF, signals and errors."""
        raise NotImplementedError

    def revert_testbed(self, scratch: str) -> str:
        """Revert (only called when `revert` is advertised); return the scratch, same path."""
        raise ServerFailure("revert is not implemented by this server")

    def reboot_testbed(self) -> None:
        """Trigger a reboot (the default runs `reboot` in the background on the testbed)."""
        self.debug("rebooting testbed")
        systemd = self.execute(["test", "-d", "/run/systemd/system"], timeout=10)
        if systemd.returncode == 0:
            cmd = ["systemd-run", "--no-block", "--quiet", "sh", "-c", "sleep 3; reboot"]
            if self.execute(cmd, timeout=30).returncode == 0:
                return
        self.execute(["sh", "-c", "(sleep 3; reboot) >/dev/null 2>&1 &"], timeout=30)

    def wait_reboot(self) -> None:
        """Wait until the testbed is back after a reboot (servers advertising `reboot`)."""
        raise ServerFailure("reboot is not implemented by this server")

    def copydown(self, host: str, tb: str, is_dir: bool) -> None:
        """Copy host path to testbed path (paths without the trailing '/').

        The default streams through the exec prefix (cat for a file, tar for a tree, merging
        into an existing directory), which works for any testbed.
        """
        copy_via_exec(self, host, tb, is_dir, upwards=False)

    def copyup(self, tb: str, host: str, is_dir: bool) -> None:
        """Copy testbed path to host path; see `copydown`."""
        copy_via_exec(self, tb, host, is_dir, upwards=True)

    def shell(self, cwd: str, env: Sequence[str]) -> None:
        """Interactive shell on the controlling terminal, in `cwd`, with VAR=value `env`."""
        script = shell_script(cwd, env)
        try:
            with (
                open("/dev/tty", "rb") as tty_in,
                open("/dev/tty", "wb") as tty_out,
                open("/dev/tty", "wb") as tty_err,
            ):
                # our session, so the shell has the controlling terminal
                _start(
                    [*self.exec_prefix(), "sh", "-c", script],
                    stdin=tty_in,
                    stdout=tty_out,
                    stderr=tty_err,
                    new_session=False,
                ).wait()
        except OSError as e:
            # autopkgtest answers `ok` here too: a debugging aid must not break the run
            self.warn(f"cannot run shell: {e}")

    def debug_fail(self) -> str | None:
        """Diagnostics for the `auxverb_debug_fail` command (logged to stderr)."""
        return None

    # ---- helpers for hooks ---------------------------------------------------------------

    def critical(self) -> contextlib.AbstractContextManager[None]:
        """Defer signals and copy timeouts until the block is done (allocate-and-record)."""
        return self._signals.critical()

    # ``nestbed-virt-NAME: debug: ...`` and ``nestbed-virt-NAME: ...``, as `run_server`
    # sets up `nestbed.log`; lines of the modules a server uses (nestbed.proc's command
    # lines) come out the same way
    def debug(self, message: str) -> None:
        if self.debug_enabled:
            _log.debug(message)

    def warn(self, message: str) -> None:
        _log.warning(message)

    @staticmethod
    def _stderr(line: str) -> None:
        """A line that is whole already (``PROG: failure: ...``)."""
        _log.error(line, extra={"as_is": True})

    def execute(
        self, argv: Sequence[str], *, timeout: float | None = None, stdin: bytes | None = None
    ) -> proc.Result:
        """Run argv on the testbed, capturing output (bytes); a timeout is a ServerFailure."""
        real = [*self.exec_prefix(), *argv]
        self.debug(f"execute: {shlex.join(real)}")
        try:
            return proc.run(real, check=False, input=stdin, timeout=timeout)
        except proc.CommandFailed as e:  # could not be started: hooks expect the OSError
            raise e.oserror or e from None
        except proc.TimeoutExpired:
            raise ServerFailure(f"timed out after {timeout}s on testbed command {argv}") from None

    def check_exec(
        self, argv: Sequence[str], *, timeout: float | None = None, on_testbed: bool = True
    ) -> str:
        """Run argv (on the testbed or the host); it must exit 0 with no stderr. Returns
        stdout without its last newline."""
        if on_testbed:
            result = self.execute(argv, timeout=timeout)
        else:
            try:
                result = proc.run(argv, check=False, timeout=timeout)
            except proc.CommandFailed as e:
                raise e.oserror or e from None
            except proc.TimeoutExpired:
                raise ServerFailure(f"timed out after {timeout}s on {list(argv)}") from None
        err = result.stderr_text
        where = "(down) " if on_testbed else ""
        if result.returncode:
            raise ServerFailure(
                f"{where}{list(argv)} failed (exit status {result.returncode}, stderr {err!r})"
            )
        if err:
            raise ServerFailure(f"{list(argv)} unexpectedly produced stderr output `{err}'")
        out = result.stdout.decode("UTF-8", "surrogateescape")
        return out[:-1] if out.endswith("\n") else out

    def make_scratch(self, scratch: str | None) -> str:
        """Create the scratch dir on the testbed through the exec prefix (mode 1777, so the
        test user can write), or recreate `scratch` on a reopen."""
        if scratch:
            self.check_exec(["mkdir", "--mode=1777", "--parents", scratch])
            return scratch
        made = self.check_exec(["mktemp", "--directory", "--tmpdir", "nestbed.XXXXXX"])
        self.check_exec(["chmod", "1777", made])
        return made

    # reboot keeps the scratch dir across the reboot in a tarball, where autopkgtest keeps
    # it, so autopkgtest's in-testbed reboot-prepare script works with our servers unchanged
    _REBOOT_DIRS = "/var/cache /home"

    def save_scratch_for_reboot(self, scratch: str) -> None:
        script = (
            f"for d in {self._REBOOT_DIRS}; do if [ -w $d ]; then "
            "tar --warning=none --create --absolute-names "
            f'-f "$d/autopkgtest-tmpdir.tar" {shlex.quote(scratch)}; '
            "rm -f /run/autopkgtest-reboot-prepare-mark; exit 0; fi; done; exit 1"
        )
        self.check_exec(["sh", "-ec", script], timeout=copy_timeout())

    def restore_scratch_after_reboot(self) -> None:
        script = (
            f"for d in {self._REBOOT_DIRS}; do "
            'if [ -e "$d/autopkgtest-tmpdir.tar" ]; then '
            'tar --warning=none --extract --absolute-names -f "$d/autopkgtest-tmpdir.tar"; '
            'rm "$d/autopkgtest-tmpdir.tar"; exit 0; fi; done; exit 1'
        )
        self.check_exec(["sh", "-ec", script], timeout=copy_timeout())


def copy_timeout() -> int:
    """Seconds a copy may take ($AUTOPKGTEST_VIRT_COPY_TIMEOUT, default 300)."""
    try:
        return int(os.environ.get(COPY_TIMEOUT_ENV, DEFAULT_COPY_TIMEOUT))
    except ValueError:
        return DEFAULT_COPY_TIMEOUT


def copy_via_exec(server: VirtServer, src: str, dst: str, is_dir: bool, *, upwards: bool) -> None:
    """Copy between host and testbed by piping through the exec prefix.

    Files go through `cat` (the mode travels in-band for copyup, as a chmod for copydown);
    trees through tar, extracted with permissions kept and owned by whoever extracts them.
    Failure answers `copy-failed`; the framework's alarm answers `timeout`.
    """
    remote = dst if not upwards else src
    q = shlex.quote(remote)
    pre = server.exec_prefix()
    local_out: BinaryIO | None = None
    local_in: BinaryIO | None = None
    mode_line = False
    try:
        if not is_dir:
            if upwards:
                # first line is the mode, the rest the content: one round trip, no race
                rune = f"stat -L -c %a -- {q}; cat -- {q}"
                local_out = open(dst, "wb")  # noqa: SIM115 -- closed in finally
                mode_line = True
                cmds = [[*pre, "sh", "-ec", rune], None]
            else:
                local_in = open(src, "rb")  # noqa: SIM115 -- closed in finally
                mode = os.fstat(local_in.fileno()).st_mode & 0o7777
                rune = f"cat > {q}; chmod {mode:o} -- {q}"
                cmds = [None, [*pre, "sh", "-ec", rune]]
        else:
            create = "--warning=none --create --file=- ."
            extract = "--warning=none --preserve-permissions --no-same-owner --extract --file=-"
            if upwards:
                os.makedirs(dst, exist_ok=True)
                cmds = [
                    [*pre, "sh", "-ec", f"cd {q}; tar {create}"],
                    ["tar", "--directory", dst, *extract.split()],
                ]
            else:
                cmds = [
                    ["tar", "--directory", src, *create.split()],
                    [*pre, "sh", "-ec", f"mkdir -p -- {q}; cd {q}; tar {extract}"],
                ]
        _run_pipeline(server, cmds, local_in, local_out, mode_line, dst if upwards else None)
    except OSError as e:
        server.warn(f"copy {src} -> {dst} failed: {e}")
        raise CommandRefused(COPY_FAILED) from None
    finally:
        for f in (local_in, local_out):
            if f is not None:
                f.close()


def _run_pipeline(
    server: VirtServer,
    cmds: list[list[str] | None],
    local_in: BinaryIO | None,
    local_out: BinaryIO | None,
    mode_line: bool,
    host_file: str | None,
) -> None:
    source_argv, sink_argv = cmds
    procs: list[proc.Process] = []
    try:
        if source_argv is None:
            assert sink_argv is not None
            server.debug(f"copy: {shlex.join(sink_argv)} < file")
            procs.append(_start(sink_argv, stdin=local_in, stdout=proc.DEVNULL))
        elif sink_argv is None:
            server.debug(f"copy: {shlex.join(source_argv)} > file")
            src = _start(source_argv, stdin=proc.DEVNULL, stdout=proc.PIPE)
            procs.append(src)
            assert src.stdout is not None and local_out is not None
            mode = src.stdout.readline().strip() if mode_line else b""
            while chunk := src.stdout.read(1 << 16):
                local_out.write(chunk)
            if mode_line and host_file is not None and mode.isdigit():
                os.chmod(host_file, int(mode, 8))
        else:
            server.debug(f"copy: {shlex.join(source_argv)} | {shlex.join(sink_argv)}")
            src = _start(source_argv, stdin=proc.DEVNULL, stdout=proc.PIPE)
            procs.append(src)
            procs.append(_start(sink_argv, stdin=src.stdout, stdout=proc.DEVNULL))
            assert src.stdout is not None
            src.stdout.close()  # the sink holds the pipe now; lets the source see EPIPE
        # the sink first: it finishing is what makes the copy complete
        for i, step in reversed(list(enumerate(procs))):
            status = step.wait()
            # the source dying of SIGPIPE after the sink is done is not a failure
            if status != 0 and not (i == 0 and len(procs) == 2 and status == -signal.SIGPIPE):
                server.warn(f"copy command {step.args!r} failed with status {status}")
                raise CommandRefused(COPY_FAILED)
    finally:
        for step in procs:
            if step.poll() is None:
                proc.stop(step, grace=0, kill_wait=None)
            if step.stdout is not None:
                step.stdout.close()


def _start(
    argv: list[str],
    *,
    stdin: proc.Stream,
    stdout: proc.Stream,
    stderr: proc.Stream = None,
    new_session: bool = True,
) -> proc.Process:
    """`proc.spawn` for the framework's copies and shell, whose failure to start is an
    OSError (a copy then answers `copy-failed`). Its stderr is ours by default: the
    server's stderr, where the runner logs it."""
    try:
        return proc.spawn(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            new_session=new_session,
            with_parent=False,
        )
    except proc.CommandFailed as e:
        raise e.oserror or OSError(str(e)) from None


# ---- the main loop ----------------------------------------------------------------------


class _Quit(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _CommandDispatcher:
    """Protocol state and command dispatch for one server process."""

    def __init__(self, server: VirtServer, out: BinaryIO) -> None:
        self.server = server
        self.out = out
        self.scratch_first: str | None = None  # kept across close/open, as autopkgtest does
        self.may_hold: bool = False  # an open was started and not yet closed
        self.commands: dict[str, Callable[[list[str], list[str]], list[str] | None]] = {
            "capabilities": self.cmd_capabilities,
            "open": self.cmd_open,
            "close": self.cmd_close,
            "revert": self.cmd_revert,
            "reboot": self.cmd_reboot,
            "print_execute_command": self.cmd_print_execute_command,
            "copydown": self.cmd_copydown,
            "copyup": self.cmd_copyup,
            "shell": self.cmd_shell,
            "quit": self.cmd_quit,
            # autopkgtest's client sends this after a failure, to collect diagnostics
            "auxverb_debug_fail": self.cmd_auxverb_debug_fail,
        }

    # ---- plumbing ------------------------------------------------------------------------

    def send(self, words: Sequence[str]) -> None:
        self.out.write((format_line(words) + "\n").encode("UTF-8", "surrogateescape"))
        self.out.flush()

    @staticmethod
    def nargs(c: list[str], raw: list[str], required: int = 0, optional: int | None = 0) -> None:
        if len(c) < 1 + required:
            raise ServerFailure(f"too few arguments to command `{raw[0]}'")
        if optional is not None and len(c) > 1 + required + optional:
            raise ServerFailure(f"too many arguments to command `{raw[0]}'")

    def require_open(self, what: str) -> str:
        if self.server.scratch is None:
            raise ServerFailure(f"`{what}' when not open")
        return self.server.scratch

    def release(self) -> None:
        """Close the testbed if anything may be held; signals wait until it is done."""
        if not self.may_hold:
            return
        with self.server.critical():
            self.may_hold = False
            self.server.scratch = None
            self.server.close_testbed()

    def dispatch(self, line: str) -> None:
        raw = line.split()
        c = [unquote_word(w) for w in raw]
        self.server.debug(f"executing {line}")
        handler = self.commands.get(c[0].replace("-", "_"))
        if handler is None:
            raise ServerFailure(f"unknown command `{raw[0]}'")
        try:
            result = handler(c, raw)
        except CommandRefused as e:
            self.send(e.words)
            return
        self.send(["ok", *(result or [])])

    # ---- commands ------------------------------------------------------------------------

    def cmd_capabilities(self, c: list[str], raw: list[str]) -> list[str]:
        self.nargs(c, raw)
        # '=' stays readable: downtmp-host=PATH is read as is by older clients
        return [quote_word(cap, safe="/=") for cap in self.server.capabilities()]

    def cmd_open(self, c: list[str], raw: list[str]) -> list[str]:
        self.nargs(c, raw)
        if self.server.scratch is not None:
            raise ServerFailure("`open' when already open")
        self.may_hold = True
        scratch = self.server.open_testbed(self.scratch_first)
        self.check_same_scratch(scratch)
        self.server.scratch = self.scratch_first = scratch
        return [quote_word(scratch)]

    def check_same_scratch(self, scratch: str) -> None:
        if self.scratch_first and scratch != self.scratch_first:
            raise ServerFailure(
                f"virt server failed to restore scratch path {self.scratch_first}, "
                f"gave {scratch} instead"
            )

    def cmd_close(self, c: list[str], raw: list[str]) -> None:
        self.nargs(c, raw)
        self.require_open("close")
        self.release()

    def cmd_revert(self, c: list[str], raw: list[str]) -> list[str]:
        self.nargs(c, raw)
        scratch = self.require_open("revert")
        if Cap.REVERT not in self.server.capabilities():
            raise ServerFailure("`revert' when `revert' not advertised")
        new = self.server.revert_testbed(scratch)
        self.check_same_scratch(new)
        self.server.scratch = new
        return [quote_word(new)]

    def cmd_reboot(self, c: list[str], raw: list[str]) -> None:
        # autopkgtest's client sends `reboot prepare-only' when a test ran
        # autopkgtest-reboot-prepare: save state, let the test trigger the reboot itself.
        self.nargs(c, raw, 0, 1)
        scratch = self.require_open("reboot")
        if Cap.REBOOT not in self.server.capabilities():
            raise ServerFailure("`reboot' when `reboot' not advertised")
        self.server.save_scratch_for_reboot(scratch)
        if len(c) > 1 and c[1] == "prepare-only":
            self.server.warn("state saved, waiting for testbed to reboot...")
        else:
            self.server.reboot_testbed()
        self.server.wait_reboot()
        self.server.restore_scratch_after_reboot()
        # the code's answer is a bare `ok` (the doc's `ok SCRATCH` is not what clients expect)

    def cmd_print_execute_command(self, c: list[str], raw: list[str]) -> list[str]:
        self.nargs(c, raw)
        self.require_open("print-execute-command")
        return [format_exec_prefix(self.server.exec_prefix())]

    def copy_args(self, c: list[str], raw: list[str]) -> tuple[str, str, bool]:
        self.nargs(c, raw, 2)
        what = raw[0]
        if self.server.scratch is None:
            raise ServerFailure(f"{what} when not open")
        src, dst = c[1], c[2]
        if not src or not dst:
            raise ServerFailure(f"{what} paths must be nonempty")
        is_dir = src.endswith("/")
        if is_dir != dst.endswith("/"):
            raise ServerFailure(
                f"{what} paths must agree about directoryness (presence or absence of trailing /)"
            )
        return os.path.normpath(src), os.path.normpath(dst), is_dir

    def timed_copy(self, copy: Callable[[], None]) -> None:
        signal.setitimer(signal.ITIMER_REAL, copy_timeout())
        try:
            copy()
        except _CopyTimedOut:
            raise CommandRefused(COPY_TIMEOUT) from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def cmd_copydown(self, c: list[str], raw: list[str]) -> None:
        host, tb, is_dir = self.copy_args(c, raw)
        self.timed_copy(lambda: self.server.copydown(host, tb, is_dir))

    def cmd_copyup(self, c: list[str], raw: list[str]) -> None:
        tb, host, is_dir = self.copy_args(c, raw)
        self.timed_copy(lambda: self.server.copyup(tb, host, is_dir))

    def cmd_shell(self, c: list[str], raw: list[str]) -> None:
        self.nargs(c, raw, 1, None)
        self.require_open("shell")
        self.server.shell(c[1], c[2:])

    def cmd_quit(self, c: list[str], raw: list[str]) -> None:
        self.nargs(c, raw)
        # VirtSubproc exits without answering `quit'; clients just wait for the exit
        raise _Quit(0)

    def cmd_auxverb_debug_fail(self, c: list[str], raw: list[str]) -> None:
        self.nargs(c, raw)
        info = self.server.debug_fail()
        if info:
            self.server.warn(info)


def _redirect_stdio() -> tuple[BinaryIO, BinaryIO]:
    """Take the protocol channel off fds 0/1 so no child can read commands or write stray
    output into it: children get /dev/null as stdin and our stderr as stdout."""
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return proto_in, proto_out


def serve(server: VirtServer) -> int:
    """Run the protocol on stdin/stdout until quit, EOF, an error or a signal; return the
    exit status (a signal re-kills the process with that signal after releasing)."""
    prog = f"nestbed-virt-{server.name}"
    proto_in, proto_out = _redirect_stdio()
    dispatcher = _CommandDispatcher(server, proto_out)
    guard = server._signals
    signal.signal(signal.SIGALRM, lambda _signum, _frame: guard.deliver(_CopyTimedOut()))
    outcome: BaseException
    with guard:
        try:
            try:
                _main_loop(dispatcher, proto_in)
            finally:
                # from here signals are only noted: none may cut the release short (Python
                # runs handlers late, even after an EPIPE error)
                guard.finish()
        except BaseException as e:  # classified below; a late signal lands here too
            outcome = e
        signal.setitimer(signal.ITIMER_REAL, 0)
        code, message, signum = _exit_for(outcome, prog, server.debug_enabled)
        try:
            dispatcher.release()
        except BaseException as e:
            extra = f"{prog}: failure while releasing the testbed: {e}"
            message = f"{message}\n{extra}" if message else extra
            if not code:
                code = EXIT_SERVER_FAILURE
        if message:
            server._stderr(message)
        with contextlib.suppress(OSError):
            proto_out.close()
        if signum is not None:
            # die of the same signal, as the caller expects of a server it signalled
            return die_of(signum)
    return code


def _exit_for(outcome: BaseException, prog: str, debug: bool) -> tuple[int, str, int | None]:
    """The server's exit table: (status, message for stderr, signal to die of)."""
    if isinstance(outcome, _Quit):
        return outcome.code, outcome.message, None
    if isinstance(outcome, ServerFailure):
        return EXIT_SERVER_FAILURE, f"{prog}: failure: {outcome}", None
    if isinstance(outcome, Interrupted):
        return 0, "", outcome.signum
    if isinstance(outcome, BrokenPipeError):
        return 0, "", signal.SIGPIPE  # the client went away: same as its SIGPIPE
    if isinstance(outcome, _CopyTimedOut):
        return EXIT_SERVER_UNEXPECTED, f"{prog}: unexpected timeout", None
    # no traceback reaches a user; -d shows the type
    message = f"{prog}: unexpected error: {outcome}"
    if debug:
        message += f" ({type(outcome).__name__})"
    return EXIT_SERVER_UNEXPECTED, message, None


def _main_loop(dispatcher: _CommandDispatcher, proto_in: BinaryIO) -> NoReturn:
    dispatcher.send(["ok"])
    while True:
        raw_line = proto_in.readline()
        if not raw_line:
            raise ServerFailure("end of file - caller quit?")
        line = raw_line.decode("UTF-8", "surrogateescape").strip()
        if not line:
            continue  # blank lines are skipped, as VirtSubproc does
        with trace.span("server", line):
            dispatcher.dispatch(line)


def common_parser(name: str) -> argparse.ArgumentParser:
    """Options every server takes."""
    parser = argparse.ArgumentParser(
        prog=f"nestbed-virt-{name}",
        description="virt server for nestbed/autopkgtest (speaks the protocol on stdin/stdout)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-d", "--debug", action="store_true", help="enable debugging output")
    return parser


def server_parser(server_class: type[VirtServer]) -> argparse.ArgumentParser:
    """The common and the server's own options: what --help prints and the man page shows."""
    parser = common_parser(server_class.name)
    parser.epilog = server_class.help_epilog or None
    server_class.add_arguments(parser)
    return parser


def run_server(server_class: type[VirtServer], argv: Sequence[str] | None = None) -> NoReturn:
    """Parse the common and the server's own options, then serve; never returns."""
    trace.process_ready(f"nestbed-virt-{server_class.name}")
    parser = server_parser(server_class)
    args = parser.parse_args(argv)
    log.setup(f"nestbed-virt-{server_class.name}", log.PLAIN, debug=args.debug)
    try:
        server = server_class(args)
    except ServerFailure as e:
        _log.warning(str(e))
        sys.exit(1)
    sys.exit(serve(server))
