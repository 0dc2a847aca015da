"""Termination signals become one orderly shutdown, the same way in every command.

Inside `ShutdownOnSignals` the first of its signals raises `Interrupted` wherever the program
is, so it unwinds through every `finally` and `with` that releases a VM, a server or a
directory; a BaseException, so that no `except Exception` on the way swallows it. Later
signals are only noted: the clean-up they would cut short is what releases those things.
Code that allocates something and records it runs both steps in `critical()`, so that no
signal lands between them. The runner, the virt servers, `nestbed image` and `nestbed-vm`
all use it; each decides in its own exit table what an `Interrupted` ends with.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from types import FrameType, TracebackType
from typing import Any

TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(BaseException):
    """A termination signal arrived: unwind through every clean-up, then end for it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class ShutdownOnSignals:
    """While active, `signums` raise `Interrupted` once; see the module's doc."""

    def __init__(self, signums: Iterable[int] = TERMINATION_SIGNALS) -> None:
        self.signums = tuple(signums)
        self.received: int | None = None  # the first signal that arrived, raised or not
        self._depth = 0
        self._pending: BaseException | None = None
        self._stopping = False  # an Interrupted is unwinding, or the clean-up has begun
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> ShutdownOnSignals:
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        self.deliver(Interrupted(signum))

    def deliver(self, exc: BaseException) -> None:
        """Raise `exc` now, or when the critical section ends. An interruption outranks
        whatever else is pending (a virt server's copy timeout); once the shutdown has
        begun nothing more is raised."""
        if self._stopping:
            return
        if self._depth:
            if self._pending is None or isinstance(exc, Interrupted):
                self._pending = exc
            return
        self._raise(exc)

    def _raise(self, exc: BaseException) -> None:
        if isinstance(exc, Interrupted):
            self._stopping = True
        raise exc

    def finish(self) -> None:
        """The clean-up begins: from now on signals are only noted in `received`."""
        self._stopping = True
        self._pending = None

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Defer what `deliver` would raise until the block is done."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending is not None:
                exc, self._pending = self._pending, None
                if not self._stopping:
                    self._raise(exc)


def die_of(signum: int) -> int:
    """End this process by `signum`'s default action, as whoever sent the signal expects of
    it (autopkgtest's runner and servers do the same); 128+N should it not end us."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(1)  # the signal is delivered before kill returns; belt and braces
    return 128 + signum
