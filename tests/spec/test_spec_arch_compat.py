"""Architecture wildcards and the restriction/capability checks."""

from __future__ import annotations

import pytest

from nestbed.spec import model
from nestbed.spec.arch import (
    architecture_is_concerned,
    architecture_matches,
    architecture_skip_reason,
)
from nestbed.spec.compat import KNOWN_RESTRICTIONS, RESTRICTIONS_REQUIRE_CAPS, unsupported_reason


@pytest.mark.parametrize(
    ("arch", "wildcard", "expected"),
    [
        ("amd64", "amd64", True),
        ("amd64", "any", True),
        ("amd64", "linux-any", True),
        ("amd64", "any-amd64", True),
        ("amd64", "gnu-linux-any", True),
        ("amd64", "any-i386", False),
        ("i386", "any-i386", True),
        ("hurd-i386", "any-i386", True),
        ("hurd-i386", "linux-any", False),
        ("hurd-i386", "hurd-any", True),
        ("arm64", "any-arm64", True),
        ("armhf", "any-arm", True),
        ("amd64", "all", False),
        ("amd64", "i386", False),
        ("amd64", "AMD64", False),
        ("amd64", "", False),
        ("amd64", "no-such-thing", False),
        ("weird", "weird", True),
    ],
)
def test_architecture_matches(arch: str, wildcard: str, expected: bool) -> None:
    assert architecture_matches(arch, wildcard) is expected


@pytest.mark.parametrize(
    ("restrictions", "expected"),
    [
        (["amd64"], True),
        (["i386", "linux-any"], True),
        (["i386"], False),
        (["!amd64"], False),
        (["!i386"], True),
        (["!i386", "!armel"], True),
        (["AMD64"], True),  # dpkg lower-cases dependency arch lists
        (["linux-any", "!amd64"], True),  # first match decides, as in dpkg
        (["!amd64", "linux-any"], False),
        ([], False),
    ],
)
def test_architecture_is_concerned(restrictions: list[str], expected: bool) -> None:
    assert architecture_is_concerned("amd64", restrictions) is expected


def test_architecture_skip_reason_any_and_empty() -> None:
    assert architecture_skip_reason("amd64", []) is None
    assert architecture_skip_reason("amd64", ["any"]) is None
    assert architecture_skip_reason("amd64", ["!any"]) == (
        "Test declares architecture as not supported: amd64"
    )


def _test(*restrictions: str) -> model.TestSpec:
    return model.TestSpec("t", "debian/tests/t", None, frozenset(restrictions), frozenset(), (), ())


ALL_CAPS = frozenset(
    {
        "revert-full-system",
        "has_internet",
        "reboot",
        "root-on-testbed",
        "isolation-machine",
        "baseimage",
    }
)


def test_known_restrictions_are_autopkgtest_5_28s_and_needs_baseimage() -> None:
    assert len(KNOWN_RESTRICTIONS) == 17
    assert "needs-baseimage" in KNOWN_RESTRICTIONS
    assert "skip-foreign-architecture" in KNOWN_RESTRICTIONS  # newer autopkgtest
    assert "hint-testsuite-triggers" not in KNOWN_RESTRICTIONS
    assert set(RESTRICTIONS_REQUIRE_CAPS) <= KNOWN_RESTRICTIONS


@pytest.mark.parametrize("restriction", sorted(KNOWN_RESTRICTIONS))
def test_every_known_restriction_runs_with_all_caps(restriction: str) -> None:
    assert unsupported_reason(_test(restriction), ALL_CAPS, frozenset()) is None


@pytest.mark.parametrize(
    ("restrictions", "caps", "reason"),
    [
        (("needs-magic",), ALL_CAPS, "unknown restriction needs-magic"),
        (("hint-testsuite-triggers",), ALL_CAPS, "unknown restriction hint-testsuite-triggers"),
        (
            ("needs-root",),
            frozenset(),
            'Test restriction "needs-root" requires testbed capability "root-on-testbed"',
        ),
        (
            ("isolation-container",),
            frozenset({"root-on-testbed"}),
            'Test restriction "isolation-container" requires testbed capability '
            '"isolation-container" and/or "isolation-machine"',
        ),
        (("isolation-container",), frozenset({"isolation-container"}), None),
        (("isolation-container",), frozenset({"isolation-machine"}), None),
        (
            ("isolation-machine",),
            frozenset({"isolation-container"}),
            'Test restriction "isolation-machine" requires testbed capability "isolation-machine"',
        ),
        (
            ("breaks-testbed",),
            frozenset(),
            'Test restriction "breaks-testbed" requires testbed capability "revert-full-system"',
        ),
        (
            ("needs-internet",),
            frozenset(),
            'Test restriction "needs-internet" requires testbed capability "has_internet"',
        ),
        (
            ("needs-reboot",),
            frozenset(),
            'Test restriction "needs-reboot" requires testbed capability "reboot"',
        ),
        (
            ("needs-baseimage",),
            frozenset({"root-on-testbed", "isolation-machine"}),
            'Test restriction "needs-baseimage" requires testbed capability "baseimage": only a'
            " QEMU testbed exports its base image (by default when a test needs it; not with"
            " --no-baseimage, nor with several images unless --baseimage=PATH names one)",
        ),
        # unknown restrictions are reported before missing capabilities
        (("needs-root", "zzz"), frozenset(), "unknown restriction zzz"),
        (("needs-sudo", "skippable", "flaky"), frozenset(), None),
    ],
)
def test_unsupported_reason(
    restrictions: tuple[str, ...], caps: frozenset[str], reason: str | None
) -> None:
    assert unsupported_reason(_test(*restrictions), caps, frozenset()) == reason


def test_ignored_restrictions_do_not_count() -> None:
    test = _test("needs-root", "needs-magic")
    assert unsupported_reason(test, frozenset(), frozenset({"needs-root", "needs-magic"})) is None
    assert unsupported_reason(test, frozenset(), frozenset({"needs-magic"})) == (
        'Test restriction "needs-root" requires testbed capability "root-on-testbed"'
    )
