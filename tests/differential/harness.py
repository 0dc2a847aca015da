"""Run autopkgtest and nestbed on the same source tree and compare what a user sees.

Both programs are run as `PROGRAM [options] -o OUTDIR --summary-file=SUMMARY TREE -- null`,
each with its own fresh OUTDIR and SUMMARY. `compare()` then lists every difference in:

* the exit code;
* the result lines on stdout (`NAME  PASS|FAIL|SKIP|FLAKY|BROKEN ...`, `blame: ...`,
  `badpkg: ...`); the rest of stdout is the tests' own output and apt's chatter, and
  the tests' output is compared through the per-test files instead;
* the summary file, byte for byte;
* the names of all files and directories in OUTDIR;
* the contents of every regular file in OUTDIR (per-test `*-stdout`, `*-stderr`,
  `*-packages`, `testpkg-version`, `artifacts/...`), byte for byte, except for:
  `log` (only its ERROR lines and whether it closes with the whole summary are
  compared, see `_log_digest`; in `ERROR: timed out on command "..."` the quoted
  internal script is not),
  `testinfo.json` (compared as JSON, with the virt server's program name normalised) and
  `testbed-packages` (a snapshot of the host's dpkg database, which earlier runs change).

Normalised before comparing, and nothing else: temporary paths (the testbed's copy of
the tree becomes `<TREE>`, other paths under the temp dir `<TMP>`), each run's own
OUTDIR and SUMMARY paths, and the `PROGRAM [HH:MM:SS]: ` prefix of log lines.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "packages"

# One run of either program may not take longer than this (seconds).
RUN_TIMEOUT = 1800

# Runs that fail because another process on the machine holds dpkg's lock are repeated.
DPKG_LOCKED = re.compile(rb"dpkg frontend lock was locked by another process|Could not get lock")
DPKG_LOCK_ATTEMPTS = 4
DPKG_LOCK_PAUSE = 15.0

RESULT_LINE = re.compile(
    r"^(?:\S+ +(?:PASS|FAIL|SKIP|FLAKY|BROKEN)(?: .*)?|blame: .*|badpkg: .*"
    r"|\* +Test specification is valid)$"  # -V
)
LOG_PREFIX = re.compile(r"(?:autopkgtest|nestbed) \[\d\d:\d\d:\d\d\]: ")
LOG_SUMMARY_MARK = "<PROG>: @@@@@@@@@@@@@@@@@@@@ summary"
TIMED_OUT_COMMAND = re.compile(r'timed out on command ".*" \(kind: (\w+)\)$', re.MULTILINE)
VIRT_PROGRAM = re.compile(r"^(?:autopkgtest|nestbed)-virt-")

# Files in OUTDIR whose contents are not compared byte for byte (see module docstring).
SPECIAL_FILES = frozenset({"log", "testinfo.json", "testbed-packages"})


class HarnessError(Exception):
    """The harness could not run a program at all."""


def fixture_tree(name: str) -> Path:
    tree = FIXTURES / name
    if not (tree / "debian" / "control").is_file():
        raise HarnessError(f"no fixture package {name!r} in {FIXTURES}")
    return tree


def host_arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], check=True, capture_output=True, text=True
    ).stdout.strip()


@dataclass(frozen=True)
class RunResult:
    """What one run of one program left behind."""

    program: str
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    summary: bytes | None  # --summary-file's (or OUTDIR/summary); None: not created
    workdir: Path
    outdir: Path
    # deliberate differences (see Case): (regex, replacement) applied to this run's
    # normalised text, and OUTDIR paths (prefixes) left out of the comparison
    rewrites: tuple[tuple[str, str], ...] = ()
    ignored_files: tuple[str, ...] = ()

    def result_lines(self) -> list[str]:
        """stdout lines that report a result, in order."""
        return [line for line in self.stdout.splitlines() if RESULT_LINE.match(line)]

    def files(self) -> list[str]:
        """Paths in OUTDIR relative to it, sorted; directories end with '/'."""
        if not self.outdir.is_dir():
            return []
        out = []
        for path in self.outdir.rglob("*"):
            rel = path.relative_to(self.outdir).as_posix()
            if rel.startswith(self.ignored_files) and self.ignored_files:
                continue
            out.append(rel + "/" if path.is_dir() and not path.is_symlink() else rel)
        return sorted(out)

    def read(self, rel: str) -> bytes:
        return (self.outdir / rel).read_bytes()

    def describe(self) -> str:
        """A short account for assertion messages."""
        tail = "\n".join(self.stderr.splitlines()[-15:])
        return (
            f"$ {' '.join(self.argv)}\n"
            f"exit code {self.exit_code}\n"
            f"--- stdout ---\n{self.stdout}"
            f"--- stderr (last lines) ---\n{tail}\n"
        )


def find_program(program: str) -> str | None:
    """The program beside the running Python (a virtualenv's bin/) first, then on PATH."""
    beside = Path(sys.executable).parent / program
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(program)


def run_program(
    program: str,
    tree: Path,
    options: Sequence[str],
    workdir: Path,
    timeout: float = RUN_TIMEOUT,
    *,
    summary_file: bool = True,
) -> RunResult:
    """Run `program [options] -o OUT --summary-file=SUMMARY tree -- null` in workdir.

    Without summary_file, --summary-file is not passed, and the summary is OUT/summary.
    """
    exe = find_program(program)
    if exe is None:
        raise HarnessError(f"{program} is not installed (not beside {sys.executable}, not on PATH)")
    workdir.mkdir(parents=True, exist_ok=True)
    outdir = workdir / "out"
    summary = workdir / "summary" if summary_file else outdir / "summary"
    if outdir.exists() or summary.exists():
        raise HarnessError(f"{workdir} was used by an earlier run")
    argv = (
        program,
        *options,
        "-o",
        str(outdir),
        *([f"--summary-file={summary}"] if summary_file else []),
        str(tree),
        "--",
        "null",
    )
    for attempt in range(1, DPKG_LOCK_ATTEMPTS + 1):
        try:
            proc = subprocess.run(
                [exe, *argv[1:]],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                cwd=workdir,
            )
        except subprocess.TimeoutExpired as e:
            raise HarnessError(f"{' '.join(argv)} did not finish within {timeout} s") from e
        locked = proc.returncode != 0 and DPKG_LOCKED.search(proc.stderr) is not None
        if attempt == DPKG_LOCK_ATTEMPTS or not locked:
            break
        # Something else on this machine held dpkg's lock (the run fails with "dpkg
        # frontend lock was locked by another process"): not what is under test; again.
        shutil.rmtree(outdir, ignore_errors=True)
        summary.unlink(missing_ok=True)
        time.sleep(DPKG_LOCK_PAUSE)
    return RunResult(
        program=program,
        argv=argv,
        exit_code=proc.returncode,
        stdout=proc.stdout.decode("utf-8", errors="replace"),
        stderr=proc.stderr.decode("utf-8", errors="replace"),
        summary=summary.read_bytes() if summary.exists() else None,
        workdir=workdir,
        outdir=outdir,
    )


def _temp_roots() -> list[str]:
    roots = {"/tmp", "/var/tmp", tempfile.gettempdir(), os.environ.get("TMPDIR", "/tmp")}
    return sorted((r.rstrip("/") for r in roots if r), key=len, reverse=True)


def normalise(text: str, run: RunResult) -> str:
    """Replace what must differ between two runs by placeholders."""
    text = text.replace(str(run.outdir), "<OUTDIR>")
    text = text.replace(str(run.workdir), "<WORKDIR>")
    roots = "|".join(re.escape(r) for r in _temp_roots())
    # a copy of the source tree in a temporary directory: keep the path inside the tree
    text = re.sub(rf"(?:{roots})/[^\s'\"`:]*?/(?=debian/)", "<TREE>/", text)
    text = re.sub(rf"(?:{roots})/[^\s'\"`:]+", "<TMP>", text)
    text = LOG_PREFIX.sub("<PROG>: ", text)
    for pattern, replacement in run.rewrites:
        text = re.sub(pattern, replacement, text)
    return text


def _diff(what: str, expected: Sequence[str], actual: Sequence[str], exp: str, act: str) -> str:
    lines = difflib.unified_diff(list(expected), list(actual), exp, act, lineterm="")
    return f"{what} differ:\n" + "\n".join(lines)


def _text_diff(what: str, expected: str, actual: str, exp: str, act: str) -> str:
    exp_lines, act_lines = expected.splitlines(), actual.splitlines()
    if exp_lines == act_lines:
        # differ only in line endings or the final newline
        return f"{what} differ:\n{exp}: {expected[-60:]!r}\n{act}: {actual[-60:]!r}"
    return _diff(what, exp_lines, act_lines, exp, act)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _log_digest(run: RunResult) -> list[str]:
    """What must agree in `log`: its ERROR lines, and how it ends.

    `log` is written by two tee processes, one for stdout and one for stderr, so the
    two streams interleave in it unpredictably, even mid-line (autopkgtest itself has
    been seen writing "smoke                PASSautopkgtest [06:04:22]: test smoke: ...",
    and a stdout result line landing after the closing summary marker). Each stderr
    write stays whole, though: ERROR lines are found wherever they are, and the
    closing summary (written to stderr in one go) must appear whole after the
    "@@@@ summary" marker.
    """
    path = run.outdir / "log"
    if not path.is_file():
        return ["no log"]
    text = normalise(_text(path.read_bytes()), run)
    # a timed-out command is quoted whole: that is the program's own internal script
    text = TIMED_OUT_COMMAND.sub(r"timed out on command <COMMAND> (kind: \1)", text)
    digest = re.findall(r"<PROG>: ERROR: [^\n]*", text)
    marker = text.rfind(LOG_SUMMARY_MARK + "\n")
    if marker < 0:
        digest.append("(no closing summary block)")
    else:
        digest.append(LOG_SUMMARY_MARK)
        summary = normalise(_text(run.summary or b""), run)
        if summary in text[marker:]:
            digest.append("followed by the whole summary file")
        else:
            digest.append("NOT followed by the whole summary file; it has:")
            digest.extend(text[marker:].splitlines()[1:])
    return digest


def _testinfo(run: RunResult) -> object:
    path = run.outdir / "testinfo.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"unreadable: {e}"
    if isinstance(info, dict) and isinstance(info.get("virt_server"), str):
        info["virt_server"] = VIRT_PROGRAM.sub("<PROG>-virt-", info["virt_server"])
    return info


def _dpkg_lines(run: RunResult, rel: str) -> set[str]:
    path = run.outdir / rel
    if not path.is_file():
        return set()
    return set(_text(path.read_bytes()).splitlines())


def compare(expected: RunResult, actual: RunResult, *, verdicts_only: bool = False) -> list[str]:
    """Every user-visible difference between two runs; empty when they agree.

    With verdicts_only, only the exit code and the stdout result lines are compared.
    """
    exp, act = expected.program, actual.program
    problems: list[str] = []
    if expected.exit_code != actual.exit_code:
        problems.append(f"exit code: {exp} {expected.exit_code}, {act} {actual.exit_code}")
    exp_results = [normalise(line, expected) for line in expected.result_lines()]
    act_results = [normalise(line, actual) for line in actual.result_lines()]
    if exp_results != act_results:
        problems.append(_diff("stdout result lines", exp_results, act_results, exp, act))
    if verdicts_only:
        return problems

    if (expected.summary is None) != (actual.summary is None):
        problems.append(
            f"summary file: {exp} {'wrote none' if expected.summary is None else 'wrote one'}, "
            f"{act} {'wrote none' if actual.summary is None else 'wrote one'}"
        )
    elif expected.summary is not None and actual.summary is not None:
        exp_sum = normalise(_text(expected.summary), expected)
        act_sum = normalise(_text(actual.summary), actual)
        if exp_sum != act_sum:
            problems.append(_text_diff("summary files", exp_sum, act_sum, exp, act))

    exp_files, act_files = expected.files(), actual.files()
    if exp_files != act_files:
        problems.append(_diff("files in the output directory", exp_files, act_files, exp, act))

    for rel in sorted(set(exp_files) & set(act_files)):
        if rel.endswith("/") or rel in SPECIAL_FILES:
            continue
        if rel.endswith("-packages"):
            # Packages installed while the first run ran are already there for the
            # second, so they cannot be new in the second run's list.
            exp_new = _dpkg_lines(expected, rel) - _dpkg_lines(actual, "testbed-packages")
            act_new = _dpkg_lines(actual, rel)
            if exp_new != act_new:
                problems.append(
                    _diff(f"{rel} contents", sorted(exp_new), sorted(act_new), exp, act)
                )
            continue
        exp_data = normalise(_text(expected.read(rel)), expected)
        act_data = normalise(_text(actual.read(rel)), actual)
        if exp_data != act_data:
            problems.append(_text_diff(f"{rel} contents", exp_data, act_data, exp, act))

    if "testinfo.json" in exp_files and "testinfo.json" in act_files:
        exp_info, act_info = _testinfo(expected), _testinfo(actual)
        if exp_info != act_info:
            problems.append(
                _diff(
                    "testinfo.json (virt server name normalised)",
                    json.dumps(exp_info, indent=2, sort_keys=True).splitlines(),
                    json.dumps(act_info, indent=2, sort_keys=True).splitlines(),
                    exp,
                    act,
                )
            )

    exp_log, act_log = _log_digest(expected), _log_digest(actual)
    if exp_log != act_log:
        problems.append(
            _diff("log (ERROR lines, closing summary block)", exp_log, act_log, exp, act)
        )
    return problems


class RunCache:
    """Runs one program once per (tree, options) and keeps the result for the session."""

    def __init__(self, program: str, basedir: Path) -> None:
        self.program = program
        self.basedir = basedir
        self._runs: dict[tuple[str, tuple[str, ...], bool], RunResult] = {}

    def get(self, tree: Path, options: Sequence[str], *, summary_file: bool = True) -> RunResult:
        key = (str(tree), tuple(options), summary_file)
        if key not in self._runs:
            workdir = self.basedir / f"run{len(self._runs)}"
            self._runs[key] = run_program(
                self.program, tree, options, workdir, summary_file=summary_file
            )
        return self._runs[key]
