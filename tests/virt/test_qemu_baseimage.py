"""nestbed-virt-qemu exports the base image to nested tests: when (the flags, the runner's
hint, several images), the capabilities it then advertises, bad input as one line, and in a
real guest: /dev/baseimage and /lib/autopkgtest/baseimage read-only, one filesystem UUID
seen, both kept after a revert and a reboot, and the base image never written."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from nestbed.testbed.client import Testbed as Client
from tests_support import fake_image, open_qemu_testbed, sha256

BIN = Path(sys.executable).parent
SERVER = str(BIN / "nestbed-virt-qemu")
NESTBED = str(BIN / "nestbed")
SMOKE = Path(__file__).parent.parent.parent / "examples" / "smoke"
HINT = {"NESTBED_WANT_BASEIMAGE": "1"}
NO_HINT = {"NESTBED_WANT_BASEIMAGE": "0"}


def caps_before_open(*args: str, env: dict[str, str]) -> tuple[frozenset[str], list[str]]:
    """What the server advertises before any boot, and what it said on stderr."""
    said: list[str] = []
    tb = Client([SERVER, *args], log=said.append, env=env)
    tb.start()
    try:
        caps = tb.query_capabilities(timeout=60)
    finally:
        tb.quit()
    return caps, said


def server_fails(*args: str, env: dict[str, str] | None = None) -> str:
    """Start the server with bad input: it exits non-zero with one line, no traceback."""
    res = subprocess.run(
        [SERVER, *args], capture_output=True, text=True, timeout=60, check=False,
        stdin=subprocess.DEVNULL, env={**os.environ, **(env or NO_HINT)},
    )  # fmt: skip
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


# ---- when the base image is exported (no boot needed) -----------------------------------


def test_export_follows_the_flags_and_the_hint(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img")
    extra = tmp_path / "extra.img"
    extra.write_bytes(b"\0" * 4096)
    one, two = [str(image)], [str(image), str(extra)]
    cases = [
        ([*one], NO_HINT, False),
        ([*one], HINT, True),  # the runner's hint: a test needs it
        (["--baseimage", *one], NO_HINT, True),  # a flag: IMAGE is not its PATH
        (["--no-baseimage", *one], HINT, False),
        ([f"--baseimage={image}/disk.img", *one], NO_HINT, True),
        ([f"--baseimage={extra}", *two], NO_HINT, True),
        ([f"--baseimage={image}", *two], HINT, True),
        (["--no-baseimage", *two], HINT, False),
    ]
    for args, env, exported in cases:
        caps, _said = caps_before_open(*args, env=env)
        assert ("baseimage" in caps) == exported, (args, env, caps)
        assert "revert" in caps


def test_several_images_and_only_a_hint_is_not_exported_and_says_why(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img")
    extra = tmp_path / "extra.img"
    extra.write_bytes(b"\0" * 4096)
    caps, said = caps_before_open(str(image), str(extra), env=HINT)
    assert "baseimage" not in caps
    why = [line for line in said if "several images" in line]
    assert len(why) == 1 and "--baseimage=PATH" in why[0], said


def test_bad_baseimage_input_is_one_line(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img")
    extra = tmp_path / "extra.img"
    extra.write_bytes(b"\0" * 4096)
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 4096)
    line = server_fails(f"--baseimage={tmp_path}/nope", str(image))
    assert line == f"nestbed-virt-qemu: --baseimage={tmp_path}/nope: no such file"
    line = server_fails(f"--baseimage={other}", str(image), str(extra))
    assert line == f"nestbed-virt-qemu: --baseimage={other}: not among the images given"
    line = server_fails("--baseimage", str(image), str(extra))
    assert "several images given: name the one to export with --baseimage=PATH" in line
    res = subprocess.run(
        [SERVER, "--baseimage", "--no-baseimage", str(image)],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert res.returncode == 2 and "not allowed with" in res.stderr


def test_a_disk_that_is_not_a_nestbed_image_is_one_line(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * 65536)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {**NO_HINT, "TMPDIR": str(private_tmp)}
    line = server_fails(str(plain), env=env)
    # no partition table either: not booted as a disk from another builder
    assert line.startswith(
        f"nestbed-virt-qemu: {plain}: neither a nestbed image nor a bootable disk"
    ), line
    line = server_fails(str(tmp_path / "missing.img"), env=env)
    assert line == f"nestbed-virt-qemu: {tmp_path}/missing.img: no such file or device"
    assert not list(private_tmp.iterdir())  # the bare image's work dir is gone


def test_runner_reports_bad_baseimage_in_one_line(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img")
    res = subprocess.run(
        [NESTBED, "-B", str(SMOKE), "--", "qemu", f"--baseimage={tmp_path}/nope", str(image)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 16
    errors = [line for line in res.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, res.stderr
    assert errors[0].endswith(f"nestbed-virt-qemu: --baseimage={tmp_path}/nope: no such file")
    assert "Traceback" not in res.stderr


# ---- in a real guest ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(nestbed_image: ImagePaths) -> Iterator[Client]:
    """A testbed whose base image is exported by the runner's hint alone."""
    with open_qemu_testbed(nestbed_image, env=HINT) as tb:
        yield tb


def sh(tb: Client, script: str) -> str:
    res = tb.execute(["sh", "-c", script])
    assert res.returncode == 0, res.stderr
    return res.stdout.decode()


# where both paths lead, whether the disk is read-only, what writing to it does, and the
# filesystem UUIDs the guest's udev knows of
LOOK = """
for d in /sys/block/vd*; do
  case $(cat $d/serial) in
    nestbed-base) base=/dev/${d##*/};;
    nestbed-root) root=/dev/${d##*/};;
  esac
done
echo "dev=$(readlink -f /dev/baseimage) lib=$(readlink -f /lib/autopkgtest/baseimage) base=$base"
if [ -L /lib/autopkgtest/baseimage ]; then echo libtype=symlink; fi
echo "ro=$(blockdev --getro /dev/baseimage)"
if dd if=/dev/zero of=/lib/autopkgtest/baseimage bs=4096 count=1 conv=fsync 2>/dev/null; then
  echo write=ok; else echo write=refused; fi
# the disks that file system UUIDs lead to (a partition's disk: its name without the number)
echo "uuid-disks=$(for u in /dev/disk/by-uuid/*; do readlink -f "$u"; done \
  | sed 's/[0-9]*$//' | sort -u | tr '\n' ,) root=$root"
"""


def look(tb: Client) -> dict[str, str]:
    seen: dict[str, str] = {}
    for line in sh(tb, LOOK).splitlines():
        for word in line.split():
            key, _, value = word.partition("=")
            seen[key] = value
    return seen


@pytest.mark.vm
def test_exported_base_image_in_the_guest(exported: Client, nestbed_image: ImagePaths) -> None:
    """One testbed through open (a restored ready state or a cold boot), revert, reboot,
    and finally root scribbling over every disk: the base image stays as it was."""
    before = sha256(nestbed_image.disk)
    for step in ("open", "revert", "reboot"):
        if step == "revert":
            exported.revert(timeout=400)
        elif step == "reboot":
            exported.reboot(timeout=400)
        caps = exported.query_capabilities()  # as the runner asks after each of these
        assert "baseimage" in caps, step
        # TCG -cpu max gives the guest SVM: KVM works inside it
        assert "nested-kvm" in caps, step
        seen = look(exported)
        assert seen["dev"] == seen["lib"] == seen["base"] != "", (step, seen)
        assert seen.get("libtype") == "symlink", (step, seen)
        assert (seen["ro"], seen["write"]) == ("1", "refused"), (step, seen)
        # the base disk is a copy of the root's: its UUIDs must lead to the root disk only
        assert seen["uuid-disks"] == f"{seen['root']},", (step, seen)
    scribble = (
        "for d in /dev/vd?; do blockdev --setrw $d || true;"
        " dd if=/dev/urandom of=$d bs=1M count=4 seek=1 conv=fsync 2>/dev/null || true; done;"
        " sync"
    )
    exported.execute(["sh", "-c", scribble], timeout=120)
    assert sha256(nestbed_image.disk) == before


# ---- a bare disk boots (no manifest beside it: /dev/baseimage inside a testbed) -----------


@pytest.mark.vm
def test_bare_disk_boots_cold_and_leaves_nothing(nestbed_image: ImagePaths, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "raw.img").symlink_to(nestbed_image.disk)  # no manifest.json beside it
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    states = nestbed_image.directory.parent / ".states"
    states_before = set(states.iterdir()) if states.exists() else set()
    tb = Client(
        [SERVER, str(bare / "raw.img")], log=lambda _line: None,
        env={**NO_HINT, "TMPDIR": str(private_tmp)},
    )  # fmt: skip
    tb.start()
    try:
        tb.open(timeout=400)
        kernel = tb.execute(["uname", "-r"]).stdout.decode().strip()
        assert kernel == nestbed_image.manifest.kernel_version
    finally:
        tb.quit()
    assert not list(private_tmp.iterdir())  # kernel, initrd, overlay: all gone
    # a bare disk never gets a saved ready state
    assert (set(states.iterdir()) if states.exists() else set()) == states_before
