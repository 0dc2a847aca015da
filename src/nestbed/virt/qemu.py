"""nestbed-virt-qemu: a QEMU virtual machine as the testbed.

    nestbed-virt-qemu [options] IMAGE [IMAGE...]

The first IMAGE (a nestbed image directory, or the disk.img inside one) is booted through a
throwaway qcow2 overlay in a private temporary directory: the image itself is opened
read-only and never written. Further images are attached read-only after it, in order, as
virtio disks with serials nestbed-extra1, nestbed-extra2, ...

Commands run through the guest's control agent on a virtio-serial port (docs/agent.md),
never through the serial console. The exec prefix is a small helper
(`nestbed.qemu.execclient`) that connects to this server's private unix socket; the server
multiplexes all helpers onto the one agent channel (`nestbed.qemu.mux`). Copies are tar
streams through the agent. Revert throws the overlay away and boots a fresh one; reboot
waits for the agent of the next boot. docs/qemu.md has the details.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import os
import secrets
import shlex
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, ClassVar, NoReturn

from nestbed.errors import NestbedError
from nestbed.guest.agent import T
from nestbed.guest.channel import ChannelError, _safe_extract
from nestbed.image.cache import ImagePaths
from nestbed.qemu import accel as accel_mod
from nestbed.qemu.execclient import StreamError, connect, helper_argv, stream
from nestbed.qemu.machine import Drive, Machine, MachineConfig, MachineError
from nestbed.qemu.mux import Mux, MuxDead
from nestbed.qemu.state import ReadyState, StateStore, state_key
from nestbed.testbed.protocol import (
    COPY_FAILED,
    CommandFailed,
    ServerFailure,
    VirtServer,
    run_server,
)

NORMAL_USER = "nestbed"
EXTRA_SERIAL = "nestbed-extra{}"
_PR_SET_PDEATHSIG = 1


def _disk_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


class QemuServer(VirtServer):
    name: ClassVar[str] = "qemu"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-c", "--cpus", type=int, default=2, help="virtual CPUs (default 2)")
        parser.add_argument(
            "--ram-size", type=int, default=2048, metavar="MB", help="memory (default 2048)"
        )
        parser.add_argument(
            "--accel",
            choices=accel_mod.ACCELS,
            default="auto",
            help="auto (default): KVM only where it can really run the guest, else TCG",
        )
        parser.add_argument("--qemu-cpu", metavar="MODEL", help="-cpu (default host/max)")
        parser.add_argument(
            "--qemu-command", default="qemu-system-x86_64", help="QEMU program to run"
        )
        parser.add_argument(
            "--qemu-options", default="", metavar="OPTS", help="extra QEMU options (one string)"
        )
        parser.add_argument(
            "--timeout-reboot", type=float, default=300, metavar="S", help="boot timeout (300)"
        )
        parser.add_argument(
            "--show-boot", action="store_true", help="copy the boot console to stderr"
        )
        parser.add_argument(
            "--overlay-dir", metavar="DIR", help="where the temporary overlay directory goes"
        )
        parser.add_argument(
            "--cold-boot",
            action="store_true",
            help="boot every testbed; neither use nor save a ready state",
        )
        parser.add_argument("images", nargs="+", metavar="IMAGE", help="image(s); first boots")

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        try:
            self.image = ImagePaths.load(Path(args.images[0]))
        except NestbedError as e:
            raise ServerFailure(str(e)) from None
        extra: list[Drive] = []
        for i, name in enumerate(args.images[1:], 1):
            path = Path(name)
            if not path.is_file():
                raise ServerFailure(f"{name}: no such image file")
            extra.append(Drive(path.absolute(), EXTRA_SERIAL.format(i), _disk_format(path)))
        if args.cpus < 1 or args.ram_size < 128:
            raise ServerFailure("--cpus must be at least 1 and --ram-size at least 128")
        if args.overlay_dir and not os.path.isdir(args.overlay_dir):
            raise ServerFailure(f"--overlay-dir {args.overlay_dir}: not a directory")
        self.accel = accel_mod.choose(args.accel)
        self.warn(self.accel.describe())
        self.config = MachineConfig.for_image(
            self.image,
            memory_mb=args.ram_size,
            cpus=args.cpus,
            accel=self.accel.name,
            cpu=args.qemu_cpu or self.accel.cpu,
            qemu=args.qemu_command,
            extra_args=tuple(shlex.split(args.qemu_options)),
        )
        self.config = dataclasses.replace(self.config, drives=self.config.drives + tuple(extra))
        self.states = StateStore(self.image.directory)
        # the machine's shape: its command line with the per-run paths left out
        self.shape = [
            *Machine(dataclasses.replace(self.config, drives=())).shape(),
            *(f"drive:{d.serial}:{d.format}:{d.readonly}" for d in self.config.drives),
        ]
        qemu = shutil.which(self.config.qemu) or self.config.qemu
        self.state_key = state_key(
            self.image.manifest.to_json(), self.image.disk, Path(qemu), self.shape
        )
        self.machine: Machine | None = None
        self.mux: Mux | None = None
        self.boot_id = ""

    # ---- capabilities and exec ------------------------------------------------------------
    def capabilities(self) -> list[str]:
        return [
            "revert",
            "revert-full-system",
            "root-on-testbed",
            "isolation-machine",
            "reboot",
            f"suggested-normal-user={NORMAL_USER}",
        ]

    def exec_prefix(self) -> list[str]:
        mux = self._mux()
        return helper_argv(os.fspath(mux.listen_path))

    def _mux(self) -> Mux:
        if self.mux is None:
            raise ServerFailure("the testbed is not running")
        if self.mux.dead:
            raise ServerFailure(self._explain(self.mux.dead))
        return self.mux

    # ---- life cycle ----------------------------------------------------------------------
    def open_testbed(self, scratch: str | None) -> str:
        made = self._boot(scratch)
        self.debug(f"scratch dir {made}")
        return made

    def _boot(self, scratch: str | None) -> str:
        """Ready the testbed and make (or remake) the scratch dir: restore the saved ready
        state when there is a good one, else boot cold and save one for next time."""
        started = time.monotonic()
        state = None if self.args.cold_boot else self.states.lookup(self.state_key)
        if state is not None:
            try:
                self._launch(state)
                made = self._refresh(scratch)
                self.debug(f"testbed restored in {time.monotonic() - started:.2f} s")
                return made
            except ServerFailure as e:
                self.warn(f"the saved ready state is unusable ({e}); booting cold to replace it")
                self.close_testbed()
                self.states.remove(self.state_key)
        self._boot_cold()
        self.debug(f"testbed booted in {time.monotonic() - started:.1f} s")
        if not self.args.cold_boot:
            return self._save_ready_state(scratch)
        return self.make_scratch(scratch)

    def _boot_cold(self) -> None:
        self._launch(None)
        self._start_mux()
        self._wait_system_running()

    def _launch(self, state: ReadyState | None) -> None:
        overlay_dir = Path(self.args.overlay_dir) if self.args.overlay_dir else None
        config = self.config
        if state is not None:
            incoming = f"exec:cat {shlex.quote(os.fspath(state.state))}"
            config = dataclasses.replace(
                config,
                root=state.disk,
                root_format="qcow2",
                extra_args=(*config.extra_args, "-incoming", incoming),
            )
        with self.critical():
            machine = Machine(config, tmp_parent=overlay_dir)
            self.machine = machine
        shower = _ConsoleShower(machine) if self.args.show_boot and state is None else None
        try:
            machine.launch(
                timeout=self.args.timeout_reboot if state is None else 60,
                before_connect=machine.resume_incoming if state is not None else None,
            )
        except MachineError as e:
            what = "restore the saved state of" if state else "boot"
            raise ServerFailure(f"cannot {what} {self.image.directory}: {e}") from None
        finally:
            if shower is not None:
                shower.stop()
        self.boot_id = str(machine.channel.info.get("boot_id", ""))

    def _start_mux(self) -> None:
        """From here on every command goes through the exec helpers and the multiplexer."""
        machine = self.machine
        assert machine is not None
        with self.critical():
            self.mux = Mux(
                machine.channel.sock,
                machine.path("exec.sock"),
                console_log=machine.console_log,
                agent_path=machine.control_socket,
                alive=lambda: machine.running,
            )
            self.mux.start()

    def _save_ready_state(self, scratch: str | None) -> str:
        """Freeze the freshly booted machine into a ready state, then continue from it (a
        restored testbed, like every later one), so the first run tests what later runs get."""
        machine, mux = self.machine, self.mux
        assert machine is not None and mux is not None
        started = time.monotonic()
        try:
            staging = self.states.staging()
        except OSError as e:
            self.warn(f"cannot save the ready state (continuing without): {e}")
            return self.make_scratch(scratch)
        try:
            # nothing may write the disk between the memory snapshot and the copy
            self.execute(["sync"], timeout=60)
            mux.stop()
            self.mux = None
            machine.save_state(staging / "state.bin")
            shutil.copyfile(machine.overlay, staging / "disk.qcow2")
            facts: dict[str, object] = {"image": str(self.image.directory), "shape": self.shape}
            state = self.states.commit(staging, self.state_key, facts)
        except BaseException as e:  # a signal too: no half-saved state left in the cache
            self.states.discard(staging)
            if not isinstance(e, OSError | MachineError):
                raise
            self.warn(f"cannot save the ready state ({e}); booting cold")
            self.close_testbed()
            self._boot_cold()
            return self.make_scratch(scratch)
        self.debug(f"ready state saved in {time.monotonic() - started:.1f} s: {state}")
        self.close_testbed()
        if state is None:
            self._boot_cold()
            return self.make_scratch(scratch)
        self._launch(state)
        return self._refresh(scratch)

    def _refresh(self, scratch: str | None) -> str:
        """After a restore, before anything else runs: fix what the restore left stale --
        the clock, the entropy pool, the machine's identity (every restored testbed would
        otherwise share them) -- and make the scratch dir; one round trip on the channel,
        before the multiplexer takes it over. Returns the scratch dir."""
        machine = self.machine
        assert machine is not None
        machine_id = secrets.token_hex(16)
        name = f"nestbed-{machine_id[:8]}"
        entropy = "".join(f"\\{b:03o}" for b in os.urandom(64))  # printf octal escapes
        made = scratch or f"/tmp/nestbed.{secrets.token_hex(4)}"
        # every guest exec costs ~0.1 s under TCG: shell builtins only, but for date and
        # mkdir; an extra 127.0.1.1 line makes the new name resolve
        script = (
            'date -u -s "@$1" >/dev/null; printf "$2" > /dev/urandom;'
            ' echo "$3" > /etc/machine-id; echo "$4" > /etc/hostname;'
            ' echo "$4" > /proc/sys/kernel/hostname; echo "127.0.1.1 $4" >> /etc/hosts;'
            ' mkdir --mode=1777 --parents -- "$5"'
        )
        argv = ["sh", "-ec", script, "sh", f"{time.time():.6f}", entropy, machine_id, name, made]
        try:
            res = machine.channel.exec(argv, timeout=60)
        except ChannelError as e:
            raise ServerFailure(self._explain(f"cannot refresh the restored guest: {e}")) from None
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip()
            raise ServerFailure(self._explain(f"cannot refresh the restored guest: {err}"))
        self._start_mux()
        return made

    def _wait_system_running(self) -> None:
        # the agent answers early in the boot; tests expect a booted system
        res = self.execute(
            ["systemctl", "is-system-running", "--wait"], timeout=self.args.timeout_reboot
        )
        state = res.stdout.decode(errors="replace").strip()
        if res.returncode in (254, 255):
            raise ServerFailure(self._explain(res.stderr.decode(errors="replace").strip()))
        if state not in ("running", "degraded"):
            self.warn(f"the guest finished booting in state {state!r}")

    def close_testbed(self) -> None:
        mux, self.mux = self.mux, None
        machine, self.machine = self.machine, None
        if mux is not None:
            mux.stop()
        if machine is not None:
            machine.shutdown(timeout=5)

    def revert_testbed(self, scratch: str) -> str:
        self.close_testbed()
        return self.open_testbed(scratch)

    def wait_reboot(self) -> None:
        mux = self._mux()
        try:
            info = mux.hello(self.args.timeout_reboot, not_boot_id=self.boot_id)
        except MuxDead as e:
            raise ServerFailure(self._explain(f"the testbed did not come back: {e}")) from None
        self.boot_id = str(info.get("boot_id", ""))
        self._wait_system_running()

    def _explain(self, what: str) -> str:
        tail = ""
        if self.machine is not None:
            with contextlib.suppress(OSError):
                text = self.machine.console_log.read_bytes()[-4096:].decode("utf-8", "replace")
                lines = [line.strip() for line in text.splitlines() if line.strip()][-5:]
                tail = " | ".join(lines)
        return f"{what}; console ends: {tail}" if tail else what

    def debug_fail(self) -> str | None:
        return self._explain("QEMU testbed state")

    # ---- copies --------------------------------------------------------------------------
    def _stream(
        self, ftype: T, request: dict[str, object], stdin_fd: int | None, out: BinaryIO | None
    ) -> None:
        errors = bytearray()
        try:
            sock = connect(os.fspath(self._mux().listen_path))
            try:
                sink: Callable[[bytes], None] = _discard if out is None else out.write  # type: ignore[assignment]
                outcome = stream(sock, ftype, request, stdin_fd, sink, errors.extend)
            finally:
                sock.close()
        except StreamError as e:
            raise ServerFailure(self._explain(str(e))) from None
        if outcome.exit_status != 0:
            detail = outcome.error or errors.decode(errors="replace").strip()
            self.warn(f"copy failed: {detail}")
            raise CommandFailed(COPY_FAILED)

    def copydown(self, host: str, tb: str, is_dir: bool) -> None:
        if is_dir != os.path.isdir(host) or not os.path.exists(host):
            self.warn(f"copydown: {host} is not a {'directory' if is_dir else 'file'}")
            raise CommandFailed(COPY_FAILED)
        parent, name = os.path.split(tb)
        with tempfile.TemporaryFile() as buf:
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
                tf.add(host, arcname=name, filter=_as_root)
            buf.seek(0)
            self._stream(T.PUT, {"path": parent or "/"}, buf.fileno(), None)

    def copyup(self, tb: str, host: str, is_dir: bool) -> None:
        if not is_dir and os.path.isdir(host):
            host = os.path.join(host, os.path.basename(tb))
        dest_dir, name = os.path.split(os.path.abspath(host))
        with tempfile.TemporaryFile() as buf:
            self._stream(T.GET, {"path": tb}, None, buf)
            buf.seek(0)
            try:
                with tarfile.open(fileobj=buf, mode="r") as tf:
                    members = tf.getmembers()
                    top = os.path.basename(tb)
                    for m in members:
                        rest = m.name.split("/", 1)
                        if rest[0] != top or (not is_dir and (len(rest) > 1 or not m.isfile())):
                            raise ValueError(f"unexpected tar member {m.name}")
                        m.name = name + ("/" + rest[1] if len(rest) > 1 else "")
                        m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
                    os.makedirs(dest_dir, exist_ok=True)
                    _safe_extract(tf, Path(dest_dir))
            except (OSError, ValueError, tarfile.TarError, NestbedError) as e:
                self.warn(f"copyup {tb} -> {host} failed: {e}")
                raise CommandFailed(COPY_FAILED) from None


def _discard(data: bytes) -> None:
    pass


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class _ConsoleShower:
    """--show-boot: copy the console log to stderr while the machine boots."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos = 0
        while True:
            stopping = self._stop.wait(0.2)
            with contextlib.suppress(OSError, AssertionError):
                with open(self._machine.console_log, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                pos += len(data)
                if data:
                    sys.stderr.buffer.write(data)
                    sys.stderr.flush()
            if stopping:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _die_with_parent() -> None:
    """SIGTERM when the runner dies (even by SIGKILL): the framework then releases the
    testbed, so neither QEMU nor the temporary directory outlives the run."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> NoReturn:
    _die_with_parent()
    run_server(QemuServer)


if __name__ == "__main__":
    main()
