"""``dsv4 export``: a checkpoint directory (or a synthetic preset) -> an artifact directory."""

from __future__ import annotations

import argparse

from dsv4.fmt import nbytes, print_table


def register(sub: argparse._SubParsersAction) -> None:
    from dsv4.export.targets import EXPERT_MODES, TARGETS, WEIGHT_MODES

    p = sub.add_parser("export", help="export prefill.onnx + decode.onnx + weights + manifest for a target")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (official format); or use --preset")
    p.add_argument("--preset", help="build a synthetic checkpoint of this preset on the fly (tiny, small, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic checkpoint (with --preset)")
    p.add_argument("--target", default="ort-cpu", choices=sorted(TARGETS))
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--max-seq-len", type=int, default=None, help="decode-state capacity (default: the config's)")
    p.add_argument("--weights", choices=WEIGHT_MODES, default=None,
                   help="packed (default: FP8/FP4 stay packed, dequantised in-graph) or a float dtype")
    p.add_argument("--batch", type=int, default=None, help="static targets (ascend): the fixed batch (default 1)")
    p.add_argument("--prefill-lengths", default=None,
                   help="static targets (ascend): prefill buckets, e.g. 128,1024,4096: one prefill graph per length; "
                        "prompts are right-padded up to the next (default 128,1024 up to --max-seq-len)")
    p.add_argument("--experts", choices=EXPERT_MODES, default=None,
                   help="ort-cpu / ort-cuda, packed weights: MXFP4 routed experts as the checkpoint's bytes (packed, "
                        "default) or as int8 blocks (2x the experts' bytes; docs/PERF.md compares decode speed)")
    p.add_argument("--layers", type=int, default=None, help="export only the first N decoder layers (+ head and MTP)")
    p.add_argument("--no-quant-sim", action="store_true", help="export without the reference's quantisation simulations")
    for part, what in (("act", "FP8 activation rounding in front of FP8/FP4-stored linears"),
                       ("kv", "FP8 rounding of the KV nope dims"), ("index", "FP4 rounding of the indexer (Hadamard)")):
        p.add_argument(f"--no-{part}-sim", action="store_true", help=f"without one simulation: {what} (docs/quant_sim.md)")
    p.add_argument("--mtp", action="store_true",
                   help="also mtp.onnx (the MTP block) and verify.onnx (multi-token step) for speculative decoding: "
                        "dsv4 generate --speculative (ort targets)")
    p.add_argument("--all-logits", action="store_true",
                   help="prefill returns the logits of every position (default: of each sequence's last token)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-space-check", action="store_true",
                   help="write even when --out's filesystem reports less free space than the artifact needs")
    p.add_argument("--no-passes", action="store_true", help="keep the raw exported graph (no pass pipeline), for debugging")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ranks", type=int, default=None,
                   help="expert parallelism: one artifact per rank under --out, E/N routed experts each, the rest "
                        "replicated; run with dsv4 generate --ranks N or torchrun (docs/scale.md)")
    p.add_argument("--rank-sum", choices=("ordered", "partial"), default="ordered",
                   help="with --ranks: exchange each token's top-k expert terms and add them in the single-rank order "
                        "(ordered: bit-identical, k x the payload) or all-reduce per-rank partial sums (partial)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from dsv4.export.export import export_artifact
    from dsv4.export.static import parse_lengths

    if (a.checkpoint is None) == (a.preset is None):
        raise ValueError("export: give either CHECKPOINT_DIR or --preset NAME")
    if getattr(a, "ranks", None) is not None:  # expert-parallel artifacts (tools/cmd_ranks.py)
        from .cmd_ranks import export as export_ranks

        return export_ranks(a)
    res = export_artifact(a.out, checkpoint=a.checkpoint, preset=a.preset, seed=a.seed, target=a.target,
                          weights=a.weights, experts=a.experts, layers=a.layers, max_seq_len=a.max_seq_len,
                          all_logits=getattr(a, "all_logits", False), mtp=getattr(a, "mtp", False), quant_sim=False if a.no_quant_sim else None,
                          quant_sims={f"{p}_quant_sim": False for p in ("act", "kv", "index") if getattr(a, f"no_{p}_sim")},
                          overwrite=a.force, transform=None if a.no_passes else _pipeline(), progress=None if not a.no_progress else False,
                          batch=a.batch, prefill_lengths=parse_lengths(a.prefill_lengths),
                          space_check=not getattr(a, "no_space_check", False))
    print_table(summary(res.manifest, res.path))
    return 0


def _pipeline():
    """The target's pass pipeline (issue [4]) when passes/pipeline.py provides ``run``; else none."""
    try:
        from dsv4.passes.pipeline import run
    except ImportError:
        return None
    return lambda model, graph, target: run(model, target.name)


def summary(man: dict, path) -> object:
    """The end-of-export table: graphs, node counts, dsv4 ops, sizes, time."""
    from rich.table import Table

    t = Table(title=f"{path}  ·  target {man['target']} (opset {man['opset']})  ·  weights {man['weights']}  ·  "
              f"{man['export_seconds'].get('total', 0):.1f} s")
    for c in ("graph", "nodes", "dsv4 nodes", "functions", "file", "time"):
        t.add_column(c, justify="right" if c in ("nodes", "file", "time") else "left")
    for g, info in man["graphs"].items():
        ops = ", ".join(f"{k}×{v}" for k, v in info["dsv4_nodes"].items())
        secs = man["export_seconds"].get(f"trace {g}", 0) + man["export_seconds"].get(f"fold {g}", 0)
        t.add_row(g, str(info["nodes"]), ops, str(len(info["functions"])), nbytes(man["files"][info["file"]]["bytes"]),
                  f"{secs:.1f} s")
    if "trace step" in man["export_seconds"]:  # one trace served both graphs (export/step.py)
        t.add_row("trace step", "", "", "", "", f"{man['export_seconds']['trace step']:.1f} s")
    w = man["files"][man["weights_file"]]["bytes"]
    t.add_row("weights", "", "", "", nbytes(w), f"{man['export_seconds'].get('weights', 0):.1f} s")
    return _with_passes(t, man)


def _with_passes(table, man: dict):
    """The export table, and under it the per-pass counts of each graph (issue [4]; none with --no-passes)."""
    from rich.console import Group
    from rich.table import Table

    graphs = {g: info.get("pass_counts") or {} for g, info in man["graphs"].items()}
    if not any(graphs.values()):
        return Group(table, "passes: none (raw graph)")
    p = Table(title=f"passes ({man['target']})")
    p.add_column("pass")
    for g in graphs:
        p.add_column(g)
    for name in dict.fromkeys(k for c in graphs.values() for k in c):
        p.add_row(name, *(", ".join(f"{k} {v}" for k, v in c.get(name, {}).items() if v) or "-" for c in graphs.values()))
    return Group(table, p)
