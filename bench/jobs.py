#!/usr/bin/env python3
"""-j N against -j 1: where running tests on several testbeds at once helps, and where not.

Two packages of 6 tests each, run with ``-j 1`` and ``-j N`` (default 3) on the same
testbed, interleaved, each run's wall time from the runner's start to its exit:

- *sleeping*: every test sleeps 5 s (waiting on something: a timeout, a server, the
  network); the testbeds wait side by side;
- *cpu-bound*: every test hashes --cpu-mib MiB of zeros, about 5 s of one CPU in a TCG
  guest here; on a 2-core host running TCG guests they compete for the same cores.

    python3 bench/jobs.py [--jobs 3] [--runs 2] [--testbed qemu|unshare] [--image DIR]

The qemu testbed is nestbed's default image (built first when missing); the first run of
each program boots it and saves the ready state, so a warm-up run comes first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nestbed.image import BuildOptions, ensure_image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO / "tests"))  # bench/ itself is sys.path[0]

from tests_support import write_package  # noqa: E402

TESTS = 6
SECONDS = 5
CPU_MIB = 240
KINDS = {
    "sleeping": f"sleep {SECONDS}",
    # a fixed amount of work (not a time: a guest's clock runs on however slow it gets),
    # about SECONDS of one CPU in a TCG guest here when it has the host to itself
    "cpu-bound": "head -c {cpu_mib}M /dev/zero | sha256sum",
}


def make_package(root: Path, command: str) -> Path:
    stanzas = [
        f"Test-Command: {command}\nFeatures: test-name=t{i}\nDepends:\n" for i in range(TESTS)
    ]
    return write_package(root, {}, "\n".join(stanzas))


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True)
    took = time.monotonic() - start
    if proc.returncode != 0 or proc.stdout.count(" PASS") != TESTS:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise SystemExit(f"{' '.join(argv[:3])} failed ({proc.returncode}): {' | '.join(tail)}")
    return took


def default_image() -> str:
    return str(ensure_image(BuildOptions()).directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--testbed", choices=("qemu", "unshare"), default="qemu")
    parser.add_argument("--image", help="the qemu testbed's image (default: nestbed's)")
    parser.add_argument(
        "--cpu-mib", type=int, default=CPU_MIB, help="MiB the cpu-bound tests hash (work)"
    )
    args = parser.parse_args()
    nestbed = shutil.which("nestbed", path=str(Path(sys.executable).parent)) or "nestbed"
    testbed = ["unshare"] if args.testbed == "unshare" else ["qemu", args.image or default_image()]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"testbed: {' '.join(testbed)}; {os.cpu_count()} CPUs on the host; load {load}")
    print(f"{TESTS} tests of {SECONDS} s each; medians of {args.runs} runs, interleaved")
    with tempfile.TemporaryDirectory() as tmp:
        packages = {
            kind: make_package(Path(tmp) / kind, cmd.format(cpu_mib=args.cpu_mib))
            for kind, cmd in KINDS.items()
        }
        timed([nestbed, "-B", str(packages["sleeping"]), "--", *testbed])  # warm-up
        print(f"{'package':<10} {'-j 1 (s)':>9} {f'-j {args.jobs} (s)':>9} {'ratio':>6}")
        for kind, package in packages.items():
            times: dict[int, list[float]] = {1: [], args.jobs: []}
            for _ in range(args.runs):
                for jobs in times:
                    argv = [nestbed, "-j", str(jobs), "-B", str(package), "--", *testbed]
                    times[jobs].append(timed(argv))
            serial = statistics.median(times[1])
            parallel = statistics.median(times[args.jobs])
            print(
                f"{kind:<10} {serial:>9.1f} {parallel:>9.1f} {serial / parallel:>5.2f}x"
                f"   (-j 1: {', '.join(f'{t:.1f}' for t in times[1])};"
                f" -j {args.jobs}: {', '.join(f'{t:.1f}' for t in times[args.jobs])})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
