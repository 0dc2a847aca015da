"""Building the package in the testbed, and offering its .debs to apt there.

The built binaries go into a flat local apt repository in the testbed, pinned above every
other source by exact version, so that `@` in a test's Depends installs what was just built.
"""

from __future__ import annotations

import os
import re
import shlex

from nestbed.errors import BadPackage, TestbedFailure
from nestbed.log import Console
from nestbed.run import deps
from nestbed.spec.depends import SourcePackage
from nestbed.testbed.client import Testbed

DEB_NAME = re.compile(r"^([-+.0-9a-z]+)_([^_/]+)_[^_/]+\.deb$")


def build(
    testbed: Testbed,
    tree_host: str,
    tree_tb: str,
    arch: str,
    user: str | None,
    console: Console,
    *,
    parallel: str,
    extra_env: tuple[str, ...],
    install_timeout: int,
    build_timeout: int,
    publish: bool,
) -> list[tuple[str, str]]:
    """dpkg-buildpackage in the testbed tree; returns (package, version) of each built .deb.

    With `publish`, apt in the testbed prefers exactly these binaries from then on.
    """
    root = "root-on-testbed" in testbed.caps
    build_deps = SourcePackage(tree_host, arch).build_depends()
    if user or not root:
        build_deps.append("fakeroot")
    deps.install(testbed, tuple(build_deps), console, install_timeout)
    q = shlex.quote
    script = "; ".join(
        [
            "exec 3>&1 >&2",
            f"cd {q(tree_tb)}",
            *(f"export {q(e)}" for e in extra_env),
            f'DEB_BUILD_OPTIONS="parallel={q(parallel)} $DEB_BUILD_OPTIONS" '
            "dpkg-buildpackage -us -uc -b",
            "dpkg-source --before-build .",  # keep patches applied for the tests
            "cd ..",
            "ls -1 -- *.deb >&3 2>/dev/null || true",
        ]
    )
    argv = ["sh", "-ec", script]
    if user and root:
        argv = ["su", "--shell=/bin/sh", user, "-c", f"set -e; {script}"]
    result = testbed.execute(argv, timeout=build_timeout)
    console.write_stderr(result.stderr)
    if result.returncode == 100:
        raise TestbedFailure("rules build failed with exit code 100 (apt failure)")
    if result.returncode != 0:
        raise BadPackage(f"rules build failed with exit code {result.returncode}")
    built: list[tuple[str, str]] = []
    for name in result.stdout.decode("UTF-8", "replace").split():
        m = DEB_NAME.match(name)
        if not m:
            raise BadPackage(f"badly-named binary `{name}'")
        built.append((m.group(1), m.group(2)))
    if built and publish:
        _publish(testbed, os.path.dirname(tree_tb.rstrip("/")), built, install_timeout)
    return built


def _publish(testbed: Testbed, debdir: str, built: list[tuple[str, str]], timeout: int) -> None:
    """A flat apt repository over the build directory, pinned to exactly these versions."""
    if "root-on-testbed" not in testbed.caps:
        return
    q = shlex.quote
    pins = "\n".join(
        f"Package: {name}\nPin: version {version}\nPin-Priority: 1002\n" for name, version in built
    )
    script = "; ".join(
        [
            "set -e",
            f"cd {q(debdir)}",
            "dpkg-scanpackages --multiversion . /dev/null > Packages 2>/dev/null",
            f"echo 'deb [trusted=yes] file://{debdir} ./' "
            "> /etc/apt/sources.list.d/nestbed-built.list",
            f"printf '%s' {q(pins)} > /etc/apt/preferences.d/nestbed-built",
            "apt-get update -o Dir::Etc::sourcelist=sources.list.d/nestbed-built.list "
            "-o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0 >&2",
        ]
    )
    result = testbed.execute(["sh", "-c", script], timeout=timeout)
    if result.returncode != 0:
        err = result.stderr.decode("UTF-8", "replace").strip()
        raise TestbedFailure(f"publishing the built packages in the testbed failed: {err}")


def unpublish(testbed: Testbed, timeout: int) -> None:
    """Take the local repository away again (the null testbed is the user's own machine)."""
    testbed.execute(
        [
            "rm",
            "-f",
            "/etc/apt/sources.list.d/nestbed-built.list",
            "/etc/apt/preferences.d/nestbed-built",
        ],
        timeout=timeout,
    )
