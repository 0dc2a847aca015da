"""The zero-configuration main job: no `--`, so a QEMU VM of the default cached image."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nestbed.image import ImagePaths
from tests_support import nestbed_argv

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "smoke"


@pytest.mark.vm
def test_no_testbed_named_runs_in_a_vm_of_the_default_image(
    nestbed_image: ImagePaths, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    p = subprocess.run(
        [*nestbed_argv(), "-B", "-o", str(out), str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr
    assert "hello                PASS" in p.stdout.splitlines()
    # it ran in the guest, as the image's normal user, not on this host
    assert "hello from nestbed-" in p.stdout
    info = (out / "testinfo.json").read_text()
    assert "nestbed-virt-qemu" in info and str(nestbed_image.directory) in info
    assert "cloud-amd64" in info  # the image's kernel, not this host's
