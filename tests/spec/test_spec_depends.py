"""Depends: @, @builddeps@, @recommends@, restriction-implied packages, arch reduction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from spec_helpers import make_source, only_test, parse

from nestbed.errors import InvalidControl
from nestbed.spec.control import parse_control
from nestbed.spec.depends import Alternative, DependencyError, parse_test_dependency
from nestbed.spec.stanzas import Stanza, read_stanzas

BUILD_DEPS_AMD64 = (
    "debhelper-compat (= 13)",
    "python3",  # :native stripped, <!nocheck> holds with no profile active
    "libonly-amd64-dev",  # [amd64] matches; libnot-amd64-dev [!amd64] dropped
    # profiled-only <stage1> dropped: stage1 is not active
    "either-b",  # either-a [i386] dropped from the alternatives
    "python3-sphinx",  # Build-Depends-Indep
    "gcc-multilib",  # Build-Depends-Arch
    "build-essential",
)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_source(tmp_path)


def test_at_is_every_deb_for_this_arch(src: Path) -> None:
    # no udebs (Package-Type or XC-Package-Type), no foo-arm on amd64
    assert only_test(src, "Tests: a\nDepends: @\n").depends == ("foo", "foo-data", "foo-linux")
    assert only_test(src, "Tests: a\nDepends: @\n", arch="arm64").depends == (
        "foo",
        "foo-data",
        "foo-arm",
        "foo-linux",
    )
    assert only_test(src, "Tests: a\nDepends: @\n", arch="hurd-i386").depends == (
        "foo",
        "foo-data",
    )


def test_at_keeps_its_place_among_other_depends(src: Path) -> None:
    test = only_test(src, "Tests: a\nDepends: first, @, last\n")
    assert test.depends == ("first", "foo", "foo-data", "foo-linux", "last")


def test_builddeps(src: Path) -> None:
    test = only_test(src, "Tests: a\nDepends: @builddeps@, extra\n")
    assert test.depends == (*BUILD_DEPS_AMD64, "extra")
    assert test.synth_depends == ()


def test_builddeps_on_another_arch(src: Path) -> None:
    test = only_test(src, "Tests: a\nDepends: @builddeps@\n", arch="i386")
    assert test.depends == (
        "debhelper-compat (= 13)",
        "python3",
        "libnot-amd64-dev",
        "either-a | either-b",
        "python3-sphinx",
        "gcc-multilib",
        "build-essential",
    )


def test_builddeps_without_build_depends_is_build_essential(tmp_path: Path) -> None:
    src = make_source(tmp_path, "Source: x\n\nPackage: x\nArchitecture: all\n")
    assert only_test(src, "Tests: a\nDepends: @builddeps@\n").depends == ("build-essential",)


def test_recommends_drop_substvars(src: Path) -> None:
    test = only_test(src, "Tests: a\nDepends: @recommends@\n")
    # ${misc:Recommends} dropped, "foo-data (= ${source:Version})" loses its version,
    # rec-arm [arm64] is not for amd64
    assert test.depends == ("foo-data", "rec-plain", "rec-other", "rec-data")


def test_needs_recommends_adds_recommends_after_depends(src: Path) -> None:
    test = only_test(src, "Tests: a\nRestrictions: needs-recommends\n")
    assert test.depends == (
        "foo",
        "foo-data",
        "foo-linux",
        "foo-data",
        "rec-plain",
        "rec-other",
        "rec-data",
    )
    test = only_test(src, "Tests: a\nDepends: x\nRestrictions: needs-recommends\n")
    assert test.depends == ("x", "foo-data", "rec-plain", "rec-other", "rec-data")


def test_needs_sudo_adds_sudo_once(src: Path) -> None:
    assert only_test(src, "Tests: a\nDepends:\nRestrictions: needs-sudo\n").depends == ("sudo",)
    assert only_test(src, "Tests: a\nDepends: sudo, x\nRestrictions: needs-sudo\n").depends == (
        "sudo",
        "x",
    )


def test_arch_qualifiers_reduced_for_the_testbed(src: Path) -> None:
    text = (
        "Tests: a\nDepends: x [amd64], y [!amd64], z [i386] | w, v:native, u:any (>= 1) [amd64]\n"
    )
    assert only_test(src, text).depends == ("x", "w", "v", "u:any (>= 1)")
    assert only_test(src, text, arch="i386").depends == ("y", "z | w", "v")


def test_upper_case_arch_is_invalid_as_in_autopkgtest(src: Path) -> None:
    with pytest.raises(InvalidControl, match=r"invalid dependency 'x \[AMD64\]'"):
        parse(src, "Tests: a\nDepends: x [AMD64]\n")


def test_alternatives_stay_one_item(src: Path) -> None:
    test = only_test(src, "Tests: a\nDepends: a | b (>= 2) | c,\n d\n")
    assert test.depends == ("a | b (>= 2) | c", "d")


def test_synth_depends_for_own_binaries(src: Path) -> None:
    test = only_test(
        src, "Tests: a\nDepends: foo-arm | foo (>= 1), foo-data | other, foo [!amd64]\n"
    )
    # all alternatives must be our binaries; the arch-excluded ones are left out
    assert test.synth_depends == (("foo-arm", "foo"),)
    assert test.depends == ("foo-arm | foo (>= 1)", "foo-data | other")


def test_no_debian_control_means_no_binaries(tmp_path: Path) -> None:
    src = make_source(tmp_path, debian_control=None)
    test = only_test(src, "Tests: a\nDepends: @, @recommends@, @builddeps@\n")
    assert test.depends == ("build-essential",)


def test_debian_control_is_only_read_once(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def counting(
        path: str | os.PathLike[str], display: str, *, strict: bool
    ) -> list[Stanza] | None:
        calls.append(path)
        return read_stanzas(path, display, strict=strict)

    monkeypatch.setattr("nestbed.spec.depends.read_stanzas", counting)
    parse(src, "Tests: a\n\nTests: b\nDepends: @builddeps@\n\nTest-Command: x\n")
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("debian_control", "line", "field", "bad"),
    [
        ("Source: x\nBuild-Depends: a, b (>= 1\n", 2, "Build-Depends", "b (>= 1"),
        (
            "Source: x\nBuild-Depends: a\nBuild-Depends-Indep: ok,\n B@d\n",
            3,
            "Build-Depends-Indep",
            "B@d",
        ),
        ("Source: x\nBuild-Depends-Arch: c [ ]\n", 2, "Build-Depends-Arch", "c [ ]"),
        ("Source: x\nBuild-Depends: c <>\n", 2, "Build-Depends", "c <>"),
        ("Source: x\nBuild-Depends: c (== 1)\n", 2, "Build-Depends", "c (== 1)"),
    ],
)
def test_invalid_build_depends(
    tmp_path: Path, debian_control: str, line: int, field: str, bad: str
) -> None:
    src = make_source(tmp_path, debian_control)
    control = src / "debian" / "tests" / "control"
    control.write_text("Tests: a\nDepends: @builddeps@\n")
    with pytest.raises(InvalidControl) as info:
        parse_control(control, src, "amd64")
    error = info.value
    assert (error.path, error.line, error.field) == (str(src / "debian" / "control"), line, field)
    assert error.message == f"invalid dependency '{bad}' (needed for @builddeps@)"
    # not needed, not read: other tests do not care
    control.write_text("Tests: a\nDepends: x\n")
    assert len(parse_control(control, src, "amd64")) == 1


def test_invalid_recommends(tmp_path: Path) -> None:
    src = make_source(
        tmp_path, "Source: x\n\nPackage: x\nArchitecture: all\nRecommends: a | ${b}\n"
    )
    control = src / "debian" / "tests" / "control"
    control.write_text("Tests: a\nRestrictions: needs-recommends\n")
    with pytest.raises(InvalidControl) as info:
        parse_control(control, src, "amd64")
    assert str(info.value) == (
        f"{src}/debian/control:5: field Recommends: invalid dependency 'a | ${{b}}' "
        "(needed for @recommends@)"
    )


def test_debian_control_is_read_leniently(tmp_path: Path) -> None:
    # garbage lines are dropped as python-debian drops them; they are dpkg's business
    src = make_source(
        tmp_path, "Source: x\ngarbage line\n\n continuation\nPackage: y\nArchitecture: all\n"
    )
    assert only_test(src, "Tests: a\n").depends == ("y",)


def test_debian_control_not_utf8(tmp_path: Path) -> None:
    src = make_source(tmp_path, None)
    (src / "debian" / "control").write_bytes(b"Source: x\n\nPackage: \xff\nArchitecture: all\n")
    control = src / "debian" / "tests" / "control"
    control.write_text("Tests: a\n")
    with pytest.raises(InvalidControl) as info:
        parse_control(control, src, "amd64")
    assert str(info.value) == f"{src}/debian/control:3: not valid UTF-8 (byte 0xff)"


def test_binary_without_architecture_is_treated_as_any(tmp_path: Path) -> None:
    src = make_source(tmp_path, "Source: x\n\nPackage: y\n")
    assert only_test(src, "Tests: a\n").depends == ("y",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo", Alternative("foo", None, None, None, None)),
        (" foo:any ", Alternative("foo", "any", None, None, None)),
        ("foo(>=1.0)", Alternative("foo", None, ">=", "1.0", None)),
        (
            "foo (<< 2:1.0-1~bpo1) [!i386 amd64]",
            Alternative("foo", None, "<<", "2:1.0-1~bpo1", ("!i386", "amd64")),
        ),
        ("g++-12 (= 1)", Alternative("g++-12", None, "=", "1", None)),
    ],
)
def test_parse_test_dependency(text: str, expected: Alternative) -> None:
    assert parse_test_dependency(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Foo",
        "foo (> 1)",
        "foo (>=)",
        "foo [amd64",
        "foo <stage1>",
        "foo bar",
        "",
        "@",
        "foo (= 1) x",
    ],
)
def test_parse_test_dependency_rejects(text: str) -> None:
    with pytest.raises(DependencyError):
        parse_test_dependency(text)


def test_for_apt_rendering() -> None:
    assert parse_test_dependency("a:native (>=1) [amd64]").for_apt() == "a (>= 1)"
    assert parse_test_dependency("a:i386").for_apt() == "a:i386"
