"""Building the package in the testbed (dpkg-buildpackage, build dependencies first)."""

from __future__ import annotations

import os
import re
import shlex

from nestbed.capabilities import Cap
from nestbed.errors import BadPackage, TestbedFailure
from nestbed.log import Console
from nestbed.run import deps
from nestbed.run.executor import NOTES_MARKER
from nestbed.spec.depends import SourcePackage
from nestbed.testbed.client import Testbed, su_argv

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
    wrapper: str,
    gain_root: str | None = None,
) -> list[str]:
    """dpkg-buildpackage in the testbed tree; returns the testbed paths of the built .debs.
    `gain_root` (--gain-root) is dpkg-buildpackage's -r; without it a build that is not
    root's gets fakeroot.

    It runs under the tests' wrapper (`wrapper`, run/wrapper.sh): the build is over when
    its main process is, and a background process it left holding its output (`(sleep
    300 &)` in debian/rules) is killed then, instead of keeping the command open until
    the build timeout. autopkgtest's exec prefixes end when the main process does, too."""
    root = Cap.ROOT_ON_TESTBED in testbed.caps
    build_deps = SourcePackage(tree_host, arch).build_depends()
    if not gain_root and (user or not root):
        build_deps.append("fakeroot")
    deps.install(testbed, tuple(build_deps), console, install_timeout, what=tree_host)
    q = shlex.quote
    script = "; ".join(
        [
            "exec 3>&1 >&2",
            f"cd {q(tree_tb)}",
            *(f"export {q(e)}" for e in extra_env),
            f'DEB_BUILD_OPTIONS="parallel={q(parallel)} $DEB_BUILD_OPTIONS" '
            "dpkg-buildpackage -us -uc -b" + (f" -r{q(gain_root)}" if gain_root else ""),
            "dpkg-source --before-build .",  # keep patches applied for the tests
            "cd ..",
            "ls -1 -- *.deb >&3 2>/dev/null || true",
        ]
    )
    log = f"{testbed.scratch}/build-wrapper.log"
    argv = [wrapper, log, "0", "sh", "-ec", script]
    if user and root:
        argv = su_argv(user, shlex.join(argv))
    result = testbed.execute(argv, timeout=build_timeout)
    stderr, marker, notes = result.stderr.partition(NOTES_MARKER)
    console.write_stderr(stderr)
    for note in notes.decode("UTF-8", "replace").splitlines() if marker else ():
        console.info(f"build: {note}")
    if result.returncode == 100:
        raise TestbedFailure("rules build failed with exit code 100 (apt failure)")
    if result.returncode != 0:
        raise BadPackage(f"rules build failed with exit code {result.returncode}")
    built: list[str] = []
    parent = os.path.dirname(tree_tb.rstrip("/"))
    for name in result.stdout.decode("UTF-8", "replace").split():
        if not DEB_NAME.match(name):
            raise BadPackage(f"badly-named binary `{name}'")
        built.append(f"{parent}/{name}")
    return built
