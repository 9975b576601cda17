"""Per-target pass pipelines, as data: ``PIPELINES[target]`` is an ordered tuple of (name, pass); ``run`` applies
them in place and returns the per-pass counts that land in the artifact manifest and the export summary.

After every pass the dsv4 ops of the graph are checked against the registry (a pass that emits an op without a
row fails here, naming the pass) and the function bodies of the dsv4 ops it introduced are attached.
"""

from __future__ import annotations

import onnx_ir as ir

from dsv4.export import custom_ops
from dsv4.export.functions import DOMAIN

from .ascend import AscendProfile
from .chunk_experts import HoistInvariants
from .cleanup import Cleanup, nodes, weights_hidden
from .fuse_moe import FuseMoEPass
from .fuse_norm import FuseNormPass
from .lower_ort import LowerOrtPass
from .select_ops import SelectOps

Pipeline = tuple[tuple[str, ir.passes.PassBase], ...]


def _common(target: str, lower: tuple = ()) -> Pipeline:
    return (("cleanup", Cleanup()), ("fuse_moe", FuseMoEPass()), *lower, ("select_ops", SelectOps(target)),
            ("cleanup.2", Cleanup()))


PIPELINES: dict[str, Pipeline] = {
    # MoE -> com.microsoft.MoE / QMoE and FP8 weights -> DequantizeLinear where exact; every other dsv4 op inlined
    # (ORT has no dsv4 kernels).
    # Prefill: NarrowMoE's experts one per Loop trip (select_ops, passes/chunk_experts.py), what the trips share hoisted.
    "ort-cpu": (*_common("ort-cpu", (("lower_ort", LowerOrtPass()),)), ("hoist_experts", HoistInvariants())),
    # What the CUDA EP's kernel table (passes/rules/ort_cuda_kernels.tsv) covers exactly, docs/ort_cuda.md: float MoE
    # (MXFP4 experts with --experts int8 through DequantizeLinear: the table's QMoE takes no float32 activations),
    # NarrowMoE (the default --experts packed: the selected experts' lookup dequantisation), FP8/MXFP4
    # weights -> DequantizeLinear, and weighted RMSNorms -> SimplifiedLayerNormalization (after the bodies are inlined).
    # Prefill as on ort-cpu: NarrowMoE's experts one per Loop trip (at Flash dims the dense form dequantises every
    # selected expert at once, ~100 MB of fp32 each: 20+ GB per layer for a 64-token prompt) and the query-chunked
    # IndexerTopK / SparseAttn (memory linear in the prompt). `dsv4 lint` checks the result against the same table.
    "ort-cuda": (*_common("ort-cuda", (("lower_cuda", LowerOrtPass("lower_cuda", qmoe=False)),)),
                 ("hoist_experts", HoistInvariants()), ("fuse_norm", FuseNormPass())),
    # TVM keeps the ops its lowerings.py implements (registry tvm faces) and inlines the others, MoE included.
    "tvm-llvm": _common("tvm-llvm"),
    "tvm-cuda": _common("tvm-cuda"),
    # Every dsv4 op inlined (float8-free bodies), then what CANN's parser and ORT's CANN EP graph list lack rewritten
    # into standard ops they have (passes/ascend.py); `dsv4 lint --target ascend` checks the result.
    "ascend": (*_common("ascend"), ("ascend", AscendProfile()), ("cleanup.3", Cleanup())),
}


def compute_of(model: ir.Model) -> str:
    """The body compute type of an exported graph: float64 graphs (exactness artifacts) run fp64 bodies."""
    floats = [v.dtype for v in model.graph.initializers.values()
              if v.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE) and v.shape is not None and v.shape.rank() >= 1]
    return "float64" if floats and all(d == ir.DataType.DOUBLE for d in floats) else "float32"


def check_registered(model: ir.Model, after: str) -> None:
    """Raise if the graph holds a dsv4 op without a registry row (e.g. one a pass invented)."""
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN}
    missing = sorted(ops - set(custom_ops.ROWS))
    if missing:
        raise KeyError(f"pass {after!r} emitted dsv4 op(s) without a registry row (export/custom_ops.py): {missing}")


def run(model: ir.Model, target: str, pipeline: Pipeline | None = None) -> dict[str, dict]:
    """Apply the target's pipeline (or `pipeline`) to `model` in place; returns {pass name: counts} plus
    "nodes": {"before", "after"} (main graph and subgraphs, not function bodies)."""
    if pipeline is None and target not in PIPELINES:
        raise ValueError(f"passes: no pipeline for target {target!r}; targets: {', '.join(PIPELINES)}")
    custom_ops.register_schemas()
    compute = compute_of(model)
    before = nodes(model)
    counts: dict[str, dict] = {}
    with weights_hidden(model):
        for name, p in pipeline if pipeline is not None else PIPELINES[target]:
            res = p(model)
            check_registered(model, name)
            if any(n.domain == DOMAIN for n in model.graph):
                custom_ops.attach_functions(model, compute)
            counts[name] = dict(getattr(res, "counts", {"modified": int(res.modified)}))
    counts["nodes"] = {"before": before, "after": nodes(model)}
    return counts
