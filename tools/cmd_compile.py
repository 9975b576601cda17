"""``dsv4 compile ART --target tvm-llvm|tvm-cuda [--arch sm_90] --out DIR``: TVM libraries + their manifest.

Prints what was compiled and the schedule census (which schedule every PrimFunc got, runtimes/tvm/schedules.py):
rich tables on a terminal, plain lines otherwise (names never wrapped or cut), then where TVM's native log went.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

QUIET = ("Fallback", "spatial", "none")  # schedules too common to list function by function


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile an artifact with Apache TVM (llvm, or CUDA source + PTX)")
    p.add_argument("artifact")
    p.add_argument("--target", default="tvm-llvm", choices=("tvm-llvm", "tvm-cuda"))
    p.add_argument("--arch", default="sm_90", help="CUDA architecture for tvm-cuda (PTX via nvcc when present)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--graphs", default="prefill,decode", help="comma-separated graphs to compile (default both; "
                   "running needs both)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-verify", action="store_true", help="skip the artifact's sha256 check")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from dsv4.runtimes.tvm import compile_artifact
    from dsv4.runtimes.tvm.library import CompiledError

    try:
        cm = compile_artifact(a.artifact, a.out, target=a.target, arch=a.arch, overwrite=a.force,
                              progress=False if a.no_progress else None, verify=not a.no_verify,
                              graphs=tuple(g.strip() for g in a.graphs.split(",") if g.strip()))
    except CompiledError as err:
        print(f"dsv4 compile: {err}", file=sys.stderr)
        return 2
    print_compiled(cm, a.artifact, a.out)
    print(f"TVM log: {Path(a.out) / cm['log']}")  # its native log, kept off the progress display
    return 0


def print_compiled(cm: dict, art: str, out: str, terminal: bool | None = None) -> None:
    """The compiled graphs, then the census: {schedule: count} per graph, and every function whose schedule is
    not one of the common ones (QUIET)."""
    terminal = sys.stdout.isatty() if terminal is None else terminal
    graphs = list(cm["graphs"])
    title = f"compiled {art} for {cm['target']}" + (f" ({cm['arch']})" if cm["arch"] else "") + f" -> {out}"
    rows = []
    for g, info in cm["graphs"].items():
        files = [info["library"], *(info[k] for k in ("cuda_source", "ptx") if k in info)]
        secs = info["seconds"]
        rows.append([g, ", ".join(f"{k} x{v}" for k, v in info["lowered"].items()), ", ".join(info["inlined"]),
                     str(len(info["params"])), f"{secs['import']:.1f}", f"{secs['build']:.1f}", " ".join(files)
                     + (" (ptxas ok)" if info.get("ptxas") == "ok" else "")])
    caption = None
    if cm["target"] == "tvm-cuda" and not any("ptx" in i for i in cm["graphs"].values()):
        caption = "no nvcc on the PATH: CUDA source only (compiled for the device when the library is loaded)"
    _emit(terminal, title, ["graph", "lowered dsv4 ops", "inlined", "params", "import s", "build s", "files"], rows,
          caption)
    names = sorted({s for i in cm["graphs"].values() for s in i.get("schedules", {})})
    _emit(terminal, "schedule census (PrimFuncs per schedule)", ["schedule", *graphs],
          [[s, *(str(cm["graphs"][g].get("schedules", {}).get(s, 0)) for g in graphs)] for s in names])
    rows = [[g, fn, s] for g in graphs for fn, s in cm["graphs"][g].get("schedule_of", {}).items()
            if s not in QUIET or fn.startswith("dsv4_")]
    _emit(terminal, f"dsv4 kernels and functions not on {', '.join(QUIET)}", ["graph", "function", "schedule"], rows)


def _emit(terminal: bool, title: str, columns: list[str], rows: list[list[str]], caption: str | None = None):
    if not terminal:
        print(f"{title}:")
        for r in rows:
            print("  " + "  ".join(f"{c}={v}" for c, v in zip(columns, r)))
        if caption:
            print(f"  ({caption})")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, caption=caption)
    for c in columns:
        t.add_column(c, no_wrap=c in ("function", "schedule", "graph"), overflow="fold")
    for r in rows:
        t.add_row(*r)
    Console().print(t)
