"""Installing a test's dependencies in the testbed with apt."""

from __future__ import annotations

import shlex

from nestbed.capabilities import Cap
from nestbed.errors import BadPackage
from nestbed.log import Console
from nestbed.testbed.client import Testbed

UNSATISFIABLE = (
    "Test dependencies are unsatisfiable. A common reason is that your testbed is out of "
    "date with respect to the archive, and you need to use a current testbed or run "
    "apt-get update or use -U."
)


class NotInstallable(BadPackage):
    """Test dependencies cannot be installed: the test is FAIL badpkg (or SKIPped)."""


def can_use_apt(testbed: Testbed) -> bool:
    if Cap.ROOT_ON_TESTBED not in testbed.caps:
        return False
    return testbed.execute(["test", "-w", "/var/lib/dpkg/status"], timeout=100).returncode == 0


def install(
    testbed: Testbed,
    depends: tuple[str, ...],
    console: Console,
    timeout: int,
    what: str = "install-deps",
) -> None:
    """Install `depends` (relations with alternatives, already reduced for the testbed's
    architecture) or raise NotInstallable.

    With root, apt-get satisfy resolves the relations as apt would for a package's
    Depends; apt's own lines (stdout and stderr, in order) go to our stdout, where
    autopkgtest puts them. Without root, nothing can be installed: check they are there.
    `what` names the step in -d's lines, as autopkgtest's (install-deps, or the package).
    """
    if not depends:
        return
    relations = ", ".join(d.replace(":native", "") for d in depends)
    console.debug(f"{what}: satisfying {relations}")
    apt = can_use_apt(testbed)
    console.debug(f"can use apt-get on testbed: {apt}")
    if apt:
        script = (
            "apt-get satisfy --assume-yes --no-install-recommends "
            "-o Dpkg::Options::=--force-confnew -o DPkg::Lock::Timeout=600 "
            f"-- {shlex.quote(relations)} 2>&1"
        )
        result = testbed.execute(
            ["sh", "-c", script],
            timeout=timeout,
            capture=True,
            env={"DEBIAN_FRONTEND": "noninteractive"},
        )
        console.write_stdout(result.stdout)
        console.write_stderr(result.stderr)  # the shell's own, if anything
        if result.returncode != 0:
            raise NotInstallable(UNSATISFIABLE)
        return
    check = testbed.execute(["dpkg-checkbuilddeps", "-d", relations, "/dev/null"], timeout=timeout)
    if check.returncode == 127:
        console.warning(
            f"test dependencies ({relations}) are not fully satisfied, but continuing anyway "
            "since dpkg-checkbuilddeps is not available to determine which ones are missing."
        )
    elif check.returncode != 0:
        missing = check.stderr.decode("UTF-8", "replace").strip()
        missing = missing.replace("dpkg-checkbuilddeps: error: Unmet build dependencies: ", "")
        raise NotInstallable(f"test dependencies missing: {missing}")
