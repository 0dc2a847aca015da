"""What nestbed puts into an image beyond Debian's packages, and the hooks that put it there.

Two mmdebstrap hooks (shell scripts written next to a payload tree):
- setup: initramfs configuration, in place before the kernel package builds the initrd
  (MODULES=list with only the virtio drivers: a 6 MB initrd instead of 15 MB, built faster
  and unpacked faster at every boot);
- customize: copies the payload tree into the root, creates the test user, enables the
  agent and the network, disables the apt timers.
Both run inside mmdebstrap's namespace, so they work in root and unshare (rootless) mode.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from nestbed.guest import agent

ROOT_SERIAL = "nestbed-root"
BASE_SERIAL = "nestbed-base"
AGENT_PORT = agent.PORT_NAME
TEST_USER = "nestbed"
TEST_UID = 1000
HOSTNAME = "nestbed"
CMDLINE = f"root=/dev/disk/by-id/virtio-{ROOT_SERIAL} rw console=ttyS0,115200"
AGENT_PATH = "/usr/lib/nestbed/agent.py"

AGENT_UNIT = f"""\
[Unit]
Description=nestbed control agent on virtio-serial port {AGENT_PORT}
# started by udev as soon as the port appears (see 60-nestbed.rules): no waiting for the
# rest of the boot; a client that needs a booted system runs `systemctl is-system-running --wait`
DefaultDependencies=no
ConditionPathExists=/dev/virtio-ports/{AGENT_PORT}
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart=/usr/bin/python3 {AGENT_PATH} --port /dev/virtio-ports/{AGENT_PORT}
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

UDEV_RULES = f"""\
# nestbed: start the control agent when its virtio-serial port appears
SUBSYSTEM=="virtio-ports", ATTR{{name}}=="{AGENT_PORT}", TAG+="systemd", \\
  ENV{{SYSTEMD_WANTS}}+="nestbed-agent.service"
# nestbed: the read-only base image (disk serial {BASE_SERIAL}) is /dev/baseimage
SUBSYSTEM=="block", KERNEL=="vd*[!0-9]", ATTRS{{serial}}=="{BASE_SERIAL}", \\
  SYMLINK+="baseimage", GROUP="kvm", MODE="0640"
"""

# KVM for nested VMs: the CPU modules are not loaded on demand in the guest
KVM_UNIT = """\
[Unit]
Description=nestbed: load KVM for nested virtual machines
DefaultDependencies=no
Before=sysinit.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'if grep -qw svm /proc/cpuinfo; then modprobe kvm_amd; \\
  elif grep -qw vmx /proc/cpuinfo; then modprobe kvm_intel; fi; true'

[Install]
WantedBy=sysinit.target
"""

NETWORK = """\
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""

AUTOLOGIN = (
    "[Service]\n"
    "ExecStart=\n"
    "ExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --keep-baud --autologin root"
    " 115200,57600,38400,9600 - $TERM\n"
)

FILES: dict[str, tuple[str, int]] = {
    "etc/systemd/system/nestbed-agent.service": (AGENT_UNIT, 0o644),
    "etc/udev/rules.d/60-nestbed.rules": (UDEV_RULES, 0o644),
    "etc/systemd/system/nestbed-kvm.service": (KVM_UNIT, 0o644),
    "etc/systemd/network/80-nestbed-dhcp.network": (NETWORK, 0o644),
    "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": (AUTOLOGIN, 0o644),
    "etc/hostname": (HOSTNAME + "\n", 0o644),
    "etc/hosts": (
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    ),
    # QEMU's user-mode network answers DNS on 10.0.2.3 (there is no resolver daemon)
    "etc/resolv.conf": ("nameserver 10.0.2.3\n", 0o644),
    "etc/fstab": ("# the root file system is given on the kernel command line\n", 0o644),
    "etc/apt/apt.conf.d/90nestbed": ('Acquire::Languages "none";\n', 0o644),
}

SETUP_FILES: dict[str, tuple[str, int]] = {
    "etc/initramfs-tools/conf.d/nestbed.conf": ("MODULES=list\n", 0o644),
    "usr/share/initramfs-tools/modules.d/nestbed": (
        "virtio_pci\nvirtio_blk\nvirtio_scsi\nsd_mod\n",
        0o644,
    ),
}

# timers and services that cost boot time or run by surprise in a test VM (there is no
# VGA console, so no gettys on tty1..6; the root file system is a throwaway overlay)
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "systemd-networkd-wait-online.service",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty-static.service",
    "getty@tty1.service",
)

CUSTOMIZE = """\
#!/bin/sh
# nestbed customize hook: $1 is the root of the image being built
set -eu
root="$1"
cp -R --preserve=mode {payload}/. "$root/"
chroot "$root" useradd --create-home --uid {uid} --user-group --shell /bin/bash \\
    --comment "nestbed test user" {user}
if chroot "$root" getent group kvm >/dev/null; then chroot "$root" usermod -aG kvm {user}; fi
chroot "$root" systemctl enable --quiet nestbed-agent.service nestbed-kvm.service \\
    systemd-networkd.service
chroot "$root" systemctl mask --quiet {masked}
"""

SETUP = """\
#!/bin/sh
# nestbed setup hook: configuration that must exist before packages are installed
set -eu
cp -R --preserve=mode {payload}/. "$1/"
"""


@dataclass(frozen=True)
class Hooks:
    setup: Path
    customize: Path


def fingerprint() -> str:
    """Changes whenever what nestbed puts into an image changes (part of the cache key)."""
    h = hashlib.sha256()
    for part in (repr(sorted(FILES.items())), repr(sorted(SETUP_FILES.items())), CUSTOMIZE,
                 SETUP, repr(MASKED_UNITS), Path(agent.__file__).read_text()):  # fmt: skip
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _write_tree(root: Path, files: dict[str, tuple[str | bytes, int]]) -> None:
    for rel, (content, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(mode)


def write_hooks(workdir: Path, image_info: dict[str, object]) -> Hooks:
    """Write the payload trees and the two hook scripts into workdir."""
    files: dict[str, tuple[str | bytes, int]] = dict(FILES)
    files[AGENT_PATH.lstrip("/")] = (Path(agent.__file__).read_bytes(), 0o755)
    files["etc/nestbed/image.json"] = (json.dumps(image_info, indent=2) + "\n", 0o644)
    payload = workdir / "payload"
    setup_payload = workdir / "payload-setup"
    _write_tree(payload, files)
    _write_tree(setup_payload, dict(SETUP_FILES))
    for tree in (payload, setup_payload):  # readable from mmdebstrap's namespace, too
        tree.chmod(0o755)
        for d in tree.rglob("*"):
            if d.is_dir():
                d.chmod(0o755)
    setup = workdir / "setup.sh"
    setup.write_text(SETUP.format(payload=shlex.quote(str(setup_payload))))
    customize = workdir / "customize.sh"
    customize.write_text(
        CUSTOMIZE.format(
            payload=shlex.quote(str(payload)),
            uid=TEST_UID,
            user=TEST_USER,
            masked=" ".join(MASKED_UNITS),
        )
    )
    for script in (setup, customize):
        script.chmod(0o755)
    workdir.chmod(0o755)
    return Hooks(setup, customize)
