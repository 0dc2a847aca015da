"""Which kernel log records are a test's kernel warnings (run/kernlog.py), on /dev/kmsg text
as the testbed's dd gives it: real first lines of the kernel's reports, and benign ones; and
the mark and the reading in the test's own command (executor.around), run on this machine."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nestbed.run.capture import Capture
from nestbed.run.executor import NOTES_MARKER, StderrSplitter, around, take_after
from nestbed.run.kernlog import (
    LEVEL2_PREFIX,
    READ_SCRIPT,
    SinceMark,
    console_problems,
    mark_script,
    new_token,
    problems,
    since_mark,
)

REPORTS = [
    "WARNING: CPU: 1 PID: 412 at fs/nfs/write.c:1470 nfs_writeback_done+0x1c/0x30 [nfs]",
    "BUG: kernel NULL pointer dereference, address: 0000000000000008",
    "Oops: 0002 [#1] PREEMPT SMP NOPTI",
    "general protection fault, probably for non-canonical address 0xdead000000000100: 0000",
    "kernel BUG at mm/slub.c:379!",
    "Kernel panic - not syncing: Fatal exception",
    "INFO: task mount.nfs:1234 blocked for more than 120 seconds.",
    "watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [kworker/0:1:33]",
    "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
    "rcu: INFO: rcu_sched self-detected stall on CPU",
    "WARNING: possible circular locking dependency detected",
    "BUG: KASAN: slab-use-after-free in nbd_queue_rq+0x5a/0x3f0 [nbd]",
    "UBSAN: shift-out-of-bounds in drivers/block/nbd.c:1391:31",
]
BENIGN = [
    "EXT4-fs (vda): mounted filesystem with ordered data mode. Quota mode: none.",
    "random: crng init done",
    "nbd: registered device at major 43",
    "systemd[1]: Started nestbed-agent.service - nestbed control agent.",
    "FS-Cache: Netfs 'nfs' registered for caching",
    'audit: type=1400 audit(1.5:2): apparmor="STATUS" warning text',
]


def kmsg(messages: list[str], first: int = 1) -> str:
    lines = []
    for seq, message in enumerate(messages, first):
        lines.append(f"4,{seq},{seq * 1000},-;{message}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("report", REPORTS)
def test_each_kind_of_report_is_a_warning(report: str) -> None:
    assert problems(kmsg(["boot", report, "after"]), 0) == [report]


@pytest.mark.parametrize("line", BENIGN)
def test_ordinary_messages_are_not(line: str) -> None:
    assert problems(kmsg([line]), 0) == []


def test_only_what_was_logged_after_the_mark_counts() -> None:
    text = kmsg([REPORTS[0], "ordinary", REPORTS[1], REPORTS[2]])
    assert problems(text, 2) == [REPORTS[1], REPORTS[2]]
    assert problems(text, 4) == []


def test_records_that_are_not_records_are_ignored() -> None:
    text = (
        "garbage\n;no header\n4,x,1,-;" + REPORTS[0] + "\n"
        + kmsg([REPORTS[1]], 7) + " DEVICE=+pci:0000;WARNING: not a record\n"
    )  # fmt: skip
    assert problems(text, 0) == [REPORTS[1]]


def _log(message: str) -> None:
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(message + "\n")


def _run_around(test_command: str, before: str, after: str) -> tuple[int, bytes, str | None]:
    """A test's command as the runner composes it (executor.around), run on this machine (root,
    as on a VM testbed: the VM test is tests/run/test_kernel_warnings.py): its exit status, its
    stderr, and what `after` printed, split off as the runner does."""
    argv = around(["sh", "-c", test_command], before, after)
    r = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    err = StderrSplitter(lambda _b: None, Capture())
    err.feed(r.stderr)
    err.close()
    _, printed = take_after(bytes(err.notes))
    return r.returncode, r.stderr.partition(b"\0")[0], printed


def _reading(before: str, command: str) -> str:
    status, _, printed = _run_around(command, before, READ_SCRIPT)
    assert status == 0 and printed is not None
    return printed


def test_what_is_logged_after_the_mark_is_found(tmp_path: Path) -> None:
    token = new_token()
    report = f"WARNING: CPU: 0 PID: 1 at nestbed/test_kernlog.py:{tmp_path.name} (a test)"
    earlier = f"WARNING: CPU: 0 PID: 1 at nestbed/test_kernlog.py:{tmp_path.name} (before)"
    _log(earlier)
    reading = _reading(mark_script("t0", token), f"echo {shlex.quote(report)} >/dev/kmsg")
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert reading.startswith(f"1\n{boot_id}\n")
    found = since_mark([reading], token)
    assert found.marked and found.problems is not None
    assert report in found.problems and earlier not in found.problems
    # marked again, nothing logged since
    token = new_token()
    found = since_mark([_reading(mark_script("t1", token), "true")], token)
    assert found == SinceMark(marked=True, problems=[])


def test_the_test_keeps_its_exit_status_and_stderr() -> None:
    status, stderr, printed = _run_around("echo oops >&2; exit 3", "", "echo after")
    assert (status, stderr, printed) == (3, b"oops\n", "after\n")


def test_the_runners_signal_ends_the_test_and_the_after_part_still_reports() -> None:
    """SIGTERM to the command's process group, as the runner's stop (Ctrl-C) sends it."""
    argv = around(["sh", "-c", "sleep 30"], "", "echo after")
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM
    assert take_after(stderr.partition(NOTES_MARKER)[2])[1] == "after\n"


def test_a_reboot_during_the_test_makes_the_new_boots_log_the_tests(tmp_path: Path) -> None:
    token = new_token()
    first = _reading(mark_script("t0", token), "true")
    report = f"WARNING: CPU: 0 PID: 1 at nestbed/test_kernlog.py:{tmp_path.name} (a reboot)"
    _log(report)
    # the run after the reboot: no mark, another boot whose log has this one's records
    again = _reading("", "true")
    assert again.startswith("0\n")
    flag, _, records = again.split("\n", 2)
    found = since_mark([first, f"{flag}\nanother-boot\n{records}"], token)
    assert found.problems is not None and report in found.problems
    # the same boot (no reboot happened): only what was new since the first reading
    found = since_mark([first, again], token)
    assert found.problems is not None and report in found.problems
    found = since_mark([first, first], token)
    assert found.problems == []


def test_a_mark_gone_from_the_buffer_makes_every_record_count() -> None:
    reading = f"1\nboot\n{kmsg([REPORTS[0], 'ordinary'], 500)}"
    assert since_mark([reading], new_token()).problems == [REPORTS[0]]


def test_no_mark_means_the_kernel_is_not_watched() -> None:
    reading = f"0\nboot\n{kmsg(['ordinary'])}"
    assert since_mark([reading], new_token()) == SinceMark(marked=False, problems=None)
    # the mark was logged, the log cannot be read now (or the command never got so far)
    assert since_mark(["1\nboot\n"], new_token()) == SinceMark(marked=True, problems=None)
    assert since_mark([], new_token()) == SinceMark(marked=True, problems=None)


def test_a_level2_vms_warning_reported_by_nestbed_vm_counts() -> None:
    line = LEVEL2_PREFIX + REPORTS[0]
    assert problems(kmsg(["x", line]), 0) == [line]
    assert problems(kmsg([LEVEL2_PREFIX + BENIGN[0]]), 0) == []


def test_console_lines_lose_their_timestamps() -> None:
    console = (
        "[    0.000000] Linux version 6.1.0-28-cloud-amd64\n"
        f"[   12.345678] {REPORTS[0]}\n"
        "[  OK  ] Started systemd-journald.service\n"
        f"[  130.100000] {REPORTS[6]}\n"
        "nestbed login: root (automatic login)\n"
        f"\x1b[?2004hroot@nestbed:~# [   84.752793] {REPORTS[1]}\n"  # after the prompt
    )
    assert console_problems(console) == [REPORTS[0], REPORTS[6], REPORTS[1]]
