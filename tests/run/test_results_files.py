"""--json and --junit from a real run: every test once, parse-time skips included."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests_support import nestbed_argv

MIXED = Path(__file__).resolve().parent.parent / "fixtures" / "packages" / "mixed"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the null testbed runs tests via su")


def test_json_and_junit_list_every_test_once(tmp_path: Path) -> None:
    js, xml = tmp_path / "r.json", tmp_path / "r.xml"
    p = subprocess.run(
        [*nestbed_argv(), "-B", "--json", str(js), "--junit", str(xml), str(MIXED), "--", "null"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 6, p.stderr
    records = json.loads(js.read_text())["tests"]
    verdicts = {r["name"]: r["verdict"] for r in records}
    # the control file's skips are printed twice on stdout (as autopkgtest does), recorded once
    assert len(records) == len(verdicts)
    assert verdicts["unknown-restriction"] == "SKIP"
    assert verdicts["passes"] == "PASS"
    assert verdicts["fails-exit"] == "FAIL"
    assert verdicts["flaky-fails"] == "FLAKY"
    assert {r["package"] for r in records} == {"mixed"}
    # every result line on stdout has its record, and no record lacks its line
    lines = {line.split()[0] for line in p.stdout.splitlines() if line.split()[1:2]}
    assert set(verdicts) <= lines
    suite = ET.parse(xml).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == str(len(records))
    assert int(suite.get("failures", "0")) == sum(v == "FAIL" for v in verdicts.values())
