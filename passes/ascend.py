"""The ascend profile's graph rewrites (docs/ascend.md), after every dsv4 op is inlined:

* ``GatherND`` with ``batch_dims`` > 0 -> ``Gather`` on the batch-flattened data (CANN's parser: "batch_dims must
  be 0", passes/rules/ascend/atc_onnx_ops.tsv);
* two-operand ``Einsum`` -> ``Transpose`` / ``Reshape`` / ``MatMul`` (Einsum is not in ORT's CANN EP graph-mode list,
  cann_ep_graph_ops.txt); the contraction is the same sum, so fp32 results move by accumulation order only;
* ``Cast(x, to=FLOAT8E4M3FN)`` -> ``Cast(to=float)`` (the FP8 simulation's round trip, in the inlined bodies and in
  what the tracer emitted for the KV simulation) -> the same rounding in fp32 arithmetic, no float8 tensor (Atlas
  A2/A3/310P have none, NOTES.md §3): Clip to +-448 (the Cast saturates), e = max(floor(log2|q|), -6),
  Round(q / 2^(e-3)) * 2^(e-3) with ties to even like the Cast; bit-exact (tests/test_ascend.py);
* ``Loop`` with a constant trip count (the 20 Sinkhorn iterations) unrolled: CANN's parser has no Loop;
* ``IsInf`` -> ``Equal`` against the infinities (IsInf is not in the CANN EP graph-mode list);
* the dsv4 opset import and the (now unused) model-local functions removed: one opset import, ai.onnx.

Static shapes are required (the ascend target has no symbolic dim): a node whose shapes are unknown is an error.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from dsv4.export.functions import DOMAIN

from .cleanup import Counted


def _const(graph: ir.Graph, before: ir.Node, values, dtype=np.int64) -> ir.Value:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(values, dtype=dtype))})
    graph.insert_before(before, node)
    return node.outputs[0]


def _add(graph: ir.Graph, before: ir.Node, op: str, inputs, **attrs) -> ir.Value:
    node = ir.node(op, list(inputs), attributes=attrs)
    graph.insert_before(before, node)
    return node.outputs[0]


def _dims(v: ir.Value, node: ir.Node) -> list[int]:
    if v.shape is None or not all(isinstance(d, int) for d in v.shape):
        raise ValueError(f"ascend: {node.op_type} node {node.name!r}: input {v.name!r} has no static shape "
                         f"({v.shape}); the ascend profile needs every dim fixed")
    return [int(d) for d in v.shape]


def _replace(graph: ir.Graph, node: ir.Node, out: ir.Value) -> None:
    old = node.outputs[0]
    out.shape, out.type, name = old.shape, old.type, old.name
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = name  # the same value name: graph outputs and value_info keep it


def gather_nd_batch(graph: ir.Graph, node: ir.Node) -> None:
    """GatherND(data [B, N, *D], idx [B, *J, 1], batch_dims=1) == Gather(data as [B*N, *D], idx + b*N, axis=0)."""
    data, idx = node.inputs
    dd, di = _dims(data, node), _dims(idx, node)
    if node.attributes["batch_dims"].as_int() != 1 or di[-1] != 1:
        raise ValueError(f"ascend: GatherND {node.name!r}: only batch_dims=1 with one index column is rewritten")
    B, N = dd[0], dd[1]
    flat = _add(graph, node, "Reshape", [data, _const(graph, node, [B * N, *dd[2:]])])
    off = _const(graph, node, (np.arange(B) * N).reshape([B] + [1] * (len(di) - 2)), idx.dtype.numpy())
    col = _add(graph, node, "Reshape", [idx, _const(graph, node, di[:-1])])
    out = _add(graph, node, "Gather", [flat, _add(graph, node, "Add", [col, off])], axis=0)
    _replace(graph, node, out)


def einsum_to_matmul(graph: ir.Graph, node: ir.Node) -> None:
    """A two-operand Einsum without repeated or broadcast indices as one (batched) MatMul."""
    eq = node.attributes["equation"].as_string().replace(" ", "")
    ins, out = eq.split("->")
    a, b = ins.split(",")
    (x, y), (dx, dy) = node.inputs, (_dims(node.inputs[0], node), _dims(node.inputs[1], node))
    size = dict(zip(a, dx)) | dict(zip(b, dy))
    if len(set(a)) < len(a) or len(set(b)) < len(b) or any(size[c] != d for c, d in zip(a + b, dx + dy)):
        raise ValueError(f"ascend: Einsum {node.name!r} {eq!r}: repeated or broadcast indices are not rewritten")
    batch = [c for c in out if c in a and c in b]
    left, right = [c for c in out if c in a and c not in b], [c for c in out if c in b and c not in a]
    contr = [c for c in a if c in b and c not in out]

    def prod(cs):
        return math.prod(size[c] for c in cs)

    xa = _add(graph, node, "Transpose", [x], perm=[a.index(c) for c in batch + left + contr])
    xa = _add(graph, node, "Reshape", [xa, _const(graph, node, [size[c] for c in batch] + [prod(left), prod(contr)])])
    yb = _add(graph, node, "Transpose", [y], perm=[b.index(c) for c in batch + contr + right])
    yb = _add(graph, node, "Reshape", [yb, _const(graph, node, [size[c] for c in batch] + [prod(contr), prod(right)])])
    z = _add(graph, node, "MatMul", [xa, yb])
    order = batch + left + right
    z = _add(graph, node, "Reshape", [z, _const(graph, node, [size[c] for c in order])])
    _replace(graph, node, _add(graph, node, "Transpose", [z], perm=[order.index(c) for c in out]))


FLOAT8E4M3FN = ir.DataType.FLOAT8E4M3FN


def e4m3_roundtrip(graph: ir.Graph, node: ir.Node) -> int:
    """Replace Cast(x, to=e4m3fn) read only by Casts (back to a float type) with the rounding in fp32 arithmetic.
    Returns the number of consumer Casts rewired."""
    if node.attributes.get_int("saturate", 1) != 1:
        raise ValueError(f"ascend: Cast {node.name!r} to float8e4m3fn with saturate=0 is not rewritten")
    users = [u for u, _ in node.outputs[0].uses()]
    if not users or any(u.op_type != "Cast" for u in users) or node.outputs[0].is_graph_output():
        raise ValueError(f"ascend: Cast {node.name!r} to float8e4m3fn is read by {[u.op_type for u in users]}; "
                         "only an FP8 round trip (Cast back to a float type) can be expressed without float8")
    x = node.inputs[0]
    if x.dtype != ir.DataType.FLOAT:
        x = _add(graph, node, "Cast", [x], to=ir.DataType.FLOAT)

    def f(v):
        return _const(graph, node, v, np.float32)

    two = f(2.0)
    q = _add(graph, node, "Clip", [x, f(-448.0), f(448.0)])
    a = _add(graph, node, "Abs", [q])
    e = _add(graph, node, "Floor", [_add(graph, node, "Div", [_add(graph, node, "Log", [a]), f(np.log(2.0))])])
    # log2 of a value next to a power of two may land one off: corrected against exact powers of two
    e = _add(graph, node, "Where", [_add(graph, node, "Greater", [_add(graph, node, "Pow", [two, e]), a]),
                                   _add(graph, node, "Sub", [e, f(1.0)]), e])
    up = _add(graph, node, "Add", [e, f(1.0)])
    e = _add(graph, node, "Where", [_add(graph, node, "LessOrEqual", [_add(graph, node, "Pow", [two, up]), a]), up, e])
    step = _add(graph, node, "Pow", [two, _add(graph, node, "Sub", [_add(graph, node, "Max", [e, f(-6.0)]), f(3.0)])])
    r = _add(graph, node, "Mul", [_add(graph, node, "Round", [_add(graph, node, "Div", [q, step])]), step])
    for u in users:
        u.replace_input_with(0, r)
    graph.remove(node, safe=True)
    return len(users)


def unroll_loop(graph: ir.Graph, node: ir.Node, limit: int = 256) -> int:
    """Loop(M, cond, *carried) with M constant, cond absent or constant true and no scan outputs -> M copies of
    its body in sequence. Returns M."""
    m_in, cond_in, *init = node.inputs
    trip = ir.convenience.get_const_tensor(m_in) if m_in is not None else None
    cond = ir.convenience.get_const_tensor(cond_in) if cond_in is not None else None
    body = node.attributes["body"].as_graph()
    if trip is None or int(trip.numpy()) > limit or (cond_in is not None and (cond is None or not bool(cond.numpy()))):
        raise ValueError(f"ascend: Loop {node.name!r}: only a constant trip count (<= {limit}) with a constant true "
                         "condition is unrolled (CANN's parser has no Loop)")
    if len(body.outputs) != 1 + len(init):
        raise ValueError(f"ascend: Loop {node.name!r} has scan outputs; not unrolled")
    carried = list(init)
    for i in range(int(trip.numpy())):
        vmap: dict[ir.Value, ir.Value] = {body.inputs[0]: _const(graph, node, i)}
        vmap.update(zip(body.inputs[2:], carried))
        if body.inputs[1] is not None:
            vmap[body.inputs[1]] = _const(graph, node, True, np.bool_)
        for j, b in enumerate(body):
            attrs = [ir.Attr(a.name, a.type, a.value) for a in b.attributes.values()]
            new = ir.Node(b.domain, b.op_type, [vmap.get(v, v) if v is not None else None for v in b.inputs],
                          attrs, num_outputs=len(b.outputs), name=f"{node.name}/unrolled{i}/{b.name or j}")
            new.metadata_props.update(node.metadata_props)
            graph.insert_before(node, new)
            vmap.update(zip(b.outputs, new.outputs))
        carried = [vmap.get(v, v) for v in body.outputs[1:]]
    for old, new in zip(node.outputs, carried):
        name, shape, typ = old.name, old.shape, old.type
        ident = ir.node("Identity", [new])
        graph.insert_before(node, ident)
        old.replace_all_uses_with(ident.outputs[0], replace_graph_outputs=True)
        ident.outputs[0].name, ident.outputs[0].shape, ident.outputs[0].type = name, shape, typ
    graph.remove(node, safe=True)
    return int(trip.numpy())


def isinf_to_equal(graph: ir.Graph, node: ir.Node) -> None:
    """IsInf(x, detect_negative, detect_positive) as Equal(x, -inf) / Equal(x, inf) (NaN is neither)."""
    x = node.inputs[0]
    want = [s for s, flag in ((-np.inf, "detect_negative"), (np.inf, "detect_positive"))
            if node.attributes.get_int(flag, 1)]
    dt = x.dtype.numpy() if x.dtype is not None else np.float32
    eqs = [_add(graph, node, "Equal", [x, _const(graph, node, s, dt)]) for s in want]
    out = eqs[0] if len(eqs) == 1 else _add(graph, node, "Or", eqs)
    _replace(graph, node, out)


class AscendProfile(ir.passes.InPlacePass):
    """The rewrites above, then one opset import (ai.onnx) and no functions. Raises if a dsv4 node is left."""

    def call(self, model: ir.Model) -> Counted:
        counts = {"GatherND batch_dims": 0, "Einsum": 0, "FP8 round trips": 0, "Loop": 0, "IsInf": 0}
        for node in list(model.graph):
            if node.op_type == "Cast" and node.attributes.get_int("to", 0) == FLOAT8E4M3FN:
                counts["FP8 round trips"] += e4m3_roundtrip(model.graph, node)
            elif node.op_type == "Loop":
                unroll_loop(model.graph, node)
                counts["Loop"] += 1
            elif node.op_type == "IsInf":
                isinf_to_equal(model.graph, node)
                counts["IsInf"] += 1
        ShapeInferencePass(strict_mode=False)(model)  # the inlined bodies' values get their (static) shapes
        g = model.graph
        for node in list(g):
            if node.domain == DOMAIN:
                raise ValueError(f"ascend: dsv4.{node.op_type} node {node.name!r} is left; every dsv4 op must be "
                                 "inlined (select_ops)")
            if node.op_type == "GatherND" and node.attributes.get_int("batch_dims", 0):
                gather_nd_batch(g, node)
                counts["GatherND batch_dims"] += 1
            elif node.op_type == "Einsum" and len(node.inputs) == 2:
                einsum_to_matmul(g, node)
                counts["Einsum"] += 1
        model.functions.clear()
        for domain in [d for d in model.opset_imports if d != ""]:
            del model.opset_imports[domain]
        return Counted(model, True, counts)
