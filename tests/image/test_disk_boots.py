"""A nestbed image's disk boots by itself, under either firmware, as any QEMU command line
would boot it: no -kernel, no nestbed (docs/images.md, "The disk")."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nestbed.image import ImagePaths, disk
from nestbed.qemu.machine import OVMF_CODE, OVMF_VARS
from tests_support import sha256

QUESTION = (
    b"echo answer=$((6 * 7)) efi=$(test -d /sys/firmware/efi && echo yes || echo no)"
    b" root=$(findmnt -no SOURCE /)\n"
)


def boot_and_ask(argv: list[str], console: Path) -> tuple[bytes, bytes]:
    """Start QEMU, wait for the root shell the image logs in on its serial console, ask the
    question; (the answer line, everything the console said)."""
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    try:
        while not console.exists():
            assert qemu.poll() is None, qemu.stderr.read() if qemu.stderr else b""
            time.sleep(0.1)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(console))
            sock.settimeout(1)
            deadline = time.monotonic() + 400
            asked = False
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    seen += sock.recv(65536)
                if not asked and re.search(rb"root@\S+:~# ", seen):
                    sock.sendall(QUESTION)
                    asked = True
                found = re.search(rb"(answer=42 [^\r\n]*)\r?\n", seen)  # the whole line
                if found:
                    return found.group(1), seen
        return b"", seen
    finally:
        qemu.kill()
        qemu.wait()


@pytest.mark.vm
@pytest.mark.parametrize("firmware", ["bios", "efi"])
def test_the_disk_boots_by_itself(nestbed_image: ImagePaths, tmp_path: Path, firmware: str) -> None:
    """SeaBIOS: gptmbr.bin, syslinux on the EFI system partition; OVMF: systemd-boot as the
    removable-media loader. Either way the kernel from the EFI system partition finds the
    root partition by its PARTUUID, and the disk is not written."""
    if firmware == "efi" and not OVMF_CODE.exists():
        pytest.skip("needs ovmf (scripts/setup installs it)")
    before = sha256(nestbed_image.disk)
    console = tmp_path / "console.sock"
    argv = [
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", "tcg",
        "-cpu", "max", "-smp", "2", "-m", "1024", "-snapshot",
        "-drive", f"file={nestbed_image.disk},format=raw,if=virtio",
        "-chardev", f"socket,id=console,path={console},server=on,wait=on",
        "-serial", "chardev:console", "-nic", "none",
    ]  # fmt: skip
    if firmware == "efi":
        variables = tmp_path / "efivars.fd"
        shutil.copyfile(OVMF_VARS, variables)
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]  # fmt: skip
    answer, seen = boot_and_ask(argv, console)
    tail = seen[-3000:].decode(errors="replace")
    assert answer, f"no shell answered on the console; it said:\n{tail}"
    efi = "yes" if firmware == "efi" else "no"
    assert answer.split() == [b"answer=42", f"efi={efi}".encode(), b"root=/dev/vda2"], tail
    if firmware == "bios":
        assert b"SYSLINUX" in seen
    assert sha256(nestbed_image.disk) == before


def test_the_partition_table_is_what_the_boot_loaders_and_nspawn_look_for(
    nestbed_image: ImagePaths,
) -> None:
    """GPT: the EFI system partition (legacy-BIOS-bootable, for gptmbr.bin) and the root,
    typed as the DPS root for the architecture, with the PARTUUID the boot entries name."""
    res = subprocess.run(["sfdisk", "--json", str(nestbed_image.disk)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    table = json.loads(res.stdout)["partitiontable"]
    esp, root = table["partitions"]
    assert table["label"] == "gpt"
    assert esp["type"] == str(disk.ESP_TYPE).upper()
    assert "LegacyBIOSBootable" in esp.get("attrs", "")
    assert root["type"] == str(disk.ROOT_TYPES["amd64"]).upper()
    assert root["uuid"] == str(disk.ROOT_PARTUUID).upper()
    assert root["start"] * 512 == disk.root_offset(nestbed_image.disk)
