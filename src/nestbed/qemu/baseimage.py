"""The base image a QEMU testbed exports to nested tests: which disk, and what the guest sees.

The server attaches the chosen disk read-only with the base serial; after every boot, restore
and reboot it runs `GUEST_PROBE` inside a command it runs anyway, which makes sure the guest
has /dev/baseimage and /lib/autopkgtest/baseimage and reports whether KVM works in it (the
`baseimage` and `nested-kvm` capabilities are advertised from those answers only).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from nestbed.capabilities import WANT_BASEIMAGE
from nestbed.errors import NestbedError
from nestbed.image import foreign
from nestbed.image.cache import ImagePaths
from nestbed.qemu.machine import Drive

GUEST_BASEIMAGE = "/lib/autopkgtest/baseimage"


class BadBaseImage(NestbedError):
    """--baseimage names no disk that can be exported."""


# What the server checks in the guest after every boot, restore and reboot, inside a
# command it runs anyway (each guest exec costs 0.1-0.5 s under TCG): shell builtins only,
# but for ln/mkdir when something is missing. $1 is the base image's disk serial, or empty
# when it is not exported; $2 is 1 when the guest's normal user is wanted (an image not
# built by nestbed has no `nestbed` user: the first with uid 1000-59999 is taken). Old
# images have no udev rule for /dev/baseimage: the disk is found by its serial in sysfs (no
# waiting for udev); /lib/autopkgtest/baseimage is a symlink to it on the root file system,
# so it survives reboots.
GUEST_PROBE = """
if [ -n "$2" ]; then
  echo "nestbed-probe:user=$(getent passwd | sort -t: -k3,3n |
    awk -F: '$3 >= 1000 && $3 < 60000 { print $1; exit }')"
fi
kvm=0
if [ -c /dev/kvm ] && { [ -d /sys/module/kvm_amd ] || [ -d /sys/module/kvm_intel ]; }; then
  if true 2>/dev/null <>/dev/kvm; then kvm=1; fi
fi
echo "nestbed-probe:kvm=$kvm"
if [ -n "$1" ]; then
  if [ ! -e /dev/baseimage ]; then
    for d in /sys/block/vd*; do
      s=; read -r s 2>/dev/null <"$d/serial" || :
      if [ "$s" = "$1" ]; then ln -sf "${d##*/}" /dev/baseimage || :; fi
    done
  fi
  base=missing
  if [ -b /dev/baseimage ]; then
    base=ok
    if [ ! -L /lib/autopkgtest/baseimage ]; then
      mkdir -p /lib/autopkgtest && ln -sfn /dev/baseimage /lib/autopkgtest/baseimage || :
    fi
  fi
  echo "nestbed-probe:baseimage=$base"
fi
"""


def add_export_options(parser: argparse.ArgumentParser, baseimage_help: str) -> None:
    """--baseimage[=PATH] and --no-baseimage, as every server that exports one takes them."""
    export = parser.add_mutually_exclusive_group()
    export.add_argument("--baseimage", nargs="?", const="", metavar="PATH", help=baseimage_help)
    export.add_argument(
        "--no-baseimage",
        action="store_true",
        help="never export the base image (not even when a test needs it)",
    )


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def choose_base_image(
    requested: str | None,
    forbidden: bool,
    images: Sequence[str],
    first: ImagePaths,
    env: Mapping[str, str],
) -> tuple[Drive | None, str | None]:
    """Which disk to export as the base image (a read-only Drive with the base serial, or
    None), and a warning to give once, if any. Raises BadBaseImage (or the
    disk's own NestbedError) for bad input.

    `requested` is None (no --baseimage), "" (a bare --baseimage) or the PATH given."""
    serial = first.manifest.base_serial
    if forbidden:
        return None, None
    if requested is None:
        if env.get(WANT_BASEIMAGE) != "1":
            return None, None
        if len(images) > 1:
            return None, (
                "a test needs the base image, but several images were given: not exporting "
                "it; name the one to export with --baseimage=PATH"
            )
        return Drive(first.disk.absolute(), serial, first.manifest.format), None
    if requested == "":
        if len(images) > 1:
            raise BadBaseImage(
                "--baseimage: several images given: name the one to export with --baseimage=PATH"
            )
        return Drive(first.disk.absolute(), serial, first.manifest.format), None
    wanted = Path(requested)
    if not wanted.exists():
        raise BadBaseImage(f"--baseimage={requested}: no such file")
    target = _resolved(wanted)
    first_names = {_resolved(Path(images[0])), _resolved(first.disk)}
    if first.disk.parent == first.directory:
        first_names.add(_resolved(first.directory))
    if target in first_names:
        return Drive(first.disk.absolute(), serial, first.manifest.format), None
    for name in images[1:]:
        if _resolved(Path(name)) == target:
            path = Path(name).absolute()
            return Drive(path, serial, foreign.disk_format(path)), None
    raise BadBaseImage(f"--baseimage={requested}: not among the images given")


def probe_results(stdout: bytes) -> tuple[list[str], dict[str, str]]:
    """Split a command's output into its own lines and the probe's key=value answers."""
    own: list[str] = []
    found: dict[str, str] = {}
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith("nestbed-probe:"):
            key, _, value = line[len("nestbed-probe:") :].partition("=")
            found[key] = value
        else:
            own.append(line)
    return own, found
