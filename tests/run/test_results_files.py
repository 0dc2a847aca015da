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


FIXTURES = MIXED.parent


def _nestbed(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*nestbed_argv(), *args],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def _error_case(xml: Path) -> ET.Element:
    suites = ET.parse(xml).getroot().findall("testsuite")
    assert suites and all(s.get("timestamp") and s.get("hostname") for s in suites)
    last = suites[-1]
    assert last.get("errors") == "1"
    errors = [c for c in last.iter("testcase") if c.find("error") is not None]
    assert len(errors) == 1
    error = errors[0].find("error")
    assert error is not None
    return error


@pytest.mark.parametrize(
    ("args", "code", "kind", "message"),
    [
        (
            ["-B", str(FIXTURES / "missing-test"), "--", "null"],
            12,
            "erroneous package",
            "debian/tests/not-there does not exist",
        ),
        (
            ["-B", "--setup-commands", "exit 3", str(FIXTURES / "pass-basic"), "--", "null"],
            16,
            "testbed failure",
            "testbed setup commands failed",
        ),
        (["--bogus", str(FIXTURES / "pass-basic"), "--", "null"], 20, "usage", "--bogus"),
        ([str(FIXTURES / "pass-basic"), "--", "no-such-testbed"], 20, "usage", "no-such-testbed"),
    ],
    ids=["erroneous-package", "testbed-failure", "bad-option", "unknown-testbed"],
)
def test_json_and_junit_on_every_exit_path(
    tmp_path: Path, args: list[str], code: int, kind: str, message: str
) -> None:
    js, xml = tmp_path / "r.json", tmp_path / "r.xml"
    p = _nestbed("--json", str(js), "--junit", str(xml), *args)
    assert p.returncode == code, p.stderr
    document = json.loads(js.read_text())
    assert document["exit_code"] == code
    assert document["error"]["kind"] == kind
    assert message in document["error"]["message"]
    error = _error_case(xml)
    assert error.get("type") == kind
    assert message in error.get("message", "")


@pytest.mark.parametrize("option", ["-l", "--summary-file", "--json", "--junit", "-o"])
def test_unwritable_result_path_named_before_any_testbed(tmp_path: Path, option: str) -> None:
    """A path that cannot be written: one line naming the option, exit 20, before a testbed
    starts (the log has no "starting"), and no temporary directory left behind."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory\n")
    bad = str(blocker / "sub" / "x")
    p = _nestbed(
        option, bad, "-B", str(FIXTURES / "pass-basic"), "--", "null",
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )  # fmt: skip
    assert p.returncode == 20, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"nestbed: error: {option}") and bad in lines[0], lines
    assert list(tmpdir.iterdir()) == []
