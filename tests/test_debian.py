"""nestbed the Debian way: `dpkg-buildpackage -us -uc -b` builds the .deb, lintian finds no
error in it, and nestbed runs the package's own debian/tests against it (nestbed tests
nestbed): in a fresh Debian container nestbed builds the package from source and runs its
debian/tests against what it installed: the programs, their man pages, the installed nestbed
running a small package on the null testbed inside, and autopkgtest and the installed nestbed
driving each other's null servers to the same result lines and exit code.

For the .deb's contents and lintian, it is built here once per test run (about 25 s) from a
copy of this checkout's files (what git tracks and what it would not ignore), with a plain
Debian PATH: never the checkout or its virtual environment. The container run takes about
3.5 minutes (most of it installing the Build-Depends).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests_support import nestbed_argv

ROOT = Path(__file__).resolve().parent.parent
PLAIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PROGRAMS = (
    "nestbed",
    "nestbed-virt-null",
    "nestbed-virt-unshare",
    "nestbed-virt-qemu",
    "nestbed-vm",
)


@dataclass(frozen=True)
class Built:
    deb: Path
    changes: Path
    source: Path  # a clean copy of the tree: debian/tests come from here


def _plain_env() -> dict[str, str]:
    """This machine's environment as a fresh Debian shell has it: no virtualenv, no pyenv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYENV", "PIP_", "DEB_"))
    }
    env["PATH"] = PLAIN_PATH
    env["LC_ALL"] = "C.UTF-8"
    return env


def _copy_checkout(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():  # a file deleted but not yet committed is listed too
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if shutil.which("dpkg-buildpackage", path=PLAIN_PATH) is None or not (ROOT / ".git").exists():
        pytest.fail("needs dpkg-dev and a git checkout (scripts/setup installs the build-deps)")
    top = tmp_path_factory.mktemp("deb")
    source, tree = top / "source", top / "build" / "nestbed"
    _copy_checkout(source)
    shutil.copytree(source, tree)
    env = _plain_env()
    deps = subprocess.run(
        ["dpkg-checkbuilddeps"], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    assert deps.returncode == 0, f"{deps.stderr.strip()} (scripts/setup installs them)"
    done = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (deb,) = tree.parent.glob("nestbed_*_all.deb")
    (changes,) = tree.parent.glob("nestbed_*.changes")
    return Built(deb, changes, source)


def _field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_deb_installs_programs_man_pages_and_debian_libraries(built: Built) -> None:
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(built.deb)], capture_output=True, text=True, check=True
    ).stdout
    paths = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    for prog in PROGRAMS:
        assert f"/usr/bin/{prog}" in paths
        assert f"/usr/share/man/man1/{prog}.1.gz" in paths
    assert "/usr/share/man/man1/nestbed-image.1.gz" in paths
    assert "/usr/lib/python3/dist-packages/nestbed/cli.py" in paths
    depends = {d.strip().split()[0] for d in _field(built.deb, "Depends").split(",")}
    assert {"python3-debian", "python3-rich"} <= depends
    # the default testbed (a QEMU VM of an image nestbed builds) comes with a plain install
    recommends = {d.strip() for d in _field(built.deb, "Recommends").split(",")}
    assert {"qemu-system-x86", "qemu-utils", "mmdebstrap"} <= recommends
    # and what writes its partitioned disk (nestbed.image.disk)
    assert {"fdisk", "dosfstools", "mtools", "syslinux", "systemd-boot-efi"} <= recommends


def test_lintian_finds_no_error(built: Built) -> None:
    if shutil.which("lintian", path=PLAIN_PATH) is None:
        pytest.fail("needs lintian (scripts/setup installs it)")
    done = subprocess.run(
        ["lintian", "--fail-on", "error", str(built.changes)],
        env=_plain_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    errors = [line for line in done.stdout.splitlines() if line.startswith("E:")]
    assert done.returncode == 0 and not errors, done.stdout + done.stderr


def _can_unshare() -> str | None:
    missing = [p for p in ("unshare", "nsenter", "mmdebstrap") if shutil.which(p) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    if os.geteuid() != 0 and not os.path.exists("/etc/subuid"):
        return "needs root or a range in /etc/subuid"
    return None


@pytest.mark.network  # the container installs the build-deps and Depends from the mirror
def test_nestbed_builds_and_tests_nestbed_on_fresh_debian(built: Built, tmp_path: Path) -> None:
    """`nestbed SOURCE -- unshare`: in a fresh Debian container (minbase) nestbed installs the
    Build-Depends, runs dpkg-buildpackage, installs the .deb and runs debian/tests against it."""
    why = _can_unshare()
    if why:
        pytest.skip(why)
    out = tmp_path / "out"
    done = subprocess.run(
        [*nestbed_argv(), "-o", str(out), str(built.source), "--", "unshare"],
        capture_output=True,
        text=True,
        check=False,
        timeout=1500,
    )
    # the summary file: stdout also carries the tests' own output (the inner result lines)
    summary = (out / "summary").read_text() if (out / "summary").exists() else ""
    results = dict(re.findall(r"^(\S+)\s+(PASS.*|FAIL.*|SKIP.*)$", summary, re.M))
    assert results == {
        "installed-programs": "PASS (superficial)",
        "null-testbed": "PASS",
        "autopkgtest-drives-nestbed": "PASS",
    }, done.stdout + done.stderr[-4000:]
    assert done.returncode == 0
    assert set(summary.splitlines()) <= set(done.stdout.splitlines())  # and on stdout
    # built there, from debian/control's Build-Depends, not taken from this machine
    log = (out / "log").read_text()
    assert "dpkg-buildpackage: info: source package nestbed" in log
    assert re.search(r"^Unpacking pybuild-plugin-pyproject ", log, re.M)
    # what the inner, installed nestbed printed: its result lines, checked by the test too
    inner = (out / "null-testbed-stdout").read_text()
    assert re.search(r"^fails +FAIL non-zero exit status 3$", inner, re.M)
    # the tests ran against the nestbed the container built and installed
    version = _field(built.deb, "Version")
    installed = (out / "installed-programs-packages").read_text()
    assert re.search(rf"^nestbed\s+{re.escape(version)}$", installed, re.M), installed
