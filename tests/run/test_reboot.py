"""needs-reboot through nestbed's own runner: autopkgtest-reboot MARK reboots the testbed
and runs the test again with the mark; its scratch files and artifacts survive, and the
boot setup commands run again after each reboot."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from tests_support import REBOOTER, nestbed_argv, write_package


@pytest.mark.vm
def test_reboot_marks_rerun_the_test_and_keep_its_files(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    pkg = write_package(
        tmp_path / "pkg",
        {"rebooter": REBOOTER},
        "Tests: rebooter\nDepends:\nRestrictions: needs-root, needs-reboot\n",
    )
    out = tmp_path / "out"
    # boot setup commands run after each boot, as autopkgtest's (a stamp in /run, a tmpfs)
    boot_setup = "--setup-commands-boot=cat /proc/sys/kernel/random/boot_id >/run/bootstamp"
    r = subprocess.run(
        [*nestbed_argv(), "-B", boot_setup, "-o", str(out), str(pkg), "--", "qemu",
         str(nestbed_image.directory)],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^rebooter\s+PASS$", r.stdout, re.M), r.stdout
    runs = re.findall(r"^run mark=(\S+) boot=(\S+)$", r.stdout, re.M)
    assert [mark for mark, _ in runs] == ["none", "one", "two"]
    assert len({boot for _, boot in runs}) == 3  # three boots of the testbed
    stamps = re.findall(r"^bootstamp=(\S+)$", r.stdout, re.M)
    assert stamps == [boot for _, boot in runs]  # set up again after each reboot
    assert "not reached" not in r.stdout
    assert "done" in r.stdout
    boots = (out / "artifacts" / "boots").read_text().split()
    assert boots == [boot for _, boot in runs]
    assert "requested reboot with marker one" in r.stderr
