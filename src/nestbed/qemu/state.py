"""Saved ready states: a booted testbed frozen once, restored in well under a second.

A ready state is a directory `.states/IMAGE-KEY/` beside the image directory (the image
cache skips dot-directories) holding

- `disk.qcow2`: the guest's overlay at the moment of the save (its backing file is the base
  image), read-only from then on: restored testbeds get a fresh overlay on top of it;
- `state.bin`: QEMU's migration stream of the paused machine (memory and devices);
- `meta.json`, written last: the key and what it was computed from.

KEY hashes everything a restore depends on: the image's manifest, the disk's size and
mtime, the QEMU binary (path, size, mtime), and the machine's shape -- its command line
with the per-run paths blanked (memory, CPUs, -cpu, accelerator, devices, disk serials and
formats, extra options). A state whose key does not match is never looked up; one that
fails to restore is removed by the caller and replaced by a cold boot.

States are saved into a staging directory and renamed into place, so a reader sees a
complete state or none; two testbeds saving at once keep the first. Each save also removes
the states that can never be restored again -- their base disk is gone, or was rebuilt after
they were saved (a state is ~200-400 MB) -- found by the `disk` their meta.json names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nestbed.image.cache import DISK as IMAGE_DISK

STATES_DIR = ".states"
DISK = "disk.qcow2"
STATE = "state.bin"
META = "meta.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ReadyState:
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / DISK

    @property
    def state(self) -> Path:
        return self.directory / STATE


def _stat_id(path: Path) -> list[object]:
    try:
        st = path.stat()
    except OSError:
        return [os.fspath(path), None]
    return [os.fspath(path), st.st_size, st.st_mtime_ns]


def state_key(manifest_json: str, disk: Path, qemu_binary: Path, shape: list[str]) -> str:
    material = json.dumps(
        {
            "version": FORMAT_VERSION,
            "manifest": manifest_json,
            "disk": _stat_id(disk),
            "qemu": _stat_id(qemu_binary),
            "shape": shape,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


class StateStore:
    """Where the ready states of one image live."""

    def __init__(self, image_dir: Path) -> None:
        self.root = image_dir.parent / STATES_DIR
        self.prefix = image_dir.name

    @classmethod
    def for_disk(cls, cache_root: Path, disk: Path) -> StateStore:
        """States of a disk that is not in nestbed's cache (an image from another builder):
        kept in the cache, never beside the user's file."""
        store = cls(cache_root / "foreign")
        digest = hashlib.sha256(os.fsencode(disk.absolute())).hexdigest()[:12]
        store.prefix = f"foreign-{digest}"
        return store

    def path(self, key: str) -> Path:
        return self.root / f"{self.prefix}-{key}"

    def lookup(self, key: str) -> ReadyState | None:
        """The complete state for key, or None."""
        d = self.path(key)
        try:
            meta = json.loads((d / META).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
            return None
        state = ReadyState(d)
        if not state.disk.is_file() or not state.state.is_file():
            return None
        return state

    def staging(self) -> Path:
        """A fresh directory to save a state into (then `commit` or `discard` it). Staging
        directories of saves that died (SIGKILL) are removed once they are an hour old."""
        self.root.mkdir(parents=True, exist_ok=True)
        for old in self.root.glob(".save-*"):
            with contextlib.suppress(OSError):
                if time.time() - old.stat().st_mtime > 3600:
                    self.discard(old)
        return Path(tempfile.mkdtemp(prefix=".save-", dir=self.root))

    def commit(self, staging: Path, key: str, facts: dict[str, object]) -> ReadyState | None:
        for name in (DISK, STATE):
            with contextlib.suppress(OSError):
                (staging / name).chmod(0o444)
        meta = {"key": key, "version": FORMAT_VERSION, "saved": time.time(), **facts}
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            staging.rename(self.path(key))
        except OSError:  # someone else saved it first: theirs is as good
            self.discard(staging)
        self.prune()
        return self.lookup(key)

    def prune(self) -> list[Path]:
        """Remove every state in this store's directory whose base disk no longer exists or
        changed after the save (so no key can ever match it again); the ones removed."""
        removed = []
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                meta = json.loads((d / META).read_text())
                saved = float(meta["saved"])
                # states saved before they named their disk: the image directory's disk
                disk = meta.get("disk") or os.path.join(meta["image"], IMAGE_DISK)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # nothing says which disk it needs: left alone
            try:
                stale = os.stat(disk).st_mtime > saved
            except FileNotFoundError:
                stale = True
            except OSError:
                continue
            if stale and self._take_away(d):
                removed.append(d)
        return removed

    @staticmethod
    def discard(directory: Path) -> None:
        shutil.rmtree(directory, ignore_errors=True)

    def remove(self, key: str) -> None:
        """Drop a state that failed to restore."""
        self._take_away(self.path(key))

    def _take_away(self, d: Path) -> bool:
        """Rename a state away (readers see none from then on), then delete it; False when
        it could not be renamed (gone already, or taken by someone else)."""
        trash = self.root / f".stale-{os.getpid()}-{d.name}"
        try:
            d.rename(trash)
        except OSError:
            return False
        self.discard(trash)
        return True
