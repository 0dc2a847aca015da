"""The one error type of `nestbed image`: a build, lookup or removal that cannot be done."""

from __future__ import annotations

from nestbed.errors import EXIT_TESTBED_FAILURE, NestbedError


class ImageError(NestbedError):
    """An image cannot be built, found or removed; the message is the one line a user sees.

    For the runner an image that cannot be had is a testbed failure (exit 16);
    `nestbed image` itself exits 1 (see its --help)."""

    exit_code = EXIT_TESTBED_FAILURE
