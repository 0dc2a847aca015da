#!/usr/bin/env python3
"""Peak memory of nestbed's processes while a test prints a lot (issue 11, point 9).

Runs the `much-stdout` test of tests/fixtures/packages/large-output (BYTES of "x" on stdout)
on the given testbed with nestbed of this checkout, samples the resident memory (VmHWM) of
every process of the run every 0.2 s, and prints the peak of each, largest first, and whether
TEST-stdout came out whole. Run as root (the null testbed runs tests via su).

    python3 bench/large_output.py [--bytes 1000000000] [-- VIRT-SERVER ...]   (default: null)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tests" / "fixtures" / "packages" / "large-output"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return found


def _sample(pid: int, peaks: dict[tuple[int, str], int]) -> None:
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += _children(p)
        try:
            with open(f"/proc/{p}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{p}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
        except OSError:
            continue
        name = " ".join(os.path.basename(w.decode(errors="replace")) for w in words[:2])
        kib = int(status.get("VmHWM", "0 kB").split()[0])
        peaks[(p, name)] = max(peaks.get((p, name), 0), kib)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=1_000_000_000, help="what the test prints")
    parser.add_argument("server", nargs="*", help="the virt server and its options (null)")
    args = parser.parse_args()
    nestbed = Path(sys.executable).parent / "nestbed"
    server = args.server or ["null"]
    with tempfile.TemporaryDirectory(prefix="nestbed-bench-") as tmp:
        out = Path(tmp) / "out"
        argv = [
            str(nestbed), "-B", "-o", str(out), "--test-name", "much-stdout",
            "--env", f"NESTBED_TEST_OUTPUT_BYTES={args.bytes}", str(PACKAGE), "--", *server,
        ]  # fmt: skip
        started = time.monotonic()
        run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peaks: dict[tuple[int, str], int] = {}
        while run.poll() is None:
            _sample(run.pid, peaks)
            time.sleep(0.2)
        took = time.monotonic() - started
        stdout = out / "much-stdout-stdout"
        size = stdout.stat().st_size if stdout.exists() else 0
        print(f"exit {run.returncode} in {took:.1f} s; TEST-stdout {size} of {args.bytes} bytes")
    for (pid, name), kib in sorted(peaks.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  peak {kib / 1024:8.1f} MiB  {name} (pid {pid})")
    return 0 if size == args.bytes and run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
