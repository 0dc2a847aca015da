"""Machine-readable results beyond autopkgtest: `--json` and `--junit` files.

Both are written on every way a run ends: with its tests, and with the error that ended it
(erroneous package, testbed failure, bad usage) as an error case; the JSON carries the exit
code too.
"""

from __future__ import annotations

import json
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from nestbed.report.results import RunError, TestResult, Verdict

# the JUnit case that carries a run-level error (no test has this name: names are words)
RUN_CASE = "(run)"


def _decode(data: bytes) -> str:
    # XML 1.0 cannot carry most control characters; drop them rather than emit invalid XML
    text = data.decode("UTF-8", "replace")
    return "".join(c for c in text if c in "\t\n\r" or ord(c) >= 0x20)


def write_json(
    path: str,
    results: Sequence[TestResult],
    exit_code: int | None = None,
    error: RunError | None = None,
) -> None:
    """One record per test: name, verdict, reason, duration, restrictions, kernel warnings
    (null where the kernel log was not watched); the run's exit code and the error that
    ended it (null when none did)."""
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
            "kernel_warnings": None if r.kernel_warnings is None else list(r.kernel_warnings),
        }
        for r in results
    ]
    document: dict[str, object] = {"exit_code": exit_code}
    document["error"] = None if error is None else {"kind": error.kind, "message": error.message}
    document["tests"] = records
    with open(path, "w", encoding="UTF-8") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def write_junit(
    path: str,
    results: Sequence[TestResult],
    error: RunError | None = None,
    started: float | None = None,
) -> None:
    """JUnit XML in the shape GitLab and Jenkins render: FAIL -> failure, SKIP -> skipped,
    the error that ended the run -> an error case; each suite with timestamp and hostname.

    A FLAKY failure is reported as skipped with its reason (type FLAKY): it does not fail
    the run, and calling it a pass would hide it. A superficial test has the property
    superficial=true.
    """
    suites = ET.Element("testsuites")
    packages = list(dict.fromkeys(r.package for r in results))
    if error is not None and not packages:
        packages = [""]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
    host = socket.gethostname()
    for i, package in enumerate(packages):
        # the error ended the run in its last package
        last = i == len(packages) - 1
        _add_suite(
            suites,
            package,
            [r for r in results if r.package == package],
            error if last else None,
            stamp,
            host,
        )
    ET.ElementTree(suites).write(path, encoding="UTF-8", xml_declaration=True)


def _add_suite(
    suites: ET.Element,
    package: str,
    results: Sequence[TestResult],
    error: RunError | None,
    stamp: str,
    host: str,
) -> None:
    failures = sum(r.verdict in (Verdict.FAIL, Verdict.BADPKG) for r in results)
    skipped = sum(r.verdict in (Verdict.SKIP, Verdict.FLAKY) for r in results)
    name = package or "nestbed"
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=name,
        tests=str(len(results) + (error is not None)),
        failures=str(failures),
        errors=str(int(error is not None)),
        skipped=str(skipped),
        time=f"{sum(r.duration for r in results):.3f}",
        timestamp=stamp,
        hostname=host,
    )
    for r in results:
        case = ET.SubElement(
            suite, "testcase", classname=name, name=r.name, time=f"{r.duration:.3f}"
        )
        if r.superficial:
            props = ET.SubElement(case, "properties")
            ET.SubElement(props, "property", name="superficial", value="true")
        if r.verdict in (Verdict.FAIL, Verdict.BADPKG):
            ET.SubElement(case, "failure", message=r.text(), type=r.verdict.value)
        elif r.verdict in (Verdict.SKIP, Verdict.FLAKY):
            ET.SubElement(case, "skipped", message=r.text(), type=r.verdict.value)
        if r.stdout:
            ET.SubElement(case, "system-out").text = _decode(r.stdout)
        if r.stderr:
            ET.SubElement(case, "system-err").text = _decode(r.stderr)
    if error is not None:
        case = ET.SubElement(suite, "testcase", classname=name, name=RUN_CASE, time="0.000")
        ET.SubElement(case, "error", message=f"{error.kind}: {error.message}", type=error.kind)
