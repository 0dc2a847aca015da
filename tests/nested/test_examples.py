"""The worked examples of nested testbeds (examples/nested-*) PASS as a user runs them:
`nestbed [-U] -B examples/NAME... -- qemu NESTED_IMAGE`, a level-1 testbed (TCG here) whose
test boots a level-2 VM from the base image (KVM inside the TCG guest). The four kernel
clients run as one command, as a maintainer would run several packages: one testbed, one
`apt-get update` (-U), reverted between the tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from tests_support import nestbed_argv, once_more_after_a_level1_fault

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.vm
@pytest.mark.parametrize(
    ("example", "options", "test", "says"),
    [
        ("nested-boot", [], "level2-kernel", "level-2 VM OK"),
        ("nested-recursive", [], "nestbed-in-nestbed", "the inner nestbed run passed"),
        # systemd-container comes from the archive: the image carries no package lists
        ("nested-bootdisk", ["-U"], "own-qemu-boots-it", "level 2 booted by itself to a shell"),
    ],
)
def test_example_passes(
    nested_image: ImagePaths, example: str, options: list[str], test: str, says: str
) -> None:
    argv = [*nestbed_argv(), *options, "-B", str(EXAMPLES / example), "--",
            "qemu", str(nested_image.directory)]  # fmt: skip
    res = once_more_after_a_level1_fault(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=1500)
    )
    tail = "\n".join(res.stderr.splitlines()[-40:])
    assert res.returncode == 0, f"{res.stdout}\n{tail}"
    assert re.search(rf"^{re.escape(test)} +PASS$", res.stdout, re.MULTILINE), res.stdout
    assert says in res.stdout
    if example == "nested-bootdisk":
        assert re.search(r"^nspawn-runs-it +PASS$", res.stdout, re.MULTILINE), res.stdout
        assert "systemd-nspawn ran a read-only container from the base image" in res.stdout
    if example == "nested-boot":
        # TCG's -cpu max emulates SVM: level 2 runs under KVM inside level 1
        assert "virtualisation kvm" in res.stdout, res.stdout


# (example, test, what the test says when level 1 got the data)
KERNEL_CLIENTS = [
    ("nested-nfs", "nfs-kernel-client", "received 4 MiB from the level-2 VM"),
    ("nested-nbd", "nbd-kernel-client", "received 4 MiB from the level-2 VM over NBD"),
    ("nested-cifs", "cifs-kernel-client", "received 4 MiB from the level-2 VM over CIFS"),
    ("nested-iscsi", "iscsi-kernel-client", "received 4 MiB from the level-2 VM over iSCSI"),
]


@pytest.mark.vm
def test_the_four_kernel_clients_pass(nested_image: ImagePaths) -> None:
    """NFS, NBD, CIFS and iSCSI: level 1 serves (nfs-kernel-server, nbd-server, samba, tgt:
    from the archive, hence -U), level 2 writes with its kernel's client (the user-space
    tools by nestbed-vm --install), level 1 checks what arrived."""
    packages = [str(EXAMPLES / example) for example, _, _ in KERNEL_CLIENTS]
    argv = [*nestbed_argv(), "-U", "-B", *packages, "--", "qemu", str(nested_image.directory)]
    res = once_more_after_a_level1_fault(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=3000)
    )
    tail = "\n".join(res.stderr.splitlines()[-60:])
    assert res.returncode == 0, f"{res.stdout}\n{tail}"
    for _, test, says in KERNEL_CLIENTS:
        assert re.search(rf"^{re.escape(test)} +PASS$", res.stdout, re.MULTILINE), res.stdout
        assert says in res.stdout, res.stdout
