"""A package's tests as its control file declares them, read once and classified against
the testbed: the runnable ones, the ones to report SKIP and why, the ones selected."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from nestbed.run.options import RunOptions
from nestbed.spec.compat import unsupported_reason
from nestbed.spec.control import parse_control
from nestbed.spec.model import TestSpec, UnsupportedTest


@dataclass(frozen=True)
class _Entry:
    test: TestSpec | UnsupportedTest
    skip_reason: str | None  # None: the testbed can run it


@dataclass(frozen=True)
class TestPlan:
    """Every stanza of one package's debian/tests/control, in order."""

    __test__ = False  # not a pytest test class

    entries: tuple[_Entry, ...]

    @classmethod
    def read(
        cls,
        tree: str,
        arch: str,
        caps: frozenset[str],
        ignore_restrictions: frozenset[str],
        control: str | None = None,
    ) -> TestPlan:
        """Parse `tree`'s control file, or `control` instead (--override-control; test paths
        are still the tree's); none: no tests. An invalid one is InvalidControl."""
        control = control or os.path.join(tree, "debian", "tests", "control")
        if not os.path.exists(control):
            return cls(())
        entries = []
        for entry in parse_control(control, tree, arch, display_path=control):
            reason = (
                entry.reason
                if isinstance(entry, UnsupportedTest)
                else unsupported_reason(entry, caps, ignore_restrictions)
            )
            entries.append(_Entry(entry, reason))
        return cls(tuple(entries))

    @property
    def runnable(self) -> list[TestSpec]:
        return [
            e.test for e in self.entries if isinstance(e.test, TestSpec) and e.skip_reason is None
        ]

    def needs_build(self) -> bool:
        return any(t.has("build-needed") for t in self.runnable)

    def skips(self, only: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
        """(test name, reason) of each test the testbed cannot run, as autopkgtest reports
        them; with --test-name only those named, and of those no Test-Command stanza."""
        for e in self.entries:
            if e.skip_reason is None:
                continue
            if not only or (e.test.name in only and not _from_test_command(e.test)):
                yield e.test.name, e.skip_reason

    def selected(self, options: RunOptions) -> list[TestSpec]:
        """The runnable tests --test-name and --skip-test leave."""
        tests = self.runnable
        if options.only_tests:
            tests = [t for t in tests if t.name in options.only_tests]
        if options.skip_tests:
            tests = [t for t in tests if t.name not in options.skip_tests]
        return tests


def _from_test_command(entry: TestSpec | UnsupportedTest) -> bool:
    # autopkgtest leaves out a skipped Test-Command stanza's line when --test-name is
    # given, even if it names that test; only Tests: stanzas are reported then.
    if isinstance(entry, TestSpec):
        return entry.command is not None
    return entry.from_command
