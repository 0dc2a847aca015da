"""One nestbed run: each package in turn, from its tree through its plan and tests to the
result lines, on one testbed (with -j, its tests on several: `parallel`); the errors that
end a run become its exit status here.

The pieces, each crossed once on a test's way from the command line to its result line:
`plan` (which tests, read once), `lifecycle` (the testbed), `testcase` (one test),
`outputs` (lines, files and the exit status they add up to).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping

from nestbed import errors
from nestbed.capabilities import WANT_BASEIMAGE, Cap
from nestbed.log import DEBUG, PLAIN, Console, HeldConsole
from nestbed.report.results import ExitStatus, TestResult, Verdict
from nestbed.run import build
from nestbed.run.deadline import SKIP_REASON, RunDeadline
from nestbed.run.lifecycle import TestbedLifecycle
from nestbed.run.options import PackageArg, RunOptions
from nestbed.run.outputs import HeldOutputs, RunOutputs, TestbedFacts, write_machine_results
from nestbed.run.parallel import ParallelRun, Worker, available_mib, testbeds_for
from nestbed.run.plan import TestPlan
from nestbed.run.testcase import TestCaseRunner
from nestbed.run.tree import Limits, SourceTree, prepare
from nestbed.signals import Interrupted, ShutdownOnSignals, die_of
from nestbed.spec.model import TestSpec
from nestbed.testbed.client import CommandTimeout

VERSION = "0.1.0"


def server_hints(declared: frozenset[str]) -> dict[str, str]:
    """What the virt server should know before it opens the testbed, from the restrictions
    the run's tests declare: a test that needs the base image gets it without a flag."""
    return {WANT_BASEIMAGE: "1"} if "needs-baseimage" in declared else {}


class Runner:
    """Everything one run owns; `close()` releases it all, whatever happened before."""

    def __init__(
        self, options: RunOptions, console: Console, server_env: Mapping[str, str]
    ) -> None:
        self.options = options
        self.console = console
        self.server_env = dict(server_env)
        self.outputs = RunOutputs(options, console)
        self.facts = TestbedFacts()
        self.lifecycle: TestbedLifecycle | None = None
        # what a badpkg line blames: every package and binary given so far
        self.blamed: list[str] = []
        # trees made in the testbed and built .debs are copied back here
        self.workdir = tempfile.mkdtemp(prefix="nestbed.work.")
        self._override_control = options.override_control
        # autopkgtest counts the global timeout from the testbed's start, boot included
        self.deadline = RunDeadline(options.global_timeout)

    def run(self) -> int:
        info = self.console.info
        outputs = self.outputs
        info(f"starting date and time: {time.strftime('%Y-%m-%d %H:%M:%S%z')}")
        info(f"version {VERSION}")
        info(f"host {socket.gethostname()}; command line: {shlex.join(sys.argv)}")
        if WANT_BASEIMAGE in self.server_env:
            self.console.debug("a test declares needs-baseimage: asking the testbed to export it")
        try:
            self.lifecycle = TestbedLifecycle(
                self.options, self.console, outputs, self.facts, self.server_env
            )
            self.lifecycle.open()
            for package in self.options.packages:
                if package.kind == "binary":
                    self._register_binary(package.path)
                else:
                    self._run_package(self.lifecycle, package)
        except errors.BadPackage as e:
            outputs.blame(self.blamed, str(e))
            self.console.error(f"erroneous package: {e}")
            outputs.summary_line(f"erroneous package: {e}")
            outputs.status.fail(e)
        except errors.TestbedFailure as e:
            self.console.error(f"testbed failure: {e}")
            outputs.summary_line(f"testbed failure: {e}")
            outputs.status.fail(e)
        except errors.NestbedError as e:
            self.console.error(str(e))
            outputs.summary_line(str(e))
            outputs.status.fail(e)
        except Exception as e:
            self.console.error("unexpected error:")
            outputs.summary_line("quitting: unexpected error, see log")
            if self.console.verbosity >= DEBUG:
                self.console.write_stderr(traceback.format_exc().encode())
            else:
                self.console.error(f"{type(e).__name__}: {e} (run with --debug for details)")
            outputs.status.fail(e)
        outputs.write_testinfo(self.facts)
        outputs.write_machine_results()
        return outputs.status.code

    def close(self) -> None:
        status = self.outputs.status
        try:
            if self.lifecycle is not None:
                self.lifecycle.close()
        except errors.NestbedError as e:
            self.console.error(f"closing the testbed: {e}")
            if status.code == errors.EXIT_OK:
                status.fail(e)
        finally:
            self.outputs.close()
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- one package ----------------------------------------------------------------------
    def _register_binary(self, path: str) -> None:
        assert self.lifecycle is not None
        self.blamed.append(f"arg:{path}")
        binary = self.lifecycle.binaries.register(path)
        self.blamed.append(f"deb:{binary.name}")

    def _prepare(
        self, life: TestbedLifecycle, package: PackageArg, console: Console | None = None
    ) -> SourceTree:
        limits = Limits(copy=life.copy_timeout, install=self.options.timeouts.install)
        return prepare(
            life.testbed, package, limits, self.workdir, console or self.console, life.user
        )

    def _run_package(self, life: TestbedLifecycle, package: PackageArg) -> None:
        console, outputs, status = self.console, self.outputs, self.outputs.status
        console.info(f"@@@@@@@@@@@@@@@@@@@@ {package.kind} {package.path}")
        self.blamed.append(package.path)
        life.check_user()
        life.reset(())
        life.binaries.publish(life.testbed, life.copy_timeout)  # the .debs given before it
        tree = self._prepare(life, package)
        if tree.name:
            console.info(f"testing package {tree.name} version {tree.version}")
            outputs.write_package_version(tree.name, tree.version)
        plan: TestPlan | None = None

        def read_plan() -> TestPlan:
            nonlocal plan
            if plan is None:  # once per package, when first needed
                plan = TestPlan.read(
                    tree.host,
                    life.facts.arch,
                    life.caps,
                    self.options.ignore_restrictions,
                    auto_control=self.options.auto_control,
                    console=self.console,
                    control_path=self._override_control,
                )
            return plan

        again = package  # what a revert's fresh testbed gets the tests' tree from
        if package.kind != "built-tree":  # a built tree is tested as it is
            self._build_if_needed(life, package, tree, read_plan)
        if self.options.validate:
            # autopkgtest: the control file parsed (an invalid one is badpkg), its skips
            # reported (not counted), nothing run
            for name, reason in read_plan().skips(self.options.only_tests):
                outputs.report(name, f"SKIP {reason}")
            outputs.report("*", "Test specification is valid")
            return
        if package.kind != "built-tree":
            again = self._keep_tree(life, package, tree)
        tests = self._select_tests(package, tree, read_plan())
        self._override_control = None  # --override-control is the first package's
        if not tests:
            if status.code == errors.EXIT_OK:
                outputs.report("*", "SKIP no tests in this package")
            status.finish_package(had_tests=False)
        else:
            self._run_tests(life, tests, tree, again)
            status.finish_package(had_tests=True)
        life.modified = True
        if console.verbosity >= 1:
            outputs.show_summary()

    def _run_tests(
        self, life: TestbedLifecycle, tests: list[TestSpec], tree: SourceTree, again: PackageArg
    ) -> None:
        """The package's tests in order on the run's testbed, or with -j on several."""
        testcases = TestCaseRunner(self.options, self.console, life, self.outputs, self.deadline)
        first = Worker(life, testcases, tree, 1)
        count = self._testbeds_for(life, len(tests))
        if count <= 1:
            for test in tests:
                self._run_test(first, test, again, self.console, self.outputs)
            return

        def open_more(
            number: int, console: HeldConsole, register: Callable[[TestbedLifecycle], None]
        ) -> Worker:
            more = TestbedLifecycle(
                self.options, console, self.outputs, TestbedFacts(), self.server_env
            )
            register(more)  # before it starts: an interrupt releases it
            more.binaries = life.binaries
            more.open()
            more.check_user()
            tree = self._prepare(more, again, console)
            runner = TestCaseRunner(self.options, console, more, self.outputs, self.deadline)
            return Worker(more, runner, tree, number)

        def run_test(
            worker: Worker, test: TestSpec, console: HeldConsole, out: HeldOutputs
        ) -> None:
            self._run_test(worker, test, again, console, out, f" (testbed {worker.number})")

        ParallelRun(self.console, self.outputs, first, count, open_more, run_test).run(tests)

    def _testbeds_for(self, life: TestbedLifecycle, tests: int) -> int:
        jobs = self.options.jobs
        if jobs > 1 and (self.options.shell or self.options.shell_fail):
            self.console.warning(f"-j {jobs}: with a shell (-s, --shell) one test at a time")
            return 1
        if jobs > 1 and not life.can(Cap.REVERT):
            # the tests' tree is copied into each testbed as into a reverted one
            self.console.warning(
                f"-j {jobs}: {life.testbed.name} cannot revert: one test at a time"
            )
            return 1
        free = available_mib() if jobs > 1 else 0
        return testbeds_for(jobs, tests, life.caps, life.testbed.name, self.console, free)

    def _run_test(
        self,
        worker: Worker,
        test: TestSpec,
        again: PackageArg,
        console: Console,
        outputs: RunOutputs,
        where: str = "",
    ) -> None:
        if self.deadline.exceeded:
            outputs.record(
                TestResult(test.name, Verdict.SKIP, SKIP_REASON, package=worker.tree.name)
            )
            return
        worker.use(console, outputs)
        console.info(f"test {test.name}: preparing testbed{where}")
        if worker.life.reset(test.depends):
            # a revert took the tree away with everything else
            worker.tree = self._prepare(worker.life, again, console)
        worker.testcases.run(worker.tree, test, self.blamed)

    def _keep_tree(
        self, life: TestbedLifecycle, package: PackageArg, tree: SourceTree
    ) -> PackageArg:
        """As autopkgtest, every test runs in the tree as it is now, built or not: where a
        revert would take it away, a copy on the host, copied into each reverted testbed
        (not made again from the source, which would also undo the build)."""
        if not life.can(Cap.REVERT):
            return package
        host = tempfile.mkdtemp(prefix="tests-tree.", dir=self.workdir)
        life.testbed.copyup(tree.testbed + "/", host + "/", timeout=life.copy_timeout)
        return PackageArg("built-tree", host, package.built_binaries)

    def _build_if_needed(
        self,
        life: TestbedLifecycle,
        package: PackageArg,
        tree: SourceTree,
        read_plan: Callable[[], TestPlan],
    ) -> None:
        """Build for the binaries (no -B), or because a test says build-needed."""
        if package.built_binaries:
            self.console.info("build needed for binaries")
        else:
            # autopkgtest reads the control file here as well, to see whether a runnable
            # test needs a build, and reports its skips then too: they appear twice in its
            # results, and so in ours, so that tools reading either see the same lines.
            plan = read_plan()
            for name, reason in plan.skips():
                self.outputs.report(name, f"SKIP {reason}")  # not counted: reported again
            if not plan.needs_build():
                self.console.info("build not needed")
                return
            self.console.info("build needed for tests")
        life.modified = True
        build_timeout, by_deadline = self.deadline.limit(self.options.timeouts.build)
        if by_deadline and build_timeout <= 0:
            raise errors.TestbedFailure("global timeout reached even before the build")
        try:
            built = build.build(
                life.testbed,
                tree.host,
                tree.testbed,
                life.facts.arch,
                life.user,
                self.console,
                parallel=self.options.build_parallel or life.facts.nproc or "1",
                extra_env=self.options.env,
                install_timeout=self.options.timeouts.install,
                build_timeout=build_timeout,
                wrapper=life.wrapper_path,
                gain_root=self.options.gain_root,
            )
        except CommandTimeout as e:
            if by_deadline:
                raise errors.TestbedFailure(f"global timeout reached: {e} (kind: build)") from None
            raise
        except errors.BadPackage:
            if self.options.shell_fail:  # autopkgtest: after a failed build too
                life.shell(tree.testbed)
            raise
        if package.built_binaries:
            debs = os.path.join(self.workdir, "debs")
            os.makedirs(debs, exist_ok=True)
            for deb in built:
                host = os.path.join(debs, os.path.basename(deb))
                life.testbed.copyup(deb, host, timeout=life.copy_timeout)
                life.binaries.register(host)
            life.binaries.publish(life.testbed, life.copy_timeout)

    def _select_tests(
        self, package: PackageArg, tree: SourceTree, plan: TestPlan
    ) -> list[TestSpec]:
        """Report the skips (they count this time), then the tests to run."""
        only = self.options.only_tests
        for name, reason in plan.skips(only):
            self.outputs.report(name, f"SKIP {reason}")
            self.outputs.status.add(TestResult(name, Verdict.SKIP, reason, package=tree.name))
        if only and not [t for t in plan.runnable if t.name in only]:
            self.console.error(
                f"{package.kind} {package.path} has no test matching --test-name {', '.join(only)}"
            )
        return plan.selected(self.options)


def run(options: RunOptions, declared_restrictions: frozenset[str] = frozenset()) -> int:
    """Run the tests `options` name; `declared_restrictions`, what the host could see of
    them before any testbed (run.prescan), decides the hints the virt server gets."""
    console = Console(options.verbosity)
    try:
        runner = Runner(options, console, server_hints(declared_restrictions))
    except OSError as e:
        logging.getLogger(__name__).error(str(e), extra={"style": PLAIN})
        status = ExitStatus()
        status.fail(e)
        with contextlib.suppress(OSError):  # the same paths just failed, most likely
            write_machine_results(options.json_file, options.junit_file, status, time.time())
        return errors.exit_code(e)
    try:
        with ShutdownOnSignals((signal.SIGINT, signal.SIGTERM)):
            try:
                return runner.run()
            except Interrupted as e:
                console.error(f"Received signal {e.signum}, cleaning up...")
                # close() releases the testbed; then die of the signal, as autopkgtest does
                runner.close()
                return die_of(e.signum)
    finally:
        runner.close()
