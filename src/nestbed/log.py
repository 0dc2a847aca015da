"""Every line nestbed's programs print about themselves: one mechanism, stdlib `logging`.

Library code logs as usual, ``log = logging.getLogger(__name__)`` (a name under
``nestbed.``); each entry point calls `setup()` once with its program name, its line style
and whether to show debug lines. Two styles, one per audience:

AUTOPKGTEST (``nestbed``, ``nestbed image``: where autopkgtest users read)
    ``PROG [HH:MM:SS]: message``, ``PROG [HH:MM:SS]: ERROR: message``,
    ``PROG: WARNING: message``, ``PROG: DBG: message``
PLAIN (``nestbed-vm``, every ``nestbed-virt-*``)
    ``PROG: message`` (info and warnings), ``PROG: error: message``, ``PROG: debug: message``

A record may name its own program and style (``extra={"prog": ..., "style": ...}``): the
image builder's progress lines say ``nestbed [HH:MM:SS]:`` whichever program builds.
``extra={"as_is": True}`` prints a message that is already a whole line.

Until `setup()` runs, lines go to stderr in the AUTOPKGTEST style at INFO, so nothing said
before an entry point has parsed its options (or by code used as a library) is lost.

The runner's `Console` is its facade: test output passes through it unchanged, and with a
log file (``-l``, or ``log`` in the output directory) everything on stdout and stderr,
these lines too, is copied there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, Literal

# the runner's verbosity levels (-q, default, -d)
QUIET, INFO, DEBUG = 0, 1, 2

Style = Literal["autopkgtest", "plain"]
AUTOPKGTEST: Style = "autopkgtest"
PLAIN: Style = "plain"

ROOT = "nestbed"  # the logger every nestbed module's logger is below


def program_name() -> str:
    name = os.path.basename(sys.argv[0])
    # `python -m nestbed` runs as __main__.py: the program is still nestbed
    return "nestbed" if name in ("", "__main__.py", "-c") else name


class LineFormatter(logging.Formatter):
    """One record as one line of the program's style (no newline)."""

    def __init__(self, prog: str, style: Style) -> None:
        super().__init__()
        self.prog = prog
        self.style = style

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if getattr(record, "as_is", False):
            return text
        prog: str = getattr(record, "prog", self.prog)
        style: Style = getattr(record, "style", self.style)
        level = record.levelno
        if style == PLAIN:
            if level >= logging.ERROR:
                return f"{prog}: error: {text}"
            if level >= logging.INFO:
                return f"{prog}: {text}"
            return f"{prog}: debug: {text}"
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        if level >= logging.ERROR:
            return f"{prog} [{stamp}]: ERROR: {text}"
        if level >= logging.WARNING:
            return f"{prog}: WARNING: {text}"
        if level >= logging.INFO:
            return f"{prog} [{stamp}]: {text}"
        return f"{prog}: DBG: {text}"


def write_stderr(data: bytes) -> None:
    """To our stderr as it is now (a test's capture, rich's live display); never raises."""
    stream = sys.stderr
    with contextlib.suppress(OSError, ValueError):
        if isinstance(stream, io.TextIOWrapper):
            stream.flush()
            stream.buffer.write(data)
            stream.buffer.flush()
        else:  # a proxy, as rich's live display puts there to print above itself
            stream.write(data.decode("UTF-8", "replace"))
            stream.flush()


class LineHandler(logging.Handler):
    """Formatted lines, each with its newline, handed to `sink` (stderr by default)."""

    def __init__(self, formatter: LineFormatter, sink: Callable[[bytes], None] | None) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.sink = sink or write_stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self.sink(line.encode("UTF-8", "replace"))


def shown_level(*, debug: bool, quiet: bool) -> int:
    """The least level of the lines shown: debug lines only with `debug`, no info with `quiet`."""
    return logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO


_handler: LineHandler | None = None
_setup_lock = threading.Lock()


def setup(
    prog: str,
    style: Style = AUTOPKGTEST,
    *,
    debug: bool = False,
    quiet: bool = False,
    sink: Callable[[bytes], None] | None = None,
) -> logging.Logger:
    """Route every ``nestbed.*`` logger to one handler: `prog`'s lines in `style`, on
    stderr or into `sink`; debug lines only with `debug`, no info lines with `quiet`.
    Called again (a test, the runner's Console), it replaces the previous setup.
    Returns the ``nestbed`` logger."""
    global _handler
    root = logging.getLogger(ROOT)
    handler = LineHandler(LineFormatter(prog, style), sink)
    with _setup_lock:
        if _handler is not None:
            root.removeHandler(_handler)
        _handler = handler
        root.addHandler(handler)
        root.setLevel(shown_level(debug=debug, quiet=quiet))
        root.propagate = False  # our lines are ours; a library's own logging is not touched
    return root


setup(program_name())


class Console:
    """The run's stdout and stderr, each copied into the log file when there is one.

    Creating it sets up logging for the run (`setup()`): its `info`/`error`/`warning`/
    `debug` lines, and every nestbed module's, come out in the autopkgtest style through
    `write_stderr`, so into the log file too.
    """

    def __init__(self, verbosity: int = INFO) -> None:
        self.verbosity = verbosity
        self.prog = program_name()
        self._logfile: BinaryIO | None = None
        self._lock = threading.Lock()
        self._log = setup(
            self.prog,
            AUTOPKGTEST,
            debug=verbosity >= DEBUG,
            quiet=verbosity <= QUIET,
            sink=self.write_stderr,
        ).getChild("run")

    def open_logfile(self, path: str) -> None:
        self._logfile = open(path, "wb")  # noqa: SIM115 - closed in close()

    def close(self) -> None:
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    # -- raw streams (test output is passed through unchanged) --------------------------
    def write_stdout(self, data: bytes) -> None:
        self._write(sys.stdout.buffer, data)

    def write_stderr(self, data: bytes) -> None:
        self._write(sys.stderr.buffer, data)

    def _write(self, stream: BinaryIO, data: bytes) -> None:
        with self._lock:
            try:
                stream.write(data)
                stream.flush()
            except BrokenPipeError:
                pass
            if self._logfile is not None:
                self._logfile.write(data)
                self._logfile.flush()

    # -- formatted lines ----------------------------------------------------------------
    def info(self, text: str) -> None:
        self._log.info(text)

    def error(self, text: str) -> None:
        self._log.error(text)

    def warning(self, text: str) -> None:
        self._log.warning(text)

    def debug(self, text: str) -> None:
        self._log.debug(text)

    def stdout_line(self, text: str) -> None:
        self.write_stdout((text + "\n").encode("UTF-8", "replace"))


class HeldConsole(Console):
    """A Console for one test running beside others: what it is given is held, lines
    formatted as the run's are, until `release` passes it all to the run's console at once
    (a parallel run's log reads as a serial one's); after that it passes on directly."""

    def __init__(self, parent: Console) -> None:
        # not Console.__init__: the run's logging is set up already, and stays the parent's
        self.verbosity = parent.verbosity
        self.prog = parent.prog
        self._parent = parent
        self._lock = threading.Lock()
        self._held: list[tuple[bool, bytes]] | None = []  # (to stdout, data); None: released
        self._formatter = LineFormatter(parent.prog, AUTOPKGTEST)
        self._logfile = None

    def write_stdout(self, data: bytes) -> None:
        self._pass(True, data)

    def write_stderr(self, data: bytes) -> None:
        self._pass(False, data)

    def _pass(self, to_stdout: bool, data: bytes) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append((to_stdout, data))
                return
        (self._parent.write_stdout if to_stdout else self._parent.write_stderr)(data)

    def release(self, into: Console | None = None) -> None:
        """Pass what is held to the run's console (or to `into`), and from now on directly."""
        target = into or self._parent
        with self._lock:
            held, self._held = self._held or [], None
        for to_stdout, data in held:
            (target.write_stdout if to_stdout else target.write_stderr)(data)

    def _line(self, level: int, text: str) -> None:
        if level >= shown_level(debug=self.verbosity >= DEBUG, quiet=self.verbosity <= QUIET):
            record = logging.makeLogRecord({"msg": text, "levelno": level, "args": None})
            self.write_stderr((self._formatter.format(record) + "\n").encode("UTF-8", "replace"))

    def info(self, text: str) -> None:
        self._line(logging.INFO, text)

    def error(self, text: str) -> None:
        self._line(logging.ERROR, text)

    def warning(self, text: str) -> None:
        self._line(logging.WARNING, text)

    def debug(self, text: str) -> None:
        self._line(logging.DEBUG, text)
