"""Container testbeds: root tarballs (mmdebstrap, cached), root trees, namespaced containers."""

from nestbed.container.container import Container, ContainerConfig, ContainerError
from nestbed.container.tarball import ensure_tarball

__all__ = ["Container", "ContainerConfig", "ContainerError", "ensure_tarball"]
