"""--json and --junit files, as CI systems read them."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from nestbed.report.machine import write_json, write_junit
from nestbed.report.results import TestResult, Verdict

RESULTS = [
    TestResult(
        "ok",
        Verdict.PASS,
        package="p",
        duration=1.25,
        restrictions=("needs-root",),
        kernel_warnings=("WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1",),
    ),
    TestResult("bad", Verdict.FAIL, "non-zero exit status 2", package="p", stderr=b"boom\x1b\n"),
    TestResult("maybe", Verdict.SKIP, "unknown restriction x", package="p"),
    TestResult("flake", Verdict.FLAKY, "stderr: hm", package="p"),
    TestResult("deps", Verdict.BADPKG, "unsatisfiable", package="p"),
]


def test_json_has_one_record_per_test(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    write_json(str(out), RESULTS)
    records = json.loads(out.read_text())["tests"]
    assert [(t["name"], t["verdict"], t["reason"]) for t in records] == [
        ("ok", "PASS", ""),
        ("bad", "FAIL", "non-zero exit status 2"),
        ("maybe", "SKIP", "unknown restriction x"),
        ("flake", "FLAKY", "stderr: hm"),
        ("deps", "FAIL", "badpkg"),
    ]
    assert records[0]["duration"] == 1.25
    assert records[0]["restrictions"] == ["needs-root"]
    assert records[0]["kernel_warnings"] == ["WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1"]
    assert records[1]["kernel_warnings"] is None  # not watched (no VM)


def test_junit_counts_failures_and_skips(tmp_path: Path) -> None:
    out = tmp_path / "r.xml"
    write_junit(str(out), RESULTS)
    suite = ET.parse(out).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("5", "2", "2")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["bad"].find("failure") is not None
    assert cases["bad"].findtext("system-err") == "boom\n"  # control characters dropped
    assert cases["maybe"].find("skipped") is not None
    assert cases["ok"].find("failure") is None and cases["ok"].find("skipped") is None


def test_flaky_superficial_and_the_run_error_are_marked(tmp_path: Path) -> None:
    from nestbed.report.results import RunError

    results = [
        *RESULTS,
        TestResult("shallow", Verdict.PASS, package="p", superficial=True),
    ]
    error = RunError("testbed failure", "the VM died")
    out = tmp_path / "r.xml"
    write_junit(str(out), results, error, started=0.0)
    suite = ET.parse(out).getroot().find("testsuite")
    assert suite is not None
    assert re.fullmatch(r"19[67]\d-\d\d-\d\dT\d\d:\d\d:\d\d", suite.get("timestamp", ""))
    assert suite.get("hostname")
    assert (suite.get("tests"), suite.get("errors")) == ("7", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    flaky = cases["flake"].find("skipped")
    assert flaky is not None and flaky.get("type") == "FLAKY"
    prop = cases["shallow"].find("properties/property")
    assert prop is not None and (prop.get("name"), prop.get("value")) == ("superficial", "true")
    run_error = cases["(run)"].find("error")
    assert run_error is not None
    assert run_error.get("type") == "testbed failure"
    assert run_error.get("message") == "testbed failure: the VM died"
    js = tmp_path / "r.json"
    write_json(str(js), results, 16, error)
    document = json.loads(js.read_text())
    assert document["exit_code"] == 16
    assert document["error"] == {"kind": "testbed failure", "message": "the VM died"}
