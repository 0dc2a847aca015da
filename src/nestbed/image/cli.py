"""`nestbed image build|list|remove`: the command line of the image builder."""

from __future__ import annotations

import argparse
import datetime
import logging
import signal
import sys
from pathlib import Path

from nestbed.errors import NestbedError
from nestbed.image.build import build, ensure_image, plan
from nestbed.image.cache import ImageCache
from nestbed.image.config import (
    ARCHES,
    DEFAULT_KERNEL,
    DEFAULT_RELEASE,
    KERNELS,
    RELEASES,
    BuildOptions,
    format_size,
    parse_size,
)
from nestbed.image.progress import for_stream
from nestbed.log import PLAIN, setup
from nestbed.signals import Interrupted, ShutdownOnSignals

# `nestbed image`'s own exit table, as its --help and docs/images.md document it. Every
# NestbedError is 1 here: an error's `exit_code` is what it ends a *test run* with (an image
# the runner cannot build is its testbed failure, 16), which is not this command's meaning.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger(__name__)
# the command's own reports: `nestbed: ...`, beside the builder's timed progress lines
_REPORT = {"style": PLAIN}

EPILOG = f"""\
exit status:
  {EXIT_OK}    success
  {EXIT_ERROR}    the image could not be built, found or removed (one line on stderr says why:
       unknown release, unreachable mirror, not enough space, no permission, ...)
  {EXIT_USAGE}    bad command line
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C or SIGTERM); nothing half-built is left behind

Images are cached in $NESTBED_CACHE_DIR/images, else $XDG_CACHE_HOME/nestbed/images,
else ~/.cache/nestbed/images. See docs/images.md.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestbed image",
        description="Build and manage bootable Debian images for nestbed's QEMU testbeds.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser(
        "build",
        help="build an image (into the cache unless -o is given)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--release", default=DEFAULT_RELEASE, help=f"{'|'.join(RELEASES)} (default: %(default)s)"
    )
    b.add_argument("--arch", default="amd64", help=f"{'|'.join(ARCHES)} (default: %(default)s)")
    b.add_argument(
        "--mirror", metavar="URL", help="Debian mirror (default: the one apt on this machine uses)"
    )
    b.add_argument(
        "--nested",
        action="store_true",
        help="add QEMU, so tests can boot the image again inside it",
    )
    b.add_argument(
        "--kernel",
        default=DEFAULT_KERNEL,
        help=f"{'|'.join(KERNELS)} (default: %(default)s). cloud boots fastest; generic is"
        " Debian's standard kernel, which also has 9p: autopkgtest-virt-qemu needs it to use"
        " the image",
    )
    b.add_argument(
        "--size", default="4G", help="virtual disk size (default: %(default)s; the file is sparse)"
    )
    b.add_argument("--include", metavar="PKG,...", default="", help="more packages to install")
    b.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        type=Path,
        help="write the image directory here instead of the cache",
    )
    b.add_argument(
        "--force", action="store_true", help="rebuild even when the cache has this image"
    )
    b.add_argument("-v", "--verbose", action="store_true", help="plain log lines with every detail")
    sub.add_parser("list", help="list cached images")
    r = sub.add_parser("remove", help="remove a cached image")
    r.add_argument("name", metavar="NAME", help="as shown by `nestbed image list`")
    return parser


def _cmd_build(args: argparse.Namespace) -> int:
    options = BuildOptions(
        release=args.release,
        arch=args.arch,
        mirror=args.mirror,
        nested=args.nested,
        kernel=args.kernel,
        size=parse_size(args.size),
        include=tuple(p.strip() for p in args.include.split(",") if p.strip()),
    )
    progress = for_stream(sys.stderr, verbose=args.verbose)
    try:
        if args.output is not None:
            image = build(options, dest=args.output.absolute(), progress=progress)
        elif args.force:
            image = build(options, progress=progress)
        else:
            cache = ImageCache()
            found = cache.lookup(plan(options).key)
            if found is not None:
                progress.info(f"image {found.name} is already built (--force rebuilds it)")
            image = found or ensure_image(options, cache=cache, progress=progress)
    finally:
        progress.close()
    m = image.manifest
    print(f"{image.directory}")
    log.info(
        f"image {m.name}: {m.release} {m.flavour}, kernel {m.kernel_version},"
        f" {format_size(image.disk_usage())} on disk, built in {m.build_seconds} s",
        extra=_REPORT,
    )
    return EXIT_OK


def _cmd_list(_args: argparse.Namespace) -> int:
    cache = ImageCache()
    rows = [("NAME", "RELEASE", "FLAVOUR", "SIZE", "DISK", "CREATED")]
    for image in cache.entries():
        m = image.manifest
        created = datetime.datetime.fromisoformat(m.created).strftime("%Y-%m-%d %H:%M")
        rows.append(
            (
                m.name,
                m.release,
                m.flavour,
                format_size(m.size),
                format_size(image.disk_usage()),
                created,
            )
        )
    if len(rows) == 1:
        log.info(f"no images in {cache.root}", extra=_REPORT)
        return EXIT_OK
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _cmd_remove(args: argparse.Namespace) -> int:
    ImageCache().remove(args.name)
    log.info(f"removed image {args.name}", extra=_REPORT)
    return EXIT_OK


def main(argv: list[str]) -> int:
    """`nestbed image ARGS`: argv is what follows `image`."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_OK if e.code in (0, None) else EXIT_USAGE
    # -v shows every detail, the commands the builder runs too
    setup("nestbed", debug=getattr(args, "verbose", False))
    command = {"build": _cmd_build, "list": _cmd_list, "remove": _cmd_remove}[args.command]
    # Ctrl-C and SIGTERM alike: what is half-built is removed on the way out
    with ShutdownOnSignals((signal.SIGTERM, signal.SIGINT)):
        try:
            return command(args)
        except NestbedError as e:
            log.error(str(e), extra=_REPORT)
            return EXIT_ERROR
        except Interrupted:
            log.warning("interrupted", extra=_REPORT)
            return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    """The parser --help prints; the man page (nestbed.manpage) is made from it too."""
    return _parser()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
