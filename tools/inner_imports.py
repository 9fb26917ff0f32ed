#!/usr/bin/env python3
"""Imports inside function bodies, and whether each says why (a comment on its line or the line above).

    .venv/bin/python tools/inner_imports.py distserve discovery        # every one, then the counts
    .venv/bin/python tools/inner_imports.py --missing distserve discovery  # only those without a reason

Imports belong at module top; one inside a function is for an optional dependency, a CLI's cold start (not
loading torch/grpc/aiohttp for --help), or an import cycle that cannot be broken; its comment says which.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def inner_imports(root: Path) -> list[tuple[str, int, bool, str]]:
    rows = set()
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                    says_why = any("#" in line for line in lines[node.lineno - 1:node.end_lineno]) or above.startswith("#")
                    rows.add((str(path), node.lineno, says_why, lines[node.lineno - 1].strip()))
    return sorted(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--missing", action="store_true", help="list only the imports without a comment")
    args = p.parse_args()
    rows = [row for root in args.roots for row in inner_imports(root)]
    for path, line, says_why, text in rows:
        if not (args.missing and says_why):
            print(f"{path}:{line}: {'' if says_why else 'NO REASON: '}{text}")
    print(f"{len(rows)} imports inside functions, {sum(not r[2] for r in rows)} without a comment saying why")
    return 0


if __name__ == "__main__":
    sys.exit(main())
