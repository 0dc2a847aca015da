"""The QEMU testbed's exec prefix: run one command in the guest, as if it ran here.

    python3 -S -P -c 'import ...execclient; main()' SOCKET COMMAND [ARG...]   (helper_argv())

connects to the virt server's multiplexer socket (`nestbed.qemu.mux`), starts COMMAND in the
guest (as root, with the agent's default environment) and relays this process' stdin,
stdout and stderr to it. Its exit status is the command's; a command killed by signal N
gives 128+N; 255 means this helper itself failed (no testbed, channel lost), which clients
treat as a testbed failure. SIGTERM/SIGINT/SIGHUP are forwarded to the command; if this
process is killed outright, the multiplexer sees the connection close and kills the command.

`stream()` is the same loop as a function; the virt server uses it for copies (PUT/GET tar
streams). Stdlib only, plus the frame format from `nestbed.guest.agent`, so it starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

from nestbed.guest.agent import CHUNK, STDIN_WINDOW, Decoder, T, encode, encode_json

EXIT_HELPER_FAILED = 255
_STREAM = 1
_FORWARD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StreamError(Exception):
    """The helper's own failure: no testbed, channel lost, request refused."""


@dataclass(frozen=True)
class Outcome:
    status: int | None
    signal: int | None
    error: str | None  # the agent could not start the command

    @property
    def exit_status(self) -> int:
        if self.error is not None:
            return 127 if "No such file" in self.error else 126
        if self.signal is not None:
            return 128 + self.signal
        return self.status if self.status is not None else EXIT_HELPER_FAILED


Writer = Callable[[bytes], None]


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise StreamError(f"the testbed is gone ({e.strerror or e})") from None
    return sock


def stream(
    sock: socket.socket,
    ftype: T,
    request: dict[str, object],
    stdin_fd: int | None,
    out: Writer,
    err: Writer,
    signal_fd: int | None = None,
    pending_signals: list[int] | None = None,
) -> Outcome:
    """Run one request (EXEC, PUT or GET) on a connected socket until its EXIT or ERROR.

    stdin_fd is read until EOF and sent as the stream's stdin (None: no stdin). Signals
    noted in `pending_signals` (woken through `signal_fd`) are forwarded."""
    sel = selectors.PollSelector()  # poll, unlike epoll, accepts regular files as stdin
    sock.setblocking(False)
    decoder = Decoder()
    outbuf = bytearray(encode_json(ftype, _STREAM, request))
    started = False
    in_flight = 0
    stdin_open = stdin_fd is not None
    sel.register(sock, selectors.EVENT_READ, "sock")
    if signal_fd is not None:
        sel.register(signal_fd, selectors.EVENT_READ, "signal")
    try:
        while True:
            want_stdin = started and stdin_open and in_flight < STDIN_WINDOW and len(outbuf) < CHUNK
            if stdin_fd is not None:
                registered = stdin_fd in sel.get_map()
                if want_stdin and not registered:
                    sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
                elif not want_stdin and registered:
                    sel.unregister(stdin_fd)
            sel.modify(
                sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if outbuf else 0), "sock"
            )
            for key, events in sel.select():
                if key.data == "stdin":
                    try:
                        data = os.read(key.fd, min(CHUNK, STDIN_WINDOW - in_flight))
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    outbuf += encode(T.STDIN, _STREAM, data)
                    in_flight += len(data)
                    if not data:
                        stdin_open = False
                elif key.data == "signal":
                    with contextlib.suppress(OSError):
                        os.read(key.fd, 256)
                    while pending_signals:
                        signum = pending_signals.pop(0)
                        outbuf += encode_json(T.SIGNAL, _STREAM, {"signal": signum})
                elif key.data == "sock":
                    if events & selectors.EVENT_WRITE and outbuf:
                        try:
                            del outbuf[: sock.send(outbuf)]
                        except BlockingIOError:
                            pass
                        except OSError as e:
                            raise StreamError(f"lost the testbed ({e.strerror or e})") from None
                    if not events & selectors.EVENT_READ:
                        continue
                    try:
                        data = sock.recv(CHUNK * 4)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        raise StreamError(f"lost the testbed ({e.strerror or e})") from None
                    if not data:
                        raise StreamError("lost the testbed (the channel closed)")
                    for frame in decoder.feed(data):
                        t = frame.type
                        if frame.stream != _STREAM:
                            continue
                        if t == T.STARTED:
                            started = True
                        elif t == T.STDOUT:
                            if frame.payload:
                                out(frame.payload)
                        elif t == T.STDERR:
                            if frame.payload:
                                err(frame.payload)
                        elif t == T.ACK:
                            in_flight -= struct.unpack(">Q", frame.payload)[0]
                        elif t == T.EXIT:
                            result = json.loads(frame.payload)
                            return Outcome(result.get("status"), result.get("signal"), None)
                        elif t == T.ERROR:
                            message = str(json.loads(frame.payload).get("message", "error"))
                            # the request's own fault (no such command, no such path for
                            # a copy): a failed command or copy, not a lost testbed
                            if message.startswith(("cannot run", "get:", "put:")):
                                return Outcome(None, None, message)
                            raise StreamError(message)
    finally:
        sel.close()


def _writer(fd: int) -> Writer:
    broken = False

    def write(data: bytes) -> None:
        nonlocal broken
        if broken:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            broken = True  # the reader went away: drop the rest, as ssh does

    return write


def helper_argv(socket_path: str) -> list[str]:
    """The exec prefix: this module run by this Python, without site (-S: no .pth files,
    about 0.1 s less per command) and without the caller's directory on sys.path (-P)."""
    # No commas anywhere: autopkgtest splits the exec prefix on ',' after unquoting it.
    source_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if "," in source_root:  # cannot say it without a comma: the slower, site-using way
        return [sys.executable, "-P", "-m", "nestbed.qemu.execclient", socket_path]
    code = (
        f"import sys; sys.path[:0] = [{source_root!r}]; "
        "from nestbed.qemu.execclient import main; sys.exit(main())"
    )
    return [sys.executable, "-S", "-P", "-c", code, socket_path]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        sys.stderr.write("usage: nestbed.qemu.execclient SOCKET COMMAND [ARG...]\n")
        return EXIT_HELPER_FAILED
    path, command = args[0], args[1:]
    pending: list[int] = []
    sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
    for signum in _FORWARD_SIGNALS:
        signal.signal(signum, lambda s, _f: pending.append(s))
    try:
        os.fstat(0)
        stdin_fd: int | None = 0
    except OSError:
        stdin_fd = None
    try:
        sock = connect(path)
        try:
            request = {"argv": command, "stdin": stdin_fd is not None}
            outcome = stream(
                sock, T.EXEC, request, stdin_fd, _writer(1), _writer(2), sig_r, pending
            )
        finally:
            sock.close()
    except StreamError as e:
        sys.stderr.write(f"nestbed-virt-qemu: {e}\n")
        return EXIT_HELPER_FAILED
    if outcome.error is not None:
        sys.stderr.write(f"nestbed-virt-qemu: {outcome.error}\n")
    return outcome.exit_status


if __name__ == "__main__":
    sys.exit(main())
