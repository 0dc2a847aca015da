"""nestbed.proc, the one process helper: what a caller and a user see of the programs it
starts (output, errors naming the command, nothing left running after a timeout or a stop,
children that die with us)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nestbed import proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent has not reaped it yet)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _gone_soon(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _read_pid(path: Path, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.endswith("\n"):
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"no pid in {path}")


def test_run_captures_both_streams() -> None:
    result = proc.run(["sh", "-c", "echo out; echo err >&2"])
    assert (result.returncode, result.stdout, result.stderr) == (0, b"out\n", b"err\n")
    assert result.stdout_text == "out\n"


def test_a_failure_names_the_command_and_its_last_words() -> None:
    argv = ["sh", "-c", "echo first; echo the reason >&2; exit 3", "my arg"]
    with pytest.raises(proc.CommandFailed) as e:
        proc.run(argv)
    assert str(e.value) == f"{proc.cmdline(argv)} exited 3: the reason"
    assert proc.cmdline(argv).endswith("exit 3' 'my arg'")
    assert e.value.returncode == 3


def test_a_missing_program_could_not_be_started() -> None:
    with pytest.raises(
        proc.CommandFailed, match=r"^no-such-program-here could not be started: "
    ) as e:
        proc.run(["no-such-program-here"])
    assert e.value.returncode is None
    assert e.value.strerror == "No such file or directory"


def test_a_timeout_stops_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"sleep 600 & echo $! > {pidfile}; wait"
    with pytest.raises(proc.TimeoutExpired):
        proc.run(["sh", "-c", script], timeout=1)
    assert _gone_soon(_read_pid(pidfile))


def test_stop_kills_what_ignores_sigterm_after_the_grace() -> None:
    child = proc.spawn(["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"])
    time.sleep(0.3)  # the trap is set
    started = time.monotonic()
    assert proc.stop(child, grace=1.0) == -signal.SIGKILL
    assert 0.9 < time.monotonic() - started < 20


def test_stop_ends_the_group_also_when_the_leader_is_gone(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    child = proc.spawn(["sh", "-c", f"sleep 600 & echo $! > {pidfile}"])
    left = _read_pid(pidfile)
    child.wait()
    assert _alive(left)
    proc.stop(child)
    assert _gone_soon(left)


def test_stop_may_ask_only_the_leader_first() -> None:
    # the leader ends on SIGTERM; with term="leader" its group is not sent SIGTERM
    child = proc.spawn(["sleep", "600"])
    assert proc.stop(child, grace=5.0, term="leader") == -signal.SIGTERM


def _orphan(tmp_path: Path, with_parent: bool) -> int:
    """The pid of a `sleep` whose parent (started by spawn) was SIGKILLed."""
    pidfile = tmp_path / "pid"
    code = (
        "import os, signal, sys\n"
        "from nestbed import proc\n"
        f"p = proc.spawn(['sleep', '600'], with_parent={with_parent})\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{p.pid}}\\n')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    return _read_pid(pidfile)


def test_children_die_with_us(tmp_path: Path) -> None:
    assert _gone_soon(_orphan(tmp_path, with_parent=True))


def test_a_child_may_outlive_us(tmp_path: Path) -> None:
    pid = _orphan(tmp_path, with_parent=False)
    try:
        time.sleep(0.5)
        assert _alive(pid)
    finally:
        os.killpg(pid, signal.SIGKILL)
