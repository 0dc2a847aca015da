"""Helpers shared by tests: finding the installed nestbed, writing small packages."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from nestbed.errors import TestbedFailure
from nestbed.image import ImagePaths
from nestbed.testbed.client import CommandTimeout, Testbed

R = TypeVar("R")

# What nestbed says when a level-1 guest resets itself (docs/nested.md, "Known faults").
LEVEL1_RESET = "the guest reset itself"
# the multiplexer's keep-alive found level 1 silent (a wedge, which used to be a timeout)
LEVEL1_SILENT = "the guest agent has not answered for"
# level 1's kernel panicked while a level-2 guest ran (QEMU's pvpanic event, or the console)
LEVEL1_PANIC = ("the guest panicked", "the guest kernel panicked")
LEVEL1_FAULT = re.compile("|".join(map(re.escape, (LEVEL1_RESET, LEVEL1_SILENT, *LEVEL1_PANIC))))
# the same reset one level down, after level 2 booted: nestbed-vm fails, the test FAILs
LEVEL2_RESET = re.compile(r"nestbed-vm: error: .*" + re.escape(LEVEL1_RESET))


def nestbed_argv() -> list[str]:
    """The nestbed of this environment (beside this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "nestbed"
    found = str(beside) if beside.exists() else shutil.which("nestbed")
    assert found, "nestbed is not installed (pip install -e .)"
    return [found]


@contextmanager
def open_qemu_testbed(image: ImagePaths, env: Mapping[str, str] | None = None) -> Iterator[Testbed]:
    """nestbed-virt-qemu of this environment on `image`, opened; quit afterwards."""
    server = str(Path(sys.executable).parent / "nestbed-virt-qemu")
    tb = Testbed([server, str(image.directory)], log=lambda _line: None, env=env)
    tb.start()
    try:
        tb.open(timeout=400)
        yield tb
    finally:
        tb.quit()


def once_more_after_a_level1_fault(attempt: Callable[[], R]) -> R:
    """Run a nested (level-2) attempt; run it once more, with a warning, when level 1 failed
    the way QEMU 7.2's emulated SVM sometimes makes it fail under TCG: the level-1 guest
    resets itself or panics (a testbed failure saying so) or wedges (the attempt times out,
    or the multiplexer's keep-alive finds the agent silent: a testbed failure saying so), or the
    level-2 guest resets itself after it booted (nestbed-vm says so, the test FAILs).
    Anything else, and a second fault, is the test's result."""
    try:
        result = attempt()
    except (subprocess.TimeoutExpired, CommandTimeout) as e:
        why = f"timed out: {e}"
    except TestbedFailure as e:
        if _level1_fault(str(e)) is None:
            raise
        why = str(e)
    else:
        output = f"{getattr(result, 'stdout', '')}{getattr(result, 'stderr', '')}"
        fault = _level1_fault(output)
        level2 = LEVEL2_RESET.search(output)
        status = getattr(result, "returncode", None)
        if status == 16 and fault is not None:
            # the whole line: with the console's last lines, what level 1 printed as it failed
            why = next((line for line in output.splitlines() if fault in line), fault)
        elif status == 4 and level2 is not None:
            why = "the level-2 VM reset itself: " + level2.group(0)
        else:
            return result
    warnings.warn(f"level-1 fault in a nested run, ran it once more ({why[:600]})", stacklevel=2)
    return attempt()


def _level1_fault(output: str) -> str | None:
    """Which known level-1 fault `output` reports, if any."""
    found = LEVEL1_FAULT.search(output)
    return found.group(0) if found else None


def sleepers(tag: str) -> list[str]:
    """The pids of this machine's `sleep TAG` processes (a test's leftovers, by their tag)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args[:2] == [b"sleep", tag.encode()]:
            found.append(cmdline.parent.name)
    return found


def sha256(path: Path) -> str:
    """A file's sha256, read in chunks (a disk image does not fit in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_package(root: Path, tests: dict[str, str], control: str) -> Path:
    """A source tree with only debian/control, changelog and the given tests."""
    (root / "debian" / "tests").mkdir(parents=True)
    (root / "debian" / "control").write_text("Source: fixture\nMaintainer: t <t@localhost>\n")
    (root / "debian" / "changelog").write_text(
        "fixture (1.0) unstable; urgency=medium\n\n  * Test.\n\n"
        " -- t <t@localhost>  Thu, 26 Nov 2026 06:00:00 +0000\n"
    )
    (root / "debian" / "tests" / "control").write_text(control)
    for name, body in tests.items():
        path = root / "debian" / "tests" / name
        path.write_text(body)
        path.chmod(0o755)
    return root


def make_deb(directory: Path, name: str = "nestbed-fixture-bin") -> Path:
    """A tiny arch-all .deb, in no archive, that installs /usr/share/NAME/marker."""
    root = directory / "debroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr" / "share" / name).mkdir(parents=True)
    (root / "usr" / "share" / name / "marker").write_text("from the local deb\n")
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: t <t@localhost>\nDescription: nestbed test fixture\n"
    )
    deb = directory / f"{name}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "-b", str(root), str(deb)], check=True, capture_output=True)
    return deb


# A needs-reboot test (needs-root): reboots through autopkgtest-reboot, then through
# autopkgtest-reboot-prepare + reboot; prints `run mark=M boot=ID` on each run, and
# `bootstamp=` what /run/bootstamp holds (what --setup-commands-boot may have written).
REBOOTER = r"""#!/bin/sh
set -e
boot=$(cat /proc/sys/kernel/random/boot_id)
echo "run mark=${AUTOPKGTEST_REBOOT_MARK:-none} boot=$boot"
echo "bootstamp=$(cat /run/bootstamp 2>/dev/null || echo none)"
case "${AUTOPKGTEST_REBOOT_MARK:-}" in
    "")
        echo first > "$AUTOPKGTEST_TMP/kept"
        echo "$boot" > "$AUTOPKGTEST_ARTIFACTS/boots"
        autopkgtest-reboot one
        echo "not reached" ;;
    one)
        grep -qx first "$AUTOPKGTEST_TMP/kept"
        grep -vqx "$boot" "$AUTOPKGTEST_ARTIFACTS/boots"
        echo "$boot" >> "$AUTOPKGTEST_ARTIFACTS/boots"
        /tmp/autopkgtest-reboot-prepare two
        reboot
        echo "not reached either" ;;
    two)
        echo "$boot" >> "$AUTOPKGTEST_ARTIFACTS/boots"
        echo done ;;
esac
"""


def fake_image(directory: Path) -> Path:
    """A nestbed image directory that passes every check a server makes before a boot
    (its disk and kernel are zeros: a test of what happens before QEMU runs)."""
    from nestbed.image.cache import Manifest

    directory.mkdir()
    manifest = Manifest(
        name="fake", release="bookworm", arch="amd64", flavour="minimal", size=1 << 20,
        created="2026-01-01T00:00:00+00:00", kernel_version="6.1", cmdline="console=ttyS0",
        root_serial="nestbed-root", base_serial="nestbed-base", agent_port="org.nestbed.control",
        sources=(), packages=(), build_seconds=1.0,
    )  # fmt: skip
    (directory / "manifest.json").write_text(manifest.to_json())
    for name in ("disk.img", "vmlinuz", "initrd.img"):
        (directory / name).write_bytes(b"\0" * 4096)
    return directory


_TCG_QEMU_WRAPPER = """#!/bin/sh
# autopkgtest adds -enable-kvm when /dev/kvm exists, and KVM hangs stock kernels here:
# drop its accelerator and CPU choices and run under TCG.
set -eu
for arg in "$@"; do
    shift
    if [ -n "${skip:-}" ]; then skip=; continue; fi
    case "$arg" in
        -enable-kvm) ;;
        -accel|-cpu) skip=1 ;;
        -accel=*|-cpu=*|--accel=*|--cpu=*) ;;
        *) set -- "$@" "$arg" ;;
    esac
done
exec qemu-system-x86_64 -accel tcg -cpu max "$@"
"""


def tcg_qemu_wrapper(directory: Path) -> Path:
    """A qemu-system-x86_64 for autopkgtest-virt-qemu's --qemu-command that runs under TCG
    whatever autopkgtest asks for (written into directory, executable)."""
    wrapper = directory / "qemu-tcg"
    wrapper.write_text(_TCG_QEMU_WRAPPER)
    wrapper.chmod(0o755)
    return wrapper
