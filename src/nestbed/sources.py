"""What the user asked to test: positional arguments, classified as autopkgtest does.

Order of the checks (autopkgtest's): .changes files are expanded into what they list;
an existing .deb is a binary to test instead of the archive's; an existing .dsc is a
source package; a word that could be a package name is an apt source package; a
directory with debian/control is an unbuilt tree (built if debian/files exists); a
directory with only debian/tests/control is a built tree; a URL is a git repository.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from debian.deb822 import Changes, Dsc

from nestbed.errors import BadPackage, UsageError
from nestbed.run.options import PackageArg

PACKAGE_NAME = re.compile(r"[0-9a-z][0-9a-z.+-]+$")


def _listed_files(path: str, kind: type[Dsc] | type[Changes]) -> list[str]:
    try:
        with open(path, encoding="UTF-8", errors="replace") as f:
            record = kind(f)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    files = record.get("Files")
    if not files:
        raise BadPackage(f"{path} is invalid and does not contain Files:")
    directory = os.path.dirname(path)
    return [os.path.join(directory, f["name"]) for f in files if "." in f["name"]]


def files_from_dsc(path: str) -> list[str]:
    """The files a .dsc names, next to it; a missing one is the package's fault."""
    files = _listed_files(path, Dsc)
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        names = ", ".join(os.path.basename(m) for m in missing)
        raise BadPackage(f"{path} names files that are not next to it: {names}")
    return files


def classify(args: Sequence[str], built_binaries: bool) -> tuple[PackageArg, ...]:
    """Binaries first, then the one source package (or the current directory)."""
    expanded: list[str] = []
    for arg in args:
        expanded += _listed_files(arg, Changes) if arg.endswith(".changes") else [arg]
    binaries: list[PackageArg] = []
    source: PackageArg | None = None

    def set_source(kind: str, path: str, built: bool | None) -> None:
        nonlocal source
        if source is not None:
            raise UsageError("You must specify only one source package to test")
        source = PackageArg(kind, path, built_binaries if built is None else built)

    for arg in expanded:
        if arg.endswith(".deb") and os.path.exists(arg):
            binaries.append(PackageArg("binary", arg, False))
        elif arg.endswith(".dsc") and os.path.exists(arg):
            set_source("source", arg, None)
        elif PACKAGE_NAME.match(arg) and not os.path.exists(arg):
            set_source("apt-source", arg, False)
        elif os.path.isfile(os.path.join(arg, "debian", "control")):
            built = os.path.exists(os.path.join(arg, "debian", "files"))
            set_source("built-tree" if built else "unbuilt-tree", arg, False if built else None)
        elif os.path.isfile(os.path.join(arg, "debian", "tests", "control")):
            set_source("built-tree", arg, False)
        elif "://" in arg:
            set_source("git-source", arg, None)
        elif arg.endswith((".deb", ".dsc", ".changes")):
            raise UsageError(f"{arg} is not a valid test package: no such file")
        elif os.path.isdir(arg):
            raise UsageError(f"{arg} is not a valid test package: it has no debian/control")
        else:
            raise UsageError(f"{arg} is not a valid test package: no such directory")
    if source is None and os.path.isfile(os.path.join("debian", "control")):
        built = os.path.exists(os.path.join("debian", "files"))
        set_source("built-tree" if built else "unbuilt-tree", os.curdir, False if built else None)
    if source is None:
        raise UsageError(
            "no source package given: name a source tree, a .dsc, a source package or a git URL"
        )
    if binaries:
        # the given binaries are what is tested: no build for them
        source = PackageArg(source.kind, source.path, False)
    return (*binaries, source)
