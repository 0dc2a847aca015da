#!/usr/bin/env python3
"""Where the time of one nestbed run goes: a timeline of every host process, protocol
command and guest round trip, with durations (NESTBED_TRACE, see nestbed.trace).

    python3 bench/trace.py [--image DIR] [--tests 1] [--breaks-testbed] [-o TRACE.jsonl]
                           [-- NESTBED-OPTION...]

Runs `nestbed -B PKG -- qemu IMAGE` on a package of N `true` tests once to warm the
testbed's saved state (not traced), then once traced, and prints:
- the timeline: each event's start (s after the run's process was created), duration,
  process, kind and what; nested events are indented under the step or command they are in;
- the totals: wall time, time per kind, host programs started, guest round trips, and the
  runner's own time between testbed commands.
`--breaks-testbed` makes the first test breaks-testbed, so the run reverts once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from nestbed.image import BuildOptions, ensure_image
from nestbed.trace import TRACE_ENV

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Event:
    pid: int
    proc: str
    kind: str
    what: str
    start: float
    end: float | None

    @property
    def duration(self) -> float:
        return 0.0 if self.end is None else self.end - self.start


def write_package(root: Path, tests: int, breaks: bool) -> Path:
    tests_dir = root / "debian" / "tests"
    tests_dir.mkdir(parents=True)
    stanzas = []
    for i in range(tests):
        restrictions = "Restrictions: breaks-testbed\n" if breaks and i == 0 else ""
        stanzas.append(f"Test-Command: true\nDepends:\nFeatures: test-name=t{i}\n{restrictions}")
    (tests_dir / "control").write_text("\n".join(stanzas))
    return root


def run(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1200)
    if res.returncode != 0:
        tail = res.stderr[-2000:]
        sys.exit(f"trace: the run failed (exit {res.returncode}):\n{res.stdout}{tail}")
    return time.monotonic() - start


def load(path: Path) -> list[Event]:
    events = [Event(**json.loads(line)) for line in path.read_text().splitlines() if line]
    return sorted(events, key=lambda e: (e.start, -(e.end or e.start)))


def report(events: list[Event], wall: float) -> None:
    runner = next((e for e in events if e.kind == "process" and e.proc == "nestbed"), None)
    t0 = runner.start if runner else events[0].start
    open_spans: list[Event] = []
    print(f"{'start':>8} {'took':>8}  {'process':<18} {'kind':<8} what")
    for e in events:
        while open_spans and open_spans[-1].end is not None and open_spans[-1].end <= e.start:
            open_spans.pop()
        indent = "  " * len(open_spans)
        took = "" if e.end is None else f"{e.duration:8.3f}"
        print(f"{e.start - t0:8.3f} {took:>8}  {e.proc[:18]:<18} {e.kind:<8} {indent}{e.what}")
        if e.end is not None and e.kind in ("step", "virt", "exec", "server"):
            open_spans.append(e)

    print()
    print(f"wall time of the traced run: {wall:.2f} s (measured outside)")
    by_kind: dict[str, list[float]] = defaultdict(list)
    for e in events:
        by_kind[e.kind].append(e.duration)
    for kind in ("process", "spawn", "virt", "server", "exec", "guest", "step"):
        values = by_kind.get(kind, [])
        if values:
            print(f"  {kind:<8} {len(values):4d} events, {sum(values):7.3f} s in all")
    helpers = [e for e in events if e.kind == "process" and e.what == "exec helper"]
    if helpers:
        print(
            f"  exec helpers: {len(helpers)}, their start (interpreter + imports)"
            f" {sum(e.duration for e in helpers):.3f} s in all,"
            f" {max(e.duration for e in helpers):.3f} s the slowest"
        )
    mine = [e for e in events if e.pid == (runner.pid if runner else -1)]
    waits = sorted(
        (e for e in mine if e.kind in ("virt", "exec") and e.end is not None),
        key=lambda e: e.start,
    )
    covered, last = 0.0, t0
    for e in waits:
        assert e.end is not None
        if e.end > last:
            covered += e.end - max(e.start, last)
            last = e.end
    if runner and runner.end is not None:
        end = max((e.end or e.start) for e in mine)
        print(
            f"  runner: {runner.duration:.3f} s to start, {end - t0:.3f} s to its last event;"
            f" waiting on the testbed {covered:.3f} s, its own work"
            f" {end - t0 - covered - runner.duration:.3f} s"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--image", type=Path, help="what nestbed-virt-qemu boots (default: the cached image)"
    )
    parser.add_argument("--tests", type=int, default=1)
    parser.add_argument("--breaks-testbed", action="store_true")
    parser.add_argument("-o", "--output", type=Path, help="keep the trace here (JSON lines)")
    parser.add_argument("extra", nargs="*", help="more nestbed options (after --)")
    args = parser.parse_args()
    image = args.image.absolute() if args.image else ensure_image(BuildOptions()).directory
    with tempfile.TemporaryDirectory(prefix="nestbed-trace-") as tmp:
        pkg = write_package(Path(tmp, "pkg"), args.tests, args.breaks_testbed)
        argv = [str(BIN / "nestbed"), *args.extra, "-B", str(pkg), "--", "qemu", str(image)]
        run(argv)  # the saved state is there after this one
        path = args.output or Path(tmp, "trace.jsonl")
        path.unlink(missing_ok=True)
        wall = run(argv, env={**os.environ, TRACE_ENV: str(path.absolute())})
        print(f"load: {os.getloadavg()[0]:.2f}; {' '.join(argv)}")
        report(load(path), wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
