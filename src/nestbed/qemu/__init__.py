"""QEMU machines for nestbed: `machine.Machine` boots an image with a control channel."""
