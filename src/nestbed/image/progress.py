"""Progress a person can follow: stages with elapsed time on a terminal (rich), plain
`nestbed [HH:MM:SS]: ...` lines on stderr otherwise.

Every text line goes through `nestbed.log` (as the image builder's: `nestbed [HH:MM:SS]:`,
also inside a virt server that builds); rich is only the live display of the stages.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Protocol, TextIO

from nestbed.log import AUTOPKGTEST

PROG = "nestbed"
_LINE = {"prog": PROG, "style": AUTOPKGTEST}

log = logging.getLogger(__name__)


class Progress(Protocol):
    def stage(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def detail(self, text: str) -> None: ...

    def info(self, text: str) -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """One line when a stage starts and one when it ends; details only with verbose."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose

    def _line(self, text: str) -> None:
        log.info(text, extra=_LINE)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        self._line(f"{name} ...")
        try:
            yield
        except BaseException:
            self._line(f"{name}: failed after {time.monotonic() - start:.1f} s")
            raise
        self._line(f"{name}: done in {time.monotonic() - start:.1f} s")

    def detail(self, text: str) -> None:
        if self.verbose:
            self._line(f"  {text}")

    def info(self, text: str) -> None:
        self._line(text)

    def close(self) -> None:
        pass


class QuietProgress:
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def detail(self, text: str) -> None:
        pass

    def info(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress:
    """A live list of stages: spinner, name, latest detail, elapsed time; ✓/✗ when done."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress as RichBar
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.bar = RichBar(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}"),
            TextColumn("[dim]{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.bar.start()
        self.task: object | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        task = self.bar.add_task(name, total=1, detail="")
        self.task = task
        try:
            yield
        except BaseException:
            self.bar.update(task, description=f"[red]✗ {name}", detail="")
            self.bar.stop_task(task)
            raise
        finally:
            self.task = None
        self.bar.update(task, completed=1, detail="")

    def detail(self, text: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, detail=text[:70])  # type: ignore[arg-type]

    def info(self, text: str) -> None:
        # bare, as a terminal showing the live display always had it; rich shows what is
        # written to stderr above the display
        log.info(text, extra={"as_is": True})

    def close(self) -> None:
        self.bar.stop()


def for_stream(stream: TextIO | None = None, verbose: bool = False) -> Progress:
    """Rich progress on a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if stream.isatty() and not verbose:
        return RichProgress()
    return PlainProgress(verbose)
