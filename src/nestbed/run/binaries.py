"""Binary packages to test instead of the archive's: given .debs and freshly built ones.

They are offered to apt in the testbed as a flat local repository, pinned above every
other source by exact version, so that a test's `@` (and anything depending on these
packages) installs exactly them. Published again after every revert.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
from dataclasses import dataclass

from debian.deb822 import Deb822

from nestbed.capabilities import Cap
from nestbed.errors import BadPackage, TestbedFailure
from nestbed.proc import run
from nestbed.testbed.client import Testbed

SOURCES_LIST = "/etc/apt/sources.list.d/nestbed-binaries.list"
PREFERENCES = "/etc/apt/preferences.d/nestbed-binaries"


@dataclass(frozen=True)
class Binary:
    path: str  # on the host
    name: str
    version: str
    control: str  # its control stanza, for the repository's Packages index


def inspect(path: str) -> Binary:
    """A .deb's control stanza, or BadPackage when it is not a .deb."""
    result = run(["dpkg-deb", "--field", path], check=False)
    fields = Deb822(result.stdout_text) if result.returncode == 0 else Deb822()
    if "Package" not in fields or "Version" not in fields:
        why = result.stderr_text.strip().splitlines()[-1:] or ["no Package or Version field"]
        raise BadPackage(f"failed to parse binary package {path}: {why[0]}")
    return Binary(path, fields["Package"], fields["Version"], result.stdout_text.strip())


def packages_index(binaries: list[Binary]) -> str:
    """The Packages file of a flat repository: made here, so the testbed needs no tools."""
    stanzas = []
    for b in binaries:
        with open(b.path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        stanzas.append(
            f"{b.control}\nFilename: ./{os.path.basename(b.path)}\n"
            f"Size: {os.path.getsize(b.path)}\nSHA256: {digest}\n"
        )
    return "\n".join(stanzas)


class Binaries:
    def __init__(self) -> None:
        self.registered: list[Binary] = []

    def register(self, path: str) -> Binary:
        binary = inspect(path)
        self.registered = [b for b in self.registered if b.name != binary.name] + [binary]
        return binary

    def publish(self, testbed: Testbed, timeout: int) -> None:
        if not self.registered or Cap.ROOT_ON_TESTBED not in testbed.caps:
            return
        repo = f"{testbed.scratch}/binaries"
        testbed.execute(["mkdir", "-p", repo], timeout=timeout)
        for b in self.registered:
            testbed.copydown(b.path, f"{repo}/{os.path.basename(b.path)}", timeout=timeout)
        with tempfile.TemporaryDirectory(prefix="nestbed.") as tmp:
            index = os.path.join(tmp, "Packages")
            with open(index, "w", encoding="UTF-8") as f:
                f.write(packages_index(self.registered))
            testbed.copydown(index, f"{repo}/Packages", timeout=timeout)
        q = shlex.quote
        pins = "".join(
            f"Package: {b.name}\nPin: version {b.version}\nPin-Priority: 1002\n\n"
            for b in self.registered
        )
        script = "; ".join(
            [
                "set -e",
                f"cd {q(repo)}",
                f"echo {q(f'deb [trusted=yes] file://{repo} ./')} > {SOURCES_LIST}",
                f"printf '%s' {q(pins)} > {PREFERENCES}",
                f"apt-get update -o Dir::Etc::sourcelist={SOURCES_LIST} "
                "-o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0 >&2",
            ]
        )
        result = testbed.execute(["sh", "-c", script], timeout=timeout)
        if result.returncode != 0:
            err = result.stderr.decode("UTF-8", "replace").strip()
            raise TestbedFailure(f"offering the binaries to apt in the testbed failed: {err}")
        self._reinstall(testbed, timeout)

    def _reinstall(self, testbed: Testbed, timeout: int) -> None:
        """Those already installed in the testbed are installed again from here, now, as
        autopkgtest does: a package of our own at a version below the installed one (a
        binNMU in the archive, an older .deb) is pinned above it, so every later apt run
        that touches it, a test's or a build's dependencies, would have to downgrade it and
        fail ("Packages were downgraded and -y was used without --allow-downgrades")."""
        names = " ".join(shlex.quote(b.name) for b in self.registered)
        script = (
            "installed=$(dpkg-query -W -f '${db:Status-Status} ${Package}\n' "
            f"-- {names} 2>/dev/null | sed -n 's/^installed //p'); "
            '[ -z "$installed" ] || DEBIAN_FRONTEND=noninteractive apt-get install --quiet '
            "--assume-yes --reinstall --allow-downgrades --no-install-recommends "
            "-o Dpkg::Options::=--force-confnew -o DPkg::Lock::Timeout=600 $installed 1>&2"
        )
        result = testbed.execute(["sh", "-c", script], timeout=timeout)
        if result.returncode != 0:
            err = result.stderr.decode("UTF-8", "replace").strip().splitlines()[-3:]
            raise BadPackage(
                f"installation of basic binaries failed, exit code {result.returncode}: "
                + " ".join(err)
            )

    def unpublish(self, testbed: Testbed, timeout: int) -> None:
        """Take the repository away (on null, the testbed is the user's own machine)."""
        if self.registered and Cap.ROOT_ON_TESTBED in testbed.caps:
            testbed.execute(["rm", "-f", SOURCES_LIST, PREFERENCES], timeout=timeout)
