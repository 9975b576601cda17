"""Per decoder layer, the nodes ONNX Runtime executes (every function body inlined), by part of the layer, before
and after a target's pipeline: what ``dsv4 inspect`` reports and what the pass tests assert.

Nodes are attributed to a layer and a part by the torch exporter's module path (``pkg.torch.onnx.name_scopes``),
which inlined bodies inherit from their call and rewrites merge from the nodes they replace. Parts:
``moe`` (gate, routing, routed experts: everything under ``ffn`` but the shared expert, plus every node that
implements a dsv4.MoE node), ``shared`` (ffn.shared_experts), ``attn``, ``norm``, ``block`` (the mHC mixing).
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as common

from ._graph import DSV4_OP_KEY, layer_of, scope_of

PARTS = ("attn", "norm", "moe", "shared", "block")


def part_of(node: ir.Node) -> str:
    if node.metadata_props.get(DSV4_OP_KEY) == "MoE":
        return "moe"
    scope = scope_of(node)
    if scope.startswith("ffn.shared_experts"):
        return "shared"
    if scope == "ffn" or scope.startswith("ffn."):
        return "moe"
    if scope in ("attn_norm", "ffn_norm"):
        return "norm"
    if scope == "attn" or scope.startswith("attn."):
        return "attn"
    return "block"


def executed(model: ir.Model) -> ir.Model:
    """A copy of `model` with every model-local function inlined (weights are not read)."""
    m = model.clone() if model.functions else model
    if m.functions:
        common.InlinePass()(m)
    return m


def census(model: ir.Model) -> dict[str, dict[str, Counter]]:
    """{layer: {part: Counter of "domain.op"}} of what ORT executes; nodes outside any layer under "-"."""
    out: dict[str, dict[str, Counter]] = {}
    for node in ir.traversal.RecursiveGraphIterator(executed(model).graph):
        layer = layer_of(node) or "-"
        part = part_of(node) if layer != "-" else "other"
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        out.setdefault(layer, {}).setdefault(part, Counter())[key] += 1
    return dict(sorted(out.items(), key=lambda kv: _layer_key(kv[0])))


def _layer_key(layer: str):
    kind, _, i = layer.partition(".")
    return (kind != "layers", kind, int(i) if i.isdigit() else -1)


def totals(c: dict[str, dict[str, Counter]]) -> dict[str, dict[str, int]]:
    """{layer: {part: nodes, "total": nodes}}."""
    return {layer: {**{p: sum(v.values()) for p, v in parts.items()}, "total": sum(sum(v.values()) for v in parts.values())}
            for layer, parts in c.items()}


def before_after(model: ir.Model, target: str) -> dict[str, dict]:
    """Per layer {"before": {part: n}, "after": {part: n}, "moe_after": Counter}: `model` as given and after the
    target's pipeline (run on a copy; on an artifact exported with passes both sides are the pipeline's output)."""
    from .pipeline import run

    before = census(model)
    fused = model.clone()
    run(fused, target)
    after = census(fused)
    tb, ta = totals(before), totals(after)
    return {layer: {"before": tb.get(layer, {}), "after": ta.get(layer, {}),
                    "moe_after": after.get(layer, {}).get("moe", Counter())}
            for layer in dict.fromkeys([*before, *after])}
