"""Which accelerator QEMU uses, and why: KVM only where it can really run the guest.

autopkgtest picks KVM whenever /dev/kvm exists. On this project's machines /dev/kvm is
provided by `kvm_pvm` (a software backend without VMX/SVM) and a stock kernel hangs under it
(docs/qemu.md, "Accelerator"), so `auto` checks what backs the device first.

The check never runs QEMU and never waits: it looks at /dev/kvm (a character device that
opens read-write), at which KVM module is loaded and at the CPU flags. Inside a level-1
nestbed guest under TCG `-cpu max` that is /dev/kvm from `kvm_amd` (nested SVM emulated by
TCG, loaded at boot by the image) and the `svm` flag: KVM, so a level-2 VM does not end up
as TCG inside TCG.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

ACCELS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class Accel:
    name: str  # kvm or tcg
    cpu: str  # the default -cpu for it
    reason: str  # one line: why this one

    def describe(self) -> str:
        return f"using {self.name.upper()} (-cpu {self.cpu}): {self.reason}"


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def kvm_problem(
    dev: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> str | None:
    """Why KVM cannot run a stock guest kernel here, or None when it can."""
    try:
        st = dev.stat()
    except OSError:
        return f"{dev} does not exist"
    if not stat.S_ISCHR(st.st_mode):
        return f"{dev} is not a character device"
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError as e:
        return f"cannot open {dev}: {e.strerror}"
    hardware = [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).exists()]
    if not hardware:
        if (sys_module / "kvm_pvm").exists():
            return f"{dev} is provided by kvm_pvm, which cannot boot a stock kernel"
        return f"neither kvm_intel nor kvm_amd is loaded behind {dev}"
    flags = _cpu_flags(cpuinfo)
    if flags and not flags & {"vmx", "svm"}:
        return "the CPU has no vmx/svm flag"
    return None


def choose(requested: str, **probe: Path) -> Accel:
    """`requested` is auto, kvm or tcg; an explicit choice is honoured as given."""
    if requested == "kvm":
        return Accel("kvm", "host", "requested with --accel kvm")
    if requested == "tcg":
        return Accel("tcg", "max", "requested with --accel tcg")
    if requested != "auto":
        raise ValueError(f"unknown accelerator {requested!r} (choose from {', '.join(ACCELS)})")
    problem = kvm_problem(**probe)
    if problem is None:
        return Accel("kvm", "host", "/dev/kvm is usable (hardware virtualisation)")
    return Accel("tcg", "max", f"KVM unusable: {problem}")
