"""The --nested image carries nestbed itself: its commands work inside a booted guest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nestbed.image import ImagePaths
from nestbed.image.contents import console_scripts
from nestbed.qemu.machine import Machine, MachineConfig

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def nested(nested_image: ImagePaths) -> Iterator[Machine]:
    machine = Machine(MachineConfig.for_image(nested_image, base_image=True))
    machine.launch(timeout=400)
    try:
        yield machine
    finally:
        machine.shutdown()


def test_every_console_script_runs(nested: Machine) -> None:
    for name in console_scripts():
        res = nested.channel.exec([name, "--help"], user="nestbed", timeout=120)
        assert res.status == 0, (name, res.stderr.decode())
        assert b"usage:" in res.stdout, name


def test_every_module_imports_with_debians_libraries(nested: Machine) -> None:
    """Debian's python3-debian and python3-rich (not the host's pip versions) serve nestbed."""
    script = (
        "import importlib, pkgutil, nestbed\n"
        "names = [m.name for m in pkgutil.walk_packages(nestbed.__path__, 'nestbed.')]\n"
        "for n in names:\n"
        "    if not n.endswith('__main__'):\n"
        "        importlib.import_module(n)\n"
        "print(nestbed.__file__, len(names))\n"
    )
    res = nested.channel.exec(["python3", "-c", script], user="nestbed", timeout=180)
    assert res.status == 0, res.stderr.decode()
    path, count = res.stdout.decode().split()
    assert path == "/usr/lib/python3/dist-packages/nestbed/__init__.py"
    assert int(count) > 20


def test_debugfs_reads_the_base_image_as_the_test_user(nested: Machine) -> None:
    """The base image's root file system is its partition 2, /dev/baseimage-part2."""
    res = nested.channel.exec(
        ["debugfs", "-c", "-R", "cat /etc/nestbed/image.json", "/dev/baseimage-part2"],
        user="nestbed",
        timeout=120,
    )
    assert res.status == 0 and b'"flavour": "nested"' in res.stdout, res.stderr.decode()


def test_the_base_image_loads_as_a_bare_image_inside(nested: Machine) -> None:
    """What `nestbed ... -- qemu /lib/autopkgtest/baseimage` does first inside the testbed:
    kernel and initrd read off the read-only base disk are the ones the testbed booted."""
    script = (
        "import sys, tempfile\n"
        "from pathlib import Path\n"
        "from nestbed.image.bare import load_image\n"
        "image = load_image(Path('/lib/autopkgtest/baseimage'), Path(tempfile.mkdtemp()))\n"
        "print(image.disk, image.kernel, image.initrd, image.manifest.flavour)\n"
    )
    ch = nested.channel
    res = ch.exec(["python3", "-c", script], user="nestbed", timeout=180)
    assert res.status == 0, res.stderr.decode()
    disk, kernel, initrd, flavour = res.stdout.decode().split()
    assert (disk, flavour) == ("/lib/autopkgtest/baseimage", "nested")
    res = ch.exec(["sh", "-c", f'cmp {kernel} /boot/vmlinuz-$(uname -r) && cmp {initrd} '
                   f'/boot/initrd.img-$(uname -r) && echo same'], timeout=60)  # fmt: skip
    assert res.stdout == b"same\n", res.stdout + res.stderr
