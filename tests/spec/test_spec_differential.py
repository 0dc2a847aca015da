"""Differential tests: our parser against autopkgtest 5.28's own testdesc.py.

Both parse the same control files against the same source tree; we compare what is
invalid, which tests are skipped with which reason, and for runnable tests the name,
path, command, restrictions, features, the dependencies as apt finally gets them and
the synthesised dependencies.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from spec_helpers import (
    Verdict,
    autopkgtest_accepts_dependency,
    autopkgtest_verdict,
    have_autopkgtest,
    have_dpkg_perl,
    make_source,
    nestbed_verdict,
    write_control,
)
from test_spec_fuzz import field_soup, mutated_real

from nestbed.errors import InvalidControl
from nestbed.spec.control import parse_control

pytestmark = [
    pytest.mark.skipif(not have_autopkgtest(), reason="autopkgtest is not installed"),
    pytest.mark.skipif(not have_dpkg_perl(), reason="perl Dpkg::Deps is not installed"),
]

CAPS = [
    frozenset(),
    frozenset({"root-on-testbed", "isolation-container", "revert-full-system"}),
    frozenset({"isolation-machine", "has_internet", "reboot"}),
]

SAMPLES = {
    "simple": "Tests: a b, c\n",
    "all-fields": (
        "Tests: a\nDepends: @, coreutils (>= 8.0), foo-arm\nRestrictions: allow-stderr,"
        " superficial\nFeatures: x, y\nClasses: desktop\nTests-Directory: t/dep8\n"
        "Architecture: linux-any\n"
    ),
    "commands": (
        "Test-Command: true\n\nTest-Command: echo  'a    b'  \n"
        "Features: test-name=named\n\nTest-Command: false\n"
    ),
    "continuations": (
        "Tests: a,\n b\nDepends: @,\n  coreutils,\n# comment between\n"
        "  bash # trailing comment\nTest-Command: x\n"
    ),
    "continuations-ok": "Tests: a,\n b\nDepends: @,\n  coreutils,\n# comment\n  bash # trailing\n",
    "command-multiline": "Test-Command: set -e;\n echo one;\n  echo   two\nDepends:\n",
    "builddeps": "Tests: a\nDepends: @builddeps@, extra\n",
    "recommends": "Tests: a\nDepends: @recommends@\n\nTests: b\nRestrictions: needs-recommends\n",
    "sudo": (
        "Tests: a\nRestrictions: needs-sudo\nDepends: sudo\n\nTests: b\nRestrictions: needs-sudo\n"
    ),
    "arch-qualified": (
        "Tests: a\nDepends: x [amd64], y [!amd64], z [i386] | w, v:native, foo [linux-any]"
        " | foo-arm\n"
    ),
    "own-alternatives": "Tests: a\nDepends: foo-arm | foo (>= 1.0), foo-data | other\n",
    "unknown-field": "Tests: a\nX-Colour: blue\n\nTest-Command: true\nfancy-field: 1\n",
    "unknown-restriction": (
        "Tests: a\nRestrictions: needs-magic\n\nTests: b\nRestrictions: hint-testsuite-triggers\n"
    ),
    "caps": (
        "Tests: root\nRestrictions: needs-root\n\nTests: iso\nRestrictions: isolation-container\n"
        "\nTests: machine\nRestrictions: isolation-machine\n\nTests: net\n"
        "Restrictions: needs-internet\n\nTests: reboot\nRestrictions: needs-reboot\n\n"
        "Tests: breaks\nRestrictions: breaks-testbed\n"
    ),
    "arch-field": (
        "Tests: pos\nArchitecture: amd64 i386\n\nTests: neg\nArchitecture: !amd64\n\n"
        "Tests: neg-other\nArchitecture: !i386, !armel\n\nTests: mixed\nArchitecture: i386 !armel\n"
        "\nTests: mixed-match\nArchitecture: i386 !amd64\n\nTests: all\nArchitecture: all\n\n"
        "Tests: any\nArchitecture: any\n\nTests: wild\nArchitecture: any-amd64\n\n"
        "Tests: unlisted\nArchitecture: hurd-any kfreebsd-any\n"
    ),
    "slash": "Tests: a/b c\n\nTest-Command: true\nFeatures: test-name=x/y\n",
    "case": "tests: a\nDEPENDS: coreutils\nrestrictions: Needs-Root\ntest-command: x\n",
    "case-ok": "tests: a\nDEPENDS: coreutils\nrEsTrIcTiOnS: needs-root\n",
    "duplicate-field": "Tests: a\nTests: b\nDepends: x\ndepends: y\n",
    "empty-depends": "Tests: a\nDepends:\n",
    "trailing-commas": "Tests: a,\nDepends: x,, y,\n",
    "crlf": "Tests: a\r\nDepends: x\r\n\r\nTests: b\r\n",
    "cr-only": "Tests: a\rDepends: x\r\rTests: b\r",
    "blank-with-spaces": "Tests: a\n   \t\nTests: b\n",
    "comments-everywhere": "# head\n\nTests: a # x\n#Depends: broken (\nDepends: coreutils\n",
    "hash-in-command": "Test-Command: echo '#not a comment'\n",
    "missing": "Depends: x\n",
    "both": "Tests: a\nTest-Command: b\n",
    "empty-tests": "Tests: , ,\n",
    "test-name-bare": "Test-Command: x\nFeatures: test-name\n",
    "test-name-twice": "Test-Command: x\nFeatures: test-name=a test-name=b\n",
    "test-name-with-tests": "Tests: a\nFeatures: test-name=b\n",
    "test-name-empty": "Test-Command: x\nFeatures: test-name=\n",
    "bad-dep-uppercase": "Tests: a\nDepends: Foo\n",
    "bad-dep-version": "Tests: a\nDepends: foo (>= 1.0 )\n",
    "bad-dep-profile": "Tests: a\nDepends: foo <!nocheck>\n",
    "bad-dep-space-in-parens": "Tests: a\nDepends: foo ( >= 1)\n",
    "bad-dep-at-alternative": "Tests: a\nDepends: @ | foo\n",
    "bad-dep-own-then-bad": "Tests: a\nDepends: foo | bar (>= !!)\n",
    "error-beats-skip": "Tests: a\nX-Unknown: 1\nDepends: Bad\n",
    "skip-then-error": "Tests: a\nX-Unknown: 1\n\nDepends: x\n",
    "features-checked-first": "Tests:\nFeatures: test-name\n",
    "command-count-with-skips": (
        "Test-Command: a\nX-Foo: 1\n\nTest-Command: b\nFeatures: test-name=n\n\nTest-Command: c\n"
    ),
    "tests-dir-empty": "Tests: a\nTests-Directory:\n",
    "only-comments": "# nothing\n# here\n",
    "empty": "",
    "bom": "\ufeffTests: a\n",
    "unicode": "Tests: tést ünïcode\nDepends:\n",
    "unicode-space-line": "Tests: a\n\u00a0\nDepends: x\n",
    # lines that are not deb822: ignored, and a stanza without fields ends the file
    "no-colon-line": "Tests: a\nnot a field\n b\nDepends: x\n",
    "leading-continuation": " leading\nTests: a\n\n  indented\nTest-Command: true\n",
    "fieldless-stanza": "Tests: a\n\njunk only\n\nTests: b\n\nTest-Command: c\n",
    "unicode-space-stanza": "Tests: a\n\n\u00a0\n\nTests: b\n",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("src"))


def _compare(src: Path, text: str, arch: str = "amd64") -> None:
    control = write_control(src, text)
    for caps in CAPS:
        theirs = autopkgtest_verdict(src, control, arch, caps)
        ours = nestbed_verdict(src, control, arch, caps)
        assert ours == theirs, f"control:\n{text}\ncaps: {sorted(caps)}"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_agrees_with_autopkgtest(source: Path, name: str) -> None:
    _compare(source, SAMPLES[name])


@pytest.mark.parametrize("arch", ["i386", "arm64", "hurd-i386"])
def test_agrees_on_other_architectures(source: Path, arch: str) -> None:
    for name in ("arch-field", "arch-qualified", "builddeps", "recommends", "own-alternatives"):
        _compare(source, SAMPLES[name], arch)


def _fixture_controls() -> list[str]:
    root = Path(__file__).resolve().parent.parent / "fixtures" / "packages"
    return sorted(glob.glob(os.fspath(root / "*" / "debian" / "tests" / "control")))


@pytest.mark.parametrize("control", _fixture_controls())
def test_agrees_on_fixture_packages(tmp_path: Path, control: str) -> None:
    src = make_source(tmp_path)
    _compare(src, Path(control).read_text(encoding="utf-8"))


def test_agrees_without_debian_control(tmp_path: Path) -> None:
    src = make_source(tmp_path, debian_control=None)
    _compare(src, "Tests: a\n\nTests: b\nDepends: @, x\n\nTests: c\nDepends: @recommends@\n")


# ---- generated control files ---------------------------------------------------------

# Pieces that both parsers must agree on. Left out on purpose, because we differ on them
# by design (see test_spec_control.py): lines that are not deb822, an invalid alternative
# after a non-own one ("zzz | Bad"), empty versions "(>= )", several unknown fields in
# one stanza (autopkgtest picks one at random).
NAMES = ["a", "b", "smoke", "x/y", "t-1", "a"]
COMMANDS = ["true", "echo  hi", "exit 0 # comment", "sh -c 'echo   x'"]
DEPS = [
    "@",
    "@builddeps@",
    "@recommends@",
    "coreutils",
    "coreutils (>= 8.0)",
    "foo",
    "foo-arm",
    "foo-data | other",
    "foo | foo-arm",
    "x [amd64]",
    "y [!amd64] | z",
    "w:native",
    "v:any (<< 2)",
    "Bad",
    "bad (>= 1.0 )",
    "bad <!nocheck>",
]
RESTRICTIONS = [
    "needs-root",
    "needs-sudo",
    "needs-recommends",
    "isolation-container",
    "isolation-machine",
    "breaks-testbed",
    "allow-stderr",
    "superficial",
    "hint-testsuite-triggers",
    "needs-unicorns",
]
FEATURES = ["test-name=named", "test-name", "test-name=a/b", "colour", "test-name=", "colour"]
ARCHES = ["amd64", "!amd64", "i386", "!i386", "linux-any", "any", "all", "any-arm64"]
SEPARATORS = [", ", " ", ",", " ,\n  "]


def _field(draw: st.DrawFn, name: str, items: list[str], min_size: int = 0) -> str:
    spelled = draw(st.sampled_from([name, name.lower(), name.upper()]))
    chosen = draw(st.lists(st.sampled_from(items), min_size=min_size, max_size=3))
    joined = ""
    for i, item in enumerate(chosen):
        joined += (draw(st.sampled_from(SEPARATORS)) if i else "") + item
    return f"{spelled}: {joined}\n"


@st.composite
def stanza(draw: st.DrawFn) -> str:
    lines = []
    # mostly valid stanzas: one invalid stanza makes the whole file invalid
    kind = draw(st.sampled_from(["tests"] * 5 + ["command"] * 4 + ["both", "neither"]))
    if kind in ("tests", "both"):
        lines.append(_field(draw, "Tests", NAMES, min_size=draw(st.sampled_from([0, 1, 1, 1]))))
    if kind in ("command", "both"):
        lines.append("Test-Command: " + draw(st.sampled_from(COMMANDS)) + "\n")
    if draw(st.booleans()):
        dep_separators = [", ", ",", ",\n  "]
        good = st.sampled_from(DEPS[:-3])
        chosen = draw(st.lists(st.one_of(good, good, good, st.sampled_from(DEPS)), max_size=4))
        joined = ""
        for i, item in enumerate(chosen):
            joined += (draw(st.sampled_from(dep_separators)) if i else "") + item
        lines.append(f"Depends: {joined}\n")
    if draw(st.booleans()):
        lines.append(_field(draw, "Restrictions", RESTRICTIONS))
    if draw(st.integers(0, 3)) == 0:
        lines.append(_field(draw, "Features", FEATURES))
    if draw(st.booleans()):
        lines.append(_field(draw, "Architecture", ARCHES))
    if draw(st.booleans()):
        lines.append(_field(draw, "Classes", ["desktop", "gpu"]))
    if draw(st.booleans()):
        lines.append("X-Unknown: 1\n")
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), "# a comment\n")
    order = draw(st.permutations(lines))
    return "".join(order)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stanzas=st.lists(stanza(), min_size=1, max_size=3))
def test_agrees_on_generated_controls(source: Path, stanzas: list[str]) -> None:
    _compare(source, "\n".join(stanzas))


# ---- garbled control files -------------------------------------------------------------

# Our errors for files autopkgtest reads differently by design: it crashes (ValueError,
# UnicodeDecodeError) on odd line breaks and bad UTF-8; PGP armour we do not follow.
_OURS_ONLY = re.compile(r"PGP armour|line break character|not valid UTF-8")
_BAD_ALTERNATIVE = re.compile(r"invalid dependency '([^']*)'")


def _unknown_fields_alike(verdict: Verdict) -> Verdict:
    # With several unknown fields autopkgtest names a random one of them.
    skipped = tuple(
        (name, "unknown field *" if reason.startswith("unknown field ") else reason)
        for name, reason in verdict.skipped
    )
    return replace(verdict, skipped=skipped)


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=st.one_of(field_soup(), mutated_real().map(lambda b: b.decode("utf-8", "replace"))))
# seen in CI: autopkgtest crashes on a NUL; Dpkg::Deps dies on a control character
@example(text="Architecture:\x00\nTests:a\n")
@example(text="Tests: smoke\nDepends: coreutils | busybox [\x01linux-any]\n")
def test_agrees_on_garbled_controls(source: Path, text: str) -> None:
    control = write_control(source, text)
    try:
        parse_control(control, source, "amd64")
    except InvalidControl as e:
        if _OURS_ONLY.search(e.message):
            return
        ours_error: InvalidControl | None = e
    else:
        ours_error = None
    try:
        theirs = autopkgtest_verdict(source, control, "amd64", frozenset())
    except ValueError as e:
        # autopkgtest itself crashes: a NUL in a field reaches a subprocess argument
        # ("embedded null byte"). Nothing to compare; ours answered above without a crash.
        assert "null byte" in str(e), (text, e)
        return
    ours = nestbed_verdict(source, control, "amd64", frozenset())
    if ours.invalid and not theirs.invalid:
        # We check every alternative of a Depends item; autopkgtest stops at the first
        # one that is not a binary of this source and leaves the rest to apt. Accept the
        # difference only if autopkgtest's own check would reject that alternative too.
        assert ours_error is not None
        found = _BAD_ALTERNATIVE.search(ours_error.message)
        assert found is not None, (text, ours_error)
        assert not autopkgtest_accepts_dependency(found.group(1)), (text, ours_error)
        return
    assert _unknown_fields_alike(ours) == _unknown_fields_alike(theirs), text
