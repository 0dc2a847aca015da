"""Copies between the host and a QEMU guest for nestbed-virt-qemu's copydown and copyup.

Small ones go through the agent's channel (the multiplexer's PUT and GET requests, a tar
stream). Large ones (DISK_COPY_MIN and up) go through a virtio disk hot-plugged for the one
copy: the guest's tar reads or writes it directly, many times faster under TCG than the
channel, where every 4 KiB costs a turn of the agent's loop. A copyup cut short (the copy
timeout, a lost testbed) keeps what arrived, as autopkgtest does.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from nestbed import proc
from nestbed.errors import NestbedError
from nestbed.guest.agent import FrameType
from nestbed.guest.channel import safe_extract
from nestbed.qemu.machine import Machine, MachineError
from nestbed.qemu.mux import Mux, MuxDead
from nestbed.testbed.protocol import COPY_FAILED, CommandRefused, ServerFailure

# a copy of at least this many bytes goes through a hot-plugged disk, not the agent
DISK_COPY_MIN = 4 << 20

# the guest's side of a disk copy: wait until udev has the disk with serial $1 as $d
WAIT_FOR_DISK = (
    'd=/dev/disk/by-id/virtio-"$1"; i=0\n'
    'while [ ! -b "$d" ]; do\n'
    '  i=$((i + 1)); [ $i -le 600 ] || { echo "no disk $d after 60 s" >&2; exit 90; }\n'
    "  sleep 0.1\n"
    "done\n"
)


@dataclass
class CopyContext:
    """What the copies need from the server that owns the machine."""

    machine: Callable[[], Machine | None]  # the running machine, if any
    mux: Callable[[], Mux]  # the multiplexer to the guest's agent (ServerFailure if none)
    execute: Callable[..., proc.Result]  # a command in the guest: (argv, timeout=)
    warn: Callable[[str], None]
    debug: Callable[[str], None]
    explain: Callable[[str], str]  # a failure, with the console's last lines


class GuestCopies:
    """copydown and copyup with autopkgtest's semantics (a refused copy is COPY_FAILED)."""

    def __init__(self, context: CopyContext) -> None:
        self.context = context
        self._disks = 0  # copy disks attached so far: each gets a name of its own

    def copydown(self, host: str, tb: str, is_dir: bool) -> None:
        ctx = self.context
        if is_dir != os.path.isdir(host) or not os.path.exists(host):
            ctx.warn(f"copydown: {host} is not a {'directory' if is_dir else 'file'}")
            raise CommandRefused(COPY_FAILED)
        parent, name = os.path.split(tb)
        machine = self._running()
        where = machine.overlay.parent if machine is not None else None
        with tempfile.NamedTemporaryFile(dir=where, prefix="copydown-", suffix=".tar") as buf:
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
                tf.add(host, arcname=name, filter=_as_root)
            buf.flush()
            if buf.tell() >= DISK_COPY_MIN and machine is not None:
                try:
                    self._copydown_by_disk(machine, Path(buf.name), parent or "/")
                    return
                except _NoDiskCopy as e:
                    ctx.debug(f"copydown through a disk failed ({e}); through the agent")
            buf.seek(0)
            self._stream(FrameType.PUT, {"path": parent or "/"}, cast(BinaryIO, buf), None)

    def copyup(self, tb: str, host: str, is_dir: bool) -> None:
        ctx = self.context
        if not is_dir and os.path.isdir(host):
            host = os.path.join(host, os.path.basename(tb))
        dest_dir, name = os.path.split(os.path.abspath(host))
        machine = self._running()
        if machine is not None:
            size = self._guest_size(tb)
            if size is not None and size >= DISK_COPY_MIN:
                try:
                    self._copyup_by_disk(machine, tb, dest_dir, name, is_dir, size)
                    return
                except _NoDiskCopy as e:
                    ctx.debug(f"copyup through a disk failed ({e}); through the agent")
        with tempfile.TemporaryFile() as buf:
            try:
                self._stream(FrameType.GET, {"path": tb}, None, buf)
            except BaseException:
                # --timeout-copy (or a lost testbed) cut it short: keep what arrived, as
                # autopkgtest does, the last file as far as it came
                if buf.tell():
                    self._extract(buf, tb, dest_dir, name, is_dir, partial=True)
                    ctx.warn(f"copyup {tb} -> {host} cut short: kept what arrived")
                raise
            self._extract(buf, tb, dest_dir, name, is_dir, partial=False)

    # ---- through the agent ---------------------------------------------------------------
    def _running(self) -> Machine | None:
        machine = self.context.machine()
        return machine if machine is not None and machine.running else None

    def _stream(
        self,
        ftype: FrameType,
        request: dict[str, object],
        stdin: BinaryIO | None,
        out: BinaryIO | None,
    ) -> None:
        ctx = self.context
        errors = bytearray()
        mux = ctx.mux()
        sink: Callable[[bytes], None] = _discard if out is None else out.write  # type: ignore[assignment]
        try:
            outcome = mux.request(ftype, request, stdin=stdin, out=sink, err=errors.extend)
        except MuxDead as e:
            raise ServerFailure(ctx.explain(str(e))) from None
        if outcome.exit_status != 0:
            detail = outcome.error or errors.decode(errors="replace").strip()
            ctx.warn(f"copy failed: {detail}")
            raise CommandRefused(COPY_FAILED)

    # ---- through a disk ------------------------------------------------------------------
    def _copydown_by_disk(self, machine: Machine, archive: Path, parent: str) -> None:
        """The tar archive is hot-plugged as a read-only disk and unpacked by the guest's
        tar straight from it."""
        # a disk is whole sectors; tar ignores what follows its end-of-archive blocks
        size = archive.stat().st_size
        os.truncate(archive, -(-size // 512) * 512)
        script = 'exec tar --extract --preserve-permissions --same-owner --file="$d" -C "$2"\n'
        with self._copy_disk(machine, archive, read_only=True) as serial:
            self._guest_copy(script, serial, parent)

    def _copyup_by_disk(
        self, machine: Machine, tb: str, dest_dir: str, name: str, is_dir: bool, size: int
    ) -> None:
        """The guest's tar writes the archive onto a hot-plugged blank disk (a sparse file
        here, room for the data and tar's headers), read here once it is unplugged. Cut
        short, what the guest wrote so far is kept, as through the agent."""
        parent, top = os.path.split(tb)
        with tempfile.NamedTemporaryFile(
            dir=machine.overlay.parent, prefix="copyup-", suffix=".tar"
        ) as buf:
            os.truncate(buf.name, -(-(size * 2 + (256 << 20)) // 512) * 512)
            # written with O_DIRECT: what a timeout cuts off mid-way is on the disk already,
            # not in the guest's page cache; tar's own status is the copy's
            script = (
                'st=$( { { tar --create --file=- --directory="$2" -- "$3"; echo $? >&3; } |'
                ' dd of="$d" bs=1M iflag=fullblock oflag=direct status=none ||'
                ' echo "dd failed" >&3; } 3>&1 )\n'
                '[ "$st" = 0 ] || { echo "copyup: tar: $st" >&2; exit 1; }\n'
            )
            try:
                with self._copy_disk(machine, Path(buf.name), read_only=False) as serial:
                    self._guest_copy(script, serial, parent or "/", top or ".")
            except _NoDiskCopy:
                raise
            except BaseException:
                # what the guest wrote is what is allocated: the disk was a hole before, dd
                # writes it in order, so the first hole is where the copy stopped
                with contextlib.suppress(OSError):
                    os.truncate(buf.name, os.lseek(buf.fileno(), 0, os.SEEK_HOLE))
                self._extract(cast(BinaryIO, buf), tb, dest_dir, name, is_dir, partial=True)
                self.context.warn(f"copyup {tb} -> {os.path.join(dest_dir, name)} cut short: "
                                  "kept what arrived")  # fmt: skip
                raise
            self._extract(cast(BinaryIO, buf), tb, dest_dir, name, is_dir, partial=False)

    @contextlib.contextmanager
    def _copy_disk(self, machine: Machine, image: Path, *, read_only: bool) -> Iterator[str]:
        """Hot-plug image as a virtio disk for one copy; yields its serial (the guest's
        /dev/disk/by-id/virtio-SERIAL), then unplugs it. _NoDiskCopy when it cannot be
        attached: nothing reached the guest then."""
        self._disks += 1
        node = f"nestbed-copy{self._disks}"
        try:
            machine.qmp("blockdev-add", **{
                "driver": "raw", "node-name": node, "read-only": read_only,
                "file": {"driver": "file", "filename": os.fspath(image), "read-only": read_only},
            })  # fmt: skip
        except MachineError as e:
            raise _NoDiskCopy(str(e)) from None
        try:
            try:
                machine.qmp("device_add", driver="virtio-blk-pci", id=node, drive=node,
                            serial=node)  # fmt: skip
            except MachineError as e:
                raise _NoDiskCopy(str(e)) from None
            try:
                yield node
            finally:
                self._unplug(machine, node)
        finally:
            with contextlib.suppress(MachineError):
                machine.qmp("blockdev-del", **{"node-name": node})

    def _guest_copy(self, script: str, *args: str) -> None:
        res = self.context.execute(["sh", "-c", WAIT_FOR_DISK + script, "sh", *args])
        if res.returncode == 90:
            raise _NoDiskCopy(res.stderr.decode(errors="replace").strip())
        if res.returncode != 0:
            self.context.warn(f"copy failed: {res.stderr.decode(errors='replace').strip()}")
            raise CommandRefused(COPY_FAILED)

    def _unplug(self, machine: Machine, node: str, timeout: float = 30.0) -> None:
        """device_del, then wait for QEMU's DEVICE_DELETED (the guest has let it go)."""
        seen = len(machine.events())
        with contextlib.suppress(MachineError):
            machine.qmp("device_del", id=node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and machine.running:
            if any(e.name == "DEVICE_DELETED" and e.data.get("device") == node
                   for e in machine.events()[seen:]):  # fmt: skip
                return
            time.sleep(0.05)
        self.context.warn(f"the guest did not release the copy disk {node} within {timeout:.0f} s")

    def _guest_size(self, tb: str) -> int | None:
        """Bytes under tb in the guest (None when du cannot tell: the agent's copy then
        gives the error)."""
        argv: Sequence[str] = ["du", "-s", "--apparent-size", "--block-size=1", "--", tb]
        res = self.context.execute(argv, timeout=60)
        try:
            return int(res.stdout.split()[0]) if res.returncode == 0 else None
        except (ValueError, IndexError):
            return None

    # ---- on the host ---------------------------------------------------------------------
    def _extract(
        self, buf: BinaryIO, tb: str, dest_dir: str, name: str, is_dir: bool, *, partial: bool
    ) -> None:
        """The tar stream (in buf) into dest_dir, its top entry renamed to name. Read as a
        stream, so a partial one yields every member that arrived, the last one cut off."""
        top = os.path.basename(tb)

        def members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
            for m in tf:
                rest = m.name.split("/", 1)
                if rest[0] != top or (not is_dir and (len(rest) > 1 or not m.isfile())):
                    raise ValueError(f"unexpected tar member {m.name}")
                m.name = name + ("/" + rest[1] if len(rest) > 1 else "")
                m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
                yield m

        buf.flush()
        buf.seek(0)
        try:
            with tarfile.open(fileobj=buf, mode="r|") as tf:
                os.makedirs(dest_dir, exist_ok=True)
                safe_extract(tf, Path(dest_dir), members(tf))
        except (OSError, ValueError, tarfile.TarError, NestbedError) as e:
            if partial:  # the cut-off end of the stream: what came before is kept
                return
            self.context.warn(f"copyup {tb} -> {os.path.join(dest_dir, name)} failed: {e}")
            raise CommandRefused(COPY_FAILED) from None


class _NoDiskCopy(Exception):
    """The copy disk could not be attached or seen: copy through the agent instead."""


def _discard(data: bytes) -> None:
    pass


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
