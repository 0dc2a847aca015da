#!/usr/bin/python3
"""nestbed's control agent: runs inside the guest, answers the host on a virtio-serial port.

Stdlib only (Python >= 3.11), one file: the image builder copies it to
/usr/lib/nestbed/agent.py and a systemd unit starts it at boot. In images from other
builders the QEMU server copies it in at every boot (nestbed.qemu.shellboot); those may have
only python3-minimal, so nothing beyond it is used but json, which is sent along. The host side is
`nestbed.guest.channel`, which imports the frame format from this module so both ends
share one definition. The protocol is documented in docs/agent.md.

Every message is a frame: a 12-byte header (magic b"NB", type, flags, stream id, payload
length; big-endian) followed by the payload. Payload bytes are never interpreted as
framing, so any byte stream (program output, tar archives) passes through unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import fcntl
import json
import os
import pwd
import selectors
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1
PORT_NAME = "org.nestbed.control"
DEFAULT_PORT = "/dev/virtio-ports/" + PORT_NAME
MAGIC = b"NB"
HEADER = struct.Struct(">2sBBII")  # magic, type, flags, stream, length
MAX_PAYLOAD = 1 << 20
CHUNK = 64 * 1024
STDIN_WINDOW = 1 << 20  # bytes of stdin the host may have unacknowledged per stream
# bytes of a stream's output the agent sends ahead of the host's OUTPUT_ACKs, when the
# host's HELLO asked for output acks: the host buffers at most this much per stream
OUTPUT_WINDOW = 1 << 20
EXIT_GRACE = 2.0  # seconds to wait for stdout/stderr EOF after the process exited
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class FrameType(enum.IntEnum):
    """Frame types: host→guest below 0x80, guest→host from 0x80."""

    HELLO = 0x01  # payload: nonce; resets the agent; answered by HELLO_REPLY
    PING = 0x02  # payload: anything; answered by PONG with the same payload
    EXEC = 0x03  # payload: JSON request; answered by STARTED or ERROR
    STDIN = 0x04  # payload: bytes for the process' stdin; empty = close stdin
    SIGNAL = 0x05  # payload: JSON {"signal": N}; sent to the process group
    PUT = 0x06  # payload: JSON {"path": DIR}; a tar stream follows as STDIN frames
    GET = 0x07  # payload: JSON {"path": PATH}; the tar stream comes back as STDOUT
    OUTPUT_ACK = 0x08  # payload: 8-byte count of STDOUT/STDERR payload bytes consumed
    HELLO_REPLY = 0x81  # payload: the nonce, then JSON facts about the agent
    PONG = 0x82
    STARTED = 0x83  # payload: JSON {"pid": N}
    STDOUT = 0x84  # payload: bytes; empty = end of stdout
    STDERR = 0x85  # payload: bytes; empty = end of stderr
    EXIT = 0x86  # payload: JSON {"status": N|null, "signal": N|null}; last frame of a stream
    ACK = 0x87  # payload: 8-byte count of stdin bytes consumed
    ERROR = 0x8F  # payload: JSON {"message": TEXT}; last frame of a stream (or of a bad frame)


NONCE_SIZE = 16


class Frame(NamedTuple):
    type: int
    stream: int
    payload: bytes


def encode(ftype: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame, ready to write."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload too large: {len(payload)} bytes")
    return HEADER.pack(MAGIC, ftype, 0, stream, len(payload)) + payload


def encode_json(ftype: int, stream: int, obj: object) -> bytes:
    return encode(ftype, stream, json.dumps(obj, separators=(",", ":")).encode())


class Decoder:
    """Splits a byte stream into frames; skips garbage up to the next valid header."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped = 0

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buf += data
        buf = self._buf
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                # keep a trailing b"N" that may start the next magic
                keep = 1 if buf.endswith(MAGIC[:1]) else 0
                self.skipped += len(buf) - keep
                del buf[: len(buf) - keep]
                return
            if start:
                self.skipped += start
                del buf[:start]
            if len(buf) < HEADER.size:
                return
            _magic, ftype, flags, stream, length = HEADER.unpack_from(buf)
            if flags != 0 or length > MAX_PAYLOAD:
                self.skipped += 1
                del buf[:1]
                continue
            if len(buf) < HEADER.size + length:
                return
            payload = bytes(buf[HEADER.size : HEADER.size + length])
            del buf[: HEADER.size + length]
            yield Frame(ftype, stream, payload)


# ---------------------------------------------------------------------------------------
# the guest side


def _set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


class RequestError(Exception):
    """A request that cannot be carried out; becomes an ERROR frame."""


class RunningCommand:
    """One running command. A plain class, not a dataclass: the agent must run on
    python3-minimal (images from autopkgtest's builders), which has no dataclasses module."""

    def __init__(self, stream: int, proc: subprocess.Popen[bytes]) -> None:
        self.stream = stream
        self.proc = proc
        self.stdin_buf = bytearray()
        self.stdin_eof = False  # the host has closed stdin (written once the buffer drains)
        self.readers: dict[int, int] = {}  # fd -> STDOUT/STDERR
        self.exited_at: float | None = None
        self.output_unacked = 0  # output bytes sent that the host has not acknowledged
        self.paused = False  # the output window is full: its pipes are not read


def _environment(request: dict[str, Any], user: pwd.struct_passwd | None) -> dict[str, str]:
    env: dict[str, str] = {}
    if not request.get("clear_env"):
        who = user or pwd.getpwuid(os.getuid())
        env = {
            "PATH": DEFAULT_PATH,
            "HOME": who.pw_dir,
            "USER": who.pw_name,
            "LOGNAME": who.pw_name,
            "SHELL": who.pw_shell or "/bin/sh",
            "LANG": "C.UTF-8",
        }
    extra = request.get("env") or {}
    if not isinstance(extra, dict):
        raise RequestError("env must be an object")
    env.update({str(k): str(v) for k, v in extra.items()})
    return env


class Agent:
    def __init__(self, fd: int, *, exit_on_eof: bool = False) -> None:
        self.fd = fd
        self.exit_on_eof = exit_on_eof
        self.decoder = Decoder()
        self.sessions: dict[int, RunningCommand] = {}
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        _set_nonblocking(self.wake_r)
        _set_nonblocking(self.wake_w)
        self.connected = False
        self.output_acks = False  # the host's HELLO asked for OUTPUT_ACK flow control

    # -- output -------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def error(self, stream: int, message: str) -> None:
        self.send(encode_json(FrameType.ERROR, stream, {"message": message}))

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.sel.register(self.fd, selectors.EVENT_READ, "port")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        while True:
            timeout = 0.5 if self.sessions else None
            for key, events in self.sel.select(timeout):
                tag = key.data
                if tag == "port":
                    if not self.read_port():
                        if self.exit_on_eof:
                            self.reset()
                            return 0
                        time.sleep(0.05)  # host not connected: poll until it is
                elif tag == "wake":
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                elif isinstance(tag, tuple):
                    kind, stream = tag
                    session = self.sessions.get(stream)
                    if session is None:
                        continue
                    if kind == "in" and events & selectors.EVENT_WRITE:
                        self.feed_stdin(session)
                    elif kind == "out":
                        self.read_output(session, key.fd)
            self.reap()

    def read_port(self) -> bool:
        try:
            data = os.read(self.fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return True
        if not data:
            if self.connected or self.sessions:
                self.reset()
            self.connected = False
            return False
        self.connected = True
        for frame in self.decoder.feed(data):
            try:
                self.handle(frame)
            except RequestError as e:
                self.error(frame.stream, str(e))
        return True

    def reset(self) -> None:
        """The host went away or said HELLO: forget every stream, kill what they started."""
        for session in list(self.sessions.values()):
            self.kill(session, signal.SIGKILL)
            self.close_session(session)
            with contextlib.suppress(subprocess.TimeoutExpired):
                session.proc.wait(timeout=5)
        self.sessions.clear()
        self.decoder.reset()

    # -- requests -----------------------------------------------------------------------
    def handle(self, frame: Frame) -> None:
        t, stream = frame.type, frame.stream
        if t == FrameType.HELLO:
            self.reset()
            # after the nonce, a newer host says what it supports (an older one sends none)
            options = _json_or_empty(frame.payload[NONCE_SIZE:])
            self.output_acks = options.get("output_acks") is True
            info: dict[str, Any] = {
                "protocol": PROTOCOL_VERSION,
                "agent_pid": os.getpid(),
                "uid": os.getuid(),
                "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
                "kernel": os.uname().release,
            }
            if self.output_acks:
                info["output_window"] = OUTPUT_WINDOW
            reply = frame.payload[:NONCE_SIZE].ljust(NONCE_SIZE, b"\0")
            self.send(encode(FrameType.HELLO_REPLY, stream, reply + json.dumps(info).encode()))
        elif t == FrameType.PING:
            if stream != 0 and stream not in self.sessions:
                # the host's keep-alive asks after a stream it started: one this agent never
                # had was an earlier agent's (this one was restarted: killed, or crashed)
                message = f"stream {stream} is unknown to this agent (was it restarted?)"
                self.send(
                    encode_json(
                        FrameType.ERROR, stream, {"message": message, "unknown_stream": True}
                    )
                )
            else:
                self.send(encode(FrameType.PONG, stream, frame.payload))
        elif t in (FrameType.EXEC, FrameType.PUT, FrameType.GET):
            if stream == 0 or stream in self.sessions:
                raise RequestError(f"stream {stream} is zero or already in use")
            request = _json(frame.payload)
            if t == FrameType.PUT:
                request = _put_request(request)
            elif t == FrameType.GET:
                request = _get_request(request)
            self.start(stream, request)
        elif t == FrameType.STDIN:
            session = self.sessions.get(stream)
            if session is None or session.stdin_eof:
                return  # stdin of a finished stream: dropped
            if frame.payload:
                session.stdin_buf += frame.payload
            else:
                session.stdin_eof = True
            self.update_stdin(session)
        elif t == FrameType.OUTPUT_ACK:
            session = self.sessions.get(stream)
            if session is not None and len(frame.payload) == 8:
                (consumed,) = struct.unpack(">Q", frame.payload)
                session.output_unacked = max(0, session.output_unacked - consumed)
                if session.paused and session.output_unacked < OUTPUT_WINDOW:
                    self.watch_output(session, True)
        elif t == FrameType.SIGNAL:
            session = self.sessions.get(stream)
            if session is not None:
                signum = _json(frame.payload).get("signal", signal.SIGTERM)
                if not isinstance(signum, int):
                    raise RequestError("signal must be a number")
                self.kill(session, signum)
        else:
            raise RequestError(f"unknown frame type 0x{t:02x}")

    def start(self, stream: int, request: dict[str, Any]) -> None:
        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise RequestError("argv must be a non-empty list of strings")
        user = None
        kwargs: dict[str, Any] = {}
        name = request.get("user")
        if name is not None:
            try:
                user = (
                    pwd.getpwnam(str(name)) if not str(name).isdigit() else pwd.getpwuid(int(name))
                )
            except KeyError:
                raise RequestError(f"no such user: {name}") from None
            if user.pw_uid != os.getuid():
                kwargs.update(
                    user=user.pw_uid,
                    group=user.pw_gid,
                    extra_groups=os.getgrouplist(user.pw_name, user.pw_gid),
                )
        cwd = request.get("cwd") or (user.pw_dir if user else None)
        if cwd is not None and not os.path.isdir(cwd):
            cwd = "/" if request.get("cwd") is None else cwd
        want_stdin = bool(request.get("stdin", False))
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=_environment(request, user),
                start_new_session=True,
                **kwargs,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            raise RequestError(f"cannot run {argv[0]}: {e}") from None
        session = RunningCommand(stream, proc)
        assert proc.stdout is not None and proc.stderr is not None
        for pipe, ftype in ((proc.stdout, FrameType.STDOUT), (proc.stderr, FrameType.STDERR)):
            _set_nonblocking(pipe.fileno())
            session.readers[pipe.fileno()] = ftype
            self.sel.register(pipe.fileno(), selectors.EVENT_READ, ("out", stream))
        if proc.stdin is not None:
            _set_nonblocking(proc.stdin.fileno())
        self.sessions[stream] = session
        self.send(encode_json(FrameType.STARTED, stream, {"pid": proc.pid}))

    # -- stdin --------------------------------------------------------------------------
    def update_stdin(self, session: RunningCommand) -> None:
        stdin = session.proc.stdin
        if stdin is None or stdin.closed:
            if session.stdin_buf:  # nobody reads it: consume so the host is not stalled
                self.send(
                    encode(FrameType.ACK, session.stream, struct.pack(">Q", len(session.stdin_buf)))
                )
                session.stdin_buf.clear()
            return
        fd = stdin.fileno()
        registered = fd in self.sel.get_map()
        if session.stdin_buf and not registered:
            self.sel.register(fd, selectors.EVENT_WRITE, ("in", session.stream))
        elif not session.stdin_buf:
            if registered:
                self.sel.unregister(fd)
            if session.stdin_eof:
                stdin.close()

    def feed_stdin(self, session: RunningCommand) -> None:
        stdin = session.proc.stdin
        assert stdin is not None
        consumed = 0
        try:
            consumed = os.write(stdin.fileno(), session.stdin_buf[:CHUNK])
        except BlockingIOError:
            return
        except (BrokenPipeError, OSError):
            consumed = len(session.stdin_buf)
            self.sel.unregister(stdin.fileno())
            stdin.close()
        del session.stdin_buf[:consumed]
        if consumed:
            self.send(encode(FrameType.ACK, session.stream, struct.pack(">Q", consumed)))
        self.update_stdin(session)

    # -- output and exit ----------------------------------------------------------------
    def read_output(self, session: RunningCommand, fd: int) -> None:
        if session.paused:
            return
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        ftype = session.readers[fd]
        self.send(encode(ftype, session.stream, data))
        if not data:
            self.close_reader(session, fd)
            return
        session.output_unacked += len(data)
        if self.output_acks and session.output_unacked >= OUTPUT_WINDOW:
            # the host has not caught up: leave the rest in the pipes, so the process
            # waits on its writes instead of the host buffering without bound
            self.watch_output(session, False)

    def watch_output(self, session: RunningCommand, on: bool) -> None:
        """Read the session's output pipes again (on) or stop reading them (off)."""
        session.paused = not on
        registered = self.sel.get_map()
        for fd in session.readers:
            if on and fd not in registered:
                self.sel.register(fd, selectors.EVENT_READ, ("out", session.stream))
            elif not on and fd in registered:
                self.sel.unregister(fd)

    def close_reader(self, session: RunningCommand, fd: int) -> None:
        if fd in self.sel.get_map():
            self.sel.unregister(fd)
        del session.readers[fd]
        for pipe in (session.proc.stdout, session.proc.stderr):
            if pipe is not None and not pipe.closed and pipe.fileno() == fd:
                pipe.close()  # through the file object, which owns the descriptor

    def reap(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.exited_at is None:
                if session.proc.poll() is None:
                    continue
                session.exited_at = now
            if session.paused and session.readers:
                # output the host has yet to take: the grace for a background child's
                # pipes counts from when the host has caught up
                session.exited_at = now
                continue
            if session.readers and now - session.exited_at < EXIT_GRACE:
                # drain what is already there; a background child may hold the pipe open
                for fd in list(session.readers):
                    self.read_output(session, fd)
                if session.readers and now - session.exited_at < EXIT_GRACE:
                    continue
            for fd, ftype in list(session.readers.items()):
                self.send(encode(ftype, session.stream, b""))
                self.close_reader(session, fd)
            rc = session.proc.returncode
            status = {"status": rc, "signal": None} if rc >= 0 else {"status": None, "signal": -rc}
            self.close_session(session)
            del self.sessions[session.stream]
            self.send(encode_json(FrameType.EXIT, session.stream, status))

    def close_session(self, session: RunningCommand) -> None:
        for fd in list(session.readers):
            self.close_reader(session, fd)
        stdin = session.proc.stdin
        if stdin is not None and not stdin.closed:
            if stdin.fileno() in self.sel.get_map():
                self.sel.unregister(stdin.fileno())
            with contextlib.suppress(OSError):
                stdin.close()

    def kill(self, session: RunningCommand, signum: int) -> None:
        try:
            os.killpg(session.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                session.proc.send_signal(signum)


def _json(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload or b"{}")
    except ValueError as e:
        raise RequestError(f"bad JSON request: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError("request must be a JSON object")
    return obj


def _json_or_empty(payload: bytes) -> dict[str, Any]:
    try:
        return _json(payload)
    except RequestError:
        return {}


def _put_request(request: dict[str, Any]) -> dict[str, Any]:
    path = request.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise RequestError("put: path must be an absolute directory")
    os.makedirs(path, exist_ok=True)
    argv = ["tar", "--extract", "--preserve-permissions", "--same-owner", "--file=-"]
    return {"argv": [*argv, "--directory", path], "stdin": True, "user": request.get("user")}


def _get_request(request: dict[str, Any]) -> dict[str, Any]:
    path = request.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise RequestError("get: path must be absolute")
    path = path.rstrip("/") or "/"
    if not os.path.lexists(path):
        raise RequestError(f"get: {path}: no such file or directory")
    parent, name = os.path.split(path)
    argv = ["tar", "--create", "--file=-", "--directory", parent or "/", name or "."]
    return {"argv": argv, "user": request.get("user")}


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="nestbed guest control agent")
    parser.add_argument("--port", default=DEFAULT_PORT, help="virtio-serial port device")
    parser.add_argument("--fd", type=int, help="use this inherited file descriptor instead")
    parser.add_argument("--exit-on-eof", action="store_true", help="exit when the host closes")
    args = parser.parse_args(argv)
    fd = args.fd if args.fd is not None else os.open(args.port, os.O_RDWR | os.O_CLOEXEC)
    return Agent(fd, exit_on_eof=args.exit_on_eof).run()


if __name__ == "__main__":
    sys.exit(main())
