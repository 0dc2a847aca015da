"""One nestbed run: open the testbed, run each package's tests, report, clean up."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from importlib.resources import files
from typing import BinaryIO

from nestbed import errors
from nestbed.log import DEBUG, Console
from nestbed.report.machine import write_json, write_junit
from nestbed.report.results import ExitStatus, TestResult, Verdict
from nestbed.run import build, deps, executor
from nestbed.run.binaries import Binaries
from nestbed.run.options import PackageArg, RunOptions
from nestbed.run.prescan import declared_restrictions
from nestbed.run.setup import Setup
from nestbed.run.tree import Limits, SourceTree, prepare
from nestbed.spec.compat import unsupported_reason
from nestbed.spec.control import parse_control
from nestbed.spec.model import TestSpec, UnsupportedTest
from nestbed.testbed.client import Testbed, resolve_virt_server

VERSION = "0.1.0"


class Session:
    """Everything one run owns; `close()` releases it all, whatever happened before."""

    def __init__(self, options: RunOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.status = ExitStatus()
        self.blamed: list[str] = []
        self.testbed: Testbed | None = None
        self._own_output_dir = options.output_dir is None
        if options.output_dir is None:
            self.output_dir = tempfile.mkdtemp(prefix="nestbed.output.")
            os.chmod(self.output_dir, 0o755)
        else:
            os.makedirs(options.output_dir, exist_ok=True)
            self.output_dir = options.output_dir
        logfile = options.logfile or (
            os.path.join(options.output_dir, "log") if options.output_dir else None
        )
        if logfile:
            console.open_logfile(logfile)
        summary = options.summary_file or os.path.join(self.output_dir, "summary")
        self.summary: BinaryIO = open(summary, "w+b", buffering=0)  # noqa: SIM115
        # testbed facts, recorded once after open
        self.arch = ""
        self.nproc = ""
        self.kernel = ""
        self.cpu_model = ""
        self.cpu_flags = ""
        self.user: str | None = None
        self.modified = False
        self.deps_installed: tuple[str, ...] = ()
        self.sudo_problem: str | None = None
        self._package: PackageArg | None = None
        self._tree_stale = False
        # the last test's artifacts and AUTOPKGTEST_TMP, removed when the next test starts
        self._leftovers: tuple[str, ...] = ()
        self.binaries = Binaries()
        # trees made in the testbed and built .debs are copied back here
        self.workdir = tempfile.mkdtemp(prefix="nestbed.work.")

    @property
    def copy_timeout(self) -> int:
        # the virt server enforces the copy timeout itself; give it room to report first
        return self.options.timeouts.copy + 30

    # -- result lines ---------------------------------------------------------------------
    def summary_line(self, text: str) -> None:
        self.summary.write(text.encode("UTF-8", "replace") + b"\n")

    def result_line(self, text: str) -> None:
        self.console.stdout_line(text)
        self.summary_line(text)

    def report(self, name: str, text: str) -> None:
        self.result_line(f"{name:<20} {text}")

    def record(self, result: TestResult) -> None:
        self.report(result.name, result.text())
        self.status.add(result)

    # -- the run --------------------------------------------------------------------------
    def run(self) -> int:
        info = self.console.info
        info(f"starting date and time: {time.strftime('%Y-%m-%d %H:%M:%S%z')}")
        info(f"version {VERSION}")
        info(f"host {socket.gethostname()}; command line: {shlex.join(sys.argv)}")
        # the copy timeout is the virt server's to enforce: it reads it from the environment
        os.environ["AUTOPKGTEST_VIRT_COPY_TIMEOUT"] = str(self.options.timeouts.copy)
        try:
            self.testbed = Testbed(
                resolve_virt_server(self.options.virt_argv[0]) + list(self.options.virt_argv[1:]),
                debug=self.console.verbosity >= DEBUG,
                log=self.console.debug,
                env=self._server_hints(),
            )
            self.testbed.start()
            # as autopkgtest: the virt server bounds its own boot (qemu: --timeout-reboot); a
            # cold boot under emulation, or of a nested VM, takes longer than --timeout-short
            self.testbed.open()
            self._after_open()
            for package in self.options.packages:
                if package.kind == "binary":
                    self._register_binary(package.path)
                else:
                    self._run_package(package)
        except errors.BadPackage as e:
            self.result_line("blame: " + " ".join(self.blamed))
            self.result_line(f"badpkg: {e}")
            self.console.error(f"erroneous package: {e}")
            self.summary_line(f"erroneous package: {e}")
            self.status.code = errors.EXIT_BADPKG
        except errors.TestbedFailure as e:
            self.console.error(f"testbed failure: {e}")
            self.summary_line(f"testbed failure: {e}")
            self.status.code = errors.EXIT_TESTBED_FAILURE
        except errors.NestbedError as e:
            self.console.error(str(e))
            self.summary_line(str(e))
            self.status.code = e.exit_code
        except Exception:
            self.console.error("unexpected error:")
            self.summary_line("quitting: unexpected error, see log")
            if self.console.verbosity >= DEBUG:
                self.console.write_stderr(traceback.format_exc().encode())
            else:
                exc = sys.exc_info()[1]
                self.console.error(f"{type(exc).__name__}: {exc} (run with --debug for details)")
            self.status.code = errors.EXIT_UNEXPECTED
        self._write_testinfo()
        self._write_machine_results()
        return self.status.code

    def _server_hints(self) -> dict[str, str]:
        """What the virt server should know before it opens the testbed: a test that needs
        the base image gets it without a flag (servers that cannot export ignore the hint)."""
        wanted = declared_restrictions(self.options.packages) - self.options.ignore_restrictions
        if "needs-baseimage" in wanted:
            self.console.debug("a test declares needs-baseimage: asking the testbed to export it")
            return {"NESTBED_WANT_BASEIMAGE": "1"}
        return {}

    def close(self) -> None:
        try:
            if self.testbed is not None:
                if self.testbed.is_open:
                    self.binaries.unpublish(self.testbed, self.options.timeouts.short)
                self.testbed.quit()
        except errors.NestbedError as e:
            self.console.error(f"closing the testbed: {e}")
            if self.status.code == errors.EXIT_OK:
                self.status.code = errors.EXIT_TESTBED_FAILURE
        finally:
            self.summary.close()
            self.console.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self._own_output_dir:
                shutil.rmtree(self.output_dir, ignore_errors=True)

    # -- testbed setup --------------------------------------------------------------------
    def _check_exec(self, argv: list[str], what: str) -> str:
        assert self.testbed is not None
        result = self.testbed.execute(argv, timeout=self.options.timeouts.short)
        if result.returncode != 0:
            err = result.stderr.decode("UTF-8", "replace").strip()
            raise errors.TestbedFailure(f"{what} failed (exit status {result.returncode}): {err}")
        return result.stdout.decode("UTF-8", "replace")

    @property
    def helpers_dir(self) -> str:
        assert self.testbed is not None
        return f"{self.testbed.scratch}/nestbed"

    @property
    def wrapper_path(self) -> str:
        return f"{self.helpers_dir}/wrapper.sh"

    def _install_helpers(self) -> None:
        """The test wrapper, and where the testbed can reboot, autopkgtest-reboot(-prepare)
        in /tmp and /sbin as autopkgtest provides them: one copy, one command."""
        tb = self.testbed
        assert tb is not None
        scripts = {"wrapper.sh": "wrapper.sh"}
        links = ""
        if "reboot" in tb.caps and "root-on-testbed" in tb.caps:
            for name in ("autopkgtest-reboot", "autopkgtest-reboot-prepare"):
                scripts[name] = "reboot.sh"
                target = shlex.quote(f"{self.helpers_dir}/{name}")
                links += f"; ln -fns {target} /tmp/{name}; ln -fns {target} /sbin/{name}"
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
        script = f"chmod 0755 {helpers} {helpers}/*{links}"
        self._check_exec(["sh", "-ec", script], "installing the test wrapper")

    def _after_open(self) -> None:
        """What every freshly opened (or reverted) testbed needs before tests run."""
        tb = self.testbed
        assert tb is not None
        self._install_helpers()
        if self.user is None:
            self.user = self.options.user
            if self.user is None and "root-on-testbed" in tb.caps:
                self.user = tb.normal_user or ""
        Setup(tb, self.console, self.options.timeouts.short, self.options.timeouts.install).apply(
            self.options.setup, self.user
        )
        self.arch = self._check_exec(["dpkg", "--print-architecture"], "dpkg").strip()
        self.console.info("testbed dpkg architecture: " + self.arch)
        packages = self._installed_packages()
        if packages is not None:
            with open(os.path.join(self.output_dir, "testbed-packages"), "w") as f:
                f.write(packages)
        kernel = self._check_exec(["uname", "-srv"], "uname").strip()
        if not self.kernel:
            self.kernel = kernel
            self.console.info("testbed running kernel: " + kernel)
        if not self.nproc:
            cpu = self._check_exec(
                ["sh", "-c", "nproc; cat /proc/cpuinfo 2>/dev/null || true"], "nproc"
            )
            self.nproc = cpu.split("\n", 1)[0].strip()
            for line in cpu.splitlines():
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if not self.cpu_model and (key == "model name" or key == "cpu"):
                    self.cpu_model = value.strip()
                if not self.cpu_flags and key in ("flags", "features"):
                    self.cpu_flags = value.strip()
        self.sudo_problem = None
        self.binaries.publish(tb, self.copy_timeout)

    def _installed_packages(self) -> str | None:
        assert self.testbed is not None
        r = self.testbed.execute(
            [
                "sh",
                "-c",
                "command -v dpkg-query >/dev/null && "
                "dpkg-query --show -f '${Package}\\t${Version}\\n'",
            ],
            timeout=self.options.timeouts.short,
        )
        return r.stdout.decode("UTF-8", "replace") if r.returncode == 0 else None

    def _reset(self, depends: tuple[str, ...]) -> None:
        """Revert if an earlier test changed the testbed or installed what this one must not see."""
        tb = self.testbed
        assert tb is not None
        stale = [d for d in self.deps_installed if d not in depends]
        if "revert" in tb.caps and (self.modified or stale):
            self.console.debug("reverting the testbed")
            tb.revert()
            self._after_open()
            self._tree_stale = True
        self.modified = False

    # -- one package ----------------------------------------------------------------------
    def _run_package(self, package: PackageArg) -> None:
        assert self.testbed is not None
        self.console.info(f"@@@@@@@@@@@@@@@@@@@@ {package.kind} {package.path}")
        self.blamed.append(package.path)
        self._reset(())
        self.binaries.publish(self.testbed, self.copy_timeout)  # the .debs given before it
        self._package = package
        tree = self._prepare(package)
        self._tree_stale = False
        if tree.name:
            self.console.info(f"testing package {tree.name} version {tree.version}")
            if self.options.output_dir:
                with open(os.path.join(self.output_dir, "testpkg-version"), "w") as f:
                    f.write(f"{tree.name} {tree.version}\n")
        if package.kind != "built-tree":  # a built tree is tested as it is
            self._build_if_needed(package, tree)
        tests = self._select_tests(tree)
        if not tests:
            if self.status.code == errors.EXIT_OK:
                self.report("*", "SKIP no tests in this package")
            self.status.finish_package(had_tests=False)
        else:
            for test in tests:
                tree = self._run_one(tree, test)
            self.status.finish_package(had_tests=True)
        self.modified = True
        if self.console.verbosity >= 1:
            self.summary.seek(0)
            self.console.info("@@@@@@@@@@@@@@@@@@@@ summary")
            self.console.write_stderr(self.summary.read())

    def _prepare(self, package: PackageArg) -> SourceTree:
        assert self.testbed is not None
        limits = Limits(copy=self.copy_timeout, install=self.options.timeouts.install)
        return prepare(self.testbed, package, limits, self.workdir, self.console, self.user)

    def _register_binary(self, path: str) -> None:
        self.blamed.append(f"arg:{path}")
        binary = self.binaries.register(path)
        self.blamed.append(f"deb:{binary.name}")

    def _build_if_needed(self, package: PackageArg, tree: SourceTree) -> None:
        """Build for the binaries (no -B), or because a test says build-needed."""
        assert self.testbed is not None
        if package.built_binaries:
            self.console.info("build needed for binaries")
        else:
            # autopkgtest reads the control file here as well, to see whether a runnable
            # test needs a build, and reports its skips then too: they appear twice in its
            # results, and so in ours, so that tools reading either see the same lines.
            tests = self._parse_tests(tree, only=(), count_skips=False)
            if not any(t.has("build-needed") for t in tests):
                self.console.info("build not needed")
                return
            self.console.info("build needed for tests")
        self.modified = True
        built = build.build(
            self.testbed,
            tree.host,
            tree.testbed,
            self.arch,
            self.user,
            self.console,
            parallel=self.options.build_parallel or self.nproc or "1",
            extra_env=self.options.env,
            install_timeout=self.options.timeouts.install,
            build_timeout=self.options.timeouts.build,
        )
        if package.built_binaries:
            debs = os.path.join(self.workdir, "debs")
            os.makedirs(debs, exist_ok=True)
            for deb in built:
                host = os.path.join(debs, os.path.basename(deb))
                self.testbed.copyup(deb, host, timeout=self.copy_timeout)
                self.binaries.register(host)
            self.binaries.publish(self.testbed, self.copy_timeout)

    def _select_tests(self, tree: SourceTree) -> list[TestSpec]:
        only = self.options.only_tests
        runnable = self._parse_tests(tree, only=only)
        if only:
            runnable = [t for t in runnable if t.name in only]
            if not runnable:
                assert self._package is not None
                self.console.error(
                    f"{self._package.kind} {self._package.path} has no test matching "
                    f"--test-name {', '.join(only)}"
                )
        if self.options.skip_tests:
            runnable = [t for t in runnable if t.name not in self.options.skip_tests]
        return runnable

    def _parse_tests(
        self, tree: SourceTree, only: tuple[str, ...], count_skips: bool = True
    ) -> list[TestSpec]:
        """The runnable tests; those the testbed cannot run are reported SKIP on the way."""
        assert self.testbed is not None
        control = os.path.join(tree.host, "debian", "tests", "control")
        if not os.path.exists(control):
            return []
        entries = parse_control(control, tree.host, self.arch, display_path=control)
        runnable: list[TestSpec] = []
        for entry in entries:
            reason = (
                entry.reason
                if isinstance(entry, UnsupportedTest)
                else unsupported_reason(entry, self.testbed.caps, self.options.ignore_restrictions)
            )
            if reason is None:
                assert isinstance(entry, TestSpec)
                runnable.append(entry)
            elif not only or (entry.name in only and not _from_test_command(entry)):
                self.report(entry.name, f"SKIP {reason}")
                if count_skips:  # the second report of a skip is not another test
                    skipped = TestResult(entry.name, Verdict.SKIP, reason, package=tree.name)
                    self.status.add(skipped)
        return runnable

    # -- one test -------------------------------------------------------------------------
    def _run_one(self, tree: SourceTree, test: TestSpec) -> SourceTree:
        """Run one test; returns the tree, which moves if the testbed was reverted."""
        tb = self.testbed
        assert tb is not None
        self.console.info(f"test {test.name}: preparing testbed")
        self._reset(test.depends)
        if self._tree_stale:
            # a revert took the tree away with everything else
            assert self._package is not None
            tree = self._prepare(self._package)
            self._tree_stale = False
        try:
            deps.install(tb, test.depends, self.console, self.options.timeouts.install)
            self.deps_installed = test.depends
        except deps.DependencyError as e:
            self.deps_installed = test.depends
            if test.has("skip-not-installable"):
                self.record(
                    TestResult(
                        test.name,
                        Verdict.SKIP,
                        "installation fails and skip-not-installable set",
                        package=tree.name,
                    )
                )
            else:
                self.record(TestResult(test.name, Verdict.BADPKG, str(e), package=tree.name))
                self.result_line("blame: " + " ".join(self.blamed))
                self.result_line(f"badpkg: {e}")
            return tree
        problem = self._satisfy_restrictions(test)
        if problem:
            self.record(TestResult(test.name, Verdict.SKIP, problem, package=tree.name))
            return tree
        self._execute(tree, test)
        if test.has("breaks-testbed"):
            self.modified = True
        return tree

    def _satisfy_restrictions(self, test: TestSpec) -> str | None:
        """needs-sudo can only be met by a normal user who may sudo (autopkgtest's checks)."""
        tb = self.testbed
        assert tb is not None
        if not test.has("needs-sudo"):
            return None
        if self.sudo_problem is None:
            self.sudo_problem = self._sudo_problem()
        return self.sudo_problem or None

    def _sudo_problem(self) -> str:
        tb = self.testbed
        assert tb is not None
        root = "root-on-testbed" in tb.caps
        if root and not self.user:
            return "Cannot enable needs-sudo restriction: no ordinary user available"
        as_user = ["su", "-s", "/bin/bash", self.user or "", "-c"] if root else ["bash", "-c"]
        short = self.options.timeouts.short
        groups = tb.execute([*as_user, "id -Gn"], timeout=short)
        in_sudo_group = groups.returncode == 0 and "sudo" in groups.stdout.decode().split()
        if in_sudo_group and tb.execute([*as_user, "sudo -n -v"], timeout=short).returncode == 0:
            return ""
        if not root:
            return "Cannot enable needs-sudo restriction: not root"
        if "revert-full-system" not in tb.caps:
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

    def _execute(self, tree: SourceTree, test: TestSpec) -> None:
        tb = self.testbed
        assert tb is not None
        name = test.name
        if test.path is not None and not os.path.exists(os.path.join(tree.host, test.path)):
            raise errors.BadPackage(f"{test.path} does not exist")
        baseline = self._record_test_packages_start()
        env = executor.TestEnvironment(
            tree=tree.testbed,
            scratch=tb.scratch,
            wrapper=self.wrapper_path,
            user=self.user,
            root_on_testbed="root-on-testbed" in tb.caps,
            nproc=self.nproc or "1",
            extra_env=(*testbed_environment(tb.caps), *self.options.env),
            build_parallel=self.options.build_parallel,
        )
        if test.command is not None:
            self.console.info(f"test {name}: {test.command}")
        self.console.info(f"test {name}: [-----------------------")
        reboot = self._reboot if "reboot" in tb.caps and "root-on-testbed" in tb.caps else None
        # what the last test left in the scratch dir goes when this one starts
        leftovers, self._leftovers = self._leftovers, (env.artifacts_dir(test), env.tmp_dir)
        run = executor.run_test(
            tb, test, env, self.options.timeouts.test, self.console, reboot, leftovers
        )
        if run.timed_out:
            self.console.error(f'timed out on command "{shlex.join(run.argv)}" (kind: test)')
        self.console.info(f"test {name}: -----------------------]")
        for note in run.wrapper_notes.splitlines():
            if not note.startswith("timed-out"):
                self.console.info(f"test {name}: {note}")
        self.console.info(f"test {name}:  - - - - - - - - - - results - - - - - - - - - -")
        result = executor.decide(test, run, tree.name)
        self.record(result)
        if run.stderr and not test.has("allow-stderr") and not run.timed_out:
            self.console.info(f"test {name}:  - - - - - - - - - - stderr - - - - - - - - - -")
            self.console.write_stderr(run.stderr)
        self._save_outputs(test, env, run, baseline)

    def _reboot(self) -> None:
        """A test asked for a reboot: the testbed keeps the scratch dir; /tmp may not."""
        assert self.testbed is not None
        self.testbed.reboot(timeout=self.options.timeouts.copy)
        self._install_helpers()

    def _record_test_packages_start(self) -> str | None:
        return self._installed_packages() if self.options.output_dir else None

    def _save_outputs(
        self,
        test: TestSpec,
        env: executor.TestEnvironment,
        run: executor.TestRun,
        packages: str | None,
    ) -> None:
        if not self.options.output_dir:
            return
        out = self.output_dir
        for suffix, data in (("stdout", run.stdout), ("stderr", run.stderr)):
            if data:
                with open(os.path.join(out, f"{test.name}-{suffix}"), "wb") as f:
                    f.write(data)
        if packages is not None:
            # packages this test brought in beyond the pristine testbed
            # packages new since the testbed opened (by name, as autopkgtest's join -v2)
            base_path = os.path.join(out, "testbed-packages")
            base = set()
            if os.path.exists(base_path):
                with open(base_path) as f:
                    base = {line.split("\t", 1)[0] for line in f}
            extra = [line for line in packages.splitlines() if line.split("\t", 1)[0] not in base]
            with open(os.path.join(out, f"{test.name}-packages"), "w") as f:
                f.write("".join(line + "\n" for line in extra))
        if run.timed_out:
            return
        assert self.testbed is not None
        artifacts = os.path.join(out, "artifacts")
        os.makedirs(artifacts, exist_ok=True)
        self.testbed.copyup(
            env.artifacts_dir(test) + "/",
            artifacts + "/",
            timeout=self.copy_timeout,
        )
        if not os.listdir(artifacts):
            os.rmdir(artifacts)

    # -- files at the end -------------------------------------------------------------------
    def _write_testinfo(self) -> None:
        # as autopkgtest records it: the server program's name, then its arguments
        argv = list(self.options.virt_argv)
        if argv and "/" not in argv[0]:
            argv[0] = f"nestbed-virt-{argv[0]}"
        info: dict[str, object] = {"virt_server": " ".join(shlex.quote(w) for w in argv)}
        if self.kernel:
            info["kernel_version"] = self.kernel
        if self.options.env:
            info["custom_environment"] = list(self.options.env)
        if self.nproc:
            info["nproc"] = self.nproc
        if self.cpu_model:
            info["cpu_model"] = self.cpu_model
        if self.cpu_flags:
            info["cpu_flags"] = self.cpu_flags
        try:
            with open(os.path.join(self.output_dir, "testinfo.json"), "w") as f:
                json.dump(info, f, indent=2)
        except OSError as e:
            self.console.error(f"cannot write testinfo.json: {e}")

    def _write_machine_results(self) -> None:
        results = self.status.results
        try:
            if self.options.json_file:
                write_json(self.options.json_file, results)
            if self.options.junit_file:
                write_junit(self.options.junit_file, results)
        except OSError as e:
            self.console.error(f"cannot write results: {e}")
            self.status.code = errors.EXIT_UNEXPECTED


# where the QEMU testbed's images put the exported base image (a symlink to /dev/baseimage)
BASEIMAGE_PATH = "/lib/autopkgtest/baseimage"


def testbed_environment(caps: frozenset[str]) -> tuple[str, ...]:
    """Variables a test gets from what the testbed provides (before the user's --env)."""
    env: list[str] = []
    if "baseimage" in caps:
        env.append(f"AUTOPKGTEST_BASEIMAGE={BASEIMAGE_PATH}")
    if "nested-kvm" in caps:
        env.append("AUTOPKGTEST_NESTED_KVM=1")
    elif "baseimage" in caps:
        env.append("AUTOPKGTEST_NESTED_KVM=0")  # our server checked: nested VMs are emulated
    return tuple(env)


def _from_test_command(entry: TestSpec | UnsupportedTest) -> bool:
    # autopkgtest leaves out a skipped Test-Command stanza's line when --test-name is
    # given, even if it names that test; only Tests: stanzas are reported then.
    if isinstance(entry, TestSpec):
        return entry.command is not None
    return entry.from_command


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwind through every cleanup, then die of the same signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def run(options: RunOptions) -> int:
    console = Console(options.verbosity)
    try:
        session = Session(options, console)
    except OSError as e:
        print(f"nestbed: error: {e}", file=sys.stderr)
        return errors.EXIT_UNEXPECTED
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return session.run()
    except Interrupted as e:
        console.error(f"Received signal {e.signum}, cleaning up...")
        # close() below releases the testbed; then die of the signal, as autopkgtest does
        session.close()
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)
        return 128 + e.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        session.close()
