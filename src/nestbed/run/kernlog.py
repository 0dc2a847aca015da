"""The kernel's own reports of a problem during a test: Oops, BUG, WARNING, panic, hung
task, RCU stall, lockdep, KASAN/UBSAN, read from the testbed's kernel log (/dev/kmsg).

Before a test the runner notes the log's last sequence number in a file, by commands
(`mark_script`) that run in the same guest command as the test; after it, the records since
then that look like a kernel problem report (`since_mark`, one command) are the test's kernel
warnings: logged, in the JSON record, and with `--kernel-warnings fail` its failure. Only in
testbeds with a kernel of their own (isolation-machine) and as root: elsewhere the log is the
host's, or unreadable. A record is the kernel log's, whoever wrote it (user space may write
to /dev/kmsg too).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from nestbed.testbed.client import Testbed

# each read(2) of /dev/kmsg is one record; non-blocking, dd ends at the last one (EAGAIN);
# continuation lines (" KEY=value", the record's dictionary) are dropped
_READ = "dd if=/dev/kmsg iflag=nonblock bs=8192 2>/dev/null | grep -v '^ '"
# the boot's id first: after a reboot the sequence numbers start again
_BOOT = "cat /proc/sys/kernel/random/boot_id && "
READ_ARGV = ["sh", "-c", f"{_BOOT}{_READ}"]
_SEPARATOR = "@@nestbed-kernel-log@@"


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
        head, sep, message = line.partition(";")
        fields = head.split(",")
        if not sep or len(fields) < 4 or not fields[1].isdigit():
            continue
        records.append((int(fields[1]), message))
    return records


def last_sequence(text: str) -> int | None:
    records = _records(text)
    return records[-1][0] if records else None


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


def mark_script(path: str) -> str:
    """Shell commands (for root, before the test) that write where the kernel log stands to
    `path`: the boot's id, then the last record."""
    return f"{{ {_BOOT}{_READ} | tail -n 1; }} >{shlex.quote(path)} 2>/dev/null"


@dataclass(frozen=True)
class SinceMark:
    """What the kernel log says after a test."""

    marked: bool  # mark_script found a readable log before the test
    problems: list[str] | None  # the reports since then; None: the log is unreadable now


def since_mark(testbed: Testbed, path: str, timeout: float) -> SinceMark:
    """The problem reports logged after the mark `mark_script` left at `path` (after a
    reboot: all of the new boot's), read in one command. Unreadable now: the testbed was
    lost, or the test made /dev/kmsg unreadable."""
    argv = ["sh", "-c", f"cat {shlex.quote(path)}; echo {_SEPARATOR}; {_BOOT}{_READ}"]
    result = testbed.execute(argv, timeout=timeout)
    before, _, now = result.stdout.decode("UTF-8", "replace").partition(f"{_SEPARATOR}\n")
    boot_before, _, records_before = before.partition("\n")
    sequence = last_sequence(records_before)
    if sequence is None:
        return SinceMark(marked=False, problems=None)
    if result.returncode != 0:
        return SinceMark(marked=True, problems=None)
    boot_id, _, records = now.partition("\n")
    after = sequence if boot_id.strip() == boot_before.strip() else -1
    return SinceMark(marked=True, problems=problems(records, after))
