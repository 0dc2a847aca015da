"""The package's source tree: copied into the testbed, named and versioned."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from debian.changelog import Changelog, ChangelogParseError

from nestbed.errors import BadPackage, TestbedFailure
from nestbed.run.options import PackageArg
from nestbed.testbed.client import Testbed


@dataclass(frozen=True)
class SourceTree:
    host: str  # the tree on the host: where debian/tests/control is read
    testbed: str  # the copy in the testbed: where tests run
    name: str
    version: str


def read_name_version(tree: str) -> tuple[str, str]:
    path = os.path.join(tree, "debian", "changelog")
    try:
        with open(path, encoding="UTF-8", errors="replace") as f:
            changelog = Changelog(f, max_blocks=1, strict=True)
        return str(changelog.package), str(changelog.version)
    except FileNotFoundError:
        raise BadPackage(f"{path} does not exist") from None
    except (ChangelogParseError, ValueError, IndexError) as e:
        raise BadPackage(f"{path}: cannot parse the first entry: {e}") from None


def prepare(testbed: Testbed, package: PackageArg, copy_timeout: int) -> SourceTree:
    """Put the tree into the testbed; the user's own tree is never written to."""
    host = os.path.abspath(package.path)
    if package.kind == "built-tree":
        name, version = (
            read_name_version(host)
            if os.path.exists(os.path.join(host, "debian", "changelog"))
            else ("", "")
        )
        tb = f"{testbed.scratch}/tree"
        testbed.copydown(host + "/", tb + "/", timeout=copy_timeout)
        return SourceTree(host, tb, name, version)

    name, version = read_name_version(host)
    staged = f"{testbed.scratch}/ubtree-{os.path.basename(host)}"
    testbed.copydown(host + "/", staged + "/", timeout=copy_timeout)
    # a private copy in a fresh build dir, with patches applied as dpkg-source would
    script = "; ".join(
        [
            "set -e",
            f"builddir=$(mktemp -d {shlex.quote(testbed.scratch)}/build.XXX)",
            'cd "$builddir"',
            f"cp -rd --preserve=timestamps -- {shlex.quote(staged)} real-tree",
            "if [ -x real-tree/debian/rules ] && command -v dpkg-source >/dev/null; then"
            " dpkg-source --before-build real-tree >&2; fi",
            "chmod -R a+rX .",
            'echo "$builddir/real-tree"',
        ]
    )
    result = testbed.execute(["sh", "-c", script], timeout=copy_timeout)
    if result.returncode != 0:
        err = result.stderr.decode("UTF-8", "replace").strip()
        raise TestbedFailure(f"preparing the source tree in the testbed failed: {err}")
    tb = result.stdout.decode("UTF-8", "replace").strip().splitlines()[-1]
    return SourceTree(host, tb, name, version)
