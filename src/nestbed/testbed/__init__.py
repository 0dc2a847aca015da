"""The testbed: the virt-server wire protocol, its client (the runner's Testbed) and server framework."""
