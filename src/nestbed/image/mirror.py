"""Which Debian mirror to build from: the one the machine's apt uses, unless told otherwise.

Reads /etc/apt/sources.list.d/*.sources (deb822) and /etc/apt/sources.list (one-line
format), and turns the host's entries into the image's apt sources for the requested
release: the host's `CODENAME`, `CODENAME-updates` and `CODENAME-security` suites are
mapped to the image's release (sid has no -updates or -security). `--mirror URL` replaces
all of that with one `deb URL RELEASE main` entry.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

from nestbed.aptsources import APT_ETC as APT_ETC
from nestbed.aptsources import AptSource as AptSource
from nestbed.aptsources import host_sources as host_sources
from nestbed.image.errors import ImageError

_SUFFIXES = ("", "-updates", "-security")
_ROLLING = ("sid", "unstable")


def host_codename(sources: list[AptSource]) -> str | None:
    """The release the machine's apt sources name (a bare codename such as bookworm), if any."""
    for src in sources:
        for suite in src.suites:
            if re.fullmatch(r"[a-z]+", suite):
                return suite
    return None


def image_sources(release: str, mirror: str | None, etc: Path = APT_ETC) -> list[AptSource]:
    """The apt sources the image is built from and keeps; the first one is the main mirror."""
    if mirror is not None:
        return [AptSource(mirror.rstrip("/"), (release,), ("main",))]
    host = host_sources(etc)
    codename = host_codename(host)
    if codename is None:
        raise ImageError(f"no Debian mirror found in {etc}/sources.list(.d); give --mirror URL")
    wanted = {codename + s: release + s for s in _SUFFIXES}
    result: list[AptSource] = []
    for src in host:
        suites = tuple(
            wanted[s]
            for s in src.suites
            if s in wanted and not (release in _ROLLING and wanted[s] != release)
        )
        if suites:
            result.append(AptSource(src.uri, suites, src.components))
    if not result or release not in result[0].suites:
        raise ImageError(f"no Debian mirror found in {etc}/sources.list(.d); give --mirror URL")
    return result


def probe(source: AptSource, release: str, timeout: float = 15.0) -> None:
    """Fail early, with one line, when the mirror cannot be reached or lacks the release."""
    url = f"{source.uri}/dists/{release}/InRelease"
    request = urllib.request.Request(url, method="HEAD" if url.startswith("http") else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise ImageError(f"release {release} not found on mirror {source.uri}") from None
        raise ImageError(f"mirror {source.uri} answered {e.code} {e.reason} for {url}") from None
    except (TimeoutError, urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(e, urllib.error.URLError) and source.uri.startswith("file:"):
            raise ImageError(f"release {release} not found on mirror {source.uri}") from None
        raise ImageError(f"mirror {source.uri} unreachable: {reason}") from None
