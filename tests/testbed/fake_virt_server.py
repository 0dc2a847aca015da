"""A misbehaving virt server for client tests: `python fake_virt_server.py MODE`."""

from __future__ import annotations

import sys
import time
from urllib.parse import quote


def answer(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    mode = sys.argv[1]
    if mode == "exit-early":
        sys.stderr.write("fake: cannot start\n")
        return 1
    if mode == "bad-banner":
        answer("hello")
        time.sleep(60)
        return 0
    answer("ok")
    prefix = ",".join(quote(a) for a in [sys.executable, "-c", "import sys; sys.exit(255)"])
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if mode == "die-on-open" and cmd == "open":
            sys.stderr.write("fake: the hypervisor fell over\n")
            return 3
        if mode == "fail-with-console" and cmd == "open":
            # as nestbed-virt-qemu explains a failed boot: its reason, then the console's end
            sys.stderr.write("fake: failure: no root shell answered; console ends: boot 1\n")
            sys.stderr.write("".join(f"console line {i}\n" for i in range(2, 7)))
            return 12
        if mode == "silent" and cmd == "open":
            time.sleep(600)
        if cmd == "open":
            answer("ok" if mode == "bad-results" else "ok /nonexistent/scratch")
        elif cmd == "print-execute-command":
            answer(f"ok {prefix}")
        elif cmd == "capabilities":
            answer(
                "ok isolation-container suggested-normal-user=tester suggested-normal-user=other"
            )
        elif cmd == "close":
            answer("ok")
        elif cmd == "quit":
            return 5 if mode == "quit-fails" else 0
        else:
            answer("copy-failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
