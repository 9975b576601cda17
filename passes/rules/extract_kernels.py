"""Regenerate the ORT kernel tables (``ort_cuda_kernels.tsv``, ``ort_cpu_kernels.tsv``) that ``passes/lint.py`` reads.

Two sources, both the data ORT's own docs/OperatorKernels.md is generated from (tools/python/gen_opkernel_doc.py over
the registered kernels):

* ``md``: a local copy of microsoft/onnxruntime docs/OperatorKernels.md, one execution provider's section::

      python passes/rules/extract_kernels.py md OperatorKernels.md CUDAExecutionProvider \\
          --source "microsoft/onnxruntime docs/OperatorKernels.md@<commit> (ORT <version>)" > passes/rules/ort_cuda_kernels.tsv

  Every table line becomes a row that keeps its line number in that file; continuation lines (``|||[6, 12]|...``)
  inherit the op above. The ``Parameters`` column gives the formal type of each input/output (``params``).
* ``installed``: the kernel registry of the installed onnxruntime wheel (CPU EP for the CPU wheel)::

      python passes/rules/extract_kernels.py installed CPUExecutionProvider > passes/rules/ort_cpu_kernels.tsv

  A maintenance script, never imported by the package (only runtimes/ort may import onnxruntime at run time).

Row format (tab separated): domain, op, since, until ('' = open end), constraints (``T=float,float16;T1=int64``),
params (``in=T,T;out=T``, '' when the source gives none), source_line (md: line in the file; installed: ordinal).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections import defaultdict

COLUMNS = ("domain", "op", "since", "until", "constraints", "params", "source_line")
_DOMAIN = re.compile(r"^\|\*\*Operator Domain:\*\* \*([^*]+)\*\|")
_CONSTRAINT = re.compile(r"\*\*([^*]+)\*\* = (.*)")
_PARAM = re.compile(r"\*(in|out)\* [^:]+:\*\*([^*]+)\*\*")


def parse_range(text: str) -> tuple[int, int | None]:
    """'13+' -> (13, None); '[6, 12]' -> (6, 12); '10' -> (10, 10)."""
    text = text.strip()
    if text.endswith("+"):
        return int(text[:-1]), None
    if text.startswith("["):
        lo, hi = text.strip("[]").split(",")
        return int(lo), int(hi)
    return int(text), int(text)


def parse_types(text: str) -> str:
    """'**T** = tensor(float), tensor(float16)<br/> **T1** = tensor(int64)' -> 'T=float,float16;T1=int64'."""
    out = []
    for part in text.split("<br/>"):
        m = _CONSTRAINT.search(part.strip())
        if m:
            out.append(f"{m.group(1)}={','.join(_clean(t) for t in m.group(2).strip().split(', '))}")
    return ";".join(out)


def _clean(t: str) -> str:
    """'tensor(float)' -> 'float'; 'seq(tensor(float))' stays (types never hold ', ')."""
    t = t.strip()
    return t[len("tensor("):-1] if t.startswith("tensor(") else t


def parse_params(text: str) -> str:
    """The first signature of the Parameters column: 'in=T,T;out=T' (formal type constraint per position)."""
    first = text.split("<br><br>or<br><br>")[0]
    ins = [t for kind, t in _PARAM.findall(first) if kind == "in"]
    outs = [t for kind, t in _PARAM.findall(first) if kind == "out"]
    return f"in={','.join(ins)};out={','.join(outs)}" if ins or outs else ""


def from_md(path: str, provider: str) -> list[tuple]:
    rows, domain, op, params, inside = [], None, None, "", False
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.startswith("## Operators implemented by "):
                inside = line.strip().endswith(provider)
                continue
            if not inside or not line.startswith("|"):
                continue
            m = _DOMAIN.match(line)
            if m:
                domain = m.group(1)
                continue
            cells = line.rstrip("\n").split("|")[1:-1]
            if len(cells) != 4 or cells[2].strip() in ("", "OpSet Version") or cells[2].startswith("-"):
                continue
            if cells[0].strip():
                op, params = cells[0].strip(), parse_params(cells[1])
            since, until = parse_range(cells[2])
            rows.append((domain, op, since, "" if until is None else until, parse_types(cells[3]), params, n))
    return rows


def from_installed(provider: str) -> list[tuple]:
    capi = importlib.import_module("onnxruntime.capi._pybind_state")  # maintenance use only, see the docstring
    merged: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for k in capi.get_all_opkernel_def():
        if k.provider == provider:
            lo, hi = k.version_range
            for name, types in k.type_constraints.items():
                merged[(k.domain or "ai.onnx", k.op_name, lo, hi)][name] |= set(types)
    formal = {}
    for s in capi.get_all_operator_schema():
        formal.setdefault((s.domain or "ai.onnx", s.name), {})[s.since_version] = (
            f"in={','.join(i.typeStr for i in s.inputs)};out={','.join(o.typeStr for o in s.outputs)}")
    rows = []
    for i, ((domain, op, lo, hi), cons) in enumerate(sorted(merged.items()), 1):
        versions = formal.get((domain, op), {})
        best = max((v for v in versions if v <= lo), default=None)
        params = versions[best] if best is not None else ""
        types = ";".join(f"{n}={','.join(sorted(_clean(t) for t in ts))}" for n, ts in sorted(cons.items()))
        rows.append((domain, op, lo, "" if hi >= 2**31 - 1 else hi, types, params, i))
    return rows


def write(rows: list[tuple], header: list[str], out=sys.stdout) -> None:
    for line in header:
        out.write(f"# {line}\n")
    out.write("\t".join(COLUMNS) + "\n")
    for r in rows:
        out.write("\t".join(str(c) for c in r) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    md = sub.add_parser("md")
    md.add_argument("path")
    md.add_argument("provider")
    md.add_argument("--source", required=True, help="repository, path, commit and version of the file")
    md.add_argument("--note", action="append", default=[])
    inst = sub.add_parser("installed")
    inst.add_argument("provider")
    inst.add_argument("--note", action="append", default=[])
    a = p.parse_args(argv)
    if a.mode == "md":
        rows = from_md(a.path, a.provider)
        header = [f"{a.provider} kernels from {a.source}", "source_line: line of the row in that file", *a.note]
    else:
        version = importlib.import_module("onnxruntime").__version__
        rows = from_installed(a.provider)
        header = [f"{a.provider} kernels registered in the installed onnxruntime {version} wheel "
                  "(onnxruntime.capi get_all_opkernel_def, the data ORT's docs/OperatorKernels.md is generated from)",
                  "source_line: ordinal of the (domain, op, range) in that registry, sorted", *a.note]
    header.append("generated by passes/rules/extract_kernels.py; columns: " + ", ".join(COLUMNS))
    write(rows, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
