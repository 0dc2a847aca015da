"""Cache layout, manifest, mirror detection, options: no build, no network."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

import nestbed
from nestbed.image import BuildOptions, ImageCache, ImageError, ImagePaths, Manifest, contents
from nestbed.image.build import mmdebstrap_argv, plan
from nestbed.image.cache import MANIFEST, default_root, install, staging_dir
from nestbed.image.cli import main
from nestbed.image.config import parse_size
from nestbed.image.mirror import host_sources, image_sources

MANIFEST_FIELDS = Manifest(
    name="x", release="bookworm", arch="amd64", flavour="minimal", size=4 << 30,
    created="2025-01-01T00:00:00+00:00", kernel_version="6.1.0-1-cloud-amd64",
    cmdline="root=/dev/vda", root_serial="nestbed-root", base_serial="nestbed-base",
    agent_port="org.nestbed.control", sources=("deb http://mirror.invalid/debian bookworm main",),
    packages=("udev",), build_seconds=1.0,
)  # fmt: skip


def fake_image(directory: Path, name: str) -> None:
    directory.mkdir(parents=True)
    for part in ("disk.img", "vmlinuz", "initrd.img"):
        (directory / part).write_bytes(name.encode())
    manifest = dataclasses.replace(MANIFEST_FIELDS, name=name)
    (directory / MANIFEST).write_text(manifest.to_json())


def test_cache_root_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NESTBED_CACHE_DIR", str(tmp_path / "c"))
    assert default_root() == tmp_path / "c" / "images"
    monkeypatch.delenv("NESTBED_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x" / "nestbed" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_root() == Path.home() / ".cache" / "nestbed" / "images"


def test_half_built_images_are_never_used(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "disk.img").write_bytes(b"")
    fake_image(tmp_path / "done", "done")
    assert cache.lookup("half") is None
    assert [i.name for i in cache.entries()] == ["done"]
    with pytest.raises(ImageError, match="not a complete nestbed image"):
        ImagePaths.load(tmp_path / "half")


def test_install_replaces_only_when_complete(tmp_path: Path) -> None:
    dest = tmp_path / "img"
    fake_image(dest, "old")
    staging = staging_dir(dest)
    with pytest.raises(ImageError, match="no manifest"):
        install(staging, dest)
    assert ImagePaths.load(dest).name == "old"
    staging.rmdir()
    staging = staging_dir(dest)
    staging.rmdir()
    fake_image(staging, "new")
    install(staging, dest)
    assert ImagePaths.load(dest).name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]


def test_list_and_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("NESTBED_CACHE_DIR", str(tmp_path))
    fake_image(tmp_path / "images" / "bookworm-amd64-minimal-abc", "bookworm-amd64-minimal-abc")
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "RELEASE", "FLAVOUR", "SIZE", "DISK", "CREATED"]
    assert out[1].split()[:4] == ["bookworm-amd64-minimal-abc", "bookworm", "minimal", "4G"]
    assert main(["remove", "bookworm-amd64-minimal-abc"]) == 0
    assert not (tmp_path / "images" / "bookworm-amd64-minimal-abc").exists()
    assert main(["remove", "bookworm-amd64-minimal-abc"]) == 1
    assert "no image named" in capsys.readouterr().err


def test_mirror_from_deb822_and_one_line(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://one.invalid/debian/ bookworm main contrib\n"
        "deb-src http://one.invalid/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "x.sources").write_text(
        "Types: deb\n# a comment inside\nURIs: http://two.invalid/debian\n"
        "Suites: bookworm bookworm-updates bookworm-backports\nComponents: main\n\n"
        "Types: deb\nURIs: http://sec.invalid/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\nEnabled: no\nURIs: http://off.invalid/\n"
        "Suites: bookworm\nComponents: main\n"
    )
    assert [s.uri for s in host_sources(tmp_path)] == [
        "http://one.invalid/debian", "http://two.invalid/debian", "http://sec.invalid/debian-security",
    ]  # fmt: skip
    lines = [line for s in image_sources("trixie", None, tmp_path) for line in s.lines()]
    assert lines == [
        "deb http://one.invalid/debian trixie main contrib",
        "deb http://two.invalid/debian trixie main",
        "deb http://two.invalid/debian trixie-updates main",
        "deb http://sec.invalid/debian-security trixie-security main",
    ]
    sid = [line for s in image_sources("sid", None, tmp_path) for line in s.lines()]
    assert sid == [
        "deb http://one.invalid/debian sid main contrib",
        "deb http://two.invalid/debian sid main",
    ]
    over = image_sources("bookworm", "http://127.0.0.1:9/debian/", tmp_path)
    assert [line for s in over for line in s.lines()] == [
        "deb http://127.0.0.1:9/debian bookworm main"
    ]
    with pytest.raises(ImageError, match="no Debian mirror found"):
        image_sources("bookworm", None, tmp_path / "nothing")


def test_options_and_key() -> None:
    assert parse_size("4G") == 4 << 30 and parse_size("512MiB") == 512 << 20
    with pytest.raises(ImageError, match="unknown release"):
        BuildOptions(release="potato")
    with pytest.raises(ImageError, match="bad package name"):
        BuildOptions(include=("rm -rf /",))
    with pytest.raises(ImageError, match="too small"):
        BuildOptions(size=1 << 20)
    with pytest.raises(ImageError, match=r"unknown kernel 'rt' \(known: cloud, generic\)"):
        BuildOptions(kernel="rt")
    nested = BuildOptions(nested=True, include=("hello",))
    assert nested.flavour == "nested"
    assert "linux-image-cloud-amd64" in nested.packages
    generic = BuildOptions(kernel="generic")
    assert generic.flavour == "minimal-generic"
    assert "linux-image-amd64" in generic.packages
    assert "linux-image-cloud-amd64" not in generic.packages
    assert {"qemu-system-x86", "qemu-utils", "hello", "python3"} <= set(nested.packages)
    mirror = "http://127.0.0.1:9/debian"
    a, b = plan(BuildOptions(mirror=mirror)), plan(BuildOptions(mirror=mirror, nested=True))
    assert a.key.startswith("bookworm-amd64-minimal-") and b.key.startswith(
        "bookworm-amd64-nested-"
    )
    assert a.key != b.key and a.key == plan(BuildOptions(mirror=mirror)).key
    assert plan(BuildOptions(mirror=mirror, kernel="generic")).key.startswith(
        "bookworm-amd64-minimal-generic-"
    )
    argv = mmdebstrap_argv(a, Path("/r"), None, wrap=False)
    assert argv[0] == "mmdebstrap" and argv[-3:] == [
        "bookworm",
        "/r",
        f"deb {mirror} bookworm main",
    ]
    if os.geteuid() == 0:
        assert "--mode=root" in argv and mmdebstrap_argv(a, Path("/r"), None)[0] == "unshare"


def test_nested_image_carries_nestbed_and_its_key_follows_the_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every console script gets a /usr/bin script; a changed source file changes the nested
    image's key, not the minimal one's."""
    files = contents.nestbed_files()
    for name, target in contents.console_scripts().items():
        module, _, func = target.partition(":")
        script = files[f"usr/bin/{name}"]
        assert script[1] == 0o755
        assert f"from {module} import {func}" in str(script[0])
    assert "usr/lib/python3/dist-packages/nestbed/py.typed" in files
    assert "usr/lib/python3/dist-packages/nestbed/run/wrapper.sh" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    nested, minimal = plan(BuildOptions(nested=True)).key, plan(BuildOptions()).key
    # a copy of the package with one byte more in one file
    copy = tmp_path / "nestbed"
    shutil.copytree(Path(nestbed.__file__).parent, copy)
    with open(copy / "errors.py", "a") as f:
        f.write("\n")
    monkeypatch.setattr(nestbed, "__file__", str(copy / "__init__.py"))
    assert plan(BuildOptions(nested=True)).key != nested
    assert plan(BuildOptions()).key == minimal
