"""Transcripts of nestbed-virt-null against autopkgtest-virt-null for the same commands."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nestbed.testbed.protocol import (
    format_exec_prefix,
    parse_exec_prefix,
    parse_line,
    quote_word,
    unquote_word,
)

from .conftest import Driver

Transcript = tuple[list[str], int, list[str]]


def run_transcript(argv: list[str], script: list[str], tmp: Path) -> Transcript:
    """Send `script` ({S}: quoted scratch, {H}: quoted host dir); return the normalised
    answers, exit status and failure lines."""
    tmpdir = tmp / "tmpdir"
    host = tmp / "host"
    tmpdir.mkdir(parents=True, exist_ok=True)
    host.mkdir(parents=True, exist_ok=True)
    d = Driver(argv, {**os.environ, "TMPDIR": str(tmpdir)})
    answers: list[str] = []
    scratch = ""
    try:
        banner = d.readline()
        assert banner is not None
        answers.append(banner)
        for cmd in script:
            line = cmd.replace("{S}", quote(scratch)).replace("{H}", quote(str(host)))
            d.send(line)
            if cmd == "quit":
                break
            if not cmd.strip():
                continue  # blank lines get no answer
            answer = d.readline()
            if answer is None:
                break
            if unquote(cmd) == "open" and answer.startswith("ok "):
                scratch = unquote(answer.split()[1])
            answers.append(answer)
        rc, err = d.finish()
    finally:
        d.kill()

    def norm(s: str) -> str:
        if scratch:
            s = s.replace(scratch, "SCRATCH")
        return s.replace(str(host), "HOST")

    # autopkgtest's capabilities answer grows an `ok' per query (a bug we do not copy)
    answers = [re.sub(r"^(ok )+", "ok ", norm(a)) for a in answers]
    failures = [
        norm(re.sub(r"^(<VirtSubproc>|nestbed-virt-null): ", "PROG: ", line))
        for line in err.splitlines()
        if "failure:" in line
    ]
    return answers, rc, failures


def compare(ours: list[str], theirs: list[str], script: list[str], tmp: Path) -> Transcript:
    mine = run_transcript(ours, script, tmp / "ours")
    ref = run_transcript(theirs, script, tmp / "theirs")
    assert mine == ref
    return mine


SCRIPTS: dict[str, tuple[list[str], Transcript]] = {
    "quit": (["quit"], (["ok"], 0, [])),
    "blank-lines": (["", "  ", "quit"], (["ok"], 0, [])),
    "caps-open-close": (
        [
            "capabilities",
            "open",
            "capabilities",
            "print-execute-command",
            "close",
            "capabilities",
            "quit",
        ],
        (
            [
                "ok",
                "ok isolation-machine root-on-testbed",
                "ok SCRATCH",
                "ok isolation-machine root-on-testbed downtmp-host=SCRATCH",
                "ok env",
                "ok",
                "ok isolation-machine root-on-testbed",
            ],
            0,
            [],
        ),
    ),
    "reopen-same-scratch": (
        ["open", "close", "open", "print_execute_command", "quit"],
        (["ok", "ok SCRATCH", "ok", "ok SCRATCH", "ok env"], 0, []),
    ),
    "quoted-command-word": (
        ["%6Fpen", "auxverb_debug_fail", "quit"],
        (["ok", "ok SCRATCH", "ok"], 0, []),
    ),
    "unknown-command": (["bogus"], (["ok"], 12, ["PROG: failure: unknown command `bogus'"])),
    "too-many-args": (
        ["quit now"],
        (["ok"], 12, ["PROG: failure: too many arguments to command `quit'"]),
    ),
    "too-few-args": (
        ["open", "copydown {H}"],
        (["ok", "ok SCRATCH"], 12, ["PROG: failure: too few arguments to command `copydown'"]),
    ),
    "close-twice": (
        ["open", "close", "close"],
        (["ok", "ok SCRATCH", "ok"], 12, ["PROG: failure: `close' when not open"]),
    ),
    "open-twice": (
        ["open", "open"],
        (["ok", "ok SCRATCH"], 12, ["PROG: failure: `open' when already open"]),
    ),
    "pec-closed": (
        ["print-execute-command"],
        (["ok"], 12, ["PROG: failure: `print-execute-command' when not open"]),
    ),
    "revert-not-advertised": (
        ["open", "revert"],
        (["ok", "ok SCRATCH"], 12, ["PROG: failure: `revert' when `revert' not advertised"]),
    ),
    "revert-closed": (["revert"], (["ok"], 12, ["PROG: failure: `revert' when not open"])),
    "reboot-not-advertised": (
        ["open", "reboot prepare-only"],
        (["ok", "ok SCRATCH"], 12, ["PROG: failure: `reboot' when `reboot' not advertised"]),
    ),
    "reboot-too-many": (
        ["open", "reboot prepare-only x"],
        (["ok", "ok SCRATCH"], 12, ["PROG: failure: too many arguments to command `reboot'"]),
    ),
    "copy-closed": (["copyup /a /b"], (["ok"], 12, ["PROG: failure: copyup when not open"])),
    "copy-directoryness": (
        ["open", "copydown {H}/ {S}/x"],
        (
            ["ok", "ok SCRATCH"],
            12,
            [
                "PROG: failure: copydown paths must agree about directoryness"
                " (presence or absence of trailing /)"
            ],
        ),
    ),
    # no controlling terminal (own session): both log it and still answer ok
    "shell-no-tty": (["open", "shell /tmp A=1", "quit"], (["ok", "ok SCRATCH", "ok"], 0, [])),
    "shell-closed": (["shell /"], (["ok"], 12, ["PROG: failure: `shell' when not open"])),
    "shell-no-args": (
        ["open", "shell"],
        (["ok", "ok SCRATCH"], 12, ["PROG: failure: too few arguments to command `shell'"]),
    ),
}


@pytest.mark.autopkgtest
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_transcript_matches_autopkgtest(
    name: str, null_argv: list[str], autopkgtest_null_argv: list[str], tmp_path: Path
) -> None:
    script, expected = SCRIPTS[name]
    got = compare(null_argv, autopkgtest_null_argv, script, tmp_path)
    if os.getuid() != 0:
        expected = (
            [a.replace(" root-on-testbed", "") for a in expected[0]],
            expected[1],
            expected[2],
        )
    assert got == expected


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_transcript(name: str, null_argv: list[str], tmp_path: Path) -> None:
    """The same expectations without autopkgtest installed."""
    script, expected = SCRIPTS[name]
    got = run_transcript(null_argv, script, tmp_path)
    if os.getuid() != 0:
        expected = (
            [a.replace(" root-on-testbed", "") for a in expected[0]],
            expected[1],
            expected[2],
        )
    assert got == expected


def test_capabilities_do_not_accumulate(null_argv: list[str], tmp_path: Path) -> None:
    answers, rc, _ = run_transcript(null_argv, ["capabilities"] * 3 + ["quit"], tmp_path)
    assert len(set(answers[1:])) == 1 and not answers[1].startswith("ok ok")
    assert rc == 0


def test_eof_closes_and_exits(null_argv: list[str], tmp_path: Path) -> None:
    """autopkgtest-virt-null spins forever on EOF; ours releases the testbed and exits 12,
    as VirtSubproc's (unreachable) EOF branch and the spec intend."""
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    d = Driver(null_argv, {**os.environ, "TMPDIR": str(tmpdir)})
    try:
        assert d.readline() == "ok"
        answer = d.ask("open")
        assert answer is not None
        scratch = answer.split()[1]
        assert os.path.isdir(scratch)
        rc, err = d.finish()
    finally:
        d.kill()
    assert rc == 12
    assert "nestbed-virt-null: failure: end of file - caller quit?" in err
    assert not os.path.exists(scratch)
    assert list(tmpdir.iterdir()) == []


# ---- words -------------------------------------------------------------------------------


def test_quote_word_like_urllib() -> None:
    assert quote_word("/a b/100%/ü") == "/a%20b/100%25/%C3%BC"
    assert unquote_word("/a%20b/100%25/%C3%BC") == "/a b/100%/ü"
    assert parse_line("copydown /a%20b /c%25d\n") == ["copydown", "/a b", "/c%d"]


def test_exec_prefix_word() -> None:
    argv = ["ssh", "-o", "Opt=a,b", "host name"]
    word = format_exec_prefix(argv)
    assert word == "ssh,-o,Opt%3Da%2Cb,host%20name"
    assert parse_exec_prefix(word) == argv


def test_undecodable_file_names_round_trip() -> None:
    name = os.fsdecode(b"/tmp/\xff\xfe")
    assert quote_word(name) == "/tmp/%FF%FE"
    assert unquote_word(quote_word(name)) == name


@given(st.text())
def test_quote_round_trip(s: str) -> None:
    q = quote_word(s)
    assert q.split() == [q] or q == ""  # one word on the line, whatever s holds
    assert unquote_word(q) == s
    if not any("\ud800" <= ch <= "\udfff" for ch in s):
        assert q == quote(s)  # byte-identical to what autopkgtest sends
