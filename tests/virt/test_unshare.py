"""nestbed-virt-unshare: the protocol, the container, and whole runs compared with `null`.

Every test here needs the root tarball: built once per run (about a minute, from the
machine's Debian mirror) into $NESTBED_CACHE_DIR — or the user's cache — and reused, by
this file's session fixture and by the server itself, which finds the same file.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from nestbed.container.container import INIT
from nestbed.container.tarball import (
    ensure_tarball,
    host_arch,
    host_release,
    mmdebstrap_argv,
    tarball_name,
)
from nestbed.image import ImagePaths
from nestbed.image.errors import ImageError
from nestbed.image.mirror import image_sources
from nestbed.image.progress import PlainProgress
from tests_support import nestbed_argv, write_package

FIXTURES = Path(__file__).parent.parent / "fixtures" / "packages"
RESULT = re.compile(r"^\S+\s+(PASS|FAIL|SKIP|FLAKY)\b")


def _can_run() -> str | None:
    missing = [p for p in ("unshare", "nsenter", "mmdebstrap") if shutil.which(p) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    if os.geteuid() != 0:
        user = os.environ.get("USER", "")
        for path in ("/etc/subuid", "/etc/subgid"):
            try:
                text = Path(path).read_text()
            except OSError:
                return f"not root and no {path}"
            if not re.search(rf"^({re.escape(user)}|{os.getuid()}):", text, re.M):
                return f"not root and no range in {path}"
    return None


@pytest.fixture(scope="session")
def tarball() -> Path:
    why = _can_run()
    if why:
        pytest.skip(why)
    return ensure_tarball(host_release(), host_arch(), None, progress=PlainProgress())


def server_argv() -> list[str]:
    beside = Path(sys.executable).parent / "nestbed-virt-unshare"
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-m", "nestbed.virt.unshare"]


def container_pids() -> list[int]:
    """Processes of any unshare container: its PID 1 runs our init.py."""
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if str(INIT).encode() in args:
            found.append(int(path.split("/")[2]))
    return found


def processes_matching(needle: str) -> list[int]:
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                text = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if needle in text and "pytest" not in text:
            found.append(int(path.split("/")[2]))
    return found


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}")]
    return alive


# ---- the server over the protocol --------------------------------------------------------


class Server:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*server_argv(), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.readline() == "ok"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.readline()

    def prefix(self) -> list[str]:
        words = self.ask("print-execute-command").split()
        assert words[0] == "ok"
        return [unquote(w) for w in words[1].split(",")]

    def run(self, script: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(), "sh", "-c", script],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def quit(self) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        rc = self.proc.wait(60)
        return rc, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tarball: Path) -> Iterator[Server]:
    s = Server("--tarball", str(tarball))
    yield s
    s.kill()


@pytest.mark.network
def test_capabilities(server: Server) -> None:
    caps = server.ask("capabilities").split()
    assert caps[0] == "ok"
    for cap in (
        "revert",
        "revert-full-system",
        "root-on-testbed",
        "suggested-normal-user=unshare",
    ):
        assert cap in caps
    # PID 1 is no init system: a test starting a service would fail, so not claimed
    assert "isolation-container" not in caps and "isolation-machine" not in caps


@pytest.mark.network
def test_exec_keeps_streams_and_status(server: Server) -> None:
    scratch = server.ask("open").split()
    assert scratch[0] == "ok" and scratch[1].startswith("/tmp/")
    r = server.run("cat; echo err >&2; exit 7", stdin="in\n")
    assert (r.returncode, r.stdout, r.stderr) == (7, "in\n", "err\n")
    r = server.run("kill -TERM $$")
    assert r.returncode == -signal.SIGTERM
    r = server.run(f"test -d {scratch[1]} && stat -c %a {scratch[1]}")
    assert r.stdout.strip() == "1777"


@pytest.mark.network
def test_container_view(server: Server) -> None:
    assert server.ask("open").startswith("ok ")
    r = server.run(
        "id -u; cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /dev | tr '\\n' ' '; echo; "
        "stat -f -c %T /tmp; getent passwd unshare | cut -d: -f6; test -d /home/unshare; "
        "env | sort | tr '\\n' ' '"
    )
    assert r.returncode == 0, r.stderr
    uid, init, dev, tmpfs, home, env = r.stdout.splitlines()
    assert uid == "0"
    assert "init.py" in init  # PID 1 of its own PID namespace is ours
    assert set(dev.split()) >= {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm"}
    assert tmpfs == "tmpfs"
    assert home == "/home/unshare"
    assert "PATH=" in env and "HOME=" not in env  # a clean environment
    # the host's file systems are not reachable: nothing of the host's /work or cache
    assert server.run(f"test -e {INIT}").returncode != 0


@pytest.mark.network
def test_test_cannot_kill_pid_1(server: Server) -> None:
    assert server.ask("open").startswith("ok ")
    r = server.run("kill -TERM 1; kill -HUP 1; kill -INT 1; sleep 0.3; echo alive")
    assert r.stdout == "alive\n"
    assert server.run("true").returncode == 0


@pytest.mark.network
def test_revert_discards_writes_and_processes(server: Server) -> None:
    scratch = server.ask("open").split()[1]
    r = server.run("echo x > /usr/nestbed-mark; sleep 3131 >/dev/null 2>&1 & echo started")
    assert r.stdout.strip() == "started"
    assert processes_matching("sleep 3131")
    assert server.ask("revert") == f"ok {scratch}"
    assert not wait_gone(processes_matching("sleep 3131"))
    r = server.run(f"test -e /usr/nestbed-mark || echo gone; test -d {scratch} && echo scratch")
    assert r.stdout.split() == ["gone", "scratch"]
    assert not os.path.exists("/usr/nestbed-mark")


@pytest.mark.network
@pytest.mark.parametrize("how", ["close", "sigterm", "sigkill"])
def test_no_processes_left(tarball: Path, how: str) -> None:
    s = Server("--tarball", str(tarball))
    try:
        assert s.ask("open").startswith("ok ")
        s.run("sleep 3132 >/dev/null 2>&1 &")
        assert processes_matching("sleep 3132")
        if how == "close":
            assert s.ask("close") == "ok"
            rc, err = s.quit()
            assert rc == 0, err
        else:
            os.kill(s.proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
            s.proc.wait(60)
        assert not wait_gone(processes_matching("sleep 3132"))
        assert not wait_gone(container_pids())
    finally:
        s.kill()


@pytest.mark.network
def test_unpack_mode_removes_its_tree(tarball: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [*server_argv(), "--tarball", str(tarball), "--unpack"],
        input="open\nrevert\nprint-execute-command\nclose\nquit\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.splitlines()
    assert answers[0] == "ok" and answers[1].startswith("ok /tmp/")
    assert answers[2] == answers[1]  # revert keeps the scratch path
    assert "nsenter" in answers[3]
    assert os.listdir(tmp_path) == []


def test_bad_tarball_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*server_argv(), "--tarball", str(tmp_path / "nope.tar")],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"nestbed-virt-unshare: tarball {tmp_path / 'nope.tar'} does not exist"
    ]


@pytest.mark.network
def test_not_a_tarball_fails_open_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_text("not a tarball\n")
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [*server_argv(), "--tarball", str(bad)],
        input="open\n",
        capture_output=True,
        text=True,
        env={**os.environ, "NESTBED_CACHE_DIR": str(cache)},
        timeout=60,
    )
    assert proc.returncode == 12
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nestbed-virt-unshare: failure: cannot unpack")
    # nothing half-unpacked is kept
    assert not [p for p in (cache / "tarballs" / "rootfs").iterdir() if p.name[0] != "."]


def test_tarball_recipe() -> None:
    sources = image_sources("bookworm", "http://mirror.invalid/debian")
    argv = mmdebstrap_argv("bookworm", "amd64", sources, Path("/x/out.tar"))
    assert "--variant=minbase" in argv and "--skip=cleanup/apt/lists" in argv
    assert argv[-2:] == [
        "deb http://mirror.invalid/debian bookworm main",
        "deb-src http://mirror.invalid/debian bookworm main",
    ]
    name = tarball_name("bookworm", "amd64", sources)
    assert re.fullmatch(r"bookworm-amd64-minbase-[0-9a-f]{12}\.tar", name)
    other = image_sources("bookworm", "http://other.invalid/debian")
    assert tarball_name("bookworm", "amd64", other) != name


@pytest.mark.network
def test_failed_tarball_build_leaves_nothing(tarball: Path, tmp_path: Path) -> None:
    """A release the mirror does not have: one line from mmdebstrap, no staging dir left."""
    mirror = image_sources(host_release(), None)[0].uri
    with pytest.raises(ImageError, match=r"^mmdebstrap failed: E: .*nosuchrelease"):
        ensure_tarball(
            "nosuchrelease", host_arch(), mirror, root=tmp_path, progress=PlainProgress()
        )
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


# ---- whole runs ----------------------------------------------------------------------------


def run_nestbed(*args: str, timeout: float = 300) -> tuple[int, list[str], str]:
    proc = subprocess.run([*nestbed_argv(), *args], capture_output=True, text=True, timeout=timeout)
    results = [line for line in proc.stdout.splitlines() if RESULT.match(line)]
    return proc.returncode, results, proc.stderr


@pytest.mark.network
@pytest.mark.parametrize(
    ("fixture", "options"),
    [
        ("mixed", []),
        ("timeout", ["--timeout-test=3"]),
        ("environment", ["--env", "FOO=bar"]),
        ("unsatisfiable", []),
    ],
)
def test_fixture_verdicts_match_null(tarball: Path, fixture: str, options: list[str]) -> None:
    tree = f"{FIXTURES / fixture}/"
    null = run_nestbed("-B", *options, tree, "--", "null")
    unshare = run_nestbed("-B", *options, tree, "--", "unshare")
    assert null[1], "no result lines at all"
    # the one deliberate difference: a breaks-testbed test is skipped on null (it cannot
    # revert) and runs in the container, where this one fails as it is written to
    capability_skip = 'breaks-testbed       SKIP Test restriction "breaks-testbed" requires'
    null_results = [line for line in null[1] if not line.startswith(capability_skip)]
    if len(null_results) != len(null[1]):
        assert "breaks-testbed       FAIL non-zero exit status 1" in unshare[1]
        null_results.append("breaks-testbed       FAIL non-zero exit status 1")
    assert (unshare[0], sorted(unshare[1])) == (null[0], sorted(null_results)), unshare[2][-3000:]


@pytest.mark.network
def test_installing_and_writing_usr_leaves_host_untouched(tarball: Path, tmp_path: Path) -> None:
    canary = "/usr/share/nestbed-unshare-canary"
    assert not os.path.exists(canary)

    def hello_state() -> str:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "hello"],
                           capture_output=True, text=True)  # fmt: skip
        return f"{r.returncode} {r.stdout}"

    before = hello_state()
    tree = write_package(
        tmp_path / "pkg",
        {"writes-usr": f"#!/bin/sh\nset -e\necho x > {canary}\nhello\ndpkg -s hello >/dev/null\n"},
        "Tests: writes-usr\nDepends: hello\nRestrictions: needs-root\n",
    )
    rc, results, err = run_nestbed("-B", str(tree), "--", "unshare")
    assert (rc, results) == (0, ["writes-usr           PASS"]), err[-3000:]
    assert not os.path.exists(canary)
    assert hello_state() == before


@pytest.mark.network
def test_needs_baseimage_is_skipped_with_the_reason(tarball: Path, tmp_path: Path) -> None:
    """A container told not to export a base image: SKIP and exit 2 (8 when nothing else
    ran, as for any all-skipped package), never a pass."""
    tree = write_package(
        tmp_path / "pkg",
        {"nested": "#!/bin/sh\necho ran\n", "plain": "#!/bin/sh\necho ran\n"},
        "Tests: nested\nDepends:\nRestrictions: needs-baseimage, needs-root\n\n"
        "Tests: plain\nDepends:\n",
    )
    rc, results, err = run_nestbed(
        "-B", str(tree), "--", "unshare", "--tarball", str(tarball), "--no-baseimage"
    )
    assert rc == 2, err[-3000:]
    skip = 'nested               SKIP Test restriction "needs-baseimage" requires'
    assert results[0].startswith(skip), results
    assert results[-1] == "plain                PASS", results


@pytest.mark.network
def test_breaks_testbed_is_reverted(tarball: Path, tmp_path: Path) -> None:
    mark = "/usr/share/nestbed-revert-mark"
    tree = write_package(
        tmp_path / "pkg",
        {
            "breaker": f"#!/bin/sh\necho x > {mark}\n",
            "checker": f"#!/bin/sh\nif [ -e {mark} ]; then echo still there >&2; exit 1; fi\n",
        },
        "Tests: breaker\nDepends:\nRestrictions: breaks-testbed, needs-root\n\n"
        "Tests: checker\nDepends:\nRestrictions: needs-root\n",
    )
    rc, results, err = run_nestbed("-B", str(tree), "--", "unshare")
    assert (rc, results) == (0, ["breaker              PASS", "checker              PASS"]), err
    # and without revert the mark would have been seen: the same run on one container
    assert not os.path.exists(mark)


@pytest.mark.network
@pytest.mark.parametrize(
    ("signum", "jobs"), [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGINT, 3)]
)
def test_runner_signal_leaves_nothing(
    tarball: Path, tmp_path: Path, signum: int, jobs: int
) -> None:
    """A signal to the runner while its tests run (with -j 3: three at once, in three
    containers) leaves no test's process, container or temporary file behind."""
    sleeper = "#!/bin/sh\n(sleep 3133 >/dev/null 2>&1 &)\nexec sleep 3134\n"
    names = [f"sleeper{i}" for i in range(jobs)]
    tree = write_package(
        tmp_path / "pkg", dict.fromkeys(names, sleeper), f"Tests: {' '.join(names)}\nDepends:\n"
    )
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    runner = subprocess.Popen(
        [*nestbed_argv(), "-j", str(jobs), "-B", str(tree), "--", "unshare"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    try:
        deadline = time.monotonic() + 120
        while len(processes_matching("sleep 3134")) < jobs:
            assert runner.poll() is None, runner.communicate()
            assert time.monotonic() < deadline, "the tests never ran (at once)"
            time.sleep(0.1)
        assert processes_matching("sleep 3133")
        runner.send_signal(signum)
        runner.communicate(timeout=90)
        assert runner.returncode == -signum  # it dies of the signal, as autopkgtest
        assert not wait_gone(processes_matching("sleep 313"))
        assert not wait_gone(container_pids())
        assert os.listdir(tmpdir) == []
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


@pytest.mark.network
def test_userns_mode_maps_ids_and_installs(tarball: Path, tmp_path: Path) -> None:
    """--userns (always so when not root): ids mapped through /etc/subuid, apt still works."""
    if os.geteuid() == 0 and not re.search(r"^root:", Path("/etc/subuid").read_text(), re.M):
        pytest.skip("no range for root in /etc/subuid")
    s = Server("--tarball", str(tarball), "--userns")
    try:
        assert s.ask("open").startswith("ok ")
        r = s.run("cat /proc/self/uid_map; id -u")
        rows = [line.split() for line in r.stdout.splitlines()]
        assert rows[0] == ["0", str(os.geteuid()), "1"]
        assert rows[1][0] == "1" and rows[1][1] != "1"  # the rest comes from subuid
        assert rows[-1] == ["0"]
        r = s.run("apt-get install -q -y --no-install-recommends hello >/dev/null && hello")
        assert (r.returncode, r.stdout) == (0, "Hello, world!\n"), r.stderr
        assert s.ask("close") == "ok"
    finally:
        s.kill()
    assert not wait_gone(container_pids())


@pytest.mark.network
def test_overlay_failure_falls_back_to_unpack(tarball: Path, tmp_path: Path) -> None:
    """A cache path overlayfs cannot take as lowerdir (a comma in it): the server says so
    once and unpacks into a temp dir instead, which it removes on close."""
    cache = tmp_path / "cache,odd"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "NESTBED_CACHE_DIR": str(cache), "TMPDIR": str(tmpdir)}
    proc = subprocess.run(
        [*server_argv(), "--tarball", str(tarball)],
        input="open\nrevert\nclose\nquit\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert next(line for line in proc.stdout.splitlines() if line != "ok").startswith("ok /tmp/")
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 1 and "unpacking instead" in warnings[0], warnings
    assert os.listdir(tmpdir) == []


@pytest.mark.network
@pytest.mark.autopkgtest
def test_autopkgtest_runner_drives_our_server(tarball: Path) -> None:
    """autopkgtest 5.28's own runner with nestbed-virt-unshare: the verdicts nestbed gives."""
    autopkgtest = shutil.which("autopkgtest")
    if autopkgtest is None or len(server_argv()) != 1:
        pytest.skip("needs autopkgtest and an installed nestbed-virt-unshare")
    tree = f"{FIXTURES / 'mixed'}/"
    theirs = subprocess.run(
        [autopkgtest, "-B", tree, "--", server_argv()[0]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    ours = run_nestbed("-B", tree, "--", "unshare")
    results = [line for line in theirs.stdout.splitlines() if RESULT.match(line)]
    assert (theirs.returncode, results) == ours[:2], theirs.stderr[-3000:]


@pytest.mark.network
def test_needs_sudo_gets_a_normal_user_who_may_sudo(tarball: Path, tmp_path: Path) -> None:
    """A testbed that can revert lets nestbed grant sudo (as autopkgtest does); null cannot."""
    tree = write_package(
        tmp_path / "pkg",
        {"sudoer": "#!/bin/sh\nset -e\nid -un\nsudo -n id -un\n"},
        "Tests: sudoer\nDepends:\nRestrictions: needs-sudo\n",
    )
    code, results, err = run_nestbed("-B", str(tree), "--", "unshare")
    assert (code, results) == (0, ["sudoer               PASS"]), err[-3000:]
    code, results, err = run_nestbed("-B", str(tree), "--", "null")
    why = "Cannot enable needs-sudo restriction: no ordinary user available"
    assert (code, results) == (8, [f"sudoer               SKIP {why}"]), err[-3000:]


@pytest.mark.network
@pytest.mark.autopkgtest
def test_source_by_name_with_apt_upgrade_agrees_with_autopkgtest(tarball: Path) -> None:
    """`-U hello -- unshare`: apt-get source in the container, archive binaries, no build."""
    expected = ["command1             PASS", "upstream-tests       PASS"]
    code, results, err = run_nestbed("-U", "hello", "--", "unshare", "--tarball", str(tarball))
    assert (code, results) == (0, expected), err[-3000:]
    ref = subprocess.run(
        ["autopkgtest", "-U", "hello", "--", "unshare", "--tarball", str(tarball)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    ref_results = [line for line in ref.stdout.splitlines() if RESULT.match(line)]
    assert (ref.returncode, ref_results) == (0, expected), ref.stderr[-3000:]


_SETUP_PROBE = (
    '#!/bin/sh\nset -e\nuser=$(cat /run/autopkgtest-normal-user)\nid -nG "$user"\n'
    "grep -rh NOPASSWD /etc/sudoers.d/\n"
)


@pytest.mark.parametrize("by", ["name", "our-path"])
def test_shipped_setup_commands(tarball: Path, tmp_path: Path, by: str) -> None:
    """`--setup-commands create-normal-user --setup-commands enable-sudo`: by name, the
    shipped scripts (autopkgtest's where it is installed, else nestbed's); by path, nestbed's
    own copies, which must do the same. The container takes the changes, not this host."""
    from nestbed.run.setup import OUR_SETUP_COMMANDS

    tree = write_package(
        tmp_path / "pkg",
        {"probe": _SETUP_PROBE},
        "Tests: probe\nDepends:\nRestrictions: needs-root\n",
    )
    names = ["create-normal-user", "enable-sudo"]
    if by == "our-path":
        names = [os.path.join(OUR_SETUP_COMMANDS, n) for n in names]
    setup = [arg for name in names for arg in ("--setup-commands", name)]
    proc = subprocess.run(
        [*nestbed_argv(), "-B", *setup, str(tree), "--", "unshare"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    results = [line for line in proc.stdout.splitlines() if RESULT.match(line)]
    assert (proc.returncode, results) == (0, ["probe                PASS"]), proc.stderr[-3000:]
    # the new user "test" with a group of its own (adduser adds "users" too); the container
    # suggests no normal user, so enable-sudo adds nobody to group sudo, but lets that group
    # sudo without a password
    groups, rule = proc.stdout.splitlines()[:2]
    assert (groups.split()[0], "sudo" in groups.split()) == ("test", False), proc.stdout
    assert rule == "%sudo ALL=(ALL:ALL) NOPASSWD: ALL", proc.stdout


# ---- autopkgtest-virt-unshare's options: -b, -p, -u, the sbuild tarball -------------------


def protocol(args: list[str], commands: str, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [*server_argv(), *args],
        input=commands,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.network
def test_bind_mounts_host_directories(tarball: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "in").write_text("from the host\n")
    # /var/run is a symlink to /run in the tree: INSIDE resolves in the container, and
    # nothing appears in the host's /run
    s = Server("--tarball", str(tarball), "-b", str(outside), "/srv/in",
               "--bind", str(outside), "/var/run/nestbed-bind")  # fmt: skip
    try:
        assert s.ask("open").startswith("ok ")
        r = s.run("cat /srv/in/in /run/nestbed-bind/in; echo written > /srv/in/out")
        assert (r.returncode, r.stdout) == (0, "from the host\nfrom the host\n"), r.stderr
        assert (outside / "out").read_text() == "written\n"
        assert not os.path.exists("/run/nestbed-bind")
        assert s.ask("revert").startswith("ok ")  # a fresh container binds it again
        assert s.run("cat /srv/in/out").stdout == "written\n"
        assert s.ask("close") == "ok"
        assert s.quit()[0] == 0
    finally:
        s.kill()
    assert sorted(os.listdir(outside)) == ["in", "out"]


@pytest.mark.parametrize(
    ("bind", "why"),
    [
        (["/nonexistent-nestbed", "/srv"], "/nonexistent-nestbed is not a directory"),
        (["/tmp", "srv"], "srv must be an absolute path in the container"),
    ],
)
def test_bad_bind_is_one_line(tmp_path: Path, bind: list[str], why: str) -> None:
    fake = tmp_path / "t.tar"
    fake.write_text("")
    proc = protocol(["--tarball", str(fake), "--bind", *bind], "")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"nestbed-virt-unshare: --bind {' '.join(bind)}: {why}"
    ]


@pytest.mark.network
def test_unpack_dir_holds_the_tree_and_goes_on_close(tarball: Path, tmp_path: Path) -> None:
    where = tmp_path / "root"
    s = Server("--tarball", str(tarball), "-u", str(where))
    try:
        assert s.ask("open").startswith("ok ")
        s.run("echo mark > /etc/nestbed-mark")
        assert (where / "etc" / "nestbed-mark").read_text() == "mark\n"  # the tree itself
        assert s.ask("revert").startswith("ok ")
        assert (where / "etc" / "os-release").exists()
        assert not (where / "etc" / "nestbed-mark").exists()  # unpacked afresh
        assert s.ask("close") == "ok"
        assert s.quit()[0] == 0
    finally:
        s.kill()
    assert not where.exists()
    # an existing directory is never used (nor removed): the user's files stay
    where.mkdir()
    (where / "keep").write_text("")
    proc = protocol(["--tarball", str(tarball), "--unpack-dir", str(where)], "")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"nestbed-virt-unshare: --unpack-dir {where}: already exists"
    assert os.listdir(where) == ["keep"]


@pytest.mark.network
def test_prefix_names_the_unpack_directory(tarball: Path, tmp_path: Path) -> None:
    prefix = f"{tmp_path}/mine-"
    s = Server("--tarball", str(tarball), "--prefix", prefix)
    try:
        assert s.ask("open").startswith("ok ")
        made = glob.glob(prefix + "*")
        assert len(made) == 1 and os.path.exists(f"{made[0]}/etc/os-release")
        s.ask("close")
        s.quit()
    finally:
        s.kill()
    assert os.listdir(tmp_path) == []


@pytest.mark.network
def test_sbuild_tarball_is_used_before_building(tarball: Path, tmp_path: Path) -> None:
    """Without --tarball: autopkgtest's and sbuild's ~/.cache/sbuild/RELEASE-ARCH.tar*."""
    sbuild = tmp_path / "sbuild"
    sbuild.mkdir()
    name = f"{host_release()}-{host_arch()}.tar"
    (sbuild / name).symlink_to(tarball)
    proc = protocol(["-d"], "open\nclose\nquit\n", {"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert f"using sbuild's tarball {sbuild / name}" in proc.stderr
    assert "mmdebstrap" not in proc.stderr
    # the one found is the one used: a broken one fails open, naming it
    (sbuild / name).unlink()
    (sbuild / (name + ".zst")).write_text("not a tarball\n")
    proc = protocol([], "open\n", {"XDG_CACHE_HOME": str(tmp_path),
                                    "NESTBED_CACHE_DIR": str(tmp_path / "cache")})  # fmt: skip
    assert proc.returncode == 12
    assert f"cannot unpack {sbuild / (name + '.zst')}" in proc.stderr.strip()


def test_sbuild_tarball_lookup(tmp_path: Path) -> None:
    from nestbed.virt.unshare import sbuild_tarball

    home = {"HOME": str(tmp_path)}
    assert sbuild_tarball("bookworm", "amd64", home) is None
    (tmp_path / ".cache" / "sbuild").mkdir(parents=True)
    for n in ("bookworm-arm64.tar", "trixie-amd64.tar", "bookworm-amd64.tar.zst",
              "bookworm-amd64.tar.gz"):  # fmt: skip
        (tmp_path / ".cache" / "sbuild" / n).write_text("")
    found = tmp_path / ".cache" / "sbuild" / "bookworm-amd64.tar.gz"
    assert sbuild_tarball("bookworm", "amd64", home) == found  # the first in name order
    xdg = tmp_path / "xdg"
    (xdg / "sbuild").mkdir(parents=True)
    assert sbuild_tarball("bookworm", "amd64", {**home, "XDG_CACHE_HOME": str(xdg)}) is None


@pytest.mark.network
@pytest.mark.autopkgtest
def test_service_test_skipped_as_autopkgtest_skips_it(tarball: Path, tmp_path: Path) -> None:
    """isolation-container is not claimed (no init system runs in the container): a test
    that needs it is skipped, with the result lines and exit code of autopkgtest's unshare."""
    if shutil.which("autopkgtest") is None:
        pytest.skip("needs autopkgtest")
    tree = write_package(
        tmp_path / "pkg",
        {
            "service": "#!/bin/sh\nset -e\nsystemctl start nestbed-none.service\n",
            "plain": "#!/bin/sh\necho ran\n",
        },
        "Tests: service\nDepends:\nRestrictions: isolation-container, needs-root\n\n"
        "Tests: plain\nDepends:\n",
    )
    ours = run_nestbed("-B", f"{tree}/", "--", "unshare", "--tarball", str(tarball))
    ref = subprocess.run(
        ["autopkgtest", "-B", f"{tree}/", "--", "unshare", "--tarball", str(tarball)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    ref_results = [line for line in ref.stdout.splitlines() if RESULT.match(line)]
    assert ours[1][0].startswith('service              SKIP Test restriction "isolation-'), ours
    assert (ours[0], ours[1]) == (ref.returncode, ref_results), ref.stderr[-3000:]


# Runs in the container: the exported image is read-only where a QEMU testbed puts it, and
# nestbed-vm (from the image's own root tree) boots it as a VM of the host's accelerator.
LEVEL2_FROM_CONTAINER = r"""#!/bin/sh
set -eu
[ "$AUTOPKGTEST_BASEIMAGE" = /lib/autopkgtest/baseimage ]
[ "$(readlink /lib/autopkgtest/baseimage)" = /dev/baseimage ]
if dd if=/dev/zero of=/dev/baseimage bs=512 count=1 conv=notrunc 2>/dev/null; then
    echo "the base image is writable" >&2; exit 1
fi
echo "nested-kvm: $AUTOPKGTEST_NESTED_KVM"
image_kernel=$(sed -n 's/.*"kernel_version": "\(.*\)".*/\1/p' /etc/nestbed/image.json)
level2=$(nestbed-vm -- sh -c 'uname -r; cat /proc/sys/kernel/random/boot_id')
echo "level 2: $level2"
[ "$(echo "$level2" | head -n1)" = "$image_kernel" ]
[ "$(echo "$level2" | tail -n1)" != "$(cat /proc/sys/kernel/random/boot_id)" ]
"""


@pytest.mark.vm
@pytest.mark.network
def test_needs_baseimage_boots_level2_from_the_container(
    nested_image: ImagePaths, tmp_path: Path
) -> None:
    """needs-baseimage on unshare: the --nested image's disk at the QEMU testbed's paths,
    read-only; the container runs on that image's own tree, so nestbed-vm is there and boots
    a level-2 VM (here TCG at level 0, not KVM inside TCG); the disk is unchanged."""
    disk_before = _sha256(nested_image.disk)
    tree = write_package(
        tmp_path / "pkg",
        {"level2": LEVEL2_FROM_CONTAINER},
        "Tests: level2\nDepends:\nRestrictions: needs-baseimage, needs-root, allow-stderr\n",
    )
    out = tmp_path / "out"
    rc, results, _ = run_nestbed(
        "-B", str(tree), "--output-dir", str(out), "--", "unshare", timeout=900
    )
    log = (out / "log").read_text()
    assert (rc, results) == (0, ["level2               PASS"]), log[-4000:]
    assert "nested-kvm: 0" in log  # KVM is not usable here: not advertised, not bound
    assert "level 2: " in log
    assert _sha256(nested_image.disk) == disk_before
    assert not container_pids()
    assert not processes_matching("qemu-system")


@pytest.mark.network
def test_bad_baseimage_path_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*server_argv(), f"--baseimage={tmp_path}/missing"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"nestbed-virt-unshare: --baseimage={tmp_path}/missing: no such file"
    ), proc.stderr


def _sha256(path: Path) -> str:
    return subprocess.run(
        ["sha256sum", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()[0]


@pytest.mark.network
def test_parallel_run_gives_what_a_serial_run_gives(tarball: Path, tmp_path: Path) -> None:
    """-j 3 on containers: the same exit status, result lines, summary and per-test files
    as -j 1, in the same order; the breaker's change is seen by no other test."""
    runs = {}
    for jobs in ("1", "3"):
        out = tmp_path / f"out-{jobs}"
        runs[jobs] = run_nestbed(
            "-j", jobs, "-B", "--env", "SLEEP=2", "-o", str(out), f"{FIXTURES / 'parallel'}/",
            "--", "unshare",
        )  # fmt: skip
    assert runs["1"][:2] == runs["3"][:2], runs["3"][2][-3000:]
    assert runs["1"][0] == 4 and "clean-1              PASS" in runs["1"][1]
    one, three = tmp_path / "out-1", tmp_path / "out-3"
    assert sorted(os.listdir(one)) == sorted(os.listdir(three))
    for name in os.listdir(one):
        if name.endswith(("-stdout", "-stderr")) or name == "summary":
            assert (one / name).read_text() == (three / name).read_text(), name
    assert "(testbed 2)" in runs["3"][2]  # a second container did run tests
    assert not wait_gone(container_pids())
