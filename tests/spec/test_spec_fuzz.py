"""Garbled control files: parse_control returns a list or raises InvalidControl, nothing else."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from spec_helpers import DEBIAN_CONTROL, make_source

from nestbed.errors import InvalidControl
from nestbed.spec import model
from nestbed.spec.compat import unsupported_reason
from nestbed.spec.control import parse_control
from nestbed.spec.stanzas import parse_stanzas

REAL_CONTROL = """\
# A real-looking control file, for truncation and mutation.
Tests: smoke, upgrade
Depends: @, python3 (>= 3.11),
 coreutils | busybox [linux-any], # inline comment
 @builddeps@
Restrictions: needs-root, allow-stderr
Features: colour

Test-Command: set -e; echo "#hash"  ;  true
Features: test-name=inline
Depends: @recommends@, bash:native [amd64 i386]
Architecture: linux-any !hurd-any
Restrictions: needs-recommends needs-sudo isolation-container

Test-Command: sh -c 'exit 0'
Classes: desktop
Tests-Directory: t

Tests: b/c
Architecture: all
X-Unknown: yes
"""

FIELD_NAMES = [
    "Tests",
    "Test-Command",
    "Depends",
    "Restrictions",
    "Features",
    "Classes",
    "Tests-Directory",
    "Architecture",
    "X-Other",
    "tests",
    "DEPENDS",
    "",
    " Tests",
    "Te sts",
    "#Tests",
    "Tests:",
]
VALUES = [
    "a",
    "a b, c",
    "",
    " ",
    "@",
    "@builddeps@",
    "@recommends@",
    "foo (>= 1)",
    "foo (>>",
    "foo | | bar",
    ",,,",
    "foo [!amd64 i386]",
    "foo [ ]",
    "foo <!nocheck>",
    "test-name",
    "test-name=x",
    "test-name=a test-name=b",
    "needs-root needs-sudo",
    "all",
    "!amd64 amd64",
    "\u00a0",
    "\x00",
    "#",
    "é ü",
    "a/b",
    "\t",
]
SEPARATORS = ["\n", "\n\n", "\r\n", "\r", "\n \n", "\n  ", "\n#c\n", "\n\t", " # x\n"]


@st.composite
def field_soup(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=8))
        colon = draw(st.sampled_from([":", ": ", " : ", "", "::"]))
        value = draw(st.sampled_from(VALUES) | st.text(max_size=20))
        parts.append(name + colon + value + draw(st.sampled_from(SEPARATORS)))
    return "".join(parts)


@st.composite
def mutated_real(draw: st.DrawFn) -> bytes:
    data = bytearray(REAL_CONTROL.encode())
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["delete", "insert", "replace"]))
        if action == "delete":
            del data[at : at + draw(st.integers(1, 20))]
        elif action == "insert":
            data[at:at] = draw(
                st.binary(max_size=5) | st.sampled_from([b"\n", b" ", b"#", b":", b","])
            )
        else:
            data[at] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


CONTROLS = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
    field_soup().map(lambda s: s.encode("utf-8", "surrogatepass")),
    mutated_real(),
)

_SOURCE = make_source(Path(tempfile.mkdtemp(prefix="nestbed-spec-fuzz-")))


def _check(src: Path, data: bytes, arch: str = "amd64") -> None:
    control = src / "debian" / "tests" / "control"
    control.write_bytes(data)
    try:
        entries = parse_control(control, src, arch, display_path="debian/tests/control")
    except InvalidControl as e:
        # always says which file, and where if it can
        assert e.path in ("debian/tests/control", str(src / "debian" / "control"))
        assert str(e).startswith(e.path)
        assert e.line is None or e.line >= 1
        return
    assert isinstance(entries, list)
    for entry in entries:
        assert isinstance(entry, (model.TestSpec, model.UnsupportedTest))
        if isinstance(entry, model.TestSpec):
            assert (entry.path is None) != (entry.command is None)
            assert all(isinstance(d, str) and d for d in entry.depends)
            unsupported_reason(entry, frozenset(), frozenset())


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=CONTROLS)
@example(data=b"\xef\xbb\xbfTests: a\n")
@example(data=b"Tests: a\n\xff")
@example(data=b"-----BEGIN PGP SIGNED MESSAGE-----\nTests: a\n")
@example(data=b"Tests: a\nDepends: foo [ ]\n")
@example(data=b"Test-Command: x\nFeatures: test-name=\n")
@example(data=b"\x00: \x00\n")
def test_garbled_control_files(data: bytes) -> None:
    _check(_SOURCE, data)


@st.composite
def garbled_debian_control(draw: st.DrawFn) -> bytes:
    data = bytearray(DEBIAN_CONTROL.encode())
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        data[at : at + draw(st.integers(0, 3))] = draw(
            st.binary(max_size=4) | st.sampled_from([b"\n", b"$", b"(", b"[", b"<", b"|", b","])
        )
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(debian_control=garbled_debian_control(), arch=st.sampled_from(["amd64", "arm64", "x"]))
def test_garbled_debian_control(debian_control: bytes, arch: str) -> None:
    with tempfile.TemporaryDirectory(prefix="nestbed-spec-fuzz-") as tmp:
        src = make_source(Path(tmp), None)
        (src / "debian" / "control").write_bytes(debian_control)
        control = (
            "Tests: a\nDepends: @\n\nTests: b\nDepends: @builddeps@\n\n"
            "Tests: c\nDepends: @recommends@\n\nTests: d\nDepends: foo | foo-arm\n"
        )
        _check(src, control.encode(), arch)


@pytest.mark.parametrize("size", [20_000, 200_000])
def test_long_lines_of_unicode_spaces_are_fast(size: int) -> None:
    # python-debian's field regex is quadratic on these; we must not hand them over as is
    start = time.monotonic()
    (stanza,) = parse_stanzas("Tests: a\n" + "\u00a0" * size + "x\n", "control", strict=True)
    assert stanza.get("Tests", "") == "a" + "\u00a0" * size + "x"
    with pytest.raises(InvalidControl):
        parse_stanzas("Tests: a\nx" + "\u00a0" * size + "\n", "control", strict=True)
    assert parse_stanzas("Tests: a\nx" + "\u00a0" * size + "\n", "control", strict=False)
    assert time.monotonic() - start < 5
