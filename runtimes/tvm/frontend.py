"""ONNX graph of an artifact -> Relax IRModule, with the dsv4 ops lowered or inlined (issue [5]).

TVM's ONNX importer matches converters by op type only (the domain is ignored), has no public hook for
custom ops, ignores model-local functions, reads every initializer's data, and reads Constant nodes' ``value``
attribute only (ECOSYSTEM.md §7, V6). This module is the ONLY place that touches its converter table, and
makes all of that invisible:

1. ``coverage``: every dsv4 op of the graph needs a TVM lowering (registry ``tvm`` face, lowerings.py) or a
   function body in the model; every op that has neither is reported at once, before any import work.
2. ``prepare``: inline the bodies of the ops without a lowering (onnx.inliner), turn each external-data
   initializer (a weight) into a graph input so it stays a run-time parameter (never folded into the module,
   never read at import), optionally pin symbolic dims (``dims={"batch": 1}``), simplify the shape arithmetic
   of the exporter (onnxscript optimizer, no inlining), normalise ``Constant(value_*)`` to ``value``, and give
   lowered nodes a private op type (``dsv4_<Op>``) so that a dsv4 op never shadows a standard op of the same
   name (``Compress`` is also an ai.onnx op).
3. ``converters()``: for ONE import, the converter map gains the dsv4 lowerings and the importer fixes of
   importer_fixes.py; the original map function is restored afterwards, also on error.
"""

from __future__ import annotations

import ast
import contextlib
import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from dsv4.export import custom_ops
from dsv4.export.functions import DOMAIN

PRIVATE = "dsv4_"  # op type prefix of lowered nodes during import


class MissingOpsError(ValueError):
    """dsv4 ops with neither a TVM lowering nor a function body; the message lists all of them."""

    def __init__(self, missing: dict[str, str]):
        self.missing = missing
        lines = "\n".join(f"  dsv4.{op}: {why}" for op, why in sorted(missing.items()))
        super().__init__(f"TVM cannot import {len(missing)} dsv4 op(s):\n{lines}\n"
                         "add a lowering (runtimes/tvm/lowerings.py + the registry row's tvm face) or attach the "
                         "body (export/functions.py)")


@dataclass(frozen=True)
class Param:
    """One weight, fed to the compiled function at run time from the artifact's external data."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    location: str  # file relative to the graph's directory
    offset: int
    length: int


@dataclass
class Prepared:
    model: onnx.ModelProto
    inputs: list[str]  # data inputs, in order (then the params)
    outputs: list[str]
    params: list[Param]
    lowered: dict[str, int] = field(default_factory=dict)  # op -> nodes handled by a lowering
    inlined: list[str] = field(default_factory=list)  # ops whose bodies were inlined


# ---- 1. coverage -----------------------------------------------------------------------------------------------
def lowering_of(op: str):
    """The lowering function of dsv4 op `op`, or None when its registry row says "inline"."""
    row = custom_ops.ROWS.get(op)
    if row is None or row.tvm == "inline":
        return None
    return custom_ops.load(row.tvm)


def coverage(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(lowered, inlined) dsv4 ops reachable from the graph; raises MissingOpsError listing every op with
    neither a lowering nor a body (also ops reached only through other bodies)."""
    bodies = {f.name: f for f in model.functions if f.domain == DOMAIN}
    lowered, inlined, missing = set(), set(), {}
    todo, seen = custom_ops.dsv4_op_types(model.graph.node), set()
    while todo:
        op = todo.pop()
        seen.add(op)
        try:
            fn = lowering_of(op)
        except (ImportError, AttributeError) as e:
            missing[op] = f"its tvm face {custom_ops.ROWS[op].tvm!r} does not load ({e})"
            continue
        if fn is not None:
            lowered.add(op)
        elif op in bodies:
            inlined.add(op)
            todo |= custom_ops.dsv4_op_types(bodies[op].node) - seen
        else:
            missing[op] = ("not in the registry (export/custom_ops.py)" if op not in custom_ops.ROWS
                           else "no TVM lowering and no function body in the model")
    if missing:
        raise MissingOpsError(missing)
    return lowered, inlined


# ---- 2. prepare ------------------------------------------------------------------------------------------------
_CONST_ATTRS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                "value_ints": np.int64}


def normalise_constants(graph: onnx.GraphProto) -> int:
    """Constant(value_float/floats/int/ints) -> Constant(value=tensor), recursively; returns the count."""
    count = 0
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.attribute[0].name in _CONST_ATTRS:
            a = n.attribute[0]
            arr = np.array(helper.get_attribute_value(a), dtype=_CONST_ATTRS[a.name])
            del n.attribute[:]
            n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))
            count += 1
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                count += normalise_constants(g)
    return count


def weights_to_inputs(model: onnx.ModelProto) -> list[Param]:
    """Move every external-data initializer to the graph inputs (after the data inputs); returns them in order."""
    keep, params = [], []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            keep.append(t)
            continue
        info = {e.key: e.value for e in t.external_data}
        params.append(Param(t.name, helper.tensor_dtype_to_np_dtype(t.data_type).name, tuple(t.dims),
                            info["location"], int(info.get("offset", 0)), int(info["length"])))
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return params


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def eval_dim(expr: str, dims: dict[str, int]) -> int | None:
    """Value of a symbolic dim written by the exporter (``((length + 3)//4)``), or None if it names other dims."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return dims[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise KeyError(expr)

    try:
        return int(ev(ast.parse(expr, mode="eval")))
    except (KeyError, SyntaxError):
        return None


def pin_dims(model: onnx.ModelProto, dims: dict[str, int]) -> None:
    """Replace symbolic dims by values on inputs, outputs and value_info (the exporter's shapes stay consistent)."""
    g = model.graph
    for v in list(g.input) + list(g.output) + list(g.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param and (val := eval_dim(d.dim_param, dims)) is not None:
                d.dim_value = val


def prepare(model: onnx.ModelProto, dims: dict[str, int] | None = None, optimize: bool = True) -> Prepared:
    """The import-ready copy of `model` (see the module docstring); `model` is not modified."""
    lowered, inlined = coverage(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inputs = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    outputs = [o.name for o in m.graph.output]
    keep = [(f.domain, f.name) for f in m.functions if f.domain == DOMAIN and f.name in lowered]
    m = onnx.inliner.inline_selected_functions(m, keep, exclude=True)
    normalise_constants(m.graph)
    params = weights_to_inputs(m)
    if dims:
        pin_dims(m, dims)
    if optimize:
        import onnxscript.optimizer

        m = onnxscript.optimizer.optimize(m, inline=False)
        normalise_constants(m.graph)
    counts = _privatise(m.graph, lowered)
    del m.functions[:]
    return Prepared(m, inputs, outputs, params, dict(sorted(counts.items())), sorted(inlined))


def _privatise(graph: onnx.GraphProto, lowered: set[str], counts: Counter | None = None) -> Counter:
    """Rename lowered dsv4 nodes to their private op type (recursively); returns op -> node count."""
    counts = Counter() if counts is None else counts
    for n in graph.node:
        if n.domain == DOMAIN and n.op_type in lowered:
            counts[n.op_type] += 1
            n.op_type = PRIVATE + n.op_type
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _privatise(g, lowered, counts)
    return counts


# ---- 3. converters and import ----------------------------------------------------------------------------------
def _converter(op: str, fn):
    from tvm.relax.frontend.onnx import onnx_frontend as ofe

    class Lowered(ofe.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            return fn(bb, list(inputs), {k: v for k, v in attr.items() if k != "tvm_custom"})

    Lowered.__name__ = Lowered.__qualname__ = PRIVATE + op
    return Lowered


@contextlib.contextmanager
def converters(lowered: set[str]):
    """TVM's converter map with the dsv4 lowerings and the importer fixes, for the duration of the block."""
    from tvm.relax.frontend.onnx import onnx_frontend as ofe

    from .importer_fixes import fixed_map

    original = ofe._get_convert_map
    table = fixed_map(original())
    table.update({PRIVATE + op: _converter(op, lowering_of(op)) for op in lowered})
    ofe._get_convert_map = lambda: table
    try:
        yield table
    finally:
        ofe._get_convert_map = original


def import_model(model: onnx.ModelProto | str | Path, dims: dict[str, int] | None = None):
    """ONNX model (or path, external data not read) -> (Relax IRModule, Prepared). The Relax function ``main``
    takes the data inputs then the params, in Prepared order, and returns the outputs as a tuple."""
    from tvm.relax.frontend.onnx import from_onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    prep = prepare(model, dims)
    with converters(set(prep.lowered)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # input renaming and "unknown dim" chatter, one line per weight
        mod = from_onnx(prep.model, keep_params_in_input=False, sanitize_input_names=True)
    return mod, prep
