#!/usr/bin/env python3
"""Per-run and per-test overhead on the null testbed: nestbed against autopkgtest 5.28.

A package with N tests that each run `true` (no dependencies) is run by both programs;
the per-test cost is the slope between N=1 and N=10. Run as root (null runs tests via su).

    python3 bench/null_overhead.py [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO / "tests"))  # bench/ itself is sys.path[0]

from tests_support import write_package  # noqa: E402


def make_package(root: Path, tests: int) -> Path:
    stanzas = [f"Test-Command: true\nFeatures: test-name=t{i}\nDepends:\n" for i in range(tests)]
    return write_package(root, {}, "\n".join(stanzas))


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    nestbed = shutil.which("nestbed", path=str(Path(sys.executable).parent)) or "nestbed"
    programs = {"nestbed": nestbed, "autopkgtest": shutil.which("autopkgtest")}
    with tempfile.TemporaryDirectory() as tmp:
        packages = {n: make_package(Path(tmp) / f"p{n}", n) for n in (1, 10)}
        print(f"{'program':<12} {'1 test (s)':>10} {'10 tests (s)':>12} {'per test (s)':>12}")
        for name, program in programs.items():
            if program is None:
                print(f"{name:<12} not installed")
                continue
            medians = {
                n: statistics.median(
                    timed([program, "-B", str(tree), "--", "null"]) for _ in range(args.runs)
                )
                for n, tree in packages.items()
            }
            per_test = (medians[10] - medians[1]) / 9
            print(f"{name:<12} {medians[1]:>10.2f} {medians[10]:>12.2f} {per_test:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
