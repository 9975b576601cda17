"""Imports point one way (DESIGN.md): models <- export <- passes <- runtimes <- tools; only runtimes/ort imports
onnxruntime and only runtimes/tvm imports tvm."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["models", "export", "passes", "runtimes", "tools"]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    pkg = ["dsv4", *path.relative_to(ROOT).parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.add(node.module)
    return out


def room(mod: str) -> str | None:
    parts = mod.split(".")
    if parts[0] == "dsv4" and len(parts) > 1 and parts[1] in ORDER:
        return parts[1]
    return None


def test_import_direction():
    bad = []
    for r in ORDER:
        for f in (ROOT / r).rglob("*.py"):
            rel = f.relative_to(ROOT)
            for mod in imports_of(f):
                tgt = room(mod)
                if tgt and ORDER.index(tgt) > ORDER.index(r):
                    bad.append(f"{rel} imports {mod} ({tgt} is downstream of {r})")
                top = mod.split(".")[0]
                if top == "onnxruntime" and not str(rel).startswith(("runtimes/ort", "runtimes/parity")):
                    bad.append(f"{rel} imports onnxruntime (only runtimes/ort may)")
                if top == "tvm" and not str(rel).startswith("runtimes/tvm"):
                    bad.append(f"{rel} imports tvm (only runtimes/tvm may)")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_imports(tmp_path):
    f = ROOT / "models" / "model.py"
    assert "dsv4.models.kernels" in imports_of(f) or "dsv4.models" in imports_of(f)
