#!/usr/bin/env python3
"""Per-test overhead on the unshare testbed: nestbed against autopkgtest 5.28, same tarball.

A package with N tests that each run `true` (no dependencies) is run by both programs with
``-- unshare --tarball T``; the per-test cost is the slope between N=1 and N=10, so the
one-off costs of a run (starting, opening the testbed) drop out. A second package marks each
test ``breaks-testbed``, so every test after the first costs a revert too.

The tarball is nestbed's cached one (built first when missing: `ensure_tarball`), a plain
mmdebstrap minbase tarball that autopkgtest-virt-unshare takes as it is. As root,
autopkgtest's unshare needs a range for root in /etc/subuid and /etc/subgid
(``root:100000:65536``).

    python3 bench/unshare_overhead.py [--runs 3] [--tarball T]
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

from nestbed.container.tarball import ensure_tarball, host_arch, host_release

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO / "tests"))  # bench/ itself is sys.path[0]

from tests_support import write_package  # noqa: E402

COUNTS = (1, 10)


def make_package(root: Path, tests: int, breaks: bool) -> Path:
    extra = "Restrictions: breaks-testbed\n" if breaks else ""
    stanzas = [
        f"Test-Command: true\nFeatures: test-name=t{i}\nDepends:\n{extra}" for i in range(tests)
    ]
    return write_package(root, {}, "\n".join(stanzas))


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {' | '.join(tail)}")
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tarball", help="tarball to use (default: nestbed's cached one)")
    args = parser.parse_args()
    tarball = args.tarball or str(ensure_tarball(host_release(), host_arch(), None))
    nestbed = shutil.which("nestbed", path=str(Path(sys.executable).parent)) or "nestbed"
    # nestbed-unpack: revert by a fresh unpack into a temp dir (--unpack) instead of
    # throwing an overlay's tmpfs upper dir away
    programs: dict[str, tuple[str | None, list[str]]] = {
        "nestbed": (nestbed, []),
        "nestbed-unpack": (nestbed, ["--unpack"]),
        "autopkgtest": (shutil.which("autopkgtest"), []),
    }
    print(f"tarball: {tarball}")
    slopes: dict[tuple[str, bool], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        header = f"{'program':<15} {'tests':<15} {'1 test (s)':>10} {'10 tests (s)':>12}"
        print(f"{header} {'per test (s)':>12}")
        for breaks in (False, True):
            kind = "breaks-testbed" if breaks else "plain"
            packages = {n: make_package(Path(tmp) / f"p{n}{kind}", n, breaks) for n in COUNTS}
            for name, (program, extra) in programs.items():
                if program is None:
                    print(f"{name:<15} not installed")
                    continue
                virt = ["unshare", "--tarball", tarball, *extra]
                medians = {
                    n: statistics.median(
                        timed([program, "-B", f"{tree}/", "--", *virt]) for _ in range(args.runs)
                    )
                    for n, tree in packages.items()
                }
                per_test = (medians[COUNTS[1]] - medians[COUNTS[0]]) / (COUNTS[1] - COUNTS[0])
                slopes[name, breaks] = per_test
                print(
                    f"{name:<15} {kind:<15} {medians[COUNTS[0]]:>10.2f} "
                    f"{medians[COUNTS[1]]:>12.2f} {per_test:>12.3f}"
                )
    for breaks in (False, True):
        ours, theirs = slopes.get(("nestbed", breaks)), slopes.get(("autopkgtest", breaks))
        if ours and theirs:
            kind = "breaks-testbed" if breaks else "plain"
            print(f"per-test overhead ratio autopkgtest/nestbed ({kind}): {theirs / ours:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
