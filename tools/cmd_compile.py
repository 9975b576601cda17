"""``dsv4 compile ART --target tvm-llvm|tvm-cuda [--arch sm_90] --out DIR``: TVM libraries + their manifest."""

from __future__ import annotations

import argparse


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
    from rich.console import Console
    from rich.table import Table

    from dsv4.runtimes.tvm import compile_artifact

    cm = compile_artifact(a.artifact, a.out, target=a.target, arch=a.arch, overwrite=a.force,
                          progress=False if a.no_progress else None, verify=not a.no_verify,
                          graphs=tuple(g.strip() for g in a.graphs.split(",") if g.strip()))
    t = Table(title=f"compiled {a.artifact} for {cm['target']}" + (f" ({cm['arch']})" if cm["arch"] else "")
              + f" -> {a.out}")
    for c in ("graph", "lowered dsv4 ops", "inlined", "params", "import s", "build s", "files"):
        t.add_column(c)
    for g, info in cm["graphs"].items():
        files = [info["library"], *(info[k] for k in ("cuda_source", "ptx") if k in info)]
        t.add_row(g, ", ".join(f"{k} x{v}" for k, v in info["lowered"].items()), ", ".join(info["inlined"]),
                  str(len(info["params"])), f"{info['seconds']['import']:.1f}", f"{info['seconds']['build']:.1f}",
                  " ".join(files))
    if cm["target"] == "tvm-cuda" and not any("ptx" in i for i in cm["graphs"].values()):
        t.caption = "no nvcc on the PATH: CUDA source only (compiled for the device when the library is loaded)"
    Console().print(t)
    return 0
