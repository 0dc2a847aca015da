"""Fixtures for driving virt servers over their stdin/stdout."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from nestbed.errors import UsageError
from nestbed.testbed.client import resolve_virt_server

AUTOPKGTEST_NULL = "/usr/bin/autopkgtest-virt-null"


def nestbed_null_argv() -> list[str]:
    """Our server: the installed script if there is one, else the module (a fresh clone)."""
    try:
        return resolve_virt_server("null")
    except UsageError:
        return [sys.executable, "-m", "nestbed.virt.null"]


@pytest.fixture
def null_argv() -> list[str]:
    return nestbed_null_argv()


@pytest.fixture
def autopkgtest_null_argv() -> list[str]:
    if not os.access(AUTOPKGTEST_NULL, os.X_OK):
        pytest.skip("autopkgtest is not installed")
    return [AUTOPKGTEST_NULL]


@pytest.fixture(params=["nestbed", "autopkgtest"])
def any_null_argv(request: pytest.FixtureRequest) -> list[str]:
    """Both null servers, for behaviour that must be the same."""
    if request.param == "nestbed":
        return nestbed_null_argv()
    if not os.access(AUTOPKGTEST_NULL, os.X_OK):
        pytest.skip("autopkgtest is not installed")
    return [AUTOPKGTEST_NULL]


@pytest.fixture
def scratch_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private TMPDIR, so scratch dirs can be counted without seeing other runs' ones."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    return d


class Driver:
    """One server process, driven a line at a time."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            umask=0o022,
            start_new_session=True,
        )
        self.buf = b""
        self.eof = False

    def readline(self, timeout: float = 30) -> str | None:
        """The next answer line, None at EOF."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"server did not answer within {timeout}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                self.buf += chunk
                self.eof = not chunk
        if b"\n" not in self.buf:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("UTF-8", "surrogateescape")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode("UTF-8", "surrogateescape") + b"\n")
        self.proc.stdin.flush()

    def ask(self, line: str) -> str | None:
        self.send(line)
        return self.readline()

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Close stdin and wait; (exit status, stderr). autopkgtest's servers never notice
        EOF, so one still running gets SIGTERM (and releases its testbed on it)."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait(timeout)
        err = self.proc.stderr.read().decode("UTF-8", "replace")
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return rc, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def drivers() -> Iterator[list[Driver]]:
    """Collects drivers so none outlives its test."""
    started: list[Driver] = []
    yield started
    for d in started:
        d.kill()
        for stream in (d.proc.stdin, d.proc.stdout, d.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def have_root() -> bool:
    return os.getuid() == 0


def which(prog: str) -> str | None:
    return shutil.which(prog)
