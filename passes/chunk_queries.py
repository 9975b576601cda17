"""Query-chunked bodies of the dsv4 ops whose intermediates grow as queries x keys (the ort-cpu and ort-cuda targets).

IndexerTopK materialises the scores of all queries against every compressed index key at once, [B,T,H,N] fp32
(small preset, 16K prompt in a 16,640-position capacity: 16 heads x 4,160 keys x 16,384 queries = 4.4 GB per
tensor, two of them alive), and SparseAttn gathers [B,T,K,D] rows (16K queries x 258 candidates x 256 dims: 4.3
GB). The eager kernels (models/kernels.py) walk the queries in QUERY_CHUNK blocks; these wrappers do the same in
the graph: pad the query axis up to whole chunks, one ONNX ``Loop`` iteration per chunk that runs the op's own body
on its rows (as ``<op>Rows``, the registry body unchanged), the chunks' results as the Loop's scan output,
reshaped back and cut to T. Each output row depends only on its own query row (and the shared keys), so the
result is the body's exactly: same ops, same per-row reductions, same order.

Only the ORT targets use them (select_ops swaps them in right before inlining): TVM's importer has no Loop (TVM
lowers SparseAttn itself and inlines IndexerTopK's Loop-free body), and CANN's parser unrolls only constant-count
loops. The int64 inputs are padded by concatenating zeros, not by Pad, whose CUDA kernel has no int64 (with Pad
the ort-cuda lint found 4 violations on tiny); how the Loop performs on a GPU is for tools/gpu_check.sh. Raw
``--no-passes`` graphs keep the plain bodies too. Measured on small, 8K prompt, 16,640 capacity: peak RSS 12.1 -> 3.6 GB (docs/PERF.md).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from dsv4.export.custom_ops import ROWS
from dsv4.export.functions import DOMAIN, DOMAIN_VERSION
from dsv4.models.kernels import QUERY_CHUNK

from ._graph import DSV4_OP_KEY

# op -> (its inputs, the inputs with a query axis 1, its attributes, output rank)
CHUNKED = {
    "IndexerTopK": (["q", "k", "w", "n_visible"], {"q", "w", "n_visible"}, ["top_k"], 3),
    "SparseAttn": (["q", "kv", "sink", "idx", "scale"], {"q", "idx"}, [], 4),
}


def _const(name: str, vals: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals))


def chunked_proto(op: str) -> onnx.FunctionProto:
    """The wrapper of `op` (domain dsv4, same name, inputs and attributes) that loops over query chunks and calls
    ``dsv4.<op>Rows`` (the registry body) on each."""
    inputs, chunked, attrs, rank = CHUNKED[op]
    int64 = {name for name, t in ROWS[op].inputs if t == "tensor(int64)"}  # the registry's signature
    n = [
        _const("c", [QUERY_CHUNK]), _const("one", [1]), _const("zero", [0]), _const("ax1", [1]), _const("m1", [-1]),
        helper.make_node("Shape", ["q"], ["t_raw"], start=1, end=2),
        helper.make_node("Cast", ["t_raw"], ["t"], to=TensorProto.INT64),
        helper.make_node("Add", ["t", "c"], ["t_c"]),
        helper.make_node("Sub", ["t_c", "one"], ["t_c1"]),
        helper.make_node("Div", ["t_c1", "c"], ["nc"]),  # chunks: ceil(T / C)
        helper.make_node("Mul", ["nc", "c"], ["tp"]),
        helper.make_node("Sub", ["tp", "t"], ["pad_len"]),
        helper.make_node("Concat", ["zero", "pad_len"], ["pads"], axis=0),
        helper.make_node("Squeeze", ["nc"], ["trips"]),
        helper.make_node("Constant", [], ["go"], value=helper.make_tensor("go", TensorProto.BOOL, [], [True])),
    ]
    for x in inputs:  # padded rows (zeros) only produce rows that are cut off at the end
        if x in chunked and x in int64:  # zeros concatenated: the CUDA EP's Pad has no int64 kernel
            n += [helper.make_node("Shape", [x], [x + "_lead"], end=1),
                  helper.make_node("Shape", [x], [x + "_tail"], start=2),
                  helper.make_node("Concat", [x + "_lead", "pad_len", x + "_tail"], [x + "_pshape"], axis=0),
                  helper.make_node("ConstantOfShape", [x + "_pshape"], [x + "_zeros"],
                                   value=helper.make_tensor(x + "_zero", TensorProto.INT64, [1], [0])),
                  helper.make_node("Concat", [x, x + "_zeros"], [x + "_p"], axis=1)]
        elif x in chunked:
            n.append(helper.make_node("Pad", [x, "pads", "", "ax1"], [x + "_p"]))
    call = helper.make_node(op + "Rows", [x + "_c" if x in chunked else x for x in inputs], ["part"], domain=DOMAIN)
    call.attribute.extend(helper.make_attribute_ref(k, onnx.AttributeProto.INT) for k in attrs)
    call.metadata_props.add(key=DSV4_OP_KEY, value=op)  # the inlined rows' nodes say which op they implement
    body_nodes = [
        helper.make_node("Unsqueeze", ["i", "zero"], ["i1"]),
        helper.make_node("Mul", ["i1", "c"], ["a"]),
        helper.make_node("Add", ["a", "c"], ["b"]),
        *[helper.make_node("Slice", [x + "_p", "a", "b", "ax1"], [x + "_c"]) for x in inputs if x in chunked],
        call,
        helper.make_node("Identity", ["cond"], ["cond_out"]),
    ]
    body = helper.make_graph(body_nodes, "chunk", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                                   helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_value_info("part", onnx.TypeProto())])
    perm = [1, 0, *range(2, rank + 1)]  # [nc,B,C,...] -> [B,nc,C,...]
    n += [
        helper.make_node("Loop", ["trips", "go"], ["parts"], body=body),
        helper.make_node("Transpose", ["parts"], ["parts_t"], perm=perm),
        helper.make_node("Shape", ["parts_t"], ["lead_raw"], end=1),
        helper.make_node("Shape", ["parts_t"], ["tail_raw"], start=3),
        helper.make_node("Cast", ["lead_raw"], ["lead"], to=TensorProto.INT64),
        helper.make_node("Cast", ["tail_raw"], ["tail"], to=TensorProto.INT64),
        helper.make_node("Concat", ["lead", "m1", "tail"], ["shape"], axis=0),
        helper.make_node("Reshape", ["parts_t", "shape"], ["rows"]),
        helper.make_node("Slice", ["rows", "zero", "t", "ax1"], ["out"]),
    ]
    return helper.make_function(DOMAIN, op, inputs, ["out"], n, [helper.make_opsetid("", 23),
                                                                  helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                                attributes=attrs)


def _one_query(node: ir.Node) -> bool:
    """The call's query axis is the static length 1 (a decode graph)."""
    shape = node.inputs[0].shape
    return shape is not None and len(shape) > 1 and shape[1] == 1


def swap_in(model: ir.Model) -> list[str]:
    """Replace the functions of the CHUNKED ops the model holds by their wrappers (plus the ``<op>Rows`` bodies the
    wrappers call), stamped with the model's opset; returns the ops swapped. Graphs whose calls all have one query
    (decode) keep the plain bodies: a one-trip Loop there measured 650 vs 170 ms per small decode step."""
    opset = model.opset_imports[""]
    swapped = []
    for op in CHUNKED:
        key = (DOMAIN, op, "")
        calls = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN and n.op_type == op]
        if key not in model.functions or all(_one_query(n) for n in calls):
            continue
        rows = model.functions[key]  # the registry body, as attach_functions stamped it
        rows.name = op + "Rows"
        model.functions[rows.identifier()] = rows
        proto = chunked_proto(op)
        for imp in proto.opset_import:
            if imp.domain == "":
                imp.version = opset
        fn = ir.serde.deserialize_function(proto)
        model.functions[key] = fn
        swapped.append(op)
    return swapped

