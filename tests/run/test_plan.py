"""TestPlan.read: which control file a package's tests come from (autodep8 or its own)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nestbed.log import INFO, Console
from nestbed.run import plan
from nestbed.run.plan import TestPlan

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "packages"
needs_autodep8 = pytest.mark.skipif(shutil.which("autodep8") is None, reason="no autodep8")


def _names(tree: Path, **kwargs: object) -> list[str]:
    read = TestPlan.read(str(tree), "amd64", frozenset(), frozenset(), **kwargs)  # type: ignore[arg-type]
    return [e.test.name for e in read.entries]


@needs_autodep8
def test_autodep8_control_when_there_is_none_and_not_with_no_auto_control() -> None:
    tree = FIXTURES / "autodep8-control"
    assert _names(tree) == ["from-autodep8", "smoke"]
    assert _names(tree, auto_control=False) == []


@needs_autodep8
def test_testsuite_field_adds_generated_tests_after_the_packages_own() -> None:
    tree = FIXTURES / "autodep8-python"
    assert _names(tree) == ["own", "autodep8-python3"]
    assert _names(tree, auto_control=False) == ["own"]


@needs_autodep8
def test_an_override_control_file_is_read_as_it_is(tmp_path: Path) -> None:
    override = tmp_path / "control"
    override.write_text("Test-Command: true\nFeatures: test-name=overridden\n")
    tree = FIXTURES / "autodep8-python"
    assert _names(tree, control_path=str(override)) == ["overridden"]


def test_missing_autodep8_warns_when_testsuite_asks_for_it(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(plan, "AUTODEP8", "nestbed-no-such-autodep8")
    console = Console(INFO)
    assert _names(FIXTURES / "autodep8-python", console=console) == ["own"]
    assert "autodep8 is not installed" in capfd.readouterr().err
    # no Testsuite field: autopkgtest's silence (a debug line only)
    assert _names(FIXTURES / "autodep8-control", console=console) == []
    assert "autodep8" not in capfd.readouterr().err


def test_lines_autopkgtest_ignores_are_warned_with_file_and_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    tree = FIXTURES / "lenient-control"
    assert _names(tree, console=Console(INFO), auto_control=False) == ["first", "second"]
    err = capfd.readouterr().err
    control = tree / "debian" / "tests" / "control"
    for line in (1, 4, 11):
        assert f"WARNING: {control}:{line}: " in err, err
