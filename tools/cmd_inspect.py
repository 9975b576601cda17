"""``dsv4 inspect ART``: op histogram per graph, dsv4 ops, state bytes per token, weights by dtype."""

from __future__ import annotations

import argparse
import json

from dsv4.fmt import nbytes, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="what an artifact holds: ops per graph, dsv4 ops, state and weight sizes")
    p.add_argument("artifact")
    p.add_argument("--top", type=int, default=15, help="op types shown per graph")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    p.add_argument("--json", action="store_true")
    p.add_argument("--layers", action="store_true",
                   help="per decoder layer, the nodes ORT executes (bodies inlined) before and after the target's passes")
    p.add_argument("--graph", default="decode", help="graph of the --layers report (prefill, decode, or a static "
                   "artifact's prefill.N)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dsv4.export.artifact import inspect_artifact

    if a.layers:
        return _layers(a)
    info = inspect_artifact(a.artifact, verify=a.verify)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    con = Console()
    for g, gi in info["graphs"].items():
        t = Table(title=f"{g}: {gi['nodes']} nodes stored, {gi['inlined_nodes']} with the dsv4 bodies inlined")
        t.add_column("op (stored)")
        t.add_column("count", justify="right")
        t.add_column("op (inlined)")
        t.add_column("count", justify="right")
        a_ops, b_ops = list(gi["ops"].items())[: a.top], list(gi["inlined_ops"].items())[: a.top]
        for i in range(max(len(a_ops), len(b_ops))):
            x = a_ops[i] if i < len(a_ops) else ("", "")
            y = b_ops[i] if i < len(b_ops) else ("", "")
            t.add_row(x[0], str(x[1]), y[0], str(y[1]))
        print_table(t, con)
        print("dsv4 ops: " + ", ".join(f"{k}×{v}" for k, v in gi["dsv4"].items()))
    _state(info["state"])
    w = Table(title=f"weights ({info['weights']})")
    for c in ("dtype", "tensors", "elements", "bytes"):
        w.add_column(c, justify="right" if c != "dtype" else "left")
    for dt, d in info["weights_by_dtype"].items():
        w.add_row(dt, str(d["tensors"]), f"{d['elements']:,}", nbytes(d["bytes"]))
    print_table(w, con)
    _device(info)
    return 0


def _state(s: dict) -> None:
    """Bytes per token and per sequence; per layer kind; the released models' figures from them (plain lines)."""
    print(f"state ({s['layout']} layout): {s['bytes_per_token']:,.1f} bytes/token (compressed caches, amortised) "
          f"+ {nbytes(s['fixed_bytes_per_sequence'])} fixed per sequence; {nbytes(s['bytes_per_sequence'])} per "
          f"sequence as allocated at max_seq_len={s['max_seq_len']:,}; {s['entries']} tensors")
    for kind, k in s["per_layer_kind"].items():
        print(f"  one {kind} layer: {k['per_token']:,.2f} bytes/token + {nbytes(k['fixed'])} fixed "
              f"({k['layers']} in this artifact)")
    for name, r in s.get("release", {}).items():
        mix = ", ".join(f"{c} {k}" for k, c in r["layers"].items())
        if r["missing"]:
            print(f"  {name} ({mix}): needs a layer of each kind; this artifact has no {', '.join(r['missing'])}")
        else:
            print(f"  {name} ({mix}): {r['per_token']:,.1f} bytes/token + {nbytes(r['fixed_per_sequence'])} fixed "
                  f"per sequence; {nbytes(r['per_token'] * 1048576 + r['fixed_per_sequence'])} per sequence at 1M")


def _device(info: dict) -> None:
    """Static shapes and, for ascend, the ATC command line per graph and the CANN EP options: plain lines, never
    wrapped (a command is copied from here)."""
    if info.get("static"):
        st = info["static"]
        print(f"static shapes: batch {st['batch']}, prefill buckets {st['prefill_lengths']}, "
              f"max_seq_len {st['max_seq_len']}")
    asc = info.get("ascend")
    if asc:
        print(f"ascend: soc_version {asc['soc_version']}, precision_mode {asc['precision_mode']} ({asc['note']})")
        for g, cmd in asc["atc"].items():
            print(f"atc {g}: {cmd}")
        ep = asc["cann_ep"]
        print(f"onnxruntime-cann provider options: {json.dumps(ep['provider_options'])}; session options: "
              f"{json.dumps(ep['session_options'])}")


def _layers(a: argparse.Namespace) -> int:
    """``--layers``: passes/census.py on one graph; an artifact exported with passes shows the same on both sides."""
    from pathlib import Path

    import onnx_ir as ir
    from rich.table import Table

    from dsv4.export.artifact import load_manifest
    from dsv4.passes.census import PARTS, before_after

    man = load_manifest(a.artifact, verify=a.verify)
    rep = before_after(ir.load(Path(a.artifact) / man["graphs"][a.graph]["file"]), man["target"])
    if a.json:
        print(json.dumps({k: {**v, "moe_after": dict(v["moe_after"])} for k, v in rep.items()}, indent=2))
        return 0
    t = Table(title=f"{a.graph}: nodes ORT executes per layer, raw -> after the {man['target']} passes"
              + ("  (this artifact was exported with passes)" if man["graphs"][a.graph].get("pass_counts") else ""))
    for c in ("layer", "total", *PARTS, "MoE part after"):
        t.add_column(c, justify="left" if c in ("layer", "MoE part after") else "right")
    for layer, r in rep.items():
        b, f = r["before"], r["after"]
        moe = ", ".join(f"{k}×{v}" for k, v in r["moe_after"].most_common() if "." in k) or "-"
        t.add_row(layer, f"{b.get('total', 0)} -> {f.get('total', 0)}",
                  *(f"{b.get(p, 0)} -> {f.get(p, 0)}" for p in PARTS), moe)
    print_table(t)
    return 0
