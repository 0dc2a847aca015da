"""Boot a built image under QEMU (TCG) and talk to its control agent."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from nestbed.qemu.machine import Machine, MachineConfig, MachineError
from tests_support import sha256

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def booted(nestbed_image: ImagePaths) -> Iterator[tuple[Machine, str]]:
    """The image booted once for this module, with itself attached again as the base image."""
    before = sha256(nestbed_image.disk)
    machine = Machine(MachineConfig.for_image(nestbed_image, base_image=True))
    machine.launch()
    try:
        yield machine, before
    finally:
        machine.shutdown()


def test_agent_answers(booted: tuple[Machine, str], nestbed_image: ImagePaths) -> None:
    machine, _ = booted
    ch = machine.channel
    assert ch.ping() < 10
    res = ch.exec(["uname", "-r"], timeout=60)
    assert res.status == 0
    assert res.stdout.decode().strip() == nestbed_image.manifest.kernel_version


def test_exec_user_env_stdin_signal(booted: tuple[Machine, str]) -> None:
    ch = booted[0].channel
    res = ch.exec(["sh", "-c", 'id -un; echo "$HOME $X"; pwd; cat; echo e >&2'],
                  user="nestbed", env={"X": "y"}, stdin=b"in\n", timeout=60)  # fmt: skip
    assert res.stdout == b"nestbed\n/home/nestbed y\n/home/nestbed\nin\n"
    assert (res.stderr, res.status) == (b"e\n", 0)
    assert ch.exec(["sh", "-c", "kill -9 $$"], timeout=60).signal == 9


def test_put_get_round_trip(booted: tuple[Machine, str], tmp_path: Path) -> None:
    ch = booted[0].channel
    src = tmp_path / "tree"
    (src / "d").mkdir(parents=True)
    (src / "x.sh").write_text("#!/bin/sh\necho from-host\n")
    (src / "x.sh").chmod(0o751)
    (src / "d" / "blob").write_bytes(os.urandom(300_000))
    (src / "l").symlink_to("d/blob")
    ch.put(src, "/srv/in", timeout=60)
    assert ch.exec(["/srv/in/tree/x.sh"], timeout=60).stdout == b"from-host\n"
    res = ch.exec(["stat", "-c", "%a %F", "/srv/in/tree/x.sh", "/srv/in/tree/l"], timeout=60)
    assert res.stdout == b"751 regular file\n777 symbolic link\n"
    out = tmp_path / "out"
    out.mkdir()
    ch.get("/srv/in/tree", out, timeout=60)
    assert (out / "tree" / "d" / "blob").read_bytes() == (src / "d" / "blob").read_bytes()
    assert stat.S_IMODE((out / "tree" / "x.sh").stat().st_mode) == 0o751
    assert os.readlink(out / "tree" / "l") == "d/blob"


def test_root_overlay_and_readonly_base_are_told_apart(booted: tuple[Machine, str]) -> None:
    ch = booted[0].channel
    script = (
        'root=$(readlink -f "$(findmnt -no SOURCE /)"); base=$(readlink -f /dev/baseimage);'
        " byid=$(readlink -f /lib/autopkgtest/baseimage);"
        ' echo "$root $base $byid $(blockdev --getro $root) $(blockdev --getro $base)";'
        " findmnt -no OPTIONS / | cut -d, -f1; touch /written-by-guest && echo wrote"
    )
    res = ch.exec(["sh", "-c", script], timeout=60)
    assert res.status == 0, res.stderr
    root, base, byid, root_ro, base_ro, root_opts, wrote = res.stdout.decode().split()
    assert (root, base, byid) == ("/dev/vda2", "/dev/vdb", "/dev/vdb")  # root: partition 2
    assert (root_ro, base_ro, root_opts, wrote) == ("0", "1", "rw", "wrote")
    # the base really is read-only, even for root
    res = ch.exec(["dd", "if=/dev/zero", "of=/dev/vdb", "bs=512", "count=1"], timeout=60)
    assert res.status != 0


def test_base_image_identity_is_hidden(booted: tuple[Machine, str]) -> None:
    """The base disk carries the root disk's UUIDs and labels: only the root disk may be found
    by them (its EFI system partition and its root partition, each by UUID and by label)."""
    ch = booted[0].channel
    res = ch.exec(["sh", "-c", "udevadm settle; cd /dev/disk;"
                   " readlink -f by-uuid/* by-label/* by-partuuid/* | sort"],
                  timeout=60)  # fmt: skip
    links = res.stdout.decode().split()
    assert links == ["/dev/vda1"] * 3 + ["/dev/vda2"] * 3, res.stderr
    res = ch.exec(["udevadm", "info", "--query=property", "/dev/vdb"], timeout=60)
    props = dict(line.split("=", 1) for line in res.stdout.decode().splitlines())
    assert not [k for k in props if k.startswith("ID_FS_")], props
    assert props.get("UDISKS_IGNORE") == "1"
    # readable by everyone (a non-root test boots it), group kvm; the test user is in kvm
    res = ch.exec(["sh", "-c", "stat -L -c '%a %G' /lib/autopkgtest/baseimage; id -nG nestbed"],
                  timeout=60)  # fmt: skip
    assert res.stdout.decode().splitlines() == ["644 kvm", "nestbed kvm"]
    res = ch.exec(["head", "-c", "4096", "/dev/baseimage"], user="nestbed", timeout=60)
    assert (res.status, len(res.stdout)) == (0, 4096)


def test_image_describes_itself(booted: tuple[Machine, str], nestbed_image: ImagePaths) -> None:
    """/etc/nestbed/image.json names the kernel the guest runs and how to boot the disk."""
    ch = booted[0].channel
    info = json.loads(ch.exec(["cat", "/etc/nestbed/image.json"], timeout=60).stdout)
    m = nestbed_image.manifest
    assert info["kernel_version"] == ch.exec(["uname", "-r"], timeout=60).stdout.decode().strip()
    assert (info["name"], info["release"], info["arch"], info["flavour"]) == (
        m.name, m.release, m.arch, m.flavour)  # fmt: skip
    assert (info["cmdline"], info["root_serial"], info["base_serial"], info["agent_port"]) == (
        m.cmdline, m.root_serial, m.base_serial, m.agent_port)  # fmt: skip
    assert (info["kernel"], info["initrd"]) == (
        f"/boot/vmlinuz-{m.kernel_version}", f"/boot/initrd.img-{m.kernel_version}")  # fmt: skip
    # they are the very files the host boots
    res = ch.exec(["sha256sum", info["kernel"], info["initrd"]], timeout=60)
    guest = [line.split()[0] for line in res.stdout.decode().splitlines()]
    assert guest == [sha256(nestbed_image.kernel), sha256(nestbed_image.initrd)]


def test_guest_has_kvm_for_nested_vms(booted: tuple[Machine, str]) -> None:
    """-cpu max under TCG emulates SVM: nestbed-kvm.service loads kvm_amd, /dev/kvm appears."""
    res = booted[0].channel.exec(["sh", "-c", "systemctl is-system-running --wait; ls /dev/kvm"],
                                 timeout=120)  # fmt: skip
    assert res.stdout.decode().split() == ["running", "/dev/kvm"], res.stderr


def test_base_image_unchanged_after_boot(
    booted: tuple[Machine, str], nestbed_image: ImagePaths
) -> None:
    machine, before = booted
    machine.channel.exec(["sync"], timeout=60)
    machine.shutdown()
    assert not machine.running
    assert sha256(nestbed_image.disk) == before


def test_failed_launch_releases_everything(nestbed_image: ImagePaths, tmp_path: Path) -> None:
    config = MachineConfig.for_image(nestbed_image, extra_args=("-no-such-option",))
    machine = Machine(config)
    with pytest.raises(MachineError, match="no-such-option"):
        machine.launch(timeout=30)
    assert not machine.running and machine._tmp is None


def test_a_guest_panic_is_reported_as_one(nestbed_image: ImagePaths) -> None:
    """The pvpanic device: QEMU sends GUEST_PANICKED and ends at once, and says so."""
    machine = Machine(MachineConfig.for_image(nestbed_image))
    machine.launch()
    try:
        panic = ["systemd-run", "--on-active=1", "sh", "-c", "echo c > /proc/sysrq-trigger"]
        assert machine.channel.exec(panic, timeout=60).status == 0
        deadline = time.monotonic() + 120
        while machine.running:
            assert time.monotonic() < deadline, "QEMU did not end on the guest's panic"
            time.sleep(0.2)
        assert machine.exit_note() == "QEMU ended: the guest panicked"
        assert "GUEST_PANICKED" in [e.name for e in machine.events()]
    finally:
        machine.shutdown()
