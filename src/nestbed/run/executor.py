"""Running one test in the testbed: the script, streamed output, timeout, verdict."""

from __future__ import annotations

import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from nestbed import trace
from nestbed.errors import TestbedFailure
from nestbed.log import Console
from nestbed.proc import TimeoutExpired
from nestbed.report.results import TestResult, Verdict
from nestbed.run.capture import Capture
from nestbed.spec.model import TestSpec
from nestbed.testbed.client import Testbed, su_argv

# Time the testbed gets beyond --timeout-test to stop the test itself before we give up on it.
KILL_GRACE = 30.0


@dataclass(frozen=True)
class TestRun:
    """What the test did: exit status, its two output streams, and whether it ran out of time."""

    __test__ = False  # a data class, not a pytest test class

    returncode: int
    stdout: Capture  # spooled: a test may print more than fits in memory
    stderr: Capture
    timed_out: bool
    duration: float
    wrapper_notes: str
    argv: tuple[str, ...] = ()
    after_output: tuple[str, ...] = ()  # what `after` printed, for each run of the test

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()


def decide(test: TestSpec, run: TestRun, package: str = "") -> TestResult:
    """autopkgtest's verdict order: timeout; 77 + skippable; non-zero; stderr; pass.

    A flaky test's failure is FLAKY, not FAIL.
    """

    def result(verdict: Verdict, reason: str = "") -> TestResult:
        if verdict is Verdict.FAIL and test.has("flaky"):
            verdict = Verdict.FLAKY
        return TestResult(
            name=test.name,
            verdict=verdict,
            reason=reason,
            package=package,
            superficial=test.has("superficial"),
            duration=run.duration,
            restrictions=tuple(sorted(test.restrictions)),
            stdout=run.stdout.excerpt(),
            stderr=run.stderr.excerpt(),
        )

    if run.timed_out:
        return result(Verdict.FAIL, "timed out")
    if run.returncode == 77 and test.has("skippable"):
        return result(Verdict.SKIP, "exit status 77 and marked as skippable")
    if run.returncode != 0:
        return result(Verdict.FAIL, f"non-zero exit status {run.returncode}")
    if run.stderr and not test.has("allow-stderr"):
        return result(Verdict.FAIL, f"stderr: {run.stderr.first_line()}")
    return result(Verdict.PASS)


@dataclass(frozen=True)
class TestEnvironment:
    """Where a test runs in the testbed and as whom."""

    __test__ = False  # a data class, not a pytest test class

    tree: str  # the source tree in the testbed
    scratch: str
    wrapper: str  # path of wrapper.sh in the testbed
    user: str | None  # normal user (None: none available; "" means root, as autopkgtest)
    root_on_testbed: bool
    nproc: str
    extra_env: tuple[str, ...] = ()
    build_parallel: str | None = None

    def artifacts_dir(self, test: TestSpec) -> str:
        return f"{self.scratch}/{test.name}-artifacts"

    @property
    def tmp_dir(self) -> str:
        return f"{self.scratch}/autopkgtest_tmp"

    def wrapper_log(self, test: TestSpec) -> str:
        return f"{self.scratch}/{test.name}-wrapper.log"


def test_script(test: TestSpec, env: TestEnvironment, timeout: int, reboot_mark: str = "") -> str:
    """The shell script that sets autopkgtest's documented environment and runs the test."""
    q = shlex.quote
    artifacts = env.artifacts_dir(test)
    user = _user(test, env)
    lines = [
        "set -e",
        f"export USER={q(user)}" if user else "export USER=$(id -nu)",
        ". /etc/profile >/dev/null 2>&1 || true",
        ". ~/.profile >/dev/null 2>&1 || true",
        f"mkdir -p -m 1777 -- {q(artifacts)}",
        f"export AUTOPKGTEST_ARTIFACTS={q(artifacts)}",
        'export ADT_ARTIFACTS="$AUTOPKGTEST_ARTIFACTS"',
        f"mkdir -p -m 755 -- {q(env.tmp_dir)}",
        f"export AUTOPKGTEST_TMP={q(env.tmp_dir)}",
        'export ADTTMP="$AUTOPKGTEST_TMP"',
        "export DEBIAN_FRONTEND=noninteractive",
        "export LANG=C.UTF-8",
        f"export DEB_BUILD_OPTIONS=parallel={q(env.build_parallel or env.nproc)}",
        "unset LANGUAGE LC_CTYPE LC_NUMERIC LC_TIME LC_COLLATE LC_MONETARY LC_MESSAGES"
        " LC_PAPER LC_NAME LC_ADDRESS LC_TELEPHONE LC_MEASUREMENT LC_IDENTIFICATION LC_ALL",
        f"cd {q(env.tree)}",
    ]
    if test.has("needs-root") and env.user is not None:
        lines.append(f"export AUTOPKGTEST_NORMAL_USER={q(env.user)}")
        lines.append(f"export ADT_NORMAL_USER={q(env.user)}")
    if reboot_mark:
        lines.append(f"export AUTOPKGTEST_REBOOT_MARK={q(reboot_mark)}")
        lines.append('export ADT_REBOOT_MARK="$AUTOPKGTEST_REBOOT_MARK"')
    lines += [f"export {q(e)}" for e in env.extra_env]
    if test.path is not None:
        command = f"{env.tree}/{test.path}"
        lines.append(f"chmod +x {q(command)}")
        argv = [command]
    else:
        assert test.command is not None
        argv = ["bash", "-ec", test.command]
    wrapper = [env.wrapper, env.wrapper_log(test), str(timeout), *argv]
    lines.append("exec " + " ".join(q(a) for a in wrapper))
    return "; ".join(lines)


def _user(test: TestSpec, env: TestEnvironment) -> str | None:
    """Who runs the test, when the runner chooses (None: whoever the testbed runs us as)."""
    if not test.has("needs-root") and env.user:
        return env.user
    return "root" if env.root_on_testbed else None


def _run_as(test: TestSpec, env: TestEnvironment, script: str) -> list[str]:
    """su gives tests a proper login session, as root or as the normal user."""
    user = _user(test, env)
    return ["bash", "-c", script] if user is None else su_argv(user, script, shell="/bin/bash")


NOTES_MARKER = b"\0nestbed-wrapper-notes\0"


class StderrSplitter:
    """Passes the test's stderr on as it comes, and takes the wrapper's notes off its end
    (they follow NOTES_MARKER). Only bytes that may begin the marker are held back, so a
    test's output is never delayed unless it writes a NUL byte."""

    def __init__(self, sink: Callable[[bytes], None], store: Capture) -> None:
        self._sink = sink
        self._store = store
        self._held = b""
        self.notes = bytearray()
        self._in_notes = False

    def _emit(self, data: bytes) -> None:
        if data:
            self._store.write(data)
            self._sink(data)

    def feed(self, chunk: bytes) -> None:
        if self._in_notes:
            self.notes += chunk
            return
        data = self._held + chunk
        self._held = b""
        while True:
            at = data.find(b"\0")
            if at < 0:
                self._emit(data)
                return
            self._emit(data[:at])
            data = data[at:]
            if data.startswith(NOTES_MARKER):
                self._in_notes = True
                self.notes += data[len(NOTES_MARKER) :]
                return
            if NOTES_MARKER.startswith(data):  # may be the marker: wait for more
                self._held = data
                return
            self._emit(data[:1])  # a NUL of the test's own
            data = data[1:]

    def close(self) -> None:
        self._emit(self._held)
        self._held = b""


def run_test(
    testbed: Testbed,
    test: TestSpec,
    env: TestEnvironment,
    timeout: int,
    console: Console,
    reboot: Callable[[], None] | None = None,
    before: str = "",
    limit: Callable[[int], tuple[int, bool]] | None = None,
    after: str = "",
) -> TestRun:
    """Run the test, streaming its stdout and stderr to ours while recording each.

    `before`: shell commands the exec prefix's user runs first, in the same guest command
    that starts this test (removing what earlier tests left, marking the kernel log);
    `after`: shell commands it runs in that command once the test ended, whose output comes
    back in `TestRun.after_output` (the kernel log) -- every round trip costs ~0.2-0.5 s in
    an emulated VM, so a test costs one.
    A test that calls autopkgtest-reboot MARK is killed by it; then `reboot` (the caller's:
    reboot the testbed, set it up again) runs and the test runs again with
    AUTOPKGTEST_REBOOT_MARK=MARK, its output appended, as often as it asks. `limit` (the
    run's global timeout) may shorten `timeout` for each of those runs.
    """
    out, err, notes = Capture(), Capture(), bytearray()
    try:
        return _run_until_done(
            testbed, test, env, timeout, console, reboot, before, after, limit, out, err, notes
        )
    except BaseException:
        out.close()
        err.close()
        raise


def _run_until_done(
    testbed: Testbed,
    test: TestSpec,
    env: TestEnvironment,
    timeout: int,
    console: Console,
    reboot: Callable[[], None] | None,
    before: str,
    after: str,
    limit: Callable[[int], tuple[int, bool]] | None,
    out: Capture,
    err: Capture,
    notes: bytearray,
) -> TestRun:
    started = time.monotonic()
    mark = ""
    after_output: list[str] = []
    while True:
        this_run, capped = limit(timeout) if limit else (timeout, False)
        if capped:  # nothing left of the run's time (0 would mean none): time out at once
            this_run = max(this_run, 1)
        argv = _run_as(test, env, test_script(test, env, this_run, mark))
        # a re-run after a reboot keeps the test's files
        argv = around(argv, "" if mark else before, after)
        returncode, stuck, run_notes = _run_once(testbed, argv, out, err, this_run, console)
        run_notes, printed = take_after(run_notes)
        notes += run_notes
        if printed is not None:
            after_output.append(printed)
        if returncode in (254, 255) and not stuck:
            raise TestbedFailure(
                f"testbed failed while running test {test.name} (exit status {returncode})"
            )
        if reboot is None or stuck or returncode != 128 + signal.SIGKILL:
            break
        mark = _reboot_mark(testbed)
        if not mark:
            break
        console.info(f"test {test.name}: test process requested reboot with marker {mark}")
        reboot()
    duration = time.monotonic() - started
    text = notes.decode("UTF-8", "replace")
    timed_out = stuck or "timed-out" in text
    return TestRun(
        returncode, out, err, timed_out, duration, text, tuple(argv), tuple(after_output)
    )


# what the `after` commands printed follows this, after the wrapper's notes on stderr
AFTER_MARKER = b"\0nestbed-after\0"


def around(argv: list[str], before: str, after: str) -> list[str]:
    """argv run by a shell of the exec prefix's user between `before` and `after`, which
    prints AFTER_MARKER and after's output on stderr where the wrapper's notes go. One line:
    the command is quoted whole in a timeout's ERROR line."""
    if not after:
        return ["sh", "-c", f'{before}; exec "$@"', "sh", *argv] if before else argv
    # the runner's signals reach the whole group: this shell waits for the test's to end
    # (a trap runs once its foreground command is done), then reports and exits as it did
    marker = "".join(f"\\{b:03o}" if b < 32 else chr(b) for b in NOTES_MARKER + AFTER_MARKER)
    script = (
        f"trap : TERM INT HUP; {before + '; ' if before else ''}"
        f'"$@"; status=$?; {{ printf \'{marker}\'; {after}; }} >&2 2>/dev/null; exit $status'
    )
    return ["sh", "-c", script, "sh", *argv]


def take_after(notes: bytes) -> tuple[bytes, str | None]:
    """The wrapper's own notes, and what `after` printed (None: it did not run)."""
    wrapper_notes, got, printed = notes.partition(AFTER_MARKER)
    if not got:
        return notes, None
    return wrapper_notes.removesuffix(NOTES_MARKER), printed.decode("UTF-8", "replace")


def cleanup_script(paths: tuple[str, ...]) -> str:
    """`before` commands removing what earlier tests left at `paths`."""
    return f"rm -rf -- {' '.join(shlex.quote(p) for p in paths)}" if paths else ""


def _run_once(
    testbed: Testbed,
    argv: list[str],
    out: Capture,
    err: Capture,
    timeout: int,
    console: Console,
) -> tuple[int, bool, bytes]:
    """One run of the test command: exit status, whether the testbed stopped answering,
    and the wrapper's notes."""
    started = time.monotonic()
    stderr = StderrSplitter(console.write_stderr, err)

    def stdout(chunk: bytes) -> None:
        out.write(chunk)
        console.write_stdout(chunk)

    running = testbed.stream(argv, stdout=stdout, stderr=stderr.feed)
    hard_timeout = timeout + KILL_GRACE if timeout > 0 else None
    stuck = False
    try:
        returncode = running.wait(timeout=hard_timeout)
    except TimeoutExpired:
        # the in-testbed timeout should have fired long ago: the testbed is not answering
        stuck = True
        running.stop(grace=0)
        returncode = running.wait()
    except BaseException:
        # interrupted (Ctrl-C, SIGTERM): SIGTERM first, su passes it on to the test's own
        # session; the test must not outlive us
        running.stop(grace=5)
        raise
    stderr.close()
    if trace.enabled():
        trace.record("exec", "the test: " + shlex.join(argv[-3:]), started, time.monotonic())
    return returncode, stuck, bytes(stderr.notes)


def _reboot_mark(testbed: Testbed) -> str:
    """The mark autopkgtest-reboot(-prepare) left, if that is what killed the test."""
    marks = "/run/autopkgtest-reboot-mark /run/autopkgtest-reboot-prepare-mark"
    result = testbed.execute(["sh", "-c", f"cat {marks} 2>/dev/null"], timeout=100)
    return result.stdout.decode("UTF-8", "replace").strip().split("\n", 1)[0]
