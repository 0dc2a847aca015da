#!/usr/bin/env python3
"""Time the QEMU testbed against a raw boot of the same image, in one run.

    python3 bench/qemu_testbed.py [--image DIR] [--runs 3] [--tests 6]

- raw boot: `Machine.launch()` of the image (TCG, same shape): QEMU start to the control
  agent's first answer, and to `systemctl is-system-running --wait` (a booted system);
- cold ready: `nestbed-virt-qemu --cold-boot IMAGE`, server start to `open` answered;
- first ready: the same without --cold-boot after removing the saved state (boot + save +
  restore: what the first run of a machine shape pays once);
- restored ready: server start to `open` answered, from the saved state;
- revert: `revert` answered;
- exec: one `true` through the exec prefix;
- per-test overhead: (nestbed run of N `true` tests - run of 1) / (N - 1);
- --kernel-log-only: what watching the kernel log costs a test (root, isolation-machine:
  the tests it is done for), (run of N with --kernel-warnings report - run with ignore) / N.
Targets (issue 4): cold ready <= 1.15x raw boot, restored ready <= 1.5 s, revert <= 1 s,
per-test overhead <= 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nestbed.image import BuildOptions, ImagePaths, ensure_image
from nestbed.qemu.machine import Machine, MachineConfig
from nestbed.qemu.state import StateStore
from nestbed.testbed.client import Testbed

BIN = Path(sys.executable).parent
SERVER = str(BIN / "nestbed-virt-qemu")


def raw_boot(image: ImagePaths) -> tuple[float, float]:
    start = time.monotonic()
    with Machine(MachineConfig.for_image(image)) as m:
        agent = time.monotonic() - start
        m.channel.exec(["systemctl", "is-system-running", "--wait"], timeout=300)
        booted = time.monotonic() - start
    return agent, booted


def ready(image: ImagePaths, *extra: str, reverts: int = 0, execs: int = 0) -> dict[str, float]:
    out: dict[str, float] = {}
    start = time.monotonic()
    tb = Testbed([SERVER, *extra, str(image.directory)], log=lambda _l: None)
    tb.start()
    try:
        tb.open(timeout=600)
        out["ready"] = time.monotonic() - start
        for _ in range(execs):
            t = time.monotonic()
            tb.execute(["true"])
            out["exec"] = min(out.get("exec", 1e9), time.monotonic() - t)
        times = []
        for _ in range(reverts):
            t = time.monotonic()
            tb.revert(timeout=600)
            times.append(time.monotonic() - t)
        if times:
            out["revert"] = statistics.median(times)
    finally:
        tb.quit()
    return out


def run_tests(
    image: ImagePaths, n: int, stanza: str = "", *options: str, env: dict[str, str] | None = None
) -> float:
    """Seconds a nestbed run of n `true` tests takes (`env`: the runner's environment)."""
    with tempfile.TemporaryDirectory() as tmp:
        tests = Path(tmp, "pkg", "debian", "tests")
        tests.mkdir(parents=True)
        (tests / "control").write_text(
            "".join(
                f"Test-Command: true\nDepends:\nFeatures: test-name=t{i}\n{stanza}\n"
                for i in range(n)
            )
        )
        start = time.monotonic()
        subprocess.run(
            [str(BIN / "nestbed"), *options, "-B", str(tests.parent.parent), "--", "qemu",
             str(image.directory)],
            check=True, capture_output=True, timeout=900, env=env,
        )  # fmt: skip
        return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, help="image directory (default: the cached one)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tests", type=int, default=6)
    parser.add_argument(
        "--per-test-only", action="store_true", help="measure only the per-test overhead"
    )
    parser.add_argument(
        "--kernel-log-only", action="store_true", help="measure only the kernel log's cost"
    )
    args = parser.parse_args()
    image = ImagePaths.load(args.image) if args.image else ensure_image(BuildOptions())
    if args.per_test_only:
        per_test(image, args.tests, args.runs)
        return 0
    if args.kernel_log_only:
        kernel_log_cost(image, args.tests, args.runs)
        return 0

    def med(values: list[float]) -> str:
        return (
            f"{statistics.median(values):6.2f} s  (runs: {', '.join(f'{v:.2f}' for v in values)})"
        )

    # interleaved, so a change in the machine's load hits both alike
    raws: list[tuple[float, float]] = []
    colds: list[float] = []
    for _ in range(args.runs):
        raws.append(raw_boot(image))
        colds.append(ready(image, "--cold-boot")["ready"])
    print(f"raw boot to agent        {med([r[0] for r in raws])}", flush=True)
    print(f"raw boot to booted       {med([r[1] for r in raws])}", flush=True)
    print(f"cold ready               {med(colds)}", flush=True)
    ratio = statistics.median(colds) / statistics.median([r[1] for r in raws])
    print(f"  ratio cold ready / raw boot to booted: {ratio:.2f}", flush=True)
    for d in StateStore(image.directory).root.glob(f"{image.directory.name}-*"):
        StateStore.discard(d)
    first = ready(image)["ready"]
    print(f"first ready (boot+save)  {first:6.2f} s", flush=True)
    restored = [ready(image, reverts=3, execs=10) for _ in range(args.runs)]
    print(f"restored ready           {med([r['ready'] for r in restored])}", flush=True)
    print(f"revert (median of 3)     {med([r['revert'] for r in restored])}", flush=True)
    print(f"exec of `true`           {med([r['exec'] for r in restored])}", flush=True)
    per_test(image, args.tests, args.runs)
    return 0


def per_test(image: ImagePaths, tests: int, runs: int) -> None:
    """(run of N `true` tests - run of 1) / (N - 1), interleaved runs, median."""
    overheads = []
    for _ in range(runs):
        one = run_tests(image, 1)
        many = run_tests(image, tests)
        overheads.append((many - one) / (tests - 1))
        print(f"nestbed run, 1 test {one:6.2f} s; {tests} tests {many:6.2f} s", flush=True)
    print(
        f"per-test overhead        {statistics.median(overheads):6.2f} s"
        f"  (runs: {', '.join(f'{v:.2f}' for v in overheads)})",
        flush=True,
    )


def kernel_log_cost(image: ImagePaths, tests: int, runs: int) -> None:
    """(run of N root isolation-machine tests watched - the same not watched) / N."""
    stanza = "Restrictions: needs-root, isolation-machine\n"
    costs = []
    for _ in range(runs):
        ignored = run_tests(image, tests, stanza, "--kernel-warnings", "ignore")
        watched = run_tests(image, tests, stanza, "--kernel-warnings", "report")
        costs.append((watched - ignored) / tests)
        print(f"{tests} tests: kernel log ignored {ignored:6.2f} s, watched {watched:6.2f} s",
              flush=True)  # fmt: skip
    print(
        f"kernel log per test      {statistics.median(costs):6.2f} s"
        f"  (runs: {', '.join(f'{v:.2f}' for v in costs)})",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
