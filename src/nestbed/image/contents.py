"""What nestbed puts into an image beyond Debian's packages, and the hooks that put it there.

Two mmdebstrap hooks (shell scripts written next to a payload tree):
- setup: initramfs configuration, in place before the kernel package builds the initrd
  (MODULES=list with only the virtio drivers: a 6 MB initrd instead of 15 MB, built faster
  and unpacked faster at every boot);
- customize: copies the payload tree into the root (with nestbed itself for --nested),
  creates the test user, enables the agent and the network, disables the apt timers, links
  /lib/autopkgtest/baseimage to /dev/baseimage and writes /etc/nestbed/image.json (which
  needs the kernel version, known only once the packages are in).
Both run inside mmdebstrap's namespace, so they work in root and unshare (rootless) mode.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import nestbed
from nestbed.guest import agent
from nestbed.image.errors import ImageError

ROOT_SERIAL = "nestbed-root"
BASE_SERIAL = "nestbed-base"
AGENT_PORT = agent.PORT_NAME
TEST_USER = "nestbed"
TEST_UID = 1000
HOSTNAME = "nestbed"
# the root partition (2) of the disk with the root serial: the base image, a copy of the same
# disk with the same file system UUID, cannot be taken for it (see disk.py for the layout)
CMDLINE = f"root=/dev/disk/by-id/virtio-{ROOT_SERIAL}-part2 rw console=ttyS0,115200"
AGENT_PATH = "/usr/lib/nestbed/agent.py"
ROOT_SHELL_UNIT = "nestbed-root-shell"  # @hvc1: the root shell autopkgtest-virt-qemu drives

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

# nestbed: the read-only base image (disk serial {BASE_SERIAL}) is /dev/baseimage, readable
# by everyone (QEMU attaches it read-only); /lib/autopkgtest/baseimage links to it.
SUBSYSTEM=="block", KERNEL=="vd*[!0-9]", ATTRS{{serial}}=="{BASE_SERIAL}", \\
  SYMLINK+="baseimage", GROUP="kvm", MODE="0644"
# Its partitions (1: the EFI system partition, 2: the root file system): /dev/baseimage-partN
SUBSYSTEM=="block", KERNEL=="vd*[0-9]", ATTRS{{serial}}=="{BASE_SERIAL}", \\
  SYMLINK+="baseimage-part%n", GROUP="kvm", MODE="0644"
# It carries the root file system's UUID and label: keep it (and any partition on it) out of
# 60-persistent-storage.rules -- this file sorts before it -- so there is no blkid import, no
# ID_FS_*, no /dev/disk/by-uuid or by-label link for it (fstab, systemd, btrfs cannot confuse
# it with the root disk), and tell udisks to leave it alone.
SUBSYSTEM=="block", KERNEL=="vd*", ATTRS{{serial}}=="{BASE_SERIAL}", \\
  ENV{{UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG}}="1", ENV{{UDISKS_IGNORE}}="1"

# nestbed: a root shell on the second virtio console, which only autopkgtest-virt-qemu gives
# a machine (nestbed's own QEMU has none): it drives its testbeds through that shell
SUBSYSTEM=="tty", KERNEL=="hvc1", TAG+="systemd", \\
  ENV{{SYSTEMD_WANTS}}+="{ROOT_SHELL_UNIT}@hvc1.service"
"""

# the root shell autopkgtest-virt-qemu looks for (its own builders' setup-testbed starts one
# on ttyS1 and hvc1); started by udev when the console appears, after basic.target
ROOT_SHELL = """\
[Unit]
Description=nestbed: root shell on %I (for autopkgtest-virt-qemu)
BindsTo=dev-%i.device
After=dev-%i.device

[Service]
ExecStart=/bin/sh
StandardInput=tty-fail
StandardOutput=tty
StandardError=tty
TTYPath=/dev/%I
SendSIGHUP=yes
# a closed console ends the shell: that is not a failure
SuccessExitStatus=0 SIGHUP SIGINT SIGTERM SIGPIPE
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
    f"etc/systemd/system/{ROOT_SHELL_UNIT}@.service": (ROOT_SHELL, 0o644),
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
        # ext4: built into the cloud kernel, a module of the generic one
        "virtio_pci\nvirtio_blk\nvirtio_scsi\nsd_mod\next4\n",
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
# where the EFI system partition is mounted when the disk is used as an image: systemd-dissect
# and systemd-nspawn --image (systemd 252) cannot make it on a read-only root, and fail
mkdir -p "$root/efi"
# the base image at a path on the root file system (udev makes /dev/baseimage at every boot)
mkdir -p "$root/lib/autopkgtest"
ln -sfn /dev/baseimage "$root/lib/autopkgtest/baseimage"
# /etc/nestbed/image.json: what a testbed needs to boot this disk when it has only the disk
version=""
for kernel in "$root"/boot/vmlinuz-*; do
    if [ -f "$kernel" ]; then version="${{kernel##*/vmlinuz-}}"; fi
done
if [ -z "$version" ]; then echo "nestbed: no kernel in /boot" >&2; exit 1; fi
created="$(date -u +%Y-%m-%dT%H:%M:%S+00:00)"
mkdir -p "$root/etc/nestbed"
sed -e "s|@KERNEL_VERSION@|$version|g" -e "s|@CREATED@|$created|g" {image_json} \\
    > "$root/etc/nestbed/image.json"
chmod 0644 "$root/etc/nestbed/image.json"
# nestbed itself (--nested): byte-compiled once here rather than in every testbed
if [ -d "$root/{site}/nestbed" ]; then chroot "$root" python3 -m compileall -q /{site}/nestbed; fi
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


IMAGE_JSON = "etc/nestbed/image.json"
KERNEL_VERSION = "@KERNEL_VERSION@"  # filled in by the customize hook
CREATED = "@CREATED@"
PYTHON_DIST_PACKAGES = "usr/lib/python3/dist-packages"


def fingerprint() -> str:
    """Changes whenever what nestbed puts into an image changes (part of the cache key)."""
    h = hashlib.sha256()
    for part in (repr(sorted(FILES.items())), repr(sorted(SETUP_FILES.items())), CUSTOMIZE,
                 SETUP, repr(MASKED_UNITS), Path(agent.__file__).read_text()):  # fmt: skip
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def nestbed_files() -> dict[str, tuple[str | bytes, int]]:
    """nestbed itself, for the --nested image: the installed package (without bytecode) under
    /usr/lib/python3/dist-packages, and a /usr/bin script for each of its console scripts."""
    package = Path(nestbed.__file__).parent
    files: dict[str, tuple[str | bytes, int]] = {}
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(package)
        if (
            not path.is_file()
            or "__pycache__" in rel.parts
            or path.suffix == ".pyc"
            or any(part.startswith(".") for part in rel.parts)  # editors' swap files
        ):
            continue
        mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
        files[f"{PYTHON_DIST_PACKAGES}/nestbed/{rel.as_posix()}"] = (path.read_bytes(), mode)
    for name, target in console_scripts().items():
        module, _, attr = target.partition(":")
        head = attr.split(".")[0]
        script = (
            "#!/usr/bin/python3\n"
            f"# {name}: nestbed's console script (put here by nestbed's image builder)\n"
            "import sys\n\n"
            f"from {module} import {head}\n\n"
            f"sys.exit({attr}())\n"
        )
        files[f"usr/bin/{name}"] = (script, 0o755)
    return files


def console_scripts() -> dict[str, str]:
    """nestbed's console scripts as installed (pyproject.toml's [project.scripts]):
    name -> "module:function"."""
    import importlib.metadata  # only builds need it (costly to import in a TCG guest)

    try:
        dist = importlib.metadata.distribution("nestbed")
    except importlib.metadata.PackageNotFoundError:
        raise ImageError(
            "nestbed is not installed as a Python distribution (pip install): its commands"
            " cannot be put into the nested image"
        ) from None
    scripts = {ep.name: ep.value for ep in dist.entry_points.select(group="console_scripts")}
    if not scripts:
        raise ImageError("the installed nestbed distribution declares no console scripts")
    return dict(sorted(scripts.items()))


def nestbed_fingerprint() -> str:
    """Changes whenever nestbed's own files or commands change (the nested image's key)."""
    h = hashlib.sha256()
    for rel, (content, mode) in sorted(nestbed_files().items()):
        h.update(f"{rel}\0{mode:o}\0".encode())
        h.update(content.encode() if isinstance(content, str) else content)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _write_tree(root: Path, files: dict[str, tuple[str | bytes, int]]) -> None:
    for rel, (content, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(mode)


def write_hooks(workdir: Path, image_info: dict[str, object], *, with_nestbed: bool) -> Hooks:
    """Write the payload trees and the two hook scripts into workdir.

    image_info becomes /etc/nestbed/image.json (KERNEL_VERSION and CREATED in its strings are
    replaced by the hook); with_nestbed: nestbed itself goes into the image (--nested)."""
    files: dict[str, tuple[str | bytes, int]] = dict(FILES)
    files[AGENT_PATH.lstrip("/")] = (Path(agent.__file__).read_bytes(), 0o755)
    if with_nestbed:
        files.update(nestbed_files())
    payload = workdir / "payload"
    setup_payload = workdir / "payload-setup"
    _write_tree(payload, files)
    _write_tree(setup_payload, dict(SETUP_FILES))
    for tree in (payload, setup_payload):  # readable from mmdebstrap's namespace, too
        tree.chmod(0o755)
        for d in tree.rglob("*"):
            if d.is_dir():
                d.chmod(0o755)
    image_json = workdir / "image.json.in"
    image_json.write_text(json.dumps(image_info, indent=2) + "\n")
    image_json.chmod(0o644)
    setup = workdir / "setup.sh"
    setup.write_text(SETUP.format(payload=shlex.quote(str(setup_payload))))
    customize = workdir / "customize.sh"
    customize.write_text(
        CUSTOMIZE.format(
            payload=shlex.quote(str(payload)),
            image_json=shlex.quote(str(image_json)),
            uid=TEST_UID,
            user=TEST_USER,
            masked=" ".join(MASKED_UNITS),
            site=PYTHON_DIST_PACKAGES,
        )
    )
    for script in (setup, customize):
        script.chmod(0o755)
    workdir.chmod(0o755)
    return Hooks(setup, customize)
