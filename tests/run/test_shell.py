"""--shell and -s/--shell-fail: an interactive shell in the testbed on the user's terminal
after a test; without a terminal, a one-line note and the run goes on (never a hang)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests_support import nestbed_argv

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "packages"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the null testbed runs tests via su")

NOTE = "no shell in the testbed: stdin is not a terminal"


def _without_terminal(option: str, fixture: str, test: str) -> subprocess.CompletedProcess[str]:
    """nestbed OPTION on one test of FIXTURE on null, stdin not a terminal."""
    return subprocess.run(
        [*nestbed_argv(), option, "-B", str(FIXTURES / fixture), f"--test-name={test}",
         "--", "null"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize("option", ["--shell", "--shell-fail"])
def test_without_a_terminal_a_note_and_no_hang(option: str) -> None:
    p = _without_terminal(option, "mixed", "fails-exit")
    assert p.returncode == 4, p.stderr
    assert "fails-exit           FAIL non-zero exit status 3" in p.stdout.splitlines()
    assert sum(NOTE in line for line in p.stderr.splitlines()) == 1, p.stderr


def test_shell_fail_not_run_after_a_pass() -> None:
    p = _without_terminal("-s", "pass-basic", "command1")
    assert p.returncode == 0, p.stderr
    assert "running shell" not in p.stderr
    assert NOTE not in p.stderr


def test_shell_on_a_terminal_runs_in_the_tree() -> None:
    """On a terminal the shell is interactive, in the test's tree, with AUTOPKGTEST_TMP; the
    run goes on when it exits."""
    argv = [*nestbed_argv(), "--shell", "-B",
            "--test-name=named-command", str(FIXTURES / "pass-basic"), "--", "null"]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child: nestbed with the pty as its controlling terminal
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    output = b""
    sent = False
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if not sent and b"running shell" in output:
                os.write(fd, b'echo "IN-SHELL-$((6*7)) $(basename $PWD) ${AUTOPKGTEST_TMP:+tmp}"\n')
                os.write(fd, b"exit\n")
                sent = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode("UTF-8", "replace")
    assert sent, text
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "IN-SHELL-42 real-tree tmp" in text
    assert "named-command        PASS" in text
    assert NOTE not in text
