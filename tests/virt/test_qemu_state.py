"""The ready-state store: keys, complete-or-absent states, removal (no VM)."""

from __future__ import annotations

from pathlib import Path

from nestbed.qemu.state import StateStore, state_key


def test_key_depends_on_what_a_restore_needs(tmp_path: Path) -> None:
    disk, qemu = tmp_path / "disk.img", tmp_path / "qemu"
    disk.write_bytes(b"x")
    qemu.write_bytes(b"q")
    base = state_key("{}", disk, qemu, ["-m", "2048"])
    assert base == state_key("{}", disk, qemu, ["-m", "2048"])
    assert base != state_key("{}", disk, qemu, ["-m", "1024"])
    assert base != state_key('{"x": 1}', disk, qemu, ["-m", "2048"])
    qemu.write_bytes(b"newer qemu")
    assert base != state_key("{}", disk, qemu, ["-m", "2048"])


def test_commit_lookup_remove(tmp_path: Path) -> None:
    image = tmp_path / "images" / "img"
    image.mkdir(parents=True)
    store = StateStore(image)
    assert store.lookup("k") is None
    staging = store.staging()
    (staging / "state.bin").write_bytes(b"s")
    (staging / "disk.qcow2").write_bytes(b"d")
    state = store.commit(staging, "k", {"shape": []})
    assert state is not None and state.state.read_bytes() == b"s"
    assert store.lookup("k") == state
    assert store.lookup("other") is None
    # a second saver loses the race quietly and gets the first one's state
    staging2 = store.staging()
    (staging2 / "state.bin").write_bytes(b"t")
    (staging2 / "disk.qcow2").write_bytes(b"e")
    assert store.commit(staging2, "k", {}) == state
    assert not staging2.exists()
    store.remove("k")
    assert store.lookup("k") is None
    assert [p.name for p in store.root.iterdir()] == []


def test_incomplete_state_is_not_used(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.mkdir()
    store = StateStore(image)
    d = store.path("k")
    d.mkdir(parents=True)
    (d / "state.bin").write_bytes(b"s")  # no disk, no meta
    assert store.lookup("k") is None
    (d / "meta.json").write_text('{"key": "k", "version": 1}')
    assert store.lookup("k") is None  # the disk is missing
