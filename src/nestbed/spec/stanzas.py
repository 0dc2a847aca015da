"""deb822 files read the way autopkgtest reads them, but with line numbers.

autopkgtest (testdesc.parse_rfc822) drops comment lines and anything after a '#',
hands the rest to python-debian's Deb822 and then joins continuation lines. python-debian
does not report line numbers and silently ignores lines it cannot place, so we walk the
lines ourselves to find stanzas, field lines and syntax errors, and let Deb822 turn each
stanza into values, so that values are exactly what autopkgtest sees.

What python-debian does with lines that are not deb822, and so what autopkgtest sees:
a line with no colon is ignored (a continuation line after it still continues the field
before it); a continuation line before any field of its stanza is ignored; a stanza with
no field at all ends the file (python-debian's iter_paragraphs stops at the first empty
paragraph), so every stanza after it is ignored too. Without `strict` we do the same and
report each such line through `warnings`.
"""

from __future__ import annotations

import io
import os
import re
import string
from dataclasses import dataclass, field

from debian.deb822 import Deb822

from nestbed.errors import InvalidControl

# python-debian decides "blank line" on the encoded bytes, i.e. ASCII whitespace only;
# the same characters may not appear in a field name.
_ASCII_SPACE = frozenset(" \t\n\r\x0b\x0c")
# python-debian's PGP armour lines (Deb822._gpgre): they change how it splits stanzas
_PGP_ARMOUR = re.compile(r"-----(BEGIN|END) PGP [^-]+-----[\r\t ]*$")


@dataclass(frozen=True)
class Oddity:
    """A line autopkgtest reads differently from how it looks: ignored, or the rest of
    the file ignored after it."""

    line: int
    message: str


@dataclass(frozen=True)
class Field:
    name: str  # as written in the file (the last occurrence if repeated)
    value: str  # continuation lines joined, as autopkgtest joins them
    line: int


@dataclass
class Stanza:
    line: int
    # Keyed by string.capwords(name), which is how autopkgtest names fields
    # ("Test-Command" and "test-command" are both "Test-command").
    fields: dict[str, Field] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: str) -> str:
        found = self.fields.get(key)
        return default if found is None else found.value

    def line_of(self, key: str) -> int:
        found = self.fields.get(key)
        return self.line if found is None else found.line


def read_stanzas(
    path: str | os.PathLike[str],
    display: str,
    *,
    strict: bool,
    warnings: list[Oddity] | None = None,
) -> list[Stanza] | None:
    """Stanzas of the file at `path`, or None if it does not exist.

    Raises InvalidControl (naming `display`) if the file cannot be read or is not UTF-8,
    and, when `strict`, for lines that are neither a field, a continuation nor a comment.
    Without `strict` such lines are dropped, as python-debian drops them, and each is
    added to `warnings` if given.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidControl(display, None, None, f"cannot read file: {e.strerror or e}") from e
    except ValueError as e:  # e.g. a NUL byte in the path
        raise InvalidControl(display, None, None, f"cannot read file: {e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        good = data[: e.start].decode("utf-8")
        # universal newlines, as autopkgtest's open() counts them
        line = good.count("\n") + good.count("\r") - good.count("\r\n") + 1
        raise InvalidControl(
            display, line, None, f"not valid UTF-8 (byte {data[e.start]:#04x})"
        ) from e
    return parse_stanzas(text, display, strict=strict, warnings=warnings)


def _strip_comment(line: str) -> str | None:
    """The line without its comment, or None if nothing is left to parse."""
    # A line starting with '#' goes entirely; elsewhere '#' starts a comment too, and a
    # line left blank by that goes entirely so that it does not split the stanza.
    if line.startswith("#"):
        return None
    if "#" in line:
        line = line.split("#", 1)[0]
        if not line.strip():
            return None
    return line


def _field_name(line: str) -> str | None:
    """The field name if `line` starts a field ("Name: value"), else None.

    Same answer as python-debian's `^[^: \\t\\n\\r\\f\\v]+\\s*:` on the line, computed without
    the regex, which backtracks quadratically on long lines of Unicode spaces.
    """
    colon = line.find(":")
    if colon <= 0:
        return None
    prefix = line[:colon]
    end = next((i for i, c in enumerate(prefix) if c in _ASCII_SPACE), colon)
    if end == 0:
        return None
    rest = prefix[end:]
    if rest and not rest.isspace():
        return None
    return prefix[:end]


def parse_stanzas(
    text: str, display: str, *, strict: bool, warnings: list[Oddity] | None = None
) -> list[Stanza]:
    stanzas: list[Stanza] = []
    pending: list[tuple[int, str]] = []
    oddities: list[Oddity] = [] if warnings is None else warnings
    ended_at = 0  # the line of a stanza without fields: python-debian reads no further

    def flush() -> None:
        nonlocal ended_at
        if not pending:
            return
        if ended_at:
            oddities.append(
                Oddity(
                    pending[0][0],
                    f"stanza ignored, as autopkgtest ignores it: the stanza at line {ended_at}"
                    " has no field, and python-debian reads no further",
                )
            )
        else:
            stanza = _build_stanza(pending, display, strict=strict, oddities=oddities)
            if stanza is not None:
                stanzas.append(stanza)
            elif not strict:
                ended_at = pending[0][0]
        pending.clear()

    # newline=None: the universal newlines of open() in text mode, which autopkgtest uses
    for number, raw in enumerate(io.StringIO(text, newline=None), start=1):
        line = _strip_comment(raw)
        if line is None:
            continue
        line = line.strip("\r\n")
        if line.startswith("-") and _PGP_ARMOUR.match(line):
            raise InvalidControl(
                display, number, None, "PGP armour (a signed file) is not supported here"
            )
        if not line or all(c in _ASCII_SPACE for c in line):
            flush()
        else:
            pending.append((number, line))
    flush()
    return stanzas


def _odd_line_break(lines: list[tuple[int, str]]) -> tuple[int, str | None]:
    """The first line with a character that str.splitlines() breaks at, and the character."""
    for number, line in lines:
        for char in line:
            if len(f"x{char}x".splitlines()) > 1:
                return number, char
    return lines[0][0], None


@dataclass
class _Occurrence:
    name: str
    line: int
    # indexes (1-based, 0 is the first line) of continuation lines we padded for Deb822
    padded: list[int] = field(default_factory=list)
    continuations: int = 0


def _build_stanza(
    lines: list[tuple[int, str]], display: str, *, strict: bool, oddities: list[Oddity]
) -> Stanza | None:
    occurrences: list[_Occurrence] = []
    kept: list[str] = []
    for number, line in lines:
        name = _field_name(line)
        if name is not None:
            occurrences.append(_Occurrence(name, number))
            kept.append(line)
        elif line[0].isspace() and not line.isspace():
            if occurrences:
                current = occurrences[-1]
                current.continuations += 1
                if line[0] not in _ASCII_SPACE:
                    # Deb822's field regex backtracks quadratically over a long run of
                    # non-ASCII spaces; a leading ASCII space makes it fail at once.
                    current.padded.append(current.continuations)
                    line = " " + line
                kept.append(line)
            elif strict:
                raise InvalidControl(
                    display,
                    number,
                    None,
                    "continuation line (starting with a space) before any field",
                )
            else:
                oddities.append(
                    Oddity(
                        number,
                        "continuation line (starting with a space) before any field:"
                        " ignored, as autopkgtest ignores it",
                    )
                )
        elif line.isspace():
            continue  # only non-ASCII spaces: python-debian skips it without ending the stanza
        elif strict:
            raise InvalidControl(
                display,
                number,
                None,
                f"syntax error: {line!r} is not 'Field: value', a continuation line "
                "(starting with a space) or a comment",
            )
        else:
            oddities.append(
                Oddity(
                    number,
                    f"{line!r} is not 'Field: value', a continuation line (starting with a"
                    " space) or a comment: ignored, as autopkgtest ignores it",
                )
            )
    if not occurrences:
        return None

    try:
        paragraph = Deb822(kept)
    except ValueError as e:
        # python-debian re-splits multi-line values with str.splitlines(), which also
        # breaks at \f, \v, \x1c-\x1e, \x85, U+2028 and U+2029, and then rejects the
        # pieces (autopkgtest crashes here).
        number, char = _odd_line_break(lines)
        message = f"unsupported line break character {char!r} in a field" if char else str(e)
        raise InvalidControl(display, number, None, message) from e
    # Deb822 keeps the last of repeated (case-insensitive) fields; so do we.
    last = {occurrence.name.lower(): occurrence for occurrence in occurrences}
    stanza = Stanza(line=lines[0][0])
    for occurrence in occurrences:
        value = paragraph.get(occurrence.name)
        if value is None:  # cannot happen: we and python-debian agree on field lines
            if strict:
                raise InvalidControl(display, occurrence.line, occurrence.name, "cannot parse")
            continue
        parts = str(value).split("\n")
        for index in last[occurrence.name.lower()].padded:
            if index < len(parts):
                parts[index] = parts[index][1:]
        # autopkgtest drops the newlines of continuations and then halves runs of spaces
        joined = "".join(parts).replace("  ", " ")
        stanza.fields[string.capwords(occurrence.name)] = Field(
            occurrence.name, joined, occurrence.line
        )
    return stanza
