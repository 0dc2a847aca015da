"""One output stream of a test as it arrives: spooled to a file, a bounded head in memory.

A test may print gigabytes; the runner must pass all of it on (terminal, log, TEST-stdout)
without holding it. A `Capture` keeps the stream in an unlinked temporary file (gone with
the process, whatever happens) and only its first `HEAD_LIMIT` bytes in memory: enough for
the verdict, which reads the first line of stderr. The --junit file carries an excerpt.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

HEAD_LIMIT = 1 << 20  # bytes kept in memory; the verdict's "stderr: FIRST LINE" comes from it
EXCERPT_LIMIT = 1 << 20  # bytes of a stream the --junit file carries
_CHUNK = 1 << 16


class Capture:
    def __init__(self) -> None:
        # unlinked at once: nothing is left behind, however the run ends; closed in close()
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="nestbed-output.")  # noqa: SIM115
        self.head = bytearray()
        self.size = 0

    @classmethod
    def of(cls, data: bytes) -> Capture:
        """A capture holding `data` (for tests and callers that have the bytes already)."""
        capture = cls()
        capture.write(data)
        return capture

    def write(self, data: bytes) -> None:
        self._file.write(data)
        if len(self.head) < HEAD_LIMIT:
            self.head += data[: HEAD_LIMIT - len(self.head)]
        self.size += len(data)

    def __bool__(self) -> bool:
        return self.size > 0

    def first_line(self) -> str:
        return self.head.decode("UTF-8", "replace").split("\n", 1)[0].rstrip("\n \t\r")

    def chunks(self) -> Iterator[bytes]:
        """The whole stream again, from its start, a chunk at a time."""
        self._file.flush()
        self._file.seek(0)
        while chunk := self._file.read(_CHUNK):
            yield chunk
        self._file.seek(0, os.SEEK_END)

    def save(self, path: str) -> None:
        self._file.flush()
        self._file.seek(0)
        with open(path, "wb") as out:
            shutil.copyfileobj(self._file, out, _CHUNK)
        self._file.seek(0, os.SEEK_END)

    def excerpt(self, limit: int = EXCERPT_LIMIT) -> bytes:
        """The stream's start, at most `limit` bytes, and a note of what was left out."""
        if self.size <= limit:
            return bytes(self.head[:limit])
        left_out = self.size - limit
        return bytes(self.head[:limit]) + f"\n[nestbed: {left_out} more bytes]\n".encode()

    def close(self) -> None:
        self._file.close()
