"""The exec multiplexer and helper against a real agent process on a socketpair (no VM)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from nestbed.qemu.execclient import helper_argv
from nestbed.qemu.mux import Mux


@dataclass
class Rig:
    mux: Mux
    agent: subprocess.Popen[bytes]
    sock: Path

    def helper(
        self, *argv: str, stdin: bytes = b"", timeout: float = 30
    ) -> tuple[int, bytes, bytes]:
        proc = subprocess.run(
            self.prefix() + list(argv), input=stdin, capture_output=True, timeout=timeout
        )
        return proc.returncode, proc.stdout, proc.stderr

    def prefix(self) -> list[str]:
        return helper_argv(str(self.sock))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    host, guest = socket.socketpair()
    agent = subprocess.Popen(
        [sys.executable, "-m", "nestbed.guest.agent", "--fd", str(guest.fileno()), "--exit-on-eof"],
        pass_fds=[guest.fileno()],
    )
    guest.close()
    mux = Mux(host, tmp_path / "exec.sock", console_log=tmp_path / "console.log")
    mux.start()
    try:
        assert mux.hello(10)["protocol"] == 1
        yield Rig(mux, agent, tmp_path / "exec.sock")
    finally:
        mux.stop()
        host.close()
        agent.kill()
        agent.wait()


def test_streams_and_exit_status(rig: Rig) -> None:
    rc, out, err = rig.helper("sh", "-c", "cat; echo oops >&2; exit 3", stdin=b"in\n")
    assert (rc, out, err) == (3, b"in\n", b"oops\n")
    assert rig.helper("sh", "-c", "kill -9 $$")[0] == 128 + 9
    rc, _, err = rig.helper("/nonexistent/program")
    assert rc == 127 and b"cannot run" in err


def test_large_stdin_and_output(rig: Rig) -> None:
    blob = os.urandom(3 << 20)
    rc, out, _ = rig.helper("cat", stdin=blob, timeout=60)
    assert rc == 0 and out == blob


def test_concurrent_helpers(rig: Rig) -> None:
    start = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: rig.helper("sh", "-c", f"sleep 1; echo {i}"), range(6)))
    assert [r[1] for r in results] == [f"{i}\n".encode() for i in range(6)]
    assert time.monotonic() - start < 5  # they ran at once, not one after the other


def test_killed_helper_kills_the_command(rig: Rig, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([*rig.prefix(), "sh", "-c", f"echo $$ > {pidfile}; exec sleep 100"])
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the command outlived its helper"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_sigterm_is_forwarded(rig: Rig) -> None:
    proc = subprocess.Popen([*rig.prefix(), "sleep", "100"])
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM


def test_agent_gone_means_255(rig: Rig) -> None:
    running = subprocess.Popen([*rig.prefix(), "sleep", "100"], stderr=subprocess.PIPE)
    time.sleep(1)
    rig.agent.kill()
    assert running.wait(10) == 255
    deadline = time.monotonic() + 5
    while rig.mux.dead is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rc, _, err = rig.helper("true")
    assert rc == 255 and b"testbed" in err


def test_console_panic_kills_the_channel(rig: Rig, tmp_path: Path) -> None:
    (tmp_path / "console.log").write_bytes(b"boot\n[  1.0] Kernel panic - not syncing: sysrq\n")
    deadline = time.monotonic() + 5
    while rig.mux.dead is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "panicked" in rig.mux.dead
    assert rig.helper("true")[0] == 255


def test_exec_prefix_has_no_commas() -> None:
    """autopkgtest splits the print-execute-command word on ',' after unquoting it."""
    assert not any("," in a for a in helper_argv("/tmp/x/exec.sock"))
