"""Testbeds named as autopkgtest users name them: `-- NAME` is nestbed-virt-NAME, else
autopkgtest-virt-NAME; `-- autopkgtest-virt-NAME` is that program. Run with the servers
autopkgtest really ships that work here: null, chroot on an unpacked root tarball, ssh to an
sshd the test starts in a network namespace of its own, and schroot on the root tarball."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from differential.cases import MIXED_RUN_RESULTS
from tests_support import nestbed_argv

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "packages"
RESULT = re.compile(r"^\S+ +(?:PASS|FAIL|SKIP|FLAKY)\b.*$|^blame: .*|^badpkg: .*")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="null and chroot testbeds run tests as root (su, chroot)"
)


def _run(argv: list[str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _results(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if RESULT.match(line)]


@pytest.mark.parametrize("name", ["autopkgtest-virt-null", "nestbed-virt-null"])
def test_server_named_with_its_prefix(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _run(
        [*nestbed_argv(), "-B", "-o", str(out), "--test-name=command1",
         str(FIXTURES / "pass-basic"), "--", name]
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert _results(p.stdout) == ["command1             PASS"]
    # testinfo.json names the program that ran, as autopkgtest records it
    info = json.loads((out / "testinfo.json").read_text())
    assert info["virt_server"] == name


def test_unknown_name_is_a_usage_error() -> None:
    p = subprocess.run(
        [*nestbed_argv(), str(FIXTURES / "pass-basic"), "--", "no-such-bed"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 20
    assert p.stderr.strip().splitlines() == [
        "nestbed: error: unknown virt server 'no-such-bed': no nestbed-virt-no-such-bed nor"
        f" autopkgtest-virt-no-such-bed in {Path(nestbed_argv()[0]).parent} nor in PATH"
    ]


def _root_tarball() -> Path:
    """The unshare testbed's root tarball (Debian minbase of the host's release), built into
    the cache the first time."""
    if shutil.which("mmdebstrap") is None:
        pytest.skip("needs mmdebstrap for the root tarball")
    from nestbed.container.tarball import ensure_tarball, host_arch, host_release
    from nestbed.image.progress import PlainProgress

    return ensure_tarball(host_release(), host_arch(), None, progress=PlainProgress())


def _unpack_root(into: Path) -> Path:
    """A Debian root tree for autopkgtest-virt-chroot: the unshare testbed's tarball, unpacked."""
    if shutil.which("autopkgtest-virt-chroot") is None or shutil.which("autopkgtest") is None:
        pytest.skip("needs autopkgtest (scripts/setup installs it)")
    tarball = _root_tarball()
    into.mkdir()
    subprocess.run(["tar", "-C", str(into), "-xf", str(tarball)], check=True)
    return into


@pytest.fixture
def chroot_dir(tmp_path: Path) -> Iterator[Path]:
    root = _unpack_root(tmp_path / "chroot")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_chroot_by_name_matches_autopkgtest(chroot_dir: Path, tmp_path: Path) -> None:
    """`-- chroot DIR` runs autopkgtest-virt-chroot: the same result lines and exit code as
    autopkgtest gives with it (a built tree: nothing needs installing from the mirror)."""
    tree = tmp_path / "tree"
    shutil.copytree(FIXTURES / "pass-basic", tree)
    (tree / "debian" / "files").write_text("")  # a built tree, as both programs see it
    runs = {}
    for program in (["autopkgtest"], nestbed_argv()):
        p = _run([*program, str(tree), "--", "chroot", str(chroot_dir)])
        runs[Path(program[0]).name] = (p.returncode, _results(p.stdout))
    assert runs["nestbed"] == runs["autopkgtest"]
    assert runs["nestbed"] == (
        0,
        ["smoke                PASS", "named-command        PASS", "command1             PASS"],
    )


@pytest.mark.network
def test_apt_release_options_match_autopkgtest(tmp_path: Path) -> None:
    """--add-apt-release and --apt-default-release in a chroot (never on this host): each
    program in a fresh root, the same result lines and exit code."""
    from tests_support import write_package

    release = subprocess.run(
        ["sh", "-c", ". /etc/os-release; echo $VERSION_CODENAME"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    tree = write_package(
        tmp_path / "tree",
        {},
        f"Test-Command: ls /etc/apt/sources.list.d | grep -q add-apt-release-{release}-backports"
        f" && apt-cache policy | grep -q ' {release}-backports/'\n"
        "Features: test-name=added-release\nDepends:\n\n"
        f"Test-Command: grep -rqx 'Pin: release {release}' /etc/apt/preferences.d\n"
        "Features: test-name=default-release\nDepends:\n",
    )
    (tree / "debian" / "files").write_text("")  # a built tree: nothing to build or install
    runs = {}
    for i, program in enumerate((["autopkgtest"], nestbed_argv())):
        root = _unpack_root(tmp_path / f"root{i}")
        try:
            p = _run(
                [*program, f"--add-apt-release={release}-backports",
                 f"--apt-default-release={release}", str(tree), "--", "chroot", str(root)]
            )  # fmt: skip
        finally:
            shutil.rmtree(root, ignore_errors=True)
        runs[Path(program[0]).name] = (p.returncode, _results(p.stdout))
    assert runs["nestbed"] == runs["autopkgtest"]
    assert runs["nestbed"] == (
        0, ["added-release        PASS", "default-release      PASS"]
    )  # fmt: skip


# What `mixed` (a built tree) gives on a testbed that runs everything but cannot revert
# the full system, as autopkgtest prints it: the summary, the SKIPs found before any test
# ran first.
MIXED_RESULTS = [
    "unknown-restriction  SKIP unknown restriction needs-magic-unicorn",
    "unknown-field        SKIP unknown field X-nestbed-colour",
    "unknown-field-command SKIP unknown field X-nestbed-colour",
    'breaks-testbed       SKIP Test restriction "breaks-testbed" requires testbed capability'
    ' "revert-full-system"',
    *MIXED_RUN_RESULTS,
]


@dataclass(frozen=True)
class _Seen:
    """What a user sees of one run: the exit code, the result lines, the testbed that
    testinfo.json names and the files of the output directory."""

    returncode: int
    results: list[str]
    virt_server: str
    files: list[str]


def _seen_by_both(
    tree: Path, testbed: Sequence[str], tmp_path: Path, *, prefix: Sequence[str] = ()
) -> dict[str, _Seen]:
    """autopkgtest, then nestbed, on `tree` (-B) with `-- TESTBED...`, each started by
    `prefix` (e.g. nsenter)."""
    seen = {}
    for program in (["autopkgtest"], nestbed_argv()):
        name = Path(program[0]).name
        out = tmp_path / f"out-{name}"
        p = _run([*prefix, *program, "-B", "-o", str(out), str(tree), "--", *testbed])
        info = out / "testinfo.json"
        assert info.is_file(), f"{name} wrote no testinfo.json: {p.stderr[-3000:]}"
        seen[name] = _Seen(
            p.returncode,
            _results(p.stdout),
            json.loads(info.read_text()).get("virt_server", ""),
            sorted(f.name for f in out.iterdir()),
        )
    return seen


def _mixed_tree(tmp_path: Path) -> Path:
    """The mixed fixture as a built tree: nothing to build, nor to install from the mirror
    (for an unbuilt tree autopkgtest installs dpkg-dev where the testbed lacks it)."""
    tree = tmp_path / "mixed"
    shutil.copytree(FIXTURES / "mixed", tree)
    (tree / "debian" / "files").write_text("")
    return tree


def _skip_unless(*tools: str, why: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} ({why})")


@dataclass(frozen=True)
class _Sshd:
    enter: list[str]  # a command prefix: run in the sshd's network namespace
    testbed: list[str]  # `ssh` and its options, as a user writes them after `--`


SSHD_PORT = 2222  # in a network namespace of the test's own: nothing else listens there


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[_Sshd]:
    """A real sshd for root on this host (so the tests run here, as with null), with a
    throwaway host key and user key, listening on 127.0.0.1 in a network namespace the
    fixture creates; the runners join that namespace (nsenter), the host's network is not
    touched. Every process left in the namespace is killed at the end."""
    _skip_unless(
        "sshd", "ssh", "ssh-keygen", "unshare", "nsenter", "ip",
        "autopkgtest", "autopkgtest-virt-ssh",
        why="scripts/setup installs openssh-server and autopkgtest",
    )  # fmt: skip
    d = tmp_path / "sshd"
    d.mkdir()
    for key in ("host", "user"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"nestbed test {key} key",
             "-f", str(d / key)],
            check=True,
        )  # fmt: skip
    shutil.copyfile(d / "user.pub", d / "authorized_keys")
    config = d / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {SSHD_PORT}\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile none\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        # no PAM (its pam_loginuid fails in a container); StrictModes refuses keys under /tmp
        "UsePAM no\nStrictModes no\n"
    )
    # sshd's privilege separation directory, which ssh.service makes (RuntimeDirectory)
    privsep = Path("/run/sshd")
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    # autopkgtest-virt-ssh leaves its wrapper in the testbed's /tmp: here, the host's
    wrapper = Path("/tmp/autopkgtest-run-wrapper")
    wrapper_was_there = wrapper.exists()
    log = d / "sshd.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            ["unshare", "--net", "sh", "-ec",
             'ip link set lo up; exec "$(command -v sshd)" -D -e -f "$1"', "sh", str(config)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    netns = ""
    try:
        deadline = time.monotonic() + 60
        while f"Server listening on 127.0.0.1 port {SSHD_PORT}" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        netns = os.readlink(f"/proc/{server.pid}/ns/net")
        assert netns != os.readlink("/proc/self/ns/net")
        yield _Sshd(
            enter=["nsenter", f"--net=/proc/{server.pid}/ns/net", "--"],
            testbed=["ssh", "-H", "127.0.0.1", "-p", str(SSHD_PORT), "-l", "root",
                     "-i", str(d / "user")],
        )  # fmt: skip
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if netns:
            _kill_namespace(netns)
        if made_privsep:
            shutil.rmtree(privsep, ignore_errors=True)
        if not wrapper_was_there:
            wrapper.unlink(missing_ok=True)


def _kill_namespace(netns: str) -> None:
    """SIGKILL every process in the network namespace `netns` (sessions of the sshd)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "net") == netns:
                os.kill(int(entry.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue


@pytest.mark.autopkgtest
def test_ssh_by_name_matches_autopkgtest(sshd: _Sshd, tmp_path: Path) -> None:
    """`-- ssh -H HOST -p PORT -l root -i KEY` runs autopkgtest-virt-ssh: over a real ssh
    connection, the same result lines, exit code, testinfo.json testbed and output files as
    autopkgtest gives with it; no full-system revert over ssh, so breaks-testbed is SKIPped."""
    seen = _seen_by_both(_mixed_tree(tmp_path), sshd.testbed, tmp_path, prefix=sshd.enter)
    assert seen["nestbed"] == seen["autopkgtest"]
    assert (seen["nestbed"].returncode, seen["nestbed"].results) == (6, MIXED_RESULTS)
    assert seen["nestbed"].virt_server == " ".join(["autopkgtest-virt-ssh", *sshd.testbed[1:]])


@pytest.fixture
def schroot_name() -> Iterator[str]:
    """A schroot of type=file on the root tarball (Debian minbase of the host's release):
    each session is a fresh unpacked copy, so autopkgtest-virt-schroot may use it. Its
    config is a file in /etc/schroot/chroot.d/, removed at the end with any session left.
    The minimal profile: /proc and /sys only, no bind mount of the host's /home or /tmp."""
    _skip_unless(
        "schroot", "autopkgtest", "autopkgtest-virt-schroot",
        why="scripts/setup installs schroot and autopkgtest",
    )  # fmt: skip
    tarball = _root_tarball()
    name = f"nestbed-test-{uuid.uuid4().hex[:12]}"
    config = Path("/etc/schroot/chroot.d") / name
    config.write_text(
        f"[{name}]\ndescription=nestbed test: {tarball.name}\ntype=file\nfile={tarball}\n"
        "root-users=root\nprofile=minimal\n"
    )
    config.chmod(0o644)
    try:
        yield name
    finally:
        listed = subprocess.run(
            ["schroot", "--list", "--all-sessions"], capture_output=True, text=True
        ).stdout.split()
        for session in listed:
            if session.startswith(f"session:{name}-"):
                subprocess.run(
                    ["schroot", "--end-session", "--chroot", session],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=300,
                )  # fmt: skip
        config.unlink()


@pytest.mark.autopkgtest
def test_schroot_by_name_matches_autopkgtest(schroot_name: str, tmp_path: Path) -> None:
    """`-- schroot NAME` runs autopkgtest-virt-schroot: the same result lines, exit code,
    testinfo.json testbed and output files as autopkgtest gives with it; its revert is a
    fresh session, not a full-system one, so breaks-testbed is SKIPped."""
    seen = _seen_by_both(_mixed_tree(tmp_path), ["schroot", schroot_name], tmp_path)
    assert seen["nestbed"] == seen["autopkgtest"]
    assert (seen["nestbed"].returncode, seen["nestbed"].results) == (6, MIXED_RESULTS)
    assert seen["nestbed"].virt_server == f"autopkgtest-virt-schroot {schroot_name}"
    sessions = subprocess.run(
        ["schroot", "--list", "--all-sessions"], capture_output=True, text=True, check=True
    ).stdout
    assert f"session:{schroot_name}-" not in sessions  # both runners ended theirs


@pytest.mark.autopkgtest
@pytest.mark.parametrize(
    ("testbed", "server", "reason"),
    [
        (["schroot", "no-such-chroot"], "autopkgtest-virt-schroot",
         "E: no-such-chroot: Chroot not found"),
        # a network namespace of its own: nothing can listen on its 127.0.0.1
        (["ssh", "-H", "127.0.0.1", "-p", str(SSHD_PORT), "-l", "root", "--timeout-ssh=2"],
         "autopkgtest-virt-ssh", "Timed out on waiting for ssh connection"),
    ],
    ids=["schroot", "ssh"],
)  # fmt: skip
def test_testbed_that_cannot_start(
    testbed: list[str], server: str, reason: str, tmp_path: Path
) -> None:
    """A server by name that cannot give a testbed: exit 16 and no result line, as with
    autopkgtest; nestbed's error line names the server and says why (autopkgtest's says
    `unexpected eof from the testbed`, the reason only in the server's stderr above it)."""
    _skip_unless("autopkgtest", "unshare", server, why="scripts/setup installs them")
    tree = _mixed_tree(tmp_path)
    runs = {}
    for program in (["autopkgtest"], nestbed_argv()):
        p = _run(["unshare", "--net", "--", *program, "-B", str(tree), "--", *testbed])
        runs[Path(program[0]).name] = p
    assert [(p.returncode, _results(p.stdout)) for p in runs.values()] == [(16, [])] * 2
    errors = [line for line in runs["nestbed"].stderr.splitlines() if ": ERROR: " in line]
    assert len(errors) == 1, errors
    assert re.search(
        rf"ERROR: testbed failure: virt server {server} exited with status \d+ during `\w+': .*"
        + re.escape(reason),
        errors[0],
    ), errors[0]
