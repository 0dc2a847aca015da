"""Which kernel log records are a test's kernel warnings (run/kernlog.py), on /dev/kmsg text
as the testbed's dd gives it: real first lines of the kernel's reports, and benign ones."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from nestbed.run.kernlog import (
    LEVEL2_PREFIX,
    READ_ARGV,
    console_problems,
    last_sequence,
    mark_script,
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
    assert last_sequence(text) == 4
    assert problems(text, 2) == [REPORTS[1], REPORTS[2]]
    assert problems(text, 4) == []


def test_records_that_are_not_records_are_ignored() -> None:
    text = "garbage\n;no header\n4,x,1,-;" + REPORTS[0] + "\n" + kmsg([REPORTS[1]], 7)
    assert problems(text, 0) == [REPORTS[1]]
    assert last_sequence("") is None


def test_the_testbed_command_reads_this_kernels_log() -> None:
    """READ_ARGV on this machine (root, as on a testbed): records, and a mark among them."""
    result = subprocess.run(READ_ARGV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    boot_id, _, records = result.stdout.partition("\n")
    assert boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert (last_sequence(records) or 0) > 0
    assert not any(line.startswith(" ") for line in records.splitlines())


class _Result(NamedTuple):
    returncode: int
    stdout: bytes


class _HostTestbed:
    """This machine as the testbed (the tests run as root, as the runner on a VM testbed):
    commands run here for real (the VM test is tests/run/test_kernel_warnings.py)."""

    def execute(self, argv: list[str], timeout: float) -> _Result:
        r = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        return _Result(r.returncode, r.stdout)


def _log(message: str) -> None:
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(message + "\n")


def test_what_is_logged_after_the_mark_is_found(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    subprocess.run(["sh", "-c", mark_script(str(mark))], check=True)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert mark.read_text().startswith(boot_id + "\n")
    report = f"WARNING: CPU: 0 PID: 1 at nestbed/test_kernlog.py:{tmp_path.name} (a test)"
    _log(report)
    found = since_mark(_HostTestbed(), str(mark), 30)  # type: ignore[arg-type]
    assert found.marked and found.problems is not None and report in found.problems
    # marked again after it: nothing new
    subprocess.run(["sh", "-c", mark_script(str(mark))], check=True)
    found = since_mark(_HostTestbed(), str(mark), 30)  # type: ignore[arg-type]
    assert found.marked and found.problems is not None and report not in found.problems


def test_a_reboot_during_the_test_makes_the_new_boots_log_the_tests(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    # the mark of another boot, whose last record had a high sequence number
    mark.write_text("another-boot\n6,99999999,1,-;the last record then\n")
    report = f"WARNING: CPU: 0 PID: 1 at nestbed/test_kernlog.py:{tmp_path.name} (a reboot)"
    _log(report)
    found = since_mark(_HostTestbed(), str(mark), 30)  # type: ignore[arg-type]
    assert found.marked and found.problems is not None and report in found.problems


def test_no_mark_means_the_kernel_is_not_watched(tmp_path: Path) -> None:
    found = since_mark(_HostTestbed(), str(tmp_path / "none"), 30)  # type: ignore[arg-type]
    assert not found.marked and found.problems is None


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
