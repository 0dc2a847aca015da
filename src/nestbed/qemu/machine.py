"""A QEMU virtual machine as an object, in the manner of qemu.machine.QEMUMachine.

`launch()` either returns a running machine whose control agent has answered, or raises one
MachineError carrying the command line and QEMU's (and the console's) last words. Every
resource -- the QEMU process, its throwaway overlay and sockets, the temporary directory,
the channel -- is released in one place, `_post_shutdown()`, which also runs after a failed
launch. Use it as a context manager.

The base image is never written: the root disk is a qcow2 overlay in a private temporary
directory. Extra disks (the read-only base image for nested tests, ...) follow the root disk
in order, each as `-drive if=none` + `-device virtio-blk-pci,serial=...` (mixing `if=virtio`
with `-device` reorders disks on QEMU 7.2). The default accelerator is TCG with `-cpu max`:
KVM on this project's machines cannot run a stock kernel (docs/qemu.md, "Accelerator"), and
`-cpu max` under TCG gives the guest SVM, so KVM works inside it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from nestbed.errors import TestbedFailure
from nestbed.guest.agent import PORT_NAME
from nestbed.guest.channel import Channel, ChannelError
from nestbed.image.cache import ImagePaths
from nestbed.proc import STDOUT, CommandFailed, Process, TimeoutExpired, cmdline, run, spawn, stop
from nestbed.qemu.qmp import Event, QMPClient, QMPError

BASE_SERIAL = "nestbed-base"
SHELL_SOCKET = "ttyS1.sock"  # the second serial port, when the guest has a root shell there
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_MODES = ("kernel", "bios", "efi")
QMP_TIMEOUT = 10.0  # one QMP command's reply; QEMU answers in milliseconds when well

# Why QEMU ended, by the reason of its SHUTDOWN event. A guest reset ends QEMU only while
# no reboot is allowed (reboot action "shutdown": see launch), hence "no reboot was
# requested"; "host-qmp-quit" is shutdown() itself.
SHUTDOWN_NOTES = {
    "guest-reset": "QEMU ended: the guest reset itself, no reboot was requested",
    "guest-shutdown": "QEMU ended: the guest powered off by itself",
    "guest-panic": "QEMU ended: the guest panicked",
    "host-signal": "QEMU ended: it was sent a signal",
    "host-qmp-quit": "QEMU ended: it was told to quit",
}


class MachineError(TestbedFailure):
    """QEMU could not be started, died, or its guest did not come up."""


@dataclass(frozen=True)
class Drive:
    """An extra disk, attached after the root disk."""

    path: Path
    serial: str
    format: str = "raw"
    readonly: bool = True


@dataclass(frozen=True)
class MachineConfig:
    kernel: Path
    initrd: Path
    cmdline: str
    root: Path  # the base image: booted through an overlay, never written
    root_format: str = "raw"
    root_serial: str = "nestbed-root"
    drives: tuple[Drive, ...] = ()
    memory_mb: int = 2048
    cpus: int = 2
    accel: str = "tcg"
    cpu: str = "max"
    network: bool = True
    agent_port: str = PORT_NAME
    qemu: str = "qemu-system-x86_64"
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # a bare disk (no kernel and initrd beside it): called at launch with the machine's
    # private temporary directory, puts them there (they go with it) and returns their paths;
    # raises MachineError when it cannot
    unpack: Callable[[Path], tuple[Path, Path]] | None = None
    # "kernel": QEMU loads kernel and initrd (nestbed's images); "bios"/"efi": the disk's own
    # bootloader, started by SeaBIOS or OVMF (images from other builders)
    boot: str = "kernel"
    # a second serial port (ttyS1) on a unix socket: autopkgtest-built images' root shell
    serial_shell: bool = False

    @classmethod
    def for_image(cls, image: ImagePaths, *, base_image: bool = False, **kw: Any) -> MachineConfig:
        """Boot a nestbed image; with base_image, also attach it read-only (serial nestbed-base)."""
        m = image.manifest
        drives = (Drive(image.disk, m.base_serial, m.format),) if base_image else ()
        return cls(
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=m.cmdline,
            root=image.disk,
            root_format=m.format,
            root_serial=m.root_serial,
            drives=drives,
            agent_port=m.agent_port,
            **kw,
        )


def _opt(value: str | os.PathLike[str]) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return os.fspath(value).replace(",", ",,")


def tail_lines(text: str, lines: int) -> str:
    """The last `lines` lines of `text`, blank ones dropped, on one line: for error messages."""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


def file_tail(path: Path | None, lines: int) -> str:
    """The last `lines` lines of a log file (its last 8 KiB), as `tail_lines` gives them;
    "" when there is none or it cannot be read."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            return tail_lines(f.read().decode("utf-8", "replace"), lines)
    except OSError:
        return ""


# a unix socket's address holds 107 bytes and a NUL; leave room for the longest name
MAX_SOCKET_PATH = 100


class Machine:
    def __init__(
        self,
        config: MachineConfig,
        *,
        console_log: Path | None = None,
        tmp_parent: Path | None = None,
    ) -> None:
        self.config = config
        self._console_log = console_log
        self._tmp_parent = tmp_parent  # where the private temporary directory is made
        self._tmp: Path | None = None
        self._sockets: Path | None = None  # where the unix sockets go: _tmp when short enough
        self._proc: Process | None = None
        self._qemu_log: BinaryIO | None = None
        self._channel: Channel | None = None
        self._qmp: QMPClient | None = None  # kept after shutdown: its events say how QEMU ended
        self._argv: list[str] = []
        self._boot_files: tuple[Path, Path] | None = None  # unpacked kernel and initrd
        self.console_output = ""  # the console's tail, kept after shutdown
        # whether a guest reboot resets the machine now (else it ends QEMU: see launch)
        self.reboot_allowed = True

    # -- paths --------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        assert self._tmp is not None, "machine not launched"
        return self._tmp / name

    def socket_path(self, name: str) -> Path:
        """A unix socket of the machine's (removed at shutdown): in the private directory,
        or, when that path is too long for a socket address, in a short private one."""
        assert self._sockets is not None, "machine not launched"
        return self._sockets / name

    @property
    def console_log(self) -> Path:
        return self._console_log or self._path("console.log")

    @property
    def control_socket(self) -> Path:
        return self.socket_path("control.sock")

    @property
    def qmp_socket(self) -> Path:
        return self.socket_path("qmp.sock")

    @property
    def shell_socket(self) -> Path:
        return self.socket_path(SHELL_SOCKET)

    @property
    def overlay(self) -> Path:
        return self._path("root.qcow2")

    @property
    def efi_vars(self) -> Path:
        """The machine's own copy of OVMF's variable store (the firmware writes it)."""
        return self._path("efivars.fd")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- command line -------------------------------------------------------------------
    def argv(self) -> list[str]:
        c = self.config
        argv = [
            c.qemu, "-nodefaults", "-no-user-config", "-display", "none",
            "-accel", c.accel, "-cpu", c.cpu, "-smp", str(c.cpus), "-m", str(c.memory_mb),
        ]  # fmt: skip
        if c.boot == "kernel":
            kernel, initrd = self._boot_files or (c.kernel, c.initrd)
            argv += [
                "-kernel",
                os.fspath(kernel),
                "-initrd",
                os.fspath(initrd),
                "-append",
                c.cmdline,
            ]
        elif c.boot == "efi":
            argv += [
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(OVMF_CODE)}",
                "-drive", f"if=pflash,format=raw,unit=1,file={_opt(self.efi_vars)}",
            ]  # fmt: skip
        firmware_boot = "" if c.boot == "kernel" else ",bootindex=0"
        argv += [
            "-drive", f"if=none,id=root,file={_opt(self.overlay)},format=qcow2,discard=unmap",
            "-device", f"virtio-blk-pci,drive=root,serial={_opt(c.root_serial)}{firmware_boot}",
        ]  # fmt: skip
        for i, d in enumerate(c.drives, 1):
            ro = ",readonly=on" if d.readonly else ""
            path = _opt(d.path.absolute())
            argv += [
                "-drive", f"if=none,id=disk{i},file={path},format={d.format}{ro}",
                "-device", f"virtio-blk-pci,drive=disk{i},serial={_opt(d.serial)}",
            ]  # fmt: skip
        argv += [
            "-chardev", f"socket,id=control,path={_opt(self.control_socket)},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", f"virtserialport,bus=vser0.0,chardev=control,name={_opt(c.agent_port)}",
            "-chardev", f"file,id=console,path={_opt(self.console_log)}",
            "-serial", "chardev:console",
        ]  # fmt: skip
        if c.serial_shell:
            argv += [
                "-chardev", f"socket,id=shell,path={_opt(self.shell_socket)},server=on,wait=off",
                "-serial", "chardev:shell",
            ]  # fmt: skip
        argv += [
            "-qmp", f"unix:{_opt(self.qmp_socket)},server=on,wait=off",
            "-device", "virtio-rng-pci",
            # a kernel panic tells QEMU (GUEST_PANICKED), which ends (panic action
            # "shutdown"): reported as a panic, not waited on (Debian's kernels have
            # pvpanic; a kernel without it never sees the device)
            "-device", "pvpanic",
        ]  # fmt: skip
        if c.network:
            argv += ["-nic", "user,model=virtio-net-pci"]
        return argv + list(c.extra_args)

    def shape(self) -> list[str]:
        """The command line with the per-run temporary directory blanked: what a saved
        machine state must match to be restored into this machine."""
        saved = self._tmp, self._sockets
        self._tmp = self._sockets = Path("/RUN")
        try:
            return self.argv()
        finally:
            self._tmp, self._sockets = saved

    # -- life cycle ---------------------------------------------------------------------
    def launch(
        self, timeout: float = 180.0, *, before_connect: Callable[[float], None] | None = None
    ) -> None:
        """Start QEMU and wait until the guest's control agent answers.

        `before_connect(deadline)` runs once QEMU's sockets exist and before the channel is
        connected (a restore finishes the incoming migration and resumes the guest there)."""
        if self._proc is not None:
            raise MachineError("machine already launched")
        deadline = time.monotonic() + timeout
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix="nestbed-qemu-", dir=self._tmp_parent))
            self._sockets = self._tmp
            if len(os.fsencode(self._tmp / "control.sock")) > MAX_SOCKET_PATH:
                self._sockets = Path(tempfile.mkdtemp(prefix="nestbed-q-", dir="/tmp"))
            c = self.config
            if c.boot not in BOOT_MODES:
                raise MachineError(f"unknown boot mode {c.boot!r}")
            if c.unpack is not None:
                self._boot_files = c.unpack(self._tmp)
            if c.boot == "efi":
                try:
                    shutil.copyfile(OVMF_VARS, self.efi_vars)
                except OSError as e:
                    raise MachineError(
                        f"EFI boot needs OVMF ({OVMF_VARS}: {e.strerror}; apt-get install ovmf)"
                    ) from None
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", c.root_format,
                 "-b", c.root.absolute(), self.overlay])  # fmt: skip
            self._argv = self.argv()
            self._qemu_log = open(self._path("qemu.log"), "wb")  # noqa: SIM115 - closed in _post_shutdown
            self._proc = spawn(self._argv, stdout=self._qemu_log, stderr=STDOUT)
            while not (self.control_socket.exists() and self.qmp_socket.exists()):
                self._check_alive("QEMU exited during start-up")
                if time.monotonic() > deadline:
                    raise MachineError("QEMU did not create its sockets in time")
                time.sleep(0.02)
            self._qmp = self._connect_qmp(deadline)
            if before_connect is not None:
                before_connect(deadline)
            self._connect(deadline)
            # Booted. From here on a guest reset nobody asked for (a triple fault, a crash
            # that reboots) ends QEMU, a prompt testbed failure instead of commands waiting
            # on a fresh boot; allow_guest_reboot() lets an expected reboot through. Before
            # this, a reset is only a longer boot: firmware does it (OVMF, on first boot
            # with fresh variables), and so, now and then, does a level-2 guest under
            # emulated SVM (docs/nested.md, "Known faults").
            self.allow_guest_reboot(False)
        except CommandFailed as e:
            self._post_shutdown()
            raise MachineError(f"cannot create the overlay: {e}") from None
        except MachineError as e:
            self._post_shutdown()
            raise MachineError(self._explain(str(e))) from None
        except BaseException:
            self._post_shutdown()
            raise

    def _connect(self, deadline: float) -> None:
        while True:
            self._check_alive("QEMU exited while the guest was booting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MachineError("the guest's control agent did not answer in time")
            try:
                self._channel = Channel.connect(self.control_socket, timeout=min(remaining, 5.0))
                return
            except ChannelError:
                continue

    def _connect_qmp(self, deadline: float) -> QMPClient:
        # the whole launch's time: QEMU loading a saved state may be slow to greet
        try:
            return QMPClient.connect(self.qmp_socket, timeout=max(1.0, deadline - time.monotonic()))
        except QMPError as e:
            self._check_alive("QEMU exited during start-up")
            raise MachineError(str(e)) from None

    def events(self) -> list[Event]:
        """QMP's events so far (SHUTDOWN, RESET, STOP, GUEST_PANICKED, ...), oldest first."""
        return [] if self._qmp is None else self._qmp.events()

    def exit_note(self) -> str:
        """Why QEMU is gone, for messages ("" while it runs or before it started): what its
        QMP events said, else what its exit status says."""
        rc = None if self._proc is None else self._proc.poll()
        if rc is None:
            return ""
        if self._qmp is not None:
            # QEMU closes the connection as it exits: by then every event is read
            self._qmp.wait_closed(timeout=1.0)
        names = [e.name for e in self.events()]
        if "GUEST_PANICKED" in names:
            return SHUTDOWN_NOTES["guest-panic"]
        reasons = [str(e.data.get("reason", "")) for e in self.events() if e.name == "SHUTDOWN"]
        if reasons and reasons[-1] in SHUTDOWN_NOTES:
            return SHUTDOWN_NOTES[reasons[-1]]
        if reasons:
            return f"QEMU ended: {reasons[-1] or 'a shutdown'} (QMP SHUTDOWN reason)"
        if rc < 0:
            return f"QEMU was killed by signal {-rc}"
        if rc == 0:  # ended without saying why (no QMP connection, or it broke)
            return "QEMU ended: the guest reset or powered off by itself, no reboot was requested"
        return f"QEMU exited with status {rc}"

    def _check_alive(self, what: str) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise MachineError(what)

    def _explain(self, what: str) -> str:
        qemu_out = file_tail(self._tmp / "qemu.log" if self._tmp else None, 3)
        console = self.console_output or file_tail(self._safe_console(), 5)
        parts = [what, f"command: {cmdline(self._argv)}" if self._argv else ""]
        if qemu_out:
            parts.append(f"qemu said: {qemu_out}")
        if console:
            parts.append(f"console ends: {console}")
        return "; ".join(p for p in parts if p)

    def _safe_console(self) -> Path | None:
        return self.console_log if self._tmp is not None or self._console_log else None

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            raise MachineError("machine not launched")
        return self._channel

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command on the machine's connection; returns its 'return' value."""
        return self._qmp_execute(command, arguments, QMP_TIMEOUT)

    def _qmp_execute(self, command: str, arguments: dict[str, Any], timeout: float) -> Any:
        if self._qmp is None:
            raise MachineError("machine not launched")
        try:
            return self._qmp.execute(command, arguments, timeout=timeout)
        except QMPError as e:
            raise MachineError(f"QMP {e}") from None

    def allow_guest_reboot(self, allowed: bool) -> None:
        """Let a guest reboot reset the machine (True) or end QEMU (False, the default)."""
        self.qmp("set-action", reboot="reset" if allowed else "shutdown")
        self.reboot_allowed = allowed

    def save_state(self, path: Path, timeout: float = 120.0) -> None:
        """Pause the guest and write its migration stream to `path`; the guest stays paused
        and its disk (the overlay) is flushed, so together they are a consistent state."""
        self.qmp("stop")
        self.qmp("migrate", uri=f"exec:cat > {shlex.quote(os.fspath(path))}")
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmp("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise MachineError(f"saving the machine state failed ({status})")
            if time.monotonic() > deadline:
                raise MachineError(f"saving the machine state took over {timeout:g} s")
            time.sleep(0.05)

    def resume_incoming(self, deadline: float) -> None:
        """For a machine started with `-incoming`: wait until the state is loaded, resume."""
        while True:
            self._check_alive("QEMU exited while loading the saved state")
            remaining = max(0.1, deadline - time.monotonic())
            # the monitor may not answer while the state loads: ask again until it does
            status = None
            with contextlib.suppress(MachineError):
                status = self._qmp_execute("query-status", {}, min(remaining, 2.0)).get("status")
            if status in ("paused", "postmigrate", "prelaunch"):
                self.qmp("cont")
                return
            if time.monotonic() > deadline:
                raise MachineError("loading the saved state did not finish in time")
            time.sleep(0.02)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the machine (QMP quit: the overlay is thrown away, so no guest shutdown is
        needed) and release everything."""
        if self.running:
            with contextlib.suppress(MachineError):
                self.qmp("quit")
            assert self._proc is not None
            with contextlib.suppress(TimeoutExpired):
                self._proc.wait(timeout=timeout)
        self._post_shutdown()

    def _post_shutdown(self) -> None:
        """The one place every resource is released; safe to call more than once."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._proc is not None:
            stop(self._proc, grace=5.0)
            self._proc = None
        if self._qmp is not None:
            self._qmp.close()
        if self._qemu_log is not None:
            self._qemu_log.close()
            self._qemu_log = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                console = self.console_log
                if console.exists():
                    self.console_output = console.read_bytes()[-65536:].decode("utf-8", "replace")
            tmp, self._tmp = self._tmp, None
            sockets, self._sockets = self._sockets, None
            self._boot_files = None
            for directory in {tmp, sockets or tmp}:
                for entry in directory.iterdir():
                    entry.unlink()
                directory.rmdir()

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()
