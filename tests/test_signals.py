"""The one way every command turns a termination signal into an orderly shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys

PROGRAM = """
import os, signal, sys
from nestbed.signals import Interrupted, ShutdownOnSignals, die_of

with ShutdownOnSignals() as guard:
    try:
        with guard.critical():
            os.kill(os.getpid(), signal.SIGTERM)
            print("critical section done", flush=True)
        print("not reached", flush=True)
    except Interrupted as e:
        os.kill(os.getpid(), signal.SIGINT)  # a second signal must not cut the clean-up short
        print(f"cleaning up after {e.signal_name}", flush=True)
        sys.exit(die_of(e.signum))
"""


def test_signal_waits_for_the_critical_section_then_the_program_dies_of_it() -> None:
    p = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert p.stdout.splitlines() == ["critical section done", "cleaning up after SIGTERM"]
    assert p.returncode == -signal.SIGTERM, p.stderr
    assert "Traceback" not in p.stderr
