"""A test that prints far more than a runner should hold: all of it reaches the output files,
the runner's memory stays bounded, and the verdict still reads stderr's first line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nestbed.run.capture import EXCERPT_LIMIT, HEAD_LIMIT, Capture
from tests_support import nestbed_argv

LARGE = Path(__file__).resolve().parent.parent / "fixtures" / "packages" / "large-output"
BYTES = 200_000_000  # each stream: before, the runner held all of it, twice

# Runs the command and prints the peak resident memory (KiB) of its largest process,
# nestbed's runner and everything it started.
_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def test_a_capture_holds_only_its_head(tmp_path: Path) -> None:
    capture = Capture()
    chunk = bytes(range(256)) * 4096  # 1 MiB
    for _ in range(5):
        capture.write(chunk)
    assert capture.size == 5 * len(chunk)
    assert bytes(capture.head) == chunk[:HEAD_LIMIT]
    capture.save(str(tmp_path / "saved"))
    assert (tmp_path / "saved").read_bytes() == chunk * 5
    assert b"".join(capture.chunks()) == chunk * 5
    excerpt = capture.excerpt()
    assert excerpt.startswith(chunk[:EXCERPT_LIMIT])
    assert excerpt.endswith(f"[nestbed: {5 * len(chunk) - EXCERPT_LIMIT} more bytes]\n".encode())
    capture.close()


def _sha_of_repeated(byte: bytes, count: int, prefix: bytes = b"") -> str:
    digest = hashlib.sha256(prefix)
    block = byte * (1 << 20)
    for _ in range(count // len(block)):
        digest.update(block)
    digest.update(byte * (count % len(block)))
    return digest.hexdigest()


def _sha_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.skipif(os.geteuid() != 0, reason="the null testbed runs tests via su")
def test_much_output_arrives_whole_and_the_runner_stays_small(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [*nestbed_argv(), "-B", "-o", str(out), "--env", f"NESTBED_TEST_OUTPUT_BYTES={BYTES}"]
    p = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, *argv, str(LARGE), "--", "null"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    status, peak_kib = (int(word) for word in p.stdout.split())
    summary = (out / "summary").read_text()
    # stderr fails the test, with its first line as the reason, as autopkgtest says it
    assert status == 4, summary
    assert "much-stdout          PASS" in summary
    assert "much-stderr          FAIL stderr: first line of much stderr" in summary
    assert (out / "much-stdout-stdout").stat().st_size == BYTES
    assert _sha_of_file(out / "much-stdout-stdout") == _sha_of_repeated(b"x", BYTES)
    first = b"first line of much stderr\n"
    assert _sha_of_file(out / "much-stderr-stderr") == _sha_of_repeated(b"e", BYTES, first)
    assert peak_kib < 150 * 1024, f"peak resident memory {peak_kib} KiB"
