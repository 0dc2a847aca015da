"""Moved to `nestbed.proc` (a neutral place: the runner, the servers and the image builder all
use it). This name stays only until qemu/machine.py imports `nestbed.proc` itself."""

from nestbed.proc import CommandFailed, Result, cmdline, remove_tree, run, spawn, stop

__all__ = ["CommandFailed", "Result", "cmdline", "remove_tree", "run", "spawn", "stop"]
