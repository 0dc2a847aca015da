"""Copy throughput of nestbed-virt-qemu over the protocol: open, copydown a tree, copyup it.

    python3 bench/copy_throughput.py IMAGE [--files N] [--big N] [--big-mb MB] [SERVER-OPTION...]

Makes a tree of FILES small files and BIG files of BIG-MB random bytes in a temp dir, then
times `copydown` and `copyup` of it and checks that what came back is what went down.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote


def make_tree(top: Path, files: int, big: int, big_mb: int) -> int:
    for i in range(files):
        d = top / f"d{i // 100}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i % 100}.txt").write_text("x" * (i * 37 % 4000))
    for i in range(big):
        with open(top / f"big{i}.bin", "wb") as f:
            for _ in range(big_mb):
                f.write(os.urandom(1 << 20))
    return sum(p.stat().st_size for p in top.rglob("*") if p.is_file())


def same(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    return all(same(a / d, b / d) for d in cmp.common_dirs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--big", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=100)
    args, server_options = ap.parse_known_args()
    server = str(Path(sys.executable).parent / "nestbed-virt-qemu")
    work = Path(tempfile.mkdtemp(prefix="nestbed-copy-bench-"))
    try:
        size = make_tree(work / "tree", args.files, args.big, args.big_mb)
        proc = subprocess.Popen([server, *server_options, args.image], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None

        def ask(line: str) -> tuple[str, float]:
            assert proc.stdin is not None and proc.stdout is not None
            start = time.monotonic()
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            return proc.stdout.readline().strip(), time.monotonic() - start

        proc.stdout.readline()
        scratch = ask("open")[0].split()[1]
        for what, line, dest in (
            ("copydown", f"copydown {quote(str(work))}/tree/ {quote(scratch)}/tree/", None),
            ("copyup", f"copyup {quote(scratch)}/tree/ {quote(str(work))}/back/", work / "back"),
        ):
            answer, seconds = ask(line)
            print(f"{what}: {answer} in {seconds:.1f} s, {size / seconds / 1e6:.1f} MB/s"
                  f" ({size / 1e6:.0f} MB)", flush=True)  # fmt: skip
            if dest is not None and answer == "ok":
                print(f"copied back whole: {same(work / 'tree', dest)}")
        ask("close")
        proc.stdin.write("quit\n")
        proc.stdin.close()
        return proc.wait(120)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
