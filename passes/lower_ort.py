"""ONNX Runtime lowering of dsv4.MoE (the registry row's ``ort`` face): ``com.microsoft.MoE`` for float experts,
``com.microsoft.QMoE`` for MXFP4 experts, wherever the contrib op reproduces the node exactly (ECOSYSTEM.md V10,
proven again by tests/test_fuse_moe.py).

What ORT's ops can and cannot hold, and how the lowering bridges it (V10 §2, §5):

* selection by ``s + bias`` but mixing by ``s``: the float MoE op has no router_weights input. The selection stays
  outside (ONNX TopK, ties to the lower index as in the raw graph, or the tid2eid lookup) and is handed over in
  the log domain: ``router_probs = Log(ScatterElements(zeros, idx, s[idx], reduction=add))``: the op's softmax over
  all experts then gives exactly ``s[idx] / sum s[idx]`` to the selected and 0 to every other expert (QMoE softmaxes
  the k selected logits: the same weights). ``add`` keeps a tid2eid row that names one expert twice exact too.
* ``route_scale`` multiplies outside (inside the log it would be normalised away); the shared expert's output is
  added outside (it is an input of dsv4.MoE, computed by its own ops).
* SwiGLU: the CPU kernels only take interleaved fc1 rows ``[W1[0], W3[0], W1[1], ...]`` (swiglu_fusion=1) with
  ``activation_alpha=1, beta=0`` and ``swiglu_limit`` = V4's clamp (gate above, up both sides).
* weights: float stacks that are initializers get their interleaved fc1 as a derived initializer, written once by
  export.bind_weights (``DERIVED`` hook) or evaluated lazily on an already-bound model: no per-call copy. MXFP4
  stacks are re-encoded losslessly as int8 blocks of 32 (``q = 128 + 2·e2m1``, ``scale = 2^(e-128)``) for QMoE,
  which is exact only with ``ORT_QMOE_CPU_QNBIT_GEMM=fp32`` in the environment (runtimes/ort sets it). Other
  computed stacks (FP8 experts: e4m3 does not fit int8 blocks) are interleaved in the graph, once per call.

Where the op cannot be exact the node keeps its function body, and ``check`` says why (act_quant, dtypes).

Packed FP8/MXFP4 weights and the int8 re-encoding live in passes/ort_weights.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from dsv4.export.experts import EXPERT_MODES, EXPERTS_KEY
from dsv4.export.functions import DOMAIN, SOFTPLUS_THRESHOLD
from dsv4.models.config import FP4_BLOCK

from . import _graph as g
from .cleanup import Counted
from .derived import derived_initializer
from .expect import shortfall
from .expect import why_not as why
from .fuse_moe import SCORING
from .ort_weights import (  # noqa: F401  (re-exported: tests and the registry's ort face read them here)
    PACKED_OPS,
    ZERO_POINT,
    _dtype,
    _packed_weight,
    e8m0_to_q8_scale,
    expert_form,
    fp8_rules,
    interleave,
    mxfp4_dequantize_linear,
    mxfp4_rules,
    mxfp4_to_q8,
)

MS = "com.microsoft"
QMOE_ENV = {"ORT_QMOE_CPU_QNBIT_GEMM": "fp32"}  # QMoE int8 blocks: dequantise + SGEMM (exact), not int8 activations
QMOE_BITS = 8


# ---- the rule ------------------------------------------------------------------------------------------------
def why_not(x, w1, w2, w3, shared, act_quant: ir.Attr, scoring: ir.Attr) -> str | None:
    """None when the contrib ops reproduce this dsv4.MoE node exactly, else the reason its body stays."""
    if act_quant.value:
        return ("act_quant=1: the reference quantises h = silu(g)·u·w to FP8 per 128 channels between the SwiGLU and "
                "W2, inside each expert; MoE/QMoE have no hook there, so the function body stays")
    if scoring.value != SCORING:
        return f"scoring {scoring.value!r}: the lowering computes {SCORING} scores only"
    typed = [("shared", shared)] if shared.dtype is not None else []  # only added: a mismatch fails loudly in ORT
    for name, v in (("x", x), ("w1", w1), ("w2", w2), ("w3", w3), *typed):
        if _dtype(v) != ir.DataType.FLOAT:
            return (f"{name} is {_dtype(v)}: the lowering is proven for float32 (ORT's CPU MoE has no double or bfloat16 "
                    "kernel; float16 would round differently from the reference)")
    return None


def route(op, logits: ir.Value, bias: ir.Value, tid2eid: ir.Value, ids: ir.Value, k: int, hashed: bool):
    """(scores, expert ids) of the MoE body's routing: s = sqrt(softplus(logits)) (softplus as torch's, linear
    above its threshold); idx = tid2eid[ids] on hash layers, else TopK(s + bias, k) (ties to the lower index)."""
    s = op.Sqrt(op.Where(op.Greater(logits, op.Constant(value_float=SOFTPLUS_THRESHOLD)), logits,
                         op.Softplus(logits)))
    if hashed:
        return s, op.Gather(tid2eid, ids, axis=0)
    _, idx = op.TopK(op.Add(s, bias), op.Constant(value_ints=[k]), axis=-1, largest=1, sorted=1, _outputs=2)
    return s, idx


class LowerMoE(pattern.RewriteRuleClassBase):
    """dsv4.MoE -> routing ops + com.microsoft.MoE / QMoE + route scale + shared add:

        s   = Sqrt(softplus(Gemm(x, Wg, transB=1)))
        idx = TopK(s + bias, K).indices   |   Gather(tid2eid, ids)
        rp  = Log(ScatterElements(zeros [N,E], idx, GatherElements(s, idx), axis=1, reduction=add))
        y   = MoE(x, rp, fc1 interleaved, -, w2) | QMoE(x, rp, q8(fc1), scales, -, q8(w2), scales)
        out = y * route_scale + shared

    ``qmoe=False`` (a runtime without an exact QMoE kernel for the graph's activations, e.g. the CUDA EP): MXFP4
    stacks stay computed (their dequant nodes lower to DequantizeLinear) and feed the float MoE.
    """

    def __init__(self, qmoe: bool = True, packed: bool = False):
        super().__init__("LowerMoE" if qmoe else "LowerMoE(no QMoE)")
        self.qmoe, self.packed = qmoe, packed

    def pattern(self, op, x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, top_k, route_scale, swiglu_limit,
                hash_routing, act_quant, scoring):
        return op.MoE(x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, _domain=DOMAIN, top_k=top_k,
                      route_scale=route_scale, swiglu_limit=swiglu_limit, hash_routing=hash_routing,
                      act_quant=act_quant, scoring=scoring)

    def check(self, context, x, w1, w2, w3, shared, act_quant, scoring, **_) -> MatchResult:
        res = MatchResult()
        reason = why_not(x, w1, w2, w3, shared, act_quant, scoring)
        if reason is None and self.packed and expert_form(w1, w2, w3)[0] == "mxfp4":
            reason = f"{EXPERTS_KEY}=packed: the MXFP4 stacks stay packed, NarrowMoE dequantises the selected experts"
        return res.fail(reason) if reason else res

    def rewrite(self, op, x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, top_k, route_scale, swiglu_limit,
                hash_routing, **_):
        k, limit = int(top_k.value), float(swiglu_limit.value)
        logits = op.Gemm(x, gate_weight, transB=1)  # as exported (why_not: all float32)
        s, idx = route(op, logits, bias, tid2eid, ids, k, hash_routing.value)
        zeros = op.ConstantOfShape(op.Shape(s), value=ir.tensor(np.zeros(1, np.float32)))
        rp = op.Log(op.ScatterElements(zeros, idx, op.GatherElements(s, idx, axis=1), axis=1, reduction="add"))
        attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                     normalize_routing_weights=0, _domain=MS)
        if limit > 0:
            attrs["swiglu_limit"] = limit  # else ORT's default +inf: no clamp, as the reference with limit 0
        form, src = expert_form(w1, w2, w3)
        if form == "mxfp4" and self.qmoe:
            (q1, s1), (q2, s2), (q3, s3) = src
            e, inter, half = (int(d) for d in q1.shape)
            dim = 2 * half
            base = q1.name.rsplit(".", 2)[0]  # "layers.N.ffn.experts"
            fc1 = derived_initializer(op, f"{base}.fc1.q8", ir.DataType.UINT8, (e, 2 * inter, dim), [q1, q3],
                                      lambda a, b: interleave(mxfp4_to_q8(a), mxfp4_to_q8(b)))
            fc1s = derived_initializer(op, f"{base}.fc1.q8_scale", ir.DataType.FLOAT, (e, 2 * inter, dim // FP4_BLOCK),
                                       [s1, s3], lambda a, b: interleave(e8m0_to_q8_scale(a), e8m0_to_q8_scale(b)))
            fc2 = derived_initializer(op, f"{base}.fc2.q8", ir.DataType.UINT8, (e, dim, inter), [q2], mxfp4_to_q8)
            fc2s = derived_initializer(op, f"{base}.fc2.q8_scale", ir.DataType.FLOAT, (e, dim, inter // FP4_BLOCK),
                                       [s2], e8m0_to_q8_scale)
            y = op.QMoE(x, rp, fc1, fc1s, None, fc2, fc2s, None, expert_weight_bits=QMOE_BITS, block_size=FP4_BLOCK,
                        **attrs)
        elif form == "float":
            v1, v2, v3 = src
            e, inter, dim = (int(d) for d in v1.shape)
            base = v1.name.rsplit(".", 2)[0]
            fc1 = derived_initializer(op, f"{base}.fc1.weight", ir.DataType.FLOAT, (e, 2 * inter, dim), [v1, v3],
                                      interleave)
            y = op.MoE(x, rp, fc1, None, v2, **attrs)
        else:  # computed stacks (FP8 experts; MXFP4 without QMoE), dequantised in the graph: interleave per call
            pair = op.Concat(op.Unsqueeze(w1, op.Constant(value_ints=[2])), op.Unsqueeze(w3, op.Constant(value_ints=[2])),
                             axis=2)  # [E, I, 2, D]
            shape = op.Concat(op.Shape(w1, end=1), op.Constant(value_ints=[-1]), op.Shape(w1, start=2), axis=0)
            y = op.MoE(x, rp, op.Reshape(pair, shape), None, w2, **attrs)
        out = op.Add(op.Mul(y, op.Constant(value_float=float(route_scale.value))), shared)
        for node in op.nodes:  # census: these nodes implement the dsv4.MoE node
            node.metadata_props[g.DSV4_OP_KEY] = "MoE"
        return out


# ---- a MoE that keeps its body (act_quant=1) over MXFP4 stacks: dequantise only the experts some token selected --
class NarrowMoE(pattern.RewriteRuleClassBase):
    """dsv4.MoE (act_quant=1, MXFP4 expert stacks) -> its body's routing, the experts' stacks narrowed to the U
    experts any token selected, dequantised by DequantizeLinear, and dsv4.MoEExperts over those U experts:

        idx, w  = the body's routing (s = sqrt(softplus(x Wg^T)); TopK(s + bias) | tid2eid[ids]; normalise; scale)
        used    = experts that occur in idx  [E];  eids = NonZero(used) [U];  pos = CumSum(used) - 1
        y       = MoEExperts(x, w, pos[idx], DQ(q8_1[eids]), DQ(q8_2[eids]), DQ(q8_3[eids])) + shared

    The body runs every expert on every token with routing weight 0 for the unselected ones, whose rows are exact
    zeros in its sum over experts: dropping them leaves the same numbers. At decode (N·top_k < E) it dequantises
    at most N·top_k experts instead of E; at prefill U -> E and the cost is the body's (on ort-cpu and ort-cuda
    select_ops then runs the U experts one per trip of a Loop, so that memory stays one expert's:
    passes/chunk_experts.py).
    """

    def pattern(self, op, x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, top_k, route_scale, swiglu_limit,
                hash_routing, act_quant, scoring):
        return op.MoE(x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, _domain=DOMAIN, top_k=top_k,
                      route_scale=route_scale, swiglu_limit=swiglu_limit, hash_routing=hash_routing,
                      act_quant=act_quant, scoring=scoring)

    def __init__(self, packed: bool = False):
        super().__init__("NarrowMoE(packed)" if packed else "NarrowMoE")
        self.packed = packed

    def check(self, context, x, w1, w2, w3, act_quant, scoring, **_) -> MatchResult:
        if not act_quant.value and not self.packed:
            return MatchResult().fail("act_quant=0: LowerMoE's contrib op takes this MoE")
        if _dtype(x) != ir.DataType.FLOAT:
            return MatchResult().fail(f"x is {_dtype(x)}: the routing here is written for float32 graphs (an fp64 "
                                      "body computes its scores in fp64 and keeps them)")
        if scoring.value != SCORING:
            return MatchResult().fail(f"scoring {scoring.value!r}: the routing here is {SCORING}")
        form, src = expert_form(w1, w2, w3)
        if form != "mxfp4":
            return MatchResult().fail(f"{form} expert stacks: only MXFP4 initializer stacks are narrowed")
        for q, sc in src:
            reason = _packed_weight(q, sc)
            if reason:
                return MatchResult().fail(reason)
        return MatchResult()

    def rewrite(self, op, x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, top_k, route_scale, swiglu_limit,
                hash_routing, act_quant, scoring):
        f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
        logits = op.MatMul(op.Cast(x, to=f32), op.Transpose(op.Cast(gate_weight, to=f32), perm=[1, 0]))
        s, idx = route(op, logits, op.Cast(bias, to=f32), tid2eid, ids, int(top_k.value), hash_routing.value)
        w = op.GatherElements(s, idx, axis=1)
        w = op.Mul(op.Div(w, op.ReduceSum(w, op.Constant(value_ints=[-1]), keepdims=1)),
                   op.Constant(value_float=float(route_scale.value)))
        (q1, s1), (q2, s2), (q3, s3) = expert_form(w1, w2, w3)[1]
        n_exp = op.Constant(value_int=int(q1.shape[0]))
        every = op.Range(op.Constant(value_int=0), n_exp, op.Constant(value_int=1))  # [E]
        hit = op.Equal(op.Unsqueeze(op.Reshape(idx, op.Constant(value_ints=[-1])), op.Constant(value_ints=[1])), every)
        used = op.ReduceMax(op.Cast(hit, to=i64), op.Constant(value_ints=[0]), keepdims=0)  # [E] 0/1
        eids = op.Reshape(op.NonZero(used), op.Constant(value_ints=[-1]))  # [U]
        pos = op.Sub(op.CumSum(used, op.Constant(value_int=0)), op.Constant(value_int=1))  # expert -> its row in eids
        stacks = [op.Mxfp4Dequant(op.Gather(q, eids, axis=0), op.Gather(sc, eids, axis=0), _domain=DOMAIN)
                  if self.packed else mxfp4_dequantize_linear(op, q, sc, eids) for q, sc in ((q1, s1), (q2, s2), (q3, s3))]
        y = op.MoEExperts(x, w, op.Gather(pos, idx, axis=0), *stacks, swiglu_limit=float(swiglu_limit.value),
                          act_quant=int(act_quant.value), _domain=DOMAIN)
        out = op.Add(y, op.Cast(shared, to=f32))
        for node in op.nodes:  # census: these nodes implement the dsv4.MoE node
            node.metadata_props[g.DSV4_OP_KEY] = "MoE"
        return out


def rules(qmoe: bool = True, packed: bool = False) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([LowerMoE.rule(qmoe, packed)])


def narrow_rules(packed: bool = False) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([NarrowMoE.rule(packed)])


def experts_of(model: ir.Model) -> str:
    """How MXFP4 expert stacks are stored: ``model.meta[EXPERTS_KEY]`` as the export set it (``--experts``), else
    "int8" (QMoE's lossless int8 re-encoding)."""
    mode = model.meta.get(EXPERTS_KEY, "int8")
    if mode not in EXPERT_MODES:
        raise ValueError(f"{EXPERTS_KEY}: {mode!r} is not one of {', '.join(EXPERT_MODES)}")
    return mode


def expected_moe(model: ir.Model, packed: bool = False) -> tuple[list[str], list[str]]:
    """(dsv4.MoE nodes LowerMoE must lower, nodes NarrowMoE must narrow), by what the target promises rather than by
    the rules' own checks: every float32 MoE with act_quant=0 runs as MoE/QMoE, every float32 act_quant=1 MoE over
    MXFP4 initializer stacks is narrowed. fp64 graphs (exactness artifacts) keep their bodies by design."""
    lower, narrow = [], []
    for node in model.graph:
        if node.op_type != "MoE" or node.domain != DOMAIN or _dtype(node.inputs[0]) != ir.DataType.FLOAT:
            continue
        w1, w2, w3 = node.inputs[5:8]
        if packed and expert_form(w1, w2, w3)[0] == "mxfp4":
            narrow.append(node.name)
        elif not node.attributes["act_quant"].value:
            if all(_dtype(w) == ir.DataType.FLOAT for w in (w1, w2, w3)):
                lower.append(node.name)
        elif expert_form(w1, w2, w3)[0] == "mxfp4":
            narrow.append(node.name)
    return lower, narrow


def explain(model: ir.Model) -> dict[str, str]:
    """For every dsv4.MoE node of the main graph: the ORT op it lowers to, or why its body stays."""
    out = {}
    for node in model.graph:
        if node.op_type == "MoE" and node.domain == DOMAIN:
            x, _, _, _, _, w1, w2, w3, shared = node.inputs
            reason = why_not(x, w1, w2, w3, shared, node.attributes["act_quant"], node.attributes["scoring"])
            out[node.name] = reason or ("QMoE" if expert_form(w1, w2, w3)[0] == "mxfp4" else "MoE")
    return out


class LowerOrtPass(ir.passes.InPlacePass):
    """Lower every dsv4.MoE node that ORT's contrib ops reproduce; the others keep their bodies (see explain).
    `name` labels the expectation errors; ``qmoe=False``: MXFP4 experts go through DequantizeLinear + MoE."""

    def __init__(self, name: str = "lower_ort", qmoe: bool = True):
        super().__init__()
        self.name, self.qmoe = name, qmoe

    def call(self, model: ir.Model):
        packed = experts_of(model) == "packed"
        want_lower, want_narrow = expected_moe(model, packed)
        n = rules(self.qmoe, packed).apply_to_model(model)  # first: it looks through the experts' dequant nodes
        if n:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        narrowed = narrow_rules(packed).apply_to_model(model)  # the MoEs that LowerMoE refused
        if narrowed:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        fp8 = fp8_rules().apply_to_model(model)
        fp4 = mxfp4_rules().apply_to_model(model)  # stacks of a MoE neither rule took (computed, shared...)
        if fp8 or fp4:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        ops = Counter(node.op_type for node in model.graph if node.domain == MS)
        by_name = {node.name: node for node in model.graph}
        shortfall(f"{self.name}: dsv4.MoE nodes lowered to com.microsoft.MoE/QMoE (float32, act_quant=0)",
                  len(want_lower), {k: why(rules(self.qmoe, packed), model, by_name[k]) for k in want_lower
                                    if k in by_name})
        shortfall(f"{self.name}: dsv4.MoE nodes narrowed (float32, act_quant=1 or packed experts, MXFP4 stacks)",
                  len(want_narrow), {k: why(narrow_rules(packed), model, by_name[k]) for k in want_narrow if k in by_name})
        packed = [node for node in model.graph if node.domain == DOMAIN and node.op_type in PACKED_OPS
                  and _packed_weight(*node.inputs[-2:]) is None]  # uint8 initializers only this node reads
        shortfall(f"{self.name}: packed FP8/MXFP4 weights dequantised by DequantizeLinear", fp8 + fp4 + len(packed),
                  {node.name: why(fp8_rules() if node.op_type.startswith("Fp8") else mxfp4_rules(), model, node)
                   for node in packed})
        return Counted(model, n + narrowed + fp8 + fp4 > 0,
                       {"lowered": n, **{f"{MS}.{k}": v for k, v in sorted(ops.items())}, "narrowed MoE": narrowed,
                        "DequantizeLinear (FP8)": fp8, "DequantizeLinear (MXFP4)": fp4})
