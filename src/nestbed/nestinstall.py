"""nestbed-vm --install: packages for a level-2 VM, fetched by this machine's apt.

The base image carries no package lists and a level-2 VM may have no route to a mirror, but
the machine nestbed-vm runs on (level 1) has apt and its sources. So apt here resolves the
packages against the *VM's* dpkg status (read from the booted VM), downloads only what the VM
lacks (the packages and their missing dependencies, no Recommends), and the VM installs those
.debs with dpkg in one go -- dpkg configures them in dependency order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nestbed import proc

# where the .debs go in the VM; removed after the install
GUEST_DIR = "/var/cache/nestbed-install"
# The VM is thrown away after the command: no initramfs is rebuilt for it (a package with an
# initramfs hook, e.g. nbd-client, would otherwise rebuild it: a minute in a nested VM), and
# dpkg need not sync each file.
INSTALL_SCRIPT = (
    "conf=/etc/initramfs-tools/update-initramfs.conf; "
    '[ ! -f "$conf" ] || sed -i "s/^update_initramfs=.*/update_initramfs=no/" "$conf"; '
    f"DEBIAN_FRONTEND=noninteractive dpkg --force-unsafe-io -i {GUEST_DIR}/*.deb </dev/null"
    f" && rm -rf {GUEST_DIR}"
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?(=[^\s=]+)?$")


class InstallError(Exception):
    """One line for the user: why the packages cannot be had."""


def check_names(names: list[str]) -> list[str]:
    """PKG, PKG:ARCH, PKG=VERSION; comma-separated lists allowed (as in a Depends line)."""
    found = [n.strip() for item in names for n in item.split(",") if n.strip()]
    for name in found:
        if not _NAME.match(name):
            raise InstallError(f"--install: {name!r} is not a package name")
    return found


def download(packages: list[str], vm_status: bytes, workdir: Path, timeout: float) -> list[Path]:
    """The .debs the VM needs for `packages`, downloaded into workdir/archives by this
    machine's apt (its sources and lists; nothing of this machine's state is changed)."""
    status = workdir / "status"
    status.write_bytes(vm_status)
    archives = workdir / "archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    argv = [
        "apt-get", "-q", "-y", "--download-only", "--no-install-recommends",
        "-o", f"Dir::State::status={status}",
        "-o", f"Dir::Cache::archives={archives}/",
        "-o", f"Dir::State::extended_states={workdir / 'extended_states'}",
        "-o", "Debug::NoLocking=true",
        "-o", "APT::Sandbox::User=root",  # our private directory, not _apt's
        "install", *packages,
    ]  # fmt: skip
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}
    try:
        res = proc.run(argv, check=False, env=env, timeout=timeout)
    except FileNotFoundError:
        raise InstallError("--install needs apt-get on this machine") from None
    if res.returncode != 0:
        errors = [line for line in res.stderr_text.splitlines() if line.startswith("E:")]
        lines = errors or res.stderr_text.strip().splitlines() or [f"exit {res.returncode}"]
        reason = lines[0] if errors else lines[-1]
        hint = ""
        if any("Unable to locate" in e or "no installation candidate" in e for e in errors):
            hint = " (does this machine have package lists? apt-get update, or nestbed -U)"
        raise InstallError(f"--install: apt-get cannot get {' '.join(packages)}: {reason}{hint}")
    return sorted(archives.glob("*.deb"))
