"""Test Depends: validation, the @, @builddeps@ and @recommends@ expansions, arch reduction.

What comes out is what autopkgtest ends up handing to apt: relations whose `[arch]`
list excludes the testbed are gone, the remaining `[arch]` lists and `:native`
qualifiers are stripped (apt cannot parse them), build profiles are reduced with no
profile active.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from debian.deb822 import PkgRelation
from debian.debian_support import Version

from nestbed.errors import InvalidControl
from nestbed.spec.arch import architecture_is_concerned
from nestbed.spec.stanzas import Stanza, read_stanzas

# One alternative of a test's Depends, accepting what autopkgtest 5.28 accepts
# (lower-case names, an optional :qualifier, a version, an [arch] list; no profiles).
_TEST_DEP = re.compile(
    r"(?P<name>[a-z0-9+.-]+)"
    r"(?::(?P<archqual>[a-z0-9_-]+))?"
    r"\s*(?:\((?P<op><<|<=|>=|=|>>)\s*(?P<version>[^)]*)\))?"
    r"(?:\s*\[(?P<arches>[a-z0-9+.! -]+)\])?$"
)

# Names as python-debian's relation parser accepts them; anything else means it failed.
_RELATION_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9.+-]*")
# dpkg reads the obsolete "<" and ">" as "<=" and ">=".
_RELATION_OPS = {"<<": "<<", "<=": "<=", "=": "=", ">=": ">=", ">>": ">>", "<": "<=", ">": ">="}

# Parts of source Recommends that autopkgtest drops because they use substvars.
_SUBSTVAR_VERSION = re.compile(r"\(.*\$\{\S*\}.*\)")

# autopkgtest resolves build profiles with none active.
_ACTIVE_PROFILES: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Alternative:
    """One alternative of a test's Depends, e.g. "foo:any (>= 1.0) [linux-any]"."""

    name: str
    archqual: str | None
    op: str | None
    version: str | None
    arches: tuple[str, ...] | None

    def concerns(self, arch: str) -> bool:
        return self.arches is None or architecture_is_concerned(arch, self.arches)

    def for_apt(self) -> str:
        text = self.name
        if self.archqual is not None and self.archqual != "native":
            text += f":{self.archqual}"
        if self.op is not None:
            text += f" ({self.op} {self.version})"
        return text


class DependencyError(ValueError):
    """One alternative of a test's Depends is invalid; str() says why."""


def parse_test_dependency(text: str) -> Alternative:
    """Parse one alternative of a test's Depends (raises DependencyError)."""
    text = text.strip()
    m = _TEST_DEP.match(text)
    if m is None:
        hint = ""
        if "@" in text:
            hint = " (@, @builddeps@ and @recommends@ must stand alone between commas)"
        raise DependencyError(f"invalid dependency '{text}'{hint}")
    version = m.group("version")
    if m.group("op") is not None:
        # autopkgtest lets an empty version through, apt and dpkg then fail on it
        if not version:
            raise DependencyError(f"invalid dependency '{text}'")
        try:
            Version(version)
        except ValueError as e:
            raise DependencyError(
                f"invalid dependency '{text}': invalid version '{version}'"
            ) from e
    arches = m.group("arches")
    return Alternative(
        name=m.group("name"),
        archqual=m.group("archqual"),
        op=m.group("op"),
        version=version if m.group("op") is not None else None,
        arches=tuple(arches.split()) if arches is not None else None,
    )


@dataclass(frozen=True)
class BinaryPackage:
    name: str
    arches: tuple[str, ...] | None  # None for Architecture: all / any


class _QuietRelationParser(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "cannot parse package relationship" not in record.getMessage()


@contextmanager
def _quiet_python_debian() -> Iterator[None]:
    # PkgRelation logs a warning for each relation it cannot parse; we report those ourselves.
    logger = logging.getLogger("debian.deb822")
    quiet = _QuietRelationParser()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _holds_for_profiles(relation: dict[str, Any]) -> bool:
    formula = relation.get("restrictions")
    if not formula:
        return True
    # <a !b> <c>: any group whose every term is satisfied
    return any(
        all(term.enabled == (term.profile in _ACTIVE_PROFILES) for term in group)
        for group in formula
    )


def _reduce_source_relations(text: str, arch: str) -> tuple[list[str], str | None]:
    """dpkg's deps_parse(reduce_arch, reduce_profiles) of a debian/control relation field.

    Returns the rendered relations and the first invalid item (None if all were valid).
    """
    result: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue  # trailing commas and the like, which dpkg ignores
        try:
            with _quiet_python_debian():
                parsed = PkgRelation.parse_relations(item)
        except (IndexError, ValueError):  # python-debian trips over e.g. "foo [ ]"
            return result, item
        if len(parsed) != 1:
            return result, item
        kept: list[Any] = []  # python-debian ParsedRelation dicts
        for relation in parsed[0]:
            if not _RELATION_NAME.fullmatch(relation["name"] or ""):
                return result, item
            version = relation.get("version")
            if version is not None and version[0] not in _RELATION_OPS:
                return result, item
            arches = relation.get("arch")
            if arches is not None and not architecture_is_concerned(
                arch, [("" if a.enabled else "!") + a.arch for a in arches]
            ):
                continue
            if not _holds_for_profiles(dict(relation)):
                continue
            reduced = dict(relation)
            reduced["arch"] = None
            reduced["restrictions"] = None
            if reduced.get("archqual") == "native":
                reduced["archqual"] = None  # autopkgtest strips :native before apt sees it
            if version is not None:
                reduced["version"] = (_RELATION_OPS[version[0]], version[1])
            kept.append(reduced)
        if kept:
            result.append(PkgRelation.str([kept]))
    return result, None


def _drop_substvars(text: str) -> str:
    """Source Recommends without ${...} items and without versions that use one."""
    items = []
    for item in text.split(","):
        item = item.strip()
        if item.startswith("${"):
            continue
        items.append(_SUBSTVAR_VERSION.sub("", item))
    return ", ".join(items)


class SourcePackage:
    """What Depends expansion needs from srcdir/debian/control, read on first use."""

    def __init__(self, srcdir: str | os.PathLike[str], arch: str) -> None:
        self.path = os.path.join(os.fspath(srcdir), "debian", "control")
        self.arch = arch

    @cached_property
    def stanzas(self) -> list[Stanza]:
        # Lenient like autopkgtest: the control file is dpkg's to validate, and a missing
        # one just means there are no binary packages.
        return read_stanzas(self.path, self.path, strict=False) or []

    @cached_property
    def binaries(self) -> list[BinaryPackage]:
        found = []
        for stanza in self.stanzas:
            if "Package" not in stanza:
                continue  # the source stanza
            # udebs and other non-debs cannot be installed by apt
            if stanza.get("Xc-package-type", "deb") != "deb":
                continue
            if stanza.get("Package-type", "deb") != "deb":
                continue
            name = stanza.get("Package", "").strip()
            if not name:
                continue  # nothing apt could install; autopkgtest would pass "" along
            arch = stanza.get("Architecture", "any")
            arches = None if arch in ("all", "any") else tuple(arch.split())
            found.append(BinaryPackage(name, arches))
        return found

    @cached_property
    def binary_names(self) -> frozenset[str]:
        return frozenset(b.name for b in self.binaries)

    def _reduce(self, stanza: Stanza, key: str, text: str, shown: str, why: str) -> list[str]:
        relations, bad = _reduce_source_relations(text, self.arch)
        if bad is not None:
            raise InvalidControl(
                self.path, stanza.line_of(key), shown, f"invalid dependency '{bad}' ({why})"
            )
        return relations

    def build_depends(self) -> list[str]:
        """@builddeps@: Build-Depends, -Indep and -Arch for this arch, and build-essential."""
        result: list[str] = []
        fields = (
            ("Build-depends", "Build-Depends"),
            ("Build-depends-indep", "Build-Depends-Indep"),
            ("Build-depends-arch", "Build-Depends-Arch"),
        )
        for stanza in self.stanzas:
            for key, shown in fields:
                if key in stanza:
                    text = stanza.get(key, "")
                    result += self._reduce(stanza, key, text, shown, "needed for @builddeps@")
        result.append("build-essential")
        return result

    def recommends(self) -> list[str]:
        """@recommends@: every binary package's Recommends, without substvars."""
        result: list[str] = []
        for stanza in self.stanzas:
            if "Recommends" in stanza:
                text = _drop_substvars(stanza.get("Recommends", ""))
                result += self._reduce(
                    stanza, "Recommends", text, "Recommends", "needed for @recommends@"
                )
        return result


@dataclass(frozen=True)
class ExpandedDepends:
    depends: tuple[str, ...]
    # Alternatives that are binaries of this source, which autopkgtest makes sure get
    # installed as real packages (not satisfied by a Provides); see TestSpec.synth_depends.
    synth_depends: tuple[tuple[str, ...], ...]


def expand_depends(text: str, source: SourcePackage) -> ExpandedDepends:
    """Expand and reduce a test's Depends value (raises DependencyError for bad syntax).

    Errors in debian/control found while expanding raise InvalidControl for that file.
    """
    arch = source.arch
    depends: list[str] = []
    synth: list[tuple[str, ...]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item == "@":
            for binary in source.binaries:
                if binary.arches is None or architecture_is_concerned(arch, binary.arches):
                    depends.append(binary.name)
                    synth.append((binary.name,))
        elif item == "@builddeps@":
            depends += source.build_depends()
        elif item == "@recommends@":
            depends += source.recommends()
        else:
            alternatives = [parse_test_dependency(alt) for alt in item.split("|")]
            if all(alt.name in source.binary_names for alt in alternatives):
                own = tuple(alt.name for alt in alternatives if alt.concerns(arch))
                if own:
                    synth.append(own)
            kept = [alt.for_apt() for alt in alternatives if alt.concerns(arch)]
            if kept:
                depends.append(" | ".join(kept))
    return ExpandedDepends(tuple(depends), tuple(synth))
