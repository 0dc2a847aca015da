"""Shared fixtures. The VM image: built once per test run into the cache and reused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

from autopkgtest_image import ensure_autopkgtest_image, missing_tools
from nestbed.image import BuildOptions, ImagePaths, ensure_image
from nestbed.image.cache import ImageCache
from nestbed.image.progress import PlainProgress

# Hypothesis' per-example deadline (200 ms) measures the machine, not the code: on a loaded
# 2-core CI machine a sound example can take a second. Timings belong in bench/.
settings.register_profile("nestbed", deadline=None)
settings.load_profile("nestbed")


@pytest.fixture(scope="session")
def nestbed_image() -> ImagePaths:
    """The default (bookworm, minimal) image, from $NESTBED_CACHE_DIR/images when set (CI
    sets it, so one build serves every VM test of the run), else from the user's cache."""
    return _cached_image(BuildOptions())


@pytest.fixture(scope="session")
def nested_image() -> ImagePaths:
    """The --nested image (qemu and nestbed inside): what nested tests boot, built once."""
    return _cached_image(BuildOptions(nested=True))


@pytest.fixture(scope="session")
def generic_kernel_image() -> ImagePaths:
    """A minimal image with Debian's standard kernel (--kernel generic): the nestbed image
    autopkgtest-virt-qemu can use (it shares files through 9p)."""
    return _cached_image(BuildOptions(kernel="generic"))


@pytest.fixture(scope="session")
def autopkgtest_image() -> Path:
    """An image laid out as autopkgtest-build-qemu's (BIOS, syslinux, setup-testbed's root
    shell on ttyS1, no nestbed agent): the qcow2 disk, built once into the same cache."""
    _skip_unless_autopkgtest_image_builds(efi=False)
    return ensure_autopkgtest_image()


@pytest.fixture(scope="session")
def autopkgtest_efi_image() -> Path:
    """The same system as autopkgtest_image on an EFI-only disk, as the newer
    mmdebstrap-autopkgtest-build-qemu makes: GPT, an EFI system partition with systemd-boot,
    no BIOS boot code. The qcow2 disk, built once into the same cache."""
    _skip_unless_autopkgtest_image_builds(efi=True)
    return ensure_autopkgtest_image(efi=True)


def _skip_unless_autopkgtest_image_builds(*, efi: bool) -> None:
    missing = missing_tools(efi=efi)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup installs them)")
    if os.geteuid() != 0:
        pytest.skip("building the autopkgtest-style image needs root")


def _cached_image(options: BuildOptions) -> ImagePaths:
    missing = [t for t in ("mmdebstrap", "mkfs.ext4", "qemu-system-x86_64", "qemu-img")
               if shutil.which(t) is None]  # fmt: skip
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (see docs/images.md)")
    if os.geteuid() != 0 and not os.path.exists("/etc/subuid"):
        pytest.skip("building an image needs root or /etc/subuid for unshare mode")
    return ensure_image(options, cache=ImageCache(), progress=PlainProgress())


def pytest_itemcollected(item: pytest.Item) -> None:
    """With `-n 2 --dist loadgroup` (README's test command) the VM tests run one after the
    other on one worker -- two emulated guests at once would only share the same two cores
    and time out -- while the other worker takes the tests that need no VM. (Marked as each
    test is collected: xdist reads the groups in its own pytest_collection_modifyitems.)"""
    if item.get_closest_marker("vm") is not None:
        item.add_marker(pytest.mark.xdist_group("vm"))
