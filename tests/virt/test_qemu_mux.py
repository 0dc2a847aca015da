"""The exec multiplexer and helper against a real agent process on a socketpair (no VM)."""

from __future__ import annotations

import contextlib
import hashlib
import io
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

from nestbed.guest import frameclient
from nestbed.guest.agent import OUTPUT_WINDOW, FrameType
from nestbed.qemu import mux as mux_module
from nestbed.qemu.execclient import EXIT_HELPER_FAILED, HereStream, helper_argv
from nestbed.qemu.mux import BUFFER_LIMIT, Mux, MuxTimeout


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


def _rig(tmp_path: Path) -> Iterator[Rig]:
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


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path)


@pytest.fixture
def old_agent_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    """A host that does not ask for output acks: the agent then runs as one from before
    they existed (no output window), as in an image built by an older nestbed."""
    monkeypatch.setattr(frameclient, "HELLO_OPTIONS", {})
    yield from _rig(tmp_path)


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
    pid = _started(pidfile)
    proc.kill()
    proc.wait()
    _ends(pid, "the command outlived its helper")


def _started(pidfile: Path) -> int:
    """The pid a command wrote into `pidfile` once it started."""
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.05)
    return int(pidfile.read_text())


def _ends(pid: int, why: str) -> None:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, why
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


def test_a_command_streamed_from_this_process(rig: Rig, tmp_path: Path) -> None:
    """What the runner does with a test's command: no helper process, same statuses."""
    out, err = bytearray(), bytearray()

    def start(*argv: str, path: Path = rig.sock) -> HereStream:
        return HereStream(str(path), list(argv), stdin=None, out=out.extend, err=err.extend)

    here = start("sh", "-c", "echo out; echo err >&2; exit 3")
    assert (here.wait(30), bytes(out), bytes(err)) == (3, b"out\n", b"err\n")

    here = start("sleep", "100")
    assert here.wait(0.5) is None
    here.signal(signal.SIGTERM)
    assert here.wait(10) == 128 + signal.SIGTERM

    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec sleep 100"
    here = start("sh", "-c", script)
    pid = _started(pidfile)
    here.kill()
    assert here.wait(10) == EXIT_HELPER_FAILED
    _ends(pid, "the command outlived its connection")
    here.signal(signal.SIGTERM)  # after the end: nothing to do, no error

    err.clear()
    gone = start("true", path=tmp_path / "nothing")
    assert gone.wait(1) == EXIT_HELPER_FAILED and b"the testbed is gone" in err


def test_a_commands_own_255_is_253(rig: Rig) -> None:
    """255 is the exec prefix's own failure (a testbed failure to every runner): the
    command's 255 comes out as 253, as autopkgtest-virt-qemu's exec prefix gives it."""
    assert rig.helper("sh", "-c", "exit 255")[0] == 253
    assert rig.helper("sh", "-c", "exit 254")[0] == 254


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


def test_a_closed_channel_is_reported_with_the_consoles_last_lines(
    rig: Rig, tmp_path: Path
) -> None:
    """What the guest printed as it died (an Oops before a panic whose own message never
    reached the console) is in the failure the user reads."""
    running = subprocess.Popen([*rig.prefix(), "sleep", "100"], stderr=subprocess.PIPE)
    time.sleep(1)
    (tmp_path / "console.log").write_bytes(b"boot\n[  52.1] BUG: unable to handle page fault\n")
    rig.agent.kill()
    assert running.wait(10) == 255
    assert running.stderr is not None
    err = running.stderr.read()
    assert b"the control channel closed" in err, err
    assert b"console ends: boot | [  52.1] BUG: unable to handle page fault" in err, err


def _wait_for_pid(pidfile: Path) -> int:
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return int(pidfile.read_text())


def test_a_wedged_agent_ends_the_running_command(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that stops answering (a stuck guest) ends what runs as a lost testbed,
    after the keep-alive's timeout, not the command's own."""
    monkeypatch.setattr(mux_module, "PROBE_INTERVAL", 0.2)
    monkeypatch.setattr(mux_module, "PROBE_TIMEOUT", 2.0)
    pidfile = tmp_path / "pid"
    running = subprocess.Popen(
        [*rig.prefix(), "sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"],
        stderr=subprocess.PIPE,
    )
    command = _wait_for_pid(pidfile)
    try:
        time.sleep(1)  # probes answered: a live agent is left alone
        assert running.poll() is None and rig.mux.dead is None
        (tmp_path / "console.log").write_bytes(b"[  9.1] watchdog: BUG: soft lockup - CPU#0\n")
        os.kill(rig.agent.pid, signal.SIGSTOP)
        _, err = running.communicate(timeout=15)
        assert running.returncode == 255
        assert b"has not answered for 2 s" in err
        assert b"console ends: [  9.1] watchdog: BUG: soft lockup" in err  # what it last said
        assert rig.helper("true")[0] == 255  # the testbed stays lost
    finally:
        os.kill(rig.agent.pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.kill(command, signal.SIGKILL)


def test_a_restarted_agent_ends_the_running_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that kills the agent: systemd starts a new one on the same port, which knows
    nothing of the streams that ran. The keep-alive finds that out, and the testbed is lost."""
    monkeypatch.setattr(mux_module, "PROBE_INTERVAL", 0.2)
    host, port = socket.socketpair()  # `port` stays open here, as the guest's port would

    def start_agent() -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "nestbed.guest.agent", "--fd", str(port.fileno())]
        return subprocess.Popen(argv, pass_fds=[port.fileno()])

    first = start_agent()
    mux = Mux(host, tmp_path / "exec.sock")
    mux.start()
    second: subprocess.Popen[bytes] | None = None
    command = 0
    try:
        mux.hello(10)
        pidfile = tmp_path / "pid"
        running = subprocess.Popen(
            [*helper_argv(str(tmp_path / "exec.sock")), "sh", "-c",
             f"echo $$ > {pidfile}; exec sleep 60"],
            stderr=subprocess.PIPE,
        )  # fmt: skip
        command = _wait_for_pid(pidfile)
        time.sleep(1)
        assert running.poll() is None and mux.dead is None
        first.kill()
        first.wait()
        second = start_agent()
        _, err = running.communicate(timeout=15)
        assert running.returncode == 255
        assert b"the guest agent was restarted while a test ran" in err
    finally:
        mux.stop()
        host.close()
        port.close()
        for agent in (first, second):
            if agent is not None:
                agent.kill()
                agent.wait()
        with contextlib.suppress(ProcessLookupError):
            if command:
                os.kill(command, signal.SIGKILL)


def test_a_finished_stream_is_not_mistaken_for_a_restart(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probes that cross a stream's EXIT (the agent answers: unknown stream) are harmless."""
    monkeypatch.setattr(mux_module, "PROBE_INTERVAL", 0.0)  # a probe at every turn
    for _ in range(20):
        assert rig.helper("sh", "-c", "sleep 0.05")[0] == 0
    assert rig.mux.dead is None


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


BIG = 64 << 20  # bytes a test prints: many output windows, yet quick
PRINT_BIG = f"head -c {BIG} /dev/zero | tr '\\0' x"
BIG_SHA = hashlib.sha256(b"x" * BIG).hexdigest()


def _slow_read(rig: Rig, proc: subprocess.Popen[bytes]) -> tuple[str, int, int]:
    """Read the helper's stdout slowly; the sha256 and size read, and the most the
    multiplexer held meanwhile."""
    assert proc.stdout is not None
    digest, size, most = hashlib.sha256(), 0, 0
    while chunk := proc.stdout.read(256 << 10):
        digest.update(chunk)
        size += len(chunk)
        most = max(most, rig.mux.buffered_bytes())
        time.sleep(0.002)
    return digest.hexdigest(), size, most


def test_large_output_to_a_slow_reader_is_complete_and_bounded(rig: Rig) -> None:
    proc = subprocess.Popen([*rig.prefix(), "sh", "-c", PRINT_BIG], stdout=subprocess.PIPE)
    sha, size, most = _slow_read(rig, proc)
    assert proc.wait(30) == 0
    assert (size, sha) == (BIG, BIG_SHA)
    # the agent runs at most a window ahead of what the helper took (plus a frame in flight)
    assert most <= OUTPUT_WINDOW + (256 << 10)


def test_one_slow_reader_does_not_stall_another_stream(rig: Rig) -> None:
    slow = subprocess.Popen([*rig.prefix(), "sh", "-c", PRINT_BIG], stdout=subprocess.PIPE)
    time.sleep(0.5)  # its window is full: nobody reads it
    start = time.monotonic()
    rc, out, _ = rig.helper("sh", "-c", "head -c 5000000 /dev/zero | wc -c")
    assert (rc, out) == (0, b"5000000\n")
    assert time.monotonic() - start < 10
    sha, size, _ = _slow_read(rig, slow)
    assert slow.wait(30) == 0 and (size, sha) == (BIG, BIG_SHA)


def test_an_older_agent_is_read_no_faster_than_its_clients(old_agent_rig: Rig) -> None:
    rig = old_agent_rig
    proc = subprocess.Popen([*rig.prefix(), "sh", "-c", PRINT_BIG], stdout=subprocess.PIPE)
    sha, size, most = _slow_read(rig, proc)
    assert proc.wait(30) == 0
    assert (size, sha) == (BIG, BIG_SHA)
    assert most <= BUFFER_LIMIT + (1 << 20)


def test_in_process_request_streams_output_with_a_bounded_buffer(rig: Rig) -> None:
    digest, most, size = hashlib.sha256(), 0, 0

    def slow_writer(data: bytes) -> None:
        nonlocal most, size
        digest.update(data)
        size += len(data)
        most = max(most, rig.mux.buffered_bytes())
        time.sleep(0.0005)

    errors = bytearray()
    outcome = rig.mux.request(
        FrameType.EXEC, {"argv": ["sh", "-c", PRINT_BIG]}, out=slow_writer, err=errors.extend
    )
    assert outcome.exit_status == 0 and errors == b""
    assert (size, digest.hexdigest()) == (BIG, BIG_SHA)
    assert most <= OUTPUT_WINDOW + (256 << 10)


def test_in_process_request_stdin_status_and_timeout(rig: Rig) -> None:
    out = bytearray()
    blob = os.urandom(3 << 20)  # more than the stdin window
    outcome = rig.mux.request(
        FrameType.EXEC,
        {"argv": ["cat"], "stdin": True},
        stdin=io.BytesIO(blob),
        out=out.extend,
        err=out.extend,
    )
    assert outcome.exit_status == 0 and out == blob
    missing = rig.mux.request(
        FrameType.EXEC, {"argv": ["/nonexistent"]}, out=out.extend, err=out.extend
    )
    assert missing.exit_status == 127 and missing.request_fault
    with pytest.raises(MuxTimeout):
        rig.mux.request(
            FrameType.EXEC, {"argv": ["sleep", "30"]}, out=out.extend, err=out.extend, timeout=0.5
        )
    # the channel is still usable, and the helpers still work beside it
    assert (
        rig.mux.request(FrameType.EXEC, {"argv": ["true"]}, out=out.extend, err=out.extend).status
        == 0
    )
    assert rig.helper("true")[0] == 0
