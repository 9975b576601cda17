"""RMSNorm -> ``SimplifiedLayerNormalization`` (ONNX Runtime's fused RMSNorm; ORT registers it in the ai.onnx domain,
with CPU and CUDA kernels), for ORT targets whose kernel table has it (passes/rules/*_kernels.tsv).

models/model.py RMSNorm is ``w * (x * rsqrt(mean(x^2, -1) + eps))`` in fp32; the exporter writes rsqrt as
Reciprocal(Sqrt). SimplifiedLayerNormalization(x, w, axis=-1, epsilon=eps, stash_type=1) computes the same in fp32
(ORT: mean of squares, sqrt(+eps), x / that * w): equal up to the rounding of 1/sqrt vs a division and of the
sum's order (checked by the parity test of the ort-cuda tiny graph on the CPU EP, tests/test_lower_cuda.py).
Norms without a weight (the mHC / score normalisations) are not this op's form and stay as they are.
"""

from __future__ import annotations

import numpy as np
import onnx.defs
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from . import _graph as g
from .cleanup import Counted
from .expect import shortfall, why_not


def register_schema() -> None:
    """ORT's schema of SimplifiedLayerNormalization (ai.onnx domain, since 1), so that onnx's checker and shape
    inference in this process (the export's full check) know the op; ORT registers the same in its own build."""
    if onnx.defs.has("SimplifiedLayerNormalization", ""):
        return
    s = onnx.defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]
    onnx.defs.register_schema(s(
        "SimplifiedLayerNormalization", "", 1, doc="ONNX Runtime's RMSNorm: X / sqrt(mean(X^2) + epsilon) * scale",
        inputs=[s.FormalParameter("X", "T"), s.FormalParameter("scale", "V")],
        outputs=[s.FormalParameter("Y", "V"),
                 s.FormalParameter("inv_std_var", "U", param_option=s.FormalParameterOption.Optional)],
        type_constraints=[("T", floats, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", floats, "")],
        attributes=[s.Attribute("axis", s.AttrType.INT, "", required=False),
                    s.Attribute("epsilon", s.AttrType.FLOAT, "", required=False),
                    s.Attribute("stash_type", s.AttrType.INT, "", required=False)]))


class FuseRMSNorm(pattern.RewriteRuleClassBase):
    """w * (x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2), [-1], keepdims=1) + eps))) -> SimplifiedLayerNormalization:

        x --Pow 2--ReduceMean(-1)--Add eps--Sqrt--Reciprocal--+
        |                                                     Mul(x, .)--Mul(w, .)--> y
        +-----------------------------------------------------+
    """

    def pattern(self, op, x, two, axes, eps, w):
        ms = op.ReduceMean(op.Pow(x, two), axes, keepdims=1)
        return op.Mul(w, op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(ms, eps)))))

    def check(self, context, x, two, axes, eps, w) -> MatchResult:
        res = MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return res.fail(f"x is {x.dtype}: fused for float32 graphs (the reference's fp32 norm)")
        two_, axes_, eps_ = g.const(two), g.const(axes), g.const(eps)
        if two_ is None or two_.size != 1 or float(two_.reshape(-1)[0]) != 2.0:
            return res.fail("the power is not the constant 2")
        if axes_ is None or axes_.reshape(-1).tolist() != [-1]:
            return res.fail("the mean is not over the last axis alone")
        if eps_ is None or eps_.size != 1:
            return res.fail("eps is not a scalar constant")
        if w.shape is None or w.shape.rank() != 1 or x.shape is None or w.shape[0] != x.shape[-1]:
            return res.fail(f"the scale {g.describe(w)} is not a vector over the normalised axis")
        if w.dtype != ir.DataType.FLOAT:
            return res.fail(f"the scale is {w.dtype}, not float32")
        return res

    def rewrite(self, op, x, two, axes, eps, w):
        y = op.SimplifiedLayerNormalization(x, w, axis=-1, epsilon=float(np.asarray(g.const(eps)).reshape(-1)[0]),
                                            stash_type=1)
        y.dtype, y.shape = x.dtype, x.shape  # keep the type for onnx shape inference elsewhere (the lint)
        return y  # the rewriter merges the replaced nodes' metadata (their layer scope) into the new node


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([FuseRMSNorm.rule()], commute=True)


def candidates(model: ir.Model) -> list[ir.Node]:
    """The final Mul of every weighted RMSNorm chain (Pow(x) -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul(x, .)
    -> Mul): what the pass must fuse, found without the rule's own checks. (The mHC head scales another tensor by
    x's statistic: not a norm of x, not a candidate.)"""
    out = []
    for node in model.graph:
        pw = g.producer(node.inputs[0], "Pow") if node.op_type == "ReduceMean" else None
        if pw is None:
            continue
        v, ok = node.outputs[0], True
        for op_type in ("Add", "Sqrt", "Reciprocal", "Mul", "Mul"):
            uses = v.uses()
            if len(uses) != 1 or uses[0].node.op_type != op_type:
                ok = False
                break
            if op_type == "Mul" and v.producer().op_type == "Reciprocal" and pw.inputs[0] not in uses[0].node.inputs:
                ok = False
                break
            v = uses[0].node.outputs[0]
        if ok:
            out.append(v.producer())
    return out


class FuseNormPass(ir.passes.InPlacePass):
    """Fuse every weighted float32 RMSNorm of the main graph into SimplifiedLayerNormalization; one that the rule
    refuses raises ExpectationError with the rule's reason."""

    def call(self, model: ir.Model) -> Counted:
        register_schema()
        want = candidates(model)
        n = rules().apply_to_model(model)
        if n:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        names = {node.name for node in model.graph}
        left = [node for node in want if node.name in names and node.graph is not None]
        shortfall("fuse_norm: RMSNorms fused into SimplifiedLayerNormalization", len(want),
                  {node.name: why_not(rules(), model, node) for node in left})
        return Counted(model, n > 0, {"SimplifiedLayerNormalization": n, "expected": len(want)})
