"""Debian architecture wildcards, matched the way dpkg (and so autopkgtest) matches them."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from debian.debian_support import DpkgArchTable


@functools.cache
def _table() -> DpkgArchTable | None:
    # Reading dpkg's tuple/cpu/os tables costs a few milliseconds; do it once.
    try:
        return DpkgArchTable.load_arch_table()
    except (OSError, ValueError):
        # No dpkg tables (not a Debian system): fall back to exact names and "any".
        return None


def architecture_matches(arch: str, wildcard: str) -> bool:
    """True if `arch` (e.g. "amd64") is `wildcard` or matched by it ("linux-any", "any-amd64").

    This is dpkg's debarch_is(), which autopkgtest uses for the Architecture field.
    Unknown names match only themselves and never raise.
    """
    table = _table()
    if table is None:
        return wildcard in (arch, "any")
    try:
        return bool(table.matches_architecture(arch, wildcard))
    except (KeyError, ValueError):
        # python-debian < 1.0 raises KeyError for names missing from its tables
        return arch == wildcard


def architecture_is_concerned(arch: str, restrictions: Iterable[str]) -> bool:
    """Does a dependency's `[...]` list (e.g. ["linux-any", "!armel"]) include `arch`?

    dpkg's debarch_is_concerned(): the first matching entry decides, a list of only
    negations includes every other architecture, and names are compared in lower case
    (dpkg lower-cases dependency architecture lists, so "[AMD64]" means amd64).
    """
    concerned = False
    for entry in restrictions:
        entry = entry.lower()
        if entry.startswith("!"):
            if architecture_matches(arch, entry[1:]):
                return False
            concerned = True
        elif architecture_matches(arch, entry):
            return True
    return concerned


def architecture_skip_reason(testbed_arch: str, architectures: list[str]) -> str | None:
    """autopkgtest's verdict on a test's Architecture field: None to run, else the SKIP reason."""
    if "all" in architectures:
        return "Arch 'all' not allowed in Architecture field"
    if not architectures or architectures == ["any"]:
        return None
    negative = [a[1:] for a in architectures if a.startswith("!")]
    positive = [a for a in architectures if not a.startswith("!")]
    # autopkgtest checks the negations first, so a matching one wins over the mixing error.
    if any(architecture_matches(testbed_arch, a) for a in negative):
        return f"Test declares architecture as not supported: {testbed_arch}"
    if positive and negative:
        return (
            "It is not permitted for some archs to be prepended by an exclamation mark "
            "while others aren't"
        )
    if positive and not any(architecture_matches(testbed_arch, a) for a in positive):
        return (
            "Test lists explicitly supported architectures, but the current architecture "
            f"{testbed_arch} isn't listed."
        )
    return None
