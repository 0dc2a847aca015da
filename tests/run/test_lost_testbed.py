"""A test that kills the guest agent loses the testbed: the run ends soon after as a
testbed failure (exit 16), not when the test's own command would have, and leaves nothing
running."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from tests_support import nestbed_argv, write_package

# the agent's own main process, as a test that kills "every other process" would
KILL_THE_AGENT = """#!/bin/sh
echo before
kill -9 "$(systemctl show -p MainPID --value nestbed-agent)"
sleep 600
echo after
"""


@pytest.mark.vm
def test_a_killed_agent_is_a_testbed_failure_at_once(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    pkg = write_package(
        tmp_path / "pkg",
        {"killer": KILL_THE_AGENT, "later": "#!/bin/sh\necho later ran\n"},
        "Tests: killer\nDepends:\nRestrictions: needs-root\n\nTests: later\nDepends:\n",
    )
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    started = time.monotonic()
    r = subprocess.run(
        [*nestbed_argv(), "-B", str(pkg), "--", "qemu", str(nestbed_image.directory)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    took = time.monotonic() - started
    assert r.returncode == 16, r.stdout + r.stderr
    assert "before" in r.stdout and "after" not in r.stdout
    assert "the guest agent was restarted while a test ran" in r.stderr
    assert "testbed failure" in r.stderr
    assert "later ran" not in r.stdout
    assert took < 600, "the run waited for the test's own end"  # the sleep, not a target
    ps = subprocess.run(["pgrep", "-af", str(scratch)], capture_output=True, text=True)
    assert ps.stdout == "", ps.stdout
    assert list(scratch.iterdir()) == []
