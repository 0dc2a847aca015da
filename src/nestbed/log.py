"""Log lines in autopkgtest's format, to stderr and (optionally) a log file.

`PROG [HH:MM:SS]: message` for progress, `PROG [HH:MM:SS]: ERROR: message` for errors,
`PROG: WARNING: message` and `PROG: DBG: message` -- PROG is the program's own name,
as autopkgtest uses its own. Everything written to stdout or stderr during a run
also goes to the log file (`-l`, or `log` in the output directory).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import BinaryIO

QUIET, INFO, DEBUG = 0, 1, 2


def program_name() -> str:
    name = os.path.basename(sys.argv[0])
    # `python -m nestbed` runs as __main__.py: the program is still nestbed
    return "nestbed" if name in ("", "__main__.py", "-c") else name


class Console:
    """The run's stdout and stderr, each copied into the log file when there is one."""

    def __init__(self, verbosity: int = INFO) -> None:
        self.verbosity = verbosity
        self.prog = program_name()
        self._logfile: BinaryIO | None = None
        self._lock = threading.Lock()

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
    def _line(self, level: int, text: str, *, timestamp: bool, prefix: str = "") -> None:
        if level > self.verbosity:
            return
        head = self.prog
        head += f" [{time.strftime('%H:%M:%S')}]: " if timestamp else ": "
        if prefix:
            head += prefix + ": "
        self.write_stderr((head + text + "\n").encode("UTF-8", "replace"))

    def info(self, text: str) -> None:
        self._line(INFO, text, timestamp=True)

    def error(self, text: str) -> None:
        self._line(QUIET, text, timestamp=True, prefix="ERROR")

    def warning(self, text: str) -> None:
        self._line(QUIET, text, timestamp=False, prefix="WARNING")

    def debug(self, text: str) -> None:
        self._line(DEBUG, text, timestamp=False, prefix="DBG")

    def stdout_line(self, text: str) -> None:
        self.write_stdout((text + "\n").encode("UTF-8", "replace"))
