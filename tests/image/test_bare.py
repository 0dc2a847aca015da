"""Bare disks: a nestbed image known only by its disk (no manifest.json beside it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nestbed.image import ImageError, ImagePaths
from nestbed.image import disk as layout
from nestbed.image.bare import load_bare_image, load_image
from nestbed.qemu.machine import Machine, MachineConfig

needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")

INFO: dict[str, Any] = {
    "name": "bookworm-amd64-minimal-x", "release": "bookworm", "arch": "amd64",
    "flavour": "minimal", "kernel_version": "6.1.0-9-cloud-amd64",
    "kernel": "/boot/vmlinuz-6.1.0-9-cloud-amd64",
    "initrd": "/boot/initrd.img-6.1.0-9-cloud-amd64",
    "cmdline": "root=/dev/disk/by-id/virtio-nestbed-root rw", "root_serial": "nestbed-root",
    "base_serial": "nestbed-base", "agent_port": "org.nestbed.control", "format": "raw",
    "created": "2026-01-01T00:00:00+00:00", "packages": ["udev"], "sources": [],
}  # fmt: skip


def ext4(path: Path, files: dict[str, bytes], *, partitioned: bool = False) -> Path:
    """A small ext4 disk holding `files` (path -> content): the whole disk, as images were
    before they were partitioned, or the root partition of a GPT laid out as nestbed's."""
    tree = path.with_suffix(".tree")
    for rel, content in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(content)
    if partitioned:
        size = layout.ROOT_START + (16 << 20) + layout.GPT_TAIL
        layout.write_table(path, size, "amd64")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={layout.ROOT_START}", "-d",
                        str(tree), str(path), f"{layout.root_size(size) // 1024}k"],
                       check=True)  # fmt: skip
        return path
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path)], check=True)
    return path


def fake_image(
    path: Path, info: dict[str, Any] | None = None, without: str = "", *, partitioned: bool = False
) -> Path:
    """A disk like a nestbed image's: image.json, kernel and initrd (`without` one of them)."""
    files = {
        "etc/nestbed/image.json": json.dumps(INFO if info is None else info).encode(),
        "boot/vmlinuz-6.1.0-9-cloud-amd64": b"kernel\x00\xff" * 1000,
        "boot/initrd.img-6.1.0-9-cloud-amd64": b"initrd" * 1000,
    }
    kept = {k: v for k, v in files.items() if not without or without not in k}
    return ext4(path, kept, partitioned=partitioned)


@needs_mkfs
@pytest.mark.parametrize("partitioned", [False, True], ids=["whole-disk", "gpt"])
def test_kernel_initrd_and_manifest_come_from_the_disk(tmp_path: Path, partitioned: bool) -> None:
    """From the root partition of a partitioned disk, and from a disk that is one file
    system (images built before disks were partitioned)."""
    disk = fake_image(tmp_path / "disk.img", partitioned=partitioned)
    image = load_bare_image(disk, tmp_path / "work")
    assert image.disk == disk
    assert image.kernel.read_bytes() == b"kernel\x00\xff" * 1000
    assert image.initrd.read_bytes() == b"initrd" * 1000
    assert image.kernel.parent == image.initrd.parent == tmp_path / "work"
    m = image.manifest
    assert (m.name, m.kernel_version, m.cmdline, m.format) == (
        INFO["name"], INFO["kernel_version"], INFO["cmdline"], "raw")  # fmt: skip
    assert (m.root_serial, m.base_serial, m.agent_port) == (
        "nestbed-root", "nestbed-base", "org.nestbed.control")  # fmt: skip
    assert m.size == disk.stat().st_size
    # what a testbed boots: the disk itself, with the extracted kernel
    config = MachineConfig.for_image(image, base_image=True)
    assert (config.root, config.kernel, config.cmdline) == (disk, image.kernel, INFO["cmdline"])
    assert [(d.path, d.serial, d.format) for d in config.drives] == [(disk, "nestbed-base", "raw")]


@needs_mkfs
def test_a_symlink_to_the_disk_is_kept_as_given(tmp_path: Path) -> None:
    disk = fake_image(tmp_path / "real.img")
    link = tmp_path / "baseimage"
    link.symlink_to(disk)
    assert load_bare_image(link, tmp_path / "w").disk == link


def test_not_a_nestbed_image_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    with pytest.raises(ImageError) as e:
        load_bare_image(junk, tmp_path / "w")
    assert str(e.value) == (
        f"{junk}: not a nestbed image (no manifest.json beside it and no"
        " /etc/nestbed/image.json inside)"
    )
    assert not (tmp_path / "w").exists()


@needs_mkfs
def test_ext4_without_image_json_is_not_a_nestbed_image(tmp_path: Path) -> None:
    disk = ext4(tmp_path / "plain.img", {"etc/hostname": b"x\n"})
    with pytest.raises(ImageError, match="not a nestbed image"):
        load_bare_image(disk, tmp_path / "w")


@needs_mkfs
@pytest.mark.parametrize(
    ("info", "without", "message"),
    [
        ("{", "", "image.json inside is not valid JSON"),
        ({**INFO, "cmdline": ""}, "", "image.json inside lacks cmdline"),
        ({k: v for k, v in INFO.items() if k != "kernel"}, "", "lacks kernel$"),
        ({**INFO, "kernel": "/boot/../x y"}, "", "bad kernel path"),
        ({**INFO, "format": "qcow2"}, "", "not raw"),
        (INFO, "initrd", "cannot read /boot/initrd.img-6.1.0-9-cloud-amd64 from it"),
    ],
)
def test_broken_image_json_or_missing_files(
    tmp_path: Path, info: Any, without: str, message: str
) -> None:
    if isinstance(info, str):
        disk = ext4(tmp_path / "d.img", {"etc/nestbed/image.json": info.encode()})
    else:
        disk = fake_image(tmp_path / "d.img", info, without)
    with pytest.raises(ImageError, match=message) as e:
        load_bare_image(disk, tmp_path / "w")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{disk}: ")
    assert not (tmp_path / "w" / "initrd.img").exists()


def test_missing_or_unusable_paths(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file or device"):
        load_bare_image(tmp_path / "nope", tmp_path / "w")
    with pytest.raises(ImageError, match="neither a file nor a block device"):
        load_bare_image(tmp_path, tmp_path / "w")
    with pytest.raises(ImageError, match="neither a file nor a block device"):
        load_bare_image(Path("/dev/null"), tmp_path / "w")


@needs_mkfs
def test_load_image_takes_a_directory_or_a_bare_disk(tmp_path: Path) -> None:
    disk = fake_image(tmp_path / "bare" / "disk.img")
    assert load_image(disk, tmp_path / "w").manifest.extra["bare"] is True
    with pytest.raises(ImageError, match="not a complete nestbed image"):
        load_image(tmp_path / "bare", tmp_path / "w")  # a directory: must have a manifest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.network  # the default image is built (from the mirror) unless cached
def test_the_default_image_is_a_bare_image_too(nestbed_image: ImagePaths, tmp_path: Path) -> None:
    """Without its manifest, the default image's disk alone gives the same kernel, initrd and
    boot parameters; the disk is not written."""
    before = sha256(nestbed_image.disk)
    link = tmp_path / "baseimage"  # no manifest.json beside it
    link.symlink_to(nestbed_image.disk)
    image = load_image(link, tmp_path / "w")
    assert image.disk == link
    assert sha256(image.kernel) == sha256(nestbed_image.kernel)
    assert sha256(image.initrd) == sha256(nestbed_image.initrd)
    got, want = image.manifest, nestbed_image.manifest
    for field in ("name", "release", "arch", "flavour", "kernel_version", "cmdline",
                  "root_serial", "base_serial", "agent_port", "size", "format", "packages",
                  "sources"):  # fmt: skip
        assert getattr(got, field) == getattr(want, field), field
    assert sha256(nestbed_image.disk) == before


@pytest.mark.vm
def test_a_bare_image_boots(nestbed_image: ImagePaths, tmp_path: Path) -> None:
    link = tmp_path / "baseimage"
    link.symlink_to(nestbed_image.disk)
    image = load_bare_image(link, tmp_path / "w")
    with Machine(MachineConfig.for_image(image)) as machine:
        res = machine.channel.exec(["uname", "-r"], timeout=60)
    assert res.stdout.decode().strip() == nestbed_image.manifest.kernel_version
