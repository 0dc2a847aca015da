"""run/wrapper.sh itself, on this machine: a test's leftover background process that holds
its output is killed once the test ended, whether the wrapper's stdout and stderr are pipes
(the test writes straight to them) or files (the test writes to fifos the wrapper copies);
the processes that gave the wrapper its pipes are left alone; nothing is left behind."""

from __future__ import annotations

import os
import secrets
import subprocess
from importlib.resources import files
from pathlib import Path

import pytest

from nestbed.run.executor import NOTES_MARKER
from tests_support import sleepers

WRAPPER = str(files("nestbed.run").joinpath("wrapper.sh"))


@pytest.mark.parametrize("output", ["pipes", "files"])
def test_a_leftover_holding_the_output_is_killed(output: str, tmp_path: Path) -> None:
    tag = str(300 + secrets.randbelow(600))
    log = tmp_path / "t-wrapper.log"
    test = f"(sleep {tag} &); echo out; echo err >&2; exit 3"
    argv = ["sh", WRAPPER, str(log), "60", "sh", "-c", test]
    if output == "pipes":
        r = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        status, out, err = r.returncode, r.stdout, r.stderr
    else:
        with open(tmp_path / "out", "wb") as o, open(tmp_path / "err", "wb") as e:
            status = subprocess.run(argv, stdout=o, stderr=e, timeout=60, check=False).returncode
        out, err = (tmp_path / "out").read_bytes(), (tmp_path / "err").read_bytes()
    assert status == 3
    assert out == b"out\n"
    test_err, marker, notes = err.partition(NOTES_MARKER)
    assert test_err == b"err\n" and marker
    killed = notes.decode().removeprefix("killing leaked background processes: ").split()
    assert len(killed) == 1, notes  # the sleeper only: not us, who hold the pipes' other ends
    assert str(os.getpid()) not in killed
    assert sleepers(tag) == []
    assert list(tmp_path.glob("t-wrapper.log*")) == []  # log and fifos removed


def test_a_test_that_leaves_nothing_has_no_notes(tmp_path: Path) -> None:
    r = subprocess.run(
        ["sh", WRAPPER, str(tmp_path / "log"), "0", "sh", "-c", "echo fine"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (0, b"fine\n", b"")
