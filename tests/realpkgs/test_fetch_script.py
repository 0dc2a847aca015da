"""scripts/fetch-real-sources writes deb-src entries for the mirrors apt already uses."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from realpkgs.conftest import FETCH

SOURCES = """\
Types: deb
# a comment
URIs: file:/srv/mirror/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: file:/srv/mirror/debian-security
Suites: bookworm-security
Components: main
Enabled: no
"""


def _load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("fetch_real_sources", str(FETCH))
    spec = importlib.util.spec_from_loader("fetch_real_sources", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = _load_script()
    (tmp_path / "sources.list.d").mkdir()
    monkeypatch.setattr(module, "APT_DIR", tmp_path)
    return module


def test_deb_src_stanza_mirrors_the_enabled_deb_entries(script: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "sources.list.d" / "debian.sources").write_text(SOURCES)
    (tmp_path / "sources.list").write_text(
        "# old style\ndeb [signed-by=/k.gpg arch=amd64] file:/srv/old bookworm main contrib\n"
    )
    assert script.ensure_deb_src() is True
    written = (tmp_path / "sources.list.d" / "nestbed-deb-src.sources").read_text()
    assert written == (
        "# Written by nestbed's scripts/fetch-real-sources: deb-src for the same mirrors\n"
        "Types: deb-src\n"
        "URIs: file:/srv/mirror/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb-src\n"
        "URIs: file:/srv/old\n"
        "Suites: bookworm\n"
        "Components: main contrib\n"
        "Signed-By: /k.gpg\n"
        "Architectures: amd64\n"
    )


def test_existing_deb_src_entries_are_left_alone(script: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        SOURCES.replace("Types: deb\n", "Types: deb deb-src\n", 1)
    )
    script.ensure_deb_src()
    assert not (tmp_path / "sources.list.d" / "nestbed-deb-src.sources").exists()


def test_no_deb_entries_is_an_error(script: ModuleType) -> None:
    with pytest.raises(SystemExit, match="no `deb` entries found"):
        script.ensure_deb_src()
