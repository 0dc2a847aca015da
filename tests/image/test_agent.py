"""The control agent and its host client, over a socketpair on this machine (no VM)."""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed.guest import agent
from nestbed.guest.channel import Channel, ChannelError, ChannelTimeout, ExecError


@pytest.fixture
def channel() -> Iterator[Channel]:
    host, guest = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, agent.__file__, "--fd", str(guest.fileno()), "--exit-on-eof"],
        pass_fds=[guest.fileno()],
    )
    guest.close()
    ch = Channel(host)
    try:
        ch.hello(timeout=10)
        yield ch
    finally:
        ch.close()
        try:
            proc.wait(timeout=10)
        finally:
            proc.kill()


def test_frames_survive_garbage() -> None:
    dec = agent.Decoder()
    frame = agent.encode(agent.FrameType.PING, 7, b"NB\x00payload with NB inside")
    data = b"console noise NBNB\x01" + frame + b"xx" + frame
    frames = [f for i in range(0, len(data), 5) for f in dec.feed(data[i : i + 5])]
    assert [(f.type, f.stream, f.payload) for f in frames] == [
        (agent.FrameType.PING, 7, b"NB\x00payload with NB inside")
    ] * 2


def test_hello_and_ping(channel: Channel) -> None:
    assert channel.info["protocol"] == agent.PROTOCOL_VERSION
    assert channel.ping(b"x") < 5


def test_exec_streams_status_env_cwd_stdin(channel: Channel, tmp_path: Path) -> None:
    res = channel.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.status, res.signal, res.stdout, res.stderr) == (3, None, b"out\n", b"err\n")
    res = channel.exec(["sh", "-c", 'echo "$FOO"; pwd'], env={"FOO": "bar"}, cwd=str(tmp_path))
    assert res.stdout == f"bar\n{tmp_path}\n".encode()
    big = os.urandom(3 * 1024 * 1024)  # more than the stdin window, both ways
    res = channel.exec(["cat"], stdin=big)
    assert res.status == 0 and res.stdout == big
    res = channel.exec(["sh", "-c", "kill -TERM $$"])
    assert (res.status, res.signal, res.returncode) == (None, signal.SIGTERM, -signal.SIGTERM)


def test_exec_errors_and_timeout(channel: Channel) -> None:
    with pytest.raises(ExecError, match="no-such-program"):
        channel.exec(["no-such-program"])
    with pytest.raises(ExecError, match="no such user"):
        channel.exec(["true"], user="no-such-user-here")
    with pytest.raises(ChannelTimeout):
        channel.exec(["sleep", "30"], timeout=0.5)
    assert channel.exec(["true"]).status == 0  # the channel is still usable


def test_put_get_round_trip(channel: Channel, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "sub" / "data").write_bytes(bytes(range(256)))
    (src / "link").symlink_to("sub/data")
    guest_dir = tmp_path / "guest"
    channel.put(src, str(guest_dir))
    back = tmp_path / "back"
    back.mkdir()
    channel.get(str(guest_dir / "tree"), back)
    got = back / "tree"
    assert stat.S_IMODE((got / "run.sh").stat().st_mode) == 0o750
    assert (got / "sub" / "data").read_bytes() == bytes(range(256))
    assert os.readlink(got / "link") == "sub/data"
    with pytest.raises(ExecError, match="no such file"):
        channel.get(str(tmp_path / "missing"), back)


def test_get_refuses_paths_outside(channel: Channel, tmp_path: Path) -> None:
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tf:
        info = tarfile.TarInfo("../escape")
        tf.addfile(info, io.BytesIO(b""))
    evil.seek(0)
    target = tmp_path / "in"
    target.mkdir()
    with tarfile.open(fileobj=evil) as tf, pytest.raises(ChannelError, match="outside"):
        from nestbed.guest.channel import safe_extract

        safe_extract(tf, target)
