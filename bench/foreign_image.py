#!/usr/bin/env python3
"""nestbed's QEMU testbed against autopkgtest 5.28's, both on the same autopkgtest-style image.

    python3 bench/foreign_image.py [--image PATH] [--runs N] [--tests N] [--skip-autopkgtest]

Every machine: TCG, `-cpu max -m 2048 -smp 2`; the image is the qcow2 that
tests/autopkgtest_image.py builds (or --image), booted through its own bootloader.

1. raw boot: plain qemu-system-x86_64 of the image on a fresh qcow2 overlay; clock started
   before the overlay is made, stopped at the first answer of setup-testbed's root shell on
   ttyS1 (probes with a nonce, at most every 0.5 s and only when QEMU has read the one
   before), and at `systemctl is-system-running --wait` answered through it;
2. nestbed cold ready: `nestbed-virt-qemu --cold-boot IMAGE`, server start to `open`
   answered; ratio to the raw boot;
3. nestbed first ready (no saved state: boot + save), then restored ready, revert, one `true`;
4. nestbed per-test overhead: (run of N `true` tests - run of 1) / (N - 1), each run
   `nestbed -B PKG -- qemu IMAGE` from the saved state; and a run of 2 tests whose first
   declares breaks-testbed against the same without;
5. autopkgtest 5.28 (`autopkgtest -d -B PKG -- qemu --qemu-command WRAPPER --ram-size 2048
   --cpus 2 --timeout-reboot 300 IMAGE`, the wrapper running TCG `-cpu max`): whole-run times
   of 1 and N tests -> its per-test overhead; its ready time and its reverts, read from its
   debug lines (`sending command to testbed: open|revert` -> `got reply from testbed`), each
   stamped by this script as it arrives on stderr; the extra time of one revert as the
   difference between a 2-test run whose first test has breaks-testbed and one without.
Medians over --runs (default 2), runs interleaved so load changes hit both sides alike.
Every process runs with TMPDIR in one private directory, removed on every exit path; the
children of each autopkgtest run are killed by process group.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from nestbed.image import ImagePaths
from nestbed.image.cache import default_root
from nestbed.image.foreign import disk_format
from nestbed.qemu.state import StateStore

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO / "tests"))  # bench/ itself is sys.path[0]

from qemu_testbed import BIN, ready, run_tests  # noqa: E402

from autopkgtest_image import ensure_autopkgtest_image  # noqa: E402
from tests_support import tcg_qemu_wrapper, write_package  # noqa: E402

QEMU = "qemu-system-x86_64"
MACHINE = ["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"]
BOOT_DEADLINE = 300.0
RAW_PROBE_EVERY = 0.5
RUN_TIMEOUT = 1800.0
NESTBED = str(BIN / "nestbed")


@dataclasses.dataclass(frozen=True)
class Target:
    """What qemu_testbed's ready()/run_tests() use of an ImagePaths: the path they hand to
    the server (here the foreign disk itself, not a directory)."""

    directory: Path


def fmt(values: Sequence[float]) -> str:
    if not values:
        return "     -"
    med = statistics.median(values)
    runs = ", ".join(f"{v:.2f}" for v in values)
    return f"{med:7.2f} s  ({runs})" if len(values) > 1 else f"{med:7.2f} s"


def say(text: str) -> None:
    print(text, flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- 1. raw boot -------------------------------------------------------------------------------
class ShellProbe:
    """The host end of the guest's ttyS1 (QEMU's unix socket), probed for a root shell.

    A probe is `echo "raw-ready" "NONCE"` (typed with quotes, answered without: the tty's
    echo of the probe cannot match its answer). A new probe goes out only when QEMU has read
    everything sent before (SIOCOUTQ of the socket is 0): while nothing in the guest reads
    ttyS1, QEMU stops reading the socket, and probes sent at a fixed rate would pile up and
    be answered one by one once the shell starts, delaying the answer that counts."""

    def __init__(self, path: Path, alive: Callable[[], bool], deadline: float) -> None:
        self.alive = alive
        self.buffer = b""
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                return
            except OSError:
                self.sock.close()
                if not alive() or time.monotonic() > deadline:
                    raise RuntimeError("raw boot: cannot connect to the ttyS1 socket") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.sock.close()

    def unread(self) -> int:
        return struct.unpack("i", fcntl.ioctl(self.sock, termios.TIOCOUTQ, b"\0" * 4))[0]

    def _read(self, seconds: float) -> None:
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            raise RuntimeError("raw boot: the ttyS1 socket closed")
        self.buffer = (self.buffer + data.replace(b"\r", b""))[-65536:]

    def wait_shell(self, deadline: float) -> None:
        """Until one of the probes sent is answered."""
        nonces: set[bytes] = set()
        last = 0.0
        while True:
            if not self.alive():
                raise RuntimeError("raw boot: qemu exited")
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw boot: no root shell on ttyS1: {self.buffer[-300:]!r}")
            now = time.monotonic()
            if now - last >= RAW_PROBE_EVERY and self.unread() == 0:
                nonce = secrets.token_hex(6).encode()
                nonces.add(nonce)
                self.sock.settimeout(5)
                self.sock.sendall(b'\x15echo "raw-ready" "' + nonce + b'"\n')
                last = now
            self._read(0.05)
            for found in re.finditer(rb"raw-ready ([0-9a-f]{12})\n", self.buffer):
                if found.group(1) in nonces:
                    return

    def run(self, command: str, deadline: float) -> str:
        """command's output (its stdout through the shell)."""
        nonce = secrets.token_hex(6)
        self.buffer = b""
        self.sock.settimeout(5)
        self.sock.sendall(f'\x15echo "raw-out" "{nonce}" "$({command})" "raw-end"\n'.encode())
        pattern = re.compile(rf"raw-out {nonce} (.*?) raw-end\n".encode())
        while not (found := pattern.search(self.buffer)):
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"raw boot: no answer to {command}: {self.buffer[-300:]!r}")
            self._read(0.2)
        return found.group(1).decode("utf-8", "replace")


def raw_boot(disk: Path, work: Path) -> tuple[float, float]:
    """(qemu start -> ttyS1 shell answers, -> is-system-running --wait answered)."""
    d = Path(tempfile.mkdtemp(prefix="raw-", dir=work))
    proc: subprocess.Popen[bytes] | None = None
    shell: ShellProbe | None = None
    try:
        start = time.monotonic()
        overlay = d / "overlay.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk_format(disk),
             "-b", str(disk.absolute()), str(overlay)],
            check=True,
        )  # fmt: skip
        sock = d / "ttyS1.sock"
        argv = [
            QEMU, "-nodefaults", "-no-user-config", "-display", "none", *MACHINE,
            "-drive", f"if=none,id=root,file={overlay},format=qcow2",
            "-device", "virtio-blk-pci,drive=root,bootindex=0",
            "-chardev", f"file,id=console,path={d / 'console.log'}",
            "-serial", "chardev:console",
            "-chardev", f"socket,id=shell,path={sock},server=on,wait=off",
            "-serial", "chardev:shell",
            "-device", "virtio-rng-pci",
            "-nic", "user,model=virtio-net-pci",
        ]  # fmt: skip
        with open(d / "qemu.stderr", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        running = proc
        deadline = start + BOOT_DEADLINE
        shell = ShellProbe(sock, lambda: running.poll() is None, deadline)
        shell.wait_shell(deadline)
        answered = time.monotonic() - start
        state = shell.run("systemctl is-system-running --wait", deadline)
        booted = time.monotonic() - start
        if state not in ("running", "degraded"):
            say(f"  (raw boot: is-system-running said {state!r})")
        return answered, booted
    finally:
        if shell is not None:
            shell.close()
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


# -- runs of a whole runner ---------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    seconds: float
    lines: list[tuple[float, str]]  # (seconds since start, stderr line)
    stdout: str

    def answers(self, command: str) -> list[tuple[float, float]]:
        """autopkgtest -d: (sent at, seconds to the reply) of each `command` sent."""
        found: list[tuple[float, float]] = []
        sent: float | None = None
        for t, line in self.lines:
            if re.search(rf"DBG: sending command to testbed: {command}\b", line):
                sent = t
            elif sent is not None and "DBG: got reply from testbed" in line:
                found.append((sent, t - sent))
                sent = None
            elif "DBG: sending command to testbed:" in line:
                sent = None
        return found


def timed(argv: Sequence[str], expect: str) -> Run:
    """Run argv in a session of its own (stderr lines time-stamped as they come); every
    process left in that session is killed afterwards, whatever happened."""
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out: list[bytes] = []
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr

    def read_err() -> None:
        for raw in iter(stderr.readline, b""):
            lines.append((time.monotonic() - start, raw.decode("utf-8", "replace").rstrip("\n")))

    def read_out() -> None:
        out.append(stdout.read())

    threads = [threading.Thread(target=f, daemon=True) for f in (read_err, read_out)]
    for t in threads:
        t.start()
    try:
        code = proc.wait(timeout=RUN_TIMEOUT)
        seconds = time.monotonic() - start
        for t in threads:
            t.join(timeout=30)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            if sig == signal.SIGTERM:
                time.sleep(2)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = b"".join(out).decode("utf-8", "replace")
    if code != 0 or not re.search(expect, text, re.M):
        tail = "\n".join(line for _, line in lines[-40:])
        raise RunFailed(code, f"{' '.join(argv)}: exit status {code}\n{text}\n{tail}", lines)
    return Run(seconds, lines, text)


class RunFailed(RuntimeError):
    def __init__(self, code: int, message: str, lines: list[tuple[float, str]]) -> None:
        super().__init__(message)
        self.code = code
        self.lines = lines


def true_tests(root: Path, n: int, breaks_first: bool = False) -> Path:
    """A source tree with n `true` tests (t0..), the first with breaks-testbed if asked."""
    control = "".join(
        f"Test-Command: true\nDepends:\nFeatures: test-name=t{i}\n"
        + ("Restrictions: breaks-testbed\n" if breaks_first and i == 0 else "")
        + "\n"
        for i in range(n)
    )
    return write_package(root, {}, control)


def all_pass(n: int) -> str:
    return "".join(rf"(?=[\s\S]*^t{i}\s+PASS\b)" for i in range(n))


# -- the benchmark ------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--image", type=Path, help="autopkgtest-style qcow2 (default: the fixture's)"
    )
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tests", type=int, default=6)
    parser.add_argument("--skip-autopkgtest", action="store_true")
    args = parser.parse_args()
    if args.tests < 2 or args.runs < 1:
        parser.error("--tests must be at least 2 and --runs at least 1")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    disk = (args.image or ensure_autopkgtest_image()).absolute()
    with tempfile.TemporaryDirectory(prefix="foreign-bench-") as tmp:
        work = Path(tmp)
        os.environ["TMPDIR"] = str(work)  # every child's temporary files go in here
        tempfile.tempdir = None
        return bench(disk, work, args.runs, args.tests, args.skip_autopkgtest)


def bench(disk: Path, work: Path, runs: int, n: int, skip_autopkgtest: bool) -> int:
    target = cast(ImagePaths, Target(disk))
    rows: list[tuple[str, str]] = []

    def row(what: str, value: str) -> None:
        rows.append((what, value))
        say(f"{what:<58} {value}")

    say(f"image {disk} ({disk_format(disk)}); machines TCG {' '.join(MACHINE[2:])}")
    say(f"medians of {runs} runs (runs in parentheses), {n} tests for the per-test overhead")
    say(f"load average at start: {loadavg()}")
    begin = time.monotonic()

    # 1 + 2, interleaved
    raws: list[tuple[float, float]] = []
    colds: list[float] = []
    for _ in range(runs):
        raws.append(raw_boot(disk, work))
        colds.append(ready(target, "--cold-boot")["ready"])
    row("raw boot: qemu start -> ttyS1 root shell answers", fmt([r[0] for r in raws]))
    row("raw boot: -> is-system-running --wait answered", fmt([r[1] for r in raws]))
    row("nestbed cold ready (--cold-boot; server start -> open)", fmt(colds))
    cold = statistics.median(colds)
    row(
        "  ratio cold ready / raw boot (shell answers; booted)",
        f"{cold / statistics.median([r[0] for r in raws]):.2f}"
        f"; {cold / statistics.median([r[1] for r in raws]):.2f}",
    )

    # 3
    store_for_disk: Any = getattr(StateStore, "for_disk", None)
    if store_for_disk is not None:
        store = store_for_disk(default_root(), disk)
        for d in store.root.glob(f"{store.prefix}-*"):
            StateStore.discard(d)
        row("nestbed first ready (no saved state: boot + save)", fmt([ready(target)["ready"]]))
    else:
        ready(target)  # an older nestbed: whatever it does without --cold-boot
    restored = [ready(target, reverts=3, execs=10) for _ in range(runs)]
    row("nestbed restored ready (server start -> open)", fmt([r["ready"] for r in restored]))
    row("nestbed revert (median of 3 per run)", fmt([r["revert"] for r in restored]))
    row("nestbed one `true` exec (best of 10 per run)", fmt([r["exec"] for r in restored]))

    # 4
    ones: list[float] = []
    manys: list[float] = []
    for _ in range(runs):
        ones.append(run_tests(target, 1))
        manys.append(run_tests(target, n))
    row("nestbed run of 1 `true` test", fmt(ones))
    row(f"nestbed run of {n} `true` tests", fmt(manys))
    row(
        "nestbed per-test overhead",
        fmt([(m - o) / (n - 1) for o, m in zip(ones, manys, strict=True)]),
    )
    plain = true_tests(work / "pkg-plain", 2)
    breaks = true_tests(work / "pkg-breaks", 2, breaks_first=True)
    nb_with: list[float] = []
    nb_without: list[float] = []
    for _ in range(runs):
        for pkg, into in ((breaks, nb_with), (plain, nb_without)):
            into.append(
                timed([NESTBED, "-B", str(pkg), "--", "qemu", str(disk)], all_pass(2)).seconds
            )
    row("nestbed 2 tests, first breaks-testbed", fmt(nb_with))
    row("nestbed 2 tests, none breaks-testbed", fmt(nb_without))
    row("  extra for one revert", fmt([w - o for w, o in zip(nb_with, nb_without, strict=True)]))

    # 5
    if not skip_autopkgtest:
        wrapper = tcg_qemu_wrapper(work)
        server = ["qemu", "--qemu-command", str(wrapper), "--ram-size", "2048", "--cpus", "2",
                  "--timeout-reboot", "300", str(disk)]  # fmt: skip
        say(f"autopkgtest: autopkgtest -d -B PKG -- {' '.join(server)}")

        failures: list[str] = []

        def apt(pkg: Path, tests: int) -> Run:
            """A run; one that ends in a testbed failure (exit 16) is noted and tried again,
            up to twice: autopkgtest-virt-qemu has fixed 30 s timeouts in its set-up."""
            for attempt in range(3):
                try:
                    return timed(
                        ["autopkgtest", "-d", "-B", str(pkg), "--", *server], all_pass(tests)
                    )
                except RunFailed as e:
                    if e.code != 16 or attempt == 2:
                        raise
                    why = [line for _, line in e.lines if "ERROR" in line or "Timeout" in line]
                    failures.append(f"{pkg.name}: {' / '.join(why[-2:])[:200]}")
                    say(f"  autopkgtest testbed failure, trying again: {failures[-1]}")
            raise AssertionError("unreachable")

        one_pkg = true_tests(work / "apt-1", 1)
        many_pkg = true_tests(work / "apt-n", n)
        apt_runs: list[Run] = []
        a_one: list[float] = []
        a_many: list[float] = []
        for _ in range(runs):
            for pkg, tests, into in ((one_pkg, 1, a_one), (many_pkg, n, a_many)):
                r = apt(pkg, tests)
                apt_runs.append(r)
                into.append(r.seconds)
        a_with: list[float] = []
        a_without: list[float] = []
        reverts: list[float] = []
        for _ in range(runs):
            for pkg, into in ((breaks, a_with), (plain, a_without)):
                r = apt(pkg, 2)
                apt_runs.append(r)
                into.append(r.seconds)
                if pkg is breaks:
                    reverts += [s for _, s in r.answers("revert")]
        opens = [r.answers("open") for r in apt_runs]
        row("autopkgtest run of 1 `true` test", fmt(a_one))
        row(f"autopkgtest run of {n} `true` tests", fmt(a_many))
        row(
            "autopkgtest per-test overhead",
            fmt([(m - o) / (n - 1) for o, m in zip(a_one, a_many, strict=True)]),
        )
        row(
            f"autopkgtest ready (its start -> open answered; {len(opens)} runs)",
            fmt([o[0][0] + o[0][1] for o in opens if o]),
        )
        row(
            "  of which its qemu server's open (sent -> answered)",
            fmt([o[0][1] for o in opens if o]),
        )
        row("autopkgtest 2 tests, first breaks-testbed", fmt(a_with))
        row("autopkgtest 2 tests, none breaks-testbed", fmt(a_without))
        row("  extra for one revert", fmt([w - o for w, o in zip(a_with, a_without, strict=True)]))
        row("autopkgtest revert (revert sent -> answered)", fmt(reverts))
        row("autopkgtest runs failed (testbed failure, run again)", str(len(failures)))
        for f in failures:
            say(f"  failed: {f}")

    say(f"load average at end: {loadavg()}; whole benchmark {time.monotonic() - begin:.0f} s")
    say("")
    width = max(len(w) for w, _ in rows)
    for what, value in rows:
        say(f"| {what:<{width}} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
