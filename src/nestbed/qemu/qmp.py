"""One QMP connection to a QEMU process, kept open for the machine's life, with its events.

QEMU's monitor speaks JSON lines on a unix socket: a greeting, then replies to commands and,
between them, asynchronous events (SHUTDOWN with its reason, RESET, STOP, GUEST_PANICKED,
...). One reader thread reads every line: events are queued for whoever asks (why QEMU ended
is then known, not guessed from its exit status), replies are matched to their command by
the `id` QMP echoes back, so a reply that comes after its command gave up waiting cannot be
taken for the next command's. Commands may be sent from any thread.

Not the QEMU project's `qemu.qmp`: it is not packaged in Debian 12, and the nested image
carries nestbed with only its apt-installed dependencies.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_EVENTS = 1000  # a guest rebooting in a loop must not grow the queue without bound


class QMPError(Exception):
    """The connection failed or closed, a reply did not come in time, or QEMU refused."""


@dataclass(frozen=True)
class Event:
    name: str  # "SHUTDOWN", "RESET", "STOP", "GUEST_PANICKED", ...
    data: dict[str, Any]


class QMPClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._ids = itertools.count(1)
        self._cond = threading.Condition()  # guards everything below
        self._send = threading.Lock()  # one writer at a time: lines are not interleaved
        self._replies: dict[int, dict[str, Any]] = {}
        self._waiting: set[int] = set()  # replies nobody waits for any more are dropped
        self._events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="qmp-reader", daemon=True)

    @classmethod
    def connect(cls, path: Path, timeout: float = 10.0) -> QMPClient:
        """Connect, read the greeting and leave capabilities negotiation mode. QEMU binds
        the socket (the file appears) a moment before it listens: a refused connection is
        tried again until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(os.fspath(path))
                break
            except (ConnectionRefusedError, FileNotFoundError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QMPError(f"cannot connect to QMP at {path}: {e}") from None
                time.sleep(0.02)
            except OSError as e:
                sock.close()
                raise QMPError(f"cannot connect to QMP at {path}: {e}") from None
        client = cls(sock)
        try:
            greeting = json.loads(client._file.readline() or b"null")
            if not isinstance(greeting, dict) or "QMP" not in greeting:
                raise QMPError(f"not a QMP greeting: {greeting!r}")
            sock.settimeout(None)  # the reader blocks; commands time out on their own
            client._reader.start()
            client.execute("qmp_capabilities", timeout=timeout)
        except (OSError, ValueError) as e:
            client.close()
            raise QMPError(f"cannot connect to QMP at {path}: {e}") from None
        except QMPError:
            client.close()
            raise
        return client

    # -- commands -----------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 10.0) -> Any:  # fmt: skip
        """Run one command; its 'return' value, or QMPError."""
        with self._cond:
            if self._closed:
                raise QMPError(f"{command}: the QMP connection is closed")
            ident = next(self._ids)
            self._waiting.add(ident)
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        try:
            with self._send:
                self._sock.sendall(json.dumps(request).encode() + b"\n")
            reply = self._wait_reply(ident, time.monotonic() + timeout)
        except OSError as e:
            raise QMPError(f"{command}: {e}") from None
        finally:
            with self._cond:
                self._waiting.discard(ident)
                self._replies.pop(ident, None)
        if reply is None:
            raise QMPError(f"{command}: no reply in {timeout:g} s")
        if "error" in reply:
            raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def _wait_reply(self, ident: int, deadline: float) -> dict[str, Any] | None:
        with self._cond:
            while ident not in self._replies:
                if self._closed:
                    raise QMPError("the QMP connection closed (QEMU ended?)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._replies[ident]

    # -- events -------------------------------------------------------------------------
    def events(self) -> list[Event]:
        """Every event received so far (the latest MAX_EVENTS), oldest first."""
        with self._cond:
            return list(self._events)

    def wait_closed(self, timeout: float) -> bool:
        """Wait until QEMU has closed the connection (it does so as it exits), so every
        event it sent has been read; whether it has."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    # -- the reader ---------------------------------------------------------------------
    def _read(self) -> None:
        try:
            for line in self._file:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # not JSON: nothing a caller could wait for
                if isinstance(message, dict):
                    self._dispatch(message)
        except (OSError, ValueError):
            pass  # closed under us (close()), or QEMU went away
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._cond:
            if "event" in message:
                self._events.append(Event(str(message["event"]), message.get("data") or {}))
            elif message.get("id") in self._waiting:
                self._replies[message["id"]] = message
            else:
                return  # a late reply to a command that gave up
            self._cond.notify_all()

    def close(self) -> None:
        """Close the connection and wait for the reader; safe to call more than once."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        self._file.close()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
