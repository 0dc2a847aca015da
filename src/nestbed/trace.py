"""A timing trace of a run, for finding where its time goes (bench/trace.py reads it).

With NESTBED_TRACE=FILE in the environment, every nestbed process of the run -- the
runner, its virt server, each exec helper -- appends one JSON line per event to FILE:

    {"pid": 123, "proc": "nestbed", "kind": "exec", "what": "dpkg --print-architecture",
     "start": 8123.402, "end": 8123.611}

`start` and `end` are CLOCK_MONOTONIC seconds, one clock for every process on the host;
`end` is null for an instant (a process spawned). Kinds: `process` (a nestbed process from
its creation to the moment it is ready to work, i.e. the interpreter's start and imports),
`spawn` (a host program started), `virt` (a protocol command to the virt server and its
answer), `exec` (a command in the testbed through the exec prefix, from the runner's side),
`guest` (the same request as the QEMU server's multiplexer sees it: sent to the agent until
its exit came back), `step` (a part of the runner's work). Without the variable nothing is
written and each call costs one comparison.

Stdlib only and cheap to import: the exec helper imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator

TRACE_ENV = "NESTBED_TRACE"
_PATH = os.environ.get(TRACE_ENV) or None
_WHAT_MAX = 300


def enabled() -> bool:
    return _PATH is not None


def record(kind: str, what: str, start: float, end: float | None = None) -> None:
    """One event; a trace that cannot be written is not the run's problem."""
    if _PATH is None:
        return
    line = json.dumps(
        {
            "pid": os.getpid(),
            "proc": os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python",
            "kind": kind,
            "what": what[:_WHAT_MAX],
            "start": round(start, 6),
            "end": None if end is None else round(end, 6),
        }
    )
    with contextlib.suppress(OSError):
        fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (line + "\n").encode())  # one write: lines of processes do not mix
        finally:
            os.close(fd)


@contextlib.contextmanager
def span(kind: str, what: str) -> Iterator[None]:
    """Record how long the block took (also when it raises)."""
    if _PATH is None:
        yield
        return
    start = time.monotonic()
    try:
        yield
    finally:
        record(kind, what, start, time.monotonic())


def process_ready(what: str = "") -> None:
    """Record this process from its creation (the kernel's start time) to now."""
    if _PATH is None:
        return
    started = _process_start()
    if started is not None:
        record("process", what or " ".join(sys.argv[:1]), started, time.monotonic())


def _process_start() -> float | None:
    """When this process was created, on CLOCK_MONOTONIC (from /proc/self/stat, in clock
    ticks since boot; boot time and the monotonic clock agree on a machine that never
    suspended, which is the case of the hosts a benchmark runs on)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
