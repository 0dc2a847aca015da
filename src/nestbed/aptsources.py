"""The machine's apt sources, read as apt reads them: deb822 `.sources` files and the
one-line `sources.list` format. Shared by the image builder and the runner's testbed setup."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from debian.deb822 import Deb822

APT_ETC = Path("/etc/apt")


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]

    def lines(self) -> list[str]:
        comps = " ".join(self.components)
        return [f"deb {self.uri} {suite} {comps}" for suite in self.suites]


def _parse_deb822(text: str) -> list[AptSource]:
    found = []
    for para in Deb822.iter_paragraphs(text.splitlines()):
        if "deb" not in para.get("Types", "").split():
            continue
        if para.get("Enabled", "yes").strip().lower() == "no":
            continue
        comps = tuple(para.get("Components", "main").split())
        for uri in para.get("URIs", "").split():
            found.append(AptSource(uri.rstrip("/"), tuple(para.get("Suites", "").split()), comps))
    return found


def _parse_one_line(text: str) -> list[AptSource]:
    found = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)  # options like [signed-by=...]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            found.append(
                AptSource(words[1].rstrip("/"), (words[2],), tuple(words[3:]) or ("main",))
            )
    return found


def host_sources(etc: Path = APT_ETC) -> list[AptSource]:
    """The enabled binary (`deb`) entries of the machine's apt configuration, in apt's order."""
    found: list[AptSource] = []
    one_line = etc / "sources.list"
    if one_line.is_file():
        found += _parse_one_line(one_line.read_text(errors="replace"))
    parts = etc / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".sources":
                found += _parse_deb822(path.read_text(errors="replace"))
            elif path.suffix == ".list":
                found += _parse_one_line(path.read_text(errors="replace"))
    return found
