"""tools/bench_compiled.py stays runnable as the engine client changes: its Cython declarations
(tools/compiled/http1.pxd) must name every attribute the three classes set, and the one source change it
makes must still apply. (Cython itself is not installed by the tests: the tool installs it.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HTTP1 = ROOT / "distserve" / "router" / "http1.py"
PXD = ROOT / "tools" / "compiled" / "http1.pxd"
CLASSES = ("Response", "_Deadlines", "_Connection")


def _attributes_set(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def _declared() -> dict[str, set[str]]:
    declared: dict[str, set[str]] = {}
    current = None
    for line in PXD.read_text().splitlines():
        m = re.match(r"cdef class (\w+):", line)
        if m:
            current = declared.setdefault(m.group(1), set())
            continue
        m = re.match(r"\s+cdef public \w+ (\w+)$", line)
        if m and current is not None:
            current.add(m.group(1))
    return declared


def test_every_attribute_of_the_compiled_classes_is_declared():
    tree = ast.parse(HTTP1.read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    declared = _declared()
    for name in CLASSES:
        missing = _attributes_set(classes[name]) - declared.get(name, set())
        assert not missing, f"tools/compiled/http1.pxd lacks {name}.{sorted(missing)}"


def test_the_one_source_change_still_applies():
    assert "class _Connection(asyncio.Protocol):" in HTTP1.read_text()
