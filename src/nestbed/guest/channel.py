"""Host side of the control channel: talk to the guest agent over QEMU's chardev socket.

Stdlib only. One request at a time (the API is synchronous), but the socket is driven
without ever blocking on a write while the guest has output to deliver, so large stdin
and large output in both directions cannot deadlock. The frame format comes from
`nestbed.guest.agent`, the same file that runs inside the guest; docs/agent.md has the
protocol.
"""

from __future__ import annotations

import io
import os
import secrets
import selectors
import socket
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from nestbed.errors import TestbedFailure
from nestbed.guest.agent import CHUNK, STDIN_WINDOW, Decoder, Frame, FrameType, encode, encode_json
from nestbed.guest.frameclient import HelloExchange, RequestStream, output_window


class ChannelError(TestbedFailure):
    """The control channel broke, timed out, or the agent refused a request."""


class ChannelTimeout(ChannelError):
    """No answer in time."""


class ExecError(ChannelError):
    """The agent could not start the command (no such program, no such user, ...)."""


@dataclass(frozen=True)
class GuestResult:
    status: int | None  # exit status, or None when killed by a signal
    signal: int | None
    stdout: bytes  # what was captured (empty when streamed to a file)
    stderr: bytes

    @property
    def returncode(self) -> int:
        """subprocess-style: negative signal number when killed."""
        return self.status if self.status is not None else -(self.signal or 0)


Sink = Callable[[bytes], None]


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Channel:
    """A connected control channel. Use `Channel.connect(path)` for QEMU's unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._decoder = Decoder()
        self._out = bytearray()
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ)
        self._next_stream = 1
        self._closed = False
        self.info: dict[str, Any] = {}

    @classmethod
    def connect(cls, path: str | os.PathLike[str], timeout: float = 60.0) -> Channel:
        """Connect to the socket, then wait (up to `timeout`) until the agent says hello."""
        deadline = _deadline(timeout)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if _remaining(deadline) == 0:
                    raise ChannelTimeout(f"cannot connect to {os.fspath(path)}: {e}") from None
                time.sleep(0.05)
        channel = cls(sock)
        try:
            channel.hello(timeout=_remaining(deadline))
        except BaseException:
            channel.close()
            raise
        return channel

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sel.close()
            self.sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- socket pump --------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        self._out += data

    def _pump(self, deadline: float | None, what: str) -> list[Frame]:
        """Write what is queued, read what is there; wait until something arrives."""
        while True:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
            self._sel.modify(self.sock, events)
            remaining = _remaining(deadline)
            if remaining == 0:
                raise ChannelTimeout(f"no answer from the guest agent ({what})")
            ready = self._sel.select(remaining)
            frames: list[Frame] = []
            for _key, ev in ready:
                if ev & selectors.EVENT_WRITE and self._out:
                    try:
                        n = self.sock.send(self._out)
                    except BlockingIOError:
                        n = 0
                    except OSError as e:
                        raise ChannelError(f"control channel write failed: {e}") from None
                    del self._out[:n]
                if ev & selectors.EVENT_READ:
                    try:
                        data = self.sock.recv(CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        raise ChannelError(f"control channel read failed: {e}") from None
                    if not data:
                        raise ChannelError(f"control channel closed ({what})")
                    frames.extend(self._decoder.feed(data))
            if frames:
                return frames

    # -- requests -----------------------------------------------------------------------
    def hello(self, timeout: float | None = 60.0, resend: float = 1.0) -> dict[str, Any]:
        """Resynchronise: the agent drops every stream and answers with our nonce.

        Data sent before the agent opened its port is discarded by the guest kernel, so
        the hello is repeated every `resend` seconds until one is answered."""
        deadline = _deadline(timeout)
        exchange = HelloExchange()
        next_send = 0.0
        while True:
            now = time.monotonic()
            if now >= next_send:
                self._send(exchange.frame())
                next_send = now + resend
            wait = next_send - time.monotonic()
            rem = _remaining(deadline)
            if rem is not None and rem == 0:
                raise ChannelTimeout("the guest agent did not answer (hello)")
            step = _deadline(wait if rem is None else min(wait, rem))
            try:
                frames = self._pump(step, "hello")
            except ChannelTimeout:
                continue
            for frame in frames:
                info = exchange.reply(frame)
                if info is not None:
                    self.info = info
                    return self.info

    def ping(self, payload: bytes = b"", timeout: float | None = 10.0) -> float:
        """Round trip time in seconds."""
        start = time.monotonic()
        deadline = _deadline(timeout)
        token = payload + secrets.token_bytes(8)
        self._send(encode(FrameType.PING, 0, token))
        while True:
            for frame in self._pump(deadline, "ping"):
                if frame.type == FrameType.PONG and frame.payload == token:
                    return time.monotonic() - start

    def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        clear_env: bool = False,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | BinaryIO | None = None,
        stdout: BinaryIO | Sink | None = None,
        stderr: BinaryIO | Sink | None = None,
        timeout: float | None = None,
    ) -> GuestResult:
        """Run argv in the guest; stdout/stderr are captured unless a file or callable is given.

        On timeout the process group is killed and ChannelTimeout raised."""
        request: dict[str, Any] = {
            "argv": argv,
            "env": env,
            "clear_env": clear_env,
            "cwd": cwd,
            "user": user,
            "stdin": stdin is not None,
        }
        return self._stream(FrameType.EXEC, request, stdin, stdout, stderr, timeout, " ".join(argv))

    def put_tar(
        self, tar: BinaryIO | bytes, guest_dir: str, *, timeout: float | None = None
    ) -> None:
        """Unpack a tar stream into guest_dir (created if needed), as root, keeping modes."""
        res = self._stream(FrameType.PUT, {"path": guest_dir}, tar, None, None, timeout, "put")
        if res.returncode != 0:
            raise ChannelError(f"put to {guest_dir} failed: {res.stderr.decode(errors='replace')}")

    def get_tar(self, guest_path: str, out: BinaryIO, *, timeout: float | None = None) -> None:
        """Write a tar stream of guest_path (its last component at the top) to out."""
        res = self._stream(FrameType.GET, {"path": guest_path}, None, out, None, timeout, "get")
        if res.returncode != 0:
            raise ChannelError(f"get {guest_path} failed: {res.stderr.decode(errors='replace')}")

    def put(self, local: str | os.PathLike[str], guest_dir: str, **kw: float | None) -> None:
        """Copy a local file or directory tree into guest_dir (symlinks and modes kept)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(os.fspath(local), arcname=Path(local).name)
        buf.seek(0)
        self.put_tar(buf, guest_dir, **kw)

    def get(self, guest_path: str, local_dir: str | os.PathLike[str], **kw: float | None) -> None:
        """Copy guest_path into local_dir (symlinks and modes kept; nothing outside it)."""
        buf = io.BytesIO()
        self.get_tar(guest_path, buf, **kw)
        buf.seek(0)
        with tarfile.open(fileobj=buf, mode="r") as tf:
            safe_extract(tf, Path(local_dir))

    # -- one stream, start to exit ------------------------------------------------------
    def _stream(
        self,
        ftype: FrameType,
        request: dict[str, Any],
        stdin: bytes | BinaryIO | None,
        stdout: BinaryIO | Sink | None,
        stderr: BinaryIO | Sink | None,
        timeout: float | None,
        what: str,
    ) -> GuestResult:
        stream = self._next_stream
        self._next_stream = self._next_stream % 0xFFFFFFFF + 1
        deadline = _deadline(timeout)
        captured = {FrameType.STDOUT: bytearray(), FrameType.STDERR: bytearray()}
        frames = RequestStream(
            stream,
            _sink(stdout, captured[FrameType.STDOUT]),
            _sink(stderr, captured[FrameType.STDERR]),
            output_acks=output_window(self.info) > 0,
        )
        source: BinaryIO | None = io.BytesIO(stdin) if isinstance(stdin, bytes) else stdin
        self._send(frames.request(ftype, request))
        try:
            while True:
                if source is not None:
                    while (room := frames.stdin_room()) and len(self._out) < STDIN_WINDOW:
                        chunk = source.read(min(CHUNK, room))
                        self._send(frames.stdin(chunk or b""))
                        if not chunk:
                            source = None
                            break
                for frame in self._pump(deadline, what):
                    outcome = frames.feed(frame)
                    if outcome is None:
                        continue
                    if outcome.error is not None:
                        raise ExecError(f"{what}: {outcome.error}")
                    return GuestResult(
                        outcome.status,
                        outcome.signal,
                        bytes(captured[FrameType.STDOUT]),
                        bytes(captured[FrameType.STDERR]),
                    )
                self._send(frames.acks())
        except ChannelTimeout:
            self._abort(stream)
            raise ChannelTimeout(f"timed out after {timeout} s: {what}") from None

    def _abort(self, stream: int) -> None:
        """Kill the stream's processes and wait briefly for its EXIT, so it is not left over."""
        self._send(encode_json(FrameType.SIGNAL, stream, {"signal": 9}))
        deadline = _deadline(5.0)
        try:
            while True:
                for frame in self._pump(deadline, "kill"):
                    if frame.stream == stream and frame.type in (FrameType.EXIT, FrameType.ERROR):
                        return
        except ChannelError:
            pass


def _sink(target: BinaryIO | Sink | None, buf: bytearray) -> Sink:
    if target is None:
        return buf.extend
    if callable(target):
        return target
    return target.write  # type: ignore[return-value]


def safe_extract(
    tf: tarfile.TarFile, dest: Path, members: Iterable[tarfile.TarInfo] | None = None
) -> None:
    """Extract (members, default all of tf) with modes and symlinks kept, but nothing written
    outside dest. A stream archive ("r|") is extracted as it is read.

    (Debian 12's Python 3.11.2 has no tarfile extraction filters.)"""
    root = dest.resolve()
    directories: list[tarfile.TarInfo] = []
    for member in tf if members is None else members:
        name = Path(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise ChannelError(f"refusing tar member outside the destination: {member.name}")
        parent = (root / name).parent.resolve()
        if parent != root and root not in parent.parents:
            raise ChannelError(f"refusing tar member through a symlink: {member.name}")
        if member.islnk():
            link = Path(member.linkname)
            if link.is_absolute() or ".." in link.parts:
                raise ChannelError(f"refusing hard link outside the destination: {member.name}")
        if member.isdir():
            directories.append(member)
        tf.extract(member, root, set_attrs=not member.isdir())
    # like extractall: directory modes last, so a read-only directory can be filled first
    for member in reversed(directories):
        path = os.path.join(root, member.name)
        tf.chown(member, path, numeric_owner=False)
        tf.utime(member, path)
        tf.chmod(member, path)
