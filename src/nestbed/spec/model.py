"""What a DEP-8 control file describes, independent of how it was parsed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TestSpec:
    """One runnable test from debian/tests/control.

    Exactly one of `path` (relative to the source tree, e.g. "debian/tests/smoke")
    and `command` (a Test-Command shell string) is set.
    """

    __test__ = False  # a data class, not a pytest test class

    name: str
    path: str | None
    command: str | None
    restrictions: frozenset[str]
    features: frozenset[str]
    classes: tuple[str, ...]
    # Dependencies after expanding @, @builddeps@, @recommends@ and restriction-implied
    # packages (needs-sudo -> sudo); each item is one relation with its alternatives,
    # e.g. "foo (>= 1.0) | bar", in the order autopkgtest would pass them to apt.
    depends: tuple[str, ...]
    # Line of the stanza in the control file, for messages.
    line: int = 0
    # The alternatives among `depends` that are binaries of the source package under
    # test (from "@" or named explicitly), one tuple per relation; autopkgtest makes sure
    # one of each gets installed as a real package, not satisfied through a Provides.
    synth_depends: tuple[tuple[str, ...], ...] = ()

    def has(self, restriction: str) -> bool:
        return restriction in self.restrictions


@dataclass(frozen=True)
class UnsupportedTest:
    """A stanza (or one test of it) that is reported SKIP at parse time, with the reason.

    `reason` is worded as autopkgtest words it, e.g. "unknown field Foo" or
    "Test declares architecture as not supported: amd64".
    """

    name: str
    reason: str
    # Line of the stanza in the control file, for messages.
    line: int = 0
    # From a Test-Command stanza (autopkgtest reports those differently with --test-name).
    from_command: bool = False
