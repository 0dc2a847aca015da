"""Testbed capabilities: the words a virt server advertises and the runner relies on.

autopkgtest's README.virtualisation-server defines them; a server advertises a word only when
a test relying on it really gets it. `Cap` members are `str`s, so they compare equal to the
words read off the wire (`Cap.REVERT in testbed.caps`). Capabilities that carry a value:
`suggested-normal-user=USER`, `downtmp-host=PATH` and nestbed's `parallel=MIB`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Cap(StrEnum):
    REVERT = "revert"
    REVERT_FULL_SYSTEM = "revert-full-system"
    ROOT_ON_TESTBED = "root-on-testbed"
    ISOLATION_CONTAINER = "isolation-container"
    ISOLATION_MACHINE = "isolation-machine"
    REBOOT = "reboot"
    HAS_INTERNET = "has_internet"
    # nestbed's own: the testbed exports its base image (needs-baseimage); KVM works inside
    BASEIMAGE = "baseimage"
    NESTED_KVM = "nested-kvm"


SUGGESTED_NORMAL_USER = "suggested-normal-user"
# nestbed's own, `parallel=MIB`: more servers with the same arguments may run at once, each
# an independent testbed holding about MIB MiB of the host's memory (-j)
PARALLEL = "parallel"
DOWNTMP_HOST = "downtmp-host"


def with_value(name: str, value: str) -> str:
    """A capability that carries a value, as advertised: `NAME=VALUE`."""
    return f"{name}={value}"


def value_of(name: str, caps: Iterable[str]) -> str | None:
    """The value of capability `name` among `caps`, or None when it is not advertised."""
    prefix = name + "="
    return next((c[len(prefix) :] for c in caps if c.startswith(prefix)), None)


# Not a capability but the runner's hint to a server, in its environment: a test in the run
# declares needs-baseimage, so a server that can export its base image should (QEMU does).
WANT_BASEIMAGE = "NESTBED_WANT_BASEIMAGE"
