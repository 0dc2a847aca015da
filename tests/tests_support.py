"""Helpers shared by tests: finding the installed nestbed, writing small packages."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def nestbed_argv() -> list[str]:
    """The nestbed of this environment (beside this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "nestbed"
    found = str(beside) if beside.exists() else shutil.which("nestbed")
    assert found, "nestbed is not installed (pip install -e .)"
    return [found]


def write_package(root: Path, tests: dict[str, str], control: str) -> Path:
    """A source tree with only debian/control, changelog and the given tests."""
    (root / "debian" / "tests").mkdir(parents=True)
    (root / "debian" / "control").write_text("Source: fixture\nMaintainer: t <t@localhost>\n")
    (root / "debian" / "changelog").write_text(
        "fixture (1.0) unstable; urgency=medium\n\n  * Test.\n\n"
        " -- t <t@localhost>  Thu, 26 Nov 2026 06:00:00 +0000\n"
    )
    (root / "debian" / "tests" / "control").write_text(control)
    for name, body in tests.items():
        path = root / "debian" / "tests" / name
        path.write_text(body)
        path.chmod(0o755)
    return root
