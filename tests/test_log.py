"""nestbed.log, the one logging mechanism: the line formats users read (autopkgtest's for
the runner, `PROG: ...` for nestbed-vm and the virt servers), and `-d` showing every layer's
debug lines, the commands nestbed.proc runs included."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestbed import log

STAMP = r"\[\d\d:\d\d:\d\d\]"


@pytest.fixture(autouse=True)
def _restore_setup() -> Iterator[None]:
    yield
    log.setup(log.program_name())


def test_console_lines_in_autopkgtest_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    console = log.Console(log.DEBUG)
    console.prog = "nestbed"
    console.open_logfile(str(tmp_path / "log"))
    console.info("starting")
    console.warning("careful")
    console.error("broken")
    console.debug("details")
    console.close()
    prog = re.escape(log.program_name())
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(rf"{prog} {STAMP}: starting", lines[0])
    assert lines[1] == f"{log.program_name()}: WARNING: careful"
    assert re.fullmatch(rf"{prog} {STAMP}: ERROR: broken", lines[2])
    assert lines[3] == f"{log.program_name()}: DBG: details"
    assert (tmp_path / "log").read_text().splitlines() == lines


def test_verbosity_hides_info_and_debug(capsys: pytest.CaptureFixture[str]) -> None:
    console = log.Console(log.QUIET)
    console.info("not shown")
    console.debug("not shown")
    console.warning("shown")
    assert capsys.readouterr().err == f"{log.program_name()}: WARNING: shown\n"
    console = log.Console(log.INFO)
    console.debug("not shown")
    console.info("shown")
    assert capsys.readouterr().err.endswith(": shown\n")


def test_every_module_logs_through_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    console = log.Console(log.DEBUG)
    console.open_logfile(str(tmp_path / "log"))
    logging.getLogger("nestbed.somewhere").debug("a library's detail")
    console.close()
    expected = f"{log.program_name()}: DBG: a library's detail\n"
    assert capsys.readouterr().err == expected
    assert (tmp_path / "log").read_text() == expected


def test_plain_style(capsys: pytest.CaptureFixture[str]) -> None:
    logger = log.setup("nestbed-vm", log.PLAIN, debug=True)
    logger.info("booting")
    logger.warning("odd")
    logger.error("failed")
    logger.debug("step")
    logger.error("nestbed-vm: failure: whole line", extra={"as_is": True})
    assert capsys.readouterr().err.splitlines() == [
        "nestbed-vm: booting",
        "nestbed-vm: odd",
        "nestbed-vm: error: failed",
        "nestbed-vm: debug: step",
        "nestbed-vm: failure: whole line",
    ]


def test_a_record_may_name_its_program(capsys: pytest.CaptureFixture[str]) -> None:
    from nestbed.image.progress import PlainProgress

    log.setup("nestbed-virt-unshare", log.PLAIN)
    with PlainProgress().stage("building"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(rf"nestbed {STAMP}: building \.\.\.", lines[0])
    assert re.fullmatch(rf"nestbed {STAMP}: building: done in \d+\.\d s", lines[1])


def test_debug_shows_the_commands_run_on_a_testbed(capsys: pytest.CaptureFixture[str]) -> None:
    from nestbed.testbed.client import Testbed, resolve_virt_server

    log.Console(log.DEBUG)
    with Testbed(resolve_virt_server("null")) as tb:
        tb.start()
        tb.open()
        tb.execute(["echo", "hello there"])
    lines = capsys.readouterr().err.splitlines()
    prog = log.program_name()
    assert f"{prog}: DBG: running {resolve_virt_server('null')[0]}" in lines
    assert any(
        line.startswith(f"{prog}: DBG: running ") and line.endswith("echo 'hello there'")
        for line in lines
    ), lines


def test_without_debug_no_command_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from nestbed.testbed.client import Testbed, resolve_virt_server

    log.Console(log.INFO)
    with Testbed(resolve_virt_server("null")) as tb:
        tb.start()
        tb.open()
        tb.execute(["true"])
    assert capsys.readouterr().err == ""
