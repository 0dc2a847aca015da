#!/usr/bin/env python3
"""Structural figures of src/nestbed: the largest modules, the longest functions, class names
defined in more than one module, the modules that import subprocess.

    python3 bench/structure.py [src/nestbed]
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path


def _imports_subprocess(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "subprocess" for a in node.names)
    return isinstance(node, ast.ImportFrom) and node.module == "subprocess"


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "src/nestbed")
    sizes: dict[str, int] = {}
    functions: list[tuple[int, str]] = []
    classes: dict[str, set[str]] = collections.defaultdict(set)
    subprocess_users: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        name = str(path.relative_to(root))
        text = path.read_text()
        sizes[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((length, f"{name}:{node.name}"))
            elif isinstance(node, ast.ClassDef):
                classes[node.name].add(name)
            elif _imports_subprocess(node):
                subprocess_users.add(name)
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    print("largest modules:", ", ".join(f"{m} {n}" for m, n in largest))
    longest = sorted(functions, reverse=True)[:3]
    print("longest functions:", ", ".join(f"{f} {n}" for n, f in longest))
    twice = {k: sorted(v) for k, v in classes.items() if len(v) > 1}
    print(f"class names in two or more modules: {len(twice)}", twice or "")
    print(f"modules importing subprocess: {len(subprocess_users)}", sorted(subprocess_users))
    return 0


if __name__ == "__main__":
    sys.exit(main())
