"""The one command that asks a testbed its facts (run/probe.py), run by this machine's sh:
each answer as the command gives it, a failing answer with its status, none when the
command before them fails."""

from __future__ import annotations

import subprocess

from nestbed.run import probe


def _sh(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)


def test_each_answer_is_the_commands_own() -> None:
    answers = probe.parse(_sh(probe.script("true")).stdout)
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True)
    assert answers["arch"] == probe.Answer(arch.stdout, 0)
    kernel = subprocess.run(["uname", "-srv"], capture_output=True, text=True).stdout
    assert answers["kernel"].output == kernel
    assert answers["packages"].output.startswith(
        subprocess.run(
            ["dpkg-query", "--show", "-f", "${Package}\t${Version}\n"],
            capture_output=True, text=True,
        ).stdout.split("\n", 1)[0]
    )  # fmt: skip
    assert answers["cpu"].output.split("\n", 1)[0].isdigit()


def test_a_failing_answer_keeps_its_status_and_the_others() -> None:
    script = probe.script().replace(
        dict(probe.QUESTIONS)["kernel"], "printf half; exit_with() { return 3; }; exit_with"
    )
    answers = probe.parse(_sh(script).stdout)
    assert answers["kernel"] == probe.Answer("half\n", 3)
    assert answers["arch"].status == 0 and answers["cpu"].status == 0


def test_a_failing_first_command_asks_nothing() -> None:
    res = _sh(probe.script("echo no >&2; exit 4"))
    assert res.returncode == 4 and probe.parse(res.stdout) == {}


def test_skipped_questions_are_not_asked() -> None:
    answers = probe.parse(_sh(probe.script(skip=frozenset({"packages"}))).stdout)
    assert set(answers) == {"arch", "kernel", "cpu"}
