"""Machine-readable results beyond autopkgtest: `--json` and `--junit` files."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from nestbed.report.results import TestResult, Verdict


def _decode(data: bytes) -> str:
    # XML 1.0 cannot carry most control characters; drop them rather than emit invalid XML
    text = data.decode("UTF-8", "replace")
    return "".join(c for c in text if c in "\t\n\r" or ord(c) >= 0x20)


def write_json(path: str, results: Sequence[TestResult]) -> None:
    """One record per test: name, verdict, reason, duration, restrictions."""
    records = [
        {
            "package": r.package,
            "name": r.name,
            "verdict": r.verdict.value if r.verdict is not Verdict.BADPKG else "FAIL",
            "result": r.text(),
            "reason": r.reason if r.verdict is not Verdict.BADPKG else "badpkg",
            "superficial": r.superficial,
            "duration": round(r.duration, 3),
            "restrictions": list(r.restrictions),
        }
        for r in results
    ]
    with open(path, "w", encoding="UTF-8") as f:
        json.dump({"tests": records}, f, indent=2)
        f.write("\n")


def write_junit(path: str, results: Sequence[TestResult]) -> None:
    """JUnit XML in the shape GitLab and Jenkins render: FAIL -> failure, SKIP -> skipped.

    A FLAKY failure is reported as skipped with its reason: it does not fail the run,
    and calling it a pass would hide it.
    """
    suites = ET.Element("testsuites")
    packages = list(dict.fromkeys(r.package for r in results))
    for package in packages:
        _add_suite(suites, package, [r for r in results if r.package == package])
    ET.ElementTree(suites).write(path, encoding="UTF-8", xml_declaration=True)


def _add_suite(suites: ET.Element, package: str, results: Sequence[TestResult]) -> None:
    failures = sum(r.verdict in (Verdict.FAIL, Verdict.BADPKG) for r in results)
    skipped = sum(r.verdict in (Verdict.SKIP, Verdict.FLAKY) for r in results)
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=package,
        tests=str(len(results)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time=f"{sum(r.duration for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite, "testcase", classname=package, name=r.name, time=f"{r.duration:.3f}"
        )
        if r.verdict in (Verdict.FAIL, Verdict.BADPKG):
            ET.SubElement(case, "failure", message=r.text(), type=r.verdict.value)
        elif r.verdict in (Verdict.SKIP, Verdict.FLAKY):
            ET.SubElement(case, "skipped", message=r.text())
        if r.stdout:
            ET.SubElement(case, "system-out").text = _decode(r.stdout)
        if r.stderr:
            ET.SubElement(case, "system-err").text = _decode(r.stderr)
