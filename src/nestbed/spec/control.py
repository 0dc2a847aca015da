"""debian/tests/control (DEP-8) into TestSpec / UnsupportedTest, as autopkgtest 5.28 reads it."""

from __future__ import annotations

import os
import posixpath

from nestbed.errors import InvalidControl
from nestbed.spec.arch import architecture_skip_reason
from nestbed.spec.compat import RESTRICTIONS_IMPLY_DEPS
from nestbed.spec.depends import DependencyError, SourcePackage, expand_depends
from nestbed.spec.model import TestSpec, UnsupportedTest
from nestbed.spec.stanzas import Oddity, Stanza, read_stanzas

# Field names as autopkgtest spells them after string.capwords().
KNOWN_FIELDS = frozenset(
    {
        "Tests",
        "Test-command",
        "Restrictions",
        "Features",
        "Depends",
        "Tests-directory",
        "Classes",
        "Architecture",
    }
)
# How we name fields in error messages.
_SHOWN = {"Test-command": "Test-Command", "Tests-directory": "Tests-Directory"}

DEFAULT_TESTS_DIRECTORY = "debian/tests"


def _words(value: str) -> list[str]:
    """Restrictions, Features, Classes, Tests, Architecture: separated by commas and/or spaces."""
    return value.replace(",", " ").split()


class _Stanza:
    """One stanza of the control file, being turned into tests."""

    def __init__(self, stanza: Stanza, display: str) -> None:
        self.stanza = stanza
        self.display = display

    def error(self, key: str | None, message: str) -> InvalidControl:
        line = self.stanza.line if key is None else self.stanza.line_of(key)
        shown = None if key is None else _SHOWN.get(key, key)
        return InvalidControl(self.display, line, shown, message)

    def unknown_field_reason(self) -> str | None:
        # autopkgtest reports an arbitrary one of several unknown fields; we take the first.
        for key in self.stanza.fields:
            if key not in KNOWN_FIELDS:
                return f"unknown field {key}"
        return None


def parse_control(
    control_path: str | os.PathLike[str],
    srcdir: str | os.PathLike[str],
    testbed_arch: str,
    *,
    display_path: str | None = None,
    warnings: list[Oddity] | None = None,
) -> list[TestSpec | UnsupportedTest]:
    """Parse a DEP-8 control file into its tests, in file order.

    Tests that autopkgtest skips while parsing (unknown field, Architecture, a '/' in the
    name) come back as UnsupportedTest with autopkgtest's reason; restrictions are left to
    compat.unsupported_reason(). A control file that does not exist has no tests.
    Raises InvalidControl, naming `display_path` (default: `control_path`), line and
    field, for anything that makes autopkgtest call the package erroneous, and for bad
    encodings and line breaks that autopkgtest would crash on. Lines that are not deb822
    are read as autopkgtest reads them (ignored, see spec.stanzas), each one added to
    `warnings` if given.
    """
    display = display_path if display_path is not None else os.fspath(control_path)
    stanzas = read_stanzas(control_path, display, strict=False, warnings=warnings)
    if stanzas is None:
        return []
    source = SourcePackage(srcdir, testbed_arch)
    entries: list[TestSpec | UnsupportedTest] = []
    commands = 0  # unnamed Test-Command stanzas so far, for command1, command2, ...
    for stanza in stanzas:
        parsed, commands = _parse_stanza(_Stanza(stanza, display), source, testbed_arch, commands)
        entries += parsed
    return entries


def _parse_stanza(
    st: _Stanza, source: SourcePackage, testbed_arch: str, commands: int
) -> tuple[list[TestSpec | UnsupportedTest], int]:
    """The entries of one stanza, and the updated Test-Command counter.

    The checks run in autopkgtest's order, so that a stanza with several problems gets
    the same verdict.
    """
    stanza = st.stanza
    restrictions = frozenset(_words(stanza.get("Restrictions", "")))

    depends_text = stanza.get("Depends", "@")
    if "needs-recommends" in restrictions:
        # deprecated spelling of @recommends@
        depends_text += ",@recommends@"

    test_name: str | None = None
    features: set[str] = set()
    for feature in _words(stanza.get("Features", "")):
        key, eq, value = feature.partition("=")
        if key == "test-name":
            if not eq:
                raise st.error("Features", "test-name feature with no argument")
            if test_name is not None:
                raise st.error("Features", "only one test-name feature allowed")
            test_name = value
        features.add(feature)
    architectures = _words(stanza.get("Architecture", ""))
    classes = tuple(_words(stanza.get("Classes", "")))

    if "Tests" in stanza:
        names = _words(stanza.get("Tests", ""))
        if not names:
            raise st.error("Tests", '"Tests" field is empty')
        depends, synth = _depends(st, depends_text, source, restrictions)
        if "Test-command" in stanza:
            raise st.error("Test-command", 'Only one of "Tests" or "Test-Command" may be given')
        if test_name is not None:
            raise st.error("Features", "test-name feature incompatible with Tests")
        directory = stanza.get("Tests-directory", DEFAULT_TESTS_DIRECTORY)
        entries: list[TestSpec | UnsupportedTest] = []
        for name in names:
            reason = _skip_reason(st, name, testbed_arch, architectures)
            if reason is not None:
                entries.append(UnsupportedTest(name, reason, line=stanza.line))
                continue
            entries.append(
                TestSpec(
                    name=name,
                    path=posixpath.join(directory, name),
                    command=None,
                    restrictions=restrictions,
                    features=frozenset(features),
                    classes=classes,
                    depends=depends,
                    line=stanza.line,
                    synth_depends=synth,
                )
            )
        return entries, commands

    if "Test-command" in stanza:
        command = stanza.get("Test-command", "")
        depends, synth = _depends(st, depends_text, source, restrictions)
        if test_name is None:
            # counted before the skip checks, as autopkgtest does
            commands += 1
            test_name = f"command{commands}"
        reason = _skip_reason(st, test_name, testbed_arch, architectures)
        if reason is not None:
            return [
                UnsupportedTest(test_name, reason, line=stanza.line, from_command=True)
            ], commands
        spec = TestSpec(
            name=test_name,
            path=None,
            command=command,
            restrictions=restrictions,
            features=frozenset(features),
            classes=classes,
            depends=depends,
            line=stanza.line,
            synth_depends=synth,
        )
        return [spec], commands

    raise st.error(None, 'missing "Tests" or "Test-Command" field')


def _depends(
    st: _Stanza, text: str, source: SourcePackage, restrictions: frozenset[str]
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    try:
        expanded = expand_depends(text, source)
    except DependencyError as e:
        raise st.error("Depends", str(e)) from e
    depends = list(expanded.depends)
    for restriction in sorted(restrictions):
        for package in RESTRICTIONS_IMPLY_DEPS.get(restriction, ()):
            if package not in depends:
                depends.append(package)
    return tuple(depends), expanded.synth_depends


def _skip_reason(st: _Stanza, name: str, testbed_arch: str, architectures: list[str]) -> str | None:
    """Why autopkgtest skips this test while parsing, if it does."""
    reason = st.unknown_field_reason()
    if reason is None:
        reason = architecture_skip_reason(testbed_arch, architectures)
    if reason is None and "/" in name:
        reason = "test name may not contain / character"
    return reason
