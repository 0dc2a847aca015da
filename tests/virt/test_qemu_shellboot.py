"""The serial-shell driver against a real shell on a real tty (a pty), as a guest's ttyS1 is.

The shell only appears a moment after the host starts talking (as in a booting guest: what
is sent before is lost), it echoes input until told not to, and it prints prompts."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pty
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed.qemu.machine import MachineError
from nestbed.qemu.shellboot import SerialShell, wait_for_login_prompt

SHELL_DELAY = 1.5  # seconds before the shell starts reading the tty


class PtyShell:
    """A unix socket whose peer is `sh -i` on a pty, started SHELL_DELAY after connecting."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.fspath(path))
        self.listener.listen(1)
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # the test is over: sockets closed under us
            self._relay()

    def _relay(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(0.05)
        started = time.monotonic()
        while time.monotonic() - started < SHELL_DELAY:  # no shell yet: input is lost
            try:
                if not conn.recv(65536):
                    return
            except TimeoutError:
                pass
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            ["sh", "-i"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
        os.close(slave)
        conn.setblocking(True)

        def to_shell() -> None:
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    os.write(master, data)

        threading.Thread(target=to_shell, daemon=True).start()
        while data := os.read(master, 65536):
            conn.sendall(data)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.listener.close()


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[SerialShell]:
    server = PtyShell(tmp_path / "ttyS1.sock")
    client = SerialShell(tmp_path / "ttyS1.sock", alive=lambda: True)
    try:
        yield client
    finally:
        client.close()
        server.close()


def test_ready_once_the_shell_answers_with_this_boot_id(shell: SerialShell) -> None:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert shell.wait_ready(time.monotonic() + 30) == boot_id


def test_an_answer_from_the_old_boot_is_not_taken(shell: SerialShell) -> None:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with pytest.raises(MachineError, match=r"no root shell answered .*ttyS1"):
        shell.wait_ready(time.monotonic() + 6, not_boot_id=boot_id)


def test_run_gives_status_and_output_not_the_echoed_request(shell: SerialShell) -> None:
    shell.wait_ready(time.monotonic() + 30)
    status, out = shell.run("echo one; echo two; false", time.monotonic() + 30)
    assert status == 1
    assert out.split() == ["one", "two"]


def test_a_large_here_document_arrives_intact(shell: SerialShell, tmp_path: Path) -> None:
    payload = os.urandom(200_000)
    target = tmp_path / "copy.bin"
    shell.wait_ready(time.monotonic() + 30)
    lines = base64.encodebytes(payload).decode().splitlines()
    for i in range(0, len(lines), 100):
        chunk = "\n".join(lines[i : i + 100])
        status, out = shell.run(
            f"base64 -d >>{target} <<'EOF'\n{chunk}\nEOF", time.monotonic() + 30
        )
        assert status == 0, out
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(payload).digest()


def test_a_dead_machine_ends_the_wait(tmp_path: Path) -> None:
    server = PtyShell(tmp_path / "ttyS1.sock")
    client = SerialShell(tmp_path / "ttyS1.sock", alive=lambda: False)
    try:
        with pytest.raises(MachineError, match="QEMU exited"):
            client.wait_ready(time.monotonic() + 30)
    finally:
        client.close()
        server.close()


# ---- nothing is typed before the login prompt ----------------------------------------------


def _write_later(path: Path, data: bytes, delay: float) -> threading.Thread:
    def write() -> None:
        time.sleep(delay)
        with open(path, "ab") as f:
            f.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_the_wait_ends_at_a_prompt_written_after_it_began(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"BdsDxe: loading Boot0001\r\n")
    writer = _write_later(console, b"\r\nDebian GNU/Linux 12 host ttyS0\r\n\r\nhost lo", 0.6)
    _write_later(console, b"gin: ", 1.2)  # the prompt split across two reads
    started = time.monotonic()
    wait_for_login_prompt(console, 0, time.monotonic() + 30, alive=lambda: True)
    assert time.monotonic() - started >= 1.2
    writer.join()


def test_the_old_boots_prompt_is_not_taken(tmp_path: Path) -> None:
    """After a reboot the wait starts behind the prompt the console showed before it."""
    console = tmp_path / "console.log"
    console.write_bytes(b"host login: \r\n[  OK  ] Stopped target Multi-User System.\r\n")
    with pytest.raises(MachineError, match=r"no login prompt on the serial console \(ttyS0\)"):
        wait_for_login_prompt(
            console, console.stat().st_size, time.monotonic() + 2, alive=lambda: True
        )


def test_a_machine_gone_before_its_prompt_ends_the_wait(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"")
    with pytest.raises(MachineError, match="QEMU exited"):
        wait_for_login_prompt(console, 0, time.monotonic() + 30, alive=lambda: False)
