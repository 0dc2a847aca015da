"""The client side of the agent's frame protocol (docs/agent.md), without any I/O of its own.

`HelloExchange` says HELLO and recognises the answer; `RequestStream` follows one request
(EXEC, PUT or GET) from its first frame to its EXIT or ERROR. Every host-side client uses
them, whatever moves its bytes: `nestbed.guest.channel.Channel` (a socket of its own), the
exec helper `nestbed.qemu.execclient` (a socket to the multiplexer) and the multiplexer's
in-process requests (`nestbed.qemu.mux.Mux.request`). Stdlib only: the exec helper imports
this module on every command and must start fast.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nestbed.guest.agent import NONCE_SIZE, STDIN_WINDOW, Frame, FrameType, encode, encode_json

EXIT_HELPER_FAILED = 255
HELPER_NAME = "nestbed-virt-qemu"  # how the exec helper's own messages begin
# what a host of this version asks for in its HELLO; an older agent ignores it
HELLO_OPTIONS = {"output_acks": True}
# an ERROR that begins so is the request's own fault (no such command, no such path for a
# copy): a failed command or copy, not a lost testbed
_REQUEST_FAULTS = ("cannot run", "get:", "put:")

Writer = Callable[[bytes], None]


class HelloExchange:
    """HELLO frames with fresh nonces, and the reply that answers one of them."""

    def __init__(self) -> None:
        self._nonces: set[bytes] = set()

    def frame(self) -> bytes:
        nonce = secrets.token_bytes(NONCE_SIZE)
        self._nonces.add(nonce)
        return encode(FrameType.HELLO, 0, nonce + json.dumps(HELLO_OPTIONS).encode())

    def reply(self, frame: Frame) -> dict[str, Any] | None:
        """The agent's facts when `frame` answers one of our HELLOs, else None."""
        if frame.type != FrameType.HELLO_REPLY or frame.payload[:NONCE_SIZE] not in self._nonces:
            return None
        self._nonces.clear()
        try:
            info = json.loads(frame.payload[NONCE_SIZE:] or b"{}")
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}


def output_window(info: dict[str, Any]) -> int:
    """The agent's output window from its HELLO reply; 0: an agent without output acks."""
    window = info.get("output_window")
    return window if isinstance(window, int) and window > 0 else 0


@dataclass(frozen=True)
class Outcome:
    """How a request ended: an exit status or signal, or the agent's ERROR message."""

    status: int | None
    signal: int | None
    error: str | None = None

    @property
    def request_fault(self) -> bool:
        """The ERROR was the request's fault, not a lost agent."""
        return self.error is not None and self.error.startswith(_REQUEST_FAULTS)

    @property
    def exit_status(self) -> int:
        """As the exec prefix reports it: 128+N for signal N, 126/127 for a command that
        could not be started; the command's own 255 as 253 (as autopkgtest-virt-qemu
        does), since 255 is the helper's own failure, a testbed failure to every runner."""
        if self.error is not None:
            return 127 if "No such file" in self.error else 126
        if self.signal is not None:
            return 128 + self.signal
        if self.status == EXIT_HELPER_FAILED:
            return 253
        return self.status if self.status is not None else EXIT_HELPER_FAILED

    @property
    def returncode(self) -> int:
        """subprocess-style: negative signal number when killed."""
        return self.status if self.status is not None else -(self.signal or 0)


class RequestStream:
    """One request on stream `stream`: the frames to send, and what to do with those received.

    Output goes to `out` and `err` as it arrives. With `output_acks` (the agent's HELLO
    reply has an output window) `acks()` gives the OUTPUT_ACK frames that return the window
    for what the writers took, so the agent never runs more than a window ahead."""

    def __init__(self, stream: int, out: Writer, err: Writer, *, output_acks: bool = False) -> None:
        self.stream = stream
        self._writers = {FrameType.STDOUT: out, FrameType.STDERR: err}
        self._output_acks = output_acks
        self._consumed = 0  # output bytes written out and not yet acknowledged
        self.started = False
        self._stdin_in_flight = 0

    def request(self, ftype: FrameType, request: dict[str, Any]) -> bytes:
        return encode_json(ftype, self.stream, request)

    def stdin_room(self) -> int:
        """How many stdin bytes may be sent now (none before the process runs)."""
        return max(0, STDIN_WINDOW - self._stdin_in_flight) if self.started else 0

    def stdin(self, data: bytes) -> bytes:
        """A STDIN frame for data; empty data is EOF."""
        self._stdin_in_flight += len(data)
        return encode(FrameType.STDIN, self.stream, data)

    def signal(self, signum: int) -> bytes:
        return encode_json(FrameType.SIGNAL, self.stream, {"signal": signum})

    def acks(self) -> bytes:
        if not self._consumed:
            return b""
        frame = encode(FrameType.OUTPUT_ACK, self.stream, struct.pack(">Q", self._consumed))
        self._consumed = 0
        return frame

    def feed(self, frame: Frame) -> Outcome | None:
        """Handle one received frame; the Outcome once the request has ended."""
        if frame.stream != self.stream:
            return None
        t = frame.type
        if t == FrameType.STARTED:
            self.started = True
        elif t in (FrameType.STDOUT, FrameType.STDERR):
            if frame.payload:
                self._writers[FrameType(t)](frame.payload)
                if self._output_acks:
                    self._consumed += len(frame.payload)
        elif t == FrameType.ACK:
            self._stdin_in_flight -= struct.unpack(">Q", frame.payload)[0]
        elif t == FrameType.EXIT:
            result = json.loads(frame.payload)
            return Outcome(result.get("status"), result.get("signal"))
        elif t == FrameType.ERROR:
            return Outcome(None, None, str(json.loads(frame.payload).get("message", "error")))
        return None
