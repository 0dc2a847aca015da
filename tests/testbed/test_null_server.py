"""nestbed-virt-null: copies, signals and cleanup, compared with autopkgtest-virt-null."""

from __future__ import annotations

import argparse
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from nestbed.testbed.protocol import CommandRefused, VirtServer, copy_via_exec
from nestbed.virt.null import NullServer

from .conftest import Driver

Snapshot = dict[str, tuple[str, int, str]]


def snapshot(top: Path) -> Snapshot:
    """Every entry under top: kind, permission bits, content or link target."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(top))
            st = p.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, "")
            else:
                out[rel] = ("file", mode, p.read_text())
    return out


def make_tree(top: Path) -> None:
    top.mkdir(parents=True)
    (top / "file.txt").write_text("hello\n")
    (top / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (top / "script.sh").chmod(0o755)
    (top / "private").write_text("secret")
    (top / "private").chmod(0o600)
    (top / "sub").mkdir()
    (top / "sub" / "deep.txt").write_text("deep")
    (top / "sub").chmod(0o750)
    (top / "empty").mkdir()
    (top / "empty").chmod(0o700)
    (top / "link").symlink_to("file.txt")
    (top / "dangling").symlink_to("nowhere")
    (top / "sub" / "up").symlink_to("../script.sh")
    (top / "with space %41.txt").write_text("odd name")


class Session:
    """An opened server with a private TMPDIR and host dir."""

    def __init__(self, argv: list[str], tmp: Path) -> None:
        self.tmpdir = tmp / "tmpdir"
        self.host = tmp / "host"
        self.tmpdir.mkdir(parents=True)
        self.host.mkdir(parents=True)
        self.driver = Driver(argv, {**os.environ, "TMPDIR": str(self.tmpdir)})
        assert self.driver.readline() == "ok"
        answer = self.ask("open")
        assert answer.startswith("ok ")
        self.scratch = Path(unquote(answer.split()[1]))

    def ask(self, line: str) -> str:
        answer = self.driver.ask(line)
        assert answer is not None, f"server exited on {line!r}: {self.driver.finish()}"
        return answer

    def copy(self, cmd: str, src: Path | str, dst: Path | str, tree: bool = False) -> str:
        slash = "/" if tree else ""
        return self.ask(f"{cmd} {quote(str(src))}{slash} {quote(str(dst))}{slash}")

    def quit(self) -> int:
        self.driver.send("quit")
        rc, _ = self.driver.finish()
        return rc


SessionFactory = Callable[[list[str]], Session]


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[SessionFactory]:
    sessions: list[Session] = []

    def make(argv: list[str]) -> Session:
        s = Session(argv, tmp_path / f"s{len(sessions)}")
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.driver.kill()


def test_copy_file_keeps_mode_and_quoted_names(
    any_null_argv: list[str], session_factory: SessionFactory
) -> None:
    s = session_factory(any_null_argv)
    src = s.host / "run me %20.sh"
    src.write_text("#!/bin/sh\n")
    src.chmod(0o755)
    tb = s.scratch / "in tb %.sh"
    assert s.copy("copydown", src, tb) == "ok"
    assert tb.read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE(tb.stat().st_mode) == 0o755
    back = s.host / "back 100%"
    assert s.copy("copyup", tb, back) == "ok"
    assert back.read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE(back.stat().st_mode) == 0o755
    assert s.quit() == 0
    assert not s.scratch.exists()


def test_copy_tree_with_symlinks_and_modes(
    any_null_argv: list[str], session_factory: SessionFactory
) -> None:
    s = session_factory(any_null_argv)
    src = s.host / "a b%c"
    make_tree(src)
    tb = s.scratch / "tree x%y"
    assert s.copy("copydown", src, tb, tree=True) == "ok"
    assert snapshot(tb) == snapshot(src)
    back = s.host / "back"
    assert s.copy("copyup", tb, back, tree=True) == "ok"
    assert snapshot(back) == snapshot(src)
    assert s.quit() == 0


def test_copy_into_other_dirs(any_null_argv: list[str], session_factory: SessionFactory) -> None:
    """Paths outside the scratch dir, on both ends (autopkgtest stages those through it)."""
    s = session_factory(any_null_argv)
    src = s.host / "src"
    make_tree(src)
    elsewhere = s.host / "tb-side"
    elsewhere.mkdir()
    assert s.copy("copydown", src, elsewhere / "t", tree=True) == "ok"
    assert snapshot(elsewhere / "t") == snapshot(src)
    assert s.copy("copyup", elsewhere / "t", s.host / "up", tree=True) == "ok"
    assert snapshot(s.host / "up") == snapshot(src)
    assert s.quit() == 0


def test_copydown_replaces_copyup_merges(
    any_null_argv: list[str], session_factory: SessionFactory
) -> None:
    s = session_factory(any_null_argv)
    src = s.host / "src"
    make_tree(src)
    (s.scratch / "tree").mkdir()
    (s.scratch / "tree" / "old.txt").write_text("old")
    assert s.copy("copydown", src, s.scratch / "tree", tree=True) == "ok"
    assert snapshot(s.scratch / "tree") == snapshot(src)
    (s.host / "back").mkdir()
    (s.host / "back" / "old.txt").write_text("old")
    assert s.copy("copyup", s.scratch / "tree", s.host / "back", tree=True) == "ok"
    assert (s.host / "back" / "old.txt").read_text() == "old"
    del_old = snapshot(s.host / "back")
    del del_old["old.txt"]
    assert del_old == snapshot(src)
    # a file copied up onto an existing directory lands inside it
    (s.scratch / "f").write_text("f")
    assert s.copy("copyup", s.scratch / "f", s.host / "back") == "ok"
    assert (s.host / "back" / "f").read_text() == "f"
    assert s.quit() == 0


def test_copy_failure_keeps_server_up(
    null_argv: list[str], session_factory: SessionFactory
) -> None:
    """autopkgtest-virt-null dies with a traceback (exit 16) here; ours answers
    `copy-failed' and stays usable."""
    s = session_factory(null_argv)
    assert s.copy("copydown", s.host / "missing", s.scratch / "x") == "copy-failed"
    assert s.copy("copydown", s.host / "missing", s.scratch / "x", tree=True) == "copy-failed"
    assert s.copy("copyup", s.scratch, s.host / "x") == "copy-failed"  # a dir as a file
    assert s.ask("capabilities").startswith("ok ")
    assert s.quit() == 0
    assert not s.scratch.exists()


def test_copy_keeps_hard_links(null_argv: list[str], session_factory: SessionFactory) -> None:
    s = session_factory(null_argv)
    src = s.host / "src"
    src.mkdir()
    (src / "a").write_text("x")
    os.link(src / "a", src / "b")
    assert s.copy("copydown", src, s.scratch / "t", tree=True) == "ok"
    assert (s.scratch / "t" / "a").stat().st_ino == (s.scratch / "t" / "b").stat().st_ino
    assert s.quit() == 0


def test_copy_timeout_answers_timeout(
    null_argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOPKGTEST_VIRT_COPY_TIMEOUT", "1")
    s = Session(null_argv, tmp_path)
    try:
        start = time.monotonic()
        # an endless source: the copy can only end by the timeout
        assert s.copy("copydown", "/dev/zero", s.scratch / "zero") == "timeout"
        assert time.monotonic() - start < 10
        assert not (s.scratch / "zero").exists()
        assert [p.name for p in s.scratch.iterdir()] == []  # no staging leftovers
        assert s.quit() == 0
    finally:
        s.driver.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_releases_testbed(any_null_argv: list[str], tmp_path: Path, signum: int) -> None:
    s = Session(any_null_argv, tmp_path)
    try:
        (s.scratch / "leftover").write_text("x")
        s.driver.proc.send_signal(signum)
        assert s.driver.proc.wait(30) == -signum
    finally:
        s.driver.kill()
    assert not s.scratch.exists()
    assert list(s.tmpdir.iterdir()) == []


def test_client_gone_releases_testbed(any_null_argv: list[str], tmp_path: Path) -> None:
    """The client closes its end: the next answer raises SIGPIPE, which releases too."""
    s = Session(any_null_argv, tmp_path)
    try:
        assert s.driver.proc.stdout is not None
        s.driver.proc.stdout.close()
        s.driver.send("capabilities")
        assert s.driver.proc.wait(30) == -signal.SIGPIPE
    finally:
        s.driver.kill()
    assert list(s.tmpdir.iterdir()) == []


def test_sigterm_during_copy_releases_testbed(null_argv: list[str], tmp_path: Path) -> None:
    s = Session(null_argv, tmp_path)
    try:
        s.driver.send(f"copydown /dev/zero {quote(str(s.scratch))}/zero")
        time.sleep(0.5)
        s.driver.proc.send_signal(signal.SIGTERM)
        assert s.driver.proc.wait(30) == -signal.SIGTERM
    finally:
        s.driver.kill()
    assert list(s.tmpdir.iterdir()) == []


def test_quit_and_eof_release_testbed(null_argv: list[str], tmp_path: Path) -> None:
    s = Session(null_argv, tmp_path / "q")
    assert s.quit() == 0
    assert list(s.tmpdir.iterdir()) == []
    s = Session(null_argv, tmp_path / "e")
    rc, err = s.driver.finish()
    assert rc == 12 and "end of file" in err
    assert list(s.tmpdir.iterdir()) == []


def test_scratch_is_world_writable_sticky(null_argv: list[str], tmp_path: Path) -> None:
    s = Session(null_argv, tmp_path)
    try:
        assert stat.S_IMODE(s.scratch.stat().st_mode) == 0o1777
        assert s.scratch.name.startswith("nestbed.")
        assert s.quit() == 0
    finally:
        s.driver.kill()


def test_server_imports_no_runner() -> None:
    code = (
        "import sys, nestbed.virt.null\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('nestbed'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    # neutral ground: the servers' process helper, logging, signals and capability words
    assert set(out) <= {
        "nestbed",
        "nestbed.capabilities",
        "nestbed.errors",
        "nestbed.log",
        "nestbed.proc",
        "nestbed.signals",
        "nestbed.testbed",
        "nestbed.testbed.protocol",
        "nestbed.trace",
        "nestbed.virt",
        "nestbed.virt.null",
    }


def test_generic_copy_via_exec_prefix(tmp_path: Path) -> None:
    """The default copy hooks (cat/tar through the exec prefix), for servers without a
    shared directory, exercised through the null server's `env` prefix."""
    server: VirtServer = NullServer(argparse.Namespace(debug=False))
    server.scratch = str(tmp_path / "tb")
    (tmp_path / "tb").mkdir()
    src = tmp_path / "src"
    make_tree(src)
    copy_via_exec(server, str(src), str(tmp_path / "tb" / "tree"), True, upwards=False)
    assert snapshot(tmp_path / "tb" / "tree") == snapshot(src)
    copy_via_exec(server, str(tmp_path / "tb" / "tree"), str(tmp_path / "up"), True, upwards=True)
    assert snapshot(tmp_path / "up") == snapshot(src)
    f = src / "script.sh"
    copy_via_exec(server, str(f), str(tmp_path / "tb" / "s"), False, upwards=False)
    assert stat.S_IMODE((tmp_path / "tb" / "s").stat().st_mode) == 0o755
    copy_via_exec(server, str(tmp_path / "tb" / "s"), str(tmp_path / "s2"), False, upwards=True)
    assert (tmp_path / "s2").read_text() == f.read_text()
    assert stat.S_IMODE((tmp_path / "s2").stat().st_mode) == 0o755
    with pytest.raises(CommandRefused) as failed:
        copy_via_exec(server, str(tmp_path / "nope"), str(tmp_path / "x"), False, upwards=True)
    assert failed.value.words == ["copy-failed"]
