"""The kernel's own reports of a problem during a test: Oops, BUG, WARNING, panic, hung
task, RCU stall, lockdep, KASAN/UBSAN, read from the testbed's kernel log (/dev/kmsg).

Before a test the runner notes the log's last sequence number (`mark`); after it, the
records since then that look like a kernel problem report (`since`) are the test's kernel
warnings: logged, in the JSON record, and with `--kernel-warnings fail` its failure. Only in
testbeds with a kernel of their own (isolation-machine) and as root: elsewhere the log is the
host's, or unreadable. A record is the kernel log's, whoever wrote it (user space may write
to /dev/kmsg too).
"""

from __future__ import annotations

import re

from nestbed.testbed.client import Testbed

# each read(2) of /dev/kmsg is one record; non-blocking, dd ends at the last one (EAGAIN);
# continuation lines (" KEY=value", the record's dictionary) are dropped
_READ = "dd if=/dev/kmsg iflag=nonblock bs=8192 2>/dev/null | grep -v '^ '"
MARK_ARGV = ["sh", "-c", f"{_READ} | tail -n 1"]
READ_ARGV = ["sh", "-c", _READ]

# the first line of each kind of report the kernel prints (lib/bug.c, kernel/panic.c,
# kernel/hung_task.c, kernel/rcu/tree_stall.h, kernel/locking/lockdep.c, mm/kasan, lib/ubsan)
PROBLEM = re.compile(
    r"\bOops\b|\bBUG: |kernel BUG at |^WARNING: |Kernel panic"
    r"|general protection fault|INFO: task \S+ blocked for more than"
    r"|detected stalls? on CPUs?|self-detected stall|possible (circular|recursive) locking"
    r"|\bUBSAN: |\bKASAN: |\bKFENCE: "
)


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
    return [m.strip() for seq, m in _records(text) if seq > after and PROBLEM.search(m)]


def mark(testbed: Testbed, timeout: float) -> int | None:
    """The kernel log's last sequence number, or None when it cannot be read."""
    result = testbed.execute(MARK_ARGV, timeout=timeout)
    if result.returncode != 0:
        return None
    return last_sequence(result.stdout.decode("UTF-8", "replace"))


def since(testbed: Testbed, after: int, timeout: float) -> list[str] | None:
    """The problem reports logged after `after`, or None when the log cannot be read (the
    testbed was lost, or the test made /dev/kmsg unreadable)."""
    result = testbed.execute(READ_ARGV, timeout=timeout)
    if result.returncode != 0:
        return None
    return problems(result.stdout.decode("UTF-8", "replace"), after)
