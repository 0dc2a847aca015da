"""NESTBED_TRACE=FILE: every nestbed process of a run appends its timed events to FILE
(bench/trace.py reads them)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from nestbed.trace import TRACE_ENV
from tests_support import nestbed_argv, write_package


def _run(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    pkg = write_package(tmp_path / "pkg", {"t": "#!/bin/sh\necho hi\n"}, "Tests: t\nDepends:\n")
    return subprocess.run(
        [*nestbed_argv(), "-B", str(pkg), "--", "null"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env}, check=False,
    )  # fmt: skip


def test_a_traced_run_records_each_process_and_testbed_command(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    res = _run(tmp_path, {TRACE_ENV: str(trace)})
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    procs = {e["proc"] for e in events if e["kind"] == "process"}
    assert {"nestbed", "nestbed-virt-null"} <= procs, procs
    runner = next(e for e in events if e["kind"] == "process" and e["proc"] == "nestbed")
    assert 0 < runner["end"] - runner["start"] < 60  # from its creation to ready
    virt = [e["what"] for e in events if e["kind"] == "virt"]
    assert virt[0] == "open" and "close" in virt, virt
    assert any(e["kind"] == "server" and e["what"] == "open" for e in events)
    execs = [e["what"] for e in events if e["kind"] == "exec"]
    assert any("dpkg --print-architecture" in w for w in execs), execs  # the testbed's facts
    assert any(w.startswith("the test:") for w in execs), execs
    assert any(e["kind"] == "step" and e["what"] == "test t" for e in events)
    assert all(e["end"] is None or e["end"] >= e["start"] for e in events)
