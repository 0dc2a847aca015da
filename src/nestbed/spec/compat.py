"""Which restrictions autopkgtest knows, and whether a testbed can run a test."""

from __future__ import annotations

from collections.abc import Mapping

from nestbed.capabilities import Cap
from nestbed.spec.model import TestSpec

# The restrictions autopkgtest 5.28 knows (testdesc.known_restrictions), and ours:
# needs-baseimage (the testbed's own base image, read-only, to boot nested VMs from);
# and from newer autopkgtest, skip-foreign-architecture: skip the test when the
# architecture under test (its -a/--architecture, cross testing) is not the testbed's
# native one. nestbed always tests the testbed's own architecture, so a test with it
# runs (5.28 would skip it as an unknown restriction).
# hint-testsuite-triggers is documented in README.package-tests but is NOT in 5.28's
# set: a test declaring it is skipped with "unknown restriction hint-testsuite-triggers",
# which is also what the documentation asks for ("should not actually be run").
KNOWN_RESTRICTIONS: frozenset[str] = frozenset(
    {
        "allow-stderr",
        "breaks-testbed",
        "build-needed",
        "flaky",
        "isolation-container",
        "isolation-machine",
        "needs-baseimage",
        "needs-internet",
        "needs-reboot",
        "needs-recommends",
        "needs-root",
        "needs-sudo",
        "rw-build-tree",
        "skip-foreign-architecture",
        "skip-not-installable",
        "skippable",
        "superficial",
    }
)

# Restriction -> capabilities it needs; each entry is a set of alternatives of which the
# testbed must provide at least one.
RESTRICTIONS_REQUIRE_CAPS: Mapping[str, tuple[frozenset[str], ...]] = {
    "breaks-testbed": (frozenset({Cap.REVERT_FULL_SYSTEM}),),
    "needs-internet": (frozenset({Cap.HAS_INTERNET}),),
    "needs-reboot": (frozenset({Cap.REBOOT}),),
    "needs-root": (frozenset({Cap.ROOT_ON_TESTBED}),),
    # a machine isolates at least as well as a container
    "isolation-container": (frozenset({Cap.ISOLATION_CONTAINER, Cap.ISOLATION_MACHINE}),),
    "isolation-machine": (frozenset({Cap.ISOLATION_MACHINE}),),
    "needs-baseimage": (frozenset({Cap.BASEIMAGE}),),
}

# Restriction -> what to tell the user who wants the test to run after all.
RESTRICTION_HINTS: Mapping[str, str] = {
    "needs-baseimage": (
        "only a QEMU testbed exports its base image (by default when a test needs it;"
        " not with --no-baseimage, nor with several images unless --baseimage=PATH names one)"
    ),
}

# Restriction -> packages it adds to the test's Depends.
RESTRICTIONS_IMPLY_DEPS: Mapping[str, tuple[str, ...]] = {
    "needs-sudo": ("sudo",),
}


def unsupported_reason(
    test: TestSpec, caps: frozenset[str], ignore_restrictions: frozenset[str]
) -> str | None:
    """autopkgtest's SKIP reason if the testbed cannot run `test`, else None.

    Restrictions in `ignore_restrictions` are treated as absent. autopkgtest walks a set,
    so with several problems the one it reports varies between runs; we report the first
    in sorted order, unknown restrictions before missing capabilities as it does.
    """
    effective = sorted(test.restrictions - ignore_restrictions)
    for restriction in effective:
        if restriction not in KNOWN_RESTRICTIONS:
            return f"unknown restriction {restriction}"
    for restriction in effective:
        for alternatives in RESTRICTIONS_REQUIRE_CAPS.get(restriction, ()):
            if alternatives & caps:
                continue
            names = sorted(f'"{cap}"' for cap in alternatives)
            needed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and/or " + names[-1]
            reason = f'Test restriction "{restriction}" requires testbed capability {needed}'
            hint = RESTRICTION_HINTS.get(restriction)
            return f"{reason}: {hint}" if hint else reason
    return None
