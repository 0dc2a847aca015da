"""The restrictions a run's tests declare, read on the host before any testbed exists.

Some choices are made before the testbed opens: whether the QEMU testbed exports its base
image (a test declares needs-baseimage), and which image boots when no testbed is named.
The control file is parsed properly later, in the testbed's copy of the tree; this is a
tolerant early look that errs on the side of "declared", never an error of its own.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable

from debian.deb822 import Deb822

from nestbed.errors import NestbedError
from nestbed.run.options import PackageArg
from nestbed.sources import files_from_dsc

CONTROL = "debian/tests/control"
_DEBIAN_TARBALL = re.compile(r"\.debian\.tar\.(gz|xz|bz2|lzma)$")
_ORIG_OR_NATIVE = re.compile(r"\.tar\.(gz|xz|bz2|lzma)$")


def declared_restrictions(packages: Iterable[PackageArg]) -> frozenset[str]:
    """Every restriction any test of the given source packages declares, as far as the
    host can see; sources fetched inside the testbed (apt, git) contribute nothing."""
    found: set[str] = set()
    for package in packages:
        text = _control_text(package)
        if text:
            found |= _restrictions(text)
    return frozenset(found)


def _control_text(package: PackageArg) -> str | None:
    try:
        if package.kind in ("unbuilt-tree", "built-tree"):
            with open(os.path.join(package.path, CONTROL), encoding="utf-8") as f:
                return f.read()
        if package.kind == "source":
            return _control_from_dsc(package.path)
    except (OSError, UnicodeDecodeError, tarfile.TarError, NestbedError):
        return None
    return None


def _control_from_dsc(dsc: str) -> str | None:
    """debian/tests/control from a .dsc's debian tarball (3.0 quilt) or its only tarball
    (native); None when it has none."""
    tarballs = [f for f in files_from_dsc(dsc) if _ORIG_OR_NATIVE.search(f)]
    tarballs.sort(key=lambda f: not _DEBIAN_TARBALL.search(f))  # the debian tarball first
    for tarball in tarballs:
        with tarfile.open(tarball) as tf:
            for member in tf:
                parts = member.name.lstrip("./").split("/")
                # debian/tests/control at the top (debian tarball) or one level down (native)
                if member.isfile() and "/".join(parts[-3:]) == CONTROL and len(parts) <= 4:
                    data = tf.extractfile(member)
                    return data.read().decode("utf-8") if data is not None else None
    return None


def _restrictions(text: str) -> set[str]:
    found: set[str] = set()
    for paragraph in Deb822.iter_paragraphs(text.splitlines(keepends=True)):
        for key, value in paragraph.items():
            if key.lower() == "restrictions":
                found |= {r for r in re.split(r"[\s,]+", value) if r}
    return found
