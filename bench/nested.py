#!/usr/bin/env python3
"""Time a level-2 VM through nestbed-vm against a raw nested boot of the same image, both
in one level-1 testbed.

    python3 bench/nested.py [--image NESTED_IMAGE_DIR] [--runs 3]

The host opens one level-1 testbed (nestbed-virt-qemu --baseimage on the --nested image,
TCG here) and, interleaved so load changes hit both alike (alternating which goes first),
runs in it:

- raw: qemu-system-x86_64 -accel kvm -cpu host directly on a fresh qcow2 overlay of
  /dev/baseimage with the image's kernel, initrd and command line (from
  /etc/nestbed/image.json), the same memory and CPUs as nestbed-vm's defaults, the console
  on a pipe; ready = QEMU start until the guest's root shell on the serial console (the
  image's autologin) has answered `systemctl is-system-running --wait; echo MARK`;
- nestbed-vm: `nestbed-vm -v -- true`; ready = its own "VM ready in" figure (start of
  nestbed-vm until the VM answers commands and systemd says the boot finished), and the
  whole call (start to exit, the VM stopped and cleaned up).

With --unshare, an unshare testbed exporting the same image (nestbed-virt-unshare
--baseimage=IMAGE: the container runs on the image's own root tree) is open beside it, and
each run also times `nestbed-vm -v -- true` there: level 2 then runs on level 0's
accelerator (KVM where usable, else TCG), not inside level 1's.

Goal (issue 5): nestbed-vm ready <= 1.15x raw ready.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

from nestbed.errors import TestbedFailure
from nestbed.image import BuildOptions, ImagePaths, ensure_image
from nestbed.testbed.client import Testbed

BIN = Path(sys.executable).parent
SERVER = str(BIN / "nestbed-virt-qemu")
UNSHARE_SERVER = str(BIN / "nestbed-virt-unshare")

# Runs in the level-1 testbed (its python3): prints the seconds to a ready raw level-2 VM.
RAW = r"""
import json, os, select, subprocess, sys, tempfile, time
info = json.load(open("/etc/nestbed/image.json"))
tmp = tempfile.mkdtemp(prefix="raw-nested-")
overlay = os.path.join(tmp, "root.qcow2")
start = time.monotonic()
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                "-b", "/dev/baseimage", overlay], check=True)
argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        "-accel", "kvm", "-cpu", "host", "-smp", sys.argv[1], "-m", sys.argv[2],
        "-kernel", info["kernel"], "-initrd", info["initrd"], "-append", info["cmdline"],
        "-drive", "if=none,id=root,file=" + overlay + ",format=qcow2",
        "-device", "virtio-blk-pci,drive=root,serial=" + info["root_serial"],
        "-nic", "user,model=virtio-net-pci", "-serial", "stdio"]
qemu = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
buf, sent, mark = b"", False, b"RAW-" + b"READY"
try:
    while True:
        if time.monotonic() - start > 900:
            sys.exit("no answer in 900 s")
        ready, _, _ = select.select([qemu.stdout], [], [], 5)
        if ready:
            data = os.read(qemu.stdout.fileno(), 65536)
            if not data:
                sys.exit("qemu exited: " + buf[-300:].decode(errors="replace"))
            buf = (buf + data)[-8192:]
        if not sent and b"root@" in buf:
            qemu.stdin.write(b"systemctl is-system-running --wait; echo RAW-''READY\n")
            qemu.stdin.flush()
            sent = True
        if sent and mark in buf:
            print(f"{time.monotonic() - start:.2f}")
            break
finally:
    qemu.kill()
    qemu.wait()
    subprocess.run(["rm", "-rf", tmp])
"""


def raw_ready(tb: Testbed, cpus: int, ram: int) -> float:
    res = tb.execute(["python3", "-c", RAW, str(cpus), str(ram)], timeout=1200)
    if res.returncode != 0:
        raise SystemExit(f"raw nested boot failed: {res.stderr.decode(errors='replace')}")
    return float(res.stdout.decode().strip())


def nestbed_vm(tb: Testbed) -> tuple[float, float]:
    start = time.monotonic()
    res = tb.execute(["nestbed-vm", "-v", "--timeout", "1200", "--", "true"], timeout=1300)
    total = time.monotonic() - start
    err = res.stderr.decode(errors="replace")
    found = re.search(r"VM ready in ([0-9.]+) s", err)
    if res.returncode != 0 or not found:
        raise SystemExit(f"nestbed-vm failed ({res.returncode}): {err}")
    return float(found.group(1)), total


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[1])
    parser.add_argument("--image", type=Path, help="--nested image directory (default: cached)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--unshare", action="store_true", help="also time level 2 from an unshare testbed"
    )
    args = parser.parse_args()
    image = ImagePaths.load(args.image) if args.image else ensure_image(BuildOptions(nested=True))

    def med(values: list[float]) -> str:
        runs = ", ".join(f"{v:.1f}" for v in values)
        return f"{statistics.median(values):6.1f} s  (runs: {runs})"

    def open_level1() -> Testbed:
        level1 = Testbed([SERVER, "--baseimage", str(image.directory)], log=lambda _line: None)
        level1.start()
        opened = time.monotonic()
        level1.open(timeout=1200)
        print(f"level-1 testbed ready    {time.monotonic() - opened:6.1f} s", flush=True)
        return level1

    tb: Testbed | None = None
    container: Testbed | None = None
    raws: list[float] = []
    readies: list[float] = []
    totals: list[float] = []
    from_container: list[float] = []
    try:
        if args.unshare:
            container = Testbed(
                [UNSHARE_SERVER, f"--baseimage={image.directory}"], log=lambda _line: None
            )
            container.start()
            container.open(timeout=1200)
            if "baseimage" not in container.caps:
                print("the unshare testbed does not export the base image")
                return 1
        tb = open_level1()
        if "nested-kvm" not in tb.caps:
            print("the level-1 testbed has no nested KVM: level 2 would be TCG in TCG")
            return 1
        resets = 0
        while len(raws) < args.runs:
            i = len(raws)
            try:
                if container is not None:
                    in_container = nestbed_vm(container)[0]
                # alternate which goes first: the second boot may find caches warm
                if i % 2:
                    ready, total = nestbed_vm(tb)
                    raw = raw_ready(tb, 2, 1024)
                else:
                    raw = raw_ready(tb, 2, 1024)
                    ready, total = nestbed_vm(tb)
            except TestbedFailure as e:
                # the emulated-SVM fault of docs/nested.md, "Known faults": a new level 1
                resets += 1
                why = str(e).splitlines()[0][-160:]
                print(f"  level 1 lost, run discarded ({why})", flush=True)
                if resets > 3:
                    return 1
                tb.quit()
                tb = open_level1()
                continue
            raws.append(raw)
            readies.append(ready)
            totals.append(total)
            line = f"  run: raw {raw:.1f} s, nestbed-vm ready {ready:.1f} s"
            if container is not None:
                from_container.append(in_container)
                line += f", from unshare {in_container:.1f} s"
            print(line, flush=True)
    finally:
        if tb is not None:
            tb.quit()
        if container is not None:
            container.quit()
    print(f"raw nested boot ready    {med(raws)}")
    print(f"nestbed-vm ready         {med(readies)}")
    print(f"nestbed-vm -- true       {med(totals)}  (start to exit, VM stopped)")
    if from_container:
        print(f"nestbed-vm ready, unshare {med(from_container)}  (on level 0's accelerator)")
    ratio = statistics.median(readies) / statistics.median(raws)
    print(f"  ratio nestbed-vm ready / raw ready: {ratio:.2f} (goal <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
