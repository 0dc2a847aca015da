"""The testbed: the virt-server wire protocol, its client and the server framework."""
