"""nestbed-vm: boot the testbed's base image as a VM of its own and run a command in it.

    nestbed-vm [options] [--] [COMMAND [ARG...]]

What a nested test calls inside a nestbed testbed (a test declaring `needs-baseimage`): it
boots the base image (default `$AUTOPKGTEST_BASEIMAGE`, then `/lib/autopkgtest/baseimage`)
as a "level-2" VM on a fresh throwaway overlay, runs COMMAND in it as root with its stdin,
stdout and stderr relayed to ours, stops the VM and exits with COMMAND's exit status.
Without COMMAND it gives an interactive root shell in the VM instead.

It drives the QEMU testbed's own virt server (`nestbed-virt-qemu --cold-boot`) through
`nestbed.testbed.client.Testbed`: the VM, its overlay, the accelerator choice (KVM where the
testbed has usable KVM, else TCG) and the command channel are that server's. Everything
it starts lives below one private directory and one server process, both released on
every way out: the command's end, `--timeout`, a boot failure, SIGTERM/SIGINT/SIGHUP.

Exit status (as timeout(1) uses 124/125):
  0-255  COMMAND's own; killed by signal N in the VM: 128+N; not found 127, not runnable 126
  124    --timeout reached (the VM was stopped)
  125    nestbed-vm itself failed: bad usage, no base image, the VM did not boot, the
         testbed was lost, a copy failed
  128+N  nestbed-vm got signal N (SIGINT 130, SIGTERM 143) and stopped the VM
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import shutil
import sys
import tempfile
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from nestbed import log, nestinstall
from nestbed.errors import NestbedError
from nestbed.proc import Process, TimeoutExpired, stop
from nestbed.run import kernlog
from nestbed.signals import Interrupted, ShutdownOnSignals
from nestbed.testbed.client import Testbed, resolve_virt_server

PROG = "nestbed-vm"
EXIT_TIMEOUT = 124
EXIT_FAILED = 125
DEFAULT_IMAGE = "/lib/autopkgtest/baseimage"
IMAGE_VARIABLE = "AUTOPKGTEST_BASEIMAGE"
DEFAULT_TIMEOUT = 900.0
DEFAULT_RAM_MB = 1024
# how long the command gets to end after its SIGTERM before its helper is killed
_TERM_GRACE = 5.0

_log = logging.getLogger(__name__)


class Failed(Exception):
    """nestbed-vm cannot go on: one line for the user, exit 125."""


class DeadlineReached(Exception):
    """--timeout ran out; `what` says during which step."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass(frozen=True)
class Copy:
    src: str
    dst: str


@dataclass(frozen=True)
class Options:
    image: str
    image_origin: str  # where the image path came from, for messages
    command: tuple[str, ...]
    timeout: float
    cpus: int
    ram_mb: int
    accel: str
    qemu_options: str
    copy_in: tuple[Copy, ...]
    copy_out: tuple[Copy, ...]
    install: tuple[str, ...]
    show_boot: bool
    console_log: str | None
    verbose: bool
    debug: bool


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _error(f"{message} (see {PROG} --help)")
        sys.exit(EXIT_FAILED)


def _copy_spec(value: str) -> Copy:
    src, sep, dst = value.partition(":")
    if not sep or not src or not dst:
        raise argparse.ArgumentTypeError(f"{value!r} is not FROM:TO")
    return Copy(src, dst)


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not positive")
    return number


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [options] [--] [COMMAND [ARG...]]",
        description=doc.split("\n\n")[2].replace("\n", " "),
        epilog="exit status: COMMAND's; 124 --timeout reached; 125 nestbed-vm failed "
        "(bad usage, no base image, boot failure, copy failure); 128+N signal N",
    )
    parser.add_argument(
        "--image",
        metavar="PATH",
        help=f"what to boot: the base image (a disk, or a nestbed image directory); "
        f"default ${IMAGE_VARIABLE}, then {DEFAULT_IMAGE}",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        metavar="SECS",
        help=f"overall deadline: boot, copies and command (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--cpus", type=int, default=None, help="virtual CPUs (default: 2 or fewer)")
    parser.add_argument(
        "--ram-size", type=int, default=DEFAULT_RAM_MB, metavar="MB",
        help=f"memory of the VM (default {DEFAULT_RAM_MB})",
    )  # fmt: skip
    parser.add_argument(
        "--accel", choices=("auto", "kvm", "tcg"), default="auto",
        help="auto (default): KVM where the testbed has usable KVM, else TCG",
    )  # fmt: skip
    parser.add_argument(
        "--copy-in", type=_copy_spec, action="append", default=[], metavar="HERE:VM",
        help="copy a file or directory into the VM before the command (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--copy-out", type=_copy_spec, action="append", default=[], metavar="VM:HERE",
        help="copy a file or directory out of the VM after the command (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--install", action="append", default=[], metavar="PKG[,PKG...]",
        help="install these packages in the VM before the command, with the dependencies it "
        "lacks, fetched by this machine's apt (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--qemu-options", default="", metavar="OPTS", help="extra QEMU options (one string)"
    )
    parser.add_argument(
        "--show-boot", action="store_true", help="copy the VM's boot console to stderr"
    )
    parser.add_argument(
        "--console-log", metavar="FILE",
        help="keep the VM's serial console (boot and kernel messages) in FILE",
    )  # fmt: skip
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="say what happens (accelerator, timings) on stderr",
    )  # fmt: skip
    parser.add_argument(
        "--debug", action="store_true",
        help="also the virt server's debugging output (its steps, with timings)",
    )  # fmt: skip
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str]) -> Options:
    args = _parser().parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.image:
        image, origin = args.image, "--image"
    elif os.environ.get(IMAGE_VARIABLE):
        image, origin = os.environ[IMAGE_VARIABLE], f"${IMAGE_VARIABLE}"
    else:
        image, origin = DEFAULT_IMAGE, "the default path"
    cpus = args.cpus if args.cpus is not None else min(2, os.cpu_count() or 1)
    if cpus < 1:
        raise Failed("--cpus must be at least 1")
    if args.ram_size < 128:
        raise Failed("--ram-size must be at least 128 (MB)")
    try:
        shlex.split(args.qemu_options)
    except ValueError as e:
        raise Failed(f"--qemu-options: {e}") from None
    try:
        install = nestinstall.check_names(args.install)
    except nestinstall.InstallError as e:
        raise Failed(str(e)) from None
    return Options(
        image=image,
        image_origin=origin,
        command=tuple(command),
        timeout=args.timeout,
        cpus=cpus,
        ram_mb=args.ram_size,
        accel=args.accel,
        qemu_options=args.qemu_options,
        copy_in=tuple(args.copy_in),
        copy_out=tuple(args.copy_out),
        install=tuple(install),
        show_boot=args.show_boot,
        console_log=os.path.abspath(args.console_log) if args.console_log else None,
        verbose=args.verbose or args.debug,
        debug=args.debug,
    )


def check_inputs(opts: Options) -> None:
    """What can be checked before anything boots: one line each."""
    for spec in opts.copy_in:
        if not os.path.exists(spec.src):
            raise Failed(f"--copy-in {spec.src}: no such file or directory")
    if opts.console_log and not os.path.isdir(os.path.dirname(opts.console_log)):
        raise Failed(f"--console-log {opts.console_log}: no such directory")
    if os.path.exists(opts.image):
        return
    if opts.image_origin == "the default path":
        raise Failed(
            f"no base image: ${IMAGE_VARIABLE} is not set and {DEFAULT_IMAGE} does not exist"
            " (does the test declare `Restrictions: needs-baseimage`?)"
        )
    raise Failed(f"no base image at {opts.image} (from {opts.image_origin})")


class NestedVM:
    """One run: the virt server, the VM it boots, the command, and their clean-up."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.deadline = time.monotonic() + opts.timeout
        self.started = time.monotonic()
        self.tmp: str | None = None
        self.testbed: Testbed | None = None
        self.proc: Process | None = None
        self.server_lines: deque[str] = deque(maxlen=20)

    # ---- messages --------------------------------------------------------------------------
    def say(self, message: str) -> None:
        _log.info(message)  # shown with -v (see main)

    def _server_said(self, line: str) -> None:
        # the server's own lines, relayed as they are
        self.server_lines.append(line)
        if self.opts.verbose or (self.opts.show_boot and not line.startswith("nestbed-virt-")):
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()

    def remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineReached(what)
        return left

    # ---- steps -----------------------------------------------------------------------------
    def server_argv(self) -> list[str]:
        try:
            server = resolve_virt_server("qemu")
        except NestbedError as e:
            raise Failed(str(e)) from None
        assert self.tmp is not None
        argv = [
            *server, "--cold-boot",
            "--cpus", str(self.opts.cpus), "--ram-size", str(self.opts.ram_mb),
            "--accel", self.opts.accel, "--overlay-dir", self.tmp,
            "--timeout-reboot", f"{max(1.0, self.remaining('starting')):.0f}",
        ]  # fmt: skip
        if self.opts.qemu_options:
            argv += ["--qemu-options", self.opts.qemu_options]
        if self.opts.show_boot:
            argv.append("--show-boot")
        argv += ["--console-log", self.console_path()]
        if self.opts.debug:
            argv.append("--debug")
        return [*argv, os.path.abspath(self.opts.image)]

    def boot(self) -> Testbed:
        # everything the server makes (overlay, sockets, logs) goes below this directory,
        # which is removed at the end even if the server had to be killed
        self.tmp = tempfile.mkdtemp(prefix="nestbed-vm-")
        tb = Testbed(self.server_argv(), log=self._server_said)
        self.testbed = tb
        self.say(f"booting {self.opts.image} (deadline {self.opts.timeout:g} s)")
        try:
            tb.start()
            tb.open(timeout=self.remaining("booting"))
        except NestbedError as e:
            if time.monotonic() >= self.deadline:
                raise DeadlineReached("booting") from None
            raise Failed(f"cannot boot {self.opts.image}: {e}") from None
        self.say(f"VM ready in {time.monotonic() - self.started:.1f} s")
        return tb

    def copy(self, tb: Testbed, spec: Copy, *, down: bool) -> None:
        what = f"copying {spec.src} {'into' if down else 'out of'} the VM"
        try:
            if down:
                is_dir = os.path.isdir(spec.src)
            else:
                kind = self.guest_kind(tb, spec.src, what)
                if kind is None:
                    raise Failed(f"--copy-out {spec.src}: no such file or directory in the VM")
                is_dir = kind == "dir"
            src, dst = spec.src.rstrip("/") or "/", spec.dst.rstrip("/") or "/"
            if is_dir:
                src, dst = src + "/", dst + "/"
            timeout = self.remaining(what)
            if down:
                tb.copydown(src, dst, timeout=timeout)
            else:
                tb.copyup(src, dst, timeout=timeout)
        except NestbedError as e:
            if time.monotonic() >= self.deadline:
                raise DeadlineReached(what) from None
            flag = "--copy-in" if down else "--copy-out"
            raise Failed(f"{flag} {spec.src}:{spec.dst} failed: {e}") from None
        self.say(f"{what}: done")

    def install(self, tb: Testbed) -> None:
        """--install: apt here fetches what the VM lacks; dpkg in the VM installs it."""
        what = f"installing {' '.join(self.opts.install)}"
        assert self.tmp is not None
        work = tempfile.mkdtemp(prefix="install-", dir=self.tmp)
        try:
            status = tb.execute(["cat", "/var/lib/dpkg/status"], timeout=self.remaining(what))
            if status.returncode != 0:
                raise Failed(f"--install: cannot read the VM's dpkg status: {status.stderr!r}")
            debs = nestinstall.download(
                list(self.opts.install), status.stdout, Path(work), self.remaining(what)
            )
            self.say(f"{what}: {len(debs)} package(s) to copy into the VM")
            if not debs:
                return
            guest = nestinstall.GUEST_DIR
            tb.copydown(str(debs[0].parent) + "/", guest + "/", timeout=self.remaining(what))
            res = tb.execute(["sh", "-c", nestinstall.INSTALL_SCRIPT], timeout=self.remaining(what))
            if res.returncode != 0:
                out = (res.stdout + res.stderr).decode(errors="replace").strip().splitlines()
                raise Failed(f"--install: dpkg in the VM failed: {' | '.join(out[-3:])}")
        except nestinstall.InstallError as e:
            raise Failed(str(e)) from None
        except (NestbedError, TimeoutExpired) as e:
            if time.monotonic() >= self.deadline:
                raise DeadlineReached(what) from None
            raise Failed(f"--install failed: {e}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.say(f"{what}: done")

    def guest_kind(self, tb: Testbed, path: str, what: str) -> str | None:
        """'dir', 'file' or None (missing): asked first, as a copy of a missing path
        from the VM would take the testbed down."""
        script = 'if [ -d "$1" ]; then echo dir; elif [ -e "$1" ]; then echo file; fi'
        res = tb.execute(["sh", "-c", script, "sh", path], timeout=self.remaining(what))
        answer = res.stdout.decode(errors="replace").strip()
        return answer or None

    def guest_argv(self) -> tuple[list[str], bool]:
        """The command to run in the VM, and whether our terminal goes raw for it."""
        if self.opts.command:
            return list(self.opts.command), False
        if os.isatty(0) and os.isatty(1):
            # a terminal in the VM too: script(1) gives the shell a pty there, and ours
            # goes raw so keys (Ctrl-C too) reach the VM's terminal as typed
            size = os.get_terminal_size(1)
            term = os.environ.get("TERM", "vt100")
            inner = f"stty rows {size.lines} cols {size.columns}; exec bash -l"
            return ["env", f"TERM={term}", "script", "-qec", inner, "/dev/null"], True
        return ["bash", "-l"], False

    def run_command(self, tb: Testbed) -> int:
        argv, raw = self.guest_argv()
        self.say(f"running {shlex.join(argv)}")
        # the helper gets our stdin, stdout and stderr: the command's output is ours
        self.proc = tb.popen(argv, stdin=None, stdout=None, stderr=None)
        with _raw_terminal(raw):
            try:
                status = self.proc.wait(self.remaining("running the command"))
            except TimeoutExpired:
                raise DeadlineReached("running the command") from None
        self.proc = None
        if status < 0:  # the helper was killed by a signal (not by us)
            status = 128 - status
        if status == 255 and not self.alive(tb):
            # the exec helper itself failed (its only status of its own): the VM is gone
            raise Failed("lost the VM while running the command")
        return status

    def console_path(self) -> str:
        assert self.tmp is not None
        return self.opts.console_log or os.path.join(self.tmp, "console.log")

    def report_kernel_warnings(self) -> None:
        """Level 2's kernel problem reports, from its console: inside a test (as root),
        written to level 1's kernel log, where the runner finds them as it finds level 1's
        own (--kernel-warnings); elsewhere on stderr."""
        try:
            with open(self.console_path(), "rb") as f:
                text = f.read().decode("UTF-8", "replace")
        except OSError as e:
            _error(f"cannot read the VM's console: {e.strerror}")
            return
        lines = [kernlog.LEVEL2_PREFIX + line for line in kernlog.console_problems(text)]
        if not lines:
            return
        if "AUTOPKGTEST_TMP" in os.environ and os.access("/dev/kmsg", os.W_OK):
            try:
                for line in lines:
                    with open("/dev/kmsg", "w") as kmsg:  # one write, one record
                        kmsg.write(f"<4>{line}\n")
                return
            except OSError:
                pass
        for line in lines:
            _log.warning(line.removeprefix("nestbed-vm: "))

    def alive(self, tb: Testbed) -> bool:
        try:
            return (
                tb.execute(
                    ["true"], timeout=min(30.0, self.remaining("checking the VM"))
                ).returncode
                == 0
            )
        except NestbedError:
            return False

    def run(self) -> int:
        tb = self.boot()
        if self.opts.install:
            self.install(tb)
        for spec in self.opts.copy_in:
            self.copy(tb, spec, down=True)
        status = self.run_command(tb)
        self.say(f"command exited with status {status}")
        self.report_kernel_warnings()
        for spec in self.opts.copy_out:
            try:
                self.copy(tb, spec, down=False)
            except Failed as e:
                if status == 0:
                    raise
                # the command's failure is the news; the missing copy is a consequence
                _error(str(e))
        self.shutdown(polite=True)
        return status

    # ---- clean-up --------------------------------------------------------------------------
    def _stop_command(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # the helper forwards SIGTERM to the command; if it does not end, kill the helper
        # (the server then kills the command), and the VM goes with the server anyway
        stop(proc, grace=_TERM_GRACE, kill_wait=None)

    def shutdown(self, polite: bool) -> None:
        """Release everything; `polite` asks the server to quit, which stops QEMU and
        removes the overlay. Never raises but for a polite quit that failed."""
        tb, self.testbed = self.testbed, None
        try:
            self._stop_command()
            if tb is not None:
                if polite:
                    try:
                        tb.quit()
                    except NestbedError as e:
                        raise Failed(f"stopping the VM: {e}") from None
                else:
                    tb.release()
        finally:
            if tb is not None:
                tb.release()  # idempotent: a failed quit still releases the server
            tmp, self.tmp = self.tmp, None
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.say(f"VM stopped after {time.monotonic() - self.started:.1f} s")


@contextlib.contextmanager
def _raw_terminal(raw: bool) -> Iterator[None]:
    if not raw:
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _error(message: str) -> None:
    _log.error(message)


def main(argv: Sequence[str] | None = None) -> int:
    log.setup(PROG, log.PLAIN, quiet=True)  # errors only, until the options say more
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        check_inputs(opts)
    except Failed as e:
        _error(str(e))
        return EXIT_FAILED
    # -v: our steps; --debug (implies -v): every module's debug lines, commands run too
    log.setup(PROG, log.PLAIN, debug=opts.debug, quiet=not opts.verbose)
    vm = NestedVM(opts)
    with ShutdownOnSignals() as guard:  # SIGTERM, SIGINT, SIGHUP
        status: int
        try:
            try:
                status = vm.run()
            finally:
                guard.finish()  # the shutdown below must not be cut short by a signal
        except Interrupted as e:
            vm.shutdown(polite=False)
            _error(f"stopped the VM on signal {e.signal_name}")
            return 128 + e.signum
        except DeadlineReached as e:
            vm.shutdown(polite=False)
            _error(f"--timeout {opts.timeout:g} s reached while {e.what}; stopped the VM")
            return EXIT_TIMEOUT
        except Failed as e:
            vm.shutdown(polite=False)
            _error(str(e))
            return EXIT_FAILED
        except BaseException:
            vm.shutdown(polite=False)
            raise
        if guard.received is not None:
            # arrived during the polite shutdown: everything is released already
            return 128 + guard.received
        return status


def console_main() -> NoReturn:
    sys.exit(main())


def build_parser() -> argparse.ArgumentParser:
    """The parser --help prints; the man page (nestbed.manpage) is made from it too."""
    return _parser()


if __name__ == "__main__":
    console_main()
