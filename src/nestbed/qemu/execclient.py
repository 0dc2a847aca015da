"""The QEMU testbed's exec prefix: run one command in the guest, as if it ran here.

    python3 -S -P -c 'import ...execclient; main()' SOCKET COMMAND [ARG...]   (helper_argv())

connects to the virt server's multiplexer socket (`nestbed.qemu.mux`), starts COMMAND in the
guest (as root, with the agent's default environment) and relays this process' stdin,
stdout and stderr to it. Its exit status is the command's; a command killed by signal N
gives 128+N, its own exit status 255 gives 253; 255 means this helper itself failed (no
testbed, channel lost), which clients treat as a testbed failure. SIGTERM/SIGINT/SIGHUP
are forwarded to the command; if this process is killed outright, the multiplexer sees the
connection close and kills the command.

The frames of the request are the shared client's (`nestbed.guest.frameclient`, which the
virt server's own in-process requests use too); this module only moves the bytes between
the socket and this process' file descriptors. Stdlib only, so it starts fast.

A runner that finds this helper as a testbed's exec prefix (`socket_of`) may do the same
in its own process (`HereStream`, `run_here`): a command then costs no Python start (0.06 s,
on a host whose cores also run the guest).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import threading

from nestbed import trace
from nestbed.guest.agent import CHUNK, Decoder, FrameType
from nestbed.guest.frameclient import (
    EXIT_HELPER_FAILED,
    HELPER_NAME,
    Outcome,
    RequestStream,
    Writer,
)

__all__ = [
    "EXIT_HELPER_FAILED",
    "HereStream",
    "Outcome",
    "StreamError",
    "connect",
    "helper_argv",
    "main",
    "run_here",
    "socket_of",
]
_MODULE = "nestbed.qemu.execclient"

_STREAM = 1
_FORWARD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StreamError(Exception):
    """The helper's own failure: no testbed, channel lost, request refused."""


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
    ftype: FrameType,
    request: dict[str, object],
    stdin_fd: int | None,
    out: Writer,
    err: Writer,
    signal_fd: int | None = None,
    pending_signals: list[int] | None = None,
) -> Outcome:
    """Run one request (EXEC, PUT or GET) on a connected socket until its EXIT or ERROR.

    stdin_fd is read until EOF and sent as the stream's stdin (None: no stdin). Signals
    noted in `pending_signals` (woken through `signal_fd`) are forwarded. The output window
    is the multiplexer's business: it returns it as it hands output to this socket."""
    sel = selectors.PollSelector()  # poll, unlike epoll, accepts regular files as stdin
    sock.setblocking(False)
    decoder = Decoder()
    frames = RequestStream(_STREAM, out, err)
    outbuf = bytearray(frames.request(ftype, request))
    stdin_open = stdin_fd is not None
    sel.register(sock, selectors.EVENT_READ, "sock")
    if signal_fd is not None:
        sel.register(signal_fd, selectors.EVENT_READ, "signal")
    try:
        while True:
            room = frames.stdin_room()
            want_stdin = stdin_open and room > 0 and len(outbuf) < CHUNK
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
                        data = os.read(key.fd, min(CHUNK, room))
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    outbuf += frames.stdin(data)
                    if not data:
                        stdin_open = False
                elif key.data == "signal":
                    with contextlib.suppress(OSError):
                        os.read(key.fd, 256)
                    while pending_signals:
                        outbuf += frames.signal(pending_signals.pop(0))
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
                        outcome = frames.feed(frame)
                        if outcome is None:
                            continue
                        if outcome.error is not None and not outcome.request_fault:
                            raise StreamError(outcome.error)
                        return outcome
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


def socket_of(prefix: list[str]) -> str | None:
    """The multiplexer's socket when `prefix` is this helper (as `helper_argv` writes it,
    by whichever Python), else None."""
    if len(prefix) < 3 or not os.path.isabs(prefix[-1]):
        return None
    body = prefix[1:-1]
    ours = body[-2:] == ["-m", _MODULE] or (
        body[-2:-1] == ["-c"] and f"from {_MODULE} import main" in body[-1]
    )
    return prefix[-1] if ours else None


class HereStream:
    """COMMAND streamed from this process, as `main` streams it: its output goes to `out` and
    `err` (called from a thread of its own) as it comes. `signal` forwards a signal to the
    command, `kill` drops the connection (the multiplexer then kills the command, as when a
    helper is killed); `wait` gives the exit status as the helper gives it (255 and the
    reason on `err`: the helper's own failure)."""

    def __init__(
        self, path: str, command: list[str], *, stdin: bytes | None, out: Writer, err: Writer
    ) -> None:
        self._pending: list[int] = []
        self._done = threading.Event()
        self._lock = threading.Lock()  # the signal pipe is not written once closed
        self._killed = False
        self.status: int | None = None
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._sock: socket.socket | None = connect(path)
        except StreamError as e:
            self._sock = None
            err(f"{HELPER_NAME}: {e}\n".encode())
            self._finish(EXIT_HELPER_FAILED)
            return
        stdin_r: int | None = None
        if stdin is not None:
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            threading.Thread(target=_feed, args=(stdin_w, stdin), daemon=True).start()
        request = {"argv": command, "stdin": stdin is not None}
        threading.Thread(
            target=self._run, args=(self._sock, request, stdin_r, out, err), daemon=True
        ).start()

    def _run(
        self,
        sock: socket.socket,
        request: dict[str, object],
        stdin_r: int | None,
        out: Writer,
        err: Writer,
    ) -> None:
        status = EXIT_HELPER_FAILED
        try:
            outcome = stream(
                sock, FrameType.EXEC, request, stdin_r, out, err, self._sig_r, self._pending
            )
            if outcome.error is not None:
                err(f"{HELPER_NAME}: {outcome.error}\n".encode())
            status = outcome.exit_status
        except StreamError as e:
            if not self._killed:
                err(f"{HELPER_NAME}: {e}\n".encode())
        finally:
            sock.close()  # the multiplexer ends what still runs
            if stdin_r is not None:
                os.close(stdin_r)  # the feeder, if still writing, gets EPIPE and stops
            self._finish(status)

    def _finish(self, status: int) -> None:
        with self._lock:
            os.close(self._sig_r)
            os.close(self._sig_w)
            self.status = status
        self._done.set()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None while it still runs after `timeout` seconds."""
        self._done.wait(timeout)
        return self.status

    def signal(self, signum: int) -> None:
        with self._lock:
            if self.status is None:
                self._pending.append(signum)
                with contextlib.suppress(BlockingIOError):
                    os.write(self._sig_w, b"\0")

    def kill(self) -> None:
        self._killed = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # stream() sees the channel close


def run_here(
    path: str,
    command: list[str],
    *,
    stdin: bytes | None,
    out: Writer,
    err: Writer,
    timeout: float | None,
) -> int:
    """What `main` does, in this process and waiting: COMMAND's exit status as the helper
    gives it. Raises TimeoutError after `timeout` seconds, once the command is killed."""
    here = HereStream(path, command, stdin=stdin, out=out, err=err)
    status = here.wait(timeout)
    if status is None:
        here.kill()
        here.wait()
        raise TimeoutError(f"timed out after {timeout:g}s")
    return status


def _feed(fd: int, data: bytes) -> None:
    try:
        _writer(fd)(data)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    trace.process_ready("exec helper")
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
                sock, FrameType.EXEC, request, stdin_fd, _writer(1), _writer(2), sig_r, pending
            )
        finally:
            sock.close()
    except StreamError as e:
        sys.stderr.write(f"{HELPER_NAME}: {e}\n")
        return EXIT_HELPER_FAILED
    if outcome.error is not None:
        sys.stderr.write(f"{HELPER_NAME}: {outcome.error}\n")
    return outcome.exit_status


if __name__ == "__main__":
    sys.exit(main())
