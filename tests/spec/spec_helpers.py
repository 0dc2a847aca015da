"""Shared helpers for the spec tests: a fixture source tree and autopkgtest's own parser."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nestbed.errors import InvalidControl
from nestbed.spec.compat import KNOWN_RESTRICTIONS, unsupported_reason
from nestbed.spec.control import parse_control
from nestbed.spec.model import TestSpec, UnsupportedTest

AUTOPKGTEST_LIB = "/usr/share/autopkgtest/lib"

# A source package with every kind of binary the expansion has to care about.
DEBIAN_CONTROL = """\
Source: foo
Build-Depends: debhelper-compat (= 13),
 python3:native <!nocheck>,
# a comment inside the field
 libonly-amd64-dev [amd64], libnot-amd64-dev [!amd64],
 profiled-only <stage1>, either-a [i386] | either-b,
Build-Depends-Indep: python3-sphinx <!nodoc>
Build-Depends-Arch: gcc-multilib [linux-any]

Package: foo
Architecture: any
Depends: ${misc:Depends}
Recommends: ${misc:Recommends}, foo-data (= ${source:Version}), rec-plain,
 rec-arm [arm64] | rec-other

Package: foo-data
Architecture: all
Recommends: rec-data

Package: foo-udeb
Package-Type: udeb
Architecture: any

Package: foo-legacy-udeb
XC-Package-Type: udeb
Architecture: any

Package: foo-arm
Architecture: armhf arm64

Package: foo-linux
Architecture: linux-any
"""


def make_source(root: Path, debian_control: str | None = DEBIAN_CONTROL) -> Path:
    """A source tree under `root` with debian/control and an empty debian/tests/."""
    (root / "debian" / "tests").mkdir(parents=True, exist_ok=True)
    if debian_control is not None:
        (root / "debian" / "control").write_text(debian_control, encoding="utf-8")
    return root


def write_control(src: Path, text: str | bytes) -> Path:
    path = src / "debian" / "tests" / "control"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def parse(src: Path, text: str | bytes, arch: str = "amd64") -> list[TestSpec | UnsupportedTest]:
    path = write_control(src, text)
    return parse_control(path, src, arch, display_path="debian/tests/control")


def parse_error(src: Path, text: str | bytes, arch: str = "amd64") -> InvalidControl:
    try:
        entries = parse(src, text, arch)
    except InvalidControl as e:
        return e
    raise AssertionError(f"expected InvalidControl, got {entries!r}")


def only_test(src: Path, text: str, arch: str = "amd64") -> TestSpec:
    entries = parse(src, text, arch)
    assert len(entries) == 1, entries
    entry = entries[0]
    assert isinstance(entry, TestSpec), entry
    return entry


# ---- autopkgtest's own parser, for differential tests ------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a parser made of a control file, in a form both sides can produce."""

    invalid: bool
    skipped: tuple[tuple[str, str], ...] = ()
    # name, path, command, restrictions, features, depends (as apt gets them), synth
    tests: tuple[tuple[Any, ...], ...] = ()


def have_autopkgtest() -> bool:
    return os.path.isdir(AUTOPKGTEST_LIB)


def have_dpkg_perl() -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", "-MDpkg::Deps", "-e", "1"], capture_output=True).returncode == 0


def _testdesc() -> Any:
    if AUTOPKGTEST_LIB not in sys.path:
        sys.path.insert(0, AUTOPKGTEST_LIB)
    module: Any = importlib.import_module("testdesc")
    adtlog: Any = importlib.import_module("adtlog")
    adtlog.verbosity = 0
    if not hasattr(module, "_nestbed_cached"):
        # These run perl once per call and depend only on their arguments; caching them
        # makes the generated differential test several times faster.
        module._matches_architecture = functools.cache(module._matches_architecture)
        module._synthesize_deps = functools.cache(module._synthesize_deps)
        module._nestbed_cached = True
    return module


def apt_form(depends: list[str], arch: str) -> tuple[str, ...]:
    """Depends as autopkgtest finally hands them to apt (its satisfy_dependencies_string)."""
    return _apt_form(", ".join(depends).replace(":native", ""), arch)


@functools.cache
def _apt_form(text: str, arch: str) -> tuple[str, ...]:
    code = (
        "use Dpkg::Deps; my $d = deps_parse($ARGV[0], reduce_arch => 1, host_arch => $ARGV[1]);"
        ' print defined $d ? $d->output() : "<unparsable>";'
    )
    if "\0" in text:  # cannot be an argument; apt could not parse it either
        return ("<unparsable>",)
    done = subprocess.run(["perl", "-e", code, text, arch], capture_output=True, text=True)
    if done.returncode != 0:  # Dpkg::Deps dies on some garbage (a control character)
        return ("<unparsable>",)
    out = done.stdout
    items: list[str] = []
    for item in out.split(","):
        item = item.strip()
        if item and item not in items:  # autopkgtest may list sudo twice
            items.append(item)
    return tuple(items)


def autopkgtest_accepts_dependency(alternative: str) -> bool:
    """Would autopkgtest's own check (testdesc._debian_check_dep) accept this alternative?

    An empty version counts as rejected: autopkgtest lets it through, but only for dpkg
    to misread it ("(>= )" becomes "(> =)") when installing.
    """
    testdesc = _testdesc()
    try:
        _, version = testdesc._debian_check_dep("t", alternative)
    except testdesc.InvalidControl:
        return False
    return version != "" if "(" in alternative else True


def _synth(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def autopkgtest_verdict(src: Path, control: Path, arch: str, caps: frozenset[str]) -> Verdict:
    testdesc = _testdesc()
    skipped: list[tuple[str, str]] = []
    original = testdesc.Unsupported.report

    def record(self: Any) -> None:
        skipped.append((self.testname, self.message))

    testdesc.Unsupported.report = record
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tests, _ = testdesc.parse_debian_source(
                str(src), sorted(caps), arch, control_path=str(control)
            )
    except testdesc.InvalidControl:
        return Verdict(invalid=True)
    finally:
        testdesc.Unsupported.report = original
    found = tuple(
        (
            t.name,
            t.path,
            t.command,
            frozenset(t.restrictions),
            frozenset(t.features),
            apt_form(t.depends, arch),
            tuple(_synth(s) for s in t.synth_depends),
        )
        for t in tests
    )
    return Verdict(invalid=False, skipped=tuple(skipped), tests=found)


class Reasons(str):
    """Any one of several SKIP reasons; equal to each of them.

    autopkgtest walks a set of restrictions, so when several cannot be met the one it
    reports depends on string hashing, which changes from run to run.
    """

    reasons: frozenset[str]

    def __new__(cls, reasons: frozenset[str]) -> Reasons:
        self = super().__new__(cls, sorted(reasons)[0])
        self.reasons = reasons
        return self

    def __eq__(self, other: object) -> bool:
        return other in self.reasons if isinstance(other, str) else NotImplemented

    def __hash__(self) -> int:
        return 0


def possible_reasons(test: TestSpec, caps: frozenset[str]) -> frozenset[str]:
    """Every reason autopkgtest might give for skipping `test` (empty if it runs)."""
    if unsupported_reason(test, caps, frozenset()) is None:
        return frozenset()
    unknown = [r for r in test.restrictions if r not in KNOWN_RESTRICTIONS]
    candidates = unknown or sorted(test.restrictions)
    found = set()
    for restriction in candidates:
        alone = replace(test, restrictions=frozenset({restriction}))
        reason = unsupported_reason(alone, caps, frozenset())
        if reason is not None:
            found.add(reason)
    return frozenset(found)


def nestbed_verdict(src: Path, control: Path, arch: str, caps: frozenset[str]) -> Verdict:
    try:
        entries = parse_control(control, src, arch)
    except InvalidControl:
        return Verdict(invalid=True)
    skipped: list[tuple[str, str]] = []
    found: list[tuple[Any, ...]] = []
    for entry in entries:
        if isinstance(entry, UnsupportedTest):
            skipped.append((entry.name, entry.reason))
            continue
        reasons = possible_reasons(entry, caps)
        if reasons:
            skipped.append((entry.name, Reasons(reasons)))
            continue
        found.append(
            (
                entry.name,
                entry.path,
                entry.command,
                entry.restrictions,
                entry.features,
                apt_form(list(entry.depends), arch),
                entry.synth_depends,
            )
        )
    return Verdict(invalid=False, skipped=tuple(skipped), tests=tuple(found))
