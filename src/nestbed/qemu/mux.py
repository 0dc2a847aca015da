"""One guest agent channel shared by many short-lived clients: the exec multiplexer.

The virt server owns the single virtio-serial connection to the guest agent. It listens on a
private unix socket; each client (an exec helper started by the runner, or the server itself
for copies) speaks the agent's own frame format there (docs/agent.md) with its own stream
ids. The multiplexer maps every client stream to a stream id of its own on the agent channel
and routes frames both ways, so many commands can run at once over one port.

- EXEC, PUT, GET, STDIN and SIGNAL frames from clients are forwarded (stream id rewritten);
  PING is answered locally; HELLO is refused (it would reset the agent for everyone).
- Frames from the agent go to the client whose stream they belong to.
- A client that disconnects before its stream's EXIT gets its processes killed (SIGNAL 9):
  killing an exec helper kills the command in the guest.
- When the channel breaks (QEMU died) or the console shows a kernel panic, the multiplexer
  is `dead`: every client is disconnected (helpers exit 255) and new ones are refused.

It runs in a thread; the server's main thread only calls `start`, `hello`, `stop` and reads
`dead`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nestbed.guest.agent import CHUNK, NONCE_SIZE, Decoder, T, encode, encode_json

PANIC_MARKERS = (b"Kernel panic - not syncing", b"---[ end Kernel panic")
_FORWARDED = (T.EXEC, T.PUT, T.GET)
_LAST = (T.EXIT, T.ERROR)


class MuxDead(Exception):
    """The agent channel is gone; the message says why."""


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    decoder: Decoder = field(default_factory=Decoder)
    out: bytearray = field(default_factory=bytearray)
    streams: dict[int, int] = field(default_factory=dict)  # client stream -> agent stream
    closed: bool = False


class Mux:
    def __init__(
        self,
        agent: socket.socket,
        listen_path: Path,
        console_log: Path | None = None,
        *,
        agent_path: Path | None = None,
        alive: Callable[[], bool] | None = None,
        exit_note: Callable[[], str] | None = None,
        reset_expected: Callable[[], bool] | None = None,
    ) -> None:
        self._agent = agent
        self._agent_path = agent_path  # to reconnect when QEMU drops the connection
        self._alive = alive
        self._exit_note = exit_note  # why QEMU is gone, once it is
        self._reset_expected = reset_expected  # a reset now is a reboot, not QEMU ending
        self._own_agent = False  # a reconnected socket is ours to close
        self._agent.setblocking(False)
        self._agent_out = bytearray()
        self._decoder = Decoder()
        self.listen_path = listen_path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(os.fspath(listen_path))
        os.chmod(listen_path, 0o600)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._console = console_log
        self._console_pos = 0
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._clients: set[_Client] = set()
        self._routes: dict[int, tuple[_Client | None, int]] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.dead: str | None = None
        # hello requested by the main thread: nonces sent, when to resend, the reply
        self._hello_nonces: set[bytes] = set()
        self._hello_wanted = False
        self._hello_next = 0.0
        self._hello_reply: dict[str, Any] | None = None
        self._hello_done = threading.Event()

    # -- main-thread API ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nestbed-mux", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Disconnect everyone and end the thread (the agent socket is left to its owner)."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for c in list(self._clients):
            self._drop(c)
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.listen_path)
        if self._own_agent:
            with contextlib.suppress(OSError):
                self._agent.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._sel.close()

    def hello(self, timeout: float, *, not_boot_id: str | None = None) -> dict[str, Any]:
        """Say HELLO until the agent answers (one whose boot_id is not `not_boot_id`, when
        given: the agent of the next boot). HELLO resets the agent: streams still running
        end with an ERROR to their clients."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._hello_reply = None
                self._hello_done.clear()
                self._hello_wanted = True
                self._hello_next = 0.0
            self._wake()
            remaining = deadline - time.monotonic()
            if not self._hello_done.wait(max(0.0, remaining)):
                with self._lock:
                    self._hello_wanted = False
                raise MuxDead(self.dead or f"the guest agent did not answer in {timeout:g} s")
            if self.dead:
                raise MuxDead(self.dead)
            reply: dict[str, Any] = self._hello_reply or {}
            if not_boot_id is None or reply.get("boot_id") != not_boot_id:
                return reply
            time.sleep(0.5)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        self._sel.register(self._agent, selectors.EVENT_READ, "agent")
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                self._maybe_hello()
                self._update_interest()
                for key, events in self._sel.select(0.5):
                    tag = key.data
                    if tag == "agent":
                        if events & selectors.EVENT_WRITE:
                            self._write_agent()
                        if events & selectors.EVENT_READ:
                            self._read_agent()
                    elif tag == "listen":
                        self._accept()
                    elif tag == "wake":
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                    elif isinstance(tag, _Client):
                        if events & selectors.EVENT_WRITE:
                            self._write_client(tag)
                        if events & selectors.EVENT_READ and not tag.closed:
                            self._read_client(tag)
                self._check_console()
        except Exception as e:  # never silently: a dead mux fails every command
            self._die(f"exec multiplexer failed: {e}")

    def _update_interest(self) -> None:
        if self.dead is None:
            ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._agent_out else 0)
            self._sel.modify(self._agent, ev, "agent")
        for c in self._clients:
            ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
            self._sel.modify(c.sock, ev, c)

    def _maybe_hello(self) -> None:
        with self._lock:
            if not self._hello_wanted or self.dead:
                if self.dead:
                    self._hello_done.set()
                return
            now = time.monotonic()
            if now < self._hello_next:
                return
            nonce = secrets.token_bytes(NONCE_SIZE)
            self._hello_nonces.add(nonce)
            self._hello_next = now + 1.0
        self._agent_out += encode(T.HELLO, 0, nonce)

    def _die(self, why: str) -> None:
        if self.dead is None:
            self.dead = why
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(self._agent)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(self._listener)
        with contextlib.suppress(OSError):
            self._listener.close()
        for c in list(self._clients):
            # the reason, not just a closed socket: the helper prints it for the user
            for cs in c.streams:
                c.out += encode_json(T.ERROR, cs, {"message": f"lost the testbed: {why}"})
            with contextlib.suppress(OSError):
                c.sock.send(c.out)
            self._drop(c)
        self._hello_done.set()

    # -- agent side ---------------------------------------------------------------------
    def _write_agent(self) -> None:
        try:
            n = self._agent.send(self._agent_out)
        except BlockingIOError:
            return
        except OSError as e:
            self._die(f"control channel write failed: {e}")
            return
        del self._agent_out[:n]

    def _read_agent(self) -> None:
        try:
            data = self._agent.recv(CHUNK * 4)
        except BlockingIOError:
            return
        except OSError as e:
            self._die(f"control channel read failed: {e}")
            return
        if not data:
            if not self._reconnect():
                self._check_console()  # a panic that ended QEMU is the better reason
                note = self._exit_note() if self._exit_note else ""
                self._die(f"the control channel closed ({note or 'QEMU exited?'})")
            return
        for frame in self._decoder.feed(data):
            if frame.stream == 0:
                if frame.type == T.HELLO_REPLY:
                    self._on_hello_reply(frame.payload)
                continue
            route = self._routes.get(frame.stream)
            if route is None:
                continue
            client, cs = route
            if frame.type in _LAST:
                del self._routes[frame.stream]
                if client is not None:
                    client.streams.pop(cs, None)
            if client is not None and not client.closed:
                client.out += encode(frame.type, cs, frame.payload)

    def _reconnect(self) -> bool:
        """QEMU closed the connection while still running (a guest reset after a restore
        does that): connect again; streams that were running end with an ERROR."""
        if self._agent_path is None or self._alive is None:
            return False
        if self._reset_expected is not None and not self._reset_expected():
            # no reboot expected: QEMU is ending (reboot action "shutdown"); give it the
            # moment it needs, so the reason is that, not a reset channel
            ending = time.monotonic() + 5
            while self._alive() and time.monotonic() < ending:
                time.sleep(0.05)
        deadline = time.monotonic() + 10
        while self._alive() and time.monotonic() < deadline:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(self._agent_path))
            except OSError:
                sock.close()
                time.sleep(0.1)
                continue
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(self._agent)
            if self._own_agent:
                self._agent.close()
            sock.setblocking(False)
            self._agent, self._own_agent = sock, True
            self._sel.register(sock, selectors.EVENT_READ, "agent")
            self._decoder.reset()
            self._agent_out.clear()
            self._fail_all_streams("the control channel was reset")
            with self._lock:
                self._hello_next = 0.0  # a pending hello is sent again at once
            return True
        return False

    def _fail_all_streams(self, message: str) -> None:
        for agent_stream, (client, cs) in list(self._routes.items()):
            del self._routes[agent_stream]
            if client is not None and not client.closed:
                client.streams.pop(cs, None)
                client.out += encode_json(T.ERROR, cs, {"message": message})

    def _on_hello_reply(self, payload: bytes) -> None:
        with self._lock:
            if payload[:NONCE_SIZE] not in self._hello_nonces or not self._hello_wanted:
                return
            self._hello_nonces.clear()
            self._hello_wanted = False
            try:
                self._hello_reply = json.loads(payload[NONCE_SIZE:] or b"{}")
            except ValueError:
                self._hello_reply = {}
        # the agent dropped every stream: tell their clients
        self._fail_all_streams("the guest agent was reset")
        self._hello_done.set()

    # -- client side --------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            c = _Client(sock)
            self._clients.add(c)
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _drop(self, c: _Client) -> None:
        if c.closed:
            return
        c.closed = True
        self._clients.discard(c)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(c.sock)
        with contextlib.suppress(OSError):
            c.sock.close()
        for cs, agent_stream in c.streams.items():
            self._routes[agent_stream] = (None, cs)  # keep until EXIT, drop its frames
            if self.dead is None:
                self._agent_out += encode_json(T.SIGNAL, agent_stream, {"signal": 9})
        c.streams.clear()

    def _write_client(self, c: _Client) -> None:
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(c)
            return
        del c.out[:n]

    def _read_client(self, c: _Client) -> None:
        try:
            data = c.sock.recv(CHUNK * 4)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        for frame in c.decoder.feed(data):
            t, cs = frame.type, frame.stream
            if t in _FORWARDED:
                if cs == 0 or cs in c.streams:
                    c.out += encode_json(T.ERROR, cs, {"message": f"stream {cs} in use"})
                    continue
                agent_stream = self._next
                self._next = self._next % 0xFFFFFFF0 + 1
                c.streams[cs] = agent_stream
                self._routes[agent_stream] = (c, cs)
                self._agent_out += encode(t, agent_stream, frame.payload)
            elif t in (T.STDIN, T.SIGNAL):
                agent_stream_opt = c.streams.get(cs)
                if agent_stream_opt is not None:
                    self._agent_out += encode(t, agent_stream_opt, frame.payload)
            elif t == T.PING:
                c.out += encode(T.PONG, cs, frame.payload)
            else:
                c.out += encode_json(T.ERROR, cs, {"message": f"frame type {t} not allowed"})

    # -- console ------------------------------------------------------------------------
    def _check_console(self) -> None:
        if self._console is None or self.dead is not None:
            return
        start = max(0, self._console_pos - 64)  # a marker may straddle two reads
        try:
            with open(self._console, "rb") as f:
                f.seek(start)
                data = f.read(1 << 20)
        except OSError:
            return
        self._console_pos = start + len(data)
        for marker in PANIC_MARKERS:
            at = data.find(marker)
            if at >= 0:
                line = data[at:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
                self._die(f"the guest kernel panicked: {line}")
                return
