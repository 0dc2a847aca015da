"""Start nestbed's agent in a guest whose only way in is a root shell on a serial port.

Images made by autopkgtest's builders carry no nestbed agent: autopkgtest's setup-testbed
starts a root shell on the second serial port (ttyS1) instead. nestbed uses that shell for
one thing only: after every boot it copies its agent into the guest (/run/nestbed-agent,
gone with the next boot) and starts it on the virtio-serial port. Every command after that
goes through the agent, framed and binary-safe, as with nestbed's own images: nothing a
test prints on a console can confuse the testbed.

The shell is driven line by line, in canonical tty mode: each request starts with ^U (kill
the line, so half a line typed before the shell was there is dropped), input echo is turned
off, and every answer carries a fresh nonce in a form the echoed request cannot contain
("A" "B" typed, `A B` printed). The agent is a tar.gz sent as base64 here-documents in
chunks, each acknowledged before the next: the guest's tty buffers are never overrun.

Nothing is typed on the serial ports before the guest's login prompt shows on the console
(ttyS0), as autopkgtest's own QEMU server waits for it too: firmware and boot loaders read
keys from the serial ports, and a probe typed into OVMF's boot menu keeps the guest there.

The agent needs Python 3 and its json package; python3-minimal (which is what
setup-testbed installs) has no json, so the standard library's own json package (pure
Python) travels with the agent, searched after the guest's own modules.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import socket
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from nestbed.guest import agent as agent_mod
from nestbed.qemu.machine import MachineError, tail_lines

GUEST_DIR = "/run/nestbed-agent"
CHUNK_LINES = 100  # base64 lines (76 characters) per acknowledged here-document
PROBE_EVERY = 2.0  # seconds between readiness probes while the guest boots
_KILL_LINE = b"\x15"  # ^U: VKILL in canonical mode

# Runs in the guest's shell (dash) as one request; never `exit` (that ends the shell).
# $1: the agent's virtio-serial port name. Prints `nestbed-agent-error: ...` or
# `nestbed-agent-running` once the agent has the port open.
_START_AGENT = r"""
nb_start() {
  if ! command -v python3 >/dev/null 2>&1; then
    echo "nestbed-agent-error: the guest has no python3 (nestbed's agent needs it)"; return 1
  fi
  modprobe virtio_console >/dev/null 2>&1
  nb_port= ; nb_i=0
  while [ -z "$nb_port" ] && [ $nb_i -lt 300 ]; do
    for nb_d in /sys/class/virtio-ports/*; do
      if [ "$(cat "$nb_d/name" 2>/dev/null)" = "$1" ] && [ -c "/dev/${nb_d##*/}" ]; then
        nb_port=/dev/${nb_d##*/}
      fi
    done
    [ -n "$nb_port" ] || { nb_i=$((nb_i + 1)); sleep 0.1; }
  done
  if [ -z "$nb_port" ]; then
    echo "nestbed-agent-error: no virtio-serial port named $1 in the guest"; return 1
  fi
  cd GUEST_DIR && tar -xzf agent.tgz && rm -f agent.tgz || return 1
  nb_py='import runpy, sys; sys.path.append("GUEST_DIR/lib")
runpy.run_path("GUEST_DIR/agent.py", run_name="__main__")'
  (setsid python3 -c "$nb_py" --port "$nb_port" </dev/null >GUEST_DIR/agent.log 2>&1 &
   echo $! >GUEST_DIR/agent.pid)
  cd /
  nb_pid=$(cat GUEST_DIR/agent.pid); nb_i=0
  while [ $nb_i -lt 600 ]; do
    if ! kill -0 "$nb_pid" 2>/dev/null; then
      echo "nestbed-agent-error: the agent exited: $(tail -n 3 GUEST_DIR/agent.log | tr '\n' ' ')"
      return 1
    fi
    for nb_f in /proc/$nb_pid/fd/*; do
      if [ "$(readlink "$nb_f")" = "$nb_port" ]; then echo "nestbed-agent-running"; return 0; fi
    done
    nb_i=$((nb_i + 1)); sleep 0.1
  done
  echo "nestbed-agent-error: the agent did not open $nb_port"; return 1
}
""".replace("GUEST_DIR", GUEST_DIR)


def agent_bundle() -> bytes:
    """The agent and the stdlib json package, as a tar.gz (agent.py, lib/json/*.py)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(agent_mod.__file__, arcname="agent.py")
        json_dir = Path(json.__file__).parent
        for source in sorted(json_dir.glob("*.py")):
            tf.add(source, arcname=f"lib/json/{source.name}")
    return buf.getvalue()


LOGIN_PROMPT = b" login: "  # what autopkgtest-virt-qemu waits for on the serial console
PROMPT_POLL = 0.5  # seconds between looks at the console log


def wait_for_login_prompt(
    console_log: Path, offset: int, deadline: float, alive: Callable[[], bool]
) -> None:
    """Wait until the console log shows a login prompt after byte `offset` (a reboot's
    wait starts after the old boot's prompt)."""
    pos = offset
    tail = b""
    while True:
        try:
            with open(console_log, "rb") as f:
                f.seek(pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        pos += len(data)
        if LOGIN_PROMPT in tail + data:
            return
        tail = (tail + data)[-len(LOGIN_PROMPT) :]
        if not alive():
            raise MachineError("QEMU exited while the guest was booting")
        if time.monotonic() >= deadline:
            raise MachineError(
                "no login prompt on the serial console (ttyS0) in time; the root shell on"
                " ttyS1 is used only after one, as autopkgtest does"
            )
        time.sleep(PROMPT_POLL)


class SerialShell:
    """The guest's root shell on a serial port (the host end: a unix socket of QEMU's)."""

    def __init__(self, path: Path, alive: Callable[[], bool]) -> None:
        self._path = path
        self._alive = alive
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self.transcript = bytearray()  # everything the shell said (the tail goes into errors)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(self._path))
            except OSError as e:
                sock.close()
                raise MachineError(f"cannot connect to the serial shell's socket: {e}") from None
            self._sock = sock
        return self._sock

    def _send(self, text: str) -> None:
        try:
            self._connected().sendall(_KILL_LINE + text.encode())
        except OSError as e:
            raise MachineError(f"cannot write to the serial shell: {e}") from None

    def _expect(self, pattern: re.Pattern[bytes], until: float) -> re.Match[bytes] | None:
        """The first match of `pattern` in what the shell says before `until` (consumed with
        everything before it), or None."""
        sock = self._connected()
        while True:
            found = pattern.search(bytes(self._buf))  # a match must outlive the buffer edit
            if found is not None:
                del self._buf[: found.end()]
                return found
            if not self._alive():
                raise MachineError("QEMU exited while the guest was booting")
            remaining = until - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(min(remaining, 0.5))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise MachineError(f"cannot read from the serial shell: {e}") from None
            if not data:
                raise MachineError("the serial shell's socket closed")
            data = data.replace(b"\r", b"")
            self._buf += data
            self.transcript = (self.transcript + data)[-8192:]

    def tail(self, lines: int = 5) -> str:
        return tail_lines(self.transcript.decode("utf-8", "replace"), lines)

    def wait_ready(self, deadline: float, *, not_boot_id: str = "") -> str:
        """Probe until the shell answers from a boot other than `not_boot_id` (so the old
        shell, still there while a reboot begins, is not taken); the boot id."""
        while True:
            nonce = secrets.token_hex(6)
            self._send(
                'stty -echo 2>/dev/null; PS1=; PS2=; echo "nestbed-shell-ready" "'
                + nonce
                + '" "$(cat /proc/sys/kernel/random/boot_id)"\n'
            )
            until = min(deadline, time.monotonic() + PROBE_EVERY)
            pattern = re.compile(rb"nestbed-shell-ready " + nonce.encode() + rb" (\S+)\n")
            while (found := self._expect(pattern, until)) is not None:
                boot_id = found.group(1).decode()
                if boot_id != not_boot_id:
                    return boot_id
            if time.monotonic() >= deadline:
                why = "no root shell answered on the second serial port (ttyS1)"
                raise MachineError(f"{why}; it says: {self.tail()}" if self.tail() else why)

    def run(self, script: str, deadline: float) -> tuple[int, str]:
        """Run `script` (one or more lines) in the shell; its exit status and output."""
        nonce = secrets.token_hex(6)
        self._send(f'{script}\necho "nestbed-shell-done" "{nonce}" "$?"\n')
        pattern = re.compile(rb"(?s)(.*?)nestbed-shell-done " + nonce.encode() + rb" (\d+)\n")
        found = self._expect(pattern, deadline)
        if found is None:
            raise MachineError(f"the serial shell did not finish a request in time: {self.tail()}")
        return int(found.group(2)), found.group(1).decode("utf-8", "replace")

    def start_agent(self, port_name: str, deadline: float) -> None:
        """Copy the agent into the guest and start it on the virtio-serial port `port_name`."""
        status, out = self.run(f"rm -rf {GUEST_DIR} && mkdir -m 700 {GUEST_DIR}", deadline)
        if status != 0:
            raise MachineError(f"cannot make {GUEST_DIR} in the guest: {out.strip()}")
        lines = base64.encodebytes(agent_bundle()).decode().splitlines()
        for i in range(0, len(lines), CHUNK_LINES):
            chunk = "\n".join(lines[i : i + CHUNK_LINES])
            script = f"base64 -d >>{GUEST_DIR}/agent.tgz <<'NESTBED_EOF'\n{chunk}\nNESTBED_EOF"
            status, out = self.run(script, deadline)
            if status != 0:
                raise MachineError(f"cannot copy nestbed's agent into the guest: {out.strip()}")
        status, out = self.run(f"{_START_AGENT}nb_start {port_name}", deadline)
        if status == 0 and "nestbed-agent-running" in out:
            return
        error = re.search(r"nestbed-agent-error: *(.*)", out)
        detail = error.group(1).strip() if error else out.strip()[-300:]
        raise MachineError(f"cannot start nestbed's agent in the guest: {detail}")
