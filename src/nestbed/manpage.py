"""Manual pages made from the argparse parsers that --help prints: one text for both.

    python3 -m nestbed.manpage [--version V] OUTDIR
                                           writes nestbed.1, nestbed-image.1, nestbed-vm.1,
                                           nestbed-virt-{null,unshare,qemu}.1 into OUTDIR

A parser's description and epilog are plain text laid out for a terminal (argparse's
RawDescriptionHelpFormatter); they become roff by a few rules of that layout:

- paragraphs are separated by blank lines; lines starting at column 0 are prose (filled);
- indented lines of the form ``  TERM  explanation`` (two spaces or more between) are a list
  of terms; a more deeply indented line without a term continues the explanation before it;
- any other indented line is shown as typed (an example command);
- a paragraph headed ``Examples:`` or ``Exit status...:`` becomes the man page's EXAMPLES or
  EXIT STATUS section.

Options come from the parser's argument groups, with their metavars and help (``%(default)s``
expanded as argparse expands it); a parser with subcommands gets a section per subcommand.
Only the build (debian/rules) and the tests use this module.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

_TERM_LINE = re.compile(r"^( {1,8})(\S(?:\S| (?! ))*) {2,}(\S.*)$")
_INLINE_HEAD = re.compile(r"^([A-Za-z][A-Za-z ]*):\s+(\S.*)$")
_SECTION_HEADS = {"examples": "EXAMPLES", "exit status": "EXIT STATUS"}


def escape(text: str) -> str:
    """Text → roff text: backslashes, minus signs, and a leading control character."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    if out.startswith((".", "'")):
        out = "\\&" + out
    return out


def _bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


@dataclass
class _Block:
    """One paragraph of a description: its own heading line, then its lines."""

    heading: str | None
    lines: list[str] = field(default_factory=list)


def _paragraphs(text: str) -> Iterator[_Block]:
    for chunk in re.split(r"\n\s*\n", text.strip("\n")):
        lines = chunk.rstrip().split("\n")
        first = lines[0]
        if (
            first.endswith(":")
            and not first.startswith(" ")
            and len(lines) > 1
            and all(line.startswith(" ") for line in lines[1:])
        ):
            yield _Block(first[:-1], lines[1:])
        else:
            yield _Block(None, lines)


def _section_for(heading: str | None) -> str | None:
    if heading is None:
        return None
    lowered = heading.lower()
    for prefix, section in _SECTION_HEADS.items():
        if lowered.startswith(prefix):
            return section
    return None


def _join_wrapped_terms(lines: Sequence[str]) -> list[str]:
    """A term too long for its column stands alone, its explanation on the next, deeper
    indented line: make them one ``TERM  explanation`` line."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        indent = len(line) - len(line.lstrip(" "))
        if (
            line.startswith(" ")
            and not _TERM_LINE.match(line)
            and "  " not in line.strip()
            and len(nxt) - len(nxt.lstrip(" ")) >= indent + 4
        ):
            out.append(f"{line.rstrip()}  {nxt.strip()}")
            i += 2
            continue
        out.append(line)
        i += 1
    return out


def _lines_to_roff(lines: Sequence[str]) -> list[str]:
    """Prose, term lists and literal lines (see the module's rules) as roff requests."""
    out: list[str] = []
    prose: list[str] = []
    term_indent: int | None = None

    def flush_prose() -> None:
        if prose:
            out.append(".PP")
            out.extend(escape(line.strip()) for line in prose)
            prose.clear()

    for line in _join_wrapped_terms(lines):
        if not line.startswith(" "):
            prose.append(line)
            term_indent = None
            continue
        flush_prose()
        match = _TERM_LINE.match(line)
        indent = len(line) - len(line.lstrip(" "))
        if match and (term_indent is None or indent <= term_indent):
            term_indent = len(match.group(1))
            out += [".TP", _bold(match.group(2)), escape(match.group(3))]
        elif term_indent is not None and indent > term_indent:
            out.append(escape(line.strip()))
        else:
            term_indent = None
            out += [".PP", ".RS", ".nf", escape(line.strip()), ".fi", ".RE"]
    flush_prose()
    return out


def _text_sections(text: str | None) -> tuple[list[str], dict[str, list[str]]]:
    """A description or epilog → (roff for where it stands, roff of named sections)."""
    here: list[str] = []
    sections: dict[str, list[str]] = {}
    for block in _paragraphs(text or ""):
        inline = _INLINE_HEAD.match(block.lines[0]) if block.heading is None else None
        if inline and _section_for(inline.group(1)):
            # "Exit status: what it is; ..." as one paragraph of prose
            block = _Block(inline.group(1), [inline.group(2), *block.lines[1:]])
        section = _section_for(block.heading)
        if section is not None:
            sections.setdefault(section, []).extend(_lines_to_roff(block.lines))
            continue
        if block.heading is not None:
            here += [".PP", escape(block.heading + ":")]
        here += _lines_to_roff(block.lines)
    return here, sections


def _expand_help(action: argparse.Action, prog: str) -> str:
    """argparse's %-expansion of a help string (%(default)s, %(prog)s, %(choices)s...)."""
    help_text = action.help or ""
    if "%" not in help_text:
        return help_text
    params: dict[str, object] = {
        k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS
    }
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in action.choices or ())
    return help_text % params


def _option_term(action: argparse.Action) -> str:
    if not action.option_strings:
        return _bold(action.metavar if isinstance(action.metavar, str) else action.dest)
    if action.nargs == 0:
        return ", ".join(_bold(o) for o in action.option_strings)
    if isinstance(action.metavar, str):
        metavar = action.metavar
    elif action.choices is not None:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        metavar = action.dest.upper()
    value = f"[{metavar}]" if action.nargs == "?" else metavar
    joiner = "=" if action.nargs == "?" else " "
    return ", ".join(_bold(o) + escape(joiner) + _italic(value) for o in action.option_strings)


def _groups(parser: argparse.ArgumentParser) -> list[tuple[str, list[argparse.Action]]]:
    # argparse has no public view of its groups; every man page generator reads these two
    out: list[tuple[str, list[argparse.Action]]] = []
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)
        ]
        if actions:
            out.append((group.title or "options", actions))
    return out


def _subcommands(
    parser: argparse.ArgumentParser,
) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, the one-line help `PROG --help` lists it with) of each subcommand."""
    out: list[tuple[str, argparse.ArgumentParser, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._get_subactions()}
            out += [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return out


def _options_roff(parser: argparse.ArgumentParser, level: str = ".SS") -> list[str]:
    out: list[str] = []
    for title, actions in _groups(parser):
        out.append(f'{level} "{escape(title[:1].upper() + title[1:])}"')
        for action in actions:
            out += [".TP", _option_term(action)]
            help_text = _expand_help(action, parser.prog)
            out.append(escape(help_text) if help_text else "")
    return out


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().strip()
    return re.sub(r"\s+", " ", usage.removeprefix("usage:").strip())


@dataclass(frozen=True)
class Page:
    """One manual page: NAME's summary, the parser --help prints, and where to look next."""

    name: str
    summary: str
    parser: Callable[[], argparse.ArgumentParser]
    see_also: tuple[str, ...] = ()
    section: str = "1"


def render(page: Page, version: str, date: str) -> str:
    parser = page.parser()
    parser.prog = page.name.replace("nestbed-image", "nestbed image")
    description, sections = _text_sections(parser.description)
    epilog, epilog_sections = _text_sections(parser.epilog)
    for name, lines in epilog_sections.items():
        sections.setdefault(name, []).extend(lines)
    title = page.name.upper()
    out = [
        f'.TH {escape(title)} {page.section} "{date}" "nestbed {escape(version)}" "nestbed manual"',
        ".nh",  # option names and paths are never hyphenated
        ".SH NAME",
        f"{escape(page.name)} \\- {escape(page.summary)}",
        ".SH SYNOPSIS",
        ".ad l",
        escape(_usage(parser)),
        ".ad",
        ".SH DESCRIPTION",
        *description,
        *epilog,
        ".SH OPTIONS",
        *_options_roff(parser),
    ]
    for sub_name, sub, sub_help in _subcommands(parser):
        out += [f'.SH "{escape(sub_name.upper())}"', ".PP", _bold(_usage(sub))]
        sub_description, sub_sections = _text_sections(sub.description or sub_help)
        out += sub_description
        if sub.epilog != parser.epilog:  # the subcommands often repeat the command's
            sub_epilog, epilog_sections = _text_sections(sub.epilog)
            out += sub_epilog
            sub_sections |= epilog_sections
        out += _options_roff(sub)
        for name, lines in sub_sections.items():
            sections.setdefault(name, []).extend(lines)
    for name in ("EXIT STATUS", "EXAMPLES"):
        if name in sections:
            out += [f'.SH "{name}"', *sections[name]]
    if page.see_also:
        out += [".SH SEE ALSO", ",\n".join(_see_also(ref) for ref in page.see_also)]
    return "\n".join(out) + "\n"


def _see_also(ref: str) -> str:
    name, _, section = ref.partition("(")
    return f".BR {escape(name)} ({section}"


def _runner_parser() -> argparse.ArgumentParser:
    from nestbed.cli import build_parser

    return build_parser()


def _image_parser() -> argparse.ArgumentParser:
    from nestbed.image.cli import build_parser

    return build_parser()


def _vm_parser() -> argparse.ArgumentParser:
    from nestbed.nestvm import build_parser

    return build_parser()


def _server_parser(module: str, cls: str) -> Callable[[], argparse.ArgumentParser]:
    def make() -> argparse.ArgumentParser:
        import importlib

        from nestbed.testbed.protocol import server_parser

        server_class = getattr(importlib.import_module(module), cls)
        parser: argparse.ArgumentParser = server_parser(server_class)
        return parser

    return make


_SERVERS = ("nestbed-virt-null(1)", "nestbed-virt-unshare(1)", "nestbed-virt-qemu(1)")

PAGES: tuple[Page, ...] = (
    Page(
        "nestbed",
        "run a Debian package's as-installed tests (DEP-8), a drop-in for autopkgtest",
        _runner_parser,
        ("nestbed-image(1)", *_SERVERS, "nestbed-vm(1)", "autopkgtest(1)"),
    ),
    Page(
        "nestbed-image",
        "build and manage bootable Debian images for nestbed's QEMU testbeds",
        _image_parser,
        ("nestbed(1)", "nestbed-virt-qemu(1)", "mmdebstrap(1)"),
    ),
    Page(
        "nestbed-virt-null",
        "virt server: the host itself as the testbed",
        _server_parser("nestbed.virt.null", "NullServer"),
        ("nestbed(1)", "autopkgtest-virt-null(1)"),
    ),
    Page(
        "nestbed-virt-unshare",
        "virt server: a throwaway container (Linux namespaces) as the testbed",
        _server_parser("nestbed.virt.unshare", "UnshareServer"),
        ("nestbed(1)", "autopkgtest-virt-unshare(1)", "mmdebstrap(1)"),
    ),
    Page(
        "nestbed-virt-qemu",
        "virt server: a throwaway QEMU virtual machine as the testbed",
        _server_parser("nestbed.virt.qemu", "QemuServer"),
        ("nestbed(1)", "nestbed-image(1)", "autopkgtest-virt-qemu(1)"),
    ),
    Page(
        "nestbed-vm",
        "boot the testbed's base image as a VM of a nested test's own",
        _vm_parser,
        ("nestbed(1)", "nestbed-virt-qemu(1)"),
    ),
)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("nestbed")
    except metadata.PackageNotFoundError:
        return "unknown"


def _date() -> str:
    # reproducible builds: the changelog's date when the build says so
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch and epoch.isdigit()
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%d")


def write_all(directory: str, version: str | None = None) -> list[str]:
    """Write every page into directory; return their paths."""
    os.makedirs(directory, exist_ok=True)
    version, date = version or _version(), _date()
    paths = []
    for page in PAGES:
        path = os.path.join(directory, f"{page.name}.{page.section}")
        with open(path, "w", encoding="UTF-8") as f:
            f.write(render(page, version, date))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m nestbed.manpage", description="write nestbed's manual pages"
    )
    parser.add_argument("--version", help="the version the pages name (default: installed)")
    parser.add_argument("directory", metavar="OUTDIR")
    args = parser.parse_args(argv)
    for path in write_all(args.directory, args.version):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
