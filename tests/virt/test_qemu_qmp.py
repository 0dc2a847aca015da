"""The persistent QMP client against a scripted monitor on a unix socket (no VM)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nestbed.qemu.qmp import QMPClient, QMPError

GREETING = {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}
# a monitor's answer to one command: the lines it sends back (events, replies, or nothing)
Script = Callable[[dict[str, Any]], list[dict[str, Any]]]


class FakeMonitor:
    """Accepts one connection, greets, answers each command line with what `script` says."""

    def __init__(self, path: Path, script: Script, listen_after: float | None = None) -> None:
        self.path = path
        self.script = script
        self.commands: list[str] = []
        self.connections = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        if listen_after is None:
            self._listener.listen(4)
        self._listen_after = listen_after
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        if self._listen_after is not None:  # bound, not yet listening: as QEMU for a moment
            time.sleep(self._listen_after)
            self._listener.listen(4)
        conn, _ = self._listener.accept()
        self.connections += 1
        self._conn = conn
        self.send(GREETING)
        for line in conn.makefile("rb"):
            request = json.loads(line)
            self.commands.append(request["execute"])
            for message in self.script(request):
                self.send(message)
            if request["execute"] == "quit":
                break
        conn.close()

    def send(self, message: dict[str, Any]) -> None:
        assert self._conn is not None
        self._conn.sendall(json.dumps(message).encode() + b"\n")

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=5)


def answer(request: dict[str, Any]) -> list[dict[str, Any]]:
    """A well-behaved monitor: every command returns {}, quit says SHUTDOWN first."""
    reply = {"return": {}, "id": request["id"]}
    if request["execute"] == "quit":
        shutdown = {"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}}
        return [reply, shutdown]
    return [reply]


@pytest.fixture
def monitor_with(tmp_path: Path) -> Iterator[Callable[[Script], FakeMonitor]]:
    made: list[FakeMonitor] = []

    def start(script: Script) -> FakeMonitor:
        made.append(FakeMonitor(tmp_path / f"qmp{len(made)}.sock", script))
        return made[-1]

    yield start
    for m in made:
        m.close()


def test_commands_share_one_connection(monitor_with: Callable[[Script], FakeMonitor]) -> None:
    monitor = monitor_with(answer)
    client = QMPClient.connect(monitor.path, timeout=5)
    try:
        for _ in range(3):
            assert client.execute("query-status", timeout=5) == {}
    finally:
        client.close()
    assert monitor.connections == 1
    assert monitor.commands == ["qmp_capabilities", *["query-status"] * 3]


def test_events_between_replies_are_kept(monitor_with: Callable[[Script], FakeMonitor]) -> None:
    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["execute"] == "system_reset":
            return [{"event": "RESET", "data": {"guest": False, "reason": "host-qmp-system-reset"}},
                    {"return": {}, "id": request["id"]}]  # fmt: skip
        return answer(request)

    client = QMPClient.connect(monitor_with(script).path, timeout=5)
    try:
        client.execute("system_reset", timeout=5)
        client.execute("quit", timeout=5)
        assert client.wait_closed(timeout=5)
    finally:
        client.close()
    assert [(e.name, e.data["reason"]) for e in client.events()] == [
        ("RESET", "host-qmp-system-reset"),
        ("SHUTDOWN", "host-qmp-quit"),
    ]


def test_a_refusal_names_the_command(monitor_with: Callable[[Script], FakeMonitor]) -> None:
    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["execute"] == "set-action":
            error = {"class": "GenericError", "desc": "Invalid parameter 'bogus'"}
            return [{"error": error, "id": request["id"]}]
        return answer(request)

    client = QMPClient.connect(monitor_with(script).path, timeout=5)
    try:
        with pytest.raises(QMPError, match="set-action: Invalid parameter 'bogus'"):
            client.execute("set-action", {"reboot": "bogus"}, timeout=5)
        assert client.execute("query-status", timeout=5) == {}  # the connection still works
    finally:
        client.close()


def test_a_late_reply_is_not_the_next_commands(
    monitor_with: Callable[[Script], FakeMonitor],
) -> None:
    held: list[dict[str, Any]] = []

    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["execute"] == "slow":  # answered only with the next command
            held.append({"return": "slow's", "id": request["id"]})
            return []
        late, held[:] = list(held), []
        return [*late, {"return": "mine", "id": request["id"]}]

    client = QMPClient.connect(monitor_with(script).path, timeout=5)
    try:
        with pytest.raises(QMPError, match=r"slow: no reply in 0\.2 s"):
            client.execute("slow", timeout=0.2)
        assert client.execute("query-status", timeout=5) == "mine"
    finally:
        client.close()


def test_commands_from_many_threads(monitor_with: Callable[[Script], FakeMonitor]) -> None:
    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["execute"] != "echo":
            return answer(request)
        return [{"return": request["arguments"]["n"], "id": request["id"]}]

    client = QMPClient.connect(monitor_with(script).path, timeout=5)
    got: dict[int, object] = {}

    def ask(n: int) -> None:
        got[n] = client.execute("echo", {"n": n}, timeout=10)

    try:
        threads = [threading.Thread(target=ask, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    finally:
        client.close()
    assert got == {n: n for n in range(20)}


def test_qemu_gone_fails_commands_at_once(
    monitor_with: Callable[[Script], FakeMonitor],
) -> None:
    client = QMPClient.connect(monitor_with(answer).path, timeout=5)
    try:
        client.execute("quit", timeout=5)  # the monitor closes the connection after it
        assert client.wait_closed(timeout=5)
        with pytest.raises(QMPError, match="closed"):
            client.execute("query-status", timeout=30)
    finally:
        client.close()


def test_no_monitor_is_a_qmp_error(tmp_path: Path) -> None:
    with pytest.raises(QMPError, match="cannot connect to QMP"):
        QMPClient.connect(tmp_path / "absent.sock", timeout=1)


def test_a_socket_not_yet_listening_is_waited_for(tmp_path: Path) -> None:
    """QEMU binds its QMP socket (the file exists) a moment before it listens: under load a
    connect in between was refused, and the testbed failed to start."""
    monitor = FakeMonitor(tmp_path / "qmp.sock", answer, listen_after=0.5)
    try:
        client = QMPClient.connect(tmp_path / "qmp.sock", timeout=10)
        try:
            assert client.execute("query-status") == {}
        finally:
            client.close()
    finally:
        monitor.close()
    assert monitor.commands[:2] == ["qmp_capabilities", "query-status"]
