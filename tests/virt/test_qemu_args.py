"""nestbed-virt-qemu's command line: bad input is one clear line, no traceback (no VM)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SERVER = str(Path(sys.executable).parent / "nestbed-virt-qemu")


def server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SERVER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_not_an_image(tmp_path: Path) -> None:
    res = server(str(tmp_path))
    assert res.returncode != 0
    assert "not a complete nestbed image" in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_options(tmp_path: Path) -> None:
    assert server("--accel", "hvf", str(tmp_path)).returncode == 2
    res = server("--overlay-dir", str(tmp_path / "missing"), str(tmp_path))
    assert res.returncode != 0 and "Traceback" not in res.stderr


def test_help_lists_the_options() -> None:
    out = server("--help").stdout
    options = "--cpus --ram-size --accel --qemu-cpu --qemu-command --qemu-options"
    more = ("--timeout-reboot", "--show-boot", "--overlay-dir", "--baseimage", "--no-baseimage")
    for option in (*options.split(), *more):
        assert option in out


def test_default_memory_fits_a_small_machine(tmp_path: Path) -> None:
    """A level-1 testbed has 2 GiB: a level-2 guest asking for all of it cannot start."""
    from nestbed.virt.qemu import default_ram_mb

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1 kB\n")
    assert default_ram_mb(meminfo) == 2048
    meminfo.write_text("MemTotal:        2010000 kB\n")
    assert default_ram_mb(meminfo) == 960
    assert default_ram_mb(tmp_path / "missing") == 2048
