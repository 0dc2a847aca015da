"""Testbed setup the user asked for: --copy, apt sources and pinning, setup commands.

Applied after the testbed opens and again after every revert (a revert undoes it all).
"""

from __future__ import annotations

import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nestbed.aptsources import host_sources
from nestbed.errors import BadPackage, TestbedFailure, UsageError
from nestbed.log import Console
from nestbed.testbed.client import Testbed

# -U / --apt-upgrade. apt-get update failures are usually transient (retried, then a
# testbed failure); a 404 means a source that does not exist: the package's fault (100).
APT_UPGRADE = (
    'out=$(apt-get update 2>&1) || { echo "$out" >&2; '
    'case "$out" in *404*Not\\ Found*) exit 100;; esac; sleep 15; apt-get update; } && '
    "apt-get dist-upgrade -y -o Dpkg::Options::=--force-confnew && "
    "apt-get --purge autoremove -y"
)


@dataclass(frozen=True)
class SetupRequest:
    setup_commands: tuple[str, ...] = ()
    setup_commands_boot: tuple[str, ...] = ()
    copies: tuple[tuple[str, str], ...] = ()
    add_apt_sources: tuple[str, ...] = ()
    apt_pockets: tuple[str, ...] = ()  # POCKET[=pkg,src:name,...]
    pin_packages: tuple[str, ...] = ()  # RELEASE=pkg,src:name,...
    add_apt_releases: tuple[str, ...] = ()  # RELEASE: its deb and deb-src lines, first mirror
    apt_default_release: str | None = None  # instead of the first release in the sources

    def __bool__(self) -> bool:
        return any(
            (
                self.setup_commands,
                self.setup_commands_boot,
                self.copies,
                self.add_apt_sources,
                self.apt_pockets,
                self.pin_packages,
                self.add_apt_releases,
                self.apt_default_release,
            )
        )


# Setup commands by name (`--setup-commands enable-sudo`): autopkgtest's own, when it is
# installed, then those nestbed ships (package data, the same names where we have one).
AUTOPKGTEST_SETUP_COMMANDS = "/usr/share/autopkgtest/setup-commands"
OUR_SETUP_COMMANDS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup-commands")


def locate_command(value: str, directories: tuple[str, ...] | None = None) -> str:
    """The file a bare name (no '/') stands for in a setup-commands directory, as
    autopkgtest looks it up before a file of that name in the current directory; else
    `value` as it is."""
    if "/" not in value and value not in ("", ".", ".."):
        for directory in directories or (AUTOPKGTEST_SETUP_COMMANDS, OUR_SETUP_COMMANDS):
            shipped = os.path.join(directory, value)
            if os.path.isfile(shipped):
                return shipped
    return value


def read_command(value: str) -> str:
    """A setup command is given inline, as the path of a file holding it, or as the name
    of a shipped one (locate_command)."""
    path = locate_command(value)
    if os.path.isfile(path):
        try:
            with open(path, encoding="UTF-8") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--setup-commands {value}: cannot read {path}: {e}") from None
    return value


class Setup:
    def __init__(self, testbed: Testbed, console: Console, short: int, install: int) -> None:
        self.testbed = testbed
        self.console = console
        self.short = short
        self.install = install
        self.default_release: str | None = None

    def _check(self, script: str, what: str, timeout: int | None = None) -> str:
        r = self.testbed.execute(["sh", "-ec", script], timeout=timeout or self.short)
        if r.returncode != 0:
            err = r.stderr.decode("UTF-8", "replace").strip()
            raise TestbedFailure(f"{what} failed (exit status {r.returncode}): {err}")
        return r.stdout.decode("UTF-8", "replace")

    def _apt_update(self, sources_list: str) -> None:
        self._check(
            f"apt-get update -o Dir::Etc::sourcelist={shlex.quote(sources_list)} "
            "-o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0 >&2",
            f"apt-get update for {sources_list}",
            self.install,
        )

    def _default_release(self) -> str:
        if self.default_release:  # --apt-default-release
            return self.default_release
        with tempfile.TemporaryDirectory(prefix="nestbed.") as tmp:
            self.testbed.copyup("/etc/apt/", tmp + "/", timeout=self.short)
            sources = host_sources(Path(tmp))
        if not sources or not sources[0].suites:
            raise TestbedFailure("the testbed's apt sources name no release")
        return sources[0].suites[0]

    def _pin(self, release: str, packages: str) -> None:
        binaries = [p for p in packages.split(",") if p and not p.startswith("src:")]
        sources = [p[4:] for p in packages.split(",") if p.startswith("src:")]
        q = shlex.quote
        expand = ""
        if sources:
            # the binaries a source builds, from apt's source index
            expand = (
                f"$(apt-cache showsrc {' '.join(q(s) for s in sources)} | awk "
                "'/^Package-List:/ {l=1; next} l && /^ / {print $1; next} {l=0}' | sort -u)"
            )
        name = release.replace("/", "-").replace(".", "_")
        self._check(
            f'pkgs="$(echo {q(" ".join(binaries))} {expand})"; '
            'printf "Package: %s\\nPin: release a=%s\\nPin-Priority: 995\\n" '
            f'"$(echo $pkgs)" {q(release)} > /etc/apt/preferences.d/nestbed-{name}',
            f"pinning packages from {release}",
        )

    def apply(self, request: SetupRequest, user: str | None) -> None:
        if not request:
            return
        self.console.info("@@@@@@@@@@@@@@@@@@@@ test bed setup")
        self.default_release = request.apt_default_release
        for host, tb in request.copies:
            if os.path.isdir(host):
                self.testbed.copydown(host.rstrip("/") + "/", tb.rstrip("/") + "/")
            else:
                self.testbed.copydown(host, tb)
        if request.apt_default_release:
            # as autopkgtest: the archive name when pockets share the release's code name
            key = "a=" if request.apt_pockets else ""
            self._check(
                "mkdir -p /etc/apt/preferences.d; printf 'Package: *\\nPin: release %s\\n"
                f"Pin-Priority: 990\\n' {shlex.quote(key + request.apt_default_release)}"
                " > /etc/apt/preferences.d/nestbed-default-release",
                "--apt-default-release",
            )
        if request.add_apt_sources:
            listfile = "/etc/apt/sources.list.d/nestbed-add-apt-sources.list"
            lines = "".join(s + "\n" for s in request.add_apt_sources)
            self._check(f"printf '%s' {shlex.quote(lines)} > {listfile}", "--add-apt-source")
            self._apt_update(listfile)
        if request.apt_pockets:
            self._add_pockets(request.apt_pockets)
        if request.add_apt_releases:
            self._add_releases(request.add_apt_releases)
        for item in request.pin_packages:
            release, _, packages = item.partition("=")
            self._pin(release, packages)
        self._run(request.setup_commands, user, "setup commands", "AUTOPKGTEST_IS_SETUP_COMMAND")
        self._run(
            request.setup_commands_boot,
            user,
            "boot setup commands",
            "AUTOPKGTEST_IS_SETUP_BOOT_COMMAND",
        )

    def after_reboot(self, request: SetupRequest, user: str | None) -> None:
        """A reboot keeps the testbed's disk but not what a boot sets up: as autopkgtest,
        the boot setup commands run again after each (also autopkgtest-reboot-prepare's)."""
        self._run(
            request.setup_commands_boot,
            user,
            "boot setup commands",
            "AUTOPKGTEST_IS_SETUP_BOOT_COMMAND",
        )

    def _add_pockets(self, pockets: tuple[str, ...]) -> None:
        release = self._default_release()
        with tempfile.TemporaryDirectory(prefix="nestbed.") as tmp:
            self.testbed.copyup("/etc/apt/", tmp + "/", timeout=self.short)
            sources = host_sources(Path(tmp))
        for item in pockets:
            pocket, _, packages = item.partition("=")
            suite = f"{release}-{pocket}"
            lines = "".join(
                f"deb {s.uri} {suite} {' '.join(s.components)}\n"
                for s in sources
                if release in s.suites
            )
            listfile = f"/etc/apt/sources.list.d/nestbed-{pocket}.list"
            self._check(f"printf '%s' {shlex.quote(lines)} > {listfile}", f"--apt-pocket {pocket}")
            self._apt_update(listfile)
            if packages:
                self._pin(suite, packages)

    def _add_releases(self, releases: tuple[str, ...]) -> None:
        """--add-apt-release: RELEASE from the mirror and components of the first source."""
        with tempfile.TemporaryDirectory(prefix="nestbed.") as tmp:
            self.testbed.copyup("/etc/apt/", tmp + "/", timeout=self.short)
            sources = host_sources(Path(tmp))
        if not sources:
            raise TestbedFailure("--add-apt-release: the testbed has no apt sources")
        first = sources[0]
        for release in releases:
            lines = "".join(
                f"{kind} {first.uri} {release} {' '.join(first.components)}\n"
                for kind in ("deb", "deb-src")
            )
            listfile = f"/etc/apt/sources.list.d/nestbed-add-apt-release-{release}.list"
            self._check(
                f"printf '%s' {shlex.quote(lines)} > {shlex.quote(listfile)}",
                f"--add-apt-release {release}",
            )
            self._apt_update(listfile)

    def _run(self, commands: tuple[str, ...], user: str | None, what: str, marker: str) -> None:
        env = {marker: "1"}
        if user:
            env.update(AUTOPKGTEST_NORMAL_USER=user, ADT_NORMAL_USER=user)
        for command in commands:
            r = self.testbed.execute(["sh", "-ec", command], timeout=self.install, env=env)
            self.console.write_stderr(r.stdout + r.stderr)
            if r.returncode == 100:
                raise BadPackage(f"testbed {what} failed with status 100")
            if r.returncode != 0:
                raise TestbedFailure(f"testbed {what} failed with status {r.returncode}")
