"""Expert-chunked NarrowMoE in prefill graphs (ort-cpu, ort-cuda): memory bounded whatever the number of selected
experts.

NarrowMoE (passes/lower_ort.py) dequantises at once every expert some token selected and runs the MoEExperts body
over all U of them: at Flash dims ~100 MB of fp32 weights per expert (plus the body's transposed copies), and a
64-token prompt already selects ~200 of 256 experts per layer (issue [16]: a 2-layer slice's prefill went past 22 GB).
Here the gathers and dequantisation of the stacks and the MoEExperts call move into an ONNX ``Loop`` with one trip
per used expert:

    eids [U], pidx [N,K] = positions of the slots' experts in eids (NarrowMoE's)
    acc = zeros [N,D]
    Loop e in 0 .. U-1:   stacks_e = dequant(gather(packed stacks, eids[e:e+1]))         [1, I, D] ...
                          rows = the tokens with a slot on expert e                      [M], M >= 1
                          acc[rows] += MoEExperts(x[rows], w[rows], pidx[rows] - e, stacks_e)   (ScatterND add)
    y = acc

In the gathered rows, slots of other experts point outside the one-row stack and match nothing (routing weight 0 in
the body), so each trip computes the body's term of expert eids[e] for the M tokens that chose it (the same GEMM
rows, one expert at a time; every op of the body is row-wise), and ``acc[rows] +=`` the term is the body's final
ReduceSum over experts, which ONNX Runtime folds sequentially in ascending expert id (passes/ordered_sum.py): the
numbers are NarrowMoE's (the dense body's other rows add an exact 0) as far as MLAS rounds a GEMM row the same for
M gathered rows as for all N: bit for bit on tiny and small (tests) and on the Flash slice at 512 prompt tokens; at
64 the Flash slice's prompt logits moved by 1.1e-6 (docs/passes.md). One expert per trip is what
keeps that fold: a chunk of C experts would sum its own terms first and regroup the additions (and expert-parallel's
ordered sum, which reproduces the single fold term by term, would no longer match). Gathering the rows makes a
prefill's routed-expert GEMMs N x K rows in all instead of N x U (issue [16]: a 64-token Flash prompt selects ~200
of 256 experts with K = 6).

``HoistInvariants`` (the ort-cpu and ort-cuda pipelines, after the cleanup that folds the body's Ifs) moves every body node
whose inputs do not change from trip to trip in front of the Loop, computed once. With the rows gathered, the FP8
simulation of x runs in the body on x[rows] (N x K rows over all trips, per-row blocks: the same values).

Only prefill graphs get the Loop: in a decode graph (``input_ids`` [batch, 1]) U <= top_k x batch, and the dense
form stays. Rank templates (passes/shard_experts.py: the MoEExperts output feeds the all-reduce) keep the dense form
too: passes/ordered_sum.py rewrites the body's ReduceSum over experts, which the Loop no longer has.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dsv4.export.functions import DOMAIN
from dsv4.export.signature import INPUT_IDS

from .cleanup import Counted
from .shard_experts import ALL_REDUCE, COLLECTIVE_DOMAIN

LOOP_KEY = "dsv4.loop"  # Loop node metadata: "experts" on the Loops made here


def _decode(model: ir.Model) -> bool:
    """The graph takes one token per sequence (a decode graph)."""
    ids = next((v for v in model.graph.inputs if v.name == INPUT_IDS), None)
    return ids is not None and ids.shape is not None and len(ids.shape) == 2 and ids.shape[1] == 1


def _stack_nodes(m: ir.Node) -> tuple[ir.Value, list[ir.Node]] | str:
    """(eids, the nodes between eids and the node's expert stacks) of a NarrowMoE MoEExperts node, or why not."""
    eids, seen, order = None, set(), []

    def visit(v: ir.Value) -> bool:  # does v depend on the gathered expert list? collects the nodes that do
        nonlocal eids
        p = v.producer()
        if p is None:
            return False
        if p.op_type == "Gather" and p.inputs[0] is not None and p.inputs[0].is_initializer():
            if eids is not None and p.inputs[1] is not eids:
                return False
            eids = p.inputs[1]
        elif not any([visit(i) for i in p.inputs if i is not None]):  # a list: visit every input
            return False
        if id(p) not in seen:
            seen.add(id(p))
            order.append(p)
        return True

    if not all(visit(s) for s in m.inputs[3:6]) or eids is None:
        return "its expert stacks are not dequantised gathers of initializers by one expert list"
    for n in order:
        for out in n.outputs:
            if any(u.node is not m and id(u.node) not in seen for u in out.uses()) or out.is_graph_output():
                return f"{n.name} ({n.op_type}) has a consumer outside the stacks"
    pos = {id(n): i for i, n in enumerate(m.graph)}  # graph order (Graph.index walks the linked list per step)
    return eids, sorted(order, key=lambda n: pos[id(n)])


def _named(v: ir.Value, name: str) -> ir.Value:
    if not v.name:
        v.name = name
    return v


def chunk(model: ir.Model) -> dict[str, int]:
    """Every NarrowMoE MoEExperts node of a prefill graph -> the per-expert Loop (module docstring). Counts."""
    if _decode(model):
        return {}
    g = model.graph
    moes = [n for n in g if n.domain == DOMAIN and n.op_type == "MoEExperts"]
    counts: dict[str, int] = {}
    for m in moes:
        if any(u.node.domain == COLLECTIVE_DOMAIN and u.node.op_type == ALL_REDUCE for u in m.outputs[0].uses()):
            counts["dense MoE (rank template)"] = counts.get("dense MoE (rank template)", 0) + 1
            continue
        found = _stack_nodes(m)
        if isinstance(found, str):  # not NarrowMoE's (e.g. a MoEExperts that fuse_moe left unfused): the body stays
            counts["dense MoEExperts (not NarrowMoE's form)"] = counts.get("dense MoEExperts (not NarrowMoE's form)", 0) + 1
            continue
        eids, moved = found
        _loop(g, m, eids, moved)
        counts["expert-chunked MoE"] = counts.get("expert-chunked MoE", 0) + 1
    return counts


def _loop(g: ir.Graph, m: ir.Node, eids: ir.Value, moved: list[ir.Node]) -> None:
    tag = m.name or "moe"
    meta = dict(m.metadata_props)
    x, pidx, y = m.inputs[0], m.inputs[2], m.outputs[0]
    for k, v in (("x", x), ("w", m.inputs[1]), ("pidx", pidx), ("eids", eids)):
        _named(v, f"{tag}.experts.{k}")
    for j, n in enumerate(moved):  # every value the body reads or makes needs a name
        for i, v in enumerate(n.inputs):
            if v is not None:
                _named(v, f"{tag}.experts.in{j}_{i}")
        for i, v in enumerate(n.outputs):
            _named(v, f"{tag}.experts.out{j}_{i}")

    def node(op, inputs, name, **attrs):
        n = ir.node(op, inputs, attributes=attrs, name=f"{tag}/experts/{name}", metadata_props=dict(meta))
        for j, out in enumerate(n.outputs):
            out.name = f"{tag}.experts.{name}" + (f".{j}" if j else "")
        return n

    def const(name, value, dtype=np.int64):
        return node("Constant", [], name, value=ir.tensor(np.asarray(value, dtype=dtype)))

    # the outer nodes: U trips, acc starts at zeros [N, D]; y's consumers read the Loop's result
    u = node("Shape", [eids], "u")
    trips = node("Squeeze", [u.outputs[0]], "trips")
    go = const("go", True, np.bool_)
    shape_x = node("Shape", [x], "shape_x")
    zeros = node("ConstantOfShape", [shape_x.outputs[0]], "zeros", value=ir.tensor(np.zeros(1, np.float32)))
    g.insert_before(m, [u, trips, go, shape_x, zeros])
    outer_uses = list(y.uses())
    # the body: trip e takes expert eids[e]
    it = ir.Value(name=f"{tag}.experts.e", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name=f"{tag}.experts.cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    acc = ir.Value(name=f"{tag}.experts.acc", type=ir.TensorType(ir.DataType.FLOAT), shape=y.shape)
    ax0, one = const("ax0", [0]), const("one", [1])
    e1 = node("Unsqueeze", [it, ax0.outputs[0]], "e1")
    e2 = node("Add", [e1.outputs[0], one.outputs[0]], "e2")
    eids_e = node("Slice", [eids, e1.outputs[0], e2.outputs[0], ax0.outputs[0]], "eids_e")  # [1]
    pidx_e = node("Sub", [pidx, it], "pidx_e")  # the slots of expert e -> row 0; the others -> no row
    # the tokens with a slot on expert e: rows [M] (M >= 1: eids holds only experts some slot chose)
    hit = node("Equal", [pidx, it], "hit")  # [N,K]
    hit_i = node("Cast", [hit.outputs[0]], "hit_i", to=ir.DataType.INT64)
    hit_n = node("ReduceMax", [hit_i.outputs[0], one.outputs[0]], "hit_n", keepdims=0)  # [N]: axis 1
    nz = node("NonZero", [hit_n.outputs[0]], "nz")  # [1,M]
    rows = node("Squeeze", [nz.outputs[0], ax0.outputs[0]], "rows")  # [M]
    where = node("Transpose", [nz.outputs[0]], "where", perm=[1, 0])  # [M,1]: ScatterND's indices
    picked = [node("Gather", [v, rows.outputs[0]], f"{k}_m", axis=0)
              for k, v in (("x", x), ("w", m.inputs[1]), ("pidx", pidx_e.outputs[0]))]
    g.remove([*moved, m])
    for n in moved:
        for i, v in enumerate(n.inputs):
            if v is eids:
                n.replace_input_with(i, eids_e.outputs[0])
    for i, n in enumerate(picked):
        m.replace_input_with(i, n.outputs[0])
    y.name = f"{tag}.experts.term"
    add = node("ScatterND", [acc, where.outputs[0], y], "acc_out", reduction="add")  # acc[rows] += term
    keep = node("Identity", [cond], "cond_out")
    body = ir.Graph([it, cond, acc], [keep.outputs[0], add.outputs[0]],
                    nodes=[ax0, one, e1, e2, eids_e, pidx_e, hit, hit_i, hit_n, nz, rows, where, *picked,
                           *moved, m, add, keep], name=f"{tag}.experts.body")
    loop = node("Loop", [trips.outputs[0], go.outputs[0], zeros.outputs[0]], "loop", body=body)
    loop.metadata_props[LOOP_KEY] = "experts"
    out = loop.outputs[0]
    out.dtype, out.shape = ir.DataType.FLOAT, y.shape
    for use in outer_uses:
        use.node.replace_input_with(use.idx, out)
    g.insert_after(zeros, [loop])


class HoistInvariants(ir.passes.InPlacePass):
    """Loop-invariant code motion for the expert Loops (``LOOP_KEY``): a body node none of whose inputs is a body
    input or the output of a node that stays (and that holds no subgraph) moves in front of its Loop. The same ops
    on the same values, once: the numbers do not change."""

    def call(self, model: ir.Model) -> Counted:
        g, hoisted, loops = model.graph, 0, 0
        for loop in [n for n in g if n.op_type == "Loop" and n.metadata_props.get(LOOP_KEY) == "experts"]:
            body = loop.attributes["body"].as_graph()
            varying = set(map(id, body.inputs))
            out = []
            for n in body:
                if (any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in n.attributes.values())
                        or any(v is not None and id(v) in varying for v in n.inputs)
                        or any(v.is_graph_output() for v in n.outputs)):
                    varying.update(map(id, n.outputs))
                else:
                    out.append(n)
            if out:
                body.remove(out)
                for n in out:  # node names are unique per graph: the body's may repeat in the main graph
                    n.name = f"{loop.name}/{n.name}"
                for name, v in list(body.initializers.items()):  # constants the folder made in the body: outer
                    if any(id(u.node) in set(map(id, out)) for u in v.uses()):  # scope, visible to the body too
                        body.initializers.pop(name)
                        v.name = f"{loop.name}/{name}"
                        g.register_initializer(v)
                g.insert_before(loop, out)
            hoisted, loops = hoisted + len(out), loops + 1
        return Counted(model, hoisted > 0, {"expert Loops": loops, "nodes hoisted": hoisted})
