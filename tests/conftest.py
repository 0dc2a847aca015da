"""Shared fixtures. The VM image: built once per test run into the cache and reused."""

from __future__ import annotations

import os
import shutil

import pytest

from nestbed.image import BuildOptions, ImagePaths, ensure_image
from nestbed.image.cache import ImageCache
from nestbed.image.progress import PlainProgress


@pytest.fixture(scope="session")
def nestbed_image() -> ImagePaths:
    """The default (bookworm, minimal) image, from $NESTBED_CACHE_DIR/images when set (CI
    sets it, so one build serves every VM test of the run), else from the user's cache."""
    return _cached_image(BuildOptions())


@pytest.fixture(scope="session")
def nested_image() -> ImagePaths:
    """The --nested image (qemu and nestbed inside): what nested tests boot, built once."""
    return _cached_image(BuildOptions(nested=True))


def _cached_image(options: BuildOptions) -> ImagePaths:
    missing = [t for t in ("mmdebstrap", "mkfs.ext4", "qemu-system-x86_64", "qemu-img")
               if shutil.which(t) is None]  # fmt: skip
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (see docs/images.md)")
    if os.geteuid() != 0 and not os.path.exists("/etc/subuid"):
        pytest.skip("building an image needs root or /etc/subuid for unshare mode")
    return ensure_image(options, cache=ImageCache(), progress=PlainProgress())
