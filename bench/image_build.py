#!/usr/bin/env python3
"""Time `nestbed image build` against the bare mmdebstrap call it wraps, in one run.

    python3 bench/image_build.py [--release bookworm] [--runs 1] [--boot]

The bare call installs the same packages from the same apt sources into a directory on the
same scratch file system, with mmdebstrap's defaults (what a person would type). The build
is the full `nestbed image build -o DIR` (mirror check, mmdebstrap with nestbed's hooks,
kernel copy, mkfs.ext4, manifest). Target: ratio <= 1.3. With --boot, also the time from
starting QEMU (TCG) to the control agent's first answer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nestbed.image import BuildOptions
from nestbed.image.build import _scratch_parent, plan
from nestbed.image.cache import ImagePaths
from nestbed.image.cli import main as image_main
from nestbed.proc import remove_tree, run


def bare(options: BuildOptions, scratch: Path) -> float:
    p = plan(options)
    target = Path(tempfile.mkdtemp(prefix="bench-bare-", dir=scratch))
    sources = [line for s in p.sources for line in s.lines()]
    include = f"--include={','.join(options.packages)}"
    argv = ["mmdebstrap", "--variant=minbase", include, options.release, str(target), *sources]
    start = time.monotonic()
    try:
        run(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", *argv]
            if os.geteuid() == 0
            else argv
        )
        return time.monotonic() - start
    finally:
        remove_tree(target)


def full(release: str, out: Path) -> float:
    start = time.monotonic()
    rc = image_main(["build", "--release", release, "-o", str(out)])
    elapsed = time.monotonic() - start
    if rc != 0:
        sys.exit(f"nestbed image build failed ({rc})")
    return elapsed


def boot(out: Path) -> float:
    from nestbed.qemu.machine import Machine, MachineConfig

    machine = Machine(MachineConfig.for_image(ImagePaths.load(out), base_image=True))
    start = time.monotonic()
    with machine:
        elapsed = time.monotonic() - start
        machine.channel.exec(["true"], timeout=60)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--release", default="bookworm")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--boot", action="store_true", help="also time boot to the agent")
    args = parser.parse_args()
    options = BuildOptions(release=args.release)
    work = Path(tempfile.mkdtemp(prefix="nestbed-bench-"))
    bares, fulls, boots = [], [], []
    try:
        for i in range(args.runs):
            bares.append(bare(options, _scratch_parent(work)))
            out = work / f"image-{i}"
            fulls.append(full(args.release, out))
            if args.boot:
                boots.append(boot(out))
            remove_tree(out)
            print(f"run {i + 1}: bare mmdebstrap {bares[-1]:.1f} s, nestbed image build"
                  f" {fulls[-1]:.1f} s, ratio {fulls[-1] / bares[-1]:.2f}", flush=True)  # fmt: skip
    finally:
        remove_tree(work)
    b, f = statistics.median(bares), statistics.median(fulls)
    print(f"bare mmdebstrap:      {b:6.1f} s (median of {len(bares)})")
    print(f"nestbed image build:  {f:6.1f} s (median of {len(fulls)})")
    print(f"ratio:                {f / b:6.2f} (target <= 1.3)")
    if boots:
        print(f"boot to agent (TCG):  {statistics.median(boots):6.1f} s (median of {len(boots)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
