"""The wrapper's notes ride at the end of the test's stderr; the runner takes them off
again: whatever the test wrote reaches the user and the verdict unchanged, however the
stream is cut into chunks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nestbed.run.capture import Capture
from nestbed.run.executor import NOTES_MARKER, StderrSplitter


def _split(data: bytes, cuts: list[int]) -> tuple[bytes, bytes, bytes]:
    """(what the sink saw, what was stored, the notes) for `data` fed in pieces."""
    seen, store = bytearray(), Capture()
    splitter = StderrSplitter(seen.extend, store)
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        splitter.feed(data[start:cut])
        start = cut
    splitter.close()
    stored = b"".join(store.chunks())
    store.close()
    return bytes(seen), stored, bytes(splitter.notes)


@pytest.mark.parametrize(
    ("stderr", "notes"),
    [
        (b"", b""),
        (b"plain error\n", b""),
        (b"", b"killing leaked background processes: 42 \n"),
        (b"an error\n", b"timed-out after 3 s\n"),
        (b"a NUL \0 of the test's own\n", b"timed-out after 3 s\n"),
        (b"ends with a marker prefix\0nestbed-wr", b""),
        (NOTES_MARKER[:-1] + b"x", b""),
    ],
)
def test_notes_come_off_the_end(stderr: bytes, notes: bytes) -> None:
    data = stderr + (NOTES_MARKER + notes if notes else b"")
    for cuts in ([], list(range(len(data))), [len(stderr) + 3]):
        seen, store, got = _split(data, cuts)
        assert (seen, store, got) == (stderr, stderr, notes), cuts


@given(
    st.binary(max_size=80).filter(lambda b: NOTES_MARKER not in b),
    st.binary(max_size=40),
    st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_any_stderr_any_chunking(stderr: bytes, notes: bytes, cuts: list[int]) -> None:
    data = stderr + NOTES_MARKER + notes
    assert _split(data, cuts) == (stderr, stderr, notes)
    assert _split(stderr, cuts) == (stderr, stderr, b"")


def test_output_is_not_held_back_without_a_nul() -> None:
    seen: list[bytes] = []
    splitter = StderrSplitter(seen.append, Capture())
    splitter.feed(b"first line\n")
    assert seen == [b"first line\n"]  # passed on at once, before the stream ends
