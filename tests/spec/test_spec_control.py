"""parse_control: fields, naming, skips and errors (with file, line and field)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from spec_helpers import make_source, only_test, parse, parse_error, write_control

from nestbed.errors import InvalidControl
from nestbed.spec import model
from nestbed.spec.control import parse_control
from nestbed.spec.model import UnsupportedTest
from nestbed.spec.stanzas import Oddity


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_source(tmp_path)


# ---- fields -----------------------------------------------------------------------


def test_tests_field_gives_one_entry_per_name_in_order(src: Path) -> None:
    entries = parse(src, "Tests: one, two three\n\nTests: four\n")
    assert [e.name for e in entries] == ["one", "two", "three", "four"]
    first = entries[0]
    assert isinstance(first, model.TestSpec)
    assert first.path == "debian/tests/one"
    assert first.command is None
    assert first.line == 1
    assert entries[3].line == 3


def test_all_fields(src: Path) -> None:
    test = only_test(
        src,
        "Tests: smoke\n"
        "Depends: coreutils (>= 8.0), bash | dash\n"
        "Restrictions: needs-root, allow-stderr superficial\n"
        "Features: colour,  shape\n"
        "Classes: desktop, graphics-driver\n"
        "Tests-Directory: t/dep8\n"
        "Architecture: linux-any\n",
    )
    assert test == model.TestSpec(
        name="smoke",
        path="t/dep8/smoke",
        command=None,
        restrictions=frozenset({"needs-root", "allow-stderr", "superficial"}),
        features=frozenset({"colour", "shape"}),
        classes=("desktop", "graphics-driver"),
        depends=("coreutils (>= 8.0)", "bash | dash"),
        line=1,
    )
    assert test.has("needs-root")


def test_default_depends_is_at(src: Path) -> None:
    test = only_test(src, "Tests: a\n")
    assert test.depends == ("foo", "foo-data", "foo-linux")
    assert test.synth_depends == (("foo",), ("foo-data",), ("foo-linux",))


def test_empty_depends_means_nothing(src: Path) -> None:
    assert only_test(src, "Tests: a\nDepends:\n").depends == ()


def test_test_command(src: Path) -> None:
    test = only_test(src, "Test-Command: echo hello | grep -q hello\nDepends:\n")
    assert test.name == "command1"
    assert test.path is None
    assert test.command == "echo hello | grep -q hello"


def test_command_numbering_counts_only_unnamed_command_stanzas(src: Path) -> None:
    entries = parse(
        src,
        "Test-Command: a\n\nTests: script\n\nTest-Command: b\nFeatures: test-name=named\n\n"
        "Test-Command: c\nX-Unknown: skipped but still counted\n\nTest-Command: d\n",
    )
    assert [e.name for e in entries] == ["command1", "script", "named", "command2", "command3"]
    assert isinstance(entries[3], UnsupportedTest)
    named = entries[2]
    assert isinstance(named, model.TestSpec)
    assert named.features == frozenset({"test-name=named"})


def test_field_names_are_case_insensitive(src: Path) -> None:
    test = only_test(src, "tESTS: a\nDEPENDS: x\nrestrictions: needs-root\nTESTS-DIRECTORY: t\n")
    assert (test.path, test.depends, test.restrictions) == (
        "t/a",
        ("x",),
        frozenset({"needs-root"}),
    )


def test_repeated_field_last_one_wins(src: Path) -> None:
    test = only_test(src, "Tests: a\ntests: b\nDepends: x\n")
    assert test.name == "b"


def test_empty_tests_directory_puts_tests_at_the_root(src: Path) -> None:
    assert only_test(src, "Tests: a\nTests-Directory:\n").path == "a"


def test_empty_test_name_is_accepted_like_autopkgtest(src: Path) -> None:
    assert only_test(src, "Test-Command: true\nFeatures: test-name=\n").name == ""


# ---- comments and continuation lines ------------------------------------------------


def test_comments_and_continuations(src: Path) -> None:
    test = only_test(
        src,
        "# leading comment\n"
        "Tests: a # trailing comment\n"
        "Depends: one,\n"
        "# a whole-line comment does not end the field\n"
        "   # nor does an indented one\n"
        " two, # half a line\n"
        "\tthree\n",
    )
    assert test.depends == ("one", "two", "three")


def test_hash_cuts_test_command_as_in_autopkgtest(src: Path) -> None:
    assert only_test(src, "Test-Command: echo '#x'\n").command == "echo '"


def test_multi_line_test_command_is_joined_and_double_spaces_halved(src: Path) -> None:
    test = only_test(src, "Test-Command: set -e;\n echo one;\n  echo  two\n")
    # autopkgtest drops the newlines and then replaces each "  " by " "
    assert test.command == "set -e; echo one; echo two"
    assert only_test(src, "Test-Command: a    b\n").command == "a  b"


def test_crlf_and_cr_line_endings(src: Path) -> None:
    assert [e.name for e in parse(src, "Tests: a\r\n\r\nTests: b\r\n")] == ["a", "b"]
    assert [e.name for e in parse(src, "Tests: a\r\rTests: b\r")] == ["a", "b"]


def test_whitespace_only_line_separates_stanzas(src: Path) -> None:
    assert [e.name for e in parse(src, "Tests: a\n \t \nTests: b\n")] == ["a", "b"]


def test_empty_and_comment_only_files_have_no_tests(src: Path) -> None:
    assert parse(src, "") == []
    assert parse(src, "# nothing here\n\n\n") == []


def test_missing_control_file_has_no_tests(src: Path) -> None:
    assert parse_control(src / "debian" / "tests" / "nope", src, "amd64") == []


# ---- skipped at parse time ------------------------------------------------------------


def test_unknown_field_is_capwords_like_autopkgtest(src: Path) -> None:
    entries = parse(src, "Tests: a b\nX-FANCY-thing: 1\n\nTest-Command: x\nfoo: 1\n")
    assert entries == [
        UnsupportedTest("a", "unknown field X-fancy-thing", line=1),
        UnsupportedTest("b", "unknown field X-fancy-thing", line=1),
        UnsupportedTest("command1", "unknown field Foo", line=4, from_command=True),
    ]


def test_slash_in_name(src: Path) -> None:
    entries = parse(src, "Tests: ok a/b\n\nTest-Command: x\nFeatures: test-name=c/d\n")
    reason = "test name may not contain / character"
    assert entries[1:] == [
        UnsupportedTest("a/b", reason, 1),
        UnsupportedTest("c/d", reason, 3, from_command=True),
    ]


@pytest.mark.parametrize(
    ("architecture", "reason"),
    [
        ("amd64", None),
        ("any", None),
        ("linux-any, i386", None),
        ("any-amd64", None),
        ("!i386 !armel", None),
        ("!amd64", "Test declares architecture as not supported: amd64"),
        ("!linux-any", "Test declares architecture as not supported: amd64"),
        (
            "i386 kfreebsd-any",
            "Test lists explicitly supported architectures, but the current architecture "
            "amd64 isn't listed.",
        ),
        (
            "amd64 !i386",
            "It is not permitted for some archs to be prepended by an exclamation mark while "
            "others aren't",
        ),
        ("i386 !amd64", "Test declares architecture as not supported: amd64"),
        ("all", "Arch 'all' not allowed in Architecture field"),
        ("amd64 all", "Arch 'all' not allowed in Architecture field"),
    ],
)
def test_architecture_field(src: Path, architecture: str, reason: str | None) -> None:
    (entry,) = parse(src, f"Tests: t\nArchitecture: {architecture}\n")
    if reason is None:
        assert isinstance(entry, model.TestSpec)
    else:
        assert entry == UnsupportedTest("t", reason, line=1)


def test_skip_order_unknown_field_before_architecture_before_slash(src: Path) -> None:
    (entry,) = parse(src, "Tests: a/b\nArchitecture: !amd64\nX-Y: 1\n")
    assert isinstance(entry, UnsupportedTest) and entry.reason == "unknown field X-y"
    (entry,) = parse(src, "Tests: a/b\nArchitecture: !amd64\n")
    assert isinstance(entry, UnsupportedTest) and entry.reason.startswith("Test declares")


# ---- errors -----------------------------------------------------------------------


def _check(error: InvalidControl, line: int | None, field: str | None, message: str) -> None:
    assert (error.path, error.line, error.field) == ("debian/tests/control", line, field)
    assert error.message == message
    where = "debian/tests/control" if line is None else f"debian/tests/control:{line}"
    what = f"field {field}: " if field else ""
    assert str(error) == f"{where}: {what}{message}"


@pytest.mark.parametrize(
    ("control", "line", "field", "message"),
    [
        (
            "Tests: a\n\nDepends: x\nRestrictions: y\n",
            3,
            None,
            'missing "Tests" or "Test-Command" field',
        ),
        (
            "Tests: a\nDepends: x\nTest-Command: b\n",
            3,
            "Test-Command",
            'Only one of "Tests" or "Test-Command" may be given',
        ),
        ("# c\nTests: ,\n", 2, "Tests", '"Tests" field is empty'),
        (
            "Test-Command: x\nFeatures: a, test-name\n",
            2,
            "Features",
            "test-name feature with no argument",
        ),
        (
            "Test-Command: x\n\nTest-Command: y\nFeatures: test-name=a test-name=b\n",
            4,
            "Features",
            "only one test-name feature allowed",
        ),
        (
            "Tests: a\nFeatures: test-name=b\n",
            2,
            "Features",
            "test-name feature incompatible with Tests",
        ),
        ("Tests: a\nDepends: foo (>> )\n", 2, "Depends", "invalid dependency 'foo (>> )'"),
        ("Tests: a\nDepends: x,\n Foo\n", 2, "Depends", "invalid dependency 'Foo'"),
        (
            "Tests: a\nDepends: foo (>= 1.0 )\n",
            2,
            "Depends",
            "invalid dependency 'foo (>= 1.0 )': invalid version '1.0 '",
        ),
        (
            "Tests: a\nDepends: foo (>= !)\n",
            2,
            "Depends",
            "invalid dependency 'foo (>= !)': invalid version '!'",
        ),
        (
            "Tests: a\nDepends: foo <!nocheck>\n",
            2,
            "Depends",
            "invalid dependency 'foo <!nocheck>'",
        ),
        ("Tests: a\nDepends: foo ( >= 1)\n", 2, "Depends", "invalid dependency 'foo ( >= 1)'"),
        (
            "Tests: a\nDepends: @ | bar\n",
            2,
            "Depends",
            "invalid dependency '@' (@, @builddeps@ and @recommends@ must stand alone "
            "between commas)",
        ),
        # stricter than autopkgtest, which stops checking at the first alternative that
        # is not a binary of this source and then hands the bad one to apt
        (
            "Tests: a\nDepends: zzz | bar (>= !!)\n",
            2,
            "Depends",
            "invalid dependency 'bar (>= !!)': invalid version '!!'",
        ),
        # a bad Depends wins over an unknown field, as in autopkgtest
        ("Tests: a\nX-Unknown: 1\nDepends: Bad\n", 3, "Depends", "invalid dependency 'Bad'"),
        # features are checked before Tests
        ("Tests:\nFeatures: test-name\n", 2, "Features", "test-name feature with no argument"),
        # an empty version is an error for us (autopkgtest lets it through to apt)
        ("Test-Command: x\nDepends: a (= 1) | b (=)\n", 2, "Depends", "invalid dependency 'b (=)'"),
    ],
)
def test_invalid_control(
    src: Path, control: str, line: int, field: str | None, message: str
) -> None:
    _check(parse_error(src, control), line, field, message)


def test_error_in_a_later_stanza_after_valid_ones(src: Path) -> None:
    _check(
        parse_error(src, "Tests: a\n\nTests: b\n\n\nTest-Command: c\nTests: d\n"),
        6,
        "Test-Command",
        'Only one of "Tests" or "Test-Command" may be given',
    )


@pytest.mark.parametrize(
    ("control", "names", "warned"),
    [
        # a line with no colon is ignored; a continuation after it continues the field
        ("Tests: a\nthis is not a field\n b\n", ["a", "b"], [2]),
        # a continuation line before any field of its stanza is ignored
        ("Tests: a\n\n  indented first line\nTests: b\n", ["a", "b"], [3]),
        ("Tests: a\n: no name\n", ["a"], [2]),
        ("Tests: a\nTwo words: value\n", ["a"], [2]),
        # a stanza with no field ends the file: what follows is ignored
        ("Tests: a\n\njunk\n\nTests: b\n\nTests: c\n", ["a"], [3, 5, 7]),
    ],
)
def test_lines_that_are_not_deb822_are_read_as_autopkgtest_reads_them(
    src: Path, control: str, names: list[str], warned: list[int]
) -> None:
    warnings: list[Oddity] = []
    path = write_control(src, control)
    entries = parse_control(path, src, "amd64", display_path="x", warnings=warnings)
    assert [e.name for e in entries] == names
    assert [w.line for w in warnings] == warned
    assert all("ignored" in w.message for w in warnings)


def test_pgp_armour_is_an_error(src: Path) -> None:
    error = parse_error(src, "# c\n\n-----BEGIN PGP SIGNED MESSAGE-----\nTests: a\n")
    _check(error, 3, None, "PGP armour (a signed file) is not supported here")


def test_non_utf8(src: Path) -> None:
    error = parse_error(src, b"Tests: a\n\nTests: b\xff\n")
    _check(error, 3, None, "not valid UTF-8 (byte 0xff)")


def test_non_utf8_line_counts_cr_like_autopkgtest(src: Path) -> None:
    error = parse_error(src, b"Tests: a\r\rTests: b\r\nDepends: \xc3\n")
    assert error.line == 4


def test_unreadable_file(src: Path) -> None:
    control = write_control(src, "Tests: a\n")
    os.remove(control)
    control.mkdir()
    with pytest.raises(InvalidControl) as info:
        parse_control(control, src, "amd64", display_path="shown/control")
    assert info.value.path == "shown/control"
    assert info.value.line is None
    assert str(info.value).startswith("shown/control: cannot read file: ")


def test_display_path_defaults_to_control_path(src: Path) -> None:
    control = write_control(src, "Tests:\n")
    with pytest.raises(InvalidControl) as info:
        parse_control(control, src, "amd64")
    assert info.value.path == os.fspath(control)
    assert str(info.value) == f'{control}:1: field Tests: "Tests" field is empty'


def test_bom_is_part_of_the_first_field_name_as_in_autopkgtest(src: Path) -> None:
    error = parse_error(src, "\ufeffTests: a\n")
    assert error.message == 'missing "Tests" or "Test-Command" field'
