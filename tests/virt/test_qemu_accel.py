"""The accelerator choice: KVM only when it can really run a guest."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nestbed.qemu.accel import choose, kvm_problem


def fake(tmp_path: Path, modules: list[str], flags: str, dev: bool = True) -> dict[str, Path]:
    (tmp_path / "module").mkdir()
    for m in modules:
        (tmp_path / "module" / m).mkdir()
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu {flags}\n")
    # a character device that opens read-write stands in for a working /dev/kvm
    device = Path("/dev/null") if dev else tmp_path / "kvm"
    return {"dev": device, "sys_module": tmp_path / "module",
            "cpuinfo": tmp_path / "cpuinfo"}  # fmt: skip


def test_kvm_pvm_means_tcg(tmp_path: Path) -> None:
    a = choose("auto", **fake(tmp_path, ["kvm", "kvm_pvm"], "sse2"))
    assert (a.name, a.cpu) == ("tcg", "max")
    assert "kvm_pvm" in a.describe()


def test_hardware_kvm_means_kvm_with_host_cpu(tmp_path: Path) -> None:
    a = choose("auto", **fake(tmp_path, ["kvm", "kvm_intel"], "vmx sse2"))
    assert (a.name, a.cpu) == ("kvm", "host")


def test_no_device_or_no_flags(tmp_path: Path) -> None:
    assert "does not exist" in (kvm_problem(**fake(tmp_path, [], "", dev=False)) or "")
    other = tmp_path / "b"
    other.mkdir()
    assert "vmx/svm" in (kvm_problem(**fake(other, ["kvm_amd"], "sse2")) or "")


def test_nested_in_a_tcg_guest_means_kvm(tmp_path: Path) -> None:
    """What a level-1 guest under TCG -cpu max looks like: kvm_amd loaded, svm flag."""
    a = choose("auto", **fake(tmp_path, ["kvm", "kvm_amd"], "svm npt sse2"))
    assert (a.name, a.cpu) == ("kvm", "host")


def test_device_that_is_not_a_char_device_or_does_not_open(tmp_path: Path) -> None:
    probe = fake(tmp_path, ["kvm", "kvm_amd"], "svm")
    probe["dev"] = tmp_path / "plain"
    probe["dev"].write_text("")
    assert "not a character device" in (kvm_problem(**probe) or "")
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    probe["dev"] = tmp_path / "nodriver"  # a character device no driver answers: ENXIO
    os.mknod(probe["dev"], stat.S_IFCHR | 0o600, os.makedev(4000, 0))
    assert "cannot open" in (kvm_problem(**probe) or "")


def test_explicit_choice_is_honoured() -> None:
    assert choose("kvm").name == "kvm"
    assert choose("tcg").cpu == "max"
    with pytest.raises(ValueError):
        choose("hvf")


def test_this_machine_says_why() -> None:
    assert choose("auto").reason
