#!/usr/bin/env python3
"""Two nestbed versions on the QEMU testbed, interleaved: per-test overhead and the whole run.

    python3 bench/ab_qemu.py --old REV [--rounds 4] [--tests 6] [--image DIR]

Figures on an emulated machine change by 1.5-2.5x within hours, so a change is judged only
against the code before it measured in the same minutes. REV is checked out into a
temporary git worktree and run from there (PYTHONPATH: its `nestbed`, virt server and exec
helper), the working tree's code is the other side. Each round runs, for old and then new,
`nestbed -B PKG -- qemu IMAGE` on a package of 1 and of N `true` tests (after one
unmeasured run each, which also saves each version's ready state). Prints each round and the
medians: whole run of one test, and per-test overhead (run of N - run of 1) / (N - 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from qemu_testbed import run_tests

from nestbed.image import BuildOptions, ImagePaths, ensure_image

REPO = Path(__file__).resolve().parent.parent


def timed_run(source: Path | None, tests: int, image: ImagePaths) -> float:
    """A run from `source` (a worktree's src), or from the working tree (None)."""
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
    return run_tests(image, tests, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tests", type=int, default=6)
    parser.add_argument("--image", type=Path, help="image directory (default: the cached one)")
    args = parser.parse_args()
    image = ImagePaths.load(args.image) if args.image else ensure_image(BuildOptions())
    with tempfile.TemporaryDirectory(prefix="nestbed-ab-") as tmp:
        worktree = Path(tmp, "old")
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(worktree), args.old],
            check=True,
        )  # fmt: skip
        try:
            sides = {"old": worktree / "src", "new": None}
            for source in sides.values():
                timed_run(source, 1, image)
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
            for round_ in range(1, args.rounds + 1):
                for name, source in sides.items():
                    t1 = timed_run(source, 1, image)
                    tn = timed_run(source, args.tests, image)
                    results[name].append((t1, tn))
                    per_test = (tn - t1) / (args.tests - 1)
                    print(f"round {round_} {name}: 1 test {t1:.2f} s, {args.tests} tests "
                          f"{tn:.2f} s, per test {per_test:.2f} s", flush=True)  # fmt: skip
            print(f"load: {os.getloadavg()[0]:.2f}")
            for name, runs in results.items():
                whole = statistics.median(t1 for t1, _ in runs)
                per = statistics.median((tn - t1) / (args.tests - 1) for t1, tn in runs)
                print(f"{name} ({args.old if name == 'old' else 'working tree'}): whole run of "
                      f"one test {whole:.2f} s, per-test overhead {per:.2f} s")  # fmt: skip
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                check=False,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
