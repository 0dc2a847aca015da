"""nestbed-vm, the level-2 VM helper, driven on the host ("level 0") against the default
image directory: what a nested test sees (exit status, output, copies), and that nothing it
starts outlives it (--timeout, SIGTERM). The same code runs inside a nested testbed on
/lib/autopkgtest/baseimage; tests/nested/test_examples.py covers that."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nestbed.image import ImagePaths


def nestbed_vm() -> str:
    beside = Path(sys.executable).parent / "nestbed-vm"
    assert beside.exists(), "nestbed-vm is not installed (pip install -e .)"
    return str(beside)


KERNEL_REPORT = "WARNING: CPU: 0 PID: 1 at fs/nestbed.c:42 nestbed_fixture+0x0/0x10"


def _env(tmpdir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AUTOPKGTEST_BASEIMAGE", None)
    env["TMPDIR"] = str(tmpdir)  # nestbed-vm's private directory goes here: we can check it
    env.update(extra)
    return env


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (QEMU names its overlay in its
    command line, the virt server its overlay dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_nothing_left(tmpdir: Path) -> None:
    # the server and QEMU have exited before nestbed-vm does: no grace period needed
    assert _processes_mentioning(str(tmpdir)) == []
    assert list(tmpdir.iterdir()) == []


@pytest.fixture
def vm_tmp(tmp_path: Path) -> Path:
    d = tmp_path / "tmp"
    d.mkdir()
    return d


# ---- bad input: one line, exit 125, before anything starts -----------------------------------


def test_missing_image_is_one_line(vm_tmp: Path) -> None:
    res = subprocess.run(
        [nestbed_vm(), "--image", str(vm_tmp / "nope"), "--", "true"],
        capture_output=True, text=True, env=_env(vm_tmp), timeout=60,
    )  # fmt: skip
    assert res.returncode == 125
    assert res.stderr == f"nestbed-vm: error: no base image at {vm_tmp / 'nope'} (from --image)\n"
    assert res.stdout == ""
    assert_nothing_left(vm_tmp)


def test_image_from_the_environment_named_when_missing(vm_tmp: Path) -> None:
    env = _env(vm_tmp, AUTOPKGTEST_BASEIMAGE=str(vm_tmp / "gone"))
    res = subprocess.run(
        [nestbed_vm(), "true"], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 125
    assert res.stderr.splitlines() == [
        f"nestbed-vm: error: no base image at {vm_tmp / 'gone'} (from $AUTOPKGTEST_BASEIMAGE)"
    ]


@pytest.mark.skipif(
    os.path.exists("/lib/autopkgtest/baseimage"), reason="this machine has a base image"
)
def test_no_image_at_all_points_at_the_restriction(vm_tmp: Path) -> None:
    res = subprocess.run(
        [nestbed_vm(), "true"], capture_output=True, text=True, env=_env(vm_tmp), timeout=60
    )
    assert res.returncode == 125
    lines = res.stderr.splitlines()
    assert len(lines) == 1
    assert "needs-baseimage" in lines[0] and "/lib/autopkgtest/baseimage" in lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--timeout", "0", "true"], "--timeout: '0' is not positive"),
        (["--copy-in", "nocolon", "true"], "'nocolon' is not FROM:TO"),
        (["--copy-in", "/nonexistent/x:/root/x", "true"], "--copy-in /nonexistent/x: no such"),
        (["--ram-size", "64", "true"], "--ram-size must be at least 128"),
        (["--install", "hello,Bad_Name", "true"], "--install: 'Bad_Name' is not a package name"),
        (["--console-log", "/nonexistent/c.log", "true"], "--console-log /nonexistent/c.log: no"),
    ],
)
def test_bad_usage_is_one_line(vm_tmp: Path, args: list[str], says: str) -> None:
    env = _env(vm_tmp, AUTOPKGTEST_BASEIMAGE=str(vm_tmp))  # exists: usage is what fails
    res = subprocess.run([nestbed_vm(), *args], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 125
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("nestbed-vm: error: ") and says in lines[0]
    assert_nothing_left(vm_tmp)


def test_an_image_that_does_not_boot_is_one_line(vm_tmp: Path) -> None:
    bogus = vm_tmp.parent / "not-an-image"
    bogus.mkdir()
    res = subprocess.run(
        [nestbed_vm(), "--image", str(bogus), "true"],
        capture_output=True, text=True, env=_env(vm_tmp), timeout=120,
    )  # fmt: skip
    assert res.returncode == 125
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"nestbed-vm: error: cannot boot {bogus}: ")
    assert "Traceback" not in res.stderr
    assert_nothing_left(vm_tmp)


# ---- booting the image for real --------------------------------------------------------------


@pytest.mark.vm
def test_status_output_copies_and_install(nestbed_image: ImagePaths, vm_tmp: Path) -> None:
    """--install hello: the image lacks it; this machine's apt fetches it, the VM has it.
    --console-log keeps the VM's console; a kernel warning in it is reported (outside a test:
    on stderr; the runner's side is tests/run/test_kernlog.py)."""
    host = vm_tmp.parent
    (host / "in.txt").write_text("from the caller\n")
    script = (
        "cat /root/in.txt; hello; mkdir /root/out; uname -r > /root/out/kernel;"
        f" echo '<3>{KERNEL_REPORT}' > /dev/kmsg; echo to-stderr >&2; exit 3"
    )
    console = host / "level2-console.log"
    res = subprocess.run(
        [nestbed_vm(), "--image", str(nestbed_image.directory), "--timeout", "600",
         "--copy-in", f"{host / 'in.txt'}:/root/in.txt", "--copy-out", f"/root/out:{host / 'out'}",
         "--install", "hello", "--console-log", str(console), "--", "sh", "-c", script],
        capture_output=True, text=True, env=_env(vm_tmp), timeout=900,
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert res.stdout == "from the caller\nHello, world!\n"
    # nothing else of nestbed-vm's own: tests fail on stderr
    assert res.stderr == f"to-stderr\nnestbed-vm: level-2 kernel warning: {KERNEL_REPORT}\n"
    assert KERNEL_REPORT in console.read_text(errors="replace")
    assert "Linux version" in console.read_text(errors="replace")  # the boot, from its start
    assert (host / "out" / "kernel").read_text() == nestbed_image.manifest.kernel_version + "\n"
    assert_nothing_left(vm_tmp)


@pytest.mark.vm
def test_timeout_stops_the_vm(nestbed_image: ImagePaths, vm_tmp: Path) -> None:
    # 8 s ends the boot (20-40 s under TCG) half way: QEMU is running, nothing answers yet
    started = time.monotonic()
    res = subprocess.run(
        [nestbed_vm(), "--image", str(nestbed_image.directory), "--timeout", "8", "--",
         "echo", "never"],
        capture_output=True, text=True, env=_env(vm_tmp), timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert res.returncode == 124
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        "nestbed-vm: error: --timeout 8 s reached while booting; stopped the VM"
    ]
    assert elapsed < 8 + 30
    assert_nothing_left(vm_tmp)


@pytest.mark.vm
def test_sigterm_while_the_command_runs(nestbed_image: ImagePaths, vm_tmp: Path) -> None:
    proc = subprocess.Popen(
        [nestbed_vm(), "--image", str(nestbed_image.directory), "--timeout", "600", "--",
         "sh", "-c", "echo started; exec sleep 1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(vm_tmp),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        assert _processes_mentioning(str(vm_tmp)), "QEMU should be running now"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.decode().splitlines() == ["nestbed-vm: error: stopped the VM on signal SIGTERM"]
    assert_nothing_left(vm_tmp)
