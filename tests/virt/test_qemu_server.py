"""nestbed-virt-qemu's protocol with a real VM, through the runner's client: exec prefix,
copies, revert (a restored ready state), reboot, and a stale ready state replaced."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed.errors import VirtServerError
from nestbed.image import ImagePaths
from nestbed.qemu.state import StateStore
from nestbed.testbed.client import CommandTimeout
from nestbed.testbed.client import Testbed as Client
from tests_support import open_qemu_testbed

pytestmark = pytest.mark.vm

SERVER = str(Path(sys.executable).parent / "nestbed-virt-qemu")


@pytest.fixture(scope="module")
def testbed(nestbed_image: ImagePaths) -> Iterator[Client]:
    with open_qemu_testbed(nestbed_image) as tb:
        yield tb


def test_capabilities_and_exec_prefix(testbed: Client) -> None:
    for cap in ("revert", "revert-full-system", "root-on-testbed", "isolation-machine", "reboot"):
        assert cap in testbed.caps
    # not asked for: no base image; TCG -cpu max (this project's machines) gives the guest KVM
    assert "baseimage" not in testbed.caps
    assert "nested-kvm" in testbed.caps
    assert testbed.execute(["test", "-e", "/dev/baseimage"]).returncode == 1
    assert testbed.normal_user == "nestbed"
    res = testbed.execute(["sh", "-c", "cat; echo err >&2; exit 3"], stdin=b"in")
    assert (res.returncode, res.stdout, res.stderr) == (3, b"in", b"err\n")
    assert testbed.execute(["sh", "-c", "kill -TERM $$"]).returncode == 128 + 15
    assert testbed.execute(["id", "-un"]).stdout == b"root\n"
    res = testbed.execute(["id", "-un"], user="nestbed")
    assert res.stdout == b"nestbed\n"


def test_captured_commands_keep_the_exec_prefixs_meaning(testbed: Client) -> None:
    """The runner runs captured commands through the multiplexer itself, not by starting
    the exec helper: the same exit statuses, stdin of any size, timeouts that end the
    command in the guest."""
    assert testbed.execute(["sh", "-c", "exit 255"]).returncode == 253
    blob = os.urandom(3 << 20)  # more than a pipe holds
    res = testbed.execute(["sha256sum"], stdin=blob)
    assert res.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()
    with pytest.raises(CommandTimeout, match="timed out after 3s"):
        testbed.execute(["sh", "-c", "echo $$ > /tmp/slow.pid; exec sleep 120"], timeout=3)
    gone = (
        "for i in $(seq 50); do kill -0 $(cat /tmp/slow.pid) 2>/dev/null || exit 0;"
        " sleep 0.2; done; exit 1"
    )
    assert testbed.execute(["sh", "-c", gone]).returncode == 0


def test_copies_keep_modes_and_symlinks(testbed: Client, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "sub" / "blob").write_bytes(os.urandom(200_000))
    (src / "link").symlink_to("sub/blob")
    tb = f"{testbed.scratch}/copied"
    testbed.copydown(str(src) + "/", tb + "/")
    assert testbed.execute([f"{tb}/run.sh"]).stdout == b"hi\n"
    single = tmp_path / "single"
    single.write_text("one\n")
    single.chmod(0o604)
    testbed.copydown(str(single), f"{testbed.scratch}/single.txt")
    res = testbed.execute(["stat", "-c", "%a %U", f"{testbed.scratch}/single.txt"])
    assert res.stdout == b"604 root\n"
    back = tmp_path / "back"
    testbed.copyup(tb + "/", str(back) + "/")
    assert (back / "sub" / "blob").read_bytes() == (src / "sub" / "blob").read_bytes()
    assert stat.S_IMODE((back / "run.sh").stat().st_mode) == 0o750
    assert os.readlink(back / "link") == "sub/blob"
    testbed.copyup(f"{testbed.scratch}/single.txt", str(tmp_path / "one.txt"))
    assert (tmp_path / "one.txt").read_text() == "one\n"
    # a path that is not there: that copy fails, the testbed stays up
    with pytest.raises(VirtServerError, match="copyup of /nonexistent"):
        testbed.copyup("/nonexistent", str(tmp_path / "none"))
    assert testbed.execute(["true"]).returncode == 0


def test_a_large_tree_goes_through_disks_whole(testbed: Client, tmp_path: Path) -> None:
    """Many files and a large one (above DISK_COPY_MIN): down, the archive is hot-plugged
    as a disk the guest's tar reads; up, the guest's tar writes a blank one; each unplugged
    after; every file arrives with its mode."""
    src = tmp_path / "big"
    for d in range(20):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d}" / f"f{f}").write_text(f"{d}/{f}\n" * f)
    blob = os.urandom(12 << 20)
    (src / "blob").write_bytes(blob)
    (src / "d0" / "f1").chmod(0o751)
    disks = ["sh", "-c", "dmesg | grep -c 'virtio_blk.*\\[vd'; ls /sys/block | grep -c vd"]
    before = testbed.execute(disks).stdout.split()
    tb = f"{testbed.scratch}/big"
    testbed.copydown(str(src) + "/", tb + "/")
    check = f"find {tb} -type f | wc -l; sha256sum < {tb}/blob; stat -c %a {tb}/d0/f1"
    check += f"; cat {tb}/d19/f3"
    res = testbed.execute(["sh", "-c", check])
    assert res.returncode == 0, res.stderr
    count, digest, _, mode, *last = res.stdout.decode().split()
    assert (int(count), mode, last) == (2001, "751", ["19/3"] * 3)
    assert digest == hashlib.sha256(blob).hexdigest()
    # and back up, through a blank disk the guest's tar writes
    testbed.copyup(tb + "/", str(tmp_path / "back") + "/")
    assert (tmp_path / "back" / "blob").read_bytes() == blob
    assert stat.S_IMODE((tmp_path / "back" / "d0" / "f1").stat().st_mode) == 0o751
    assert sorted(p.relative_to(tmp_path / "back") for p in (tmp_path / "back").rglob("*")) == (
        sorted(p.relative_to(src) for p in src.rglob("*"))
    )
    after = testbed.execute(disks).stdout.split()
    assert int(after[0]) == int(before[0]) + 2  # two disks came (the copies') ...
    assert after[1] == before[1]  # ... and went


def test_revert_gives_a_fresh_system_and_the_same_scratch(testbed: Client) -> None:
    scratch = testbed.scratch
    testbed.execute(["sh", "-c", "echo dirty > /etc/dirty"])
    ident = ["sh", "-c", "cat /etc/machine-id; hostname"]
    before = testbed.execute(ident).stdout
    assert testbed.revert(timeout=400) == scratch
    assert testbed.execute(["test", "-e", "/etc/dirty"]).returncode == 1
    assert testbed.execute(["test", "-d", scratch]).returncode == 0
    # a restored testbed gets its own identity and the host's time
    assert testbed.execute(ident).stdout != before
    guest_time = float(testbed.execute(["date", "+%s.%N"]).stdout)
    assert abs(guest_time - time.time()) < 10


def test_stale_ready_state_is_replaced_by_a_cold_boot(nestbed_image: ImagePaths) -> None:
    shape = ["--ram-size", "1536"]  # a shape of its own: a state no other test uses
    logs: list[str] = []

    def open_close() -> None:
        tb = Client([SERVER, "-d", *shape, str(nestbed_image.directory)], log=logs.append)
        tb.start()
        try:
            tb.open(timeout=400)
            assert tb.execute(["true"]).returncode == 0
        finally:
            tb.quit()

    store = StateStore(nestbed_image.directory)
    before = set(store.root.iterdir()) if store.root.exists() else set()
    try:
        open_close()
        new = [d for d in store.root.iterdir() if d not in before and not d.name.startswith(".")]
        assert len(new) == 1
        state = new[0] / "state.bin"
        state.chmod(0o644)
        state.write_bytes(state.read_bytes()[: 1 << 20])  # truncated: cannot be loaded
        logs.clear()
        open_close()
        assert any("unusable" in line for line in logs), logs
        assert any("ready state saved" in line for line in logs), logs
        assert (new[0] / "state.bin").stat().st_size > 1 << 20
    finally:
        for d in set(store.root.iterdir()) - before:
            StateStore.discard(d)


def test_reboot_keeps_the_scratch_dir(testbed: Client) -> None:
    before = testbed.execute(["cat", "/proc/sys/kernel/random/boot_id"]).stdout
    testbed.execute(["sh", "-c", f"echo kept > {testbed.scratch}/mark"])
    testbed.reboot(timeout=400)
    assert testbed.execute(["cat", "/proc/sys/kernel/random/boot_id"]).stdout != before
    assert testbed.execute(["cat", f"{testbed.scratch}/mark"]).stdout == b"kept\n"


def test_a_copyup_cut_short_by_the_copy_timeout_keeps_what_arrived(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    """--timeout-copy ends a copyup (here through a copy disk: 8 GiB is above DISK_COPY_MIN):
    the server answers `timeout' and, as autopkgtest does,
    the part that arrived stays on the host (the file, the tree so far); the testbed stays."""
    import subprocess
    from urllib.parse import unquote

    env = {**os.environ, "AUTOPKGTEST_VIRT_COPY_TIMEOUT": "8"}
    proc = subprocess.Popen([SERVER, str(nestbed_image.directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None

    def ask(line: str) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        assert proc.stdout.readline().strip() == "ok"
        scratch = ask("open").split()[1]
        prefix = [unquote(w) for w in ask("print-execute-command").split()[1].split(",")]
        # 8 GiB (sparse: free to make, but tar reads every byte): more than any copy moves
        # in 8 s under TCG (docs/qemu.md)
        script = f"mkdir {scratch}/d; truncate -s 8G {scratch}/d/big"
        made = subprocess.run([*prefix, "sh", "-ec", script], capture_output=True, timeout=600)
        assert made.returncode == 0, made.stderr
        assert ask(f"copyup {scratch}/d/big {tmp_path}/big") == "timeout"
        size = (tmp_path / "big").stat().st_size
        assert 0 < size < 8 << 30
        with open(tmp_path / "big", "rb") as f:
            assert f.read(1 << 20).strip(b"\0") == b""  # what arrived is the file's start
        assert ask(f"copyup {scratch}/d/ {tmp_path}/tree/") == "timeout"
        assert 0 < (tmp_path / "tree" / "big").stat().st_size < 8 << 30
        assert subprocess.run([*prefix, "true"], timeout=60).returncode == 0
        assert ask("close") == "ok"
    finally:
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait(120)
