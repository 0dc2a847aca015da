#!/usr/bin/env python3
"""How often does level 1 fail while level-2 VMs run in it? Run the stress package
(bench/nested-stress: level-2 boots one after another while level 1 churns cgroups) in
fresh level-1 testbeds and count what happens.

    python3 bench/nested_faults.py [--image NESTED_IMAGE_DIR] [--runs 4] [--boots 5]
        [-- EXTRA nestbed-virt-qemu OPTIONS]

Each run is `nestbed -B bench/nested-stress --env STRESS_BOOTS=N -- qemu [OPTIONS] IMAGE`,
bounded by a wall-clock limit (a wedged level 1 shows up as a run that hits it). Per run it
prints the exit status, the level-2 boots that finished and why the testbed was lost, if it
was; at the end the totals: level-2 boots done, level-1 resets, wedges.

Under TCG (this project's machines), level 1 runs QEMU 7.2's emulated SVM, and a level-1
guest sometimes resets itself or wedges while a level-2 KVM guest runs (docs/nested.md,
"Known faults"); this measures how often, for example with other QEMU options:
`-- --qemu-command /path/to/wrapper`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from nestbed.image import BuildOptions, ensure_image

HERE = Path(__file__).resolve().parent
NESTBED = str(Path(sys.executable).parent / "nestbed")
RESET = "the guest reset or powered off by itself"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image", type=Path, help="a --nested image directory (default: build/cached)")
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--boots", type=int, default=5, help="level-2 boots per run")
    p.add_argument("--limit", type=float, default=1800, help="seconds per run before 'wedged'")
    p.add_argument("server_options", nargs="*", help="after --: nestbed-virt-qemu options")
    a = p.parse_args()
    image = a.image or ensure_image(BuildOptions(nested=True)).directory
    boots = resets = wedges = 0
    for run in range(1, a.runs + 1):
        argv = [NESTBED, "-B", str(HERE / "nested-stress"), "--env", f"STRESS_BOOTS={a.boots}",
                "--", "qemu", *a.server_options, str(image)]  # fmt: skip
        started = time.monotonic()
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=a.limit)
            rc, out = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as e:
            raw = e.stdout or b""  # bytes or str, depending on when it timed out
            rc, out = None, raw if isinstance(raw, str) else raw.decode(errors="replace")
            wedges += 1
        done = len(re.findall(r"^level-2 boot \d+: ok", out, re.M))
        boots += done
        reset = RESET in out
        resets += reset
        what = "wedged (limit reached)" if rc is None else f"exit {rc}"
        print(f"run {run}: {what}, {done}/{a.boots} level-2 boots in "
              f"{time.monotonic() - started:.0f} s" + ("; level 1 reset itself" if reset else ""),
              flush=True)  # fmt: skip
    print(f"total: {boots} level-2 boots done, {resets} level-1 resets, {wedges} wedges "
          f"in {a.runs} runs")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
