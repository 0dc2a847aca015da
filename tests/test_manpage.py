"""The manual pages: made from the parsers --help prints, rendered by man without warnings."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nestbed import manpage

pytestmark = pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")

# what man prints for roff's typographic characters in a UTF-8 locale, back to ASCII
_ASCII = str.maketrans({"\u2010": "-", "\u2212": "-", "\u2018": "`", "\u2019": "'"})


def man(path: Path) -> tuple[str, str]:
    """`man --warnings -l PATH`: (the page as text, man's and groff's warnings)."""
    env = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="100", MAN_KEEP_FORMATTING="")
    env.pop("MANPAGER", None)
    done = subprocess.run(
        ["man", "--warnings", "-P", "cat", "-l", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    text = re.sub(r".\x08", "", done.stdout)  # overstrike bold/underline, if any
    return text.translate(_ASCII), done.stderr


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("man")
    paths = manpage.write_all(str(directory))
    return {Path(p).stem: Path(p) for p in paths}


def test_every_program_has_a_page(pages: dict[str, Path]) -> None:
    assert set(pages) == {
        "nestbed",
        "nestbed-image",
        "nestbed-vm",
        "nestbed-virt-null",
        "nestbed-virt-unshare",
        "nestbed-virt-qemu",
    }


@pytest.mark.parametrize("page", manpage.PAGES, ids=lambda p: p.name)
def test_page_renders_without_warnings_and_shows_every_option(
    page: manpage.Page, pages: dict[str, Path]
) -> None:
    text, warnings = man(pages[page.name])
    assert warnings == ""
    shown = flat(text)
    assert f"{page.name} - {page.summary}" in shown
    # every option and its help, as --help has them: the page is made from the same parser
    parsers = [page.parser()]
    for action in parsers[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for parser in parsers:
        for action in parser._actions:
            if action.help is argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            for option in action.option_strings:
                assert option in shown, f"{page.name}: {option} missing"
            help_text = manpage._expand_help(action, parser.prog)
            assert flat(help_text) in shown, f"{page.name}: help of {action.dest} missing"


def test_runner_page_teaches(pages: dict[str, Path]) -> None:
    text, _ = man(pages["nestbed"])
    sections = re.findall(r"^([A-Z][A-Z ]+)$", text, re.M)
    assert sections[:4] == ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS"]
    assert {"EXIT STATUS", "EXAMPLES", "SEE ALSO"} <= set(sections)
    examples = text.split("\nEXAMPLES\n", 1)[1]
    assert "nestbed -B ./hello -- null" in examples
    exit_status = flat(text.split("\nEXIT STATUS\n", 1)[1].split("\nEXAMPLES\n")[0])
    assert "16 testbed failure" in exit_status


@pytest.mark.parametrize("name", ["nestbed-virt-null", "nestbed-virt-unshare", "nestbed-virt-qemu"])
def test_server_pages_show_how_to_call_them(name: str, pages: dict[str, Path]) -> None:
    text, _ = man(pages[name])
    examples = flat(text.split("\nEXAMPLES\n", 1)[1])
    assert f"autopkgtest ./hello -- /usr/bin/{name}" in examples or (
        f"autopkgtest -B ./hello -- /usr/bin/{name}" in examples
    )
    assert f"-- {name.removeprefix('nestbed-virt-')}" in examples


def test_roff_special_characters_reach_the_reader(tmp_path: Path) -> None:
    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog="x",
            description=".starts with a dot\n'and a quote, a \\back\\slash and -- dashes",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--opt", metavar="A-B", default=3, help=".dot, \\e and %(default)s")
        return p

    path = tmp_path / "x.1"
    path.write_text(manpage.render(manpage.Page("x", "a test", parser), "1.0", "2024-01-01"))
    text, warnings = man(path)
    assert warnings == ""
    shown = flat(text)
    assert ".starts with a dot 'and a quote, a \\back\\slash and -- dashes" in shown
    assert "--opt A-B .dot, \\e and 3" in shown
