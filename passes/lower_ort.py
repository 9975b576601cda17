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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import torch
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from dsv4.export.export import DERIVED
from dsv4.export.functions import DOMAIN, SOFTPLUS_THRESHOLD
from dsv4.models import quant
from dsv4.models.config import FP4_BLOCK

from . import _graph as g
from .cleanup import Counted
from .fuse_moe import SCORING

MS = "com.microsoft"
QMOE_ENV = {"ORT_QMOE_CPU_QNBIT_GEMM": "fp32"}  # QMoE int8 blocks: dequantise + SGEMM (exact), not int8 activations
QMOE_BITS = 8
ZERO_POINT = 128  # QMoE's default 8-bit zero point


# ---- derived weights -----------------------------------------------------------------------------------------
Members = Callable[[str, ir.DataType, tuple[int, ...]], Iterator[torch.Tensor]]  # stacked name -> its experts


@dataclass(frozen=True)
class Derived:
    """A weight computed expert by expert from stacked weights [E, ...] (a re-layout). export.bind_weights calls it
    with a reader of the source's experts (``v.meta[DERIVED]``) and writes the parts back to back."""

    sources: tuple[tuple[str, ir.DataType, tuple[int, ...]], ...]
    fn: Callable[..., torch.Tensor]  # one expert's source slices -> its slice of this weight

    def __call__(self, members: Members) -> Iterator[torch.Tensor]:
        for parts in zip(*(members(n, dt, shape) for n, dt, shape in self.sources)):
            yield self.fn(*parts).contiguous()


def _from_values(values: list[ir.Value]) -> Members:
    """Reader of experts from bound initializers (a model loaded from an artifact)."""
    by_name = {v.name: v for v in values}

    def members(name, dtype, shape):
        arr = by_name[name].const_value.numpy()
        return (torch.from_numpy(np.array(arr[e])) for e in range(arr.shape[0]))

    return members


def derived_initializer(op, name: str, dtype: ir.DataType, shape: tuple[int, ...], sources: list[ir.Value],
                        fn: Callable[..., torch.Tensor]) -> ir.Value:
    spec = Derived(tuple((v.name, v.dtype, tuple(int(d) for d in v.shape)) for v in sources), fn)

    def evaluate():  # only when the sources hold data; during export bind_weights writes it instead
        return ir.tensor(torch.stack(list(spec(_from_values(sources)))).numpy(), name=name)

    value = op.initializer(ir.LazyTensor(evaluate, dtype, ir.Shape(shape), name=name), name=name)
    value.meta[DERIVED] = spec
    return value


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows [a0, b0, a1, b1, ...]: fc1 of ORT's interleaved SwiGLU from W1 (gate) and W3 (up)."""
    return torch.stack([a, b], 1).flatten(0, 1)


_Q8_LUT = torch.tensor([ZERO_POINT + 2 * v for v in quant.E2M1_VALUES], dtype=torch.float32).to(torch.uint8)


def mxfp4_to_q8(packed: torch.Tensor) -> torch.Tensor:
    """MXFP4 codes -> QMoE int8 (zero point 128): q - 128 = 2·e2m1, an integer in [-12, 12]."""
    return _Q8_LUT[quant.mxfp4_unpack(packed).long()]


def e8m0_to_q8_scale(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 code -> the fp32 scale of the int8 block: 2^(e-127) / 2 (exact for every code; 255 stays NaN)."""
    return quant.e8m0_decode(scale) * 0.5


# ---- the rule ------------------------------------------------------------------------------------------------
def expert_form(w1: ir.Value, w2: ir.Value, w3: ir.Value) -> tuple[str, list]:
    """("float", [w1, w2, w3] initializers) | ("mxfp4", [(packed, scale)] x3 initializers) | ("computed", [])."""
    inits = [g.weight(w) for w in (w1, w2, w3)]
    if all(v is not None and v.dtype == ir.DataType.FLOAT for v in inits):
        return "float", inits
    deq = [g.producer(w, "Mxfp4Dequant", domain=DOMAIN) for w in (w1, w2, w3)]
    if all(d is not None and d.inputs[0].is_initializer() and d.inputs[1].is_initializer() for d in deq):
        return "mxfp4", [(d.inputs[0], d.inputs[1]) for d in deq]
    return "computed", []


def _dtype(v: ir.Value) -> ir.DataType | None:
    """v's element type; the exporter leaves the outputs of dsv4 dequant nodes untyped (they are float32)."""
    if v.dtype is None and g.producer(v, "Mxfp4Dequant", "Fp8Dequant", domain=DOMAIN) is not None:
        return ir.DataType.FLOAT
    return v.dtype


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


class LowerMoE(pattern.RewriteRuleClassBase):
    """dsv4.MoE -> routing ops + com.microsoft.MoE / QMoE + route scale + shared add:

        s   = Sqrt(softplus(Gemm(x, Wg, transB=1)))
        idx = TopK(s + bias, K).indices   |   Gather(tid2eid, ids)
        rp  = Log(ScatterElements(zeros [N,E], idx, GatherElements(s, idx), axis=1, reduction=add))
        y   = MoE(x, rp, fc1 interleaved, -, w2) | QMoE(x, rp, q8(fc1), scales, -, q8(w2), scales)
        out = y * route_scale + shared
    """

    def pattern(self, op, x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, top_k, route_scale, swiglu_limit,
                hash_routing, act_quant, scoring):
        return op.MoE(x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, _domain=DOMAIN, top_k=top_k,
                      route_scale=route_scale, swiglu_limit=swiglu_limit, hash_routing=hash_routing,
                      act_quant=act_quant, scoring=scoring)

    def check(self, context, x, w1, w2, w3, shared, act_quant, scoring, **_) -> MatchResult:
        res = MatchResult()
        reason = why_not(x, w1, w2, w3, shared, act_quant, scoring)
        return res.fail(reason) if reason else res

    def rewrite(self, op, x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, top_k, route_scale, swiglu_limit,
                hash_routing, **_):
        k, limit = int(top_k.value), float(swiglu_limit.value)
        logits = op.Gemm(x, gate_weight, transB=1)  # as exported (why_not: all float32)
        s = op.Sqrt(op.Where(op.Greater(logits, op.Constant(value_float=SOFTPLUS_THRESHOLD)), logits,
                             op.Softplus(logits)))
        if hash_routing.value:
            idx = op.Gather(tid2eid, ids, axis=0)
        else:
            _, idx = op.TopK(op.Add(s, bias), op.Constant(value_ints=[k]), axis=-1, largest=1, sorted=1, _outputs=2)
        zeros = op.ConstantOfShape(op.Shape(s), value=ir.tensor(np.zeros(1, np.float32)))
        rp = op.Log(op.ScatterElements(zeros, idx, op.GatherElements(s, idx, axis=1), axis=1, reduction="add"))
        attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                     normalize_routing_weights=0, _domain=MS)
        if limit > 0:
            attrs["swiglu_limit"] = limit  # else ORT's default +inf: no clamp, as the reference with limit 0
        form, src = expert_form(w1, w2, w3)
        if form == "mxfp4":
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
        else:  # computed stacks (e.g. FP8 experts dequantised in the graph): interleave per call
            pair = op.Concat(op.Unsqueeze(w1, op.Constant(value_ints=[2])), op.Unsqueeze(w3, op.Constant(value_ints=[2])),
                             axis=2)  # [E, I, 2, D]
            shape = op.Concat(op.Shape(w1, end=1), op.Constant(value_ints=[-1]), op.Shape(w1, start=2), axis=0)
            y = op.MoE(x, rp, op.Reshape(pair, shape), None, w2, **attrs)
        out = op.Add(op.Mul(y, op.Constant(value_float=float(route_scale.value))), shared)
        for node in op.nodes:  # census: these nodes implement the dsv4.MoE node
            node.metadata_props[g.DSV4_OP_KEY] = "MoE"
        return out


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([LowerMoE.rule()])


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
    """Lower every dsv4.MoE node that ORT's contrib ops reproduce; the others keep their bodies (see explain)."""

    def call(self, model: ir.Model):
        n = rules().apply_to_model(model)
        if n:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        ops = Counter(node.op_type for node in model.graph if node.domain == MS)
        return Counted(model, n > 0, {"lowered": n, **{f"{MS}.{k}": v for k, v in sorted(ops.items())}})
