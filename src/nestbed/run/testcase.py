"""One test from its dependencies to its result line and files: install what it depends
on, check its restrictions, run it (`executor`), record the verdict, save its outputs."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import replace

from nestbed import errors, trace
from nestbed.capabilities import Cap
from nestbed.log import Console
from nestbed.report.results import TestResult, Verdict
from nestbed.run import deps, executor, kernlog
from nestbed.run.deadline import RunDeadline
from nestbed.run.lifecycle import TestbedLifecycle
from nestbed.run.options import RunOptions
from nestbed.run.outputs import RunOutputs
from nestbed.run.tree import SourceTree
from nestbed.spec.model import TestSpec

# --no-apt-fallback: autopkgtest's reason when the dependencies cannot be installed
NO_FALLBACK = (
    "Test dependencies are unsatisfiable. A common reason is that the requested apt pinning "
    "prevented dependencies from the non-default suite to be installed. In that case you need "
    "to add those dependencies to the pinning list."
)

# where the QEMU testbed's images put the exported base image (a symlink to /dev/baseimage)
BASEIMAGE_PATH = "/lib/autopkgtest/baseimage"


def testbed_environment(caps: frozenset[str]) -> tuple[str, ...]:
    """Variables a test gets from what the testbed provides (before the user's --env)."""
    env: list[str] = []
    if Cap.BASEIMAGE in caps:
        env.append(f"AUTOPKGTEST_BASEIMAGE={BASEIMAGE_PATH}")
    if Cap.NESTED_KVM in caps:
        env.append("AUTOPKGTEST_NESTED_KVM=1")
    elif Cap.BASEIMAGE in caps:
        env.append("AUTOPKGTEST_NESTED_KVM=0")  # our server checked: nested VMs are emulated
    return tuple(env)


class TestCaseRunner:
    """Runs the tests of a run one at a time on its testbed."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        options: RunOptions,
        console: Console,
        testbed: TestbedLifecycle,
        outputs: RunOutputs,
        deadline: RunDeadline | None = None,
    ) -> None:
        self.options = options
        self.deadline = deadline or RunDeadline(0)
        self.console = console
        self.lifecycle = testbed
        self.outputs = outputs
        # the last test's artifacts and AUTOPKGTEST_TMP, removed when the next test starts
        self._leftovers: tuple[str, ...] = ()
        self._kernel_unreadable = False

    def run(self, tree: SourceTree, test: TestSpec, blamed: Sequence[str]) -> None:
        """Run `test` in `tree` on a testbed `TestbedLifecycle.reset` made ready for it."""
        with trace.span("step", f"test {test.name}"):
            self._run(tree, test, blamed)

    def _run(self, tree: SourceTree, test: TestSpec, blamed: Sequence[str]) -> None:
        life = self.lifecycle
        try:
            self._install(test)
            life.deps_installed = test.depends
        except deps.NotInstallable as e:
            life.deps_installed = test.depends
            if test.has("skip-not-installable"):
                self.outputs.record(
                    TestResult(
                        test.name,
                        Verdict.SKIP,
                        "installation fails and skip-not-installable set",
                        package=tree.name,
                    )
                )
            else:
                if self.options.shell_fail:
                    life.shell("/")
                self.outputs.record(
                    TestResult(test.name, Verdict.BADPKG, str(e), package=tree.name)
                )
                self.outputs.blame(blamed, str(e))
            return
        problem = life.needs_sudo_problem() if test.has("needs-sudo") else None
        if problem:
            self.outputs.record(TestResult(test.name, Verdict.SKIP, problem, package=tree.name))
            return
        self._execute(tree, test)
        if test.has("breaks-testbed"):
            life.modified = True

    def _install(self, test: TestSpec) -> None:
        """The test's dependencies. Where --apt-pocket/--pin-packages pinned packages and
        that makes them unsatisfiable, once more without the pinning (autopkgtest's apt
        fallback), unless --no-apt-fallback."""
        life = self.lifecycle
        timeout = self.options.timeouts.install
        setup = self.options.setup
        pinned = bool(setup.pin_packages or any("=" in p for p in setup.apt_pockets))
        try:
            deps.install(life.testbed, test.depends, self.console, timeout)
            return
        except deps.NotInstallable:
            if not self.options.apt_fallback:
                raise deps.NotInstallable(NO_FALLBACK) from None
            if not pinned:
                raise
        self.console.warning(
            "Test dependencies are unsatisfiable with using apt pinning. "
            "Retrying with using all packages from the pinned releases"
        )
        life.modified = True  # the pinning is gone until the next revert
        life.check_exec(
            ["sh", "-c", "rm -f /etc/apt/preferences.d/nestbed-*"], "removing the apt pinning"
        )
        deps.install(life.testbed, test.depends, self.console, timeout)

    def _execute(self, tree: SourceTree, test: TestSpec) -> None:
        life = self.lifecycle
        tb = life.testbed
        name = test.name
        if test.path is not None and not os.path.exists(os.path.join(tree.host, test.path)):
            raise errors.BadPackage(f"{test.path} does not exist")
        baseline = life.installed_packages() if self.outputs.keeps_files else None
        env = executor.TestEnvironment(
            tree=tree.testbed,
            scratch=tb.scratch,
            wrapper=life.wrapper_path,
            user=life.user,
            root_on_testbed=life.can(Cap.ROOT_ON_TESTBED),
            nproc=life.facts.nproc or "1",
            extra_env=(*testbed_environment(tb.caps), *self.options.env),
            build_parallel=self.options.build_parallel,
        )
        if test.command is not None:
            self.console.info(f"test {name}: {test.command}")
        self.console.info(f"test {name}: [-----------------------")
        reboot = life.reboot if life.can(Cap.REBOOT, Cap.ROOT_ON_TESTBED) else None
        # what the last test left in the scratch dir goes when this one starts
        leftovers, self._leftovers = self._leftovers, (env.artifacts_dir(test), env.tmp_dir)
        _, by_deadline = self.deadline.limit(self.options.timeouts.test)
        watch_kernel = self._watches_kernel()
        before = [executor.cleanup_script(leftovers)]
        token = kernlog.new_token()
        if watch_kernel:
            before.append(kernlog.mark_script(name, token))
        run = executor.run_test(
            tb, test, env, self.options.timeouts.test, self.console, reboot,
            "; ".join(b for b in before if b), self.deadline.limit,
            kernlog.READ_SCRIPT if watch_kernel else "",
        )  # fmt: skip
        if run.timed_out:
            self.deadline.exceeded = by_deadline
            what = "global timeout reached" if by_deadline else "timed out"
            self.console.error(f'{what} on command "{shlex.join(run.argv)}" (kind: test)')
        self.console.info(f"test {name}: -----------------------]")
        for note in run.wrapper_notes.splitlines():
            if not note.startswith("timed-out"):
                self.console.info(f"test {name}: {note}")
        self.console.info(f"test {name}:  - - - - - - - - - - results - - - - - - - - - -")
        result = self._needs_internet_try(test, run, executor.decide(test, run, tree.name))
        if watch_kernel:
            result = self._kernel_check(result, kernlog.since_mark(run.after_output, token))
        self.outputs.record(result)
        if run.stderr and not test.has("allow-stderr") and not run.timed_out:
            self.console.info(f"test {name}:  - - - - - - - - - - stderr - - - - - - - - - -")
            for chunk in run.stderr.chunks():
                self.console.write_stderr(chunk)
        failed = result.verdict in (Verdict.FAIL, Verdict.FLAKY)
        if self.options.shell or (self.options.shell_fail and failed):
            life.shell(
                tree.testbed,
                (
                    f"AUTOPKGTEST_ARTIFACTS={env.artifacts_dir(test)}",
                    f"AUTOPKGTEST_TMP={env.tmp_dir}",
                ),
            )
        try:
            self._save_outputs(test, env, run, baseline)
        finally:
            run.close()

    def _watches_kernel(self) -> bool:
        """The testbed has a kernel of its own that root can read, and we were not told not to
        look (a log that turned out unreadable is not looked at again)."""
        life = self.lifecycle
        return (
            self.options.kernel_warnings != "ignore"
            and not self._kernel_unreadable
            and life.can(Cap.ISOLATION_MACHINE, Cap.ROOT_ON_TESTBED)
        )

    def _kernel_check(self, result: TestResult, found: kernlog.SinceMark) -> TestResult:
        if not found.marked:
            self._kernel_unreadable = True  # said once
            self.console.warning("cannot read the testbed's kernel log: not watching it")
            return result
        if found.problems is None:
            self.console.warning(f"test {result.name}: cannot read the kernel log after the test")
            return result
        for line in found.problems:
            self.console.warning(f"test {result.name}: kernel warning: {line}")
        result = replace(result, kernel_warnings=tuple(found.problems))
        if (
            found.problems
            and self.options.kernel_warnings == "fail"
            and result.verdict is Verdict.PASS
        ):
            return replace(
                result, verdict=Verdict.FAIL, reason=f"kernel warning: {found.problems[0]}"
            )
        return result

    def _needs_internet_try(
        self, test: TestSpec, run: executor.TestRun, result: TestResult
    ) -> TestResult:
        """--needs-internet=try: a needs-internet test that exits non-zero is SKIP, as the
        network is not guaranteed (autopkgtest: a timeout or stderr still fails it)."""
        failed = result.verdict in (Verdict.FAIL, Verdict.FLAKY)
        if (
            self.options.needs_internet == "try"
            and test.has("needs-internet")
            and failed
            and not run.timed_out
            and run.returncode != 0
        ):
            return replace(
                result,
                verdict=Verdict.SKIP,
                reason="Failed, but test has needs-internet and that's not guaranteed",
            )
        return result

    def _save_outputs(
        self,
        test: TestSpec,
        env: executor.TestEnvironment,
        run: executor.TestRun,
        packages: str | None,
    ) -> None:
        outputs = self.outputs
        if not outputs.keeps_files:
            return
        outputs.write_test_streams(test.name, run.stdout, run.stderr)
        if packages is not None:
            outputs.write_test_packages(test.name, packages)
        if run.timed_out:
            return
        artifacts = outputs.artifacts_dir
        os.makedirs(artifacts, exist_ok=True)
        self.lifecycle.testbed.copyup(
            env.artifacts_dir(test) + "/",
            artifacts + "/",
            timeout=self.lifecycle.copy_timeout,
        )
        if not os.listdir(artifacts):
            os.rmdir(artifacts)
