"""nestbed-virt-qemu: a QEMU virtual machine as the testbed.

    nestbed-virt-qemu [options] IMAGE [IMAGE...]

The first IMAGE (a nestbed image directory, or the disk.img inside one) is booted through a
throwaway qcow2 overlay in a private temporary directory: the image itself is opened
read-only and never written. Further images are attached read-only after it, in order, as
virtio disks with serials nestbed-extra1, nestbed-extra2, ...

The base image (the first IMAGE's disk, or the one named by --baseimage=PATH) is exported to
nested tests by attaching it once more, read-only, last, with the image's base serial
(nestbed-base): with --baseimage, or when the runner hints that a test needs it
($NESTBED_WANT_BASEIMAGE=1) and only one image was given; never with --no-baseimage. The
guest sees it at /dev/baseimage and /lib/autopkgtest/baseimage (capability `baseimage`);
a guest with a working /dev/kvm gets capability `nested-kvm`.

Commands run through the guest's control agent on a virtio-serial port (docs/agent.md),
never through the serial console, and all of them through the one multiplexer that owns
that channel (`nestbed.qemu.mux`). The exec prefix is a small helper
(`nestbed.qemu.execclient`) that connects to the multiplexer's private unix socket; the
server's own commands and its copies (tar streams) are requests to the multiplexer made
in-process. Revert throws the overlay away and boots a fresh one; reboot
waits for the agent of the next boot.

A first IMAGE from another builder (autopkgtest-build-qemu's: a partitioned disk, raw or
qcow2) boots through its own bootloader (SeaBIOS, or OVMF with --boot=efi); the agent is
copied in and started through the root shell autopkgtest's setup-testbed starts on ttyS1
(`nestbed.qemu.shellboot`), after every boot. docs/qemu.md has the details.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, NoReturn

from nestbed import proc
from nestbed.capabilities import PARALLEL, with_value
from nestbed.errors import NestbedError
from nestbed.image import bare as bare_mod
from nestbed.image import cache as cache_mod
from nestbed.image import foreign as foreign_mod
from nestbed.image.cache import MANIFEST, ImagePaths
from nestbed.qemu import accel as accel_mod
from nestbed.qemu.baseimage import (
    GUEST_BASEIMAGE,
    GUEST_PROBE,
    add_export_options,
    choose_base_image,
    probe_results,
)
from nestbed.qemu.copies import CopyContext, GuestCopies
from nestbed.qemu.execclient import helper_argv
from nestbed.qemu.machine import Drive, Machine, MachineConfig, MachineError, file_tail
from nestbed.qemu.mux import Mux, MuxDead, MuxTimeout
from nestbed.qemu.shellboot import SerialShell, wait_for_login_prompt
from nestbed.qemu.state import ReadyState, StateStore, state_key
from nestbed.testbed.protocol import (
    HANDLED_SIGNALS,
    ServerFailure,
    VirtServer,
    run_server,
)

NORMAL_USER = "nestbed"
EXTRA_SERIAL = "nestbed-extra{}"
DEFAULT_RAM_MB = 2048
# an allowance for QEMU's own memory beside the guest's (TCG's code buffer, the devices); not
# measured apart from the guest: a restored 2 GiB guest building a package reached 921 MiB
QEMU_OWN_MIB = 384
# the guest architectures nestbed's machine (a PC) runs, and dpkg's names for QEMU's
PC_ARCHES = ("x86_64", "i386")
DPKG_TO_QEMU = {"amd64": "x86_64", "i386": "i386", "arm64": "aarch64", "armhf": "arm",
                "armel": "arm", "ppc64el": "ppc64le", "ppc64": "ppc64", "s390x": "s390x",
                "riscv64": "riscv64", "mips64el": "mips64el", "loong64": "loongarch64"}  # fmt: skip


def default_ram_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """DEFAULT_RAM_MB, or half of this machine's memory when that is less: a level-1 testbed
    has 2 GiB, and a level-2 guest asking for all of it is refused its memory by the
    kernel's overcommit check (QEMU exits at start-up)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                half_mb = int(line.split()[1]) // 1024 // 2
                return max(256, min(DEFAULT_RAM_MB, half_mb // 64 * 64))
    except (OSError, ValueError, IndexError):
        pass
    return DEFAULT_RAM_MB


def _disk_format(path: Path) -> str:
    try:
        return foreign_mod.disk_format(path)
    except NestbedError as e:
        raise ServerFailure(str(e)) from None


def _check_bare(disk: Path) -> ImagePaths:  # raises NotNestbedImage for other disks
    """Read a bare image once to find bad input before anything starts: into a temporary
    directory removed at once (signals wait until it is gone); every boot unpacks the kernel
    and initrd again into the machine's own directory, which goes with the machine."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        tmp = Path(tempfile.mkdtemp(prefix="nestbed-bare-"))
        try:
            return bare_mod.load_bare_image(disk, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """A bare `--baseimage` is a flag (as autopkgtest's), so `--baseimage IMAGE` must not
    take IMAGE as its PATH: it becomes `--baseimage=`; only `--baseimage=PATH` names one."""
    out: list[str] = []
    for i, word in enumerate(argv):
        if word == "--":
            return out + list(argv[i:])
        out.append("--baseimage=" if word == "--baseimage" else word)
    return out


class QemuServer(VirtServer):
    name: ClassVar[str] = "qemu"
    help_epilog: ClassVar[str] = """\
A throwaway virtual machine booted from IMAGE through a temporary overlay: IMAGE itself is
never written. IMAGE is a nestbed image (nestbed image build) or a disk from autopkgtest's
builders.

Examples:
  nestbed image build                                build the default image once
  nestbed image list                                 the images there are, by NAME
  nestbed ./hello -- qemu ~/.cache/nestbed/images/NAME
                                                     build and test hello in a VM of it
  nestbed -B hello -- qemu --ram-size 4096 IMAGE     more memory for the tests
  autopkgtest ./hello -- /usr/bin/nestbed-virt-qemu IMAGE
                                                     autopkgtest drives it the same way
"""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-c", "--cpus", type=int, default=2, help="virtual CPUs (default 2)")
        parser.add_argument(
            "--ram-size",
            type=int,
            metavar="MB",
            help=f"memory (default {DEFAULT_RAM_MB}, at most half of this machine's memory)",
        )
        parser.add_argument(
            "--accel",
            choices=accel_mod.ACCELS,
            default="auto",
            help="auto (default): KVM only where it can really run the guest, else TCG",
        )
        parser.add_argument("--qemu-cpu", metavar="MODEL", help="-cpu (default host/max)")
        parser.add_argument(
            "-q",
            "--qemu-command",
            metavar="COMMAND",
            help="QEMU program to run (default: qemu-system-ARCH for the architecture below)",
        )
        parser.add_argument(
            "--qemu-architecture",
            metavar="ARCH",
            help="guest architecture in QEMU's words (x86_64, i386; default: from "
            "--dpkg-architecture, else from --qemu-command, else the host's)",
        )
        parser.add_argument(
            "--dpkg-architecture",
            metavar="ARCH",
            help="guest architecture in dpkg's words (amd64, i386); --qemu-architecture wins",
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
            "--console-log",
            metavar="FILE",
            help="keep the guest's serial console in FILE (started again by each boot)",
        )
        parser.add_argument(
            "-o",
            "--overlay-dir",
            metavar="DIR",
            help="where the temporary overlay directory goes",
        )
        parser.add_argument(
            "--boot",
            choices=("auto", "bios", "efi", "ieee1275", "none"),
            default="auto",
            help="how a disk from another builder boots (auto: BIOS when its boot sector has "
            "boot code, else EFI; bios, ieee1275 and none: QEMU's default firmware, nothing "
            "special); nestbed's own images always boot their kernel directly",
        )
        parser.add_argument(
            "--efi", dest="boot", action="store_const", const="efi", help="same as --boot=efi"
        )
        parser.add_argument(
            "-u",
            "--user",
            help="user for tests without needs-root (default: nestbed in nestbed's images, "
            "else the image's first user with uid 1000-59999)",
        )
        parser.add_argument(
            "-p",
            "--password",
            help="accepted for autopkgtest compatibility and ignored: nestbed never logs in on "
            "the console; an image not built by nestbed needs a root shell on ttyS1",
        )
        parser.add_argument(
            "--cold-boot",
            action="store_true",
            help="boot every testbed; neither use nor save a ready state",
        )
        add_export_options(
            parser,
            "export the base image to the guest read-only (/dev/baseimage, "
            f"{GUEST_BASEIMAGE}); with several images, =PATH names the one",
        )
        parser.add_argument(
            "images",
            nargs="+",
            metavar="IMAGE",
            help="the first boots: a nestbed image (its directory or disk.img), a bare nestbed "
            "disk, or a disk from autopkgtest's builders (root shell on ttyS1); the others are "
            "attached read-only",
        )

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        # bad input is found before anything is said, so it is the one line a user sees
        boot = self._load_first_image(args)
        if args.password is not None:
            self.warn("--password is ignored: nestbed does not log in on the console")
        extra = self._extra_images(args)
        self._check_machine_options(args)
        qemu_command = self._qemu_command(args)
        self.base = self._base_drive(args)
        if self.base is not None:
            extra.append(self.base)
        self.accel = accel_mod.choose(args.accel)
        self.warn(self.accel.describe())
        self.config = MachineConfig.for_image(
            self.image,
            memory_mb=args.ram_size,
            cpus=args.cpus,
            accel=self.accel.name,
            cpu=args.qemu_cpu or self.accel.cpu,
            qemu=qemu_command,
            extra_args=tuple(shlex.split(args.qemu_options)),
            unpack=self._unpack if self.bare else None,
            boot=boot,
            serial_shell=self.foreign,
        )
        self.config = dataclasses.replace(self.config, drives=self.config.drives + tuple(extra))
        # a bare image boots cold every time: nothing reliable to key a saved state on
        self.stateless = bool(args.cold_boot or self.bare)
        if self.foreign:
            self.states = StateStore.for_disk(cache_mod.default_root(), self.image.disk)
        else:
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
        # what the guest showed in the last probe (after boot, restore, reboot)
        self.guest_kvm = False
        self.base_seen: bool | None = None
        self.serial_shell: SerialShell | None = None  # foreign images: the root shell on ttyS1
        self.guest_user = ""  # foreign images: the first normal user the guest has
        self.copies = GuestCopies(
            CopyContext(lambda: self.machine, self._mux, self.execute, self.warn, self.debug,
                        self._explain)
        )  # fmt: skip

    def _load_first_image(self, args: argparse.Namespace) -> str:
        """Read the first IMAGE: a nestbed image, a bare nestbed disk, or a disk from another
        builder (autopkgtest's: its own bootloader, then nestbed's agent started through the
        root shell on ttyS1). Returns how it boots: kernel, bios or efi."""
        first = Path(args.images[0])
        self.label = args.images[0]
        # a bare disk: no manifest.json beside it (/dev/baseimage in a nested testbed)
        self.bare = not first.is_dir() and not (first.parent / MANIFEST).is_file()
        self.foreign = False
        boot = "kernel"
        started = time.monotonic()
        try:
            if not self.bare:
                self.image = ImagePaths.load(first)
            else:
                try:
                    self.image = _check_bare(first)
                except bare_mod.NotNestbedImage:
                    self.image, boot = foreign_mod.load_foreign_image(first)
                    self.foreign, self.bare = True, False
        except NestbedError as e:
            raise ServerFailure(str(e)) from None
        if self.bare:
            self.debug(f"{first}: a bare image, read in {time.monotonic() - started:.1f} s")
        if self.foreign:
            if args.boot != "auto":
                # as autopkgtest's: ieee1275 and none do nothing special, like bios on x86
                boot = "efi" if args.boot == "efi" else "bios"
            self.debug(f"{first}: not a nestbed image: booting it with {boot.upper()} firmware")
        elif args.boot != "auto":
            raise ServerFailure(
                f"--boot={args.boot}: {first} is a nestbed image, which boots its kernel directly"
            )
        return boot

    @staticmethod
    def _qemu_command(args: argparse.Namespace) -> str:
        """-q, else qemu-system-ARCH; the guest architecture from --qemu-architecture, else
        --dpkg-architecture, else -q's name, else the host's. nestbed's machine (its devices,
        its agent) is a PC: x86_64 and i386 only."""
        arch = args.qemu_architecture
        what = f"--qemu-architecture {arch}"
        if arch is None and args.dpkg_architecture is not None:
            arch = DPKG_TO_QEMU.get(args.dpkg_architecture, args.dpkg_architecture)
            what = f"--dpkg-architecture {args.dpkg_architecture}"
        if arch is None and args.qemu_command:
            name = os.path.basename(args.qemu_command)
            guess = name.removeprefix("qemu-system-")
            if guess != name:
                arch, what = guess, f"--qemu-command {args.qemu_command}"
        if arch is None:
            arch = os.uname().machine
            what = f"this machine ({arch})"
        if arch not in PC_ARCHES:
            raise ServerFailure(
                f"{what}: nestbed-virt-qemu runs x86_64 and i386 guests only, not {arch}"
            )
        return str(args.qemu_command or f"qemu-system-{arch}")

    def _check_machine_options(self, args: argparse.Namespace) -> None:
        if args.ram_size is None:
            args.ram_size = default_ram_mb()
            if args.ram_size < DEFAULT_RAM_MB:
                self.debug(f"--ram-size {args.ram_size}: half of this machine's memory")
        if args.cpus < 1 or args.ram_size < 128:
            raise ServerFailure("--cpus must be at least 1 and --ram-size at least 128")
        if args.overlay_dir and not os.path.isdir(args.overlay_dir):
            raise ServerFailure(f"--overlay-dir {args.overlay_dir}: not a directory")

    @staticmethod
    def _extra_images(args: argparse.Namespace) -> list[Drive]:
        """The other IMAGEs, read-only, after the root disk."""
        extra: list[Drive] = []
        for i, name in enumerate(args.images[1:], 1):
            path = Path(name)
            if not path.is_file():
                raise ServerFailure(f"{name}: no such image file")
            extra.append(Drive(path.absolute(), EXTRA_SERIAL.format(i), _disk_format(path)))
        return extra

    def _base_drive(self, args: argparse.Namespace) -> Drive | None:
        """The base image's disk when it is exported (attached last), else None."""
        try:
            base, note = choose_base_image(
                args.baseimage, args.no_baseimage, args.images, self.image, os.environ
            )
        except NestbedError as e:
            raise ServerFailure(str(e)) from None
        if note:
            self.warn(note)
        if base is not None:
            self.debug(f"exporting {base.path} as the base image (serial {base.serial})")
        return base

    # ---- capabilities and exec ------------------------------------------------------------
    def capabilities(self) -> list[str]:
        caps = [
            "revert",
            "revert-full-system",
            "root-on-testbed",
            "isolation-machine",
            "reboot",
        ]
        user = self.args.user or (self.guest_user if self.foreign else NORMAL_USER)
        if user:
            caps.append(f"suggested-normal-user={user}")
        if self.base is not None and self.base_seen is not False:
            caps.append("baseimage")
        if self.guest_kvm:
            caps.append("nested-kvm")
        # each server its own QEMU, overlay, sockets and identity (the restore's refresh):
        # the guest's memory and QEMU's own (TCG's code buffer, the devices)
        caps.append(with_value(PARALLEL, str(self.args.ram_size + QEMU_OWN_MIB)))
        return caps

    def _probe_args(self) -> list[str]:
        # an image not built by nestbed: which user is its normal one (asked only there)
        want_user = "1" if self.foreign and not self.args.user else ""
        return [self.base.serial if self.base is not None else "", want_user]

    def _take_probe(self, found: dict[str, str]) -> None:
        self.guest_kvm = found.get("kvm") == "1"
        self.guest_user = found.get("user", self.guest_user)
        if self.base is None:
            return
        seen = found.get("baseimage") == "ok"
        if not seen and self.base_seen is not False:
            self.warn(
                f"the guest does not see the base image (disk serial {self.base.serial}):"
                " not advertising `baseimage'"
            )
        self.base_seen = seen

    def exec_prefix(self) -> list[str]:
        mux = self._mux()
        return helper_argv(os.fspath(mux.listen_path))

    def execute(
        self, argv: Sequence[str], *, timeout: float | None = None, stdin: bytes | None = None
    ) -> proc.Result:
        """Run argv in the guest through the multiplexer, in this process, with the exit
        status and messages the exec prefix would give."""
        mux = self._mux()
        self.debug(f"execute: {shlex.join(argv)}")
        try:
            status, out, err = mux.run(list(argv), stdin=stdin, timeout=timeout)
        except MuxTimeout:
            raise ServerFailure(f"timed out after {timeout}s on testbed command {argv}") from None
        return proc.Result(tuple(argv), status, out, err)

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
        state = None if self.stateless else self.states.lookup(self.state_key)
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
        if not self.stateless:
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
            console = Path(self.args.console_log) if self.args.console_log else None
            machine = Machine(config, tmp_parent=overlay_dir, console_log=console)
            self.machine = machine
        shower = _ConsoleShower(machine) if self.args.show_boot and state is None else None
        before_connect: Callable[[float], None] | None = None
        if state is not None:
            before_connect = machine.resume_incoming
        elif self.foreign:
            before_connect = self._start_agent
        try:
            machine.launch(
                timeout=self.args.timeout_reboot if state is None else 60,
                before_connect=before_connect,
            )
        except MachineError as e:
            what = "restore the saved state of" if state else "boot"
            raise ServerFailure(f"cannot {what} {self.label}: {e}") from None
        finally:
            if shower is not None:
                shower.stop()
        self.boot_id = str(machine.channel.info.get("boot_id", ""))

    def _start_agent(self, deadline: float, not_boot_id: str = "", console_from: int = 0) -> None:
        """A foreign image, after a boot: once the console shows a login prompt (after byte
        `console_from` of its log), start nestbed's agent through the serial shell."""
        machine = self.machine
        assert machine is not None
        started = time.monotonic()
        wait_for_login_prompt(
            machine.console_log, console_from, deadline, alive=lambda: machine.running
        )
        prompted = time.monotonic()
        if self.serial_shell is None:
            self.serial_shell = SerialShell(machine.shell_socket, alive=lambda: machine.running)
        self.serial_shell.wait_ready(deadline, not_boot_id=not_boot_id)
        answered = time.monotonic()
        self.serial_shell.start_agent(self.config.agent_port, deadline)
        self.debug(
            f"login prompt on the console after {prompted - started:.1f} s, root shell on"
            f" ttyS1 answered {answered - prompted:.1f} s later; agent copied and started"
            f" through it in {time.monotonic() - answered:.1f} s"
        )

    def _unpack(self, directory: Path) -> tuple[Path, Path]:
        """A bare image's kernel and initrd, read from its disk into the machine's directory."""
        started = time.monotonic()
        try:
            image = bare_mod.load_bare_image(self.image.disk, directory)
        except NestbedError as e:
            raise MachineError(str(e)) from None
        self.debug(f"kernel and initrd unpacked in {time.monotonic() - started:.1f} s")
        return image.kernel, image.initrd

    def _start_mux(self) -> None:
        """From here on every command goes through the exec helpers and the multiplexer."""
        machine = self.machine
        assert machine is not None
        with self.critical():
            self.mux = Mux(
                machine.channel.sock,
                machine.socket_path("exec.sock"),
                console_log=machine.console_log,
                agent_path=machine.control_socket,
                alive=lambda: machine.running,
                exit_note=machine.exit_note,
                reset_expected=lambda: machine.reboot_allowed,
                agent_info=machine.channel.info,
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
            facts: dict[str, object] = {
                "image": str(self.image.directory),
                "disk": str(self.image.disk.absolute()),  # states of a rebuilt disk are pruned
                "shape": self.shape,
            }
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
        otherwise share them) -- and make the scratch dir; one guest command, the first
        through the multiplexer. Returns the scratch dir."""
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
            ' mkdir --mode=1777 --parents -- "$5"; shift 5'
        ) + GUEST_PROBE
        argv = [
            "sh", "-ec", script, "sh",
            f"{time.time():.6f}", entropy, machine_id, name, made, *self._probe_args(),
        ]  # fmt: skip
        self._start_mux()
        res = self.execute(argv, timeout=60)
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip()
            raise ServerFailure(self._explain(f"cannot refresh the restored guest: {err}"))
        self._take_probe(probe_results(res.stdout)[1])
        return made

    def _wait_system_running(self) -> None:
        # the agent answers early in the boot; tests expect a booted system; the probe
        # rides along in the same guest command
        script = "systemctl is-system-running --wait;" + GUEST_PROBE
        res = self.execute(
            ["sh", "-c", script, "sh", *self._probe_args()], timeout=self.args.timeout_reboot
        )
        if res.returncode in (254, 255):
            raise ServerFailure(self._explain(res.stderr.decode(errors="replace").strip()))
        own, found = probe_results(res.stdout)
        self._take_probe(found)
        state = " ".join(own).strip()
        if state not in ("running", "degraded"):
            self.warn(f"the guest finished booting in state {state!r}")

    def close_testbed(self) -> None:
        if self.serial_shell is not None:
            self.serial_shell.close()
            self.serial_shell = None
        mux, self.mux = self.mux, None
        machine, self.machine = self.machine, None
        if mux is not None:
            mux.stop()
        if machine is not None:
            machine.shutdown(timeout=5)

    def revert_testbed(self, scratch: str) -> str:
        self.close_testbed()
        return self.open_testbed(scratch)

    def save_scratch_for_reboot(self, scratch: str) -> None:
        # the reboot may come as soon as the scratch is saved (autopkgtest-reboot-prepare):
        # from here until the guest is back, a guest reboot is expected, not a fault
        self._allow_guest_reboot(True)
        super().save_scratch_for_reboot(scratch)

    def _allow_guest_reboot(self, allowed: bool) -> None:
        if self.machine is None:
            raise ServerFailure("no testbed is open")
        try:
            self.machine.allow_guest_reboot(allowed)
        except MachineError as e:
            raise ServerFailure(self._explain(f"QEMU refused the reboot action: {e}")) from None

    def wait_reboot(self) -> None:
        mux = self._mux()
        if self.foreign:  # nothing starts the agent at boot: the serial shell does, again
            machine = self.machine
            assert machine is not None
            # the reboot begins after this (a delayed `reboot`, or the test's own): the new
            # boot's login prompt comes after what the console shows now
            try:
                console_from = machine.console_log.stat().st_size
            except OSError:
                console_from = 0
            try:
                self._start_agent(
                    time.monotonic() + self.args.timeout_reboot, self.boot_id, console_from
                )
            except MachineError as e:
                raise ServerFailure(self._explain(f"the testbed did not come back: {e}")) from None
        try:
            info = mux.hello(self.args.timeout_reboot, not_boot_id=self.boot_id)
        except MuxDead as e:
            raise ServerFailure(self._explain(f"the testbed did not come back: {e}")) from None
        self.boot_id = str(info.get("boot_id", ""))
        self._allow_guest_reboot(False)
        self._wait_system_running()

    def _explain(self, what: str) -> str:
        tail = ""
        if self.machine is not None:
            note = self.machine.exit_note()
            if note and note not in what:  # the multiplexer's reason may carry it already
                what = f"{what}; {note}"
            tail = file_tail(self.machine.console_log, 5)
        return f"{what}; console ends: {tail}" if tail else what

    def debug_fail(self) -> str | None:
        return self._explain("QEMU testbed state")

    # ---- copies ----------------------------------------------------------------------------
    def copydown(self, host: str, tb: str, is_dir: bool) -> None:
        self.copies.copydown(host, tb, is_dir)

    def copyup(self, tb: str, host: str, is_dir: bool) -> None:
        self.copies.copyup(tb, host, is_dir)


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


def main() -> NoReturn:
    # SIGTERM when the runner dies (even by SIGKILL): the framework then releases the
    # testbed, so neither QEMU nor the temporary directory outlives the run
    proc.die_with_parent(signal.SIGTERM)
    run_server(QemuServer, normalise_argv(sys.argv[1:]))


if __name__ == "__main__":
    main()
