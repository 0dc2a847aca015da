"""One guest agent channel shared by many clients: the exec multiplexer.

The virt server owns the single virtio-serial connection to the guest agent. Every request
to the guest goes through this multiplexer: the exec helpers the runner starts (the exec
prefix, separate processes) connect to a private unix socket and speak the agent's own frame
format there (docs/agent.md) with their own stream ids; the server's own commands and copies
call `Mux.request` in-process. The multiplexer maps every client stream to a stream id of
its own on the agent channel and routes frames both ways, so many commands can run at once
over one port.

- EXEC, PUT, GET, STDIN and SIGNAL frames from clients are forwarded (stream id rewritten);
  PING is answered locally; HELLO is refused (it would reset the agent for everyone).
- Frames from the agent go to the client whose stream they belong to.
- A client that disconnects before its stream's EXIT gets its processes killed (SIGNAL 9):
  killing an exec helper kills the command in the guest.
- When the channel breaks (QEMU died) or the console shows a kernel panic, the multiplexer
  is `dead`: every client is disconnected (helpers exit 255) and new ones are refused.
- While anything runs in the guest, a keep-alive asks the agent after its oldest stream
  every `PROBE_INTERVAL` s (a PING on that stream). An agent that does not know the stream
  was restarted (killed by a test, or crashed: what ran is gone); one that answers nothing
  for `PROBE_TIMEOUT` s is wedged. Either way the multiplexer is dead: a lost testbed ends
  the test in a minute, not at its timeout.
- Output is flow-controlled per stream: an agent that offers an output window (its HELLO
  reply says `output_window`) gets it back as the multiplexer hands the output on (to a
  helper's socket, or to an in-process request's writer), so the memory held here is at
  most a window per stream, whatever a command prints and however slowly its reader
  reads. An older agent, without windows, is not read while more than `BUFFER_LIMIT` bytes
  wait for slow clients.

It runs in a thread; the server's main thread calls `start`, `hello`, `request`, `stop` and
reads `dead`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from nestbed import trace
from nestbed.guest.agent import CHUNK, Decoder, Frame, FrameType, encode, encode_json
from nestbed.guest.frameclient import (
    EXIT_HELPER_FAILED,
    HELPER_NAME,
    HelloExchange,
    Outcome,
    RequestStream,
    Writer,
    output_window,
)
from nestbed.qemu.machine import file_tail

PANIC_MARKERS = (b"Kernel panic - not syncing", b"---[ end Kernel panic")
# bytes waiting for slow clients above which an agent without output windows is not read
BUFFER_LIMIT = 8 << 20
PROBE_INTERVAL = 5.0  # seconds between keep-alive probes while streams run
# an agent silent this long after a probe is wedged: not less, as under TCG with a nested
# KVM guest level 1 was seen silent for 45 s, printing a soft-lockup report
PROBE_TIMEOUT = 120.0
_FORWARDED = (FrameType.EXEC, FrameType.PUT, FrameType.GET)
_OUTPUT = (FrameType.STDOUT, FrameType.STDERR)
_LAST = (FrameType.EXIT, FrameType.ERROR)
_LOCAL_STREAM = 1  # an in-process request is a client with one stream


class MuxDead(Exception):
    """The agent channel is gone; the message says why."""


class MuxTimeout(Exception):
    """An in-process request ran out of time (its processes were killed)."""


@dataclass(eq=False)
class _Client:
    """An exec helper on the socket (`sock`), or an in-process request (`sock` None, its
    frames handed over through `inbox`)."""

    sock: socket.socket | None
    decoder: Decoder = field(default_factory=Decoder)
    out: bytearray = field(default_factory=bytearray)
    streams: dict[int, int] = field(default_factory=dict)  # client stream -> agent stream
    closed: bool = False
    # output frames in `out` whose window goes back to the agent once sent: (the client's
    # byte count at which the frame ends, agent stream, payload bytes)
    unsent_output: deque[tuple[int, int, int]] = field(default_factory=deque)
    queued: int = 0  # bytes ever queued in `out`
    sent: int = 0  # bytes ever sent from `out`
    inbox: queue.SimpleQueue[Frame] = field(default_factory=queue.SimpleQueue)
    # output payload put in `inbox` (by the thread) and taken from it (by the caller): each
    # counter has one writer, so no update is lost
    inbox_put: int = 0
    inbox_taken: int = 0

    def buffered(self) -> int:
        return len(self.out) + self.inbox_put - self.inbox_taken


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
        agent_info: dict[str, Any] | None = None,
    ) -> None:
        """`agent` is connected and said hello (`agent_info` is its reply)."""
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
        self._traced: dict[int, tuple[float, str]] = {}  # agent stream -> (sent, what)
        self._next = 1
        # the agent's output window (0: an agent without one), and per agent stream the
        # output bytes handed to clients or dropped that the agent has not had back yet
        self._window = output_window(agent_info or {})
        self._unacked: dict[int, int] = {}
        self._agent_events = 0  # what the selector watches on the agent socket
        # in-process requests' frames for the thread: (client, frame), None frame: done
        self._requests: queue.SimpleQueue[tuple[_Client, Frame | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.dead: str | None = None
        # hello requested by the main thread: nonces sent, when to resend, the reply
        self._hello = HelloExchange()
        self._hello_wanted = False
        self._hello_next = 0.0
        self._hello_reply: dict[str, Any] | None = None
        self._hello_done = threading.Event()
        # keep-alive: when the next probe is due, since when one is unanswered
        self._probe_next = 0.0
        self._probe_since: float | None = None

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

    def request(
        self,
        ftype: FrameType,
        request: dict[str, Any],
        *,
        stdin: BinaryIO | None = None,
        out: Writer,
        err: Writer,
        timeout: float | None = None,
    ) -> Outcome:
        """Run one request (EXEC, PUT or GET) in the guest from this process, as an exec
        helper would: stdin is read until EOF, output goes to `out` and `err` as it comes.

        Returns how it ended (an ERROR that is the request's own fault, such as no such
        program, is an Outcome too). Raises MuxDead when the channel is lost or reset, and
        MuxTimeout after `timeout` seconds; either way its processes are killed."""
        if self.dead is not None:
            raise MuxDead(f"the testbed is gone ({self.dead})")
        if self._thread is None:
            raise MuxDead("the testbed is closed")
        client = _Client(None)
        frames = RequestStream(_LOCAL_STREAM, out, err, output_acks=self._window > 0)
        decoder = Decoder()

        def send(data: bytes) -> None:
            for frame in decoder.feed(data):
                self._requests.put((client, frame))
            self._wake()

        deadline = None if timeout is None else time.monotonic() + timeout
        send(frames.request(ftype, request))
        try:
            while True:
                while stdin is not None and (room := frames.stdin_room()):
                    chunk = stdin.read(min(CHUNK, room))
                    send(frames.stdin(chunk or b""))
                    if not chunk:
                        stdin = None
                frame = self._next_frame(client, deadline)
                outcome = frames.feed(frame)
                if acks := frames.acks():
                    send(acks)
                if outcome is None:
                    continue
                if outcome.error is not None and not outcome.request_fault:
                    raise MuxDead(outcome.error)
                return outcome
        finally:
            self._requests.put((client, None))  # gone: its streams' processes are killed
            self._wake()

    def run(
        self, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> tuple[int, bytes, bytes]:
        """Run argv in the guest, captured: (exit status, stdout, stderr) as the exec helper
        gives them (255 and the reason on stderr: the testbed was lost). Raises MuxTimeout."""
        out, err = bytearray(), bytearray()
        try:
            outcome = self.request(
                FrameType.EXEC,
                {"argv": argv, "stdin": stdin is not None},
                stdin=None if stdin is None else io.BytesIO(stdin),
                out=out.extend,
                err=err.extend,
                timeout=timeout,
            )
        except MuxDead as e:
            err += f"{HELPER_NAME}: {e}\n".encode()
            return EXIT_HELPER_FAILED, bytes(out), bytes(err)
        if outcome.error is not None:
            err += f"{HELPER_NAME}: {outcome.error}\n".encode()
        return outcome.exit_status, bytes(out), bytes(err)

    def _next_frame(self, client: _Client, deadline: float | None) -> Frame:
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                raise MuxTimeout("timed out")
            try:
                frame = client.inbox.get(timeout=wait)
            except queue.Empty:
                if self._stopping:
                    raise MuxDead("the testbed is closed") from None
                continue
            if frame.type in _OUTPUT:
                client.inbox_taken += len(frame.payload)
            return frame

    def buffered_bytes(self) -> int:
        """Bytes from the agent held for clients that have not taken them yet (a snapshot:
        the thread changes it)."""
        return sum(c.buffered() for c in list(self._clients))

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        self._sel.register(self._agent, selectors.EVENT_READ, "agent")
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._agent_events = selectors.EVENT_READ
        try:
            while not self._stopping:
                self._maybe_hello()
                self._take_requests()
                self._keep_alive()
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
            # an agent without output windows waits while slow clients have a lot to take
            full = not self._window and self.buffered_bytes() > BUFFER_LIMIT
            ev = (0 if full else selectors.EVENT_READ) | (
                selectors.EVENT_WRITE if self._agent_out else 0
            )
            if ev != self._agent_events:
                if not ev:
                    self._sel.unregister(self._agent)
                elif not self._agent_events:
                    self._sel.register(self._agent, ev, "agent")
                else:
                    self._sel.modify(self._agent, ev, "agent")
                self._agent_events = ev
        for c in self._clients:
            if c.sock is not None:
                ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
                self._sel.modify(c.sock, ev, c)

    def _take_requests(self) -> None:
        """The frames of in-process requests, as if read from a client's socket."""
        while True:
            try:
                client, frame = self._requests.get_nowait()
            except queue.Empty:
                return
            if frame is None:
                self._drop(client)
            elif not client.closed:
                self._clients.add(client)
                self._client_frame(client, frame)

    def _maybe_hello(self) -> None:
        with self._lock:
            if not self._hello_wanted or self.dead:
                if self.dead:
                    self._hello_done.set()
                return
            now = time.monotonic()
            if now < self._hello_next:
                return
            self._hello_next = now + 1.0
        self._agent_out += self._hello.frame()

    def _keep_alive(self) -> None:
        now = time.monotonic()
        watching = (
            self.dead is None
            and self._routes
            and not self._hello_wanted  # a boot or reset: hello has its own timeout
            and self._agent_events & selectors.EVENT_READ  # replies can be read
        )
        if not watching:
            self._probe_since = None
            self._probe_next = now + PROBE_INTERVAL
            return
        if self._probe_since is not None and now - self._probe_since > PROBE_TIMEOUT:
            self._die_with_console(
                f"the guest agent has not answered for {PROBE_TIMEOUT:g} s "
                "(the guest hangs, or its kernel is stuck)"
            )
        elif now >= self._probe_next:
            oldest = next(iter(self._routes))
            self._agent_out += encode(FrameType.PING, oldest)
            self._probe_next = now + PROBE_INTERVAL
            if self._probe_since is None:
                self._probe_since = now

    def _die_with_console(self, why: str) -> None:
        """Die for `why`, followed by what the guest's console said last."""
        console = file_tail(self._console, 5)
        self._die(why + (f"; console ends: {console}" if console else ""))

    def _die(self, why: str) -> None:
        if self.dead is None:
            self.dead = why
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(self._agent)
        self._agent_events = 0
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(self._listener)
        with contextlib.suppress(OSError):
            self._listener.close()
        for c in list(self._clients):
            # the reason, not just a closed socket: the helper prints it for the user
            for cs in list(c.streams):
                self._deliver(c, FrameType.ERROR, cs, _message(f"lost the testbed: {why}"))
            if c.sock is not None:
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
                note = self._exit_note() if self._exit_note else ""
                self._check_console()  # a panic that ended QEMU is the better reason
                # else the console's last lines: an Oops printed before a panic whose own
                # message QEMU ended too early to show (pvpanic fires before the console
                # is flushed), or what the guest did before it reset
                self._die_with_console(f"the control channel closed ({note or 'QEMU exited?'})")
            return
        for frame in self._decoder.feed(data):
            if frame.stream == 0:
                if frame.type == FrameType.HELLO_REPLY:
                    self._on_hello_reply(frame)
                continue
            route = self._routes.get(frame.stream)
            if frame.type == FrameType.PONG or _unknown_stream(frame):
                self._probe_since = None  # a keep-alive answered: the agent is alive
                if route is not None and frame.type != FrameType.PONG:
                    self._die(
                        "the guest agent was restarted while a test ran: it was killed "
                        "(a kill of every process, or of agent.py?) or crashed, and what "
                        "ran in the guest is gone"
                    )
                    return
                continue
            if route is None:
                continue
            client, cs = route
            if frame.type in _LAST:
                if (sent := self._traced.pop(frame.stream, None)) is not None:
                    trace.record("guest", sent[1], sent[0], time.monotonic())
                del self._routes[frame.stream]
                self._unacked.pop(frame.stream, None)
                if client is not None:
                    client.streams.pop(cs, None)
            if client is None or client.closed:
                self._ack_output(frame.stream, len(frame.payload))  # dropped: taken
            else:
                self._deliver(client, frame.type, cs, frame.payload, agent_stream=frame.stream)

    def _deliver(
        self, c: _Client, ftype: int, cs: int, payload: bytes, *, agent_stream: int = 0
    ) -> None:
        """One frame to a client; output is accounted so its window goes back in time."""
        output = ftype in _OUTPUT and payload and self._window and agent_stream
        if output:
            self._unacked[agent_stream] = self._unacked.get(agent_stream, 0) + len(payload)
        if c.sock is None:
            # in-process: the request's own OUTPUT_ACKs return the window
            if ftype in _OUTPUT:
                c.inbox_put += len(payload)
            c.inbox.put(Frame(ftype, cs, payload))
            return
        data = encode(ftype, cs, payload)
        c.out += data
        c.queued += len(data)
        if output:
            c.unsent_output.append((c.queued, agent_stream, len(payload)))

    def _ack_output(self, agent_stream: int, n: int) -> None:
        """Give the agent back n bytes of a stream's output window."""
        if not self._window or not n or agent_stream not in self._routes:
            return
        left = self._unacked.get(agent_stream, 0)
        self._unacked[agent_stream] = max(0, left - n)
        self._agent_out += encode(FrameType.OUTPUT_ACK, agent_stream, struct.pack(">Q", n))

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
            self._agent_events = selectors.EVENT_READ
            self._decoder.reset()
            self._agent_out.clear()
            self._fail_all_streams("the control channel was reset")
            with self._lock:
                self._hello_next = 0.0  # a pending hello is sent again at once
            return True
        return False

    def _fail_all_streams(self, message: str) -> None:
        self._unacked.clear()
        for agent_stream, (client, cs) in list(self._routes.items()):
            del self._routes[agent_stream]
            if client is not None and not client.closed:
                client.streams.pop(cs, None)
                client.unsent_output.clear()
                self._deliver(client, FrameType.ERROR, cs, _message(message))

    def _on_hello_reply(self, frame: Frame) -> None:
        with self._lock:
            if not self._hello_wanted:
                return
            info = self._hello.reply(frame)
            if info is None:
                return
            self._hello_wanted = False
            self._hello_reply = info
            self._window = output_window(info)  # the agent of the next boot may differ
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
        if c.sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(c.sock)
            with contextlib.suppress(OSError):
                c.sock.close()
        c.unsent_output.clear()
        for cs, agent_stream in c.streams.items():
            self._routes[agent_stream] = (None, cs)  # keep until EXIT, drop its frames
            if self.dead is None:
                self._agent_out += encode_json(FrameType.SIGNAL, agent_stream, {"signal": 9})
                # what it had not taken is taken: the agent must drain the pipes to end
                self._ack_output(agent_stream, self._unacked.get(agent_stream, 0))
        c.streams.clear()

    def _write_client(self, c: _Client) -> None:
        assert c.sock is not None
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(c)
            return
        del c.out[:n]
        c.sent += n
        while c.unsent_output and c.unsent_output[0][0] <= c.sent:
            _end, agent_stream, size = c.unsent_output.popleft()
            self._ack_output(agent_stream, size)

    def _read_client(self, c: _Client) -> None:
        assert c.sock is not None
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
            self._client_frame(c, frame)

    def _client_frame(self, c: _Client, frame: Frame) -> None:
        t, cs = frame.type, frame.stream
        if t in _FORWARDED:
            if cs == 0 or cs in c.streams:
                self._deliver(c, FrameType.ERROR, cs, _message(f"stream {cs} in use"))
            elif self.dead is not None:
                self._deliver(c, FrameType.ERROR, cs, _message(f"lost the testbed: {self.dead}"))
            else:
                agent_stream = self._next
                self._next = self._next % 0xFFFFFFF0 + 1
                c.streams[cs] = agent_stream
                self._routes[agent_stream] = (c, cs)
                self._agent_out += encode(t, agent_stream, frame.payload)
                if trace.enabled():
                    self._traced[agent_stream] = (time.monotonic(), _traced_request(t, frame))
        elif t in (FrameType.STDIN, FrameType.SIGNAL) or (
            t == FrameType.OUTPUT_ACK and c.sock is None
        ):
            # (a helper's window is returned here, as its socket takes the output)
            agent_stream_opt = c.streams.get(cs)
            if agent_stream_opt is None:
                return
            if t == FrameType.OUTPUT_ACK:
                self._ack_output(agent_stream_opt, struct.unpack(">Q", frame.payload)[0])
            else:
                self._agent_out += encode(t, agent_stream_opt, frame.payload)
        elif t == FrameType.PING:
            self._deliver(c, FrameType.PONG, cs, frame.payload)
        else:
            self._deliver(c, FrameType.ERROR, cs, _message(f"frame type {t} not allowed"))

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


def _traced_request(ftype: int, frame: Frame) -> str:
    """What a request asks, for the trace: its type and command line or path."""
    try:
        request = json.loads(frame.payload)
        detail = request.get("argv") or request.get("path") or ""
    except (ValueError, AttributeError):
        detail = ""
    return f"{FrameType(ftype).name.lower()} {detail}"


def _message(text: str) -> bytes:
    """An ERROR frame's payload."""
    return json.dumps({"message": text}).encode()


def _unknown_stream(frame: Frame) -> bool:
    """The agent's answer to a keep-alive about a stream it never had."""
    if frame.type != FrameType.ERROR or b"unknown_stream" not in frame.payload:
        return False
    try:
        return json.loads(frame.payload).get("unknown_stream") is True
    except (ValueError, AttributeError):
        return False
