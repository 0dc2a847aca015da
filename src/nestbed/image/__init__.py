"""`nestbed image`: bootable, nested-ready Debian images, built with mmdebstrap and cached.

The runner uses `ensure_image()`; docs/images.md describes the images.

Light to import: what boots an image (`ImagePaths`, `nestbed.image.bare`) loads no builder --
inside a testbed under TCG each module imported costs ~10x what it costs on the host. The
builder (`ensure_image`, `build`: the mirror and apt-sources parsing) loads on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nestbed.image.cache import ImageCache, ImagePaths, Manifest
from nestbed.image.config import BuildOptions
from nestbed.image.errors import ImageError

if TYPE_CHECKING:
    from nestbed.image.build import ensure_image

__all__ = [
    "BuildOptions",
    "ImageCache",
    "ImageError",
    "ImagePaths",
    "Manifest",
    "ensure_image",
]


def __getattr__(name: str) -> Any:
    if name == "ensure_image":
        from nestbed.image.build import ensure_image

        return ensure_image
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
