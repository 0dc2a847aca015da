"""The runner's Testbed against both null servers and against misbehaving ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nestbed import errors
from nestbed.testbed import client
from nestbed.testbed.client import CommandTimeout, ExecResult, resolve_virt_server

FAKE = [sys.executable, str(Path(__file__).with_name("fake_virt_server.py"))]


def fake(mode: str) -> list[str]:
    return [*FAKE, mode]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- with real servers -------------------------------------------------------------------


def test_session(any_null_argv: list[str], scratch_tmp: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    with client.Testbed(any_null_argv, debug=True, log=logs.append) as tb:
        tb.start()
        scratch = tb.open()
        assert tb.scratch == scratch
        assert scratch.startswith(str(scratch_tmp))
        assert os.path.isdir(scratch)
        assert "isolation-machine" in tb.caps
        assert f"downtmp-host={scratch}" in tb.caps
        assert ("root-on-testbed" in tb.caps) == (os.getuid() == 0)
        assert tb.exec_prefix == ["env"]
        assert tb.normal_user is None

        r = tb.execute(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert r == ExecResult(3, b"out\n", b"err\n")
        r = tb.execute(["sh", "-c", 'printf %s "$V"; cat'], stdin=b"in", env={"V": "a b"})
        assert r.stdout == b"a bin"
        if os.getuid() == 0:
            assert tb.execute(["id", "-un"], user="nobody").stdout == b"nobody\n"

        p = tb.popen(["sh", "-c", "echo streamed; exec sleep 30"], stdout=subprocess.PIPE)
        assert p.stdout is not None
        assert p.stdout.readline() == b"streamed\n"
        assert os.getpgid(p.pid) == p.pid  # its own group, for os.killpg
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()

        host = tmp_path / "tree with space"
        host.mkdir()
        (host / "f%1").write_text("x")
        tb.copydown(f"{host}/", f"{scratch}/t 1/")
        assert (Path(scratch) / "t 1" / "f%1").read_text() == "x"
        tb.copyup(f"{scratch}/t 1/f%1", str(tmp_path / "back"))
        assert (tmp_path / "back").read_text() == "x"

        with pytest.raises(errors.TestbedFailure, match="cannot revert"):
            tb.revert()
        with pytest.raises(errors.TestbedFailure, match="cannot reboot"):
            tb.reboot(prepare_only=True)
        with pytest.raises(ValueError):
            tb.copydown(f"{host}/", f"{scratch}/x")

        tb.close()
        tb.close()  # idempotent
        assert not tb.is_open
        assert tb.open() == scratch  # the same path again, as autopkgtest requires
    assert not os.path.exists(scratch)
    assert list(scratch_tmp.iterdir()) == []
    assert "virt> open" in logs


def test_execute_timeout_kills_group(any_null_argv: list[str], scratch_tmp: Path) -> None:
    with client.Testbed(any_null_argv, log=lambda s: None) as tb:
        tb.start()
        tb.open()
        start = time.monotonic()
        with pytest.raises(CommandTimeout, match=r"timed out after 0\.5s"):
            # the grandchild holds the pipes: the whole group must die
            tb.execute(["sh", "-c", "sleep 60 & sleep 60; wait"], timeout=0.5)
        assert time.monotonic() - start < 15
        assert isinstance(CommandTimeout("x"), errors.TestbedFailure)


def test_copy_failure_is_virt_server_error(null_argv: list[str], scratch_tmp: Path) -> None:
    with client.Testbed(null_argv, log=lambda s: None) as tb:
        tb.start()
        scratch = tb.open()
        with pytest.raises(errors.VirtServerError, match="copy-failed"):
            tb.copydown("/nonexistent/file", f"{scratch}/x")
        # the testbed is still usable afterwards
        assert tb.execute(["true"]).returncode == 0


def test_exception_in_block_releases_everything(
    any_null_argv: list[str], scratch_tmp: Path
) -> None:
    with pytest.raises(RuntimeError), client.Testbed(any_null_argv, log=lambda s: None) as tb:
        tb.start()
        tb.open()
        assert tb._proc is not None
        pid = tb._proc.pid
        raise RuntimeError("boom")
    assert not alive(pid)
    assert list(scratch_tmp.iterdir()) == []


def test_server_killed_from_outside(null_argv: list[str], scratch_tmp: Path) -> None:
    tb = client.Testbed(null_argv, log=lambda s: None)
    try:
        tb.start()
        tb.open()
        assert tb._proc is not None
        tb._proc.send_signal(signal.SIGKILL)
        tb._proc.wait()
        with pytest.raises(
            errors.VirtServerError, match="killed by signal 9 during `capabilities'"
        ):
            tb.query_capabilities()
    finally:
        tb.release()


def test_quit_reports_server_dead_between_commands(null_argv: list[str], scratch_tmp: Path) -> None:
    tb = client.Testbed(null_argv, log=lambda s: None)
    tb.start()
    tb.open()
    assert tb._proc is not None
    tb._proc.send_signal(signal.SIGKILL)
    tb._proc.wait()
    with pytest.raises(errors.VirtServerError, match="exited unexpectedly with status -9"):
        tb.quit()
    assert tb._proc is None


# ---- with misbehaving servers --------------------------------------------------------------


def test_server_dies_mid_command() -> None:
    tb = client.Testbed(fake("die-on-open"), log=lambda s: None)
    tb.start()
    with pytest.raises(errors.VirtServerError) as e:
        tb.open()
    assert "exited with status 3 during `open'" in str(e.value)
    assert "fake: the hypervisor fell over" in str(e.value)
    tb.release()
    assert tb._proc is None


def test_server_failure_line_survives_a_long_explanation() -> None:
    """The line that says why comes first in the message even when the console's tail
    after it is longer than the three lines kept otherwise."""
    tb = client.Testbed(fake("fail-with-console"), log=lambda s: None)
    tb.start()
    with pytest.raises(errors.VirtServerError) as e:
        tb.open()
    message = str(e.value)
    assert "exited with status 12 during `open': fake: failure: no root shell answered" in message
    assert message.endswith("console line 6")
    tb.release()


def test_server_never_answers() -> None:
    tb = client.Testbed(fake("silent"), log=lambda s: None)
    tb.start()
    assert tb._proc is not None
    pid = tb._proc.pid
    start = time.monotonic()
    with pytest.raises(errors.TestbedFailure, match="did not answer `open' within 1s"):
        tb.open(timeout=1)
    assert time.monotonic() - start < 15
    assert not alive(pid)
    with pytest.raises(errors.TestbedFailure):
        tb.query_capabilities()
    tb.release()


def test_exec_prefix_exit_255(tmp_path: Path) -> None:
    with client.Testbed(fake("prefix-255"), log=lambda s: None) as tb:
        tb.start()
        tb.open()
        with pytest.raises(errors.TestbedFailure, match="exec prefix failed with exit status 255"):
            tb.execute(["true"])


def test_first_suggested_normal_user() -> None:
    with client.Testbed(fake("prefix-255"), log=lambda s: None) as tb:
        tb.start()
        tb.open()
        assert tb.normal_user == "tester"
        assert "isolation-container" in tb.caps


def test_start_failures_report_and_clean_up(tmp_path: Path) -> None:
    tb = client.Testbed(fake("exit-early"), log=lambda s: None)
    with pytest.raises(errors.VirtServerError, match=r"exited with status 1.*fake: cannot start"):
        tb.start()
    assert tb._proc is None

    tb = client.Testbed(fake("bad-banner"), log=lambda s: None)
    with pytest.raises(errors.VirtServerError, match="got banner `hello'"):
        tb.start()
    assert tb._proc is None

    with pytest.raises(errors.TestbedFailure, match="cannot start virt server"):
        client.Testbed([str(tmp_path / "missing")]).start()


def test_wrong_number_of_results() -> None:
    with client.Testbed(fake("bad-results"), log=lambda s: None) as tb:
        tb.start()
        with pytest.raises(errors.VirtServerError, match="expected 1"):
            tb.open()


def test_quit_reports_exit_status() -> None:
    tb = client.Testbed(fake("quit-fails"), log=lambda s: None)
    tb.start()
    with pytest.raises(errors.VirtServerError, match="exit status 5 after quit"):
        tb.quit()
    assert tb._proc is None


def test_server_stderr_goes_to_log() -> None:
    logs: list[str] = []
    tb = client.Testbed(fake("die-on-open"), log=logs.append)
    tb.start()
    with pytest.raises(errors.VirtServerError):
        tb.open()
    tb.release()
    assert "fake: the hypervisor fell over" in logs


# ---- resolving names -----------------------------------------------------------------------


def test_resolve_virt_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_virt_server("/usr/bin/autopkgtest-virt-null") == [
        "/usr/bin/autopkgtest-virt-null"
    ]
    with pytest.raises(errors.UsageError, match="nestbed-virt-bogus"):
        resolve_virt_server("bogus")
    beside = Path(sys.executable).with_name("nestbed-virt-null")
    if beside.exists():
        monkeypatch.setenv("PATH", "/nonexistent")
        assert resolve_virt_server("null") == [str(beside)]
    # not beside this Python: PATH
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nestbed-virt-fake").write_text("#!/bin/sh\n")
    (bindir / "nestbed-virt-fake").chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    assert resolve_virt_server("fake") == [str(bindir / "nestbed-virt-fake")]


def test_resolve_virt_server_by_autopkgtest_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """NAME is nestbed-virt-NAME, else autopkgtest-virt-NAME; either prefix names a program."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for prog in ("nestbed-virt-both", "autopkgtest-virt-both", "autopkgtest-virt-theirs"):
        (bindir / prog).write_text("#!/bin/sh\n")
        (bindir / prog).chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    assert resolve_virt_server("both") == [str(bindir / "nestbed-virt-both")]
    assert resolve_virt_server("theirs") == [str(bindir / "autopkgtest-virt-theirs")]
    assert resolve_virt_server("autopkgtest-virt-both") == [str(bindir / "autopkgtest-virt-both")]
    assert resolve_virt_server("nestbed-virt-both") == [str(bindir / "nestbed-virt-both")]
    with pytest.raises(errors.UsageError) as e:
        resolve_virt_server("nothing")
    assert "'nothing'" in str(e.value)
    assert "nestbed-virt-nothing nor autopkgtest-virt-nothing" in str(e.value)
    # an explicit prefix is not prefixed again
    with pytest.raises(errors.UsageError, match="no autopkgtest-virt-theirs2 in"):
        resolve_virt_server("autopkgtest-virt-theirs2")
