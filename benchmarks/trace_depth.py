"""Benchmark: trace cost against depth at real dimensions (issue [9]: "trace time within 1.2x of the 2-layer trace").

    .venv/bin/python benchmarks/trace_depth.py [--slice flash:2 --slice flash:4 ...] [--work DIR] [--out docs/PERF.md]

For each PRESET:LAYERS, a data-sparse checkpoint (``dsv4 checkpoint make --sparse``: headers and sizes as released,
zero data in file holes, seconds to make) is cut to the first LAYERS layers, and a child process builds the export
skeleton and runs exactly what ``dsv4 export`` runs to trace a dynamic target: ``trace_by_kind(skeleton, "step")``
(export/layers.py + export/step.py: one trace of each distinct layer kind, instantiated per layer, serving both
graphs). Reported: the kinds traced, the trace's CPU and wall seconds and peak RSS of the child, nodes and
initializers of the step graph. Nothing is written but the checkpoints under --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, update_section

CLI = [sys.executable, "-m", "dsv4.tools.cli"]
DEFAULT = ["flash:1", "flash:2", "flash:4", "flash:8", "flash:43", "pro:2", "pro:8", "pro:61"]  # 43, 61: whole

CHILD = r"""
import json, resource, sys, time
from dsv4.export.layers import kinds, trace_by_kind
from dsv4.export.signature import growable
from dsv4.export.step import split_step
from dsv4.export.targets import get_target
from dsv4.export.tracing import no_cycle_gc
from dsv4.export.weights import CheckpointSource, skeleton
src = CheckpointSource(sys.argv[1], max_seq_len=8192)
skel = skeleton(src.args, src, "packed")
skel.to("meta")
c, t = time.process_time(), time.perf_counter()
with no_cycle_gc():  # as dsv4 export's "trace step" stage
    m = trace_by_kind(skel, "step", get_target("ort-cpu"))
    graphs = split_step(m, src.args, skel.dtype, growable(src.args, get_target("ort-cpu")))
print("@@" + json.dumps({"kinds": len(kinds(src.args)[0]), "layers": src.args.n_layers,
                         "cpu_s": time.process_time() - c, "wall_s": time.perf_counter() - t,
                         "nodes": sum(1 for _ in graphs["decode"].graph),
                         "initializers": len(graphs["decode"].graph.initializers)}))
"""


def run_one(work: Path, spec: str) -> dict:
    name, layers = spec.split(":")
    ck = work / f"{name}-{layers}-sparse"
    if not (ck / "config.json").exists():
        subprocess.run([*CLI, "checkpoint", "make", "--preset", name, "--layers", layers, "--sparse", "--out", str(ck)],
                       check=True, capture_output=True)
    out = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    out.write(CHILD)
    out.close()
    child = subprocess.run([sys.executable, out.name, str(ck)], capture_output=True, text=True)
    res = next((json.loads(x[2:]) for x in child.stdout.splitlines() if x.startswith("@@")), None)
    if res is None:
        raise SystemExit(f"{spec}: {child.stderr[-3000:]}")
    Path(out.name).unlink()
    return {"slice": spec, **res}


def _layers(r: dict) -> str:
    n = r["slice"].split(":")[1]
    return f"{n} layer" if n == "1" else f"{n} layers"


def render(rows: list[dict]) -> str:
    base = {r["slice"].split(":")[0]: r for r in rows if r["slice"].endswith(":2")}
    # depth alone: against the shallowest slice of the same preset that traces as many kinds
    same = {}
    for r in sorted(rows, key=lambda r: int(r["slice"].split(":")[1])):
        same.setdefault((r["slice"].split(":")[0], r["kinds"]), r)
    lines = ["## Trace cost against depth (`benchmarks/trace_depth.py`)", "",
             f"{machine(1)}. The step trace of a dynamic export (ort-cpu, packed) of data-sparse slices at real "
             "dimensions: one trace serves prefill and decode (export/step.py), each distinct layer kind is traced "
             "once (export/layers.py), routed experts are one stacked parameter per weight kind (export/weights.py).",
             "", "| slice | layer kinds traced | trace CPU | trace wall | × the 2-layer trace (CPU) | × the shallowest "
             "slice with as many kinds (CPU) | step graph nodes |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r["slice"].split(":")[0])
        x = f"{r['cpu_s'] / b['cpu_s']:.2f}×" if b else "–"
        d = same[(r["slice"].split(":")[0], r["kinds"])]
        y = f"{r['cpu_s'] / d['cpu_s']:.2f}× ({_layers(d)})" if d is not r else "–"
        lines.append(f"| {r['slice'].split(':')[0]} {_layers(r)} | {r['kinds']} | {r['cpu_s']:.1f} s | "
                     f"{r['wall_s']:.1f} s | {x} | {y} | {r['nodes']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slice", action="append", help=f"PRESET:LAYERS (default {' '.join(DEFAULT)})")
    ap.add_argument("--work", default="/tmp/dsv4-trace-depth")
    ap.add_argument("--out", default="docs/PERF.md", help="markdown file to update ('-' prints only)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in a.slice or DEFAULT:
        t = time.perf_counter()
        rows.append(run_one(work, spec))
        print(json.dumps(rows[-1]), f"({time.perf_counter() - t:.0f} s)", flush=True)
    md = render(rows)
    if a.out == "-":
        print(md)
    else:
        update_section(Path(a.out), md, "trace_depth")


if __name__ == "__main__":
    main()
