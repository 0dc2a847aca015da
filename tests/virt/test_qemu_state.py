"""The ready-state store: keys, complete-or-absent states, removal (no VM)."""

from __future__ import annotations

import json
import os
import time
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


def _save(store: StateStore, key: str, disk: Path) -> Path:
    staging = store.staging()
    (staging / "state.bin").write_bytes(b"s")
    (staging / "disk.qcow2").write_bytes(b"d")
    state = store.commit(staging, key, {"disk": str(disk), "shape": [key]})
    assert state is not None
    return state.directory


def test_a_save_prunes_states_of_rebuilt_or_removed_disks(tmp_path: Path) -> None:
    images = tmp_path / "images"
    kept_img, rebuilt_img, gone_img = (images / n for n in ("kept", "rebuilt", "gone"))
    for d in (kept_img, rebuilt_img, gone_img):
        d.mkdir(parents=True)
        (d / "disk.img").write_bytes(b"disk")
    rebuilt = _save(StateStore(rebuilt_img), "old", rebuilt_img / "disk.img")
    gone = _save(StateStore(gone_img), "g", gone_img / "disk.img")
    kept = _save(StateStore(kept_img), "one-shape", kept_img / "disk.img")
    unknown = StateStore(kept_img).path("unknown")  # names neither disk nor image
    unknown.mkdir()
    (unknown / "meta.json").write_text('{"key": "unknown", "version": 1, "saved": 1}')
    # saved before states named their disk: found through the image directory
    legacy = _save(StateStore(gone_img), "legacy", gone_img / "disk.img")
    meta = json.loads((legacy / "meta.json").read_text())
    del meta["disk"]
    meta["image"] = str(gone_img)
    (legacy / "meta.json").write_text(json.dumps(meta))
    os.utime(rebuilt_img / "disk.img", (time.time() + 5, time.time() + 5))  # rebuilt later
    (gone_img / "disk.img").unlink()
    store = StateStore(kept_img)
    other_shape = _save(store, "other-shape", kept_img / "disk.img")
    left = sorted(p.name for p in store.root.iterdir())
    assert left == sorted(p.name for p in (kept, other_shape, unknown))
    assert not rebuilt.exists() and not gone.exists() and not legacy.exists()
