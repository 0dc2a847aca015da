"""`nestbed image`: bootable, nested-ready Debian images, built with mmdebstrap and cached.

The runner uses `ensure_image()`; docs/images.md describes the images."""

from nestbed.image.build import build, ensure_image
from nestbed.image.cache import ImageCache, ImagePaths, Manifest
from nestbed.image.config import BuildOptions
from nestbed.image.errors import ImageError

__all__ = [
    "BuildOptions",
    "ImageCache",
    "ImageError",
    "ImagePaths",
    "Manifest",
    "build",
    "ensure_image",
]
