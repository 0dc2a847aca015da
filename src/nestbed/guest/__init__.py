"""The guest side of nestbed: the control agent (agent.py, copied into images) and the host's
client for it (channel.py)."""
