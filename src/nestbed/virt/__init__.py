"""Virt servers: one executable per testbed kind, speaking the autopkgtest wire protocol."""
