"""The kernel's warnings during a test in a VM: logged, in the JSON record, and with
--kernel-warnings fail the test's failure. The report is written to the guest's kernel log
(/dev/kmsg) by the test, as the kernel would print it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from tests_support import nestbed_argv, write_package

REPORT = "WARNING: CPU: 0 PID: 1 at fs/nestbed.c:42 nestbed_fixture+0x0/0x10"


@pytest.mark.vm
@pytest.mark.parametrize("mode", ["report", "fail", "ignore"])
def test_kernel_warnings_are_recorded_and_can_fail_a_test(
    nestbed_image: ImagePaths, tmp_path: Path, mode: str
) -> None:
    pkg = write_package(
        tmp_path / "pkg",
        {
            "warns": f"#!/bin/sh\necho '{REPORT}' > /dev/kmsg\n",
            "quiet": "#!/bin/sh\necho fine\n",
        },
        "Tests: warns\nDepends:\nRestrictions: needs-root\n\nTests: quiet\nDepends:\n",
    )
    report = tmp_path / "results.json"
    r = subprocess.run(
        [*nestbed_argv(), "-B", f"--kernel-warnings={mode}", "--json", str(report), str(pkg),
         "--", "qemu", str(nestbed_image.directory)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    records = {t["name"]: t for t in json.loads(report.read_text())["tests"]}
    if mode == "ignore":  # the log is not read
        assert r.returncode == 0, r.stdout + r.stderr
        assert records["warns"]["kernel_warnings"] is None
        assert "kernel warning" not in r.stderr
        return
    assert records["warns"]["kernel_warnings"] == [REPORT]
    assert records["quiet"]["kernel_warnings"] == []
    assert f"test warns: kernel warning: {REPORT}" in r.stderr
    assert re.search(r"^quiet\s+PASS$", r.stdout, re.M), r.stdout
    if mode == "fail":
        assert r.returncode == 4, r.stdout + r.stderr
        assert re.search(rf"^warns\s+FAIL kernel warning: {re.escape(REPORT)}$", r.stdout, re.M)
    else:
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"^warns\s+PASS$", r.stdout, re.M), r.stdout
