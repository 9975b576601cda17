"""Bit-identical expert parallelism (issue [11], docs/scale.md "Sum order"): exchange each token's per-slot routed
terms and add them in the single-rank order, instead of all-reducing per-rank partial sums.

The single-rank MoEExperts body ends with ``y = ReduceSum(Y, axis 0)`` over its U used experts in ascending expert
id, Y [U, N, D] holding exact zeros where a token did not select an expert; ONNX Runtime's ReduceSum over the
leading axis is a sequential fold (checked: 300 random shapes, zero rows anywhere), so a token's output is its
selected experts' terms added one by one in ascending id. With partial sums (ShardExperts alone) each rank folds its
own terms first and the all-reduce adds the partials: the same terms regrouped, ulps apart for top-k > 2, which the
quantisation simulations downstream can turn into flipped FP8 / indexer decisions. This pass, run last (after the
MoEExperts bodies are inlined), rewrites every all-reduce of a rank template:

    Y [U_l, N, D]   (the inlined body's input to its final ReduceSum, which is dropped)
    slots[n, j] = Y[pidx[n, j], n]  where slot j of token n is this rank's and names no expert an earlier slot named,
                  else 0                                                                  [N, k, D]
    slots = Dsv4AllReduce(slots)    every slot has one owner: the sum adds exact zeros, the terms arrive unchanged
    y = ReduceSum(Transpose(slots sorted by expert id, [1, 0, 2]), axis 0)  the single-rank fold, term for term

A hash layer's tid2eid row may name one expert twice: the single-rank row already carries both weights, so the later
slot is zeroed. Cost: k times the all-reduce payload (k·dim·4 bytes per token per layer), a few gathers; no extra
expert work.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from .cleanup import Counted
from .shard_experts import ALL_REDUCE, COLLECTIVE_DOMAIN, SLOTS


def _ints(v: ir.Value) -> list[int] | None:
    t = v.const_value
    if t is None and v.producer() is not None and v.producer().op_type == "Constant":
        a = v.producer().attributes.get("value")
        t = a.value if a is not None else None
    return None if t is None else [int(x) for x in np.asarray(t.numpy()).reshape(-1)]


class OrderedSum(ir.passes.InPlacePass):
    """Every Dsv4AllReduce of a rank template (made by ShardExperts) -> the per-slot exchange (module docstring)."""

    def call(self, model: ir.Model) -> Counted:
        g = model.graph
        values = {v.name: v for node in g for v in node.outputs if v.name}
        layers = [n for n in g if n.domain == COLLECTIVE_DOMAIN and n.op_type == ALL_REDUCE]
        for ar in layers:
            self._rewrite(g, ar, values)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.TopologicalSortPass()(model)
        return Counted(model, bool(layers), {"ordered all-reduces": len(layers)})

    @staticmethod
    def _rewrite(g: ir.Graph, ar: ir.Node, values: dict[str, ir.Value]) -> None:
        names = json.loads(ar.metadata_props.get(SLOTS, "null") or "null")
        if not names or any(names[k] not in values for k in ("pidx", "rel", "valid")):
            raise ValueError(f"ordered_sum: {ar.name} lacks the slot values ShardExperts named ({names})")
        pidx, rel, valid = (values[names[k]] for k in ("pidx", "rel", "valid"))
        rs = ar.inputs[0].producer()
        if rs is None or rs.op_type != "ReduceSum" or rs.attributes.get_int("keepdims", 1) != 0 \
                or len(rs.inputs) < 2 or _ints(rs.inputs[1]) != [0]:
            raise ValueError(f"ordered_sum: {ar.name}'s input is not the MoEExperts body's ReduceSum over experts")
        y_terms = rs.inputs[0]  # [U_l, N, D]
        tag = ar.name or "moe"
        new: list[ir.Node] = []

        def op(op_type, inputs, **attrs):
            n = ir.node(op_type, inputs, attributes=attrs, name=f"{tag}/ordered/{op_type}_{len(new)}")
            new.append(n)
            return n.outputs[0]

        def const(value, dtype=np.int64):
            return op("Constant", [], value=ir.tensor(np.asarray(value, dtype=dtype)))

        ax1, ax2, ax0 = const([1]), const([2]), const([0])
        # slot j of token n repeats an expert of slot j' < j: dup[n, j]
        k = op("Shape", [rel], start=1, end=2)  # [1]
        r = op("Range", [const(0), op("Squeeze", [k, ax0]), const(1)])  # [k]
        earlier = op("Less", [op("Unsqueeze", [r, ax0]), op("Unsqueeze", [r, ax1])])  # [k(j), k(j')]: j' < j
        same = op("Equal", [op("Unsqueeze", [rel, ax2]), op("Unsqueeze", [rel, ax1])])  # [N, k, k]
        dup = op("ReduceMax", [op("Cast", [op("And", [same, earlier])], to=ir.DataType.INT64), ax2], keepdims=0)
        keep = op("And", [valid, op("Equal", [dup, const(0)])])  # [N, k]
        # this rank's term of each slot
        shape = op("Concat", [op("Shape", [rel]), op("Shape", [y_terms], start=2, end=3)], axis=0)  # [N, k, D]
        at = op("Expand", [op("Unsqueeze", [op("Max", [pidx, const(0)]), ax2]), shape])
        terms = op("GatherElements", [op("Transpose", [y_terms], perm=[1, 0, 2]), at], axis=1)  # [N, k, D]
        slots = op("Where", [op("Unsqueeze", [keep, ax2]), terms, const(0.0, np.float32)])
        g.insert_before(ar, new)
        uses = list(ar.outputs[0].uses())
        ar.replace_input_with(0, slots)
        ar.outputs[0].shape = None
        new.clear()
        # every slot's term, from its owner: added in ascending expert id (ties: duplicates, zeroed above)
        topk = ir.node("TopK", [rel, k], attributes={"axis": 1, "largest": 0, "sorted": 1}, num_outputs=2,
                       name=f"{tag}/ordered/TopK")
        new.append(topk)
        order = topk.outputs[1]  # [N, k]: slots by ascending expert id
        at2 = op("Expand", [op("Unsqueeze", [order, ax2]), shape])
        ordered = op("GatherElements", [ar.outputs[0], at2], axis=1)
        out = op("ReduceSum", [op("Transpose", [ordered], perm=[1, 0, 2]), ax0], keepdims=0)  # [N, D]
        out.dtype = ir.DataType.FLOAT
        g.insert_after(ar, new)
        for use in uses:
            use.node.replace_input_with(use.idx, out)
