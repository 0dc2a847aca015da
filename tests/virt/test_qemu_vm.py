"""nestbed-virt-qemu with real VMs: the protocol, the runner's verdicts against null, the
base image never written, faults and kills leaving nothing behind, autopkgtest driving it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from tests_support import sha256

pytestmark = pytest.mark.vm

FIXTURES = Path(__file__).parent.parent / "fixtures" / "packages"
BIN = Path(sys.executable).parent
SERVER = str(BIN / "nestbed-virt-qemu")
NESTBED = str(BIN / "nestbed")
RESULT = re.compile(r"^(\S+)\s+(PASS|FAIL|SKIP|FLAKY|ERROR)\b(.*)$")
RUN_TIMEOUT = 600


def results(text: str) -> list[str]:
    """The result lines (in the summary and the per-test ones), normalised spacing."""
    out = []
    for line in text.splitlines():
        m = RESULT.match(line)
        if m:
            out.append(f"{m.group(1)} {m.group(2)}{m.group(3).rstrip()}")
    return out


def nestbed(*args: str, timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:
    proc = subprocess.run(
        [NESTBED, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    return proc.returncode, proc.stdout, proc.stderr


def make_package(top: Path, tests: dict[str, str]) -> Path:
    """A source tree whose tests are needs-root shell scripts."""
    (top / "debian" / "tests").mkdir(parents=True)
    (top / "debian" / "changelog").write_text(
        "vmtest (1.0) unstable; urgency=low\n\n  * test\n\n"
        " -- Nobody <nobody@example.org>  Thu, 01 Jan 2026 00:00:00 +0000\n"
    )
    (top / "debian" / "control").write_text(
        "Source: vmtest\nMaintainer: Nobody <nobody@example.org>\n\n"
        "Package: vmtest\nArchitecture: all\nDescription: test\n test\n"
    )
    stanzas = []
    for name, script in tests.items():
        path = top / "debian" / "tests" / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)
        stanzas.append(f"Tests: {name}\nDepends:\nRestrictions: needs-root, allow-stderr\n")
    (top / "debian" / "tests" / "control").write_text("\n".join(stanzas))
    return top


def procs_mentioning(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline:
            found.append(int(entry.name))
    return found


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


# ---- the runner: same verdicts as null -------------------------------------------------

CASES = {
    "mixed": ("-B",),
    "timeout": ("-B", "--timeout-test=3"),
    "environment": ("-B", "--env", "FOO=bar"),
}


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_runner_verdicts_match_null(fixture: str, nestbed_image: ImagePaths) -> None:
    args = [*CASES[fixture], str(FIXTURES / fixture)]
    # null runs everything as root; the VM runs tests without needs-root as its normal user
    null_rc, null_out, _ = nestbed(*args, "--", "null")
    rc, out, err = nestbed(*args, "--", "qemu", str(nestbed_image.directory))
    expected, got = results(null_out), results(out)
    if fixture == "mixed":
        # null cannot revert, so it skips the breaks-testbed test that the VM runs
        assert "breaks-testbed SKIP" in " ".join(expected)
        expected = [r for r in expected if not r.startswith("breaks-testbed ")]
        assert "breaks-testbed FAIL non-zero exit status 1" in got
        got = [r for r in got if not r.startswith("breaks-testbed ")]
    assert got == expected, err[-3000:]
    assert rc == null_rc, err[-3000:]


# ---- the base image is never written ------------------------------------------------------


def test_base_image_unchanged_after_writing_everywhere(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    before = sha256(nestbed_image.disk)
    script = (
        "for d in /dev/vd?; do blockdev --setrw $d || true;"
        " dd if=/dev/urandom of=$d bs=1M count=16 seek=1 conv=fsync || true; done\n"
        "sync\n"
        "echo o > /proc/sysrq-trigger\n"  # power off: the guest is broken now anyway
        "sleep 600\n"
    )
    pkg = make_package(tmp_path / "pkg", {"scribble": script})
    rc, _out, err = nestbed(
        "-B", str(pkg), "--", "qemu", str(nestbed_image.directory), str(nestbed_image.disk)
    )
    assert rc == 16, err[-2000:]  # the testbed powered itself off
    assert sha256(nestbed_image.disk) == before


# ---- faults and kills leave nothing behind ----------------------------------------------


def _start_long_run(
    tmp_path: Path, image: ImagePaths, script: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    pkg = make_package(tmp_path / "pkg", {"long": script})
    log = tmp_path / "runner.log"
    with open(log, "wb") as f:
        runner = subprocess.Popen(
            [NESTBED, "-B", str(pkg), "--", "qemu", "--overlay-dir", str(overlays),
             str(image.directory)],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    wait_for(lambda: b"test long: [" in log.read_bytes(), 300, "the test started")
    return runner, overlays, log


def _nothing_left(overlays: Path) -> None:
    wait_for(lambda: not procs_mentioning(str(overlays)), 30, "every process gone")
    wait_for(lambda: not any(overlays.iterdir()), 10, "the overlay directory is empty")


def test_qemu_killed_mid_test_is_a_testbed_failure(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    runner, overlays, log = _start_long_run(tmp_path, nestbed_image, "sleep 600\n")
    try:
        qemu = [p for p in procs_mentioning(str(overlays))
                if b"qemu-system" in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
        assert len(qemu) == 1
        os.kill(qemu[0], signal.SIGKILL)
        assert runner.wait(90) == 16, log.read_text()[-2000:]
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    _nothing_left(overlays)


@pytest.mark.parametrize(
    ("sysrq", "says"),
    [
        ("c", "the guest kernel panicked"),
        # a reset nobody asked for (what a triple fault does): not a fresh boot to wait on
        ("b", "QEMU ended: the guest reset itself, no reboot was requested"),
        ("o", "QEMU ended: the guest powered off by itself"),
    ],
)
def test_guest_crash_is_a_testbed_failure(
    nestbed_image: ImagePaths, tmp_path: Path, sysrq: str, says: str
) -> None:
    script = f"sleep 2; echo {sysrq} > /proc/sysrq-trigger; sleep 600\n"
    runner, overlays, log = _start_long_run(tmp_path, nestbed_image, script)
    try:
        assert runner.wait(120) == 16, log.read_text()[-2000:]
        assert says in log.read_text(), log.read_text()[-2000:]
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    _nothing_left(overlays)


def test_runner_killed_leaves_nothing(nestbed_image: ImagePaths, tmp_path: Path) -> None:
    runner, overlays, _log = _start_long_run(tmp_path, nestbed_image, "sleep 600\n")
    assert procs_mentioning(str(overlays))
    runner.kill()  # SIGKILL of the runner alone, not its group
    runner.wait()
    _nothing_left(overlays)


# ---- autopkgtest's own runner drives the server ----------------------------------------


@pytest.mark.autopkgtest
def test_autopkgtest_drives_the_server(nestbed_image: ImagePaths, tmp_path: Path) -> None:
    if shutil.which("autopkgtest") is None:
        pytest.skip("autopkgtest is not installed")
    fixture = str(FIXTURES / "mixed")

    def autopkgtest(*virt: str) -> tuple[int, list[str], str]:
        # the image has no apt lists: autopkgtest's dependency install needs -U there
        update = ["-U"] if virt[0] != "null" else []
        proc = subprocess.run(
            ["autopkgtest", *update, "-B", fixture, "--", *virt],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
        )  # fmt: skip
        return proc.returncode, results(proc.stdout), proc.stderr

    null_rc, expected, _ = autopkgtest("null")
    rc, got, err = autopkgtest(SERVER, str(nestbed_image.directory))
    assert "breaks-testbed FAIL non-zero exit status 1" in got, err[-3000:]
    expected = [r for r in expected if not r.startswith("breaks-testbed ")]
    got = [r for r in got if not r.startswith("breaks-testbed ")]
    assert got == expected, err[-3000:]
    assert rc == null_rc


@pytest.mark.autopkgtest
def test_autopkgtest_reboot_marks(nestbed_image: ImagePaths, tmp_path: Path) -> None:
    """needs-reboot through autopkgtest's runner: the mark re-runs the test once, after a
    real reboot, with the tree and the artifacts kept. (One reboot: a second one is the
    same path in the server; nestbed's runner does two in tests/run/test_reboot.py.)"""
    if shutil.which("autopkgtest") is None:
        pytest.skip("autopkgtest is not installed")
    script = (
        "set -e\n"
        "boot=$(cat /proc/sys/kernel/random/boot_id)\n"
        'echo "run ${AUTOPKGTEST_REBOOT_MARK:-start}" >> "$AUTOPKGTEST_ARTIFACTS/runs"\n'
        'case "${AUTOPKGTEST_REBOOT_MARK:-}" in\n'
        '  "") echo "$boot" > "$AUTOPKGTEST_ARTIFACTS/boot0"; /tmp/autopkgtest-reboot m1 ;;\n'
        '  m1) test "$boot" != "$(cat "$AUTOPKGTEST_ARTIFACTS/boot0")"; echo done ;;\n'
        "esac\n"
    )
    pkg = make_package(tmp_path / "pkg", {"reboots": script})
    control = pkg / "debian" / "tests" / "control"
    control.write_text(control.read_text().replace("allow-stderr", "allow-stderr, needs-reboot"))
    out = tmp_path / "out"
    proc = subprocess.run(
        ["autopkgtest", "-U", "-o", str(out), "-B", str(pkg), "--", SERVER,
         str(nestbed_image.directory)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert "reboots PASS" in results(proc.stdout), proc.stderr[-3000:]
    assert proc.returncode == 0
    runs = (out / "artifacts" / "runs").read_text().split("\n")
    assert runs == ["run start", "run m1", ""]


def test_show_boot_puts_the_console_on_stderr_and_the_run_passes(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    """--show-boot on a cold boot: the console reaches stderr (the server's stderr is the
    runner's, as under autopkgtest, without -d too), never the protocol on stdout; the run
    passes as without it."""
    pkg = make_package(tmp_path / "pkg", {"t": "echo ran\n"})
    rc, out, err = nestbed("-B", str(pkg), "--", "qemu", "--show-boot", "--cold-boot",
                           str(nestbed_image.directory))  # fmt: skip
    assert (rc, results(out)) == (0, ["t PASS"]), err[-3000:]
    assert "Linux version" in err  # the kernel's first console line
    assert "Linux version" not in out


def test_isolation_machine_is_true_a_service_starts(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    """The capability a service test relies on: systemd is PID 1 and starts a unit."""
    pkg = make_package(tmp_path / "pkg", {
        "service": "set -e\nsystemd-run --unit=nestbed-svc sleep 300\n"
                   "systemctl is-active nestbed-svc\n[ \"$(cat /proc/1/comm)\" = systemd ]\n",
    })  # fmt: skip
    control = pkg / "debian" / "tests" / "control"
    control.write_text(control.read_text().replace("needs-root,", "needs-root, isolation-machine,"))
    rc, out, err = nestbed("-B", str(pkg), "--", "qemu", str(nestbed_image.directory))
    assert (rc, results(out)) == (0, ["service PASS"]), err[-3000:]


# ---- -j: several machines at once --------------------------------------------------------


def test_parallel_tests_run_on_separate_machines_and_an_interrupt_ends_them_all(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    """-j 3: the fixture's tests on three machines restored from the one ready state, each
    its own (host name, disk: the breaker's file is seen by no other test), results as a
    serial run gives them; then a SIGINT in the middle of such a run leaves nothing."""
    out = tmp_path / "out"
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    rc, stdout, err = nestbed(
        "-j", "3", "-B", "--env", "SLEEP=2", "-o", str(out), str(FIXTURES / "parallel"),
        "--", "qemu", "--overlay-dir", str(overlays), str(nestbed_image.directory),
    )  # fmt: skip
    assert rc == 4, err[-3000:]
    assert results(stdout) == [
        "sleeper-1 PASS", "sleeper-2 PASS", "breaker PASS", "clean-1 PASS", "clean-2 PASS",
        "noisy FAIL stderr: noisy says this on stderr",
    ]  # fmt: skip
    assert (out / "summary").read_text().split("\n")[:6] == [
        line for line in stdout.splitlines() if RESULT.match(line)
    ]
    hosts = {
        (out / f"{name}-stdout").read_text().split(" on ")[1].strip()
        for name in ("sleeper-1", "sleeper-2", "breaker", "clean-1", "clean-2")
    }
    assert len(hosts) >= 2, hosts  # more than one machine ran them
    assert "running up to 3 tests at once, on 3 testbeds" in err
    _nothing_left(overlays)

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    log = tmp_path / "runner.log"
    with open(log, "wb") as f:
        runner = subprocess.Popen(
            [NESTBED, "-j", "3", "-B", "--env", "SLEEP=600", str(FIXTURES / "parallel"),
             "--", "qemu", "--overlay-dir", str(overlays), str(nestbed_image.directory)],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(tmpdir)},
        )  # fmt: skip

    def machines() -> int:
        return sum(
            b"qemu-system" in Path(f"/proc/{p}/cmdline").read_bytes()
            for p in procs_mentioning(str(overlays))
        )

    try:
        wait_for(lambda: machines() == 3, 300, "three machines")
        time.sleep(3)  # their tests started
        runner.send_signal(signal.SIGINT)
        assert runner.wait(120) == -signal.SIGINT, log.read_text()[-3000:]
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    _nothing_left(overlays)
    assert os.listdir(tmpdir) == []


@pytest.mark.network
def test_a_source_package_by_name_on_nestbeds_image(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    """`nestbed -U hello -- qemu IMAGE`: the image keeps only deb lines, so the source is
    fetched through the deb-src twins nestbed adds for it; hello's tests run and pass."""
    out = tmp_path / "out"
    rc, stdout, err = nestbed(
        "-U", "-o", str(out), "hello", "--", "qemu", str(nestbed_image.directory)
    )
    assert (rc, results(stdout)) == (0, ["command1 PASS", "upstream-tests PASS"]), err[-3000:]
    assert (out / "testpkg-version").read_text().startswith("hello ")
