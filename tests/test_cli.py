"""What a user sees from the command line for help and bad input: one line, the right code."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests_support import nestbed_argv

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smoke"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*nestbed_argv(), *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_help_teaches_and_exits_0() -> None:
    p = run("--help")
    assert p.returncode == 0
    for needle in ("-- VIRT-SERVER", "--test-name", "--timeout-test", "null", "Exit status"):
        assert needle in p.stdout
    assert "INSTALLED ON THIS MACHINE" in p.stdout  # null as root changes the host: say so


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus", str(EXAMPLE), "--", "null"], "unrecognized arguments: --bogus"),
        (["/nonexistent/tree", "--", "null"], "/nonexistent/tree is not a valid test package"),
        ([str(EXAMPLE), "--"], "no testbed after --"),
        ([str(EXAMPLE), "--", "no-such-testbed"], "no-such-testbed"),
        (["--env", "NOEQUALS", str(EXAMPLE), "--", "null"], "--env must be VAR=value"),
        (["@/nonexistent/args"], "cannot read argument file /nonexistent/args"),
        ([str(EXAMPLE), str(EXAMPLE), "--", "null"], "only one source package"),
        (
            ["--override-control", "/nonexistent/ctl", str(EXAMPLE), "--", "null"],
            "--override-control: cannot read /nonexistent/ctl",
        ),
        (["--needs-internet=maybe", str(EXAMPLE), "--", "null"], "--needs-internet"),
        (["-j", "0", str(EXAMPLE), "--", "null"], "argument -j/--jobs: at least 1: 0"),
        (["--jobs=many", str(EXAMPLE), "--", "null"], "-j/--jobs: not a whole number: 'many'"),
    ],
)
def test_bad_usage_is_one_line_and_exit_20(args: list[str], message: str) -> None:
    p = run(*args)
    assert p.returncode == 20, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert message in lines[0]
    assert "Traceback" not in p.stderr


def test_directory_without_debian_is_one_line(tmp_path: Path) -> None:
    p = run(str(tmp_path), "--", "null")
    assert p.returncode == 20
    assert p.stderr.strip().splitlines() == [
        f"nestbed: error: {tmp_path} is not a valid test package: it has no debian/control"
    ]


def test_tree_without_debian_tests_has_no_tests(tmp_path: Path) -> None:
    tree = tmp_path / "pkg"
    shutil.copytree(EXAMPLE, tree)
    shutil.rmtree(tree / "debian" / "tests")
    p = run("-B", str(tree), "--", "null")
    assert p.returncode == 8, p.stderr
    assert p.stdout.splitlines()[-1] == "*                    SKIP no tests in this package"


def test_argfile_is_read_one_argument_per_line(tmp_path: Path) -> None:
    args = tmp_path / "args"
    args.write_text(f"-B\n  {EXAMPLE}  \n--\nnull\n")
    out = tmp_path / "out"
    p = run("-o", str(out), f"@{args}")
    assert p.returncode == 0, p.stderr
    assert "hello                PASS" in p.stdout.splitlines()
    assert os.path.exists(out / "summary")
