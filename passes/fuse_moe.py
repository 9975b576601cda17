"""MoE-layer fusion: the exported routing subgraph + the layer's dsv4.MoEExperts node + the add of the shared
expert's output become ONE ``dsv4.MoE`` node per layer (registry row "MoE": eager reference, function body,
ORT lowering in passes/lower_ort.py, TVM by inlining).

The shared expert itself stays as its own ops and enters the node as its output: it is a plain dense SwiGLU
that every back end already runs (FP8 linears, the activation simulation around them), and ONNX Runtime's MoE
contrib ops cannot hold it anyway (no clamp on the shared expert, ECOSYSTEM.md V10 §5). What the node absorbs is
what a back end needs in one piece to run the routed experts sparsely: gate, scoring, selection, weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from dsv4.export.functions import DOMAIN, SOFTPLUS_THRESHOLD

from . import _graph as g
from .cleanup import Counted, nodes
from .expect import shortfall

SCORING = "sqrtsoftplus"


@dataclass(frozen=True)
class Routing:
    """What `check` found walking back from the matched nodes; `rewrite` recomputes it from the same bindings."""

    gate_weight: ir.Value  # [E, D] initializer
    top_k: int
    route_scale: float
    bias: ir.Value | None  # learned layers: [E] initializer
    tid2eid: ir.Value | None  # hash layers: [V, K] int64 initializer ...
    ids: ir.Value | None  # ... and the token ids [N]


def _softplus_input(sp: ir.Value) -> ir.Value | None:
    """l when sp computes torch's softplus(l) (beta 1, threshold 20) in one of the exported forms:
    Softplus(l); Log(1 + Exp(l)) (fp64 graphs, export.softplus_for_double); torch's decomposition
    Where(l*b > t, l, inner(l*b) / b) with b == 1, t == 20; or Where(l > t, l, inner(l))."""
    if (n := g.producer(sp, "Softplus")) is not None:
        return n.inputs[0]
    if (log := g.producer(sp, "Log")) is not None and (add := g.producer(log.inputs[0], "Add")) is not None:
        for one, e in (add.inputs, reversed(add.inputs)):
            if g.scalar(one) == 1.0 and (ex := g.producer(e, "Exp")) is not None:
                return ex.inputs[0]
        return None
    where = g.producer(sp, "Where")
    if where is None or (gt := g.producer(where.inputs[0], "Greater")) is None:
        return None
    if g.scalar(gt.inputs[1]) != SOFTPLUS_THRESHOLD:
        return None
    l, scaled, inner = where.inputs[1], gt.inputs[0], where.inputs[2]
    if (div := g.producer(inner, "Div")) is not None:  # inner(l*b) / b
        if g.scalar(div.inputs[1]) != 1.0:
            return None
        inner = div.inputs[0]
    if scaled is not l:  # l*b with b == 1
        mul = g.producer(scaled, "Mul")
        if mul is None or l not in mul.inputs or g.scalar(mul.inputs[1 - list(mul.inputs).index(l)]) != 1.0:
            return None
    return l if _softplus_input(inner) is scaled else None


def _gate(logits: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(x, Wg) when logits = x @ Wg^T: Gemm(x, Wg, transB=1) or MatMul(x, Transpose(Wg))."""
    if (gemm := g.producer(logits, "Gemm")) is not None:
        if (len(gemm.inputs) > 2 and gemm.inputs[2] is not None) or g.attr(gemm, "transA", 0) \
                or not g.attr(gemm, "transB", 0) or g.attr(gemm, "alpha", 1.0) != 1.0:
            return None
        return gemm.inputs[0], gemm.inputs[1]
    if (mm := g.producer(logits, "MatMul")) is not None and (tr := g.producer(mm.inputs[1], "Transpose")) is not None:
        if list(g.attr(tr, "perm", []) or []) == [1, 0]:
            return mm.inputs[0], tr.inputs[0]
    return None


def _hash_lookup(idx: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(tid2eid, ids) when idx = tid2eid[ids]: Gather(table, ids, axis=0) or GatherND(table, Unsqueeze(ids, -1))."""
    v = g.strip(idx)
    if (ga := g.producer(v, "Gather")) is not None and g.attr(ga, "axis", 0) == 0:
        return g.strip(ga.inputs[0]), g.strip(ga.inputs[1])
    if (gnd := g.producer(v, "GatherND")) is not None and g.attr(gnd, "batch_dims", 0) == 0:
        uns = g.producer(g.strip(gnd.inputs[1]), "Unsqueeze")
        if uns is not None and (ax := g.const(uns.inputs[1])) is not None and ax.reshape(-1).tolist() in ([-1], [1]):
            return g.strip(gnd.inputs[0]), g.strip(uns.inputs[0])
    return None


def analyse(x: ir.Value, s: ir.Value, idx: ir.Value, route_scale: ir.Value, axes: ir.Value, gather_axis: ir.Attr,
            keepdims: ir.Attr) -> Routing | str:
    """The routing of one candidate, or the reason it is not a V4 MoE routing."""
    if gather_axis.value not in (1, -1) or keepdims.value != 1:
        return f"weights: GatherElements axis {gather_axis.value} / ReduceSum keepdims {keepdims.value}: not a " \
               "gather of per-token scores normalised over the selected experts"
    if (ax := g.const(axes)) is None or ax.reshape(-1).tolist() not in ([-1], [1]):
        return "weights: the normalisation does not sum over the selected experts (axes != -1)"
    rs = g.scalar(route_scale)
    if rs is None:
        return f"weights: route scale {g.describe(route_scale)} is not a constant scalar"
    sqrt = g.producer(s, "Sqrt")
    l = _softplus_input(sqrt.inputs[0]) if sqrt is not None else None
    if l is None:
        return f"scoring: the gathered scores come from {g.describe(s)}" + \
               (f" of {g.describe(sqrt.inputs[0])}" if sqrt is not None else "") + \
               f", not sqrt(softplus(gate logits)): dsv4.MoE implements the {SCORING} scoring only"
    gate = _gate(l)
    if gate is None:
        return f"gate: the logits come from {g.describe(l)}, not x @ Wg^T"
    gx, wg = gate
    if g.strip_up(gx) is not g.strip(x):
        return "gate: the gate reads a different tensor than the experts"
    if g.weight(wg) is None:
        return f"gate: the gate weight is computed ({g.describe(wg)}), not a weight"
    topk = g.producer(idx, "TopK")
    if topk is not None:
        if idx is not topk.outputs[1]:
            return "selection: the experts are indexed by TopK values, not indices"
        if g.attr(topk, "largest", 1) != 1 or g.attr(topk, "axis", -1) not in (-1, 1):
            return "selection: TopK is not a largest-k over the experts axis: not a routing gate"
        add = g.producer(topk.inputs[0], "Add")
        if add is None:
            return f"selection: TopK ranks {g.describe(topk.inputs[0])}, not scores + bias: not a routing gate"
        a, b = add.inputs
        if g.strip(b) is g.strip(s):
            a, b = b, a
        if g.strip(a) is not g.strip(s):
            return "selection: TopK ranks a different tensor than the scores the weights are gathered from: " \
                   "not this gate's routing"
        bias = g.weight(b)
        if bias is None or bias.shape is None or bias.shape.rank() != 1:
            return f"selection: the bias {g.describe(b)} is not a [E] weight"
        k = g.const(topk.inputs[1])
        if k is None or k.size != 1:
            return "selection: TopK's k is not a constant"
        return Routing(g.weight(wg), int(k.reshape(-1)[0]), rs, bias, None, None)
    lookup = _hash_lookup(idx)
    if lookup is None:
        return f"selection: the expert indices come from {g.describe(idx)}, neither TopK(scores + bias) nor a " \
               "tid2eid row lookup"
    table, ids = lookup
    if not table.is_initializer() or table.dtype != ir.DataType.INT64 or table.shape is None or table.shape.rank() != 2:
        return f"selection: the looked-up table {g.describe(table)} is not an int64 [V, K] weight (tid2eid)"
    if ids.dtype != ir.DataType.INT64:
        return "selection: the hash lookup is not indexed by int64 token ids"
    return Routing(g.weight(wg), int(table.shape[1]), rs, None, table, ids)


class FuseMoE(pattern.RewriteRuleClassBase):
    """Routing + MoEExperts + shared add -> dsv4.MoE. The pattern holds the nodes between the scores and the
    layer output; check() walks back from the scores and the indices (scoring, gate, selection), because those
    values have other consumers inside the routing:

        x ─► Gemm(x, Wg, transB=1) ─► softplus ─► Sqrt ─► s          } walked in check():
        idx = TopK(s + bias, K).indices   |   tid2eid[ids]           }   learned | hash
        ───────────────────────────────── pattern ──────────────────────────────────
        s ──┐
        idx ┴► GatherElements(axis=1) ─► w ─► Div(w, ReduceSum(w, [-1])) ─► Mul(·, route_scale) ─► r
        x, r, idx, w1, w2, w3 ─► dsv4.MoEExperts ─► y ─► Add(y, shared) ─► out
    """

    def pattern(self, op, x, s, idx, axes, route_scale, w1, w2, w3, shared, gather_axis, keepdims, swiglu_limit,
                act_quant):
        w = op.GatherElements(s, idx, axis=gather_axis)
        r = op.Mul(op.Div(w, op.ReduceSum(w, axes, keepdims=keepdims)), route_scale)
        y = op.MoEExperts(x, r, idx, w1, w2, w3, swiglu_limit=swiglu_limit, act_quant=act_quant, _domain=DOMAIN)
        return op.Add(y, shared)

    def check(self, context, x, s, idx, axes, route_scale, shared, gather_axis, keepdims, **_) -> MatchResult:
        res = MatchResult()
        found = analyse(x, s, idx, route_scale, axes, gather_axis, keepdims)
        if isinstance(found, str):
            return res.fail(found)
        if not g.depends_on(shared, x):
            return res.fail(f"shared: the added {g.describe(shared)} is not computed from the layer input: not the "
                            "shared expert")
        return res

    def rewrite(self, op, x, s, idx, axes, route_scale, w1, w2, w3, shared, gather_axis, keepdims, swiglu_limit,
                act_quant, **_):
        r = analyse(x, s, idx, route_scale, axes, gather_axis, keepdims)
        e, k = r.gate_weight.shape[0], r.top_k
        fdt = np.float64 if r.gate_weight.dtype == ir.DataType.DOUBLE else np.float32  # the bias's type (F)
        bias = r.bias if r.bias is not None else op.Constant(value=ir.tensor(np.zeros(e, fdt)))
        table = r.tid2eid if r.tid2eid is not None else op.Constant(value=ir.tensor(np.zeros((1, k), np.int64)))
        ids = r.ids if r.ids is not None else op.Constant(value=ir.tensor(np.zeros(1, np.int64)))
        return op.MoE(x, r.gate_weight, bias, table, ids, w1, w2, w3, shared, _domain=DOMAIN, top_k=k,
                      route_scale=r.route_scale, swiglu_limit=float(swiglu_limit.value),
                      hash_routing=int(r.tid2eid is not None), act_quant=int(act_quant.value), scoring=SCORING)


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([FuseMoE.rule()], commute=True)


def explain(model: ir.Model) -> dict[str, str]:
    """For every dsv4.MoEExperts node of the main graph: 'fusable', or why the rule does not fuse it."""
    rule = FuseMoE()
    structural = pattern.Pattern(rule.pattern, name="FuseMoE structure")
    out = {}
    for node in model.graph:
        if node.op_type != "MoEExperts" or node.domain != DOMAIN:
            continue
        adds = [u.node for u in node.outputs[0].uses() if u.node.op_type == "Add"]
        reason = "no Add(y, shared) consumes the experts' output"
        for add in adds:
            m = structural.match(model, model.graph, add)
            if not m:
                reason = f"structure: {m.reason if m is not None else 'the routing weights are not GatherElements/Div/Mul'}"
                continue
            res = rule.check(None, **m.bindings)
            reason = "fusable" if res else res.reason
            break
        out[node.name] = reason
    return out


class FuseMoEPass(ir.passes.InPlacePass):
    """Apply FuseMoE to the main graph and drop the routing nodes it left dead."""

    def call(self, model: ir.Model):
        before = nodes(model)
        layers = sum(1 for node in model.graph if node.op_type == "MoEExperts" and node.domain == DOMAIN)
        n = rules().apply_to_model(model)
        if n:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        # every MoE layer becomes one dsv4.MoE node: the back ends' sparse paths (ORT's MoE/QMoE, NarrowMoE) need it
        left = {name: reason for name, reason in explain(model).items()}
        shortfall(f"fuse_moe: MoE layers fused into dsv4.MoE (expected one per MoE layer, {layers})", layers, left)
        return Counted(model, n > 0, {"MoE": n, "expected MoE": layers, "removed": before - nodes(model)})
