"""Ctrl-C or SIGTERM in the middle of a test: the test, the virt server and every
temporary directory are gone afterwards (checked, not assumed)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests_support import nestbed_argv, write_package

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the null testbed runs tests via su")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _children_of(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_test_leaves_nothing_behind(tmp_path: Path, signum: int) -> None:
    pidfile = tmp_path / "test.pid"
    tree = write_package(
        tmp_path / "pkg",
        {"sleeper": f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 300\n"},
        "Tests: sleeper\nDepends:\n",
    )
    # every temporary directory the runner and its virt server make lands here
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    runner = subprocess.Popen(
        [*nestbed_argv(), "-B", str(tree), "--", "null"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert runner.poll() is None, runner.communicate()
        assert time.monotonic() < deadline, "the test never started"
        time.sleep(0.1)
    test_pid = int(pidfile.read_text())
    assert os.listdir(tmpdir), "the runner made no temporary directory: TMPDIR not honoured"
    server_pids = _children_of(runner.pid)
    assert server_pids, "no virt server process found"
    runner.send_signal(signum)
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == -signum, err
    assert b"Received signal" in err and b"Traceback" not in err
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in [test_pid, *server_pids]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(test_pid), "the test outlived the runner"
    assert not [p for p in server_pids if _alive(p)], "a helper process outlived the runner"
    assert os.listdir(tmpdir) == [], "temporary directories left behind"
