"""The kernel's own reports of a problem during a test: Oops, BUG, WARNING, panic, hung
task, RCU stall, lockdep, KASAN/UBSAN, read from the testbed's kernel log (/dev/kmsg).

The test's own guest command does it all, as root around the test (the executor's `before`
and `after` commands): before the test, a record naming a fresh token goes into the kernel
log (`mark_script`: a shell builtin, no process); after it, the log as it is then follows the
test's output (`READ_SCRIPT`: one process). The records after the mark that look like a
kernel problem report (`since_mark`) are the test's kernel warnings: logged, in the JSON
record, and with `--kernel-warnings fail` its failure. Only in testbeds with a kernel of their
own (isolation-machine) and as root: elsewhere the log is the host's, or unreadable. A record
is the kernel log's, whoever wrote it (user space may write to /dev/kmsg too).
"""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

# the first line of each kind of report the kernel prints (lib/bug.c, kernel/panic.c,
# kernel/hung_task.c, kernel/rcu/tree_stall.h, kernel/locking/lockdep.c, mm/kasan, lib/ubsan)
PROBLEM = re.compile(
    r"\bOops\b|\bBUG: |kernel BUG at |^WARNING: |Kernel panic"
    r"|general protection fault|INFO: task \S+ blocked for more than"
    r"|detected stalls? on CPUs?|self-detected stall|possible (circular|recursive) locking"
    r"|\bUBSAN: |\bKASAN: |\bKFENCE: "
)


# nestbed-vm's report of a level-2 VM's warning, written to level 1's log (nestvm.py)
LEVEL2_PREFIX = "nestbed-vm: level-2 kernel warning: "
# a kernel message's timestamp on the console, `[   12.345678] `: not always at the start of
# a line (the serial console's shell prompt may come first)
_CONSOLE_STAMP = re.compile(r"\[\s*\d+\.\d+\]\s?")


def _records(text: str) -> list[tuple[int, str]]:
    """(sequence number, message) of each record: `PRI,SEQ,USEC,FLAGS[,...];MESSAGE`."""
    records = []
    for line in text.splitlines():
        if line.startswith(" "):  # a continuation line: the record's dictionary, KEY=value
            continue
        head, sep, message = line.partition(";")
        fields = head.split(",")
        if not sep or len(fields) < 4 or not fields[1].isdigit():
            continue
        records.append((int(fields[1]), message))
    return records


def problems(text: str, after: int) -> list[str]:
    """The messages of the records after sequence number `after` that report a problem."""
    return [
        m.strip()
        for seq, m in _records(text)
        if seq > after and PROBLEM.search(m.removeprefix(LEVEL2_PREFIX))
    ]


def console_problems(text: str) -> list[str]:
    """The problem reports among a serial console's lines (the kernel prints its reports
    there too), without their timestamps."""
    found = []
    for line in text.splitlines():
        stamp = _CONSOLE_STAMP.search(line)
        message = (line[stamp.end() :] if stamp else line).strip()
        if PROBLEM.search(message):
            found.append(message)
    return found


def new_token() -> str:
    return secrets.token_hex(6)


def _mark_message(token: str) -> str:
    return f"kernel log mark {token}"


def mark_script(test_name: str, token: str) -> str:
    """Shell commands (root, before the test) that log a record naming `token`, and set
    $nestbed_marked when they could (READ_SCRIPT reports it)."""
    message = shlex.quote(f"nestbed: test {test_name} starts, {_mark_message(token)}")
    return f"{{ echo {message} >/dev/kmsg; }} 2>/dev/null && nestbed_marked=1"


# Shell commands (root, after the test, in the same guest command) that print whether the
# mark was logged, the boot's id (after a reboot the sequence numbers start again), then the
# log: each read(2) of /dev/kmsg is one record; non-blocking, dd ends at the last one (EAGAIN)
READ_SCRIPT = (
    'echo "${nestbed_marked:-0}"; read -r boot </proc/sys/kernel/random/boot_id && '
    'echo "$boot"; dd if=/dev/kmsg iflag=nonblock bs=8192'
)


@dataclass(frozen=True)
class SinceMark:
    """What the kernel log says after a test."""

    marked: bool  # the mark went into the log before the test
    problems: list[str] | None  # the reports since then; None: the log is unreadable now


def since_mark(readings: Sequence[str], token: str) -> SinceMark:
    """The problem reports logged after the mark naming `token`, from what READ_SCRIPT
    printed after each run of the test (more than one when the test rebooted the testbed:
    then all of a new boot's records count). A mark no longer in the log went out of the
    kernel's ring buffer, or the test cleared the buffer: then all its records count. No
    reading at all: the test's command did not get that far (the testbed stopped answering)."""
    if not readings:
        return SinceMark(marked=True, problems=None)
    found: list[str] = []
    last: tuple[str, int] | None = None  # the boot, and the last sequence number read in it
    for reading in readings:
        flag, _, rest = reading.partition("\n")
        boot, _, text = rest.partition("\n")
        if last is None and flag.strip() != "1":
            return SinceMark(marked=False, problems=None)
        records = _records(text)
        if not records:
            return SinceMark(marked=True, problems=None)
        if last is None:
            mark = _mark_message(token)
            after = next((seq for seq, m in records if m.endswith(mark)), -1)
        else:
            after = last[1] if boot == last[0] else -1
        found += problems(text, after)
        last = (boot, records[-1][0])
    return SinceMark(marked=True, problems=found)
