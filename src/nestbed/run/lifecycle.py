"""The testbed's lifecycle in a run: start the virt server, open, prepare every fresh (or
reverted, or rebooted) testbed, revert when a test needs a clean one, release at the end."""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Mapping
from importlib.resources import files

from nestbed import errors, trace
from nestbed.capabilities import Cap
from nestbed.log import DEBUG, Console
from nestbed.run import probe
from nestbed.run.binaries import Binaries
from nestbed.run.options import RunOptions
from nestbed.run.outputs import RunOutputs, TestbedFacts
from nestbed.run.setup import Setup
from nestbed.testbed.client import Testbed, su_argv


class TestbedLifecycle:
    """One testbed from start to release, and what the run knows about its state."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        options: RunOptions,
        console: Console,
        outputs: RunOutputs,
        facts: TestbedFacts,
        server_env: Mapping[str, str],
    ) -> None:
        self.options = options
        self.console = console
        self.outputs = outputs
        self.testbed = Testbed(
            options.virt_server,
            debug=console.verbosity >= DEBUG,
            log=console.debug,
            # as autopkgtest's servers write to its stderr: --show-boot's console, warnings
            server_stderr=lambda line: console.write_stderr(line.encode() + b"\n"),
            env=server_env,
            copy_timeout=options.timeouts.copy,
        )
        self.facts = facts  # filled in at the first open
        self.binaries = Binaries()
        self.user: str | None = None
        # an earlier test changed the testbed (or may have): the next one needs a revert
        self.modified = False
        self.deps_installed: tuple[str, ...] = ()
        self._sudo_problem: str | None = None

    @property
    def copy_timeout(self) -> int:
        # the virt server enforces the copy timeout itself; give it room to report first
        return self.options.timeouts.copy + 30

    @property
    def helpers_dir(self) -> str:
        return f"{self.testbed.scratch}/nestbed"

    @property
    def wrapper_path(self) -> str:
        return f"{self.helpers_dir}/wrapper.sh"

    @property
    def caps(self) -> frozenset[str]:
        """What the testbed offers a test: the server's capabilities, and has_internet unless
        --needs-internet=skip (as autopkgtest: no server knows, the user says)."""
        if self.options.needs_internet == "skip":
            return self.testbed.caps
        return self.testbed.caps | {Cap.HAS_INTERNET}

    def can(self, *caps: str) -> bool:
        return all(cap in self.caps for cap in caps)

    # -- opening ----------------------------------------------------------------------------
    def open(self) -> None:
        self.testbed.start()
        # as autopkgtest: the virt server bounds its own boot (qemu: --timeout-reboot); a
        # cold boot under emulation, or of a nested VM, takes longer than --timeout-short
        self.testbed.open()
        self._after_open()

    def check_exec(self, argv: list[str], what: str) -> str:
        result = self.testbed.execute(argv, timeout=self.options.timeouts.short)
        if result.returncode != 0:
            err = result.stderr.decode("UTF-8", "replace").strip()
            raise errors.TestbedFailure(f"{what} failed (exit status {result.returncode}): {err}")
        return result.stdout.decode("UTF-8", "replace")

    def install_helpers(self) -> None:
        """The test wrapper, and where the testbed can reboot, autopkgtest-reboot(-prepare)
        in /tmp and /sbin as autopkgtest provides them: one copy, one command."""
        self.check_exec(["sh", "-ec", self._copy_helpers()], "installing the test wrapper")

    def _copy_helpers(self) -> str:
        """Copy the helpers down; returns the script that makes them usable (modes, links)."""
        tb = self.testbed
        scripts = {"wrapper.sh": "wrapper.sh"}
        links = ""
        if self.can(Cap.REBOOT, Cap.ROOT_ON_TESTBED):
            names = ("autopkgtest-reboot", "autopkgtest-reboot-prepare")
            targets = " ".join(shlex.quote(f"{self.helpers_dir}/{name}") for name in names)
            for name in names:
                scripts[name] = "reboot.sh"
            # links named as their targets, one ln a directory (a process costs ~50 ms)
            links = f"; ln -fs {targets} /tmp; ln -fs {targets} /sbin"
        with tempfile.TemporaryDirectory(prefix="nestbed.") as tmp:
            local = os.path.join(tmp, "nestbed")
            os.mkdir(local)
            for name, source in scripts.items():
                path = os.path.join(local, name)
                with open(path, "wb") as f:
                    f.write(files("nestbed.run").joinpath(source).read_bytes())
                os.chmod(path, 0o755)
            tb.copydown(local + "/", self.helpers_dir + "/", timeout=self.copy_timeout)
        helpers = shlex.quote(self.helpers_dir)
        return f"chmod 0755 {helpers} {helpers}/*{links}"

    def _after_open(self) -> None:
        """What every freshly opened (or reverted) testbed needs before tests run."""
        with trace.span("step", "set up the opened testbed"):
            self._set_up()

    def _set_up(self) -> None:
        tb = self.testbed
        helpers = self._copy_helpers()
        if self.user is None:
            self.user = self.options.user
            if self.user is None and self.can(Cap.ROOT_ON_TESTBED):
                self.user = tb.normal_user or ""
        if self.options.setup:
            # the setup may change what the testbed has: ask after it
            self.check_exec(["sh", "-ec", helpers], "installing the test wrapper")
            Setup(
                tb, self.console, self.options.timeouts.short, self.options.timeouts.install
            ).apply(self.options.setup, self.user)
            helpers = ""
        self._learn(helpers)
        self._sudo_problem = None
        self.binaries.publish(tb, self.copy_timeout)

    def _learn(self, first: str) -> None:
        """What the run records about the testbed, from one command (nestbed.run.probe)
        that first runs `first` (making the helpers usable)."""
        # the package list goes only into the output dir the user keeps (-o)
        skip = frozenset() if self.outputs.keeps_files else frozenset({"packages"})
        r = self.testbed.execute(
            ["sh", "-c", probe.script(first, skip=skip)], timeout=self.options.timeouts.short
        )
        answers = probe.parse(r.stdout.decode("UTF-8", "replace"))
        err = r.stderr.decode("UTF-8", "replace").strip()

        def answer(name: str, what: str) -> str:
            got = answers.get(name)
            if got is None:
                raise errors.TestbedFailure(f"{what} failed (exit status {r.returncode}): {err}")
            if got.status != 0:
                raise errors.TestbedFailure(f"{what} failed (exit status {got.status}): {err}")
            return got.output

        if first and not answers:  # it failed: nothing was asked
            raise errors.TestbedFailure(
                f"installing the test wrapper failed (exit status {r.returncode}): {err}"
            )
        known = self.facts
        known.arch = answer("arch", "dpkg").strip()
        self.console.info("testbed dpkg architecture: " + known.arch)
        packages = answers.get("packages")
        if packages is not None and packages.status == 0:
            self.outputs.write_testbed_packages(packages.output)
        kernel = answer("kernel", "uname").strip()
        if not known.kernel:
            known.kernel = kernel
            self.console.info("testbed running kernel: " + kernel)
        if not known.nproc:
            cpu = answer("cpu", "nproc")
            known.nproc = cpu.split("\n", 1)[0].strip()
            for line in cpu.splitlines():
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if not known.cpu_model and (key == "model name" or key == "cpu"):
                    known.cpu_model = value.strip()
                if not known.cpu_flags and key in ("flags", "features"):
                    known.cpu_flags = value.strip()

    def installed_packages(self) -> str | None:
        r = self.testbed.execute(["sh", "-c", probe.PACKAGES], timeout=self.options.timeouts.short)
        return r.stdout.decode("UTF-8", "replace") if r.returncode == 0 else None

    # -- between tests ----------------------------------------------------------------------
    def reset(self, depends: tuple[str, ...]) -> bool:
        """Revert if an earlier test changed the testbed or installed what this one must not
        see; True when it reverted (which takes the tests' tree away with everything else)."""
        stale = [d for d in self.deps_installed if d not in depends]
        reverted = False
        if self.can(Cap.REVERT) and (self.modified or stale):
            self.console.debug("reverting the testbed")
            self.testbed.revert()
            self._after_open()
            reverted = True
        self.modified = False
        return reverted

    def reboot(self) -> None:
        """A test asked for a reboot: the testbed keeps the scratch dir; /tmp may not, nor
        /run, where --setup-commands-boot's effects live: they run again."""
        self.testbed.reboot(timeout=self.options.timeouts.copy)
        self.install_helpers()
        Setup(
            self.testbed, self.console, self.options.timeouts.short, self.options.timeouts.install
        ).after_reboot(self.options.setup, self.user)

    def check_user(self) -> None:
        """-u USER must exist in the testbed: the package is erroneous otherwise, as
        autopkgtest has it (its extraction as USER fails: exit 12, not a testbed failure)."""
        user = self.options.user
        if not user or not self.can(Cap.ROOT_ON_TESTBED):
            return
        r = self.testbed.execute(["id", "-u", "--", user], timeout=self.options.timeouts.short)
        if r.returncode != 0:
            raise errors.BadPackage(f"-u/--user {user}: no such user in the testbed")

    def needs_sudo_problem(self) -> str:
        """Why needs-sudo cannot be met ("" when it is): only by a normal user who may sudo
        (autopkgtest's checks); asked once per opened testbed."""
        if self._sudo_problem is None:
            self._sudo_problem = self._check_sudo()
        return self._sudo_problem

    def _check_sudo(self) -> str:
        tb = self.testbed
        root = self.can(Cap.ROOT_ON_TESTBED)
        if root and not self.user:
            return "Cannot enable needs-sudo restriction: no ordinary user available"

        def as_user(command: str) -> list[str]:
            return (
                su_argv(self.user or "", command, shell="/bin/bash")
                if root
                else ["bash", "-c", command]
            )

        short = self.options.timeouts.short
        groups = tb.execute(as_user("id -Gn"), timeout=short)
        in_sudo_group = groups.returncode == 0 and "sudo" in groups.stdout.decode().split()
        if in_sudo_group and tb.execute(as_user("sudo -n -v"), timeout=short).returncode == 0:
            return ""
        if not root:
            return "Cannot enable needs-sudo restriction: not root"
        if not self.can(Cap.REVERT_FULL_SYSTEM):
            # granting sudo changes the testbed for good: only where a revert undoes it
            return "Cannot enable needs-sudo restriction: cannot revert"
        self.modified = True
        self.console.info(f'Setting up user "{self.user}" to sudo without password...')
        user = shlex.quote(self.user or "")
        script = (
            "getent group sudo >/dev/null || groupadd --system sudo; "
            f"usermod -a -G sudo {user}; mkdir -p /etc/sudoers.d; "
            f"echo {user}' ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/nestbed-needs-sudo; "
            "chmod 0440 /etc/sudoers.d/nestbed-needs-sudo"
        )
        r = tb.execute(["sh", "-ec", script], timeout=short)
        if r.returncode != 0:
            return f"Failed to enable needs-sudo restriction: exit status {r.returncode}"
        return ""

    def shell(self, cwd: str, env: tuple[str, ...] = ()) -> None:
        """-s/--shell: an interactive shell in the testbed, on the user's terminal; without
        one, a note instead (a run in CI goes on, never waits)."""
        self.console.info(" - - - - - - - - - - running shell - - - - - - - - - -")
        why = self.testbed.shell(cwd, env)
        if why:
            self.console.warning(f"no shell in the testbed: {why}")

    # -- the end ----------------------------------------------------------------------------
    def close(self) -> None:
        """Take the published binaries back and quit the server (raises what that hit)."""
        if self.testbed.is_open:
            self.binaries.unpublish(self.testbed, self.options.timeouts.short)
        self.testbed.quit()
