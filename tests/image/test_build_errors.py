"""Bad input to `nestbed image build`: one clear line, no partial image, the cache untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed.image import BuildOptions
from nestbed.image.build import plan
from nestbed.image.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main

UNREACHABLE = "http://127.0.0.1:9/debian"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (needs root)")


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("nestbed: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated cache holding one finished (fake) image that must survive every failure."""
    root = tmp_path / "cache"
    fake_images(root)
    monkeypatch.setenv("NESTBED_CACHE_DIR", str(root))
    return root


def fake_images(root: Path) -> None:
    """Old images where the builds below would put theirs."""
    for options in (BuildOptions(), BuildOptions(mirror=UNREACHABLE)):
        image = root / "images" / plan(options).key
        image.mkdir(parents=True)
        for name in ("disk.img", "vmlinuz", "initrd.img"):
            (image / name).write_bytes(b"old " + name.encode())
        (image / "manifest.json").write_text("{}")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file but the lock files (which stay, by design)."""
    files = (p for p in root.rglob("*") if p.is_file() and p.suffix != ".lock")
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".build-*")] + [p.name for p in root.rglob(".old-*")]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_unknown_release(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(cache)
    assert main(["build", "--release", "potato"]) == EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "unknown release 'potato'" in line and "bookworm" in line
    assert snapshot(cache) == before


def test_bad_size_and_usage(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--size", "lots"]) == EXIT_ERROR
    assert "bad size" in one_error_line(capsys.readouterr().err)
    assert main(["build", "--no-such-option"]) == EXIT_USAGE
    assert main(["--help"]) == EXIT_OK
    assert "exit status" in capsys.readouterr().out


def test_missing_disk_tools_are_named_before_anything_starts(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A machine without sfdisk (fdisk) cannot write the partitioned disk: the build says so
    and what to install, before it bootstraps anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in os.environ["PATH"].split(os.pathsep):
        for found in Path(tool).glob("*") if Path(tool).is_dir() else ():
            if found.name != "sfdisk" and not (bin_dir / found.name).exists():
                (bin_dir / found.name).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    before = snapshot(cache)
    assert main(["build", "--mirror", UNREACHABLE]) == EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "writing the image's disk needs sfdisk" in line and "apt-get install fdisk" in line
    assert snapshot(cache) == before and not leftovers(cache)


def test_unreachable_mirror(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(cache)
    assert main(["build", "--mirror", UNREACHABLE]) == EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert f"mirror {UNREACHABLE} unreachable" in line
    assert snapshot(cache) == before and not leftovers(cache)


def test_no_permission(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        if subprocess.run(["chattr", "+i", str(locked)], check=False).returncode != 0:
            pytest.skip("chattr +i not supported here")
    else:
        locked = Path("/root/nestbed-test")
    try:
        assert main(["build", "-o", str(locked / "img")]) == EXIT_ERROR
        line = one_error_line(capsys.readouterr().err)
        assert f"cannot write to {locked}" in line
        assert "ermission" in line or "not permitted" in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=False)
    assert not list(locked.iterdir()) if locked.exists() else True


@needs_root
def test_read_only_target(tmpfs: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert main(["build", "-o", str(tmpfs / "img")]) == EXIT_ERROR
    assert "Read-only file system" in one_error_line(capsys.readouterr().err)


@needs_root
def test_full_disk(tmpfs: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmpfs / "ballast").write_bytes(b"\0" * (16 << 20))
    assert main(["build", "-o", str(tmpfs / "img")]) == EXIT_ERROR
    assert "not enough space in" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmpfs.iterdir()) == ["ballast"]


@needs_root
def test_full_cache_keeps_old_image(
    tmpfs: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NESTBED_CACHE_DIR", str(tmpfs))
    fake_images(tmpfs)
    before = snapshot(tmpfs)
    assert main(["build", "--force"]) == EXIT_ERROR
    assert "not enough space" in one_error_line(capsys.readouterr().err)
    assert snapshot(tmpfs) == before and not leftovers(tmpfs)


@pytest.mark.network
@needs_root
def test_interrupted_build_leaves_nothing(tmp_path: Path, cache: Path) -> None:
    """SIGTERM in the middle of mmdebstrap: exit 130, no staging dir, no scratch tree, no
    process left (mmdebstrap runs in its own PID namespace)."""
    env = dict(os.environ, TMPDIR=str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nestbed.image.cli", "build", "-o", str(tmp_path / "img")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list((tmp_path / "scratch").glob("nestbed-build-*/root/var")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "scratch"]
    assert not list((tmp_path / "scratch").iterdir())
    ps = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert ps.stdout == ""
