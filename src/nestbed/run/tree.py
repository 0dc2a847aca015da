"""The package's source tree: put into the testbed (unpacked, fetched or copied), named and
versioned, with a copy on the host where the control file is read."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from debian.changelog import Changelog, ChangelogParseError

from nestbed.capabilities import Cap
from nestbed.errors import BadPackage, TestbedFailure
from nestbed.log import Console
from nestbed.run import deps
from nestbed.run.options import PackageArg
from nestbed.sources import files_from_dsc
from nestbed.testbed.client import Testbed


@dataclass(frozen=True)
class SourceTree:
    host: str  # the tree on the host: where debian/tests/control is read
    testbed: str  # the copy in the testbed: where tests run
    name: str
    version: str


@dataclass(frozen=True)
class Limits:
    copy: int
    install: int


def read_name_version(tree: str) -> tuple[str, str]:
    path = os.path.join(tree, "debian", "changelog")
    try:
        with open(path, encoding="UTF-8", errors="replace") as f:
            changelog = Changelog(f, max_blocks=1, strict=True)
        return str(changelog.package), str(changelog.version)
    except FileNotFoundError:
        raise BadPackage(f"{path} does not exist") from None
    except (ChangelogParseError, ValueError, IndexError) as e:
        raise BadPackage(f"{path}: cannot parse the first entry: {e}") from None


def has_patches_to_apply(tree: str) -> bool:
    """Would `dpkg-source --before-build` change this tree: a 3.0 (quilt) source whose
    series names a patch. (Other formats and an empty series it leaves as they are.)"""
    debian = os.path.join(tree, "debian")
    if not os.access(os.path.join(debian, "rules"), os.X_OK):
        return False
    try:
        with open(os.path.join(debian, "source", "format"), encoding="UTF-8") as f:
            if f.read().strip() != "3.0 (quilt)":
                return False
    except OSError:
        return False
    for series in ("debian.series", "series"):
        try:
            with open(os.path.join(debian, "patches", series), encoding="UTF-8") as f:
                lines = [line.split("#", 1)[0].strip() for line in f]
        except OSError:
            continue
        return any(lines)
    return False


# A source by name needs a deb-src entry; a testbed whose apt has none (nestbed's own images
# keep only deb lines: an apt-get update with -U then fetches no Sources) gets the deb lines'
# deb-src twins for it, and their indexes alone (docs/autopkgtest.md). Only as root, and only
# in a testbed that is thrown away (on null it would be the host's apt).
DEB_SRC_TWINS = (
    "lists='/etc/apt/sources.list /etc/apt/sources.list.d/*.list"
    " /etc/apt/sources.list.d/*.sources'; "
    "if [ \"$(id -u)\" = 0 ]"
    " && ! grep -qsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' $lists; then "
    "twins=/etc/apt/sources.list.d/nestbed-deb-src.list; "
    "sed -n 's/^[[:space:]]*deb\\([[:space:]]\\)/deb-src\\1/p' $lists > $twins 2>/dev/null || :; "
    "if [ -s $twins ]; then apt-get update -q -o Dir::Etc::sourcelist=$twins"
    " -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0; else rm -f $twins; fi; fi"
)


def _ensure_command(
    testbed: Testbed,
    command: str,
    package: str,
    console: Console,
    limits: Limits,
    probe: str | None = None,
) -> None:
    """Install the tool an input needs (dpkg-source, git) when the testbed lacks it:
    `command` is not on PATH, or the shell `probe` fails."""
    script = probe or f"command -v {command}"
    found = testbed.execute(["sh", "-c", script], timeout=limits.copy)
    if found.returncode != 0:
        console.info(f"{command} not available in the testbed, installing {package}")
        deps.install(testbed, (package,), console, limits.install)


def _create_in_testbed(testbed: Testbed, create: str, timeout: int, console: Console) -> str:
    """Run `create` in a fresh build directory; return the path of the one tree it made."""
    script = "; ".join(
        [
            "set -e",
            f"builddir=$(mktemp -d {shlex.quote(testbed.scratch)}/build.XXX)",
            'cd "$builddir"',
            f"{{ {create}; }} >&2",
            "chmod -R a+rX .",
            "cd [a-z0-9]*/.",
            "pwd",
        ]
    )
    result = testbed.execute(["sh", "-c", script], timeout=timeout)
    console.write_stderr(result.stderr)  # what dpkg-source, apt or git said
    if result.returncode != 0:
        raise BadPackage(f"rules extract failed with exit code {result.returncode}")
    return result.stdout.decode("UTF-8", "replace").strip().splitlines()[-1]


def _git_create(arg: str) -> str:
    """The commands that make a tree from `URL[#BRANCH]`, as autopkgtest makes it: clone
    (once more after 15 s if that fails), then with a branch (or a refspec, e.g. of a pull
    request) fetch it as `testbranch` and check that out."""
    q = shlex.quote
    url, _, branch = arg.partition("#")
    clone = f"git clone --quiet {q(url)} src"
    steps = [f"{{ {clone} || {{ sleep 15; {clone}; }}; }}"]
    if branch:
        fetch = f"git -C src fetch --quiet -fu origin {q(branch + ':testbranch')}"
        steps.append(f"{{ {fetch} || {{ sleep 15; {fetch}; }}; }}")
        steps.append("git -C src checkout --quiet testbranch")
    steps.append(
        "if [ -x src/debian/rules ] && command -v dpkg-source >/dev/null; then"
        " dpkg-source --before-build src; fi"
    )
    return "; ".join(steps)


def prepare(
    testbed: Testbed,
    package: PackageArg,
    limits: Limits,
    host_dir: str,
    console: Console,
    user: str | None = None,
) -> SourceTree:
    """Put the tree into the testbed, owned by `user` who runs the tests (and builds).

    The user's own tree and files are never written to. `host_dir` is a private
    directory where a tree made in the testbed is copied back.
    """
    tree = _prepare(testbed, package, limits, host_dir, console)
    if user and Cap.ROOT_ON_TESTBED in testbed.caps:
        # tests that are not needs-root run as the normal user and may write their tree
        parent = tree.testbed if package.kind == "built-tree" else os.path.dirname(tree.testbed)
        r = testbed.execute(["chown", "-R", user, "--", parent], timeout=limits.copy)
        if r.returncode != 0:
            err = r.stderr.decode("UTF-8", "replace").strip()
            raise TestbedFailure(f"giving the source tree to {user} failed: {err}")
    return tree


def _prepare(
    testbed: Testbed, package: PackageArg, limits: Limits, host_dir: str, console: Console
) -> SourceTree:
    q = shlex.quote
    scratch = testbed.scratch
    if package.kind == "built-tree":
        host = os.path.abspath(package.path)
        has_changelog = os.path.exists(os.path.join(host, "debian", "changelog"))
        name, version = read_name_version(host) if has_changelog else ("", "")
        tb = f"{scratch}/tree"
        testbed.copydown(host + "/", tb + "/", timeout=limits.copy)
        return SourceTree(host, tb, name, version)

    if package.kind == "unbuilt-tree":
        host = os.path.abspath(package.path)
        name, version = read_name_version(host)
        staged = f"{scratch}/ubtree-{os.path.basename(host)}"
        testbed.copydown(host + "/", staged + "/", timeout=limits.copy)
        if has_patches_to_apply(host):
            # autopkgtest installs dpkg-dev whenever dpkg-source is missing; only here does
            # it change the tree (docs/autopkgtest.md)
            _ensure_command(testbed, "dpkg-source", "dpkg-dev", console, limits)
        # a private copy, with patches applied as dpkg-source would
        tb = _create_in_testbed(
            testbed,
            f"cp -rd --preserve=timestamps -- {q(staged)} real-tree; "
            "if [ -x real-tree/debian/rules ] && command -v dpkg-source >/dev/null; then"
            " dpkg-source --before-build real-tree; fi",
            limits.copy,
            console,
        )
        return SourceTree(host, tb, name, version)

    if package.kind == "source":
        files = files_from_dsc(package.path)
        _ensure_command(testbed, "dpkg-source", "dpkg-dev", console, limits)
        for path in [package.path, *files]:
            testbed.copydown(path, f"{scratch}/{os.path.basename(path)}", timeout=limits.copy)
        create = f"dpkg-source -x {q(scratch + '/' + os.path.basename(package.path))} src"
    elif package.kind == "apt-source":
        _ensure_command(testbed, "dpkg-source", "dpkg-dev", console, limits)
        create = f"apt-get source -q --only-source {q(package.path)}"
        if Cap.REVERT_FULL_SYSTEM in testbed.caps:  # throwaway: never the user's own apt
            create = f"{DEB_SRC_TWINS}; {create}"
    elif package.kind == "git-source":
        _ensure_command(testbed, "git", "git", console, limits)
        if package.path.startswith("https://"):
            # autopkgtest installs ca-certificates with git: https needs the CA bundle
            bundle = "/etc/ssl/certs/ca-certificates.crt"
            _ensure_command(
                testbed, bundle, "ca-certificates", console, limits, probe=f"test -e {bundle}"
            )
        create = _git_create(package.path)
    else:
        raise TestbedFailure(f"cannot prepare a {package.kind} in the testbed")
    tb = _create_in_testbed(testbed, create, limits.install, console)
    host = os.path.join(host_dir, "tests-tree")
    os.makedirs(host, exist_ok=True)
    testbed.copyup(tb + "/", host + "/", timeout=limits.copy)
    name, version = read_name_version(host)
    return SourceTree(host, tb, name, version)
