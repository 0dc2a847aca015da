"""What the runner asks a freshly opened testbed, in one command (`script`, `parse`): its
dpkg architecture, installed packages, kernel, CPU count and CPU. Each question used to be
a command of its own, and every command costs a round trip (0.15-0.3 s in an emulated VM).

The script prints each answer after a marker line and its exit status after the answer, so
one answer failing neither hides the others nor is taken for one of them."""

from __future__ import annotations

from dataclasses import dataclass

MARK = "@@nestbed-fact@@"

# the installed packages as the output dir's testbed-packages and TEST-packages list them
PACKAGES = "command -v dpkg-query >/dev/null && dpkg-query --show -f '${Package}\\t${Version}\\n'"
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("arch", "dpkg --print-architecture"),
    ("packages", PACKAGES),
    # uname -srv from the shell's builtins where /proc has it (a process costs ~50 ms)
    (
        "kernel",
        "{ read -r s </proc/sys/kernel/ostype && read -r r </proc/sys/kernel/osrelease &&"
        ' read -r v </proc/sys/kernel/version && echo "$s $r $v"; } 2>/dev/null || uname -srv',
    ),
    ("cpu", "nproc; cat /proc/cpuinfo 2>/dev/null || true"),
)


@dataclass(frozen=True)
class Answer:
    output: str
    status: int


def script(first: str = "", *, skip: frozenset[str] = frozenset()) -> str:
    """The shell script (for `sh -c`) asking the questions not in `skip`; `first` runs
    before them, and when it fails the script exits with its status and asks nothing."""
    parts = [f"{{ {first}\n}} || exit $?"] if first else []
    for name, command in QUESTIONS:
        if name in skip:
            continue
        # the status line starts on a line of its own even after output without a newline
        parts.append(f"echo {MARK}{name}; {{ {command}\n}}; s=$?; echo; echo {MARK}status $s")
    return "\n".join(parts) + "\n"


def parse(stdout: str) -> dict[str, Answer]:
    """The answers in the script's output, by name; a name missing is a question the
    script never reached."""
    answers: dict[str, Answer] = {}
    name: str | None = None
    lines: list[str] = []
    for line in stdout.split("\n"):
        if line.startswith(MARK + "status ") and name is not None:
            try:
                status = int(line.removeprefix(MARK + "status "))
            except ValueError:
                status = -1
            answers[name] = Answer(_strip_echoed_newline(lines), status)
            name, lines = None, []
        elif line.startswith(MARK):
            name, lines = line.removeprefix(MARK), []
        elif name is not None:
            lines.append(line)
    return answers


def _strip_echoed_newline(lines: list[str]) -> str:
    """The answer as the command printed it: the script's own `echo` before the status line
    adds one line break (an empty last line when the answer ended with a newline)."""
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return "\n".join(lines) + ("\n" if lines else "")
